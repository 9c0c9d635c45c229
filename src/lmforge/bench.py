"""Benchmarks that print JSON, so speed regressions show: `lmforge bench train` (training tokens/s and
MFU per family), `generate` (new tokens/s at batch 1 and 8), `austen` (validation bits per byte after a
fixed training time) and `prepare` (tokenizer speed).

In: families at their default sizes (or model.X=V overrides), random token ids. Out: plain dicts.
Numbers compare runs on one machine; each result records its threads, device and shapes.
"""
from __future__ import annotations

import inspect
import statistics
import time

import torch

from .config import TrainConfig
from .device import cpp_compiler, measure_peak_flops, resolve_device, resolve_dtype, set_threads, synchronize as _sync
from .errors import LmforgeError
from .generation import Decoder, Engine, SamplingConfig
from .models import MODELS, build_model, config_class, count_params, fields_of_none
from .training.optim import build_optimizers
from .training.step import lm_loss, train_step

PEAK_MATMUL_SIZE = 2048  # the square matmul that measures a CPU's attainable FLOP/s
# The standard training shape (the reference systems were measured at it): 4 layers, 4 heads, d_model 256,
# a 256-token context, batch 16, no dropout, over the Austen character vocabulary.
TRAIN_SHAPE = {"d_model": 256, "n_layers": 4, "n_heads": 4, "context_len": 256, "dropout": 0.0}


def austen_char_vocab() -> int:
    """The vocabulary of the char tokenizer trained on the Austen split (its 80 characters,
    <|endoftext|> and <unk>). Token values don't change the speed, so the speed benchmarks draw random
    ids over a vocabulary this size instead of reading the corpus."""
    from .config import AUSTEN
    from .data import prepare

    return prepare(AUSTEN, tokenizer="char").tokenizer.vocab_size


def _family_fields(arch: str, model_fields: dict, vocab_size: int) -> dict:
    """The overrides that `arch` has a field for (model.d_hidden means nothing to a Transformer)."""
    names = config_class(arch).__dataclass_fields__
    return {"vocab_size": vocab_size, **{k: v for k, v in model_fields.items() if k in names}}


def _archs(archs: list[str] | None, model_fields: dict | None = None) -> list[str]:
    archs = list(MODELS) if not archs or archs == ["all"] else archs
    for arch in archs:
        config_class(arch)  # fails in one line for an unknown name
    unused = fields_of_none(archs, model_fields or {})
    if unused:  # a typo would otherwise benchmark the default sizes, for minutes
        raise LmforgeError(f"model.{unused[0]} is a field of none of the families benchmarked ({', '.join(archs)}); "
                           f"check its spelling")
    return archs


def train_step_times(model, batch_size: int, steps: int, warmup: int, dev: torch.device, cfg: TrainConfig,
                     before_step=None, dtype: torch.dtype = torch.float32,
                     warmup_times: list | None = None) -> list[float]:
    """Seconds per training step (training.step.train_step, as the training loop runs it: forward,
    backward, clipping, optimizer step, in autocast `dtype`, through torch.compile when cfg.compile) on
    random ids at the model's context_len: `warmup` untimed steps, then `steps` timed. `before_step()`
    runs, untimed, before each timed step."""
    optimizers = build_optimizers(model, cfg)
    forward = torch.compile(model) if cfg.compile else model
    T, vocab_size = model.config.context_len, model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        batch = torch.randint(vocab_size, (batch_size, T + 1), generator=gen)
        if i >= warmup and before_step is not None:
            before_step()
        _sync(dev)
        tic = time.perf_counter()
        train_step(model, forward, optimizers, [(batch[:, :-1], batch[:, 1:])], lm_loss, device=dev, dtype=dtype,
                   grad_clip=cfg.grad_clip)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
        elif warmup_times is not None:
            warmup_times.append(time.perf_counter() - tic)
    return times


