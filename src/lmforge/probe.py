"""What runs fastest on this machine, measured instead of assumed from CPU flags.

A CPU with bf16 units may still multiply bf16 matrices slower than fp32 ones; an int8 kernel may be
slower than fp16 on another. So a short probe (a few seconds) times the choices on the machine at
hand — a training step in fp32 and in bf16 autocast (with attention in fp32 or bf16), a decoding
step with int8, fp16 and fp32 weights, and a batch-8 decoding step deep into the context with its KV
cache in fp32 and in bf16 — taking turns, medians kept. The result is cached per machine
and torch version in the cache folder (re-run when either changes, or with `lmforge doctor
--refresh`). `lmforge train` and `lmforge.load` use it for their "auto" choices, and a run's
config.json records what was chosen. On a GPU nothing is probed: bf16 autocast where it is
supported, and the fp32 modules for decoding.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import time

import torch

from .checkpoint import write_json
from .config import TrainConfig, is_number
from .data.prepare import cache_root
from .errors import LmforgeError
from .device import all_but_global_state, compile_failure, cpp_compiler, cpu_has_bf16
from .generation import Decoder
from .generation.cpu_step import int8_matmul_available
from .models import build_model
from .training.optim import build_optimizers
from .training.step import lm_loss, train_step

PROBE_VERSION = 2
SHAPE = {"vocab_size": 4096, "d_model": 256, "n_layers": 2, "n_heads": 4, "context_len": 128, "dropout": 0.0}
BATCH = 8
ROUNDS = 3  # each choice timed this many times, the choices taking turns
BF16_MARGIN = 1.10  # bf16 must be this much faster than fp32 to be chosen: it rounds, fp32 does not
INT8_MARGIN = 1.05  # the same for int8 over fp16 weights when decoding
CACHE_MARGIN = 1.05  # and for a bf16 KV cache over an fp32 one


def machine() -> dict:
    """What the probe's answer depends on: the CPU, the cores, and this torch build."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_units": cpu_has_bf16(), "probe_version": PROBE_VERSION}


def cache_file():
    return cache_root(None) / "probe.json"


def choices(device: torch.device, refresh: bool = False, log=None) -> dict:
    """{"dtype", "attention", "decoding", "cache"} for `device`, and the timings behind them (CPU)."""
    if device.type != "cpu":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return {"dtype": "bfloat16" if bf16 else "float32", "attention": "native", "decoding": "fp32",
                "cache": "fp32", "why": f"{device.type}: not probed"}
    facts = machine()
    cached = None if refresh else _cached(cache_file(), facts, "choices")
    if cached is not None and _sound(cached):
        return cached
    with _alone(cache_file()):
        cached = None if refresh else _cached(cache_file(), facts, "choices")  # another run's, measured meanwhile
        if cached is not None and _sound(cached):
            return cached
        if log is not None:
            log("probing this machine's fastest training dtype and decoding settings (once; a few seconds)")
        tic = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():  # its training steps, whatever mode the caller's
            measured = measure()
        return _store(cache_file(), facts, "choices", {**measured, "probe_s": round(time.perf_counter() - tic, 2)})


