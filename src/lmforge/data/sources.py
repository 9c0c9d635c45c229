"""Read text sources into documents: NLTK Gutenberg ids, text files, folders, globs and JSONL.

In: source specs ("gutenberg:austen-emma.txt", "notes/", "books/*.txt", "chat.jsonl"). Out: [Document].
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..config import check_source_names
from ..errors import LmforgeError

GUTENBERG = "gutenberg:"


@dataclass
class Document:
    name: str
    text: str


def read_sources(specs, *, jsonl_field: str = "text", encoding: str = "utf-8",
                 errors: str = "strict") -> list[Document]:
    """Every document named by `specs`, in order; "\\r\\n" becomes "\\n". A file or Gutenberg text named
    twice (or matched by two globs) is read once. Fails on an empty corpus."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not isinstance(specs, (list, tuple)) or not all(isinstance(s, (str, os.PathLike)) for s in specs):
        raise LmforgeError(f"sources must be a path or gutenberg:ID, or a list of them, got {specs!r}")
    check_source_names([str(spec) for spec in specs])
    documents: list[Document] = []
    seen: set = set()
    for spec in specs:
        spec = str(spec)
        if spec.startswith(GUTENBERG):
            documents += [d for d in read_gutenberg(spec[len(GUTENBERG):]) if d.name not in seen]
            seen.update(d.name for d in documents)
        else:
            for path in expand_path(spec):
                if path.resolve() not in seen:
                    seen.add(path.resolve())
                    documents += read_file(path, jsonl_field=jsonl_field, encoding=encoding, errors=errors)
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise LmforgeError(f"the sources {', '.join(map(str, specs)) or '(none)'} hold no text; "
                           "name files, folders, globs or gutenberg:IDs that contain some")
    return documents


