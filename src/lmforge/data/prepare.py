"""Tokenize a corpus once: sources -> per-document train/val split -> train.bin, val.bin, meta.json.

The result lives in a cache folder keyed by (source contents, split, tokenizer), so preparing the
same corpus again only opens the files. Out: a Prepared with memory-mapped token arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import absolute_sources, is_number
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
    if not (is_number(val_fraction) and 0.0 < val_fraction < 1.0):
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


def split_point(text: str, val_fraction: float) -> int:
    """Where a document's validation part begins (SPLIT_RULE)."""
    return int(len(text) * (1.0 - val_fraction))


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    cut = split_point(text, val_fraction)
    return text[:cut], text[cut:]


PIECE_CHARS = 1 << 22  # text is encoded and written this much at a time, so memory stays near the text's size
LOUD_CHARS = 32 << 20  # preparing a text this long takes long enough to report its progress


def build(folder: Path, documents, sources, val_fraction, kind, options, tokenizer_obj) -> None:
    """Write the prepared files into a temporary folder, then rename it to `folder` in one step,
    so an interrupted prepare never leaves a half-written cache behind. Each document is cut at
    line ends into pieces of about PIECE_CHARS, which every tokenizer encodes as it would the whole
    (tests/test_data.py checks it), and each piece's ids go straight to the token file, not into a
    Python int per token: a 245 MB corpus took 1.2-1.3 GB of memory, where it took 3.7-7.0 GB."""
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    _remove_abandoned(folder.parent)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        blocker = next((p for p in (folder.parent, *folder.parent.parents) if p.is_file()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else exc.strerror or exc
        raise LmforgeError(f"cannot write the data cache {folder.parent}: {why}; set LMFORGE_CACHE "
                           f"(or data.cache_dir) to a writable folder") from None
    cuts = [split_point(d.text, val_fraction) for d in documents]
    total = sum(len(d.text) for d in documents)
    say = _progress(total, tokenizer_obj.kind if tokenizer_obj else kind, tokenizer_obj is None)
    try:
        tok = tokenizer_obj or train_tokenizer(kind, (piece for d, cut in zip(documents, cuts)
                                                      for piece in _pieces(d.text[:cut])), **options)
        dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
        unknown = Counter()
        spans = {}
        for split, part in (("train", lambda d, cut: d.text[:cut]), ("val", lambda d, cut: d.text[cut:])):
            with open(tmp / f"{split}.bin", "wb") as ids_file, \
                    open(tmp / f"{split}.txt", "w", encoding="utf-8", newline="") as text_file:
                # newline="" keeps the text byte-exact (bits per byte is measured against it)
                spans[split] = _encode_to(tok, (part(d, cut) for d, cut in zip(documents, cuts)), dtype,
                                          ids_file, text_file, unknown, say)
        meta = {
            "format_version": FORMAT_VERSION, "key": folder.name, "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "train_tokens": spans["train"][-1][1] if spans["train"] else 0,
            "val_tokens": spans["val"][-1][1] if spans["val"] else 0,
            "val_fraction": val_fraction, "split": SPLIT_RULE,
            "sources": [str(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)],
            "tokenizer": {"kind": kind, "options": options, "fingerprint": tok.fingerprint(),
                          "trained": tokenizer_obj is None},
            "documents": document_meta(documents, cuts, spans["train"], spans["val"]),
            "unknown": dict(_shortened(unknown).most_common()),
        }
        tok.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").exists():  # not just a concurrent prepare that finished first
                raise
    except OSError as exc:  # a full disk, most often (numpy's write says only how many bytes it wrote)
        free = shutil.disk_usage(folder.parent).free if folder.parent.is_dir() else None
        room = f", {free / 2**20:,.0f} MiB free there" if free is not None else ""
        raise LmforgeError(f"cannot write the data cache {folder.parent} ({exc.strerror or exc}{room}); free some "
                           f"space, or set LMFORGE_CACHE (or data.cache_dir) to a folder with room") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _shortened(unknown: Counter, most: int = 60) -> Counter:
    """The unknown pieces with any longer than `most` characters cut short (a word tokenizer's <unk>
    can be a whole line of a text without spaces), their counts added where they meet."""
    out = Counter()
    for piece, n in unknown.items():
        out[piece if len(piece) <= most else piece[:most - 1] + "…"] += n
    return out


def unknown_examples(unknown: dict) -> str:
    """"D distinct: 'x'×3, …": the pieces a tokenizer could not represent, the commonest ten, shortened."""
    def shown(piece: str) -> str:
        return repr(piece if len(piece) <= 21 else piece[:20] + "…")

    return f"{len(unknown):,} distinct: " + ", ".join(f"{shown(k)}×{v}" for k, v in list(unknown.items())[:10])


def _pieces(text: str, tok=None):
    """`text` in pieces of about PIECE_CHARS characters, cut just before a line end that follows a
    non-space character (the points byte-level BPE cuts at too); whole for a tokenizer that must
    see it whole (`cuttable` false: some Hugging Face ones)."""
    from ..tokenizers.bpe import chunks

    return chunks(text, PIECE_CHARS, spaces=False) if getattr(tok, "cuttable", True) else [text]


def _encode_to(tok, texts, dtype, ids_file, text_file, unknown: Counter, say) -> list[tuple[int, int]]:
    """Encode `texts` into `ids_file` with eos_id between them, and write them to `text_file`, a piece at a
    time; count the pieces the tokenizer cannot represent. Each text's [start, end) span of tokens."""
    spans, n = [], 0
    for i, text in enumerate(texts):
        if i:
            np.array([tok.eos_id], dtype=dtype).tofile(ids_file)
            n += 1
        start = n
        for piece in _pieces(text, tok):
            ids = np.asarray(tok.encode(piece), dtype=dtype)
            ids.tofile(ids_file)
            n += len(ids)
            text_file.write(piece)
            unknown.update(tok.unknown(piece))
            say(len(piece))
        spans.append((start, n))
    return spans


def _progress(total: int, kind: str, training: bool):
    """A function to call with each piece's length as it is encoded: on a long text it says on stderr
    what preparing is doing, then how far encoding has come at every quarter; else it says nothing."""
    if total < LOUD_CHARS:
        return lambda chars: None
    tic, done, marks = time.perf_counter(), 0, [total * q // 4 for q in (1, 2, 3)]
    print(f"preparing {total / 1e6:,.0f}M characters of text (once: later runs reuse it): "
          + (f"training the {kind} tokenizer, then encoding" if training else f"encoding with the {kind} tokenizer"),
          file=sys.stderr, flush=True)

    def say(chars: int) -> None:
        nonlocal done
        done += chars
        while marks and done >= marks[0]:
            marks.pop(0)
            print(f"  encoded {done / total:.0%} ({time.perf_counter() - tic:.0f} s)", file=sys.stderr, flush=True)
    return say


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


def document_meta(documents, cuts, train_spans, val_spans) -> list[dict]:
    out, train_at, val_at = [], 0, 0
    for doc, cut, train_span, val_span in zip(documents, cuts, train_spans, val_spans):
        train_chars, val_chars = cut, len(doc.text) - cut
        out.append({
            "name": doc.name, "chars": len(doc.text),
            "train_chars": train_chars, "val_chars": val_chars,
            "val_bytes": len(doc.text[cut:].encode("utf-8")),
            "train_tokens": list(train_span), "val_tokens": list(val_span),
            # character offsets of this document's parts inside train.txt / val.txt
            "train_text": [train_at, train_at + train_chars], "val_text": [val_at, val_at + val_chars],
        })
        train_at += train_chars
        val_at += val_chars
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
