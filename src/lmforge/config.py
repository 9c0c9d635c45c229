"""Run configuration: typed dataclasses, read from TOML files and dotted `section.key=value` overrides.

A run is described by its sections — data, tokenizer, model, train, and finetune for a fine-tuning
run — and the resolved config is written to the run folder as JSON, so every run can be reproduced
(and resumed) from its own folder. Every value is type-checked where it enters.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import LmforgeError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

AUSTEN = ["gutenberg:austen-emma.txt", "gutenberg:austen-persuasion.txt"]
PRESETS_DIR = Path(__file__).parent / "configs"


def is_number(value, integer: bool = False) -> bool:
    """Whether `value` is an int or float (an int, with `integer`), and not a bool, as JSON hands them over."""
    return isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)


def check_source_names(sources) -> None:
    """A one-line error for an empty source name: "" would be the current folder, every *.txt under it,
    which nobody asked for."""
    if any(isinstance(s, str) and not s.strip() for s in sources):
        raise LmforgeError("a data source is an empty name; give a file, folder, glob or gutenberg:ID "
                           "(an unset shell variable?)")


def absolute_sources(sources: list) -> list:
    """Local sources as absolute paths ("~" expanded), Gutenberg ids as they are. A run folder records where
    its text is from anywhere (resuming, evaluating and fine-tuning from another folder read the same
    files), and `prepare` and `train` name the same files alike, so they share the cache."""
    sources = [os.fspath(s) if isinstance(s, os.PathLike) else s for s in sources]
    return [os.path.abspath(os.path.expanduser(s)) if isinstance(s, str) and s.strip() and
            not s.startswith("gutenberg:") else s for s in sources]


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
        check_source_names(self.sources)
        self.sources = absolute_sources(self.sources)
        if not 0.0 < self.val_fraction < 1.0:
            raise LmforgeError(f"data.val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.errors not in ("strict", "replace", "ignore"):
            raise LmforgeError(f"data.errors must be strict, replace or ignore, got {self.errors!r}")
        try:
            "".encode(self.encoding)
        except LookupError:
            raise LmforgeError(f"data.encoding {self.encoding!r} is not a text encoding Python knows; "
                               "use e.g. utf-8 or latin-1") from None


@dataclass
class TokenizerConfig:
    kind: str = "bpe"
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {"vocab_size": 4096}


@dataclass
class ModelConfig:
    arch: str = "transformer"
    options: dict[str, Any] = field(default_factory=dict)  # family fields: d_model, n_layers, ...


# Peak learning rates by model family (AdamW). On the Austen split the Transformer's best is half the
# recurrent and convolutional families': 1.5e-3 against 3e-3 (docs/benchmarks.md, 1 December).
FAMILY_LR = {"transformer": 1.5e-3}
DEFAULT_LR = 3e-3
# AdamW weight decay by family: the Transformer reads its 320k Austen tokens about six times in 300 s,
# and decay 0.6 beat 0.1 by 0.005 bits per byte with two seeds at that rate (docs/benchmarks.md,
# 4 December); the other families were not measured and keep 0.1, and so does Muon, whose decay
# multiplies its own much larger rate (0.02: 0.6 would shrink the matrices by 1.2% a step).
FAMILY_WEIGHT_DECAY = {"transformer": 0.6}
DEFAULT_WEIGHT_DECAY = 0.1
# The input embedding (and the output head, tied to it or not) learns at this multiple of the peak rate.
# Each step updates only the rows of the tokens it read, so with one shared rate the embedding lags the
# matrices: for the Transformer, 3x gained 0.005 and 0.012 bits per byte after 880 steps (two seeds).
FAMILY_EMBEDDING_LR_SCALE = {"transformer": 3.0}
# Steps of linear warm-up to the peak rate. For the Transformer 100 beat 20 at every length measured on the
# Austen split: by 0.008 and 0.027 bits per byte after 176 and 330 steps (the default size and the
# `--budget 1m` size), by 0.0085 and 0.0025 after 880 steps (two seeds) and by 0.0055 and 0.009 in two 300-s
# runs; 150 and 200 scored the same as 100 at 880 steps (docs/benchmarks.md, 5 December). The other
# families were not measured and keep 20.
FAMILY_WARMUP_STEPS = {"transformer": 100}
DEFAULT_WARMUP_STEPS = 20
MAX_THREADS = 1024  # far more threads than cores only slow a run; OpenMP fails to start tens of thousands


def default_lr(arch: str) -> float:
    return FAMILY_LR.get(arch, DEFAULT_LR)


def default_weight_decay(arch: str, optimizer: str = "adamw") -> float:
    return FAMILY_WEIGHT_DECAY.get(arch, DEFAULT_WEIGHT_DECAY) if optimizer == "adamw" else DEFAULT_WEIGHT_DECAY


def default_embedding_lr_scale(arch: str) -> float:
    return FAMILY_EMBEDDING_LR_SCALE.get(arch, 1.0)


def default_warmup_steps(arch: str) -> int:
    return FAMILY_WARMUP_STEPS.get(arch, DEFAULT_WARMUP_STEPS)


@dataclass
class TrainConfig:
    seed: int = 1337
    batch_size: int = 16
    grad_accum: int = 1
    # epochs: each pass over the training split reads every window once, in a new order from a new offset
    # (1.497 against 1.515 bits per byte for random starts after 880 steps) | random: windows at random starts
    sampling: str = "epochs"
    optimizer: str = "adamw"  # adamw | muon (Muon for 2-D hidden weights, AdamW for the rest)
    lr: float | None = None  # peak learning rate; None: the model family's own (default_lr)
    muon_lr: float = 0.02
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # None: the family's own (default_warmup_steps)
    schedule: str = "wsd"  # wsd (warm-up, stable, decay) | cosine
    decay_fraction: float = 0.3  # wsd: the last fraction of steps decays linearly
    weight_decay: float | None = None  # AdamW decay of matrices; None: the family's own (default_weight_decay)
    # the embeddings' and output head's rate as a multiple of lr; None: the family's own (3 for the Transformer)
    embedding_lr_scale: float | None = None
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
    # evaluate and save an exponential moving average of the weights; 0: off. The decay after step n is
    # (1 + n) / (10 + n) until it reaches this cap (0.99 from step 890 on, 0.995 from step 1790 on)
    ema: float = 0.99
    checkpoint_interval: int = 500  # steps between resume points...
    checkpoint_time: float = 120.0  # ...or seconds of training, whichever comes first
    keep_checkpoints: int = 2  # resume points kept (the newest); an unreadable one falls back to the one before
    on_nonfinite: str = "skip"  # a step with a NaN/inf loss or gradient: skip it (5 in a row stop) | stop
    device: str = "auto"
    dtype: str = "auto"  # float32 | bfloat16 (autocast) | auto: the faster on this machine, as the probe measured
    attention: str = "auto"  # on a CPU under bf16 autocast: float32 | native | auto (the probe's choice)
    threads: int | None = None
    compile: bool | None = None  # torch.compile; none = where it pays (CUDA GPUs)
    parallel: str = "ddp"  # under torchrun: ddp (every process holds the model) | fsdp (shards it)
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
            (self.lr is None or self.lr > 0, "train.lr must be positive"),
            (self.muon_lr > 0, "train.muon_lr must be positive"),
            (self.optimizer in ("adamw", "muon"), f"train.optimizer must be adamw or muon, got {self.optimizer!r}"),
            (self.schedule in ("wsd", "cosine"), f"train.schedule must be wsd or cosine, got {self.schedule!r}"),
            (self.sampling in ("random", "epochs"), f"train.sampling must be random or epochs, got {self.sampling!r}"),
            (self.max_steps is None or self.max_steps >= 1, "train.max_steps must be at least 1"),
            (self.max_time is None or self.max_time > 0, "train.max_time must be positive"),
            (self.max_steps is not None or self.max_time is not None,
             "give a budget: --max-steps N or --max-time 5m (--max-time 0 is no time limit)"),
            (0 <= self.decay_fraction <= 1, "train.decay_fraction must be in [0, 1]"),
            (0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "train.warmup_steps must be 0 or more"),
            (0 <= self.ema < 1, "train.ema must be in [0, 1) (0 turns the weight average off; 0.99 is the default)"),
            (self.eval_interval >= 1, "train.eval_interval must be at least 1"),
            (self.eval_batches >= 1, "train.eval_batches must be at least 1"),
            (self.checkpoint_interval >= 1, "train.checkpoint_interval must be at least 1"),
            (self.checkpoint_time > 0, "train.checkpoint_time must be positive (seconds)"),
            (self.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1"),
            (self.parallel in ("ddp", "fsdp"), f"train.parallel must be ddp or fsdp, got {self.parallel!r}"),
            (self.attention in ("auto", "float32", "native"),
             f"train.attention must be auto, float32 or native, got {self.attention!r}"),
            (not (self.parallel == "fsdp" and self.optimizer == "muon"),
             "train.optimizer=muon orthogonalises whole matrices, which FSDP splits; use train.parallel=ddp or adamw"),
            (self.on_nonfinite in ("skip", "stop"), f"train.on_nonfinite must be skip or stop, got {self.on_nonfinite!r}"),
            (self.dtype != "float16", "train.dtype=float16 needs loss scaling, which lmforge does not do; use bfloat16 "
                                      "(recent GPUs, CPUs with AVX512-BF16 or AMX), float32, or auto"),
            (self.threads is None or 1 <= self.threads <= MAX_THREADS,
             f"train.threads must be 1 to {MAX_THREADS} (leave it out to let lmforge choose)"),
            (0 <= self.seed < 2 ** 63, f"train.seed must be 0 to 2^63 - 1, got {self.seed}"),
            (self.sample_tokens >= 0, "train.sample_tokens must be 0 or more"),
            (self.grad_clip >= 0 and (self.weight_decay is None or self.weight_decay >= 0),
             "train.grad_clip and train.weight_decay must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)"),
            (self.embedding_lr_scale is None or (isinstance(self.embedding_lr_scale, (int, float))
                                                 and self.embedding_lr_scale > 0),
             f"train.embedding_lr_scale must be a positive number, got {self.embedding_lr_scale!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(message)


@dataclass
class FinetuneConfig:
    """What makes a run a fine-tuning run: the base it starts from, the task, and which weights train."""
    base: str
    task: str = "lm"  # lm | completion | classify
    mode: str = "full"  # full | freeze | lora
    freeze_layers: int | None = None  # freeze: layers frozen after the embeddings (None = half)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # None = the model's lora_targets
    pooling: str = "mean"  # classify: mean | last
    template: str | None = None  # completion: the prompt template (None = the default)
    labels: list[str] | None = None  # classify: the class names, in the order of the head's outputs
    from_scratch: bool = False  # the control: the base's architecture and tokenizer from random weights

    def __post_init__(self):
        checks = [
            (self.task in TASKS, f"unknown fine-tuning task {self.task!r}; choose one of {', '.join(TASKS)}"),
            (self.mode in MODES, f"unknown fine-tuning mode {self.mode!r}; choose one of {', '.join(MODES)}"),
            (self.lora_rank >= 1 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
             f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1); got rank={self.lora_rank}, "
             f"alpha={self.lora_alpha}, dropout={self.lora_dropout}"),
            (self.pooling in ("mean", "last"), f"--pooling {self.pooling!r} is unknown; choose one of mean, last"),
            (self.template is None or "{prompt}" in self.template,
             f"the prompt template {self.template!r} has no {{prompt}} placeholder; add one"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(message)


TASKS = ("lm", "completion", "classify")
MODES = ("full", "freeze", "lora")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.finetune is None:
            del out["finetune"]
        return out

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> "RunConfig":
        if not isinstance(raw, dict):
            raise LmforgeError(f"{where} must be a table of sections")
        unknown = set(raw) - set(SECTION_TYPES)
        if unknown:
            hint = did_you_mean(sorted(unknown), SECTION_TYPES)
            raise LmforgeError(f"{where}: unknown section(s) {sorted(unknown)}{hint}; valid: {sorted(SECTION_TYPES)}")
        sections = {name: _build(kind, raw.get(name, {}), f"{where} [{name}]")
                    for name, kind in SECTION_TYPES.items() if name != "finetune"}
        if raw.get("finetune") is not None:
            sections["finetune"] = _build(FinetuneConfig, raw["finetune"], f"{where} [finetune]")
        return cls(**sections)


SECTION_TYPES = {"data": DataConfig, "tokenizer": TokenizerConfig, "model": ModelConfig, "train": TrainConfig,
                 "finetune": FinetuneConfig}


def _build(kind, values: dict, where: str):
    if not isinstance(values, dict):
        raise LmforgeError(f"{where} must be a table of key = value pairs")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    values = dict(values)
    # `[model]` and `[tokenizer]` take their family's own fields directly: `d_model = 256`.
    if kind in (ModelConfig, TokenizerConfig):
        head = "arch" if kind is ModelConfig else "kind"
        options = values.pop("options", {})
        if not isinstance(options, dict):
            raise LmforgeError(f"{where}: options must be a table")
        options = {**options, **{k: v for k, v in values.items() if k != head}}
        values = {head: values[head]} if head in values else {}
        values["options"] = options
    unknown = set(values) - set(fields)
    if unknown:
        raise LmforgeError(f"{where}: unknown option(s) {sorted(unknown)}{did_you_mean(sorted(unknown), fields)}; "
                           f"valid: {sorted(fields)}")
    section = where.rsplit("[", 1)[-1].rstrip("]")
    if isinstance(values.get("max_time"), str):  # a duration: "5m", "90s"; "none" or "0" for no limit
        text = values["max_time"].strip().lower()
        values["max_time"] = None if text in ("none", "0") else parse_duration(text)
    values = {name: check_type(f"{section}.{name}", value, fields[name].type) for name, value in values.items()}
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise LmforgeError(f"{where}: missing option(s) {missing}")
    return kind(**values)


_SIMPLE = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None), "Any": object}


def check_type(name: str, value, annotation: str):
    """`value` if it fits the field's annotation (ints pass as floats, and are converted); else an error
    naming the field, the value and what to write instead."""
    allowed = [part.strip() for part in re.split(r"\|(?![^\[]*\])", annotation)]
    if "None" in allowed and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None  # `train.lr=none` on the command line: the field's default choice
    for kind in allowed:
        base = kind.split("[", 1)[0]
        if base in ("list", "tuple") and isinstance(value, (list, tuple)):
            inner = kind[len(base) + 1:-1].split(",")[0].strip() if "[" in kind else "Any"
            return [check_type(name, v, inner) for v in value] if base == "list" else tuple(
                check_type(name, v, inner) for v in value)
        if base == "dict" and isinstance(value, dict):
            return value
        expected = _SIMPLE.get(base)
        if expected is None:
            continue
        if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise LmforgeError(f"{name} must be a finite number, got {value!r}")
            return float(value)
        if expected is int and isinstance(value, bool):
            continue
        if isinstance(value, expected):
            return value
    words = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "true or false",
             "None": "none", "list": "a list", "tuple": "a list", "dict": "a table"}
    wanted = " or ".join(dict.fromkeys(words.get(k.split("[", 1)[0], k) for k in allowed))
    raise LmforgeError(f"{name} must be {wanted}, got {value!r}")


# ---- files and overrides ------------------------------------------------------------------------

def load_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise LmforgeError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise LmforgeError(f"config file {path} is a folder; give a .toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"config file {path} is not valid TOML: {e}") from None


def parse_value(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, strings, lists); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str], sections=tuple(SECTION_TYPES), what: str = "override") -> dict:
    """`train.lr=1e-3`, `model.d_model=128` -> {"train": {"lr": 0.001}, "model": {"d_model": 128}}.
    The one parser of dotted settings: the CLI's positional overrides, `finetune --set` and
    `prepare -o` (sections=None: plain `key=value`) all come through here."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if sections is None:
            if not sep or len(parts) != 1 or not parts[0]:
                raise LmforgeError(f"{what} {item!r} is not key=value")
            out[parts[0]] = parse_value(value.strip())
            continue
        if sep and len(parts) == 2 and parts[1] and parts[0] in SECTION_TYPES and parts[0] not in sections:
            raise LmforgeError(f"{what} {item!r}: {parts[0]} settings cannot be set here, only "
                               f"{' and '.join(sections)} settings")
        if not sep and "data" in sections and _names_text(item):
            raise LmforgeError(f"{what} {item!r} is not section.key=value; to train on that text, pass --data {item}")
        if not sep or len(parts) != 2 or parts[0] not in sections or not parts[1]:
            hint = did_you_mean(parts[0], sections) if sep and len(parts) == 2 else ""
            raise LmforgeError(f"{what} {item!r} is not section.key=value{hint} (sections: {', '.join(sections)})")
        out.setdefault(parts[0], {})[parts[1]] = parse_value(value.strip())
    return out