def expand_path(spec: str) -> list[Path]:
    """A file, every *.txt under a folder (sorted; hidden ones left out, as globs leave them), or the files a
    glob matches (sorted); "~" is the home folder. A file that exists is itself even when its name holds glob
    characters ("notes[1].txt")."""
    spec = os.path.expanduser(spec)
    if glob.has_magic(spec) and not Path(spec).exists():
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise LmforgeError(f"the glob {spec!r} matches no files; check the pattern (quote it in the shell)")
        return paths
    path = Path(spec)
    if path.is_dir():
        # hidden files and folders (.ipynb_checkpoints, an editor's .~lock files) are skipped, as globs skip them
        paths = sorted(p for p in path.rglob("*.txt") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not paths:
            raise LmforgeError(f"the folder {spec} holds no *.txt files; put text files in it or name the files")
        return paths
    if not path.exists():
        raise LmforgeError(f"source {spec} does not exist; give a text/JSONL file, a folder, a glob or gutenberg:ID")
    return [path]


def is_jsonl(path: Path) -> bool:
    """Whether `path` is read as JSON lines, one record per line (by its name: .jsonl in any case)."""
    return path.suffix.lower() == ".jsonl"


def read_file(path: Path, *, jsonl_field: str, encoding: str, errors: str, training: bool = True) -> list[Document]:
    """A text file as one document, a .jsonl as one per line. `training` False (texts to classify):
    a missing field's message leaves out the config and fine-tuning hints."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LmforgeError(f"cannot read {path}: {exc.strerror or exc}; check the path and its permissions") from None
    text = decode(data, path, encoding, errors).replace("\r\n", "\n")
    if is_jsonl(path):
        return read_jsonl(text, path, jsonl_field, training, errors)
    return [Document(str(path), text)]


def decode(data: bytes, path: Path, encoding: str, errors: str) -> str:
    try:
        return data.decode(encoding, errors).removeprefix("\ufeff")  # a byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path}: byte {exc.start} (0x{data[exc.start]:02x}) is not valid {encoding}; "
                           "pass the file's encoding (e.g. --encoding latin-1) or --errors replace") from None
    except LookupError:
        raise LmforgeError(f"unknown text encoding {encoding!r} or error handler {errors!r}; "
                           "use e.g. utf-8 / latin-1 and strict / replace / ignore") from None


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # JSON's escape of a UTF-16 surrogate: paired, a character
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_lines(text: str, path, errors: str = "strict") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a JSONL text. A string holding half of a
    surrogate pair (an escape like \\ud800 with no partner: no character) is refused by line, or with
    `errors` replace or ignore, its halves become U+FFFD or nothing, as undecodable bytes do."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmforgeError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or remove that line") from None
        if SURROGATE_ESCAPE.search(line) and LONE_SURROGATE.search(json.dumps(value, ensure_ascii=False)):
            if errors == "strict":
                raise LmforgeError(f"{path}:{number}: a string holds an unpaired surrogate escape (like \\ud800), "
                                   f"which is no character; fix that line, or pass --errors replace") from None
            value = _without_lone_surrogates(value, "\ufffd" if errors == "replace" else "")
        yield number, value


def _without_lone_surrogates(value, replacement: str):
    if isinstance(value, str):
        return LONE_SURROGATE.sub(replacement, value)
    if isinstance(value, list):
        return [_without_lone_surrogates(v, replacement) for v in value]
    if isinstance(value, dict):
        return {k: _without_lone_surrogates(v, replacement) for k, v in value.items()}
    return value


def read_jsonl(text: str, path: Path, field: str, training: bool = True, errors: str = "strict") -> list[Document]:
    """One document per non-blank line, from the string under `field`."""
    documents = []
    for number, record in json_lines(text, path, errors):
        if isinstance(record, dict) and field in record and not isinstance(record[field], str):
            kind = {"int": "a number", "float": "a number", "bool": "true or false", "NoneType": "null",
                    "list": "a list", "dict": "an object"}.get(type(record[field]).__name__, "not text")
            raise LmforgeError(f"{path}:{number}: field {field!r} is {kind}, not a string; make it the text (or "
                               f"name the field holding the text with --jsonl-field)")
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            has = f" (it has {', '.join(map(repr, record))})" if isinstance(record, dict) and record else ""
            pairs = isinstance(record, dict) and {"prompt", "completion"} <= set(record)
            hint = "; for prompt -> completion pairs, fine-tune with --task completion" if pairs and training else ""
            config = " (data.jsonl_field=... in a config)" if training else ""
            raise LmforgeError(f"{path}:{number}: no string field {field!r}{has}; add it, or name the field holding "
                               f"the text with --jsonl-field{config}{hint}")
        documents.append(Document(f"{path}:{number}", record[field].replace("\r\n", "\n")))  # as in text files
    return documents


def read_gutenberg(pattern: str) -> list[Document]:
    """Texts of NLTK's Gutenberg corpus by file id or glob ("austen-emma.txt", "austen-*", "*")."""
    gutenberg = gutenberg_corpus()
    fileids = gutenberg.fileids()
    matches = [f for f in fileids if fnmatch.fnmatchcase(f, pattern)]
    if not matches:
        raise LmforgeError(f"gutenberg:{pattern} names no text of NLTK's Gutenberg corpus; "
                           f"choose from: {', '.join(fileids)}")
    return [Document(f"{GUTENBERG}{f}", gutenberg.raw(f).replace("\r\n", "\n")) for f in matches]


def gutenberg_corpus():
    """nltk.corpus.gutenberg, downloading it once if NLTK can't find it."""
    import nltk  # imported here: it is slow to import and only Gutenberg sources need it

    # NLTK reads NLTK_DATA when it is first imported; honour a value set since then too
    for folder in reversed(os.environ.get("NLTK_DATA", "").split(os.pathsep)):
        if folder and folder not in nltk.data.path:
            nltk.data.path.insert(0, folder)
    try:
        nltk.data.find("corpora/gutenberg")
    except LookupError:
        if not nltk.download("gutenberg", quiet=True, raise_on_error=False):
            raise LmforgeError("NLTK's Gutenberg corpus is not installed and could not be downloaded; "
                               "set NLTK_DATA to a folder that holds corpora/gutenberg") from None
    return nltk.corpus.gutenberg