@contextlib.contextmanager
def _alone(path):
    """Hold an exclusive lock beside `path` (where the system has flock and the folder can be written),
    so that runs started together measure once: the others wait, then read the first one's result,
    rather than timing a machine they share at the same moment and choosing apart."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a")
    except (ImportError, OSError):
        yield
        return
    with handle:  # closing it releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


CHOICES = {"dtype": ("float32", "bfloat16"), "attention": ("float32", "native"), "decoding": ("fp32", "fp16", "int8"),
           "cache": ("fp32", "bf16")}


TIMINGS = ("train_step_ms", "decode_step_us", "batch8_decode_step_us")


def _numbers(value) -> bool:
    """Whether `value` is a {name: number} dict, as the probe writes its timings."""
    return isinstance(value, dict) and all(isinstance(k, str) and is_number(v) for k, v in value.items())


def _sound(picked: dict) -> bool:
    """Whether cached choices name a value lmforge has for each setting, with timings of the shape the
    probe writes (a damaged file is measured again)."""
    return all(picked.get(name) in allowed for name, allowed in CHOICES.items()) \
        and all(_numbers(picked.get(name, {})) for name in TIMINGS)


def _sound_gain(result: dict) -> bool:
    """Whether a cached compile measurement has the shape `_compile_times` writes."""
    if not is_number(result.get("gain")):
        return False
    if result["gain"] <= 0:
        return isinstance(result.get("why"), str)
    return is_number(result.get("compile_s")) and _numbers(result.get("step_ms")) \
        and {"eager", "compiled"} <= set(result["step_ms"])


def _cached(path, facts: dict, key: str):
    """What `path` holds under `key`, if it was measured on a machine with these `facts`; else None."""
    try:
        cached = json.loads(path.read_text())
        found = cached[key] if cached.get("machine") == facts else None
    except (OSError, ValueError, KeyError, AttributeError, TypeError):  # missing, damaged, or not an object
        return None
    return found if isinstance(found, dict) else None


def _store(path, facts: dict, key: str, result):
    """Write `result` under `key` beside the machine's `facts`, and return it. A read-only cache folder
    is no error: the next call measures again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"machine": facts, key: result})
    except (OSError, LmforgeError):
        pass
    return result


def measure() -> dict:
    train = _train_times()
    upcast = train.get(train_variant("bfloat16", "float32"), 1e9)
    native = train.get(train_variant("bfloat16", "native"), 1e9)
    fp32, bf16 = train[train_variant("float32", "float32")], min(upcast, native)
    dtype = "bfloat16" if fp32 / bf16 >= BF16_MARGIN else "float32"
    attention = "float32" if upcast <= native else "native"
    decode = _decode_times()
    decoding = min(decode, key=decode.get)
    if decoding == "int8" and decode["fp16"] / decode["int8"] < INT8_MARGIN:
        decoding = "fp16"
    caches = _cache_times(decoding) if decoding != "fp32" else {}
    cache = "bf16" if caches and caches["fp32"] / caches["bf16"] >= CACHE_MARGIN else "fp32"
    return {"dtype": dtype, "attention": attention, "decoding": decoding, "cache": cache,
            "train_step_ms": {k: round(v * 1e3, 2) for k, v in train.items()},
            "decode_step_us": {k: round(v * 1e6, 1) for k, v in decode.items()},
            "batch8_decode_step_us": {k: round(v * 1e6, 1) for k, v in caches.items()}}


def _take_turns(cases: dict) -> dict[str, float]:
    """Each case's median seconds over ROUNDS rounds, the cases taking turns after a warm-up round; a
    case is a function that runs once and returns the seconds it took."""
    times = {name: [] for name in cases}
    for round_ in range(ROUNDS + 1):  # the first round warms up
        for name, case in cases.items():
            seconds = case()
            if round_:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def train_variant(dtype: str, attention: str) -> str:
    """The name under which the probe times a training step in `dtype` with attention in `attention`
    (the keys of train_step_ms)."""
    if dtype == "float32":
        return "float32"
    return "bfloat16 attention float32" if attention == "float32" else "bfloat16"


def _train_times() -> dict[str, float]:
    """Median seconds per training step of a small Transformer, per dtype / attention precision."""
    device = torch.device("cpu")
    variants = {train_variant("float32", "float32"): (torch.float32, True)}
    if cpu_has_bf16():
        variants.update({train_variant("bfloat16", "float32"): (torch.bfloat16, True),
                         train_variant("bfloat16", "native"): (torch.bfloat16, False)})
    torch.manual_seed(0)
    model = build_model("transformer", **SHAPE).train()
    optimizers = build_optimizers(model, TrainConfig(max_steps=1))
    batch = torch.randint(SHAPE["vocab_size"], (BATCH, SHAPE["context_len"] + 1), generator=torch.Generator().manual_seed(0))
    micro = [(batch[:, :-1], batch[:, 1:])]

    def step(dtype, upcast) -> float:
        model.set_attention_upcast(upcast)
        tic = time.perf_counter()
        train_step(model, model, optimizers, micro, lm_loss, device=device, dtype=dtype, grad_clip=1.0)
        return time.perf_counter() - tic

    times = _take_turns({name: functools.partial(step, *variant) for name, variant in variants.items()})
    model.set_attention_upcast(True)
    return times


