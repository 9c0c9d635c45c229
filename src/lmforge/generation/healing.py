"""Token healing: a prompt's last token is taken back and regenerated, constrained to start with its text.

A prompt usually ends where a token boundary would not fall in the training text. The word tokenizer
stores a word with its trailing space ("was " and "was" are different entries), so a prompt ending
"Emma was" ends in "was" without its space, which the text only has before punctuation or a line
break: the model's first move was to break the line. A BPE prompt ending mid-word ("Emma Wood") has
the same problem. Healing feeds the prompt without its last token and lets the model choose, among
the entries that begin with that token's bytes ("was", "was ", ...), how the prompt's last word goes
on; the text handed out leaves off the part the prompt already has.

The word tokenizer cannot encode a word it knows only with a space after it ("Mr." where the text
always had "Mr. "), or the start of a word ("Woodh"): the prompt's ids then end in <unk>, and that
text (the prompt's tail, `prompt_tail`) comes along with them, so that the first new token can be
made to write it.

In: prompt ids (and that tail). Out: the ids to feed, the text the first new token must begin with,
and the ids allowed at that first step. Tokenizers that cannot say what bytes each id writes
(imported SentencePiece-style ones) are not healed.
"""
from __future__ import annotations

import bisect
import weakref

import torch

from ..tokenizers import start_id

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its _Table (or None)


class _Table:
    """Every id's bytes in sorted order: the entries that begin with some bytes are one slice of it."""

    def __init__(self, pieces: list[bytes | None]):
        self.pieces = pieces
        ordered = sorted((piece, i) for i, piece in enumerate(pieces) if piece)
        self.keys = [piece for piece, _ in ordered]
        self.ids = [i for _, i in ordered]

    def starting_with(self, prefix: bytes) -> list[int]:
        lo = bisect.bisect_left(self.keys, prefix)
        hi = lo
        while hi < len(self.keys) and self.keys[hi].startswith(prefix):
            hi += 1
        return self.ids[lo:hi]


def _table(tokenizer) -> _Table | None:
    try:
        return _TABLES[tokenizer]
    except KeyError:
        pieces = tokenizer.token_bytes() if hasattr(tokenizer, "token_bytes") else None
        table = _TABLES[tokenizer] = None if pieces is None else _Table(pieces)
        return table


def prompt_tail(tokenizer, text: str) -> str:
    """The text at the end of `text` that the tokenizer wrote as <unk> (the word tokenizer's
    `prompt_tail`), else ""."""
    tail = getattr(tokenizer, "prompt_tail", None)
    return tail(text) if tail is not None and text else ""


def heal(tokenizer, ids: list[int], tail: str = "") -> tuple[list[int], str, torch.Tensor] | None:
    """(the prompt ids to feed, the text the first new token must begin with, the ids it may be), or
    None when there is nothing to heal: the last token is the only entry that begins with its bytes,
    it is special or unknown, or it is not a whole character on its own. `tail`: the text of the last
    id when that is <unk> (see prompt_tail). A one-token prompt is fed as the end-of-text token, as an
    empty prompt is."""
    table = None if not ids or tokenizer is None else _table(tokenizer)
    if table is None:
        return None
    if tail and ids[-1] == getattr(tokenizer, "unk_id", None):
        allowed = table.starting_with(tail.encode("utf-8"))
        return (ids[:-1] or [start_id(tokenizer)], tail, torch.tensor(allowed)) if allowed else None
    piece = table.pieces[ids[-1]] if 0 <= ids[-1] < len(table.pieces) else None
    if not piece:
        return None
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:  # the first bytes of a character: what follows is not the prompt's to choose
        return None
    allowed = table.starting_with(piece)
    if len(allowed) < 2:
        return None
    return ids[:-1] or [start_id(tokenizer)], text, torch.tensor(allowed)
