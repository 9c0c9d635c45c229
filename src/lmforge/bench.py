"""Benchmarks that print JSON, so speed regressions show: `lmforge bench train` (training tokens/s per
family) and `lmforge bench generate` (new tokens/s per family at batch 1 and 8).

In: families at their default sizes (or model.X=V overrides), random token ids. Out: plain dicts.
Numbers compare runs on one machine; each result records its threads, device and shapes.
"""
from __future__ import annotations

import inspect
import statistics
import time

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .device import resolve_device, set_threads
from .errors import LmforgeError
from .models import MODELS, build_model, config_class, count_params

# The char tokenizer trained on the Austen split (Emma + Persuasion, first 90% of each) has 82 entries
# (80 characters + <|endoftext|> + <unk>). Token values don't change the speed, so the benchmarks draw
# random ids over that vocabulary instead of reading the corpus.
AUSTEN_CHAR_VOCAB = 82
PEAK_MATMUL_SIZE = 2048  # square fp32 matmul used to measure the machine's attainable FLOP/s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _family_fields(arch: str, model_fields: dict, vocab_size: int) -> dict:
    """The overrides that `arch` has a field for (model.d_hidden means nothing to a Transformer)."""
    names = config_class(arch).__dataclass_fields__
    return {"vocab_size": vocab_size, **{k: v for k, v in model_fields.items() if k in names}}


def _archs(archs: list[str] | None) -> list[str]:
    archs = list(MODELS) if not archs or archs == ["all"] else archs
    for arch in archs:
        config_class(arch)  # fails in one line for an unknown name
    return archs


def measure_peak_flops(device: torch.device, size: int = PEAK_MATMUL_SIZE, repeats: int = 10) -> float:
    """FLOP/s of the fastest of `repeats` (size × size) @ (size × size) fp32 matmuls, after one warm-up."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - tic)
    return 2 * size**3 / best


def bench_train(archs: list[str] | None = None, model_fields: dict | None = None, batch_size: int = 16,
                steps: int = 10, warmup: int = 3, vocab_size: int = AUSTEN_CHAR_VOCAB, device: str = "cpu",
                threads: int | None = None, peak_size: int = PEAK_MATMUL_SIZE) -> dict:
    """Training tokens/s per family: forward + backward + clipping + AdamW step, as the training loop does
    it, at each family's default context_len; the median of `steps` timed steps after `warmup` untimed.
    MFU = tokens/s × the model's FLOPs per token / the measured fp32 matmul peak."""
    dev = resolve_device(device)
    threads = set_threads(threads)
    peak = measure_peak_flops(dev, peak_size)
    cfg = TrainConfig(max_steps=1)  # the training defaults: AdamW, clip 1.0
    from .training.optim import build_optimizers

    results = {}
    for arch in _archs(archs):
        torch.manual_seed(0)
        model = build_model(arch, **_family_fields(arch, model_fields or {}, vocab_size)).to(dev).train()
        optimizers = build_optimizers(model, cfg)
        T = model.config.context_len
        gen = torch.Generator().manual_seed(0)
        times = []
        for i in range(warmup + steps):
            batch = torch.randint(vocab_size, (batch_size, T + 1), generator=gen).to(dev)
            _sync(dev)
            tic = time.perf_counter()
            logits, _ = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            _sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - tic)
        step_s = statistics.median(times)
        tokens_per_s = batch_size * T / step_s
        flops = model.flops_per_token()
        results[arch] = {"tokens_per_s": tokens_per_s, "step_s": step_s, "batch_size": batch_size,
                         "context_len": T, "params": count_params(model), "flops_per_token": flops,
                         "achieved_flops": tokens_per_s * flops, "mfu": tokens_per_s * flops / peak}
    return {"benchmark": "train", "device": dev.type, "threads": threads, "vocab_size": vocab_size,
            "vocab": "random ids over the Austen char vocabulary size", "steps": steps, "warmup": warmup,
            "peak_flops": peak, "peak_matmul_size": peak_size, "families": results}


@torch.inference_mode()
def bench_generate(archs: list[str] | None = None, model_fields: dict | None = None, batch_sizes: tuple = (1, 8),
                   new_tokens: int = 500, warmup: int = 16, vocab_size: int = AUSTEN_CHAR_VOCAB,
                   device: str = "cpu", threads: int | None = None) -> dict:
    """New tokens/s per family and batch size: `new_tokens` sampled after a 1-token prompt through the
    same decoding loop as `lmforge generate` (a bounded context refills its cache when full)."""
    from .generation import SamplingConfig, generate_ids

    dev = resolve_device(device)
    threads = set_threads(threads)
    results = {}
    for arch in _archs(archs):
        torch.manual_seed(0)
        model = build_model(arch, **_family_fields(arch, model_fields or {}, vocab_size)).to(dev).eval()
        rows = {}
        for batch_size in batch_sizes:
            prompt = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
            for _ in generate_ids(model, prompt, SamplingConfig(max_new_tokens=warmup, temperature=1.0, seed=0)):
                pass
            _sync(dev)
            tic = time.perf_counter()
            for _ in generate_ids(model, prompt, SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, seed=0)):
                pass
            _sync(dev)
            elapsed = time.perf_counter() - tic
            rows[str(batch_size)] = {"new_tokens_per_s": batch_size * new_tokens / elapsed, "seconds": elapsed}
        results[arch] = {"params": count_params(model), "batch": rows}
    return {"benchmark": "generate", "device": dev.type, "threads": threads, "vocab_size": vocab_size,
            "new_tokens": new_tokens, "prompt_tokens": 1, "families": results}


BENCHMARKS = {"train": bench_train, "generate": bench_generate}


def run(name: str, **options) -> dict:
    """Run benchmark `name` with the options it takes; an option it doesn't take is a user error."""
    if name not in BENCHMARKS:
        raise LmforgeError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    fn = BENCHMARKS[name]
    accepted = inspect.signature(fn).parameters
    extra = sorted(set(options) - set(accepted))
    if extra:
        raise LmforgeError(f"bench {name} takes no {', '.join('--' + e.replace('_', '-') for e in extra)}; "
                           f"drop it")
    return fn(**options)
