"""Fine-tuning and transfer: LoRA / freezing, prompt -> completion and classification tasks, Hugging Face
import / export, the author-attribution dataset and the transfer report.

In: a trained run (or a Hugging Face folder). Out: new run folders that load like any other.
"""
from .freeze import freeze
from .lora import LoRALinear, apply_lora, merge_lora
from .run import finetune

__all__ = ["LoRALinear", "apply_lora", "finetune", "freeze", "merge_lora"]
