"""Adaptive (dynamic) evaluation: the model keeps learning from the text it is scoring.

Classical compressors adapt to a text while they code it — a new book's names and phrases get cheap
after their first few uses — and that is much of why PPMd is strong on a book it never saw. Dynamic
evaluation (Krause et al., 2018) gives a language model the same chance: the text is scored in
order, window by window as static evaluation reads it, and after each window is scored the model
takes a gradient step on exactly the tokens it has just paid for. Every token is still scored once,
before the model has trained on it, so the figure is an honest code length. The model passed in is
not changed (a copy adapts); `lora=True` adapts low-rank adapters only.

In: a model, its tokenizer and a text. Out: the adaptive Score.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import LmforgeError
from ..evaluation.likelihood import Score, _score_positions, _windows
from ..tokenizers import start_id
from .lora import apply_lora

DEFAULT_LR = {"full": 1e-4, "lora": 1e-3}  # starting points, not tuned per text: --adapt-lr overrides


@dataclass
class AdaptSettings:
    """How the copy learns: AdamW at `lr`, on all weights or on LoRA adapters, `steps` per window."""
    lr: float | None = None  # per mode default above
    lora: bool = False
    lora_rank: int = 8
    steps: int = 1  # gradient steps per window


def adaptive_score(model, tokenizer, text: str, settings: AdaptSettings | None = None, device="cpu") -> Score:
    """Score `text` token by token as static evaluation does, updating a copy of `model` after each
    window on that window's scored tokens (AdamW, no weight decay)."""
    settings = settings or AdaptSettings()
    lr = settings.lr if settings.lr is not None else DEFAULT_LR["lora" if settings.lora else "full"]
    if not lr > 0 or settings.steps < 1:
        raise LmforgeError("--adapt needs a positive learning rate and at least one step per window")
    model = copy.deepcopy(model).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    if settings.lora:  # freezes the weights, adds trainable adapters
        apply_lora(model, None, settings.lora_rank, 2.0 * settings.lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    ids = tokenizer.encode(text)
    seq = torch.tensor([start_id(tokenizer)] + ids, dtype=torch.long, device=device)
    n = seq.numel()
    total = Score(bytes=len(text.encode("utf-8")))
    unk = getattr(tokenizer, "unk_id", None)
    total.unknown = sum(1 for i in ids if i == unk) if unk is not None else 0
    if n < 2:
        return total
    limit = model.max_context or getattr(model.config, "context_len", 256)
    window, stride = limit + 1, max(1, limit // 2)
    model.eval()  # no dropout: the updates follow the text, not noise
    state = None
    for start, end, first in _windows(n, window, stride) if model.max_context else _chunks(n, limit):
        x, targets = seq[start:end - 1][None], seq[first:end]
        if model.max_context is None and state is None:
            state = model.init_state(1, device, next(model.parameters()).dtype)
        for step in range(settings.steps):
            logits, new_state = model(x, _detached(state))
            scored = logits[0][first - start - 1:]
            if step == 0:  # paid with the weights from before this window: scored, then learned from
                total += _score_positions(scored.detach(), targets)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(scored.float(), targets).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if step == 0:
                state = new_state  # the state carried on is the one the scored pass left
    return total


def _chunks(n: int, length: int):
    """(start, end, first) chunks for a model that carries its state: every position once, in order."""
    for start in range(0, n - 1, length):
        end = min(start + length + 1, n)
        yield start, end, start + 1


def _detached(state):
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (list, tuple)):
        return type(state)(_detached(s) for s in state)
    return state
