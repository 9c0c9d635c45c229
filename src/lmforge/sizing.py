"""Pick the Transformer's size for a training-time budget on this machine: `lmforge train --budget 5m`.

The best size for a fixed time grows with the compute the time buys. A short probe measures this
machine's training speed at the default size; the compute of the whole budget then sets the size:

    C = FLOPs per token × tokens/s × seconds,    best parameters N = N0 · sqrt(C / C0)

N ∝ C^0.5 is the compute-optimal scaling measured by Hoffmann et al. (2022). The anchor (N0, C0) is
our own measurement: on the reference 2-core CPU the default size (d_model 256, 4 layers, 5.25M
parameters with BPE-4096) was the best of the sizes tried after 300 s at 3,873 tokens/s, and
d_model 192 was best after 100 s, which the rule also picks. Sizes come from one ladder with
64-wide heads and as many layers as heads; the rung whose parameter count is nearest to N (on a
log scale) wins. Larger budgets and faster machines get larger models.
"""
from __future__ import annotations

import math
import statistics

import torch

from .errors import LmforgeError
from .models import build_model, count_params

LADDER = (128, 192, 256, 384, 512, 768, 1024)  # d_model; n_heads = n_layers = d_model / 64 (2 at least)
DEFAULT_D_MODEL = 256
SIZE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
# The anchor, measured on the reference machine (2-core EPYC, fp32): the default model trained at
# 3,873 tokens/s for 300 s with batch 16 x 128 tokens and BPE-4096.
ANCHOR_PARAMS = 5_250_000
ANCHOR_FLOPS_PER_TOKEN = 26_738_688
ANCHOR_COMPUTE = ANCHOR_FLOPS_PER_TOKEN * 3873 * 300


def rung(d_model: int) -> dict:
    heads = max(2, d_model // 64)
    return {"d_model": d_model, "n_layers": heads, "n_heads": heads}


def best_params(compute: float) -> float:
    return ANCHOR_PARAMS * math.sqrt(compute / ANCHOR_COMPUTE)


def choose(options: dict, compute: float) -> tuple[dict, dict]:
    """The ladder rung for `compute` FLOPs, and a table of every rung's parameter count."""
    target = best_params(compute)
    with torch.device("meta"):  # shapes only: the largest rung would otherwise allocate 0.8 GB to be counted
        counts = {d: count_params(build_model("transformer", **{**options, **rung(d)})) for d in LADDER}
    d_model = min(LADDER, key=lambda d: abs(math.log(counts[d] / target)))
    return rung(d_model), {"target_params": target, "params": counts}


def size_for_budget(options: dict, batch_size: int, seconds: float, device: torch.device, log=print,
                    probe_steps: int = 3, dtype: torch.dtype = torch.float32) -> dict:
    """Model options (the config's, plus the chosen size) for training `seconds` on `device` in autocast `dtype`."""
    from .bench import train_step_times
    from .config import TrainConfig

    taken = sorted(set(options) & set(SIZE_FIELDS))
    if taken:
        raise LmforgeError(f"--budget picks the model size, but model.{', model.'.join(taken)} is set; "
                           f"drop it, or use --max-time to keep your size")
    torch.manual_seed(0)
    probe = build_model("transformer", **{**options, **rung(DEFAULT_D_MODEL)}).to(device).train()
    times = train_step_times(probe, batch_size, probe_steps, 1, device, TrainConfig(max_steps=1), dtype=dtype)
    tokens_per_s = batch_size * probe.config.context_len / statistics.median(times)
    compute = probe.flops_per_token() * tokens_per_s * seconds
    size, table = choose(options, compute)
    del probe
    log(f"budget {seconds:.0f} s: this machine trains the d_model {DEFAULT_D_MODEL} model at {tokens_per_s:,.0f} "
        f"tokens/s, so the budget buys {compute:.2e} FLOPs; best size about {table['target_params'] / 1e6:.1f}M "
        f"parameters -> d_model {size['d_model']}, {size['n_layers']} layers, {size['n_heads']} heads "
        f"({table['params'][size['d_model']] / 1e6:.2f}M)")
    return {**options, **size}
