"""Tokenize a corpus once: sources -> per-document train/val split -> train.bin, val.bin, meta.json.

The result lives in a cache folder keyed by (source contents, split, tokenizer), so preparing the
same corpus again only opens the files. Out: a Prepared with memory-mapped token arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import absolute_sources
from ..errors import LmforgeError
from ..tokenizers import load_tokenizer, resolve_options, train_tokenizer
from .sources import Document, read_sources

FORMAT_VERSION = 1
SPLIT_RULE = "per document: characters [0, int(len * (1 - val_fraction))) train, the rest validation"


@dataclass
class ValDocument:
    """One document's validation part: what per-document evaluation and bits per byte need."""
    name: str
    text: str
    chars: int
    bytes: int  # UTF-8
    tokens: tuple[int, int]  # [start, end) in val.bin


@dataclass
class Prepared:
    path: Path
    train: np.ndarray  # (N,) uint16/uint32 memmap; documents joined by eos_id
    val: np.ndarray
    tokenizer: object
    meta: dict
    documents: list[ValDocument]
    val_text: str  # every document's validation part, concatenated without separators
    unknown: dict[str, int]  # pieces the tokenizer could not represent -> count (train and val)
    reused: bool

    @property
    def train_text(self) -> str:
        """Every document's training part, concatenated (read from the cache when asked for)."""
        return read_exact(self.path / "train.txt")

    @property
    def text_digest(self) -> str:
        """A digest of the text itself, training and validation parts (not of where it came from)."""
        h = hashlib.sha256((self.path / "train.txt").read_bytes())
        h.update(b"\0" + self.val_text.encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:32]

    def validation_documents(self) -> list[tuple[str, str]]:
        """(name, validation text) per document: what evaluation scores."""
        return [(d.name, d.text) for d in self.documents]


def prepare(sources, *, tokenizer: str = "bpe", tokenizer_options: dict | None = None,
            val_fraction: float = 0.1, cache_dir=None, jsonl_field: str = "text", encoding: str = "utf-8",
            errors: str = "strict", tokenizer_obj=None) -> Prepared:
    """Split, tokenize and cache `sources`, or reuse the cache folder of an identical earlier call.

    Each document is split by characters: the first int(len(text) * (1 - val_fraction)) train, the
    rest validate (Austen at 0.1: int(len(text) * 0.9) per book). The tokenizer is trained on the
    train parts, unless `tokenizer_obj` is given (fine-tuning encodes new text with a base model's).
    The tokenizer defaults to BPE, as for `lmforge prepare` and `train`, so they share one cache.
    """
    number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not (number and 0.0 < val_fraction < 1.0):
        raise LmforgeError(f"val_fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}; "
                           f"try 0.1")
    if tokenizer_options is not None and not isinstance(tokenizer_options, dict):
        raise LmforgeError(f"tokenizer_options must be a dict such as {{'vocab_size': 4096}}, "
                           f"got {tokenizer_options!r}")
    if errors not in ("strict", "replace", "ignore"):
        raise LmforgeError(f"errors must be strict, replace or ignore, got {errors!r}")
    if tokenizer_obj is None:
        kind, options, base = tokenizer, resolve_options(tokenizer, tokenizer_options), None
    else:
        kind, options, base = tokenizer_obj.kind, tokenizer_obj.options, tokenizer_obj.fingerprint()
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if isinstance(sources, (list, tuple)):  # named as `train` names them: the same cache folder
        sources = absolute_sources(sources)
    documents = read_sources(sources, jsonl_field=jsonl_field, encoding=encoding, errors=errors)
    root = cache_root(cache_dir)
    if tokenizer_obj is not None:
        # A run's own tokenizer was trained on this very corpus: its cache folder is the trained one.
        trained = root / cache_key(documents, val_fraction, kind, options, None)
        if _fingerprint(trained) == base:
            try:
                return open_prepared(trained, tokenizer_obj, reused=True)
            except DamagedCache:  # encoded again below, with the run's tokenizer
                shutil.rmtree(trained, ignore_errors=True)
    folder = root / cache_key(documents, val_fraction, kind, options, base)
    if (folder / "meta.json").exists():
        try:
            return open_prepared(folder, tokenizer_obj, reused=True)
        except DamagedCache:  # a cache holds nothing that cannot be made again: make it again
            shutil.rmtree(folder, ignore_errors=True)
    build(folder, documents, sources, val_fraction, kind, options, tokenizer_obj)
    return open_prepared(folder, tokenizer_obj, reused=False)


