"""Choosing the next token from logits: greedy, temperature, top-k and top-p.

In: (B, V) logits and each row's settings and random generator. Out: (B,) token ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LmforgeError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past the end-of-text token (fixed-length benchmarks)
    token_healing: bool = True  # regenerate the prompt's last token (see healing.py); False feeds it as is

    def __post_init__(self):
        def number(value, integer=False) -> bool:
            kinds = (int,) if integer else (int, float)
            return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)

        checks = [
            (number(self.max_new_tokens, True) and self.max_new_tokens >= 0,
             f"max_new_tokens must be a whole number >= 0, got {self.max_new_tokens!r}"),
            (number(self.temperature) and self.temperature >= 0,
             f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}"),
            (self.top_k is None or (number(self.top_k, True) and self.top_k >= 1),
             f"top_k must be a whole number >= 1, got {self.top_k!r}"),
            (self.top_p is None or (number(self.top_p) and 0.0 < self.top_p <= 1.0),
             f"top_p must be in (0, 1], got {self.top_p!r}"),
            (self.seed is None or (number(self.seed, True) and 0 <= self.seed < 2**64),
             f"seed must be a whole number >= 0, got {self.seed!r}"),
            (isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop),
             f"stop must be a list of strings, got {self.stop!r}"),
            (isinstance(self.token_healing, bool), f"token_healing must be true or false, got {self.token_healing!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and top-p."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= cfg.top_p
        drop[..., 0] = False  # also when top_p rounds to 0 in float32
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """An exponential race: argmax of p_i / E_i with E_i ~ Exp(1) is token i with probability p_i. It is
    one draw per token like torch.multinomial, at half its fixed cost (which shows in every step). E is
    kept above 0, so a token with p = 0 can never win."""
    return probs.div_(noise.clamp_min_(torch.finfo(probs.dtype).tiny)).argmax(dim=-1)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, every row with the same settings and one generator."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, cfg)
    return race(probs, torch.empty_like(probs).exponential_(generator=generator))


def sample_rows(logits: torch.Tensor, configs: list[SamplingConfig],
                generators: list[torch.Generator | None]) -> list[int]:
    """(B, V) logits -> B token ids, row i with configs[i] and generators[i]. Rows that share settings
    are filtered together; each row draws its noise from its own generator, so a seeded request
    gives the same tokens whatever else is in the batch (and the same as sample_next at batch 1)."""
    out = [0] * logits.size(0)
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault((cfg.temperature, cfg.top_k, cfg.top_p), []).append(i)
    for rows, cfg in ((rows, configs[rows[0]]) for rows in groups.values()):
        index = torch.tensor(rows, device=logits.device) if len(rows) < logits.size(0) else None
        part = logits if index is None else logits.index_select(0, index)
        if cfg.greedy:
            ids = part.argmax(dim=-1)
        else:
            probs = filtered_probs(part, cfg)
            noise = torch.empty_like(probs)
            for j, i in enumerate(rows):
                noise[j].exponential_(generator=generators[i])
            ids = race(probs, noise)
        for i, token in zip(rows, ids.tolist()):
            out[i] = token
    return out
