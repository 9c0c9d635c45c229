"""Run configuration: typed dataclasses, read from TOML files and dotted `section.key=value` overrides.

A run is described by four sections — data, tokenizer, model, train — and the resolved config is
written to the run folder as JSON, so every run can be reproduced from its own folder.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import LmforgeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

AUSTEN = ["gutenberg:austen-emma.txt", "gutenberg:austen-persuasion.txt"]


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: list(AUSTEN))
    val_fraction: float = 0.1
    jsonl_field: str = "text"
    encoding: str = "utf-8"
    errors: str = "strict"  # how undecodable bytes are handled: strict | replace | ignore
    cache_dir: str | None = None

    def __post_init__(self):
        if not self.sources:
            raise LmforgeError("data.sources is empty; name at least one text file, folder, glob or gutenberg:ID")
        if not 0.0 < self.val_fraction < 1.0:
            raise LmforgeError(f"data.val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.errors not in ("strict", "replace", "ignore"):
            raise LmforgeError(f"data.errors must be strict, replace or ignore, got {self.errors!r}")


@dataclass
class TokenizerConfig:
    kind: str = "bpe"
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {"vocab_size": 4096}


@dataclass
class ModelConfig:
    arch: str = "transformer"
    options: dict[str, Any] = field(default_factory=dict)  # family fields: d_model, n_layers, ...


@dataclass
class TrainConfig:
    seed: int = 1337
    batch_size: int = 16
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw | muon (Muon for 2-D hidden weights, AdamW for the rest)
    lr: float = 3e-3
    muon_lr: float = 0.02
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 20
    schedule: str = "wsd"  # wsd (warm-up, stable, decay) | cosine
    decay_fraction: float = 0.3  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    # seconds of training (evaluation and preparation excluded); 250 s leaves room for the periodic and
    # final evaluations, so the default command ends within 5 minutes
    max_time: float | None = 250.0
    eval_interval: int = 200  # steps between evaluations under a step budget (a time budget evaluates 10 times)
    eval_batches: int = 16  # periodic evaluation uses this many batches of the validation split
    keep_best: bool = True  # model.safetensors holds the weights with the best validation loss
    checkpoint_interval: int = 500
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    compile: bool = False
    sample_prompt: str = "Emma Woodhouse"
    sample_tokens: int = 200
    progress: bool = True

    def __post_init__(self):
        # `max_time = 0` (or "none") in a file or on the command line means no time limit.
        if isinstance(self.max_time, str):
            self.max_time = None if self.max_time.strip().lower() in ("none", "0") else parse_duration(self.max_time)
        if self.max_time == 0:
            self.max_time = None
        checks = [
            (self.batch_size >= 1, "train.batch_size must be at least 1"),
            (self.grad_accum >= 1, "train.grad_accum must be at least 1"),
            (self.lr > 0, "train.lr must be positive"),
            (self.optimizer in ("adamw", "muon"), f"train.optimizer must be adamw or muon, got {self.optimizer!r}"),
            (self.schedule in ("wsd", "cosine"), f"train.schedule must be wsd or cosine, got {self.schedule!r}"),
            (self.max_steps is None or self.max_steps >= 1, "train.max_steps must be at least 1"),
            (self.max_time is None or self.max_time > 0, "train.max_time must be positive"),
            (self.max_steps is not None or self.max_time is not None,
             "give a budget: --max-steps N or --max-time 5m"),
            (0 <= self.decay_fraction <= 1, "train.decay_fraction must be in [0, 1]"),
            (self.eval_interval >= 1, "train.eval_interval must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(message)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> "RunConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise LmforgeError(f"{where}: unknown section(s) {sorted(unknown)}; valid: {sorted(sections)}")
        return cls(**{name: _build(SECTION_TYPES[name], raw.get(name, {}), f"{where} [{name}]")
                      for name in sections})


SECTION_TYPES = {"data": DataConfig, "tokenizer": TokenizerConfig, "model": ModelConfig, "train": TrainConfig}


def _build(kind, values: dict, where: str):
    if not isinstance(values, dict):
        raise LmforgeError(f"{where} must be a table of key = value pairs")
    names = {f.name for f in dataclasses.fields(kind)}
    values = dict(values)
    # `[model]` and `[tokenizer]` take their family's own fields directly: `d_model = 256`.
    if kind in (ModelConfig, TokenizerConfig):
        head = "arch" if kind is ModelConfig else "kind"
        options = dict(values.pop("options", {}))
        options.update({k: v for k, v in values.items() if k != head})
        values = {head: values[head]} if head in values else {}
        values["options"] = options
    unknown = set(values) - names
    if unknown:
        raise LmforgeError(f"{where}: unknown option(s) {sorted(unknown)}; valid: {sorted(names)}")
    return kind(**values)


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise LmforgeError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise LmforgeError(f"config file {path} is not valid TOML: {e}") from None


def parse_value(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, strings, lists); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`train.lr=1e-3`, `model.d_model=128`: set one dotted key in the raw config dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or parts[0] not in SECTION_TYPES:
            raise LmforgeError(f"override {item!r} is not section.key=value (sections: {', '.join(SECTION_TYPES)})")
        raw.setdefault(parts[0], {})[parts[1]] = parse_value(value.strip())
    return raw


def parse_duration(text: str | float | int | None) -> float | None:
    """'90', '90s', '5m', '1h30m' -> seconds."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise LmforgeError(f"cannot read duration {text!r}; write it like 300, 90s, 5m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LmforgeError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LmforgeError(f"{what} {path} is not valid JSON (truncated or corrupt)") from None
