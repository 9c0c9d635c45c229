"""Faster token-by-token decoding on a CPU: half-precision copies of the weights for single-token steps.

A decoding step multiplies each weight matrix by one new position per sequence, so it reads every
weight to use it once (or a few times). On a CPU that read, not the arithmetic, bounds the step:
with the standard 4-layer, d_model 256 Transformer its 17 matrices cost about 2 of the 3 ms of a
batch-1 step in fp32. `half_weights_for_decoding(model)` gives every nn.Linear an fp16 copy of its
weight that such steps use (fp32 accumulation, fp16 in and out: about 4e-4 relative error per
product), which about halves the step. Everything else — training, prompts, evaluation, any input
with more than one position or more than MAX_ROWS rows — still uses the fp32 weights, unchanged.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_ROWS = 8  # up to this many single-position rows count as a decoding step
FP16_MAX = 60000.0  # fp16 overflows at 65504: weights beyond this keep fp32, inputs are clamped to it
_exact = 0  # > 0 inside fp32_weights(): every product uses the fp32 weights


@contextlib.contextmanager
def fp32_weights():
    """Scoring (bits per byte) runs inside this, so even a one-token chunk is scored with fp32 weights."""
    global _exact
    _exact += 1
    try:
        yield
    finally:
        _exact -= 1


def _stamp(t: torch.Tensor) -> tuple:
    # In-place updates bump _version; tensors made under inference_mode have none (and stay fixed
    # outside it), so their storage address alone identifies them.
    return (t.data_ptr(), None if t.is_inference() else t._version)


class DecodeLinear(nn.Linear):
    """An nn.Linear (same parameters, same state_dict) that multiplies decoding steps by an fp16 copy of
    its weight. The copy is refreshed whenever the weight changes (training steps, load_state_dict)."""

    @classmethod
    def of(cls, linear: nn.Linear) -> DecodeLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        new._copy, new._stamp = None, None
        return new

    def _half(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        w, b = self.weight, self.bias
        stamp = (_stamp(w), None if b is None else _stamp(b))
        if stamp != self._stamp:
            fits = w.abs().max() < FP16_MAX and (b is None or b.abs().max() < FP16_MAX)
            self._copy = (w.detach().half(), None if b is None else b.detach().half()) if fits else None
            self._stamp = stamp
        return self._copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_position = x.dim() >= 2 and x.size(-2) == 1 and x.numel() <= MAX_ROWS * x.size(-1)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        decoding = not self.training and not _exact and one_position and x.dtype == torch.float32 and not needs_grad
        copy = self._half() if decoding else None
        if copy is None:
            return F.linear(x, self.weight, self.bias)
        # One clamp instead of a range check: activations beyond ±60000 would overflow fp16 to inf.
        return F.linear(x.clamp(-FP16_MAX, FP16_MAX).half(), *copy).float()


def half_weights_for_decoding(model: nn.Module) -> nn.Module:
    """Replace every plain nn.Linear in `model` by a DecodeLinear sharing its parameters; returns `model`.
    Only worth it on a CPU: GPUs decode small models far below their memory bandwidth anyway."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, DecodeLinear.of(child))
    return model
