"""Labelled JSONL examples for fine-tuning: reading rows, assigning train/val/test, padded batches.

In: a .jsonl file (one object per line). Out: rows as dicts with a "split", and (x, y) batch tensors.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..data.batches import batch_generator
from ..data.sources import json_lines
from ..errors import LmforgeError

SPLITS = ("train", "val", "test")


def read_jsonl(path, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file that hold the string `fields`; a row without "split" gets one by hashing
    its content (80% train, 10% val, 10% test), so the assignment is stable across runs."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        raise LmforgeError(f"--data {path} is not a .jsonl file; give one JSON object per line with "
                           f"{', '.join(repr(f) for f in fields)}")
    rows = []
    for number, row in json_lines(path.read_text(encoding="utf-8"), path):
        missing = [f for f in fields if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if missing:
            raise LmforgeError(f"{path}:{number}: no string field {missing[0]!r}; every row needs "
                               f"{', '.join(repr(f) for f in fields)}")
        split = row.get("split") or hash_split(json.dumps([row[f] for f in fields]))
        if split not in SPLITS:
            raise LmforgeError(f"{path}:{number}: split {split!r} is not one of {', '.join(SPLITS)}")
        rows.append({**row, "split": split})
    if not any(r["split"] == "train" for r in rows):
        raise LmforgeError(f"{path} has no training rows; add rows with \"split\": \"train\" (or no split field)")
    return rows


def hash_split(key: str) -> str:
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "val" if bucket == 8 else "test" if bucket == 9 else "train"


def held_out(rows: list[dict]) -> list[dict]:
    """The rows to report on: the test split if there is one, else val."""
    test = [r for r in rows if r["split"] == "test"]
    return test or [r for r in rows if r["split"] == "val"]


def pad(sequences: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = length or max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.int64)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.tensor(s[:length], dtype=torch.int64)
    return out


def sampler(n: int, batch_size: int, seed: int):
    """index -> `batch_size` example indices drawn with a generator seeded by (seed, index), as get_batch does."""
    if n == 0:
        raise LmforgeError("no training examples; add rows to the training split")

    def draw(index: int) -> np.ndarray:
        return torch.randint(0, n, (batch_size,), generator=batch_generator(seed, index)).numpy()
    return draw
