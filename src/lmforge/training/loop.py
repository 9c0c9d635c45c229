"""The one training loop: every family, pretraining and every kind of fine-tuning alike.

In: a RunConfig, a run folder and a Job — the model to train (built, with its starting weights and
any frozen layers or adapters), its batches, its loss, and which files its weights go to. Out: the
run folder: config.json, tokenizer.json, manifest.json, model.safetensors (best by validation),
resume points in checkpoints/, metrics.jsonl and loss.png. Under torchrun each process trains its
share of every batch.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from ..config import RunConfig, check_type
from ..data.batches import Batches
from ..device import (ThreadTuner, all_but_global_state, measure_peak_flops, resolve_device,
                      resolve_dtype, set_threads)
from ..errors import LmforgeError
from ..models import count_params
from ..tokenizers import vocab_text
from . import distributed as dist
from .average import WeightAverage
from .optim import build_optimizers, lr_factor, progress, set_lr
from .plots import plot_losses
from .step import deterministic_compiled, evaluate_loss, lm_loss, train_step

LOG_INTERVAL = 10
EVALS_PER_TIME_BUDGET = 10  # under a time budget, evaluate every max_time / 10 seconds of training
MAX_SKIPPED = 5  # consecutive steps with a non-finite loss or gradient before the run stops


def plain_weights(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {ckpt.WEIGHTS: state}


@dataclass
class Job:
    """What a run trains. Pretraining, full, frozen and LoRA fine-tuning, classification and prompt ->
    completion differ only here: the model (which parameters train, which head), the batches and the
    loss. `weights(state)` maps the trained module's whole state dict to the files saved as the run's
    weights (a LoRA run merges its adapters into model.safetensors and keeps them alone in
    adapter.safetensors)."""
    model: nn.Module
    tokenizer: object
    batches: Batches
    loss: object = lm_loss
    weights: Callable[[nn.Module], dict[str, dict[str, torch.Tensor]]] = plain_weights
    data_key: str | None = None  # a digest of the text trained on: a resumed run checks it is unchanged


@dataclass
class TrainerState:
    """Where a run is: saved with every resume point as trainer_state.json."""
    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    best_val_loss: float | None = None
    evals: int = 0
    last_eval_step: int | None = None
    checkpoint_time: float = 0.0  # training time at the last resume point
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    losses: list = field(default_factory=list)  # training losses since the last metrics row

    @classmethod
    def from_dict(cls, data: dict) -> "TrainerState":
        """The state saved in trainer_state.json, every field type-checked (a damaged file is one line)."""
        known = {f.name: f for f in fields(cls)}
        try:
            return cls(**{k: check_type(f"trainer state {k}", v, known[k].type) for k, v in data.items() if k in known})
        except LmforgeError as e:
            raise LmforgeError(f"{e}: trainer_state.json is damaged") from None


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


def train(config: RunConfig, out: str | Path, job: Job, *, resume: bool = False, log: Callable[[str], None] = print,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train `job` into the run folder `out` (or continue it with resume=True).

    Ctrl-C or SIGTERM finishes the current step, saves a resume point and returns with
    `interrupted` set; `on_step(step)` runs after every optimizer step, and a KeyboardInterrupt from
    it stops the run the same way."""
    cfg = config.train
    device = resolve_device(cfg.device)
    if dist.launched():
        device = dist.start(device)
    dtype = resolve_dtype(cfg.dtype, device)
    # on a CPU each process of a torchrun job takes its share of the cores
    threads = set_threads(dist.cpu_threads(cfg.threads)) if device.type == "cpu" else None
    run_dir = ckpt.open_run_dir(Path(out), resume) if dist.is_main() else Path(out)
    dist.barrier()
    model = job.model.to(device)
    if hasattr(getattr(model, "lm", model), "set_attention_upcast"):  # a CPU speed choice (lmforge.probe)
        getattr(model, "lm", model).set_attention_upcast(cfg.attention != "native")
    fsdp = cfg.parallel == "fsdp" and dist.world_size() > 1
    if fsdp:
        dist.shard(model)  # before the optimizer: it must hold the sharded parameters
    optimizers = build_optimizers(model, cfg)
    average = WeightAverage(model, cfg.ema) if cfg.ema else None
    state = TrainerState()
    if resume and job.data_key is not None:
        started_on = ckpt.read_config(run_dir).get("data_key")
        if started_on is not None and started_on != job.data_key:
            raise LmforgeError(f"the text of {', '.join(config.data.sources)} has changed since {run_dir} started; "
                               f"restore it to resume this run, or train a new run on the new text with --out")
    saved = ckpt.load_resume(run_dir, log=log) if resume else None
    if saved is not None:
        state = restore(model, optimizers, average, saved, run_dir)
        log(f"resuming {run_dir} at step {state.step}")
    elif resume:
        log(f"note: {run_dir} stopped before its first resume point; training it from the start")
    elif dist.is_main():  # the tokenizer first: config.json marks a folder as a run
        job.tokenizer.save(run_dir)
        ckpt.save_config(run_dir, config, asdict(model.config),
                         extra=None if job.data_key is None else {"data_key": job.data_key})
        ckpt.write_manifest(run_dir, [ckpt.CONFIG, "tokenizer.json"])
    if saved is not None and cfg.max_steps and state.step > cfg.max_steps:
        raise LmforgeError(f"{run_dir} has trained {state.step} steps already, more than --max-steps "
                           f"{cfg.max_steps}; give a larger budget to go on (it is unchanged)")
    new_time = saved is not None and cfg.max_time != ckpt.read_config(run_dir)["train"].get("max_time")
    if new_time and cfg.max_time and state.train_time > cfg.max_time:  # (a finished run ends a little past its own)
        raise LmforgeError(f"{run_dir} has trained for {state.train_time:.0f} s already, more than --max-time "
                           f"{cfg.max_time:g} s; give a larger budget to go on (it is unchanged)")
    if resume and dist.is_main():  # a longer budget, say: the next plain --resume continues to it
        ckpt.update_config(run_dir, config, asdict(model.config))
    # its checks fall on the same steps in a resumed run as in an uninterrupted one
    tuner = ThreadTuner(threads or 1, start=state.step, enabled=device.type == "cpu" and cfg.threads is None)
    forward = dist.wrap(model, device) if dist.world_size() > 1 and not fsdp else model
    compiled = cfg.compile if cfg.compile is not None else device.type == "cuda"  # unset: where compiling pays
    if compiled:  # on a CPU the thread tuner changes the thread count, which need not compile anew
        forward = torch.compile(forward, options={"guard_filter_fn": all_but_global_state}) \
            if device.type == "cpu" else torch.compile(forward)
    # a compiled CPU step adds its partial sums in a fixed order only under deterministic algorithms
    settings = deterministic_compiled() if compiled and device.type == "cpu" else contextlib.nullcontext()
    log(describe(config, job, model, device, dtype, threads, compiled))
    # a GPU's progress line shows MFU against the matmul peak this GPU reaches in the training dtype
    peak = measure_peak_flops(device, 4096, dtype=dtype) * dist.world_size() if device.type == "cuda" else None

    metrics = ckpt.MetricsLog(run_dir / "metrics.jsonl", after_step=state.step, write=dist.is_main())
    bar = progress_bar(cfg, state)
    stop, interrupted, last_loss, tokens_per_s = StopSignals(), False, math.nan, 0.0
    model.train()
    try:
        with stop, settings:
            while (done := progress(state.step, state.train_time, cfg)) < 1.0:
                tic = time.perf_counter()
                torch.manual_seed(step_seed(cfg.seed, state.step, dist.rank()))  # dropout: a function of the step
                set_lr(optimizers, lr_factor(state.step, done, cfg))
                micro = [job.batches.sample(state.step * cfg.grad_accum + m, dist.rank(), dist.world_size())
                         for m in range(cfg.grad_accum)]
                if device.type == "cuda":  # page-locked, so the copies to the GPU overlap the work
                    micro = [(x.pin_memory(), y.pin_memory()) for x, y in micro]
                result = train_step(model, forward, optimizers, micro, job.loss, device=device, dtype=dtype,
                                    grad_clip=cfg.grad_clip)
                state.step += 1
                state.tokens += job.batches.tokens_per_batch * cfg.grad_accum
                elapsed = time.perf_counter() - tic
                tuner.record(elapsed)
                # Every process must count the same training time: it decides the evaluations, the resume
                # points and the end, each a step that all processes take together (or wait for forever).
                state.train_time += dist.max_float(elapsed)
                tokens_per_s = state.tokens / max(state.train_time, 1e-9)
                bar.update(min(elapsed, max(0.0, bar.total - bar.n)) if cfg.max_time else 1)
                if result.skipped:
                    skipped_step(state, result, cfg, log, run_dir)
                else:
                    state.skipped, last_loss = 0, result.loss
                    state.losses.append(result.loss)
                    if average is not None:
                        average.update(state.step)
                if state.step % LOG_INTERVAL == 0 and state.losses:
                    metrics.write({"step": state.step, "loss": sum(state.losses) / len(state.losses),
                                   # the rate train.lr names, as scheduled (AdamW's last group: norms and biases)
                                   "lr": optimizers[-1].param_groups[-1]["lr"],
                                   "lr_factor": lr_factor(state.step - 1, done, cfg), "tokens": state.tokens,
                                   "train_time": state.train_time, "tokens_per_s": tokens_per_s})
                    state.losses = []
                    bar.set_postfix_str(f"loss {last_loss:.3f} {speed(tokens_per_s, model, peak)}", refresh=False)
                if evaluation_due(state, cfg):
                    val_bpb = evaluate(model, job, state, cfg, device, dtype, run_dir, metrics, average)
                    bar.set_postfix_str(f"loss {last_loss:.3f} val_bpb {val_bpb:.3f} {speed(tokens_per_s, model, peak)}")
                if (state.step % cfg.checkpoint_interval == 0
                        or state.train_time - state.checkpoint_time >= cfg.checkpoint_time):
                    save_resume_point(run_dir, model, optimizers, state, cfg, average)
                if on_step is not None:
                    on_step(state.step)
                if dist.any_true(stop.requested):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        log(f"\ninterrupted at step {state.step}; continue with: {ckpt.resume_command(run_dir)}")
    finally:
        bar.close()
        tuner.settle()
    with stop:  # a signal now lets the last evaluation and the saving finish; then the run stops as interrupted
        if not interrupted and state.last_eval_step != state.step:
            evaluate(model, job, state, cfg, device, dtype, run_dir, metrics, average)  # the final weights' score
        save_resume_point(run_dir, model, optimizers, state, cfg, average)
        if not cfg.keep_best or not (run_dir / ckpt.WEIGHTS).exists():
            with average.swapped_in() if average is not None else contextlib.nullcontext():
                save_weights(run_dir, job.weights(dist.full_state(model)))
        metrics.close()
        if dist.is_main():
            plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    if dist.any_true(stop.requested) and not interrupted:
        interrupted = True
        log(f"interrupted at the end of training (step {state.step}, saved); finish with: "
            f"{ckpt.resume_command(run_dir)}")
    best = state.best_val_loss
    return TrainResult(run_dir=run_dir, steps=state.step, tokens=state.tokens, train_time=state.train_time,
                       tokens_per_s=state.tokens / max(state.train_time, 1e-9),
                       best_val_bpb=None if best is None else best * job.batches.val_tokens_per_byte / math.log(2),
                       interrupted=interrupted,
                       extra={"params": count_params(model), "device": str(device), "threads": threads,
                              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                              "dtype": str(dtype).removeprefix("torch."), "processes": dist.world_size()})


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step (dropout masks): a function of the run's seed, the step and the process."""
    return int(np.random.SeedSequence([seed, step, rank, 7]).generate_state(1, dtype=np.uint64)[0] >> 1)