def bench_train(archs: list[str] | None = None, model_fields: dict | None = None, batch_size: int = 16,
                steps: int = 10, warmup: int = 3, vocab_size: int | None = None, device: str = "cpu",
                threads: int | None = None, peak_size: int = PEAK_MATMUL_SIZE, dtype: str = "auto",
                compile: bool = False) -> dict:
    """Training tokens/s per family: forward + backward + clipping + AdamW step, as the training loop does
    it, at each family's default context_len; the median of `steps` timed steps after `warmup` untimed.
    MFU = tokens/s × the model's FLOPs per token / the matmul peak in the training dtype (`auto`: what
    `lmforge train` uses, the dtype the probe measured faster on this machine), measured (best of 3 square matmuls)
    just before every timed step: a shared machine's speed drifts within seconds, so each step is
    divided by the peak measured beside it and `mfu` is the median of those ratios (`mfu_of_medians`
    divides the median speed by the median peak instead). `compile`: steps run through torch.compile, as
    with `train.compile=true`; the compilation happens in the warm-up and is reported as `warmup_s`."""
    dev = resolve_device(device)
    threads = set_threads(threads)
    if dtype == "float16":  # as `lmforge train` refuses it: its steps would be measured, never run
        raise LmforgeError("--dtype float16 is not a training dtype lmforge runs (no loss scaling); use bfloat16, "
                           "float32 or auto")
    if dtype == "auto":  # as `lmforge train` decides it: by the probe's measurement, not by CPU flags
        from .probe import choices

        dtype = choices(dev)["dtype"]
    if compile and dev.type == "cpu" and cpp_compiler() is None:  # as `lmforge train` refuses train.compile=true
        raise LmforgeError("--compile needs a C++ compiler (torch.compile builds the CPU step with one) and none "
                           "was found; install g++ or clang++, or drop --compile")
    compute_dtype = resolve_dtype(dtype, dev)
    vocab_size = vocab_size or austen_char_vocab()
    peaks = []
    cfg = TrainConfig(max_steps=1, compile=compile)  # the training defaults: AdamW, clip 1.0
    results = {}
    for arch in _archs(archs, model_fields):
        torch.manual_seed(0)
        fields = {**TRAIN_SHAPE, **(model_fields or {})} if arch == "transformer" else (model_fields or {})
        model = build_model(arch, **_family_fields(arch, fields, vocab_size)).to(dev).train()
        T = model.config.context_len
        warmup_times = []
        times = train_step_times(model, batch_size, steps, warmup, dev, cfg, dtype=compute_dtype, before_step=lambda:
                                 peaks.append(measure_peak_flops(dev, peak_size, repeats=3, dtype=compute_dtype)),
                                 warmup_times=warmup_times)
        step_s = statistics.median(times)
        tokens_per_s = batch_size * T / step_s
        flops = model.flops_per_token()
        step_peaks = peaks[-steps:]
        peak = statistics.median(step_peaks)
        per_step = [batch_size * T * flops / (t * p) for t, p in zip(times, step_peaks)]
        results[arch] = {"tokens_per_s": tokens_per_s, "step_s": step_s, "batch_size": batch_size,
                         "context_len": T, "params": count_params(model), "flops_per_token": flops,
                         "achieved_flops": tokens_per_s * flops, "peak_flops": peak,
                         "mfu": statistics.median(per_step), "mfu_of_medians": tokens_per_s * flops / peak,
                         "mfu_steps": [round(m, 3) for m in per_step], "warmup_s": sum(warmup_times)}
    return {"benchmark": "train", "device": dev.type, "dtype": str(compute_dtype).removeprefix("torch."),
            "threads": threads, "vocab_size": vocab_size,
            "vocab": "random ids over the Austen char vocabulary size", "steps": steps, "warmup": warmup,
            "compile": compile,
            "peak_flops_best": max(peaks), "peak_matmul_size": peak_size, "families": results}


# The standard generation shape: a 4-layer, 4-head, d_model 256 Transformer with a 512-token context.
GENERATE_SHAPE = {"d_model": 256, "n_layers": 4, "n_heads": 4, "context_len": 512}
SAMPLING = {"temperature": 0.8, "top_k": 200}


def _time_case(case: tuple, model, prompt: torch.Tensor, new_tokens: int, dev) -> float:
    """Seconds to generate `new_tokens` per row after `prompt` (B, T): lmforge through the batching engine
    (one request per row, each with its own seed), Hugging Face through its `generate`."""
    _sync(dev)
    tic = time.perf_counter()
    if case[0] == "hf":
        model.generate(prompt, do_sample=True, min_new_tokens=new_tokens, max_new_tokens=new_tokens, **SAMPLING)
    else:
        engine = Engine(model, tokenizer=None, max_batch=prompt.size(0))
        for i, row in enumerate(prompt.tolist()):
            engine.submit(row, SamplingConfig(max_new_tokens=new_tokens, seed=i, **SAMPLING))
        engine.run()
    _sync(dev)
    return time.perf_counter() - tic


