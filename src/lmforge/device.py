"""Device, dtype, threads and seeding, decided once at the edge and passed down explicitly."""
from __future__ import annotations

import contextlib
import os
import random
import time

import numpy as np
import torch

from .errors import LmforgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmforgeError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"device {name!r} asked for but no CUDA GPU is visible; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 autocast on CUDA GPUs that support it and on CPUs with bf16 units (AVX512-BF16
    or AMX: 1.65x faster training steps on a Zen 4 CPU), and fp32 elsewhere (bf16 without those
    units is slower than fp32)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise LmforgeError(f"unknown dtype {name!r}; use auto, float32 or bfloat16")
    return DTYPES[name]


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX, as PyTorch detects them (its probes are private: absent means False)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision on accelerators; a no-op for fp32 so the training loop has no branches."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def physical_cores() -> int:
    """Physical cores: hyper-threads share one core's matmul units and only add contention."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
        if cores:
            return cores
    except ImportError:
        pass
    logical = os.cpu_count() or 1
    # Without psutil, assume two hyper-threads per core on machines with more than two logical CPUs.
    return logical // 2 if logical > 2 else logical


_configured_threads: int | None = None


def set_threads(threads: int | None) -> int:
    """Intra-op threads (default: physical cores), and a heap that keeps what it frees (below)."""
    global _configured_threads
    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    _configured_threads = threads
    keep_freed_memory()
    return threads


def configured_threads() -> int:
    """The thread count set_threads chose (a tuner may be running fewer for now)."""
    return _configured_threads or torch.get_num_threads()


_kept: dict[str, tuple[int, float]] = {}  # a kind of work -> (the count its last tuner kept, when it checked)


class ThreadTuner:
    """Keeps the intra-op thread count that runs this process's repeated work fastest, and re-checks it
    as the machine's load changes.

    Torch's threads wait for each other at every operation. On a quiet 2-core machine two threads are
    fastest; with one other busy process on it, the second thread waits for the busy core and the
    steps become slower than with one thread (measured: 1,500 against 2,550 training tokens/s). A
    check runs `trial` units of work (training steps, decoding steps, scoring windows) with the other
    candidate count and keeps whichever took less time on average.

    Checks cost the trial's slower units, so a quiet machine is checked less and less often: after
    `first` units, then after gaps of `period`, twice that, four times, up to `max_gap` units (on a
    quiet Intel Xeon, a check every 40 training steps cost 6% of the tokens). A change of load shows
    in the times themselves: when the median of the last `trial` units strays by more than `drift`
    (a factor) from what the kept count took at the last check, a check runs at once. `period_s`
    optionally bounds the seconds between checks, for work whose units vary in size.

    The scheduled checks sit at fixed positions in the work, counted from its start: `start` units
    already done when a run resumes. Some CPUs round a result differently with one and two threads
    (fp32 matrix products on an Intel Xeon differ in the last bits), so a trial's steps at the other
    count change the run's numbers a little; at fixed positions a repeated run, and a resumed one,
    take the same trials on a quiet machine and end with the same bits. On a GPU it does nothing.

    Work that comes in short calls whose numbers are not recorded (generations, which check on a
    clock anyway) names its `kind`: a new tuner of that kind then starts from the count the last one
    kept, when that one checked within `remember_s` seconds, and checks next after `period` units
    rather than `first`. Otherwise every call would spend its first units at a count already found
    slow, and its trial on the other one: half of a short call beside a busy process."""

    def __init__(self, threads: int, period: int = 40, trial: int = 3, first: int = 3,
                 max_gap: int | None = None, drift: float | None = 1.3, period_s: float | None = None,
                 start: int = 0, enabled: bool = True, kind: str | None = None, remember_s: float = 10.0):
        self.candidates = sorted({threads, max(1, threads // 2)}, reverse=True)
        self.enabled = enabled and len(self.candidates) > 1
        self.kind, self.checked = kind, time.perf_counter()
        kept, checked = _kept.get(kind, (None, None)) if kind is not None else (None, None)
        if kept in self.candidates and self.checked - checked < remember_s:
            threads, first, self.checked = kept, period, checked
        self.current, self.trial, self.period, self.first = threads, trial, period, first
        self.max_gap, self.drift, self.period_s = max_gap or 8 * period, drift, period_s
        self.recent: dict[int, list[float]] = {c: [] for c in self.candidates}
        self.units, self.trying, self.left, self.reference = start, None, 0, None
        self.due = self._next_check(start)
        last = self._last_check(start)
        if self.enabled:  # start from the given count, whatever work before this left set
            torch.set_num_threads(threads)
            if last is not None and start < last + trial:  # resumed inside a trial: finish it
                self._begin(last + trial - start)

    def _checks(self):
        position, gap = self.first, self.period
        while True:
            yield position
            position, gap = position + gap, min(2 * gap, self.max_gap)

    def _next_check(self, units: int) -> int:
        return next(p for p in self._checks() if p > units)

    def _last_check(self, units: int) -> int | None:
        last = None
        for p in self._checks():
            if p > units:
                return last
            last = p

    def _begin(self, units: int) -> None:
        self.trying = next((c for c in self.candidates if c != self.current), None)
        self.left = units
        torch.set_num_threads(self.trying)

    def _drifted(self) -> bool:
        times = self.recent[self.current]
        if self.drift is None or self.reference is None or len(times) < self.trial:
            return False
        ratio = _median(times) / self.reference
        return not 1 / self.drift <= ratio <= self.drift

    def settle(self) -> None:
        """The work has paused: end a trial under way and go back to the count kept, so that whatever runs
        next (another request, other code in this process) does not inherit the trial's count."""
        if self.enabled and self.trying is not None:
            self.trying = None
            torch.set_num_threads(self.current)

    def record(self, seconds: float) -> None:
        """The time one unit of work took with the current thread count; may change the count."""
        if not self.enabled:
            return
        used = torch.get_num_threads()
        self.recent.setdefault(used, []).append(seconds)
        self.recent[used] = self.recent[used][-self.trial:]
        self.units += 1
        if self.trying is None:
            overdue = self.period_s is not None and time.perf_counter() - self.checked >= self.period_s
            if self.units >= self.due or self._drifted() or overdue:
                self._begin(self.trial)
            return
        self.left -= 1
        if self.left > 0:
            return
        kept = self.recent[self.current]  # none after a resume inside a trial: nothing to compare, keep
        # Means, not medians: what the work costs is the time it takes in all. Beside a busy process,
        # two threads give a few normal units among far slower ones (a thread waiting out the other's
        # time slice), and a median of three could pick them.
        if kept and _mean(self.recent[self.trying]) < 0.95 * _mean(kept):
            self.current = self.trying
        self.trying, self.checked = None, time.perf_counter()
        if self.kind is not None:
            _kept[self.kind] = (self.current, self.checked)
        self.reference = _median(self.recent[self.current]) if self.recent[self.current] else None
        self.due = self._next_check(self.units)
        torch.set_num_threads(self.current)


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile builds CPU code with (found as Inductor finds it), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 - none found (InvalidCxxCompiler), or a torch without this helper
        return None


