"""Freeze part of a model before fine-tuning: the embeddings and the first N blocks / recurrent layers.

In: a model of any family. Out: the same model with `requires_grad=False` on the chosen parameters.
"""
from __future__ import annotations

import re

import torch.nn as nn

from ..errors import LmforgeError

EMBEDDINGS = ("tok_emb.", "pos_emb.", "embed.")


def layer_index(name: str) -> int | None:
    """The block / layer a parameter belongs to: blocks.{i}.* (Transformer, CNN) or rnn.*_l{i} (RNN)."""
    match = re.match(r"blocks\.(\d+)\.", name) or re.match(r"rnn\.\w+_l(\d+)(_reverse)?$", name)
    return int(match.group(1)) if match else None


def freeze(model: nn.Module, n_layers: int = 0, embeddings: bool = True) -> list[str]:
    """Freeze the embeddings (and so a head tied to them) and layers 0..n_layers-1; returns frozen names."""
    total = getattr(model.config, "n_layers", 0)
    if not isinstance(n_layers, int) or not 0 <= n_layers <= total:
        raise LmforgeError(f"--freeze-layers must be between 0 and the model's {total} layers, got {n_layers!r}")
    frozen = []
    for name, param in model.named_parameters():
        index = layer_index(name)
        if (embeddings and name.startswith(EMBEDDINGS)) or (index is not None and index < n_layers):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
