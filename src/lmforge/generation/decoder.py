"""How a model is run for generation: a prompt fed once (prefill), then one position per step.

`Decoder(model, weights)` is the object that `lmforge.load` prepares. With weights="fp32" every step
runs the model's own modules (exact, any device). On a CPU a Transformer may instead take its
single-position steps through `cpu_step.TransformerStep` over int8 or fp16 copies of its weights,
and keep its KV cache in bf16 (`cache="bf16"`) where the probe measured that faster; the model
itself is never changed, and prompts always run the fp32 modules.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

from ..device import compile_failure
from ..errors import LmforgeError
from .cpu_step import CompiledStep, TransformerStep, int8_matmul_available

WEIGHTS = ("fp32", "fp16", "int8")
CACHES = ("fp32", "bf16")
MAX_STEP_ROWS = 32  # more rows than this take the modules (a batched product is compute-bound anyway)


def default_weights(model: nn.Module, device: torch.device) -> str:
    """int8 where a fast int8 kernel exists, else fp16, for a CPU Transformer the flat step covers;
    fp32 (the modules) everywhere else."""
    if device.type != "cpu" or getattr(model, "arch", None) != "transformer" or not TransformerStep.covers(model):
        return "fp32"
    return "int8" if int8_matmul_available() else "fp16"


class Decoder:
    """prefill(ids) and step(tokens) for any family, batching rows that are at different positions."""

    def __init__(self, model: nn.Module, weights: str = "fp32", cache: str = "fp32"):
        if weights not in WEIGHTS:
            raise LmforgeError(f"unknown decoding weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
        if cache not in CACHES:
            raise LmforgeError(f"unknown decoding cache {cache!r}; choose one of {', '.join(CACHES)}")
        device = next(model.parameters()).device
        if weights != "fp32" and (device.type != "cpu" or not TransformerStep.covers(model)):
            raise LmforgeError(f"{weights} decoding is for a plain Transformer on a CPU; use fp32 weights here")
        if cache != "fp32" and weights == "fp32":
            raise LmforgeError("a bf16 cache goes with int8 or fp16 decoding weights; "
                               "fp32 decoding keeps an fp32 cache")
        self.model, self.weights, self.cache, self.device = model, weights, cache, device
        self.dtype = next(model.parameters()).dtype
        # The modules read and write caches of the model's dtype; the flat step takes either.
        self.cache_dtype = torch.bfloat16 if cache == "bf16" else self.dtype
        self._step: TransformerStep | None = None
        self._compiled: CompiledStep | None = None  # set by compile(), for the weights it was built from

    @property
    def max_context(self) -> int | None:
        return self.model.max_context

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor):
        """(B, T) prompt ids -> (B, V) logits for the position after them, and the state that continues them."""
        B, T = ids.shape
        if getattr(self.model, "arch", None) != "transformer" or T >= self.model.max_context:
            state = self.model.init_state(B, self.device, self.dtype)
            logits, state = self.model(ids.to(self.device), state)
            return logits[:, -1], self._cached(state, self.cache_dtype)
        # The prompt runs over buffers of its own length, then moves into full-context ones of the cache's
        # dtype: zeroing a full fp32 cache and converting it cost more than the prompt's own work (for a
        # one-token prompt, 10 of 12 ms at 8 rows of the standard shape), and every request pays it.
        short = self.model.init_state(B, self.device, self.dtype, length=T)
        logits, short = self.model(ids.to(self.device), short)
        state = self.model.init_state(B, self.device, self.cache_dtype)
        for full, part in zip(state.keys + state.values, short.keys + short.values):
            full[:, :, :T] = part
        state.pos = short.pos
        return logits[:, -1], state

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state):
        """(B,) ids, one per row, fed after each row's state -> (B, V) logits and the advanced state."""
        if self.weights != "fp32" and tokens.size(0) <= MAX_STEP_ROWS and not self.model.training:
            fast = self._fast_step()
            if fast is not None:
                if self._compiled is not None and self._compiled.step is fast:
                    return self._compiled(tokens, state), state
                return fast(tokens, state), state
        logits, state = self.model(tokens.to(self.device)[:, None], self._cached(state, self.dtype))
        return logits[:, 0], state

    def new_state(self, batch_size: int):
        """An empty state of `batch_size` rows, its cache in the decoder's cache dtype."""
        return self.model.init_state(batch_size, self.device, self.cache_dtype)

    def _cached(self, state, dtype: torch.dtype):
        """`state` with its KV cache in `dtype`, converted in place (the caller's object is the engine's
        running state). Only a bf16-cache decoder ever converts: every other state is left as it is."""
        if self.cache != "fp32" and state.keys[0].dtype != dtype:
            state.keys = [k.to(dtype) for k in state.keys]
            state.values = [v.to(dtype) for v in state.values]
        return state

    def _fast_step(self) -> TransformerStep | None:
        """The flat step, built once and rebuilt after any weight update; None when the model has
        changed shape (LoRA adapters wrap its layers): the modules decode then. A rebuild also drops
        the compiled step, which was built from the old weights."""
        if self._step is None or not self._step.fresh(self.model):
            self._step = TransformerStep(self.model, int8=self.weights == "int8") \
                if TransformerStep.covers(self.model) else None
            self._compiled = None
        return self._step

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @torch.inference_mode()
    def compile(self, steps: int = 32, rounds: int = 5, always: bool = False) -> dict:
        """Compile the flat step's batch-1 steps (`cpu_step.CompiledStep`) and use them from now on if,
        timed here against the uncompiled step, they are faster (or `always`) and give the same
        logits; until the weights change. Returns what was measured: {"compiled": bool, "why": str,
        "compile_s", "max_logit_difference", "step_us": {"eager", "compiled"}}. A compiler that
        fails raises nothing: the step stays uncompiled and "why" says what failed."""
        step = self._fast_step() if self.weights != "fp32" and not self.model.training else None
        if step is None:
            return {"compiled": False, "why": "only the int8/fp16 step of a plain Transformer on a CPU compiles"}
        tic = time.perf_counter()
        try:
            compiled = CompiledStep(step)
            with CompiledStep.tracing():
                worst = self._agreement(step, compiled)
        except Exception as e:  # Inductor's errors have no common type: a missing compiler, a failed build
            return {"compiled": False, "why": compile_failure(e)}
        out = {"compile_s": round(time.perf_counter() - tic, 2), "max_logit_difference": worst}
        if worst > 1e-2:
            return {**out, "compiled": False, "why": "its logits differ from the uncompiled step's"}
        times = self._step_times({"eager": step, "compiled": compiled}, steps, rounds)
        out["step_us"] = {k: round(v * 1e6, 1) for k, v in times.items()}
        faster = times["compiled"] < 0.95 * times["eager"]
        if not (faster or always):
            return {**out, "compiled": False, "why": "not faster than the uncompiled step here"}
        self._compiled = compiled
        return {**out, "compiled": True, "why": "faster than the uncompiled step here" if faster else "asked for"}

    def _agreement(self, step: TransformerStep, compiled: CompiledStep, steps: int = 4) -> float:
        """The largest difference between the two steps' logits, relative to the logits' size, over
        a few batch-1 steps (which also compiles the step, so that no request waits for it later)."""
        states = [self.new_state(1) for _ in range(2)]
        tokens = torch.ones(1, dtype=torch.long, device=self.device)
        worst = 0.0
        for _ in range(min(steps, self.model.max_context - 1)):
            a, b = step(tokens, states[0]), compiled(tokens, states[1])
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1.0)))
        return worst

    def _step_times(self, steps: dict, n: int, rounds: int) -> dict[str, float]:
        """Median seconds per batch-1 step for each of `steps`, taking turns, each round from the same
        context (up to 64 positions, leaving room in the cache for the steps)."""
        context = self.model.max_context
        prefix = max(1, min(64, context // 2))
        n = max(1, min(n, context - prefix))
        _, state = self.prefill(torch.zeros(1, prefix, dtype=torch.long, device=self.device))
        tokens = torch.zeros(1, dtype=torch.long, device=self.device)
        times = {name: [] for name in steps}
        for round_ in range(rounds + 1):  # the first round warms up
            for name, fn in steps.items():
                state.pos = [prefix]
                tic = time.perf_counter()
                for _ in range(n):
                    fn(tokens, state)
                if round_:
                    times[name].append((time.perf_counter() - tic) / n)
        return {name: statistics.median(t) for name, t in times.items()}

    # Under inference mode, like prefill: every cache the decoder steps is then an inference tensor (the
    # compiled step's checks tell the kinds apart, and a state of the other kind would compile it anew).
    @torch.inference_mode()
    def select_state(self, state, rows: list[int]):
        return self.model.select_state(state, rows)

    @torch.inference_mode()
    def cat_states(self, states: list):
        return self.model.cat_states([self._cached(s, self.cache_dtype) for s in states])