def compile_failure(e: BaseException) -> str:
    """Why torch.compile failed, in one line: a missing C++ compiler said as such; else the error's
    first informative line (Dynamo's wrapper ends its first line with "raised:", the cause follows)."""
    if cpp_compiler() is None:
        return "torch.compile failed: no C++ compiler found (install g++ or clang++)"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    while len(lines) > 1 and lines[0].endswith(":"):
        lines.pop(0)
    return f"torch.compile failed: {type(e).__name__}: {(lines or [''])[0][:200]}".rstrip(": ")


def all_but_global_state(guards) -> list[bool]:
    """For torch.compile's guard_filter_fn: keep every guard but the one on global state, which includes
    the thread count. ThreadTuner moves that between its candidates while training or decoding, and
    each new count would compile the step again (seconds: 10 s for a training step) though the same C++
    loops serve any count (their OpenMP regions take the count at run time). The rest of that state
    (grad mode, autocast) does not change between the calls of one compiled step: a decoding step
    always runs under inference mode, a training forward under the run's autocast."""
    return [guard.guard_type != "GLOBAL_STATE" for guard in guards]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("inf")


def keep_freed_memory() -> None:
    """Ask glibc to reuse freed blocks instead of returning them to the OS. A CPU training step frees
    and reallocates megabyte activations; by default each comes back as fresh pages, zeroed by the
    kernel on first touch: about 15,500 page faults per step at the standard shape, against about
    1,200 after this. Peak memory is unchanged (the heap only stops shrinking below it)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MiB (glibc's maximum) come from the heap...
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # ...which is not trimmed back to the OS (an int: 2 GiB)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose work is done when a call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device, size: int = 2048, repeats: int = 10,
                       dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the fastest of `repeats` (size × size) @ (size × size) matmuls in `dtype`, after one
    warm-up: what this device attains in practice, the denominator of MFU."""
    import time

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - tic)
    return 2 * size**3 / best


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
