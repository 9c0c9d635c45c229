"""Verbatim-copy detection: the longest span of a generation that appears in the training text.

A suffix array over the training text's code points (built with numpy) answers each query with
binary searches; lengths and offsets are in characters.
"""
import numpy as np

from lmforge.errors import LmforgeError


def _suffix_array(codes: np.ndarray) -> np.ndarray:
    """Start offsets of all suffixes of `codes` in sorted order, by prefix doubling.

    After the round with step k, rank[i] orders suffixes by their first 2k symbols; a round is one
    numpy argsort of (rank[i], rank[i + k]) packed into an int64, so building takes about
    log2(longest repeated substring) sorts (about 10 for a novel, 1-2 s for 1.3 M characters).
    """
    n = len(codes)
    _, rank = np.unique(codes, return_inverse=True)
    rank = rank.astype(np.int64)
    order = np.argsort(rank, kind="stable")
    k = 1
    while k < n:
        # rank + 1 so that "past the end" (0) sorts before every real symbol.
        second = np.zeros(n, dtype=np.int64)
        second[:n - k] = rank[k:] + 1
        key = rank * (n + 1) + second
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[order] = np.concatenate(([0], np.cumsum(sorted_key[1:] != sorted_key[:-1])))
        rank = new_rank
        if rank.max() == n - 1:  # every suffix has its own rank: the order is final
            break
        k *= 2
    return order


def _common_prefix_len(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    i = 0
    while i < limit and a[i] == b[i]:
        i += 1
    return i


class CopyIndex:
    """Index of a training text for `longest_copy` queries; build once, query many times."""

    def __init__(self, train_text: str):
        if not train_text:
            raise LmforgeError("the training text is empty; build CopyIndex from the model's train text")
        self.text = train_text
        codes = np.frombuffer(train_text.encode("utf-32-le"), dtype=np.uint32)
        # A plain list: the binary search indexes it ~20 times per query position, and list
        # indexing is several times faster than indexing a numpy array from Python.
        self.suffixes = _suffix_array(codes).tolist()

    def _longest_match_at(self, query: str) -> int:
        """Length of the longest prefix of `query` that occurs somewhere in the training text."""
        text, suffixes = self.text, self.suffixes
        m = len(query)
        lo, hi = 0, len(suffixes)
        while lo < hi:  # first suffix whose m-character prefix is >= query
            mid = (lo + hi) // 2
            start = suffixes[mid]
            if text[start:start + m] < query:
                lo = mid + 1
            else:
                hi = mid
        # The suffix sharing the longest prefix with the query sits next to its insertion point.
        best = 0
        for pos in (lo - 1, lo):
            if 0 <= pos < len(suffixes):
                start = suffixes[pos]
                best = max(best, _common_prefix_len(query, text[start:start + m]))
        return best

    def longest_copy(self, generated: str) -> tuple[int, int]:
        """(length, start) of the longest substring of `generated` found verbatim in the training text.

        Length and start are in characters; start is an offset into `generated`. (0, 0) if nothing matches.
        """
        best_len, best_start = 0, 0
        for start in range(len(generated)):
            if len(generated) - start <= best_len:
                break  # no later start can beat the current best
            length = self._longest_match_at(generated[start:])
            if length > best_len:
                best_len, best_start = length, start
        return best_len, best_start


def copy_rate(generations: list[str], index: CopyIndex, threshold: int = 50) -> float:
    """Fraction of generations whose longest verbatim copy from the training text is >= threshold chars."""
    if not generations:
        raise LmforgeError("copy_rate got no generations; generate at least one sample first")
    copied = sum(index.longest_copy(g)[0] >= threshold for g in generations)
    return copied / len(generations)
