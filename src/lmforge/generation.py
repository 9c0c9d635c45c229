"""Text from a seed phrase: greedy, temperature, top-k, top-p sampling, stop strings and streaming.

One decoding loop serves every family: the prompt is fed once (prefill), then one token at a time
through the model's state (KV cache, recurrent state or convolution buffer), never recomputing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .errors import LmforgeError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.temperature < 0:
            raise LmforgeError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise LmforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise LmforgeError(f"top_k must be at least 1, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise LmforgeError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= cfg.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # An exponential race: argmax of p_i / E_i with E_i ~ Exp(1) is token i with probability p_i. It is
    # one draw per token like torch.multinomial, at half its fixed cost (which shows in every step). E is
    # kept above 0, so a token with p = 0 can never win.
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return probs.div_(race).argmax(dim=-1)


def _refill_length(max_context: int) -> int:
    # When a bounded-context model's cache is full, re-feed the last 3/4 of a window: one prefill
    # then buys a quarter window of cheap single-token steps.
    return max(1, (max_context * 3) // 4)


@torch.inference_mode()
def generate_ids(model, prompt: torch.Tensor, cfg: SamplingConfig) -> Iterator[torch.Tensor]:
    """Yield (B,) next-token ids, one step at a time, for a (B, T) batch of prompts of equal length."""
    if prompt.dim() != 2 or prompt.size(1) == 0:
        raise LmforgeError("the prompt must hold at least one token")
    device = prompt.device
    dtype = next(model.parameters()).dtype
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    limit = model.max_context
    seq = prompt
    if limit is not None and seq.size(1) > limit:
        seq = seq[:, -_refill_length(limit):]
    state = model.init_state(seq.size(0), device, dtype)
    logits, state = model(seq, state)
    length = seq.size(1)
    history = [seq]
    for _ in range(cfg.max_new_tokens):
        token = sample_next(logits[:, -1], cfg, generator)
        yield token
        history.append(token[:, None])
        if limit is not None and length >= limit:
            window = torch.cat(history, dim=1)[:, -_refill_length(limit):]
            history = [window]
            state = model.init_state(window.size(0), device, dtype)
            logits, state = model(window, state)
            length = window.size(1)
        else:
            logits, state = model(token[:, None], state)
            length += 1


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    replaced: dict[str, int]  # prompt pieces the tokenizer could not represent -> count
    stopped_by: str | None = None


def _earliest_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    hits = [(text.find(s), s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _safe_prefix(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown without risking half a stop string or half a character."""
    end = len(text)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence from a byte-level tokenizer
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end


def stream(model, tokenizer, prompt: str, cfg: SamplingConfig | None = None,
           device: torch.device | str = "cpu") -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece; the generator returns a `Generation`."""
    cfg = cfg or SamplingConfig()
    replaced = tokenizer.unknown(prompt) if prompt else {}
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:  # an empty prompt starts a new document
        ids = [tokenizer.eos_id]
    prompt_tensor = torch.tensor([ids], dtype=torch.long, device=device)
    new_ids: list[int] = []
    shown, text, stopped_by = 0, "", None
    for token in generate_ids(model, prompt_tensor, cfg):
        token_id = int(token[0])
        if token_id == tokenizer.eos_id:
            stopped_by = "<|endoftext|>"
            break
        new_ids.append(token_id)
        text = tokenizer.decode(new_ids)
        hit = _earliest_stop(text, cfg.stop)
        if hit:
            text, stopped_by = text[:hit[0]], hit[1]
            break
        end = _safe_prefix(text, cfg.stop)
        if end > shown:
            yield text[shown:end]
            shown = end
    if len(text) > shown:
        yield text[shown:]
    return Generation(text=text, token_ids=new_ids, replaced=replaced, stopped_by=stopped_by)


def generate(model, tokenizer, prompt: str, cfg: SamplingConfig | None = None,
             on_text: Callable[[str], None] | None = None, device: torch.device | str = "cpu") -> Generation:
    """Continue `prompt`; `on_text` receives the new text piece by piece as it is decoded."""
    pieces = stream(model, tokenizer, prompt, cfg, device)
    while True:
        try:
            piece = next(pieces)
        except StopIteration as finished:
            return finished.value
        if on_text is not None:
            on_text(piece)
