"""Pick the Transformer's size for a training-time budget on this machine: `lmforge train --budget 5m`.

The best size for a fixed time grows with the compute the time buys. A short probe measures this
machine's training speed at the default size; the compute of the whole budget then sets the size:

    C = FLOPs per token × tokens/s × seconds,    best parameters N = N0 · sqrt(C / C0)

N ∝ C^0.5 is the compute-optimal scaling measured by Hoffmann et al. (2022). The anchor (N0, C0) is
counted in FLOPs, not seconds, so it holds on any machine: on the Austen split the default size
(d_model 256, 4 layers) was the best of the sizes measured near C0. Below C0 the best size shrank
about linearly with the compute (d_model 128 was best at a fifth of it), so the rule is
N = N0 · C / C0 there. The size is also capped by the training tokens there are (best_params).
Sizes come from one ladder with 64-wide heads and as many layers as heads; the rung whose parameter
count is nearest to N (on a log scale) wins. Larger budgets and faster machines get larger models.

Dropout and weight decay follow the passes a run will make over its training text, for `--budget`
and for any new Transformer run that leaves them alone (regularise_for_passes).
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from ..config import RunConfig, TrainConfig
from ..data import prepare_data
from ..device import resolve_device, resolve_dtype, set_threads
from ..errors import LmforgeError
from ..models import build_model, count_params, resolve_config
from . import distributed as dist
from .optim import build_optimizers
from .step import lm_loss, train_step

LADDER = (128, 192, 256, 384, 512, 768, 1024)  # d_model; n_heads = n_layers = d_model / 64 (2 at least)
DEFAULT_D_MODEL = 256
SIZE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
# The anchor C0: the compute at which the default rung (d_model 256, 4 layers) is the best size, in
# the FLOPs the budget's probe counts. Sizes scale from the default rung's parameter count under the
# run's own options. Set first (old defaults) where d_model 256 was the best of the sizes tried after
# 300 s at 3,873 tokens/s. With the defaults of 6 December on the Austen split (an Intel Xeon whose
# probe timed 8,400-11,000 tokens/s, so about 1.6e13 FLOPs a minute; docs/benchmarks.md), bits per
# byte after 30 s: d_model 128 1.642, 192 1.706; after 60 s: 128 1.556, 192 1.576, 256 1.61; after
# 300 s: 128 1.497, 192 1.466, 256 1.462. The best size grew about as fast as the compute there (the
# square root would need 25 times the compute from 128 to 256, not 5), so below C0 the rule is linear:
# it switches from 128 to 192 at 0.33 C0 and from 192 to 256 at 0.71 C0, here 2.6e13 and 5.5e13.
ANCHOR_COMPUTE = 7.8e13
ANCHOR_TOKENS = 320_399  # the Austen split's training tokens with BPE-4096, which that run read about six times
# Dropout for runs that read the training text many times. On the Austen split, default size:
# 0.1 instead of the default 0.05 lost 0.0035 bits per byte at 880 steps (about 5.6 passes) and
# gained 0.009 at 10 minutes (11 passes) and at 20 minutes (22 passes); the line sits between.
# (Measured at learning rate 3e-3; at 1.5e-3, the default since 1 December, the 10-minute run with it
# scored 1.518; with weight decay 0.6, the default since 4 December, 1.497 against 1.503 with dropout 0.05.
# With every default of 6 December, at a fixed 1,900 steps (12 passes): 1.4572 against 1.4605.)
MANY_PASSES, MANY_PASSES_DROPOUT = 8.0, 0.1
# And AdamW's weight decay. With every default of 6 December, seed 1337: at 880 steps (5.6 passes)
# 0.6 / 1.0 / 1.5 gave 1.4773 / 1.4776 / 1.4881; with dropout 0.1 at 1,400 steps (9 passes) 0.6 / 1.5
# gave 1.4633 / 1.4587, and at 1,900 steps (12 passes) 0.6 / 1.0 / 1.5 / 2.0 gave 1.4572 / 1.4511 /
# 1.4460 / 1.4494 (seed 7: 1.4595 with 0.6, 1.4454 with 1.5).
MANY_PASSES_WEIGHT_DECAY = 1.5


def rung(d_model: int) -> dict:
    heads = max(2, d_model // 64)
    return {"d_model": d_model, "n_layers": heads, "n_heads": heads}


def best_params(anchor: float, compute: float, tokens: int | None = None) -> float:
    """N0 · sqrt(C / C0) for the anchor's N0 parameters, N0 · C / C0 below the anchor (short budgets
    favour small models more steeply than the square root: measured, see ANCHOR_COMPUTE), and no more
    than the data supports: past the anchor's six passes over its text, more passes over the same
    tokens buy overfitting, not a model that can use more parameters, so the size is capped at
    N0 · D / D0 for D training tokens."""
    ratio = compute / ANCHOR_COMPUTE
    target = anchor * (math.sqrt(ratio) if ratio >= 1 else ratio)
    return target if tokens is None else min(target, anchor * tokens / ANCHOR_TOKENS)


def choose(options: dict, compute: float, tokens: int | None = None) -> tuple[dict, dict]:
    """The ladder rung for `compute` FLOPs on `tokens` training tokens, and every rung's parameter count."""
    with torch.device("meta"):  # shapes only: the largest rung would otherwise allocate 0.8 GB to be counted
        counts = {d: count_params(build_model("transformer", **{**options, **rung(d)})) for d in LADDER}
    target = best_params(counts[DEFAULT_D_MODEL], compute, tokens)
    d_model = min(LADDER, key=lambda d: abs(math.log(counts[d] / target)))
    return rung(d_model), {"target_params": target, "params": counts}


