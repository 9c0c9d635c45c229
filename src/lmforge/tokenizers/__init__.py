"""Tokenizers: text <-> token ids. One class per kind (char, word, bpe), each saved as one tokenizer.json.

`train_tokenizer(kind, texts, **options)` fits one on training text; `load_tokenizer(path)` reads one back.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
from pathlib import Path
from typing import Protocol, Sequence

from ..errors import LmforgeError

EOS = "<|endoftext|>"  # every kind has it; separates documents; encode never makes it from text
UNK = "<unk>"  # char and word: stands for a piece outside the vocabulary
FORMAT_VERSION = 1  # of our own char/word tokenizer.json


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eos_id: int
    options: dict

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def unknown(self, text: str) -> dict[str, int]: ...
    def save(self, directory) -> None: ...
    def fingerprint(self) -> str: ...


def vocab_text(tokenizer: Tokenizer) -> str:
    """"vocab N", and where a BPE vocabulary came out smaller than asked (the text ran out of pairs to
    merge), how many were asked for."""
    asked = tokenizer.options.get("vocab_size") if tokenizer.kind == "bpe" else None
    short = isinstance(asked, int) and asked > tokenizer.vocab_size
    return f"vocab {tokenizer.vocab_size}" + (f" of the {asked} asked: the text has no more pairs to merge"
                                              if short else "")


def checked_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """`ids` as a list, or a one-line error naming the first id that is not a token of this vocabulary
    (Python would read -1 as the last token, and Hugging Face's decoder skips ids past the end)."""
    try:
        if not (isinstance(ids, list) and all(type(i) is int for i in ids)):
            ids = [operator.index(i) for i in ids]  # numpy or torch integers too, never floats
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            bad = next(i for i in ids if not 0 <= i < vocab_size)
            raise LmforgeError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    except (TypeError, ValueError):
        raise LmforgeError(f"decode takes a list of whole-number token ids, got {ids!r:.80}") from None
    return ids


def write_tokenizer_json(directory, content: str) -> None:
    """Write directory/tokenizer.json atomically: a reader sees the old file or the new one, never half."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tokenizer.json.{os.getpid()}.tmp"
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, directory / "tokenizer.json")


SPECIAL_TOKENS = "tokenizer_config.json"  # where a Hugging Face folder names its end-of-text token


def write_special_tokens(directory, eos: str) -> None:
    """Record which token ends a text, as Hugging Face folders do (an imported model's own choice)."""
    directory = Path(directory)
    tmp = directory / f".{SPECIAL_TOKENS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"eos_token": eos}, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, directory / SPECIAL_TOKENS)


def declared_eos(directory) -> str | None:
    """The end-of-text token a folder's tokenizer_config.json names, if it names one."""
    try:
        eos = json.loads((Path(directory) / SPECIAL_TOKENS).read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # {"content": "</s>", ...}, as older transformers write it
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def bos_prefix(tokenizer) -> list[int]:
    """[the tokenizer's beginning-of-text token] to put before a prompt, or [] when it has none."""
    bos = getattr(tokenizer, "bos_id", None)
    return [] if bos is None else [bos]


def start_id(tokenizer) -> int:
    """The id every sequence starts from: the tokenizer's own beginning-of-text token (an imported
    Llama's <s>), else end-of-text, which lmforge puts between documents."""
    bos = getattr(tokenizer, "bos_id", None)
    return tokenizer.eos_id if bos is None else bos


def sha256_text(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


# The kinds import the helpers above, so they come after them.
from .bpe import BPETokenizer  # noqa: E402
from .char import CharTokenizer  # noqa: E402
from .word import WordTokenizer  # noqa: E402

TOKENIZERS = {"char": CharTokenizer, "word": WordTokenizer, "bpe": BPETokenizer}


def tokenizer_class(kind: str):
    if kind not in TOKENIZERS:
        raise LmforgeError(f"unknown tokenizer kind {kind!r}; choose one of: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind]


def resolve_options(kind: str, options: dict | None = None) -> dict:
    """The kind's default options updated by `options`; unknown names fail with the valid list."""
    defaults = tokenizer_class(kind).DEFAULTS
    options = dict(options or {})
    bad = sorted(set(options) - set(defaults))
    if bad:
        valid = ", ".join(defaults) or "none"
        raise LmforgeError(f"unknown option(s) {', '.join(bad)} for the {kind} tokenizer; valid options: {valid}")
    for name, value in options.items():
        default = defaults[name]
        if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, type(default)):
            raise LmforgeError(f"{kind} tokenizer option {name} must be {type(default).__name__} like its default "
                               f"{default!r}, got {value!r}")
    return {**defaults, **options}


def train_tokenizer(kind: str, texts: list[str], **options) -> Tokenizer:
    """Fit a tokenizer of `kind` on `texts` (the training split)."""
    cls = tokenizer_class(kind)
    return cls.train(texts, **resolve_options(kind, options))


def load_tokenizer(path) -> Tokenizer:
    """Read a tokenizer.json (or a folder holding one): our char/word format, or any Hugging Face one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        content = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LmforgeError(f"cannot read tokenizer {path}: {exc.strerror or exc}; "
                           "point at a folder holding tokenizer.json") from None
    except UnicodeDecodeError:
        raise LmforgeError(f"{path} is not UTF-8 text (damaged); restore it or re-run `lmforge prepare`") from None
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); "
                           "re-save the tokenizer or re-run `lmforge prepare`") from None
    if isinstance(data, dict) and data.get("kind") in ("char", "word"):
        return TOKENIZERS[data["kind"]].from_dict(data, path)
    if isinstance(data, dict) and "model" in data:  # Hugging Face's format: ours (bpe) or an imported model's
        return BPETokenizer.from_json(content, path, eos=declared_eos(path.parent))
    raise LmforgeError(f"{path} is neither an lmforge char/word tokenizer nor a Hugging Face tokenizer.json; "
                       "point at the tokenizer.json written by `lmforge prepare` or shipped with the model")
