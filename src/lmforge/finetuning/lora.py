"""LoRA: wrap chosen nn.Linear children of a model in place, train only the low-rank adapters, merge them back.

In: a model and the names of its LoRA targets (`model.lora_targets`). Out: the same model, whose wrapped
layers keep their `weight`/`bias` names (frozen) and gain `lora_a` (r, in) and `lora_b` (out, r).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LmforgeError


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) · dropout(x) A^T B^T, with A ~ Kaiming-uniform and B = 0 (so it starts as W)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: names and values unchanged
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scale, self.dropout = rank, alpha / rank, dropout
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        x = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return out + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scale  # (out, in)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + scale · B A (a new weight; the adapter is dropped)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _matches(name: str, targets) -> bool:
    return name.rsplit(".", 1)[-1] in targets or name in targets


def apply_lora(model: nn.Module, targets=None, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Freeze every parameter, then replace each nn.Linear whose (last) name is in `targets` by a LoRALinear.
    `targets` defaults to `model.lora_targets`. Returns the wrapped modules' full names."""
    allowed = tuple(model.lora_targets)
    targets = tuple(allowed if targets in (None, [], ()) else targets)
    bad = [t for t in targets if t.rsplit(".", 1)[-1] not in allowed]
    if bad:
        raise LmforgeError(f"LoRA target(s) {', '.join(bad)} are not LoRA targets of this {model.arch} model; "
                           f"choose from {', '.join(allowed)}")
    if not (isinstance(rank, int) and rank >= 1 and alpha > 0 and 0.0 <= dropout < 1.0):
        raise LmforgeError(f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1); got rank={rank}, "
                           f"alpha={alpha}, dropout={dropout}")
    found = [(module, child_name, child, f"{name}.{child_name}" if name else child_name)
             for name, module in list(model.named_modules()) for child_name, child in list(module.named_children())
             if isinstance(child, nn.Linear)]
    found = [item for item in found if _matches(item[3], targets)]
    if not found:
        raise LmforgeError(f"no nn.Linear named {', '.join(targets)} in this model; choose from {', '.join(allowed)}")
    narrowest = min(min(child.in_features, child.out_features) for _, _, child, _ in found)
    if rank > narrowest:  # past that, an adapter holds more numbers than the layer it adapts, and can learn no more
        raise LmforgeError(f"LoRA rank {rank} is more than the narrowest layer it adapts ({narrowest} wide); "
                           f"choose a rank of at most {narrowest} (8 or 16 is usual)")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for module, child_name, child, full in found:
        setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
        wrapped.append(full)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear with the adapter folded into its weight (in place)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a state dict (names ending in lora_a / lora_b)."""
    return {k: v for k, v in state.items() if k.endswith((".lora_a", ".lora_b"))}


def merge_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold `X.lora_a`/`X.lora_b` into `X.weight` in a state dict; the result loads into the plain model."""
    out = {k: v for k, v in state.items() if not k.endswith((".lora_a", ".lora_b"))}
    for key in state:
        if key.endswith(".lora_a"):
            prefix = key[:-len(".lora_a")]
            out[prefix + ".weight"] = state[prefix + ".weight"] + scale * (state[prefix + ".lora_b"] @ state[key])
    return out
