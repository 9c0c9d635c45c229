"""Training batches: windows of the token array (shuffled passes, or random starts), each a pure
function of (seed, step).

In: a 1-D token array (np.memmap from prepare). Out: `Batches`, what the training loop draws from:
x, y int64 CPU tensors (B, T), y = x shifted by one, and fixed validation windows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import LmforgeError

IGNORE = -100  # a target the loss skips (prompt tokens of a completion, padding)


@dataclass
class Batches:
    """Where a run's batches come from. `sample(index, rank, world)` is micro-batch `index` (a pure
    function of it, so a resumed run draws exactly the same ones); with several processes, rank r of
    `world` gets its own share of the rows. `val` are fixed validation batches; `val_tokens_per_byte`
    turns a validation loss per target into bits per byte (loss · tokens per byte / ln 2)."""
    sample: Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]
    val: list[tuple[torch.Tensor, torch.Tensor]]
    val_tokens_per_byte: float
    tokens_per_batch: int  # input positions in one micro-batch, all ranks together
    description: str  # what the data is, for the log line


def batch_generator(seed: int, step: int) -> torch.Generator:
    """A generator seeded from (seed, step) alone, so a resumed run draws the same batches."""
    # SeedSequence mixes the pair well: (1, 0) and (0, 1) give unrelated streams
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def shard(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous share of n rows (the first n % world ranks take one more)."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (rank < extra))


def check_split(n: int, context_len: int) -> None:
    """Fail in one line when a training split of n tokens holds no whole window."""
    if n <= context_len:
        raise LmforgeError(f"the training split has {n} tokens, fewer than context_len + 1 = {context_len + 1}; "
                           "give more text or a smaller model.context_len")


def windows_at(tokens, starts: np.ndarray, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for windows of context_len + 1 tokens at `starts`: one vectorized gather, no Python loop."""
    windows = torch.from_numpy(np.asarray(tokens)[starts[:, None] + np.arange(context_len + 1)].astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def get_batch(tokens, batch_size: int, context_len: int, *, seed: int, step: int, rank: int = 0, world: int = 1):
    """(x, y), each (B, T) = (rows of this rank, context_len) int64 on the CPU; y[:, t] is the token
    after x[:, t]. All ranks draw the same batch_size window starts and keep their own share."""
    check_split(len(tokens), context_len)
    starts = torch.randint(0, len(tokens) - context_len, (batch_size,), generator=batch_generator(seed, step)).numpy()
    return windows_at(tokens, starts[shard(batch_size, rank, world)], context_len)


def windows_per_pass(n: int, context_len: int) -> int:
    """Non-overlapping windows of context_len + 1 tokens that fit n tokens from any offset below context_len."""
    return max(1, (n - context_len) // context_len)


def epoch_windows(n: int, context_len: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s window starts over a split of n tokens: non-overlapping windows of
    context_len + 1 tokens from a random offset (below context_len, and within the split), in a random order, both drawn
    from (seed, epoch) alone. Every epoch holds windows_per_pass(n, context_len) of them."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x65706F63]))
    count = windows_per_pass(n, context_len)
    # below context_len, and below n - context_len when a split under two windows holds just the one
    offset = int(rng.integers(0, min(context_len, n - context_len * count)))
    return offset + context_len * rng.permutation(count)


def get_epoch_batch(tokens, batch_size: int, context_len: int, *, seed: int, step: int, rank: int = 0, world: int = 1):
    """As get_batch, but batch `step` takes the next batch_size windows of a sequence of passes, each a
    shuffled tiling of the split (`epoch_windows`): every token is read once per pass, where random
    starts read some several times and miss others. Still a pure function of (seed, step)."""
    n = len(tokens)
    check_split(n, context_len)
    epoch, position = divmod(step * batch_size, windows_per_pass(n, context_len))
    starts = []
    while len(starts) < batch_size:  # a batch may run over into the next pass
        windows = epoch_windows(n, context_len, seed, epoch)
        starts.extend(windows[position:position + batch_size - len(starts)].tolist())
        epoch, position = epoch + 1, 0
    return windows_at(tokens, np.asarray(starts, dtype=np.int64)[shard(batch_size, rank, world)], context_len)


def fixed_windows(tokens: np.ndarray, context_len: int, n_batches: int, batch: int) -> list:
    """Evenly spaced validation windows, the same every evaluation (a cheap running estimate)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < 2:
        return []
    length = min(context_len, len(tokens) - 1)
    starts = np.linspace(0, len(tokens) - length - 1, num=min(n_batches * batch, len(tokens) - length)).astype(np.int64)
    rows = torch.from_numpy(np.stack([tokens[s:s + length + 1] for s in np.unique(starts)]))
    return [(chunk[:, :-1], chunk[:, 1:]) for chunk in rows.split(batch)]


def lm_batches(prepared, context_len: int, batch_size: int, seed: int, eval_batches: int,
               sampling: str = "epochs") -> Batches:
    """Windows of the prepared training tokens (`sampling`: "random" starts, or "epochs", shuffled passes
    over the split), and evenly spaced validation windows."""
    check_split(len(prepared.train), context_len)
    draw = get_epoch_batch if sampling == "epochs" else get_batch

    def sample(index: int, rank: int = 0, world: int = 1):
        return draw(prepared.train, batch_size, context_len, seed=seed, step=index, rank=rank, world=world)

    val_bytes = max(1, sum(d.bytes for d in prepared.documents))
    val = fixed_windows(prepared.val, context_len, eval_batches, batch_size)
    if not val:  # nothing to score: every evaluation would read 0 and keep the first weights as the best
        raise LmforgeError(f"the validation split has {len(prepared.val)} token(s), too few to score; raise "
                           f"data.val_fraction (now {prepared.meta['val_fraction']}) or give more text")
    return Batches(sample, val,
                   len(prepared.val) / val_bytes, batch_size * context_len,
                   f"{len(prepared.train):,} train / {len(prepared.val):,} val tokens")
