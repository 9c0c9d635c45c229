"""The one training loop: every family, pretraining and fine-tuning alike.

In: a RunConfig and a run folder. Out: a run folder with config.json, tokenizer.json,
model.safetensors (best by validation), resume state in last/, metrics.jsonl and loss.png.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import checkpoint as ckpt
from ..config import RunConfig
from ..data import get_batch, prepare
from ..device import autocast, resolve_device, resolve_dtype, seed_everything, set_threads
from ..errors import LmforgeError
from ..models import build_model, count_params
from .optim import build_optimizers, lr_factor, progress, set_lr
from .plots import plot_losses

LOG_INTERVAL = 10
EVALS_PER_TIME_BUDGET = 10  # under a time budget, evaluate every max_time / 10 seconds of training


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    train_time: float
    tokens_per_s: float
    best_val_bpb: float | None
    interrupted: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class Batches:
    """Where a step's micro-batches come from: a function of (step, micro) so resume is exact."""
    sample: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    tokens_per_step: int
    val: list[tuple[torch.Tensor, torch.Tensor]]
    val_tokens_per_byte: float


def prepared_batches(prepared, context_len: int, cfg, device) -> Batches:
    accum, batch = cfg.grad_accum, cfg.batch_size
    train_tokens = prepared.train
    if len(train_tokens) <= context_len:
        raise LmforgeError(f"the training split has {len(train_tokens)} tokens, fewer than context_len + 1 = "
                           f"{context_len + 1}; give more text or a smaller model.context_len")

    def sample(index: int):
        return get_batch(train_tokens, batch, context_len, seed=cfg.seed, step=index, device=device)

    val = np.asarray(prepared.val, dtype=np.int64)
    val_bytes = max(1, len(prepared.val_text.encode("utf-8")))
    return Batches(sample, batch * context_len * accum, fixed_windows(val, context_len, cfg.eval_batches, batch, device),
                   len(val) / val_bytes)


def fixed_windows(tokens: np.ndarray, context_len: int, n_batches: int, batch: int, device) -> list:
    """Evenly spaced validation windows, the same every evaluation (a cheap running estimate)."""
    if len(tokens) < 2:
        return []
    length = min(context_len, len(tokens) - 1)
    starts = np.linspace(0, len(tokens) - length - 1, num=min(n_batches * batch, len(tokens) - length)).astype(np.int64)
    rows = np.stack([tokens[s:s + length + 1] for s in np.unique(starts)])
    out = []
    for i in range(0, len(rows), batch):
        chunk = torch.from_numpy(rows[i:i + batch]).to(device)
        out.append((chunk[:, :-1], chunk[:, 1:]))
    return out


def lm_loss(model, x, y) -> torch.Tensor:
    """Mean next-token cross-entropy; targets equal to -100 (e.g. prompt tokens) are ignored."""
    logits, _ = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)


@torch.no_grad()
def estimate_val_loss(model, windows, device, dtype, loss_fn=None) -> float:
    """Mean loss per target token (lm_loss) or per example (a given `loss_fn(model, x, y)`)."""
    model.eval()
    total, count = 0.0, 0
    for x, y in windows:
        with autocast(device, dtype):
            if loss_fn is not None:
                total += loss_fn(model, x, y).float().item() * len(x)
                count += len(x)
                continue
            logits, _ = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((y != -100).sum())
    model.train()
    return total / max(count, 1)


def check_resume_config(stored: dict, config: RunConfig) -> None:
    """Data, tokenizer and model must match the checkpoint; the training budget may change."""
    current = config.to_dict()
    conflicts = []
    for section in ("data", "tokenizer"):
        for key, value in current[section].items():
            if stored[section].get(key) != value:
                conflicts.append(f"{section}.{key}={value!r} (checkpoint: {stored[section].get(key)!r})")
    if stored["model"]["arch"] != config.model.arch:
        conflicts.append(f"model.arch={config.model.arch!r} (checkpoint: {stored['model']['arch']!r})")
    for key, value in config.model.options.items():
        if stored["model"]["options"].get(key) != value:
            conflicts.append(f"model.{key}={value!r} (checkpoint: {stored['model']['options'].get(key)!r})")
    if conflicts:
        raise LmforgeError("--resume: options conflict with the checkpoint: " + "; ".join(conflicts)
                           + "; drop them, or start a new run with another --out")


