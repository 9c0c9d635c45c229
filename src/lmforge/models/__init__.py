"""The model families behind one registry: `build_model(arch, **fields)` -> an nn.Module.

Every family follows the contract in docs/design.md ("Models"): `logits, state = model(tokens, state)`,
`model.hidden`, `model.head`, `model.init_state`, `model.select_state`, `model.cat_states`,
`model.config`, `model.arch`, `model.max_context`, `model.hidden_size`, `model.parameter_groups()`,
`model.flops_per_token()`, `model.lora_targets`. Adding a family is one file plus one line in MODELS.
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from lmforge.config import check_type
from lmforge.errors import LmforgeError, did_you_mean

from .cnn import CNNConfig, CNNModel
from .rnn import RNNConfig, RNNModel
from .transformer import KVCache, Transformer, TransformerConfig

MODELS = {"transformer": Transformer, "lstm": RNNModel, "gru": RNNModel, "cnn": CNNModel}
CONFIGS = {Transformer: TransformerConfig, RNNModel: RNNConfig, CNNModel: CNNConfig}
# Fields an arch name fixes: "lstm" and "gru" are one class that differs only in its cell.
PRESETS = {"lstm": {"cell": "lstm"}, "gru": {"cell": "gru"}}


def config_class(arch: str) -> type:
    """The config dataclass of `arch`; raises LmforgeError for an unknown arch."""
    if arch not in MODELS:
        raise LmforgeError(f"unknown model arch {arch!r}; choose one of {', '.join(MODELS)}")
    return CONFIGS[MODELS[arch]]


def fields_of_none(archs: list[str], names) -> list[str]:
    """The model fields in `names` that none of the families `archs` has (a typo, most likely)."""
    return [k for k in names if not any(k in config_class(a).__dataclass_fields__ for a in archs)]


def resolve_config(arch: str, **fields):
    """The family's config dataclass for `fields`, validated and with its defaults resolved (no weights)."""
    cls = config_class(arch)
    valid = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise LmforgeError(f"unknown {arch} model field(s) {', '.join(unknown)}{did_you_mean(unknown, valid)}; "
                           f"valid fields: {', '.join(valid)}")
    fields = {name: check_type(f"model.{name}", value, valid[name].type) for name, value in fields.items()}
    if "vocab_size" not in fields:
        raise LmforgeError(f"the {arch} model needs vocab_size (normally taken from the tokenizer)")
    for name, value in PRESETS.get(arch, {}).items():
        if fields.setdefault(name, value) != value:
            raise LmforgeError(f"model.{name}={fields[name]!r} contradicts arch {arch!r}; "
                               f"drop {name} or use arch {fields[name]!r}")
    return cls(**fields)


def build_model(arch: str, **fields) -> nn.Module:
    """A freshly initialised model (weights drawn from the caller's torch RNG).
    `build_model(model.arch, **dataclasses.asdict(model.config))` rebuilds the same architecture."""
    config = resolve_config(arch, **fields)
    return MODELS[arch](config)


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of parameters, each shared tensor counted once. With exclude_embeddings, the weights of
    nn.Embedding modules (token and learned position tables) are left out; a head tied to the token
    embedding shares that tensor, so it is left out too."""
    skip = set()
    if exclude_embeddings:
        skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


__all__ = ["MODELS", "build_model", "config_class", "count_params", "fields_of_none", "resolve_config", "KVCache",
           "Transformer", "TransformerConfig", "RNNModel", "RNNConfig", "CNNModel", "CNNConfig"]
