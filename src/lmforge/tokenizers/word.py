"""Word tokenizer: spaCy's rule-based English tokenizer (`spacy.blank("en")`, no model download).

A vocabulary entry is a token together with its trailing whitespace ("Emma " and "Emma" differ),
so decoding is plain concatenation and restores the original spacing exactly.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from typing import Sequence

from ..config import is_number
from ..errors import LmforgeError
from . import EOS, FORMAT_VERSION, UNK, checked_ids, sha256_text, write_tokenizer_json

# Always in the vocabulary: a space lets "Zebra " encode as <unk> + " " and ". " as "." + " ",
# so a piece outside the vocabulary keeps its spacing.
FIXED = [EOS, UNK, " "]
CACHE_CHARS = 50_000_000  # how much tokenized text to remember (see WordTokenizer._pieces)
# Paragraph starts: spaCy never joins tokens across whitespace, so cutting there changes nothing,
# and tokenizing a paragraph at a time is ~2x faster than one multi-megabyte call.
PARAGRAPH = re.compile(r"(?<=\n\n)(?=\S)")


@functools.lru_cache(maxsize=1)
def english():
    import spacy  # imported here: it takes seconds, and only the word tokenizer needs it

    return spacy.blank("en")


def piece_word(piece: str) -> str:
    """The token without the one trailing space it carries in the vocabulary."""
    return piece[:-1] if piece.endswith(" ") and not piece.isspace() else piece


class WordTokenizer:
    kind = "word"
    # remove_stopwords is off by default: spaCy's stop words ("the", "of", "she", "not") are the words
    # that carry grammar, so a model trained without them cannot write fluent text, and the text is
    # no longer the author's. It exists for keyword-style experiments only.
    DEFAULTS = {"max_vocab": 20000, "min_freq": 2, "lowercase": False, "remove_stopwords": False}

    def __init__(self, words: Sequence[str], options: dict):
        self.words = list(words)  # learned entries, most frequent first; ids start after FIXED
        self.options = dict(options)
        self.eos_id, self.unk_id, self.space_id = 0, 1, 2
        self._index = {" ": self.space_id, **{w: i + len(FIXED) for i, w in enumerate(self.words)}}
        self._strings = [""] + FIXED[1:] + self.words  # what decode writes for each id
        self._cache: dict[str, list[str]] = {}
        self._cached_chars = 0

    @property
    def vocab_size(self) -> int:
        return len(self._strings)

    @classmethod
    def train(cls, texts: list[str], **options) -> WordTokenizer:
        check_options(options)
        tok = cls([], options)
        counts = Counter()
        for text in texts:
            counts.update(tok._pieces(text))
        for fixed in FIXED:  # a piece spelled like a special token stays unknown, never becomes one
            counts.pop(fixed, None)
        room = options["max_vocab"] - len(FIXED)
        frequent = [w for w, n in counts.items() if n >= options["min_freq"]]
        frequent.sort(key=lambda w: (-counts[w], w))
        trained = cls(frequent[:room], options)
        # prepare encodes these same texts next: hand over the spaCy output instead of tokenizing twice
        trained._cache, trained._cached_chars = tok._cache, tok._cached_chars
        return trained

    def _pieces(self, text: str) -> list[str]:
        """spaCy tokens of `text` with their trailing whitespace, after lowercasing / stop-word removal.

        Remembered per text because prepare trains on, encodes, and checks unknown() on the same
        texts, and spaCy (~1 MB/s) is the slowest step of preparing a corpus.
        """
        pieces = self._cache.get(text)
        if pieces is not None:
            return pieces
        skip_stop = self.options["remove_stopwords"]
        pieces = [t.text_with_ws for t in self._spacy_tokens(text) if not (skip_stop and t.is_stop)]
        self._cached_chars += len(text)
        if self._cached_chars > CACHE_CHARS:
            self._cache.clear()
            self._cached_chars = len(text)
        self._cache[text] = pieces
        return pieces

    def encode(self, text: str) -> list[int]:
        index = self._index
        out = []
        for piece in self._pieces(text):
            i = index.get(piece)
            if i is None:
                out.extend(self._encode_unknown(piece))
            else:
                out.append(i)
        return out

    def _encode_unknown(self, piece: str) -> list[int]:
        """A piece outside the vocabulary, keeping its spacing: "Zebra " -> <unk>, " "."""
        index = self._index
        if piece.isspace():
            return [index.get(c, self.unk_id) for c in piece]
        word = piece_word(piece)
        return [index.get(word, self.unk_id)] + ([self.space_id] if word != piece else [])

    def decode(self, ids: Sequence[int]) -> str:
        strings = self._strings
        return "".join(strings[i] for i in checked_ids(ids, len(strings)))

    def unknown(self, text: str) -> dict[str, int]:
        index, counts = self._index, Counter()
        for piece in self._pieces(text):
            if piece in index:
                continue
            if piece.isspace():
                counts.update(c for c in piece if c not in index)
            elif piece_word(piece) not in index:
                counts[piece_word(piece)] += 1
        return dict(counts)

    def dropped(self, text: str) -> list[str]:
        """The stop words that encoding `text` leaves out, in order (none unless remove_stopwords)."""
        if not self.options["remove_stopwords"]:
            return []
        return [t.text for t in self._spacy_tokens(text) if t.is_stop]

    def _spacy_tokens(self, text: str):
        """spaCy's tokens of `text`, lowercased first if the options say so, paragraph by paragraph."""
        source = text.lower() if self.options["lowercase"] else text
        try:
            source.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (from JSON escapes or undecodable argv): spaCy can't take them
            source = source.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        for doc in english().tokenizer.pipe(PARAGRAPH.split(source)):
            yield from doc

    def token_strings(self) -> list[str]:
        return FIXED + self.words

    def prompt_tail(self, text: str) -> str:
        """The last piece of `text` when encode writes <unk> for it and nothing follows it: a word the
        vocabulary has only with a space after it ("Mr." where the text always had "Mr. ") or the start
        of a word ("Woodh"). Token healing lets the model write an entry that begins with it instead.
        "" otherwise."""
        pieces = self._pieces(text)
        last = pieces[-1] if pieces else ""
        if not last or last in self._index or last != last.rstrip():
            return ""
        return last

    def token_bytes(self) -> list[bytes | None]:
        """What decode writes for each id, as UTF-8 (None for <|endoftext|> and <unk>): for token healing."""
        return [None, None] + [s.encode("utf-8") for s in self._strings[2:]]

    def to_json(self) -> str:
        data = {"kind": self.kind, "format_version": FORMAT_VERSION, "options": self.options, "words": self.words}
        return json.dumps(data, ensure_ascii=False, indent=1)

    def save(self, directory) -> None:
        write_tokenizer_json(directory, self.to_json())

    def fingerprint(self) -> str:
        return sha256_text(self.to_json())

    @classmethod
    def from_dict(cls, data: dict, path) -> WordTokenizer:
        words, options = data.get("words"), data.get("options")
        if not isinstance(words, list) or not isinstance(options, dict) or set(options) != set(cls.DEFAULTS):
            raise LmforgeError(f"{path}: a word tokenizer needs 'words' (a list) and 'options' "
                               f"({', '.join(cls.DEFAULTS)}); re-run `lmforge prepare` to rebuild it")
        return cls(words, options)


def check_options(options: dict) -> None:
    for name in ("max_vocab", "min_freq"):
        value = options[name]
        if not is_number(value, integer=True) or value < 1:
            raise LmforgeError(f"word tokenizer option {name} must be a positive integer, got {value!r}")
    if options["max_vocab"] <= len(FIXED):
        raise LmforgeError(f"word tokenizer option max_vocab={options['max_vocab']} leaves no room for words "
                           f"beside the {len(FIXED)} fixed tokens; use a few thousand")