def probe_tokens_per_s(options: dict, cfg: TrainConfig, steps: int = 3, size: dict | None = None, warmup: int = 1,
                       pick=statistics.median, speedup: float | None = None) -> tuple[float, int]:
    """Training tokens/s of the d_model 256 rung (or of `options` as they are, with size={}) on this
    machine, timed through train_step with the run's own settings (device, threads, dtype, optimizer,
    accumulation, torch.compile): `pick` (the median) of `steps` timed steps after `warmup`, summed over
    the processes under torchrun (each trains its share). Given `speedup` (what compiling measured on
    this machine), eager steps times that, rather than compiling the probe (10-30 s). Also returns the
    probe's FLOPs per token."""
    device = resolve_device(cfg.device)
    if device.type == "cpu":  # as the run will: under torchrun each process with its share of the cores
        set_threads(dist.cpu_threads(cfg.threads))
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(0)
    size = rung(DEFAULT_D_MODEL) if size is None else size
    probe = build_model("transformer", **{**options, **size}).to(device).train()
    optimizers = build_optimizers(probe, cfg)
    forward = torch.compile(probe) if cfg.compile and speedup is None else probe
    T, V = probe.config.context_len, probe.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        micro = []
        for _ in range(cfg.grad_accum):
            batch = torch.randint(V, (cfg.batch_size, T + 1), generator=gen)
            micro.append((batch[:, :-1], batch[:, 1:]))
        tic = time.perf_counter()
        train_step(probe, forward, optimizers, micro, lm_loss, device=device, dtype=dtype, grad_clip=cfg.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    tokens_per_s = cfg.batch_size * cfg.grad_accum * T / pick(times) * (speedup or 1.0)
    return dist.sum_float(tokens_per_s), probe.flops_per_token()


def check_budget(config: RunConfig, seconds: float) -> None:
    """A one-line error for a --budget that cannot size this config (before anything is written)."""
    if config.model.arch != "transformer":
        raise LmforgeError(f"--budget sizes the Transformer; for model.arch={config.model.arch!r} use --max-time")
    if not seconds > 0:
        raise LmforgeError(f"--budget must be a positive duration, e.g. 90s or 5m, got {seconds!r}")
    taken = sorted(set(config.model.options) & set(SIZE_FIELDS))
    if taken:
        raise LmforgeError(f"--budget picks the model size, but model.{', model.'.join(taken)} is set; "
                           f"drop it, or use --max-time to keep your size")


def _prepared(config: RunConfig, prepared=None):
    """The run's prepared data (`prepared`, if the caller has it; under torchrun process 0 prepares it
    first and the others read its cache) and its model options with the tokenizer's vocabulary size."""
    if prepared is None:
        prepared = dist.main_first(lambda: prepare_data(config))
    return prepared, {**config.model.options, "vocab_size": prepared.tokenizer.vocab_size}


def size_for_budget(config: RunConfig, seconds: float, log=print, decay_given: bool = True,
                    speedup: float | None = None, prepared=None) -> RunConfig:
    """`config` with train.max_time = seconds and the Transformer's size chosen for that much training
    on this machine (and its regularisation for the passes that makes, as regularise_for_passes)."""
    check_budget(config, seconds)
    prepared, options = _prepared(config, prepared)
    tokens_per_s, flops = probe_tokens_per_s(options, config.train, speedup=speedup)
    compute = flops * tokens_per_s * seconds
    size, table = choose(options, compute, len(prepared.train))
    target, chosen = table["target_params"], table["params"][size["d_model"]]
    smallest = ", under the smallest size" if target < min(table["params"].values()) else ""
    log(f"budget {seconds:.0f} s: this machine trains the d_model {DEFAULT_D_MODEL} model at {tokens_per_s:,.0f} "
        f"tokens/s, so the budget buys {compute:.2e} FLOPs on {len(prepared.train):,} training tokens; best size "
        f"about {target / 1e6:.2f}M parameters{smallest} -> d_model {size['d_model']}, {size['n_layers']} layers, "
        f"{size['n_heads']} heads ({chosen / 1e6:.2f}M)")
    raw = config.to_dict()
    raw["model"]["options"] = {**config.model.options, **size}
    raw["train"]["max_time"] = seconds
    # A model's step costs about its parameter count: the chosen size reads this many passes in the budget
    passes = tokens_per_s * seconds * table["params"][DEFAULT_D_MODEL] / chosen \
        / max(1, len(prepared.train))
    _regularise(passes, config, raw, decay_given, log)
    return RunConfig.from_dict(raw)


def _left_to_the_rule(config: RunConfig, decay_given: bool) -> tuple[bool, bool]:
    """Whether the passes rule may set the dropout, and the weight decay (AdamW's only)."""
    return "dropout" not in config.model.options, not decay_given and config.train.optimizer == "adamw"


def _regularise(passes: float, config: RunConfig, raw: dict, decay_given: bool, log) -> None:
    if passes <= MANY_PASSES:
        return
    set_dropout, set_decay = _left_to_the_rule(config, decay_given)
    chosen = []
    if set_dropout:
        raw["model"]["options"]["dropout"] = MANY_PASSES_DROPOUT
        chosen.append(f"dropout {MANY_PASSES_DROPOUT}")
    if set_decay:
        raw["train"]["weight_decay"] = MANY_PASSES_WEIGHT_DECAY
        chosen.append(f"weight decay {MANY_PASSES_WEIGHT_DECAY}")
    if chosen:
        log(f"about {passes:.0f} passes over the training text: {', '.join(chosen)} "
            f"(set model.dropout or train.weight_decay to choose)")


def regularise_for_passes(config: RunConfig, log=print, decay_given: bool = True,
                          speedup: float | None = None, prepared=None) -> RunConfig:
    """`config` with the dropout and (AdamW's) weight decay for the passes a new Transformer run will
    make over its training text, where the user left them alone (`decay_given` False: the weight
    decay in `config` is the family default): MANY_PASSES_DROPOUT and MANY_PASSES_WEIGHT_DECAY past
    MANY_PASSES, else the defaults. A step limit gives the passes exactly; a time limit, from this
    machine's speed at the run's own size and settings (probe_tokens_per_s), timed only when the
    step limit (if any) would not already keep the run under the line."""
    if config.model.arch != "transformer" or not any(_left_to_the_rule(config, decay_given)) \
            or config.finetune is not None:
        return config
    cfg = config.train
    prepared, options = _prepared(config, prepared)
    n_train = max(1, len(prepared.train))
    step_tokens = cfg.batch_size * cfg.grad_accum * resolve_config("transformer", **options).context_len
    passes = math.inf if cfg.max_steps is None else cfg.max_steps * step_tokens / n_train  # batches are global
    if passes > MANY_PASSES and cfg.max_time is not None:
        # The fastest of four steps after two: a new process's first steps run slow for a while (fresh
        # pages, cold caches), and a median of them read a 250-s run's 10.4 passes as under 8 once.
        tokens_per_s, _ = probe_tokens_per_s(options, cfg, steps=4, size={}, warmup=2, pick=min, speedup=speedup)
        passes = min(passes, tokens_per_s * cfg.max_time / n_train)
    raw = config.to_dict()
    _regularise(passes, config, raw, decay_given, log)
    return RunConfig.from_dict(raw)
