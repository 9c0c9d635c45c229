"""Character tokenizer: one id per character seen in training, plus <|endoftext|> and <unk>."""
from __future__ import annotations

import json
from collections import Counter
from typing import Sequence

from ..errors import LmforgeError
from . import EOS, FORMAT_VERSION, UNK, checked_ids, sha256_text, write_tokenizer_json


class CharTokenizer:
    kind = "char"
    DEFAULTS: dict = {}

    def __init__(self, chars: Sequence[str]):
        # ids: 0 = <|endoftext|>, 1 = <unk>, then the characters in code point order
        self.chars = list(chars)
        self.eos_id, self.unk_id = 0, 1
        self.options: dict = {}
        self._index = {c: i + 2 for i, c in enumerate(self.chars)}
        self._strings = ["", UNK] + self.chars  # what decode writes for each id; <|endoftext|> writes nothing

    @property
    def vocab_size(self) -> int:
        return len(self._strings)

    @classmethod
    def train(cls, texts: list[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    def encode(self, text: str) -> list[int]:
        index, unk = self._index, self.unk_id
        return [index.get(c, unk) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        strings = self._strings
        return "".join(strings[i] for i in checked_ids(ids, len(strings)))

    def unknown(self, text: str) -> dict[str, int]:
        return {c: n for c, n in Counter(text).items() if c not in self._index}

    def token_strings(self) -> list[str]:
        return [EOS, UNK] + self.chars

    def to_json(self) -> str:
        # one character per line keeps the file readable and diffable
        return json.dumps({"kind": self.kind, "format_version": FORMAT_VERSION, "chars": self.chars},
                          ensure_ascii=False, indent=1)

    def save(self, directory) -> None:
        write_tokenizer_json(directory, self.to_json())

    def fingerprint(self) -> str:
        return sha256_text(self.to_json())

    @classmethod
    def from_dict(cls, data: dict, path) -> CharTokenizer:
        chars = data.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise LmforgeError(f"{path}: a char tokenizer needs a list of single characters under 'chars'; "
                               "re-run `lmforge prepare` to rebuild it")
        return cls(chars)
