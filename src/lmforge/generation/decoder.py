"""How a model is run for generation: a prompt fed once (prefill), then one position per step.

`Decoder(model, weights)` is the object that `lmforge.load` prepares. With weights="fp32" every step
runs the model's own modules (exact, any device). On a CPU a Transformer may instead take its
single-position steps through `cpu_step.TransformerStep` over int8 or fp16 copies of its weights;
the model itself is never changed, and prompts always run the fp32 modules.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import LmforgeError
from .cpu_step import TransformerStep, int8_matmul_available

WEIGHTS = ("fp32", "fp16", "int8")
MAX_STEP_ROWS = 32  # more rows than this take the modules (a batched product is compute-bound anyway)


def default_weights(model: nn.Module, device: torch.device) -> str:
    """int8 where a fast int8 kernel exists, else fp16, for a CPU Transformer the flat step covers;
    fp32 (the modules) everywhere else."""
    if device.type != "cpu" or getattr(model, "arch", None) != "transformer" or not TransformerStep.covers(model):
        return "fp32"
    return "int8" if int8_matmul_available() else "fp16"


class Decoder:
    """prefill(ids) and step(tokens) for any family, batching rows that are at different positions."""

    def __init__(self, model: nn.Module, weights: str = "fp32"):
        if weights not in WEIGHTS:
            raise LmforgeError(f"unknown decoding weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
        device = next(model.parameters()).device
        if weights != "fp32" and (device.type != "cpu" or not TransformerStep.covers(model)):
            raise LmforgeError(f"{weights} decoding is for a plain Transformer on a CPU; use fp32 weights here")
        self.model, self.weights, self.device = model, weights, device
        self.dtype = next(model.parameters()).dtype
        self._step: TransformerStep | None = None

    @property
    def max_context(self) -> int | None:
        return self.model.max_context

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor):
        """(B, T) prompt ids -> (B, V) logits for the position after them, and the state that continues them."""
        state = self.model.init_state(ids.size(0), self.device, self.dtype)
        logits, state = self.model(ids.to(self.device), state)
        return logits[:, -1], state

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state):
        """(B,) ids, one per row, fed after each row's state -> (B, V) logits and the advanced state."""
        if self.weights != "fp32" and tokens.size(0) <= MAX_STEP_ROWS and not self.model.training:
            fast = self._fast_step()
            if fast is not None:
                return fast(tokens, state), state
        logits, state = self.model(tokens.to(self.device)[:, None], state)
        return logits[:, 0], state

    def _fast_step(self) -> TransformerStep | None:
        """The flat step, built once and rebuilt after any weight update; None when the model has
        changed shape (LoRA adapters wrap its layers): the modules decode then."""
        if self._step is None or not self._step.fresh(self.model):
            self._step = TransformerStep(self.model, int8=self.weights == "int8") \
                if TransformerStep.covers(self.model) else None
        return self._step

    def select_state(self, state, rows: list[int]):
        return self.model.select_state(state, rows)

    def cat_states(self, states: list):
        return self.model.cat_states(states)
