"""Training batches: random windows of the token array, a pure function of (seed, step).

In: a 1-D token array (np.memmap from prepare). Out: x, y int64 tensors (B, T), y = x shifted by one.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import LmforgeError


def batch_generator(seed: int, step: int) -> torch.Generator:
    """A generator seeded from (seed, step) alone, so a resumed run draws the same batches."""
    # SeedSequence mixes the pair well: (1, 0) and (0, 1) give unrelated streams
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def get_batch(tokens, batch_size: int, context_len: int, *, seed: int, step: int, device="cpu"):
    """(x, y), each (B, T) = (batch_size, context_len) int64 on `device`; y[:, t] is the token after x[:, t]."""
    n = len(tokens)
    if n <= context_len:
        raise LmforgeError(f"the training split has {n} tokens, fewer than context_len+1 = {context_len + 1}; "
                           "use more text or a smaller --context-len")
    starts = torch.randint(0, n - context_len, (batch_size,), generator=batch_generator(seed, step)).numpy()
    # one vectorized gather of (B, T + 1) windows instead of a Python loop over rows
    windows = np.asarray(tokens)[starts[:, None] + np.arange(context_len + 1)].astype(np.int64)
    window = torch.from_numpy(windows).to(device)  # (B, T + 1)
    return window[:, :-1], window[:, 1:]
