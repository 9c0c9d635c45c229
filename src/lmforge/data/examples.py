"""Labelled JSONL examples for fine-tuning: reading rows, train/val/test splits, the prompt template,
and the batches of prompt -> completion pairs and of classification examples.

In: a .jsonl file (one object per line) and a tokenizer. Out: rows as dicts with a "split", and
`Batches` for the training loop.
"""
from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..errors import LmforgeError
from .batches import IGNORE, Batches, batch_generator, shard
from .sources import is_jsonl, json_lines

SPLITS = ("train", "val", "test")
DEFAULT_TEMPLATE = "### Prompt:\n{prompt}\n### Completion:\n"


def read_jsonl(path, fields: tuple[str, ...], training: bool = True, option: str = "--data") -> list[dict]:
    """Rows of a JSONL file that hold the string `fields`; a row without "split" gets one by hashing
    its content (80% train, 10% val, 10% test), so the assignment is stable across runs. `training`:
    the file must hold training rows (not so for a file that is only scored); `option` names it in errors."""
    if str(path).startswith("gutenberg:"):
        raise LmforgeError(f"{option} {path} is a plain text; this task reads labelled rows: give a .jsonl file with "
                           f"{', '.join(repr(f) for f in fields)} in each line")
    path = Path(path).expanduser()
    if not path.exists():
        raise LmforgeError(f"{option} {path} does not exist; give the .jsonl file with one JSON object per line")
    if not is_jsonl(path) or not path.is_file():
        raise LmforgeError(f"{option} {path} is not a .jsonl file; give one JSON object per line with "
                           f"{', '.join(repr(f) for f in fields)}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is not a row
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path}: byte {exc.start} is not valid UTF-8; JSONL files must be UTF-8: re-encode it "
                           f"(iconv -f latin1 -t utf-8, say, for a Latin-1 file)") from None
    rows = []
    for number, row in json_lines(text, path):
        missing = [f for f in fields if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if missing and isinstance(row, dict) and row.get(missing[0]) is not None:
            value = row[missing[0]]
            raise LmforgeError(f"{path}:{number}: {missing[0]!r} is {json.dumps(value)[:40]}, not a string; write it "
                               f"in quotes (\"{missing[0]}\": {json.dumps(str(value))[:40]})")
        if missing:
            raise LmforgeError(f"{path}:{number}: no string field {missing[0]!r}; every row needs "
                               f"{', '.join(repr(f) for f in fields)}")
        if "text" in fields and not row["text"].strip():  # a classifier has nothing to read (an RNN cannot)
            raise LmforgeError(f"{path}:{number}: 'text' is empty; every row needs some text to classify")
        split = row.get("split") or hash_split(json.dumps([row[f] for f in fields]))
        if split not in SPLITS:
            raise LmforgeError(f"{path}:{number}: split {split!r} is not one of {', '.join(SPLITS)}")
        rows.append({**row, "split": split})
    if training and not any(r["split"] == "train" for r in rows):
        raise LmforgeError(f"{path} has no training rows; add rows with \"split\": \"train\" (or no split field)")
    if "completion" in fields and not any(r["completion"] for r in rows):
        raise LmforgeError(f"{path}: every 'completion' is empty; give the text each prompt should be answered with")
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


# ---- prompt -> completion pairs -------------------------------------------------------------------

def run_template(config: dict) -> str | None:
    """The prompt template of a run's config.json: a completion run's, or one an import brought along
    (from such a run's export)."""
    ft = config.get("finetune") or {}
    if ft.get("task") == "completion":
        return ft.get("template")
    return (config.get("imported") or {}).get("template")


def render(template: str, prompt: str) -> str:
    """The text a completion run sees for `prompt` (training and generation use the same template)."""
    if "{prompt}" not in template:
        raise LmforgeError(f"the prompt template {template!r} has no {{prompt}} placeholder; add one")
    return template.replace("{prompt}", prompt)


def encode_pair(tokenizer, template: str, prompt: str, completion: str,
                context_len: int) -> tuple[list[int], int, int | None]:
    """(ids, n_prompt, scored): template(prompt) tokens, then completion tokens and end-of-text, at
    most context_len + 1 ids; an over-long prompt loses its start, an over-long completion its end.
    `scored`: the UTF-8 bytes of the completion that the targets cover (all of them, or those of the
    tokens kept), or None when nothing was cut."""
    p = tokenizer.encode(render(template, prompt))
    c = tokenizer.encode(completion) + [tokenizer.eos_id]
    if len(p) + len(c) <= context_len + 1:
        return p + c, len(p), None
    p = p[-max(1, context_len // 2):]  # keep the prompt's end and room for the completion
    ids = (p + c)[:context_len + 1]
    kept = len(ids) - len(p)
    scored = len(completion.encode("utf-8")) if kept == len(c) else len(tokenizer.decode(c[:kept]).encode("utf-8"))
    return ids, len(p), scored


def inputs_targets(ids: list[int], n_prompt: int) -> tuple[list[int], list[int]]:
    """x = ids[:-1], y = ids[1:] with every target inside the prompt set to IGNORE."""
    return ids[:-1], [IGNORE if i + 1 < n_prompt else t for i, t in enumerate(ids[1:])]


def _example_batches(train: list, val: list, collate, batch_size: int, seed: int, tokens_per_batch: int,
                     val_tokens_per_byte: float, description: str) -> Batches:
    draw = sampler(len(train), batch_size, seed)

    def sample(index: int, rank: int = 0, world: int = 1):
        return collate([train[i] for i in draw(index)[shard(batch_size, rank, world)]])

    val_batches = [collate(val[i:i + batch_size]) for i in range(0, len(val), batch_size)]
    return Batches(sample, val_batches, val_tokens_per_byte, tokens_per_batch, description)


def count_targets(pairs: list[tuple[list[int], list[int]]]) -> int:
    """The scored positions of (x, y) pairs: the targets that are not IGNORE."""
    return sum(sum(t != IGNORE for t in y) for _, y in pairs)


def collate_pairs(items: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) pairs of unequal lengths as one padded batch (targets padded with IGNORE)."""
    return pad([x for x, _ in items], pad_id), pad([y for _, y in items], IGNORE)


def completion_batches(pairs: dict, val_bytes: int, pad_id: int, context_len: int, batch_size: int,
                       seed: int) -> Batches:
    """Batches of prompt -> completion pairs (`pairs` maps split -> [(ids, n_prompt)]); the loss is on
    completion tokens only. Validation bits per byte: loss per completion target (end-of-text
    included) over the completions' UTF-8 bytes."""
    train = [inputs_targets(*e) for e in pairs["train"]]
    val = [inputs_targets(*e) for e in pairs["val"]]

    return _example_batches(train, val, partial(collate_pairs, pad_id=pad_id), batch_size, seed,
                            batch_size * context_len, count_targets(val) / max(1, val_bytes),
                            f"{len(train):,} train / {len(val):,} val prompt -> completion pairs")


def classification_batches(examples: dict, pad_id: int, batch_size: int, seed: int) -> Batches:
    """Batches of (ids, label index) examples (`examples` maps split -> list). The loop's "val_bpb"
    is then the validation loss in bits per example."""
    train, val = examples["train"], examples["val"] or examples["train"][:batch_size]

    def collate(items):
        return pad([ids for ids, _ in items], pad_id), torch.tensor([c for _, c in items])

    mean_length = sum(len(ids) for ids, _ in train) / max(1, len(train))
    return _example_batches(train, val, collate, batch_size, seed, round(batch_size * mean_length), 1.0,
                            f"{len(train):,} train / {len(val):,} val labelled examples")