def _names_text(item: str) -> bool:
    """Whether a word reads as a data source (a Gutenberg id, a file, a folder or a glob that matches)."""
    import glob

    return item.startswith("gutenberg:") or Path(item).exists() or bool(glob.glob(item))


def merge(base: dict, extra: dict) -> dict:
    """`extra` written over `base`, tables merged key by key (in place; returns base)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def as_raw(config) -> dict:
    """A config given as None, a RunConfig, a dict or a TOML path, as a plain dict (a copy)."""
    if config is None:
        return {}
    if isinstance(config, RunConfig):
        return config.to_dict()
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    if not isinstance(config, (str, Path)) or (isinstance(config, str) and "\n" in config):
        raise LmforgeError("a config is the path of a .toml file, a dict or a RunConfig (not TOML text: "
                           "tomllib.loads(text) makes it a dict)")
    raw = load_toml(config)
    return with_paths_from(raw, Path(config).expanduser().resolve().parent)


def with_paths_from(raw: dict, folder: Path) -> dict:
    """A config file's relative data paths (sources, globs included, and cache_dir) read from its own
    folder, so the file works from wherever lmforge is started."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return raw

    def placed(path):
        if not isinstance(path, str) or not path.strip() or path.startswith("gutenberg:"):
            return path  # (a wrong type is the config check's to name)
        path = os.path.expanduser(path)
        return path if os.path.isabs(path) else os.path.join(folder, path)

    if isinstance(data.get("sources"), list):
        data["sources"] = [placed(s) for s in data["sources"]]
    elif isinstance(data.get("sources"), str):
        data["sources"] = placed(data["sources"])
    if isinstance(data.get("cache_dir"), str):
        data["cache_dir"] = placed(data["cache_dir"])
    return raw