def speed(tokens_per_s: float, model, peak: float | None) -> str:
    mfu = f" MFU {tokens_per_s * model.flops_per_token() / peak:.0%}" if peak else ""
    return f"{tokens_per_s:,.0f} tok/s{mfu}"


def describe(config: RunConfig, job: Job, model: nn.Module, device, dtype, threads, compiled: bool = False) -> str:
    tokenizer = job.tokenizer
    where = f"{device.type}" + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")
    if dist.world_size() > 1:
        where += f", {dist.world_size()} processes"

    def millions(n: float) -> str:  # a tiny model's count as it is, not "0.00M"
        return f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,.0f}"

    flops = model.flops_per_token()
    flops = f"{flops / 1e6:.1f} MFLOPs" if flops >= 100_000 else f"{flops:,.0f} FLOPs"

    return (f"model: {config.model.arch}, {millions(count_params(model))} parameters "
            f"({millions(count_params(model, exclude_embeddings=True))} without embeddings), "
            f"{flops} per training token; tokenizer: {tokenizer.kind} "
            f"({vocab_text(tokenizer)}); data: {job.batches.description}; {where}, "
            f"{str(dtype).removeprefix('torch.')}{' autocast' if dtype != torch.float32 else ''}"
            f"{', compiled step' if compiled else ''}")


