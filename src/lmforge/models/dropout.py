"""Dropout whose random mask costs a quarter of the random draws on the CPU.

PyTorch's CPU dropout draws one random number per element (a Bernoulli sample each). Here one 64-bit
draw gives four 16-bit lanes, and an element is kept when its lane is at or above p·65536, so the
drop rate is p rounded to a multiple of 1/65536 (0.05 becomes 0.050003). Kept elements are scaled by
1 / (1 - that rate), as in `F.dropout`, and the mask is one byte per element, saved for the backward.
Elsewhere (CUDA, where dropout is already fused) it is `F.dropout`. The draws come from torch's
generator, so a seeded run repeats its masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LEVELS = 1 << 16


class _Masked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with the CPU mask drawn 16 bits per element."""
    if not training or not p:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    dropped = min(round(p * LEVELS), LEVELS - 1)
    if not dropped:
        return x
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # the full 64-bit range
    keep = bits.view(torch.int16)[:n].view(x.shape) >= dropped - LEVELS // 2
    return _Masked.apply(x, keep, LEVELS / (LEVELS - dropped))
