"""Choosing the next token from logits: greedy, temperature, top-k and top-p.

In: (B, V) logits and each row's settings and random generator. Out: (B,) token ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import is_number
from ..errors import LmforgeError


# Temperatures below this sample as greedy: the float32 logits' own rounding (about 1e-6 at 10) is then
# larger than the differences sampling could still see, and dividing by 1e-300 would overflow.
GREEDY_BELOW = 1e-6


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
            return is_number(value, integer) and math.isfinite(value)

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
             f"seed must be a whole number from 0 to 2**64 - 1, got {self.seed!r}"),
            (isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop),
             f"stop must be a list of strings, got {self.stop!r}"),
            (isinstance(self.token_healing, bool), f"token_healing must be true or false, got {self.token_healing!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def repeatable(self) -> bool:
        """Whether the same request should give the same text every time: seeded, or greedy."""
        return self.seed is not None or self.greedy or self.top_k == 1


NUCLEUS_FIRST_LOOK = 256  # top-p alone: the likeliest tokens examined before sorting the whole vocabulary


def candidates(logits: torch.Tensor, cfg: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, V) logits -> (probs, ids): the probabilities of the tokens each row may draw, after
    temperature, top-k and top-p, as (B, n) with ids (B, n) naming them, or ids None when n = V and
    column i is token i. Top-k works on the k likeliest tokens only, sorted, and top-p on the sorted
    probabilities after it; top-p alone first looks at the 256 likeliest tokens and sorts the whole
    vocabulary only for rows whose nucleus is larger (a 4096-token sort costs several times more)."""
    logits = logits.float()
    V = logits.size(-1)
    top_p = cfg.top_p if cfg.top_p is not None and cfg.top_p < 1.0 else None
    if cfg.top_k is not None and cfg.top_k < V:  # chosen before the temperature, which a huge one would flatten
        values, ids = torch.topk(logits, cfg.top_k, dim=-1)  # sorted, the likeliest first
        probs = torch.softmax(values / cfg.temperature, dim=-1)
    elif top_p is not None:
        logits = logits / cfg.temperature
        probs = torch.softmax(logits, dim=-1)
        if V > NUCLEUS_FIRST_LOOK:
            first, ids = torch.topk(probs, NUCLEUS_FIRST_LOOK, dim=-1)
            if bool((first.cumsum(-1)[:, -1] - first[:, -1] >= top_p).all()):  # every nucleus ends within them
                probs = first  # (the mass before the last, summed as the cut below sums it)
        if probs.size(-1) == V:
            probs, ids = torch.sort(probs, dim=-1, descending=True)
    else:
        return torch.softmax(logits / cfg.temperature, dim=-1), None
    if top_p is not None:
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False  # also when top_p rounds to 0 in float32
        probs = probs.masked_fill(drop, 0.0)
    return probs, ids


def choose(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B, n) probabilities (not necessarily summing to 1) and (B, 1) uniforms from `uniforms()` ->
    (B,) columns, column i with probability p_i: the first column whose running sum passes u · Σp.
    One random number per row: drawing one per token (an exponential race) cost 100 µs a row at
    4,096 tokens. A column with p = 0 adds nothing to the sum, so it is never the first to pass it;
    and u < 1 - 2⁻⁵² makes u · Σp round to below Σp, so some column always passes it."""
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    columns = torch.searchsorted(cdf, uniforms.mul_(cdf[:, -1:]), right=True).squeeze(1)
    return columns.clamp_max_(probs.size(-1) - 1)  # a column even from NaN logits (a broken model's)


def uniforms(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(n, 1) float64 numbers uniform in [0, 1 - 2⁻⁵²], for `choose`."""
    return torch.empty(n, 1, dtype=torch.float64, device=device).uniform_(0.0, 1.0 - 2 ** -52, generator=generator)


def _draw(logits: torch.Tensor, cfg: SamplingConfig, u: torch.Tensor) -> torch.Tensor:
    probs, ids = candidates(logits, cfg)
    columns = choose(probs, u)
    return columns if ids is None else ids.gather(1, columns[:, None]).squeeze(1)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, every row with the same settings and one generator."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    return _draw(logits, cfg, uniforms(logits.size(0), generator, logits.device))


def sample_rows(logits: torch.Tensor, configs: list[SamplingConfig],
                generators: list[torch.Generator | None]) -> list[int]:
    """(B, V) logits -> B token ids, row i with configs[i] and generators[i]. Rows that share settings
    are filtered together; each row draws its random number from its own generator, so given the same
    logits a seeded request draws the same tokens whatever else is in the batch (and the same as
    sample_next at batch 1)."""
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
            if all(generators[i] is None for i in rows):  # unseeded rows: one call
                u = uniforms(len(rows), None, logits.device)
            else:
                u = torch.cat([uniforms(1, generators[i], logits.device) for i in rows])
            ids = _draw(part, cfg, u)
        for i, token in zip(rows, ids.tolist()):
            out[i] = token
    return out