def build_config(config: str | Path | dict | RunConfig | None = None, preset: str | None = None,
                 overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from (in order of precedence) overrides, a TOML file or dict, a preset, defaults."""
    raw = {}
    if preset is not None:
        path = PRESETS_DIR / f"{preset}.toml"
        if not path.exists():
            raise LmforgeError(f"unknown preset {preset!r}; valid presets: {', '.join(presets())}")
        raw = load_toml(path)
    merge(raw, as_raw(config))
    merge(raw, parse_overrides(overrides or []))
    config = RunConfig.from_dict(raw)
    if config.train.max_steps is not None and "max_time" not in (raw.get("train") or {}):
        config.train.max_time = None  # a step budget, and no time budget set anywhere: the steps alone bind
    return config


def parse_duration(text: str | float | int | None) -> float | None:
    """'90', '90s', '5m', '1h30m' -> seconds."""
    if text is None or (isinstance(text, (int, float)) and not isinstance(text, bool)):
        return None if text is None else float(text)
    if not isinstance(text, str):
        raise LmforgeError(f"cannot read duration {text!r}; write it like 300, 90s, 5m or 1h30m")
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise LmforgeError(f"cannot read duration {text!r}; write it like 300, 90s, 5m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LmforgeError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LmforgeError(f"{what} {path} is not valid JSON (truncated or corrupt)") from None
    except OSError as e:
        raise LmforgeError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{what} {path} is not a JSON object (damaged)")
    return data

