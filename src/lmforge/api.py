"""The Python API: `lmforge.train(...)`, `lmforge.load(run)`, then `.generate()` and `.evaluate()`.

The CLI is a thin shell over these functions; both start from the same run folders.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import checkpoint as ckpt
from .config import RunConfig, apply_overrides, load_toml
from .device import resolve_device, resolve_dtype
from .errors import LmforgeError
from .evaluation.likelihood import evaluate_documents
from .generation import Generation, SamplingConfig, generate as _generate, stream as _stream

PRESETS_DIR = Path(__file__).parent / "configs"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def build_config(config: str | Path | dict | RunConfig | None = None, preset: str | None = None,
                 overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from (in order of precedence) overrides, a TOML file or dict, a preset, defaults."""
    if isinstance(config, RunConfig):
        raw = config.to_dict()
    else:
        raw = {}
        if preset is not None:
            path = PRESETS_DIR / f"{preset}.toml"
            if not path.exists():
                raise LmforgeError(f"unknown preset {preset!r}; valid presets: {', '.join(presets())}")
            raw = load_toml(path)
        if isinstance(config, dict):
            _merge(raw, config)
        elif config is not None:
            _merge(raw, load_toml(config))
    apply_overrides(raw, overrides or [])
    return RunConfig.from_dict(raw)


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def validation_documents(data_config: dict) -> list[tuple[str, str]]:
    """(name, validation text) per document, split exactly as `prepare` splits it."""
    from .data import read_sources
    from .data.prepare import split_text

    docs = read_sources(data_config["sources"], jsonl_field=data_config["jsonl_field"],
                        encoding=data_config["encoding"], errors=data_config["errors"])
    return [(doc.name, split_text(doc.text, data_config["val_fraction"])[1]) for doc in docs]


@dataclass
class LanguageModel:
    """A trained model with its tokenizer: what `lmforge.load` returns."""
    model: torch.nn.Module
    tokenizer: object
    config: dict
    run_dir: Path | None = None
    device: torch.device = torch.device("cpu")

    def generate(self, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[str] | None = None, on_text=None) -> str:
        return self.complete(prompt, SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed, stop or []),
                             on_text).text

    def complete(self, prompt: str, sampling: SamplingConfig, on_text=None) -> Generation:
        return _generate(self.model, self.tokenizer, prompt, sampling, on_text=on_text, device=self.device)

    def stream(self, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: list[str] | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated."""
        sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed, stop or [])
        return _stream(self.model, self.tokenizer, prompt, sampling, device=self.device)

    def evaluate(self, text: str | None = None) -> dict:
        """Bits per byte, perplexity and accuracy on `text`, or on the run's validation split."""
        docs = [("text", text)] if text is not None else validation_documents(self.config["data"])
        return evaluate_documents(self.model, self.tokenizer, docs, device=self.device)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load(run: str | Path, device: str = "cpu") -> LanguageModel:
    """Load a run folder made by `lmforge train` (weights, tokenizer and config). On a CPU, token-by-token
    decoding uses int8 or fp16 copies of the weights (lmforge.models.decoding); all else is fp32."""
    from .models.decoding import prepare_for_decoding

    model, tokenizer, config = ckpt.load_model(Path(run))
    dev = resolve_device(device)
    if dev.type == "cpu":
        prepare_for_decoding(model)
    return LanguageModel(model.to(dev), tokenizer, config, Path(run), dev)


def train(config: str | Path | dict | RunConfig | None = None, out: str | Path | None = None, *,
          preset: str | None = None, overrides: list[str] | None = None, resume: bool = False,
          log=print, final_eval: bool = True, budget: float | None = None):
    """Train a model and return (LanguageModel, TrainResult). `out` defaults to runs/<arch>-<time>.
    `budget` (seconds) is the training time, and sizes the Transformer for it on this machine
    (lmforge.sizing)."""
    from .training.loop import train as _train

    if resume:
        if out is None:
            raise LmforgeError("resume needs the run folder: --resume RUN")
        # Start from the run's own config; what the caller sets on top is checked for conflicts.
        stored = ckpt.read_config(Path(out))
        base = {k: stored[k] for k in ("data", "tokenizer", "train")}
        base["model"] = {"arch": stored["model"]["arch"], "options": stored["model"]["options"]}
        cfg = build_config(_merge(base, _as_raw(config)), None, overrides)
    else:
        cfg = build_config(config, preset, overrides)
    prepared = None
    if budget is not None:
        if resume:
            raise LmforgeError("--budget sizes a new model; a resumed run keeps its size and time budget")
        cfg, prepared = _size_for_budget(cfg, budget, log)
    if out is None:
        import time

        out = Path("runs") / f"{preset or cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = _train(cfg, out, resume=resume, log=log, prepared=prepared)
    lm = load(result.run_dir, device="cpu")
    if final_eval and not result.interrupted:
        lm.device = resolve_device(cfg.train.device)
        lm.model.to(lm.device)
        summary = lm.evaluate()
        result.extra["val"] = summary
        ckpt.write_json(result.run_dir / "summary.json", {
            "steps": result.steps, "tokens": result.tokens, "train_time_s": result.train_time,
            "tokens_per_s": result.tokens_per_s, **result.extra})
    return lm, result


def _size_for_budget(cfg: RunConfig, budget: float, log):
    """cfg with train.max_time = budget and the Transformer's size chosen for it; the prepared data."""
    from .device import set_threads
    from .sizing import size_for_budget
    from .training.loop import prepare_data

    if cfg.model.arch != "transformer":
        raise LmforgeError(f"--budget sizes the Transformer; for model.arch={cfg.model.arch!r} use --max-time")
    if not budget > 0:
        raise LmforgeError(f"--budget must be a positive duration, e.g. 90s or 5m, got {budget!r}")
    prepared = prepare_data(cfg)
    set_threads(cfg.train.threads)
    options = {**cfg.model.options, "vocab_size": prepared.tokenizer.vocab_size}
    device = resolve_device(cfg.train.device)
    options = size_for_budget(options, cfg.train.batch_size, budget, device, log,
                              dtype=resolve_dtype(cfg.train.dtype, device))
    options.pop("vocab_size")
    raw = cfg.to_dict()
    raw["model"]["options"] = options
    raw["train"]["max_time"] = budget
    return RunConfig.from_dict(raw), prepared


def _as_raw(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, RunConfig):
        return config.to_dict()
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    return load_toml(config)
