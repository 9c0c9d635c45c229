"""The author-attribution dataset: passages cut from Gutenberg novels, labelled by author, split by region
of each book (first 80% train, next 10% val, last 10% test) so no passage or region is shared between splits.

In: the NLTK Gutenberg corpus and the gutenberg-more folder. Out: JSONL rows
{"text", "label", "split", "book", "start", "end"} for `lmforge finetune --task classify`.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import write_error, write_text
from ..errors import LmforgeError
from .sources import read_sources

# author -> books: NLTK ids, or file names inside the gutenberg-more folder
AUTHORS = {
    "austen": ["gutenberg:austen-emma.txt", "gutenberg:austen-persuasion.txt", "gutenberg:austen-sense.txt"],
    "chesterton": ["gutenberg:chesterton-ball.txt", "gutenberg:chesterton-brown.txt",
                   "gutenberg:chesterton-thursday.txt"],
    "dickens": ["dickens-christmas-carol.txt", "dickens-expectations.txt", "dickens-hard-times.txt",
                "dickens-tale-of-two-cities.txt", "dickens-twist.txt"],
    "melville": ["gutenberg:melville-moby_dick.txt"],
    "doyle": ["doyle-holmes.txt"],
    "stoker": ["dracula-stoker.txt"],
}
REGIONS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}
CAPS = {"train": 300, "val": 40, "test": 100}  # passages per author and split (evenly spread over its books)
MIN_PASSAGE = 20
SKIP_CHARS = 2000  # the opening holds the title line, which names the author


def passages(text: str, start: int, end: int, length: int) -> list[tuple[int, int]]:
    """Non-overlapping [a, b) spans of about `length` characters inside [start, end), cut at spaces."""
    spans, a = [], start
    while True:
        a = text.find(" ", a, end) + 1  # start just after a space: never mid-word
        if a <= 0 or a + length > end:
            return spans
        b = text.rfind(" ", a, a + length)
        if b <= a:
            return spans
        spans.append((a, b))
        a = b


def even(items: list, n: int) -> list:
    """At most n items spread evenly over the list (first and last kept)."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def author_rows(more, passage_chars: int = 600, caps: dict | None = None) -> list[dict]:
    caps = caps or CAPS
    if not isinstance(passage_chars, int) or passage_chars < MIN_PASSAGE:
        raise LmforgeError(f"--passage-chars must be at least {MIN_PASSAGE} (a passage of a few words), "
                           f"got {passage_chars}; the default is 600")
    more = Path(more)
    if not more.is_dir():
        raise LmforgeError(f"--more {more} is not a folder; point it at the folder of extra Gutenberg novels "
                           f"({', '.join(b for books in AUTHORS.values() for b in books if ':' not in b)})")
    missing = [b for books in AUTHORS.values() for b in books if ":" not in b and not (more / b).is_file()]
    if missing:
        raise LmforgeError(f"--more {more} lacks {', '.join(missing)}; point it at the folder of extra Gutenberg "
                           f"novels that holds them")
    rows = []
    for author, books in AUTHORS.items():
        for split, (lo, hi) in REGIONS.items():
            found = []
            for book in books:
                doc = read_sources(book if book.startswith("gutenberg:") else str(more / book))[0]
                text = " ".join(doc.text.split())  # one space between words: line breaks say nothing of style
                body = len(text) - SKIP_CHARS
                start, end = SKIP_CHARS + int(body * lo), SKIP_CHARS + int(body * hi)
                found += [{"text": text[a:b], "label": author, "split": split, "book": Path(book).name,
                           "start": a, "end": b} for a, b in passages(text, start, end, passage_chars)]
            if not found:
                raise LmforgeError(f"no {split} passage of {passage_chars} characters fits in {author}'s books; "
                                   f"choose a smaller --passage-chars (the default is 600)")
            rows += even(found, caps[split])
    return rows


def write_authors(out, more, passage_chars: int = 600) -> dict:
    """Write the dataset to `out` (.jsonl); returns counts per split."""
    out = Path(out)
    if out.suffix != ".jsonl":
        raise LmforgeError(f"--out {out} must end in .jsonl")
    rows = author_rows(more, passage_chars)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, exc) from None
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))  # whole or not at all
    return {s: sum(r["split"] == s for r in rows) for s in REGIONS}
