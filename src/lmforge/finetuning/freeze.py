"""Freeze part of a model before fine-tuning: the embeddings and the first N blocks / recurrent layers.

In: a model of any family. Out: the same model with `requires_grad=False` on the chosen parameters,
which its `parameter_groups()` names.
"""
from __future__ import annotations

import torch.nn as nn

from ..config import is_number
from ..errors import LmforgeError


def freeze(model: nn.Module, n_layers: int = 0, embeddings: bool = True) -> int:
    """Freeze the embeddings (and so a head tied to them) and layers 0..n_layers-1; returns how many
    parameters were frozen."""
    groups = model.parameter_groups()
    total = len(groups["layers"])
    if not is_number(n_layers, integer=True) or not 0 <= n_layers <= total:
        raise LmforgeError(f"--freeze-layers must be between 0 and the model's {total} layers, got {n_layers!r}")
    frozen = (groups["embeddings"] if embeddings else []) + [p for layer in groups["layers"][:n_layers] for p in layer]
    for param in frozen:
        param.requires_grad_(False)
    return sum(p.numel() for p in frozen)
