"""One optimizer step and the validation loss: what the training loop, `lmforge bench train` and the
`--budget` speed probe all run.

A loss returns the *sum* over its targets, and the step divides by the number of targets in the whole
step (every micro-batch, every process), so masked batches of different sizes weigh what their
targets weigh, and accumulating k micro-batches equals one batch k times larger.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.batches import IGNORE
from ..device import autocast
from . import distributed as dist


# Cross-entropy over rows of about this many logits at a time. The whole (B·T, V) block in fp32 is 32 MiB
# at the default shape (2,048 positions, 4,096 tokens): past what glibc serves from its heap, so its upcast,
# its log-softmax and their gradients each came as fresh pages, zeroed by the kernel. In 8 MiB pieces
# the heap reuses them: a bf16-autocast step at the default shape 168.5 -> 154.5 ms.
CE_CHUNK = 1 << 21


class LMLoss:
    """Next-token cross-entropy, summed over targets; targets equal to IGNORE (prompt tokens, padding)
    are skipped. Computed in fp32 over blocks of rows (CE_CHUNK logits each)."""

    def __call__(self, forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, _ = forward(x)  # (B, T, V)
        logits, y = logits.flatten(0, 1), y.flatten()
        rows = max(1, CE_CHUNK // logits.size(1))
        return sum(F.cross_entropy(part.float(), target, ignore_index=IGNORE, reduction="sum")
                   for part, target in zip(logits.split(rows), y.split(rows)))

    @staticmethod
    def count(y: torch.Tensor) -> int:
        return int((y != IGNORE).sum())


class ClassifyLoss:
    """Cross-entropy of class logits (B, C) against labels (B,), summed over examples."""

    def __call__(self, forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward(x).float(), y, reduction="sum")

    @staticmethod
    def count(y: torch.Tensor) -> int:
        return y.numel()


lm_loss = LMLoss()


@dataclass
class StepResult:
    loss: float  # mean per target over the whole step
    grad_norm: float  # before clipping
    skipped: bool  # the loss or a gradient was not finite: no update was made


@contextlib.contextmanager
def deterministic_compiled():
    """The setting a compiled CPU training step runs under: deterministic algorithms, so that Inductor
    adds the partial sums of its backward in a fixed order and a run repeats bitwise (without it two
    compiled runs of 60 steps ended with different weights; eager ones were the same). Ops that have
    no deterministic form warn rather than fail."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def train_step(model, forward, optimizers, micro_batches, loss, *, device, dtype, grad_clip: float) -> StepResult:
    """Forward and backward over every (x, y) micro-batch (CPU tensors, moved to `device` here), then
    clip and step. `forward` is `model` or its torch.compile / DistributedDataParallel wrapper.
    A step whose loss or gradient norm is not finite changes nothing and comes back skipped."""
    targets = dist.sum_int(sum(loss.count(y) for _, y in micro_batches))
    # DDP averages gradients over processes; scale so the result is the sum over all targets / targets
    scale = dist.world_size() / max(targets, 1)
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with (contextlib.nullcontext() if last else dist.no_sync(forward)):  # gradients sync once per step
            with autocast(device, dtype):
                summed = loss(forward, x, y)
            (summed * scale).backward()
        total += summed.detach().float()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
    mean = dist.sum_float(float(total)) / max(targets, 1)
    skipped = not (math.isfinite(mean) and math.isfinite(float(norm)))
    for opt in optimizers:
        if not skipped:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return StepResult(mean, float(norm), skipped)


@torch.no_grad()
def evaluate_loss(forward, batches, loss, device, dtype) -> float:
    """Mean loss per target over `batches` ([(x, y)], CPU); with several processes each scores its
    share and the sums are added (a sharded model's processes run their forwards in step: one with
    fewer batches repeats its last, uncounted)."""
    was_training = forward.training
    forward.eval()
    total, count = 0.0, 0
    mine = batches[dist.rank()::dist.world_size()]
    rounds = -(-len(batches) // dist.world_size()) if dist.sharded(forward) else len(mine)
    for i in range(rounds):
        x, y = mine[min(i, len(mine) - 1)] if mine else batches[0]
        with autocast(device, dtype):
            summed = float(loss(forward, x.to(device), y.to(device)))
        if i < len(mine):
            total += summed
            count += loss.count(y)
    forward.train(was_training)
    return dist.sum_float(total) / max(dist.sum_int(count), 1)