def make_run_dir(out: Path, resume: bool) -> Path:
    out = Path(out)
    if resume:
        ckpt.read_config(out)  # fails clearly when it is not a run
        return out
    if (out / ckpt.CONFIG).exists():
        raise LmforgeError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    if out.exists() and any(out.iterdir()):
        raise LmforgeError(f"{out} exists and is not empty; choose another --out (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare_data(config: RunConfig):
    """The config's data, split and tokenized (from the cache when it was done before)."""
    d = config.data
    return prepare(d.sources, tokenizer=config.tokenizer.kind, tokenizer_options=config.tokenizer.options,
                   val_fraction=d.val_fraction, cache_dir=d.cache_dir, jsonl_field=d.jsonl_field,
                   encoding=d.encoding, errors=d.errors)


def train(config: RunConfig, out: str | Path, *, resume: bool = False, log: Callable[[str], None] = print,
          on_step: Callable[[int], None] | None = None, init_weights: dict | None = None,
          prepared=None, trainable: Callable[[torch.nn.Module], None] | None = None,
          loss_fn: Callable | None = None, make_batches: Callable | None = None) -> TrainResult:
    """Train `config` into the run folder `out` (or continue it with resume=True).

    `on_step(step)` runs after every optimizer step (a KeyboardInterrupt from it stops the run the
    way Ctrl-C does: state is saved and the run can be resumed). `init_weights` starts from given
    weights (fine-tuning); `trainable(model)` may freeze parameters or add adapters before the
    optimizer is built. `loss_fn(model, x, y) -> scalar` replaces next-token cross-entropy (classification);
    `make_batches(prepared, context_len, train_cfg, device) -> Batches` replaces random windows
    (prompt -> completion pairs, labelled examples).
    """
    cfg = config.train
    threads = set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    run_dir = make_run_dir(Path(out), resume)
    if resume:
        stored = ckpt.read_config(run_dir)
        check_resume_config(stored, config)

    if prepared is None:
        prepared = prepare_data(config)
    tokenizer = prepared.tokenizer
    options = {**config.model.options, "vocab_size": tokenizer.vocab_size}
    model = build_model(config.model.arch, **options)
    if init_weights is not None:
        model.load_state_dict(init_weights)
    if trainable is not None:
        trainable(model)
    model.to(device)
    context_len = model.config.context_len
    batches = (make_batches or prepared_batches)(prepared, context_len, cfg, device)
    optimizers = build_optimizers(model, cfg)

    if not resume:
        ckpt.save_config(run_dir, config, asdict(model.config))
        tokenizer.save(run_dir)
    n_params = count_params(model)
    log(f"model: {config.model.arch}, {n_params / 1e6:.2f}M parameters "
        f"({count_params(model, exclude_embeddings=True) / 1e6:.2f}M without embeddings), "
        f"{model.flops_per_token() / 1e6:.1f} MFLOPs per training token; tokenizer: {tokenizer.kind} "
        f"(vocab {tokenizer.vocab_size}); data: {len(prepared.train):,} train / {len(prepared.val):,} val tokens; "
        f"{device.type}, {threads} threads, {str(dtype).removeprefix('torch.')}"
        f"{' autocast' if dtype != torch.float32 else ''}")

    state = {"step": 0, "tokens": 0, "train_time": 0.0, "best_val_loss": None, "evals": 0}
    if resume:
        state.update(ckpt.load_resume(run_dir, model, optimizers))
        model.to(device)
        log(f"resuming {run_dir} at step {state['step']}")
    forward = torch.compile(model) if cfg.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    metrics_path = run_dir / "metrics.jsonl"
    metrics = open(metrics_path, "a")
    bar = _progress_bar(cfg, state)
    interrupted = False
    window_loss, window_steps = 0.0, 0

    def write(row: dict) -> None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    def save_resume() -> None:
        ckpt.save_resume(run_dir, model, optimizers, state)

    def evaluate() -> None:
        val_loss = estimate_val_loss(forward, batches.val, device, dtype, loss_fn)
        val_bpb = val_loss * batches.val_tokens_per_byte / math.log(2)
        row = {"step": state["step"], "val_loss": val_loss, "val_bpb": val_bpb, "train_time": state["train_time"]}
        if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
            state["best_val_loss"] = val_loss
            if cfg.keep_best:
                ckpt.save_tensors(run_dir / ckpt.WEIGHTS, ckpt.model_state(model))
        state["evals"] += 1
        state["last_eval_step"] = state["step"]
        write(row)
        bar.set_postfix_str(f"loss {last_loss:.3f} val_bpb {val_bpb:.3f} {tokens_per_s:,.0f} tok/s")

    def evaluation_due() -> bool:
        if cfg.max_time:  # a time budget: evenly spaced in training time
            return state["train_time"] >= (state["evals"] + 1) * cfg.max_time / EVALS_PER_TIME_BUDGET
        return state["step"] % cfg.eval_interval == 0

    model.train()
    last_loss, tokens_per_s = float("nan"), 0.0
    try:
        while (done := progress(state["step"], state["train_time"], cfg)) < 1.0:
            tic = time.perf_counter()
            step = state["step"]
            set_lr(optimizers, lr_factor(step, done, cfg))
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = batches.sample(step * cfg.grad_accum + micro)
                with autocast(device, dtype):
                    loss = (loss_fn or lm_loss)(forward, x, y)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += batches.tokens_per_step
            elapsed = time.perf_counter() - tic
            state["train_time"] += elapsed
            last_loss = loss_sum / cfg.grad_accum
            if not math.isfinite(last_loss):
                raise LmforgeError(f"the loss became {last_loss} at step {state['step']}; lower train.lr "
                                   f"(now {cfg.lr}) or raise train.warmup_steps")
            window_loss += last_loss
            window_steps += 1
            tokens_per_s = state["tokens"] / max(state["train_time"], 1e-9)
            bar.update(min(elapsed, max(0.0, bar.total - bar.n)) if cfg.max_time else 1)
            if state["step"] % LOG_INTERVAL == 0:
                write({"step": state["step"], "loss": window_loss / window_steps, "lr": lr_factor(step, done, cfg),
                       "tokens": state["tokens"], "train_time": state["train_time"], "tokens_per_s": tokens_per_s})
                window_loss, window_steps = 0.0, 0
                bar.set_postfix_str(f"loss {last_loss:.3f} {tokens_per_s:,.0f} tok/s")
            if evaluation_due():
                evaluate()
            if state["step"] % cfg.checkpoint_interval == 0:
                save_resume()
            if on_step is not None:
                on_step(state["step"])
    except KeyboardInterrupt:
        interrupted = True
        log(f"\ninterrupted at step {state['step']}; continue with: lmforge train --resume {run_dir}")
    finally:
        bar.close()
    if not interrupted and state.get("last_eval_step") != state["step"]:
        evaluate()  # the final weights always get a score (keep_best compares them too)
    save_resume()
    if not cfg.keep_best or not (run_dir / ckpt.WEIGHTS).exists():
        ckpt.save_tensors(run_dir / ckpt.WEIGHTS, ckpt.model_state(model))
    metrics.close()
    plot_losses(metrics_path, run_dir / "loss.png")
    best = state["best_val_loss"]
    return TrainResult(run_dir=run_dir, steps=state["step"], tokens=state["tokens"], train_time=state["train_time"],
                       tokens_per_s=state["tokens"] / max(state["train_time"], 1e-9),
                       best_val_bpb=None if best is None else best * batches.val_tokens_per_byte / math.log(2),
                       interrupted=interrupted, extra={"params": n_params, "device": device.type, "threads": threads})


def _progress_bar(cfg, state):
    """Counts seconds of training under a time budget, steps under a step budget."""
    from tqdm.auto import tqdm

    if cfg.max_time:
        return tqdm(total=round(cfg.max_time), initial=state["train_time"], disable=not cfg.progress, unit="s",
                    dynamic_ncols=True, file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/{total}s [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=cfg.max_steps, initial=state["step"], disable=not cfg.progress, unit="step",
                dynamic_ncols=True, file=sys.stderr)