@torch.inference_mode()
def bench_generate(archs: list[str] | None = None, model_fields: dict | None = None, batch_sizes: tuple = (1, 8),
                   new_tokens: int = 500, warmup: int = 16, rounds: int = 5, vocab_size: int | None = None,
                   device: str = "cpu", threads: int | None = None, compile: bool = False) -> dict:
    """New tokens/s per family and batch size: `new_tokens` sampled (temperature 0.8, top-k 200) after a
    1-token prompt through the batching engine every `lmforge generate` runs, after a warm-up; and the
    time to the first token after a 500-token prompt (shorter where the context is). The models decode
    as `lmforge.load` sets them up (on a CPU, a Transformer's steps use int8 or fp16 weights and the KV
    cache dtype the probe chose); batch 1 with the fp32 modules, and the largest batch with the other
    cache dtype, are timed too. With `transformers` installed, the same Transformer shape as a Hugging
    Face GPT-2 through its `generate` (KV cache) is timed in the same run, where its context holds the
    new tokens (it cannot slide past it as lmforge does). `compile`: the Transformer's compiled batch-1
    step too (`Decoder.compile`: its compile time and step timings are reported, and batch 1 is
    timed through it when it was kept, that is measured faster).

    Every case is timed once per round, all cases in turn, for `rounds` rounds; each reports its median
    (and its runs). A shared machine's speed drifts from second to second; taking turns lets the
    reference and lmforge meet the same conditions, and the ratio is that of the medians."""
    from .api import decoding_setup

    dev = resolve_device(device)
    threads = set_threads(threads)
    vocab_size = vocab_size or austen_char_vocab()
    cases = {}  # (family or "hf", batch size or "fp32_modules") -> (decoder or HF model, prompt)
    results = {}
    for arch in _archs(archs, model_fields):
        fields = {**GENERATE_SHAPE, **(model_fields or {})} if arch == "transformer" else (model_fields or {})
        torch.manual_seed(0)
        model = build_model(arch, **_family_fields(arch, fields, vocab_size)).to(dev).eval()
        weights, cache = decoding_setup(model, dev)
        decoder = Decoder(model, weights, cache)
        if decoder.weights != "fp32":
            cases[(arch, "fp32_modules")] = (Decoder(model), torch.zeros(1, 1, dtype=torch.long))
        for batch_size in batch_sizes:
            cases[(arch, str(batch_size))] = (decoder, torch.zeros(batch_size, 1, dtype=torch.long))
        if decoder.weights != "fp32":  # the largest batch with the cache the probe did not choose, for comparison
            other = "fp32" if decoder.cache == "bf16" else "bf16"
            cases[(arch, f"{max(batch_sizes)} {other} cache")] = (Decoder(model, weights, other),
                                                                 torch.zeros(max(batch_sizes), 1, dtype=torch.long))
        compiled = None
        if compile and arch == "transformer":
            fast = Decoder(model, decoder.weights, decoder.cache)
            compiled = fast.compile()
            if compiled["compiled"]:  # batch 1 only: larger batches step uncompiled
                cases[(arch, "1 compiled")] = (fast, torch.zeros(1, 1, dtype=torch.long))
        # a 500-token prompt, or as long as the model's context takes with room for the first token
        long_prompt = torch.randint(vocab_size, (1, min(500, (decoder.max_context or 501) - 1)))
        ttft = min(_time_case((arch,), decoder, long_prompt, 1, dev) for _ in range(3))
        results[arch] = {"params": count_params(model), "decoding": decoder.weights, "cache": decoder.cache,
                         "batch": {}, "time_to_first_token_s": ttft,
                         "time_to_first_token_prompt_tokens": long_prompt.size(1)}
        if compiled is not None:
            results[arch]["compiled"] = {**compiled, "batch": {}}
    reference = _hf_gpt2(vocab_size, dev, model_fields)
    hf_context = None if reference is None else reference.config.n_positions
    if hf_context is not None and hf_context < new_tokens + 1:  # its generate would fail past its positions
        reference = None
    if reference is not None:
        cases[("hf", "1")] = (reference, torch.ones(1, 1, dtype=torch.long, device=dev))
    times = {case: [] for case in cases}
    for case, (model, prompt) in cases.items():  # warm-up
        _time_case(case, model, prompt, warmup, dev)
    for _ in range(rounds):
        for case, (model, prompt) in cases.items():
            times[case].append(_time_case(case, model, prompt, new_tokens, dev))

    def speed(case) -> dict:
        rows = cases[case][1].size(0) * new_tokens
        return {"new_tokens_per_s": rows / statistics.median(times[case]),
                "runs_new_tokens_per_s": [round(rows / t, 1) for t in times[case]]}

    for (arch, which) in cases:
        if arch == "hf":
            continue
        if which == "fp32_modules":
            results[arch]["batch1_fp32_modules_new_tokens_per_s"] = speed((arch, which))["new_tokens_per_s"]
        elif which.endswith(" compiled"):
            results[arch]["compiled"]["batch"][which.split()[0]] = speed((arch, which))
        elif which.endswith(" cache"):
            results[arch].setdefault("other_cache", {})[which] = speed((arch, which))
        else:
            results[arch]["batch"][which] = speed((arch, which))
    out = {"benchmark": "generate", "device": dev.type, "threads": threads, "vocab_size": vocab_size,
           "new_tokens": new_tokens, "prompt_tokens": 1, "rounds": rounds, "sampling": SAMPLING,
           "families": results}
    if reference is None and hf_context is not None:
        out["reference_hf_gpt2"] = {"skipped": f"its context ({hf_context}) holds fewer than the {new_tokens} new "
                                               f"tokens + 1; give --new-tokens {hf_context - 1} or less to time it"}
    if reference is not None:
        out["reference_hf_gpt2"] = speed(("hf", "1"))
        if ("transformer", "1") in cases:
            ours = results["transformer"]["batch"]["1"]["new_tokens_per_s"]
            out["transformer_vs_hf_batch1"] = ours / out["reference_hf_gpt2"]["new_tokens_per_s"]
        if ("transformer", "1 compiled") in cases:
            ours = results["transformer"]["compiled"]["batch"]["1"]["new_tokens_per_s"]
            out["transformer_compiled_vs_hf_batch1"] = ours / out["reference_hf_gpt2"]["new_tokens_per_s"]
    return out