def _steps(decoder: Decoder, tokens: torch.Tensor, state, steps: int, position: int | None = None) -> float:
    """Seconds per decoding step over `steps` steps of `state` (from `position` in every row, when given)."""
    if position is not None:
        state.pos = [position] * tokens.size(0)
    tic = time.perf_counter()
    for _ in range(steps):
        decoder.step(tokens, state)
    return (time.perf_counter() - tic) / steps


@torch.inference_mode()
def _decode_times(steps: int = 48) -> dict[str, float]:
    """Median seconds per single-token decoding step at batch 1, per weight format."""
    torch.manual_seed(0)
    model = build_model("transformer", **{**SHAPE, "n_layers": 4}).eval()
    formats = ["fp32", "fp16"] + (["int8"] if int8_matmul_available() else [])
    tokens = torch.zeros(1, dtype=torch.long)

    def run(decoder: Decoder) -> float:  # from a fresh one-token prompt each time
        return _steps(decoder, tokens, decoder.prefill(torch.zeros(1, 1, dtype=torch.long))[1], steps)

    return _take_turns({w: functools.partial(run, Decoder(model, w)) for w in formats})


@torch.inference_mode()
def _cache_times(weights: str, rows: int = 8, position: int = 256, steps: int = 16) -> dict[str, float]:
    """Median seconds per decoding step of `rows` rows `position` tokens into the context, with `weights`
    and the KV cache in fp32 or bf16: the cache's share of a step grows with the rows and the length
    (a server's batch), and whether reading half the bytes beats fp32 arithmetic depends on the CPU."""
    torch.manual_seed(0)
    model = build_model("transformer", **{**SHAPE, "n_layers": 4, "context_len": 2 * position}).eval()
    prompt, tokens = torch.zeros(rows, position, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
    cases = {}
    for cache in ("fp32", "bf16"):
        decoder = Decoder(model, weights, cache)  # each round steps on from the same prompt, prefilled once
        cases[cache] = functools.partial(_steps, decoder, tokens, decoder.prefill(prompt)[1], steps, position)
    return _take_turns(cases)


# A CPU run compiles its training step (torch.compile) where that measured worth its cost: on an Intel
# Xeon with AMX the compiled bf16 step took 187-191 ms against 247-256 eagerly (the default model, batch
# 16), and 300-s `lmforge bench austen` runs trained 1,697 and 1,714 steps (1.4506 and 1.4495 bits per
# byte) against 1,386 and 1,387 eagerly (1.4593, 1.4592), compiling included; on an AMD Zen 4 the fp32
# step gained 7%.
COMPILE_MIN_GAIN = 1.10  # the compiled step must be this much faster...
COMPILE_PAYBACK = 2.0  # ...and save this many times the compile time over the run
COMPILE_MIN_S = 120.0  # runs shorter than this train eagerly without measuring (compiling alone takes 10-30 s)


def compile_file():
    return cache_root(None) / "probe-compile.json"


def compile_gain(dtype: str, attention: str, log=None, measure: bool = True) -> dict | None:
    """How much faster a compiled training step runs on this machine than an eager one, in `dtype` with
    attention in `attention` (the probe's shape): {"gain": eager / compiled seconds per step, "compile_s",
    "step_ms": {"eager", "compiled"}}, or {"gain": 0, "why": ...} where compiling failed (no C++
    compiler, say). Measured once per machine, torch version and setting (10-30 s, most of it compiling),
    then cached; None when not cached and `measure` is False."""
    facts = {**machine(), "dtype": dtype, "attention": attention}

    def stored():
        cached = _cached(compile_file(), facts, "result")
        if cached is None or not _sound_gain(cached):  # a damaged file is measured again
            return None
        # a failure records the compiler it had (looking one up costs a second): with another, measure again
        return None if cached["gain"] <= 0 and cached.get("cpp_compiler") != cpp_compiler() else cached

    cached = stored()
    if cached is not None or not measure:
        return cached
    with _alone(compile_file()):
        cached = stored()  # another run's, measured while this one waited
        if cached is not None:
            return cached
        if log is not None:
            log("timing a compiled training step against an eager one on this machine (once; 10-30 s)")
        with torch.inference_mode(False), torch.enable_grad():
            measured = _compile_times(getattr(torch, dtype), attention == "float32")
        return _store(compile_file(), facts, "result", measured)


def _compile_times(dtype: torch.dtype, upcast: bool) -> dict:
    from .training.step import deterministic_compiled

    device = torch.device("cpu")
    torch.manual_seed(0)
    models = [build_model("transformer", **SHAPE).train() for _ in range(2)]
    for model in models:
        model.set_attention_upcast(upcast)
    optimizers = [build_optimizers(model, TrainConfig(max_steps=1)) for model in models]
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(SHAPE["vocab_size"], (BATCH, SHAPE["context_len"] + 1), generator=gen)
    micro = [(batch[:, :-1], batch[:, 1:])]
    try:
        compiled = torch.compile(models[1], options={"guard_filter_fn": all_but_global_state})  # as a run compiles
    except Exception as e:  # noqa: BLE001 - a torch without a working compiler backend
        return {"gain": 0.0, "why": compile_failure(e), "cpp_compiler": cpp_compiler()}

    def step(i, forward) -> float:
        tic = time.perf_counter()
        train_step(models[i], forward, optimizers[i], micro, lm_loss, device=device, dtype=dtype, grad_clip=1.0)
        return time.perf_counter() - tic

    with deterministic_compiled():
        try:
            compile_s = step(1, compiled) + step(1, compiled)  # the first builds the forward, the second the backward
        except Exception as e:  # noqa: BLE001 - Inductor's errors have no common type (a missing C++ compiler...)
            return {"gain": 0.0, "why": compile_failure(e), "cpp_compiler": cpp_compiler()}
        times = _take_turns({"eager": functools.partial(step, 0, models[0]),
                             "compiled": functools.partial(step, 1, compiled)})
    return {"gain": round(times["eager"] / times["compiled"], 3), "compile_s": round(compile_s, 1),
            "step_ms": {k: round(v * 1e3, 2) for k, v in times.items()}}


def report(refresh: bool = False, log=None) -> dict:
    """What `lmforge doctor` prints: the machine, the choices and the timings behind them. `log` hears
    that the probe runs, when it does."""
    before = _cached(cache_file(), machine(), "choices")
    fresh = refresh or before is None or not _sound(before)  # measured now, not read back
    picked = choices(torch.device("cpu"), refresh=refresh, log=log)
    if refresh:  # measured again by the next run long enough to ask
        try:
            compile_file().unlink(missing_ok=True)
        except OSError:  # a read-only cache: nothing stored to forget
            pass
    kept = _cached(cache_file(), machine(), "choices") == picked  # whether the next run reads these back
    out = {"machine": machine(), "choices": picked, "probe_s": picked.get("probe_s"), "probed_now": fresh,
           "cache": str(cache_file()) if kept else None, "threads": torch.get_num_threads(),
           "compiled_training_step": compile_gain(picked["dtype"], picked["attention"], measure=False)}
    if torch.cuda.is_available():
        out["cuda"] = {"device": torch.cuda.get_device_name(), **choices(torch.device("cuda"))}
    return out

