"""Optimizers and the learning-rate schedule.

AdamW everywhere, or Muon for the 2-D hidden weight matrices with AdamW for embeddings, the output
head, norms and biases (Muon orthogonalises whole-matrix updates, which only makes sense there).
"""
from __future__ import annotations

import math

import torch

from ..config import TrainConfig, default_embedding_lr_scale, default_lr, default_weight_decay


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Each param group remembers its `base_lr`; `set_lr` scales it by the schedule. Which tensors are
    embeddings, the output head or hidden matrices comes from `model.parameter_groups()`; the first two
    learn at `train.embedding_lr_scale` times the peak rate."""
    groups = model.parameter_groups()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    outer = {id(p) for p in groups["embeddings"] + groups["head"]}
    named = [p for p in model.parameters() if id(p) in trainable]
    matrices = [p for p in named if p.dim() == 2 and id(p) not in outer]  # hidden weight matrices
    # embeddings and the head (at their own rate), and convolution kernels (3-D): AdamW with weight decay
    outer_2d = [p for p in named if p.dim() >= 2 and id(p) in outer]
    kernels = [p for p in named if p.dim() > 2 and id(p) not in outer]
    vectors = [p for p in named if p.dim() < 2]  # norms and biases: never decayed
    # fused: one kernel for the whole update instead of a dozen per parameter (CPU and CUDA)
    adam_kwargs = dict(betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)
    arch = getattr(model, "arch", "")
    lr = cfg.lr if cfg.lr is not None else default_lr(arch)
    decay = cfg.weight_decay if cfg.weight_decay is not None else default_weight_decay(arch, cfg.optimizer)
    scale = cfg.embedding_lr_scale if cfg.embedding_lr_scale is not None else default_embedding_lr_scale(arch)
    if cfg.optimizer == "muon" and matrices:
        muon = torch.optim.Muon([{"params": matrices, "base_lr": cfg.muon_lr}], lr=cfg.muon_lr,
                                weight_decay=decay, adjust_lr_fn="match_rms_adamw")
        adam = torch.optim.AdamW(
            [g for g in ({"params": outer_2d, "weight_decay": decay, "base_lr": lr * scale},
                         {"params": kernels, "weight_decay": decay, "base_lr": lr},
                         {"params": vectors, "weight_decay": 0.0, "base_lr": lr}) if g["params"]],
            lr=lr, **adam_kwargs)
        return [muon, adam]
    groups = [{"params": matrices + kernels, "weight_decay": decay, "base_lr": lr},
              {"params": outer_2d, "weight_decay": decay, "base_lr": lr * scale},
              {"params": vectors, "weight_decay": 0.0, "base_lr": lr}]
    return [torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **adam_kwargs)]


def progress(step: int, train_time: float, cfg: TrainConfig) -> float:
    """How far through its budget a run is, in [0, 1]: steps done / max_steps or training time /
    max_time, whichever is further. A step budget alone makes the schedule (and so the run)
    a pure function of the step; a time budget follows the clock, so a machine that speeds up or
    slows down mid-run still decays the learning rate exactly as the time runs out."""
    done = [0.0]
    if cfg.max_steps:
        done.append(step / cfg.max_steps)
    if cfg.max_time:
        done.append(train_time / cfg.max_time)
    return min(1.0, max(done))


def lr_factor(step: int, done: float, cfg: TrainConfig) -> float:
    """Multiplier on the base learning rate at `step` (0-based), `done` of the way through the budget.
    A budget shorter than the warm-up still decays at its end: the ramp, capped by the schedule."""
    if step < cfg.warmup_steps:
        return min((step + 1) / cfg.warmup_steps, _schedule(done, cfg))
    return _schedule(done, cfg)


def _schedule(done: float, cfg: TrainConfig) -> float:
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))
    # warm-up, stable, decay: flat at the peak, then linear to the floor over the last fraction.
    stable = 1.0 - cfg.decay_fraction
    if done < stable or cfg.decay_fraction == 0:
        return 1.0
    return 1.0 - (1 - floor) * (done - stable) / cfg.decay_fraction


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