def _hf_gpt2(vocab_size: int, dev, model_fields: dict | None = None):
    """A Hugging Face GPT-2 of the generation shape (the standard one, with the size fields the caller
    changed), or None without transformers."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    s = {**GENERATE_SHAPE, **{k: v for k, v in (model_fields or {}).items() if k in GENERATE_SHAPE}}
    config = GPT2Config(vocab_size=vocab_size, n_positions=s["context_len"], n_embd=s["d_model"],
                        n_layer=s["n_layers"], n_head=s["n_heads"], bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config).to(dev).eval()


def bench_austen(max_time: float = 300.0, overrides: list[str] | None = None, device: str = "cpu",
                 threads: int | None = None) -> dict:
    """Train the default model on the Austen split for `max_time` seconds of training (preparation and
    evaluation excluded), then score the whole validation split. Peak RSS is this process's."""
    import resource
    import tempfile

    from . import api
    from .training.plots import read_metrics

    overrides = [f"train.max_time={max_time}", "train.progress=false", f"train.device={device!r}",
                 *([f"train.threads={threads}"] if threads else []), *(overrides or [])]
    with tempfile.TemporaryDirectory() as tmp:
        lm, result = api.train(None, out=f"{tmp}/run", overrides=overrides, log=lambda *_: None)
        metrics = read_metrics(result.run_dir / "metrics.jsonl")
    val = result.extra["val"]
    out = {"benchmark": "austen", "max_time_s": max_time, "bits_per_byte": val["bits_per_byte"],
           "perplexity": val["perplexity"], "steps": result.steps, "tokens": result.tokens,
           "tokens_per_s": result.tokens_per_s, "train_time_s": result.train_time,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "params": result.extra["params"], "dtype": result.extra["dtype"],
           "threads": result.extra["threads"],  # what training started on (the thread tuner may have moved it)
           "config": {k: lm.config[k] for k in ("tokenizer", "model", "train")}}
    ppmd = _ppmd_bits_per_byte(lm)  # the yardstick, measured on the same split after training
    if ppmd is not None:
        out["ppmd8_bits_per_byte"] = ppmd
        out["seconds_to_beat_ppmd8 (periodic estimate)"] = next(
            (r["train_time"] for r in metrics if r.get("val_bpb", 9) <= ppmd), None)
    return out


