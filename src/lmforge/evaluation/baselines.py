"""Baselines a neural model must beat: unigram and Kneser-Ney n-gram models over integer token ids,
and general-purpose compressors, all reported in the same units (nats, bits per byte)."""
import bz2
import lzma
import zlib

import numpy as np

from lmforge.errors import LmforgeError


def _as_ids(ids, vocab_size: int) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise LmforgeError(
            f"token ids must lie in [0, {vocab_size}); got {arr.min()}..{arr.max()}; "
            "build the model with the tokenizer's vocab_size"
        )
    return arr


def _sample(model, context_ids, n: int, rng: np.random.Generator, temperature: float) -> list[int]:
    """n tokens drawn one at a time from model.logprobs, each appended to the context."""
    if temperature <= 0:
        raise LmforgeError(f"temperature must be > 0, got {temperature}")
    context = [int(t) for t in context_ids]
    out = []
    for _ in range(n):
        logits = model.logprobs(context) / temperature
        probs = np.exp(logits - logits.max())
        token = int(rng.choice(len(probs), p=probs / probs.sum()))
        context.append(token)
        out.append(token)
    return out


class UnigramModel:
    """p(token) from training counts with add-one (Laplace) smoothing, so unseen tokens keep mass."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.log_p = np.full(vocab_size, -np.log(vocab_size))

    def fit(self, train_ids) -> "UnigramModel":
        ids = _as_ids(train_ids, self.vocab_size)
        counts = np.bincount(ids, minlength=self.vocab_size)
        self.log_p = np.log((counts + 1.0) / (len(ids) + self.vocab_size))
        return self

    def logprobs(self, context_ids=()) -> np.ndarray:
        """(vocab_size,) natural-log probabilities of the next token; the context is ignored."""
        return self.log_p.copy()

    def score(self, ids) -> float:
        """Total negative log-likelihood of `ids` in nats."""
        return float(-self.log_p[_as_ids(ids, self.vocab_size)].sum())

    def sample(self, context_ids, n: int, rng: np.random.Generator, temperature: float = 1.0) -> list[int]:
        return _sample(self, context_ids, n, rng, temperature)


def _modified_discounts(counts: np.ndarray) -> np.ndarray:
    """[0, D1, D2, D3+] from the count-of-counts n1..n4 (Chen & Goodman 1998), clipped to [0, r]."""
    n = [np.count_nonzero(counts == r) for r in range(1, 5)]
    if min(n) == 0:  # too little data for the estimate: fall back to a common absolute discount
        return np.array([0.0, 0.5, 1.0, 1.5])
    y = n[0] / (n[0] + 2 * n[1])
    d = [r - (r + 1) * y * n[r] / n[r - 1] for r in (1, 2, 3)]
    return np.array([0.0] + [min(max(x, 0.0), r) for r, x in zip((1, 2, 3), d)])


class _Level:
    """The k-grams of one order: sorted keys (context_id * V + token) with discounted counts.

    The id of a k-gram is its index in `keys`; its context is a (k-1)-gram id of the level below,
    so a context of any length is found by k searchsorted steps. For each context, `totals` is
    the sum of its children's counts and `backoff` the mass the discounts freed (D1*N1 + D2*N2 + D3*N3+).
    """

    def __init__(self, keys: np.ndarray, counts: np.ndarray, n_contexts: int, vocab_size: int):
        self.keys = keys
        self.tokens = keys % vocab_size
        discounts = _modified_discounts(counts)
        discount = discounts[np.minimum(counts, 3).astype(np.int64)]
        self.discounted = np.maximum(counts - discount, 0.0)
        contexts = keys // vocab_size
        self.totals = np.bincount(contexts, weights=counts, minlength=n_contexts)
        self.backoff = np.bincount(contexts, weights=discount, minlength=n_contexts)
        # keys are sorted, hence grouped by context: children of context c are rows[c]:rows[c + 1].
        self.rows = np.searchsorted(contexts, np.arange(n_contexts + 1))
        self.discounts = discounts

    def find(self, context_ids: np.ndarray, tokens: np.ndarray, vocab_size: int) -> np.ndarray:
        """Ids of the k-grams (context, token), -1 where the context is -1 or the k-gram is unseen."""
        query = context_ids * vocab_size + tokens
        pos = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        found = (context_ids >= 0) & (self.keys[pos] == query)
        return np.where(found, pos, -1)


class KneserNeyModel:
    """Interpolated Kneser-Ney n-gram model with modified discounting (three discounts D1, D2, D3+
    per order, estimated from count-of-counts as in Chen & Goodman 1998).

    The highest order uses raw counts; lower orders use continuation counts (how many distinct
    tokens precede the n-gram); order 1 is interpolated with the uniform distribution over the
    vocabulary, so every token, seen or not, has non-zero probability. The training ids are one
    stream (no sentence boundaries). Contexts shorter than order - 1 (the first tokens of a text)
    use the lower-order distributions as they are.
    """

    def __init__(self, vocab_size: int, order: int = 5):
        if order < 1:
            raise LmforgeError(f"n-gram order must be at least 1, got order={order}")
        self.vocab_size = vocab_size
        self.order = order
        self.levels: list[_Level] = []

    def fit(self, train_ids) -> "KneserNeyModel":
        ids = _as_ids(train_ids, self.vocab_size)
        if len(ids) == 0:
            raise LmforgeError("cannot fit an n-gram model on an empty token sequence")
        V, n = self.vocab_size, len(ids)
        # gram_ids[i] = id of the k-gram ending at position i (-1 where i < k - 1); for k = 0 it is
        # the empty context, id 0 everywhere.
        gram_ids = np.zeros(n, dtype=np.int64)
        all_keys, first_seen, inverse_by_order = [], [], []
        for k in range(1, self.order + 1):
            valid = np.arange(k - 1, n)
            context = gram_ids[valid - 1] if k > 1 else np.zeros(len(valid), dtype=np.int64)
            keys, first, inverse = np.unique(context * V + ids[valid], return_index=True, return_inverse=True)
            gram_ids = np.full(n, -1, dtype=np.int64)
            gram_ids[valid] = inverse.reshape(-1)
            all_keys.append(keys)
            first_seen.append(valid[first])
            inverse_by_order.append(gram_ids)
            if len(valid) <= 1 and k < self.order:
                break  # the training text is shorter than the order
        self.levels = []
        n_contexts = 1
        for k, keys in enumerate(all_keys, start=1):
            if k == len(all_keys):
                counts = np.bincount(inverse_by_order[k - 1][k - 1:], minlength=len(keys))
            else:
                # Continuation count: distinct (k+1)-grams whose last k tokens are this k-gram.
                # The suffix of the (k+1)-gram first seen at position i is the k-gram ending at i.
                counts = np.bincount(inverse_by_order[k - 1][first_seen[k]], minlength=len(keys))
            self.levels.append(_Level(keys, counts.astype(np.float64), n_contexts, V))
            n_contexts = len(keys)
        return self

    def _check_fitted(self) -> None:
        if not self.levels:
            raise LmforgeError("the n-gram model is not fitted; call fit(train_ids) first")

    def logprobs(self, context_ids=()) -> np.ndarray:
        """(vocab_size,) natural-log probabilities of the next token after `context_ids`.

        Only the last order - 1 ids of the context matter.
        """
        self._check_fitted()
        V = self.vocab_size
        context = _as_ids(context_ids, V)
        context = context[max(0, len(context) - (self.order - 1)):]
        probs = np.full(V, 1.0 / V)
        context_id = 0  # the empty context
        for k, level in enumerate(self.levels, start=1):
            if k > 1:
                # Extend the context id by one token to the left: its (k-1)-gram id in level k - 1.
                if k - 1 > len(context):
                    break
                tail = context[len(context) - (k - 1):]
                context_id = self._gram_id(tail)
                if context_id < 0:
                    break
            total = level.totals[context_id]
            if total == 0:
                break  # the context was seen only at the very end of training: nothing follows it
            lo, hi = level.rows[context_id], level.rows[context_id + 1]
            probs = probs * (level.backoff[context_id] / total)
            probs[level.tokens[lo:hi]] += level.discounted[lo:hi] / total
        return np.log(probs)

    def _gram_id(self, tokens: np.ndarray) -> int:
        """Id of the n-gram `tokens` in level len(tokens), or -1 if it never occurred in training."""
        gram = np.zeros(1, dtype=np.int64)
        for k, token in enumerate(tokens, start=1):
            gram = self.levels[k - 1].find(gram, np.array([token]), self.vocab_size)
            if gram[0] < 0:
                return -1
        return int(gram[0])

    def token_logprobs(self, ids) -> np.ndarray:
        """(len(ids),) log p(ids[i] | up to order - 1 previous ids), computed for all i at once."""
        self._check_fitted()
        V = self.vocab_size
        ids = _as_ids(ids, V)
        n = len(ids)
        probs = np.full(n, 1.0 / V)
        # context_ids[i] = id of the (k-1)-gram ending at i - 1, the context of position i at level k.
        context_ids = np.zeros(n, dtype=np.int64)
        for k, level in enumerate(self.levels, start=1):
            if k > 1:
                prev = self.levels[k - 2]
                # The (k-1)-gram ending at i - 1 = (the (k-2)-gram ending at i - 2, ids[i - 1]).
                shifted = np.full(n, -1, dtype=np.int64)
                shifted[1:] = context_ids[:-1]
                tokens = np.zeros(n, dtype=np.int64)
                tokens[1:] = ids[:-1]
                context_ids = prev.find(shifted, tokens, V)
            has_context = context_ids >= 0
            safe = np.where(has_context, context_ids, 0)
            total = np.where(has_context, level.totals[safe], 0.0)
            grams = level.find(context_ids, ids, V)
            discounted = np.where(grams >= 0, level.discounted[np.maximum(grams, 0)], 0.0)
            use = total > 0
            denom = np.where(use, total, 1.0)
            updated = (discounted + level.backoff[safe] * probs) / denom
            probs = np.where(use, updated, probs)
        return np.log(probs)

    def score(self, ids) -> float:
        """Total negative log-likelihood of `ids` in nats; each token sees up to order - 1 previous ids."""
        return float(-self.token_logprobs(ids).sum())

    def sample(self, context_ids, n: int, rng: np.random.Generator, temperature: float = 1.0) -> list[int]:
        return _sample(self, context_ids, n, rng, temperature)


# Each compressor maps bytes -> compressed bytes at its strongest standard setting.
def _gzip(data: bytes) -> bytes:
    return zlib.compress(data, 9)


def _bzip2(data: bytes) -> bytes:
    return bz2.compress(data, 9)


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def _ppmd(data: bytes) -> bytes:
    try:
        import pyppmd  # imported lazily: only the report needs it
    except ImportError as e:
        raise LmforgeError("the ppmd baseline needs pyppmd; install it with `pip install pyppmd`") from e
    # Variant H is the PPMd of 7-Zip's .7z format (Ppmd7); order 8 with 256 MB never fills memory
    # on a few MB of text, so the model is never restarted.
    return pyppmd.compress(data, max_order=8, mem_size=256 << 20, variant="H")


COMPRESSORS = {"gzip": _gzip, "bzip2": _bzip2, "xz": _xz, "ppmd": _ppmd}


def compressor_bits_per_byte(train: bytes, text: bytes, method: str) -> float:
    """Bits per byte a compressor spends on `text` after having seen `train`:
    (len(C(train + text)) - len(C(train))) * 8 / len(text).

    Caveats: bzip2 compresses independent 900 kB blocks, so it only "remembers" the last part of a
    long train text; gzip's window is 32 kB. Both understate what the compressor could learn.
    """
    if method not in COMPRESSORS:
        raise LmforgeError(f"unknown compressor {method!r}; choose one of {', '.join(COMPRESSORS)}")
    if not text:
        raise LmforgeError("the text to compress is empty; bits per byte needs at least one byte")
    compress = COMPRESSORS[method]
    return (len(compress(train + text)) - len(compress(train))) * 8 / len(text)