def evaluation_due(state: TrainerState, cfg) -> bool:
    if cfg.max_time:  # a time budget: evenly spaced in training time
        return state.train_time >= (state.evals + 1) * cfg.max_time / EVALS_PER_TIME_BUDGET
    return state.step % cfg.eval_interval == 0


def evaluate(model, job: Job, state: TrainerState, cfg, device, dtype, run_dir: Path, metrics,
             average: WeightAverage | None = None) -> float:
    """Score the validation batches (with the averaged weights, when the run keeps an average); keep
    those weights when they are the best so far. Returns bits per byte."""
    with average.swapped_in() if average is not None else contextlib.nullcontext():
        val_loss = evaluate_loss(model, job.batches.val, job.loss, device, dtype)
        val_bpb = val_loss * job.batches.val_tokens_per_byte / math.log(2)
        if math.isfinite(val_loss) and (state.best_val_loss is None or val_loss < state.best_val_loss):
            state.best_val_loss = val_loss
            if cfg.keep_best:
                save_weights(run_dir, job.weights(dist.full_state(model)))
    state.evals += 1
    state.last_eval_step = state.step
    metrics.write({"step": state.step, "val_loss": val_loss, "val_bpb": val_bpb, "train_time": state.train_time})
    return val_bpb


def skipped_step(state: TrainerState, result, cfg, log, run_dir) -> None:
    """A step whose loss or gradient was not finite changed nothing; with on_nonfinite=stop, or several
    in a row, the run stops (the weights and resume points on disk are from before the trouble)."""
    state.skipped += 1
    what = "loss" if not math.isfinite(result.loss) else "gradient norm"
    log(f"\nstep {state.step}: the {what} is not finite; the step was skipped (weights unchanged)")
    if cfg.on_nonfinite == "stop" or state.skipped >= MAX_SKIPPED:
        raise LmforgeError(f"{state.skipped} step(s) in a row had a non-finite {what} (at step {state.step}); "
                           f"lower train.lr (now {cfg.lr}) or raise train.warmup_steps, then resume "
                           f"({ckpt.resume_command(run_dir)})")


