"""Fine-tuning and transfer: LoRA / freezing, prompt -> completion and classification tasks, Hugging Face
import / export, the author-attribution dataset and the transfer report.

In: a trained run (or a Hugging Face folder). Out: new run folders that load like any other.
The names below load on first use, so `lmforge --help` never imports torch through this package.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"finetune": "run", "freeze": "freeze", "apply_lora": "lora", "merge_lora": "lora",
            "LoRALinear": "lora", "import_hf": "hf", "export_hf": "hf", "write_authors": "authors",
            "run_transfer": "transfer"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