def _ppmd_bits_per_byte(lm) -> float | None:
    """PPMd order 8 on the run's validation text after its training text, or None without pyppmd."""
    from .data import prepare_data
    from .evaluation.baselines import compressor_bits_per_byte

    try:
        import pyppmd  # noqa: F401
    except ImportError:
        return None
    prepared = prepare_data(lm.run_config(), lm.tokenizer)
    return compressor_bits_per_byte(prepared.train_text.encode("utf-8"), prepared.val_text.encode("utf-8"), "ppmd")


def bench_prepare(sources: list[str] | None = None, kinds: tuple = ("char", "word", "bpe")) -> dict:
    """Tokenizer training and encoding speed (MB/s of UTF-8) per kind on the Gutenberg texts, and the
    time to prepare the Austen split cold and cached."""
    import tempfile

    from .config import AUSTEN
    from .data import prepare, read_sources
    from .tokenizers import load_tokenizer, train_tokenizer

    texts = [doc.text for doc in read_sources(sources or ["gutenberg:*"])]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    results = {}
    for kind in kinds:
        tic = time.perf_counter()
        tokenizer = train_tokenizer(kind, texts)
        trained = time.perf_counter() - tic
        with tempfile.TemporaryDirectory() as tmp:  # as a run loads it: not holding what training split
            tokenizer.save(tmp)
            tokenizer = load_tokenizer(tmp)
        tic = time.perf_counter()
        for text in texts:
            tokenizer.encode(text)
        encoded = time.perf_counter() - tic
        with tempfile.TemporaryDirectory() as tmp:
            tic = time.perf_counter()
            prepare(AUSTEN, tokenizer=kind, cache_dir=tmp)
            cold = time.perf_counter() - tic
            tic = time.perf_counter()
            prepare(AUSTEN, tokenizer=kind, cache_dir=tmp)
            cached = time.perf_counter() - tic
        results[kind] = {"train_mb_per_s": megabytes / trained, "encode_mb_per_s": megabytes / encoded,
                         "austen_prepare_s": cold, "austen_cached_s": cached}
    return {"benchmark": "prepare", "megabytes": megabytes, "documents": len(texts), "tokenizers": results}


def bench_serve(run: str | None = None, clients: tuple = (1, 8, 32), duration: float = 20.0, max_tokens: int = 64,
                threads: int | None = None) -> dict:
    """serving.load: N concurrent streaming clients against `lmforge serve RUN` on loopback."""
    from .serving.load import bench_serve as load_test

    if run is None:
        raise LmforgeError("bench serve needs a trained run: lmforge bench serve --run runs/austen")
    return load_test(run, clients, duration, max_tokens, threads)


BENCHMARKS = {"train": bench_train, "generate": bench_generate, "austen": bench_austen, "prepare": bench_prepare,
              "serve": bench_serve}


def run(name: str, **options) -> dict:
    """Run benchmark `name` with the options it takes; an option it doesn't take is a user error."""
    if name not in BENCHMARKS:
        raise LmforgeError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    fn = BENCHMARKS[name]
    accepted = inspect.signature(fn).parameters
    extra = sorted(set(options) - set(accepted))
    if extra:
        flags = {"archs": "--arch", "model_fields": "model.key=value overrides"}
        raise LmforgeError(f"bench {name} takes no {', '.join(flags.get(e, '--' + e.replace('_', '-')) for e in extra)}"
                           f"; drop it")
    from .probe import machine

    result = fn(**options)
    result.setdefault("threads", torch.get_num_threads())  # what the figures ran on (set by the benchmark)
    return {"benchmark": result.pop("benchmark", name), "cpu": machine()["cpu"], **result}  # figures name the CPU