def save_weights(run_dir: Path, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """The run's weights (model.safetensors and, for fine-tunes, the adapter or head), never NaN ones."""
    if all(ckpt.all_finite(tensors) for tensors in files.values()):
        dist.on_main(lambda: [ckpt.save_tensors(run_dir / name, tensors) for name, tensors in files.items()])


def save_resume_point(run_dir: Path, model, optimizers, state: TrainerState, cfg,
                      average: WeightAverage | None = None) -> None:
    state.checkpoint_time = state.train_time
    weights, optimizer_states = dist.full_state(model), dist.full_optimizer_states(model, optimizers)
    averaged = average.state() if average is not None else None
    dist.on_main(ckpt.save_resume, run_dir, weights, optimizer_states, asdict(state), cfg.keep_checkpoints, averaged)


def restore(model, optimizers, average: WeightAverage | None, point: ckpt.ResumePoint, run_dir: Path):
    """Put a resume point back into the model, optimizers and weight average; its trainer state."""
    weights, optimizer_states = point.weights, point.optimizers
    if len(optimizer_states) != len(optimizers):
        raise LmforgeError(f"{run_dir} was trained with {len(optimizer_states)} optimizer(s), this config builds "
                           f"{len(optimizers)}; resume with the run's own train.optimizer")
    try:
        dist.load_full_states(model, optimizers, weights, optimizer_states)
    except (RuntimeError, KeyError, ValueError) as e:
        # (a resume keeps the run's own config, and the manifest catches an edited one: what is left is a
        # resume point this version of lmforge did not write, or cannot read back)
        raise LmforgeError(f"the resume point of {run_dir} does not fit the model its config.json describes "
                           f"({str(e).splitlines()[0][:200]}); it cannot be continued: start a new run with "
                           f"another --out") from None
    if average is not None:
        try:
            average.load(point.average if point.average is not None else dist.full_state(model))
        except (RuntimeError, KeyError, ValueError) as e:  # an older point without one starts from the weights
            raise LmforgeError(f"the weight average in the resume point of {run_dir} does not fit this run's "
                               f"model ({str(e).splitlines()[0][:200]}); resume with the run's own config") from None
    return TrainerState.from_dict(point.state)


class StopSignals:
    """Inside it, the first Ctrl-C (SIGINT) or SIGTERM only sets `requested`: the loop finishes the step
    it is in, saves and stops. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class ProgressLines:
    """The progress bar's stand-in when stderr is a file or a pipe: one line at each evaluation (the bar
    would fill a log with carriage returns). Takes the calls the loop makes on a tqdm bar."""

    def __init__(self, total: float, initial: float, unit: str):
        self.total, self.n, self.unit = total, initial, unit

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        if refresh:  # the loop asks for a refresh after an evaluation only
            done = f"{self.n:.0f}/{self.total:.0f}{'s' if self.unit == 's' else ' steps'}"
            print(f"{done}: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_bar(cfg, state: TrainerState):
    """Counts seconds of training under a time budget, steps under a step budget: a bar on a terminal,
    a line per evaluation in a log."""
    from tqdm import autonotebook, std
    from tqdm.auto import tqdm  # a notebook's widget in Jupyter

    disable = not cfg.progress or not dist.is_main()
    if not disable and autonotebook.tqdm is std.tqdm and not sys.stderr.isatty():
        return (ProgressLines(round(cfg.max_time), min(state.train_time, round(cfg.max_time)), "s") if cfg.max_time
                else ProgressLines(cfg.max_steps, state.step, "step"))
    if cfg.max_time:
        # a run resumed at its budget may be a fraction of a second past it: the bar starts full, not over
        return tqdm(total=round(cfg.max_time), initial=min(state.train_time, round(cfg.max_time)), disable=disable,
                    unit="s",
                    dynamic_ncols=True, file=sys.stderr,
                    bar_format="{l_bar}{bar}| {n:.0f}/{total}s [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=cfg.max_steps, initial=state.step, disable=disable, unit="step", dynamic_ncols=True,
                file=sys.stderr)