def prepare_data(config, tokenizer=None) -> Prepared:
    """A RunConfig's data, split and tokenized (from the cache when it was done before); with a
    `tokenizer` (a run's own, a fine-tuning base's) the text is encoded with it instead of a new one."""
    d = config.data
    return prepare(d.sources, tokenizer=config.tokenizer.kind, tokenizer_options=config.tokenizer.options,
                   val_fraction=d.val_fraction, cache_dir=d.cache_dir, jsonl_field=d.jsonl_field,
                   encoding=d.encoding, errors=d.errors, tokenizer_obj=tokenizer)


def _fingerprint(folder: Path) -> str | None:
    """The tokenizer fingerprint a prepared folder records, or None when there is no readable one."""
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))["tokenizer"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cache_root(cache_dir) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge"
    return Path(cache_dir).expanduser()


def cache_key(documents: list[Document], val_fraction: float, kind: str, options: dict, base) -> str:
    """sha256 of everything the prepared files depend on."""
    h = hashlib.sha256()
    settings = {"format_version": FORMAT_VERSION, "val_fraction": val_fraction, "kind": kind,
                "options": options, "base_tokenizer": base}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for doc in documents:
        for part in (doc.name.encode(), doc.text.encode("utf-8", "surrogatepass")):
            h.update(len(part).to_bytes(8, "little"))  # lengths keep ("ab", "c") apart from ("a", "bc")
            h.update(part)
    return h.hexdigest()[:32]


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def build(folder: Path, documents, sources, val_fraction, kind, options, tokenizer_obj) -> None:
    """Write the prepared files into a temporary folder, then rename it to `folder` in one step,
    so an interrupted prepare never leaves a half-written cache behind."""
    parts = [split_text(d.text, val_fraction) for d in documents]
    train_texts, val_texts = [p[0] for p in parts], [p[1] for p in parts]
    tok = tokenizer_obj or train_tokenizer(kind, train_texts, **options)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    train, train_spans = join_documents([tok.encode(t) for t in train_texts], tok.eos_id, dtype)
    val, val_spans = join_documents([tok.encode(t) for t in val_texts], tok.eos_id, dtype)
    unknown = Counter()
    for text in train_texts + val_texts:
        unknown.update(tok.unknown(text))

    meta = {
        "format_version": FORMAT_VERSION, "key": folder.name, "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "train_tokens": len(train), "val_tokens": len(val),
        "val_fraction": val_fraction, "split": SPLIT_RULE,
        "sources": [str(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)],
        "tokenizer": {"kind": kind, "options": options, "fingerprint": tok.fingerprint(),
                      "trained": tokenizer_obj is None},
        "documents": document_meta(documents, train_texts, val_texts, train_spans, val_spans),
        "unknown": dict(unknown.most_common()),
    }
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    _remove_abandoned(folder.parent)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise LmforgeError(f"cannot write the data cache {folder.parent}: {exc.strerror or exc}; set LMFORGE_CACHE "
                           f"(or data.cache_dir) to a writable folder") from None
    try:
        train.tofile(tmp / "train.bin")
        val.tofile(tmp / "val.bin")
        tok.save(tmp)
        # newline="" keeps the text byte-exact (bits per byte is measured against it)
        (tmp / "train.txt").write_text("".join(train_texts), encoding="utf-8", newline="")
        (tmp / "val.txt").write_text("".join(val_texts), encoding="utf-8", newline="")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").exists():  # not just a concurrent prepare that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


ABANDONED_AFTER_S = 24 * 3600  # a temporary folder this old belongs to a prepare that was killed


def _remove_abandoned(root: Path) -> None:
    """Delete the temporary folders of prepares killed before they finished (a finished one renames
    its folder; one still running has touched its folder within the day)."""
    try:
        for tmp in root.glob(".tmp-*"):
            if time.time() - tmp.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def join_documents(encoded: list[list[int]], eos_id: int, dtype) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Concatenate documents with eos_id between them; also each document's [start, end) span."""
    pieces, spans, start = [], [], 0
    for i, ids in enumerate(encoded):
        if i:
            pieces.append(np.array([eos_id], dtype=dtype))
            start += 1
        pieces.append(np.array(ids, dtype=dtype))
        spans.append((start, start + len(ids)))
        start += len(ids)
    return np.concatenate(pieces), spans


def document_meta(documents, train_texts, val_texts, train_spans, val_spans) -> list[dict]:
    out, train_at, val_at = [], 0, 0
    for doc, train_text, val_text, train_span, val_span in zip(documents, train_texts, val_texts,
                                                               train_spans, val_spans):
        out.append({
            "name": doc.name, "chars": len(doc.text),
            "train_chars": len(train_text), "val_chars": len(val_text),
            "val_bytes": len(val_text.encode("utf-8")),
            "train_tokens": list(train_span), "val_tokens": list(val_span),
            # character offsets of this document's parts inside train.txt / val.txt
            "train_text": [train_at, train_at + len(train_text)], "val_text": [val_at, val_at + len(val_text)],
        })
        train_at += len(train_text)
        val_at += len(val_text)
    return out


class DamagedCache(LmforgeError):
    """A prepared folder whose token files do not match what it recorded (truncated, half copied)."""


def open_prepared(path, tokenizer=None, *, reused: bool = True) -> Prepared:
    """Open a prepared folder. A given `tokenizer` must be the one the folder was encoded with."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LmforgeError(f"{path} is not a prepared data folder ({exc}); re-run `lmforge prepare`") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise LmforgeError(f"{path} was prepared by another lmforge version (format "
                           f"{meta.get('format_version')}, need {FORMAT_VERSION}); re-run `lmforge prepare`")
    tokenizer = tokenizer or load_tokenizer(path)
    if tokenizer.fingerprint() != meta["tokenizer"]["fingerprint"]:
        raise LmforgeError(f"the tokenizer does not match the one {path} was encoded with; "
                           "re-run `lmforge prepare` with it")
    try:
        train, val = open_tokens(path / "train.bin", meta["dtype"]), open_tokens(path / "val.bin", meta["dtype"])
        val_text = read_exact(path / "val.txt")
    except (OSError, ValueError) as exc:
        raise DamagedCache(f"{path} is damaged ({exc}); delete it and prepare again") from None
    if (len(train), len(val)) != (meta["train_tokens"], meta["val_tokens"]):
        raise DamagedCache(f"{path} is damaged: it holds {len(train):,} + {len(val):,} tokens where it recorded "
                           f"{meta['train_tokens']:,} + {meta['val_tokens']:,}; delete it and prepare again")
    documents = [ValDocument(d["name"], val_text[slice(*d["val_text"])], d["val_chars"], d["val_bytes"],
                             tuple(d["val_tokens"])) for d in meta["documents"]]
    return Prepared(path=path, train=train, val=val, tokenizer=tokenizer, meta=meta,
                    documents=documents, val_text=val_text, unknown=meta["unknown"], reused=reused)


def read_exact(path: Path) -> str:
    """The file's text with its newlines untouched."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def open_tokens(path: Path, dtype: str) -> np.ndarray:
    # np.memmap cannot map an empty file (a split can be empty when a document is one character)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
