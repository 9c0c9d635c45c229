"""Byte-level BPE via Hugging Face `tokenizers`; saved in Hugging Face's own tokenizer.json format.

The same class wraps any Hugging Face tokenizer.json (GPT-2's, an imported model's), so it is
also how imported models tokenize.
"""
from __future__ import annotations

import itertools
import re
from collections import Counter
from typing import Sequence

from ..errors import LmforgeError
from . import EOS, sha256_text, write_tokenizer_json

CHUNK_CHARS = 8192  # encode_batch works on chunks this long, in parallel
WINDOW_CHARS = 1 << 20  # the segment path splits at most this much text at once, to bound memory
MEMO_SEGMENTS = 200_000  # segment -> ids pairs remembered across encode calls (~40 MB at most)
# A segment is a whitespace run plus the non-space run after it (" Woodhouse,", "\n\nEmma").
# The GPT-2 pre-tokenizer regex never matches across the start of a segment, so segments
# encode independently: encoding each distinct segment once gives the ids of the whole text.
SEGMENT = re.compile(r"\s*\S+|\s+")
# End-of-text names in other Hugging Face tokenizers, tried when <|endoftext|> is absent.
EOS_NAMES = [EOS, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]"]


def chunks(text: str, size: int = CHUNK_CHARS):
    """Cut `text` into pieces of about `size` characters, just before a newline that follows a
    non-space character. Byte-level pre-tokenization never joins across such a point, so
    encoding the pieces gives the same ids as encoding the whole text."""
    start = 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut > 0 and text[cut - 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut <= 0:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def segmentable(hf) -> bool:
    """True when `hf` pre-tokenizes like GPT-2 (our bpe, GPT-2's own), so SEGMENT cuts are safe."""
    from tokenizers import pre_tokenizers

    pre = hf.pre_tokenizer
    plain_added = [t for t in hf.get_added_tokens_decoder().values() if not t.special]
    return (isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex and not pre.add_prefix_space
            and hf.normalizer is None and not plain_added)


def find_eos(hf) -> int:
    for name in EOS_NAMES:
        token_id = hf.token_to_id(name)
        if token_id is not None:
            return token_id
    specials = [t for t in hf.get_added_tokens_decoder().items() if t[1].special]
    if specials:
        return min(specials)[0]
    raise LmforgeError("this Hugging Face tokenizer.json has no special end-of-text token; "
                       f"add one (e.g. {EOS}) to its added_tokens")


class BPETokenizer:
    kind = "bpe"
    DEFAULTS = {"vocab_size": 4096}

    def __init__(self, hf, options: dict | None = None):
        self._hf = hf
        # text spelling a special token ("<|endoftext|>") is encoded as ordinary text, never as the token
        self._hf.encode_special_tokens = True
        self.eos_id = find_eos(hf)
        self.options = dict(options or {"vocab_size": self.vocab_size})
        unk_token = getattr(hf.model, "unk_token", None)
        self._unk_id = hf.token_to_id(unk_token) if unk_token else None
        # encode_batch_fast (tokenizers >= 0.21) skips computing offsets we don't need
        self._encode_batch = getattr(hf, "encode_batch_fast", hf.encode_batch)
        self._segmentable = segmentable(hf)
        self._memo: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 257:
            raise LmforgeError(f"bpe tokenizer option vocab_size must be an integer >= 257 (256 bytes + "
                               f"{EOS}), got {vocab_size!r}")
        hf = Tokenizer(models.BPE())
        # no normalizer and no prefix space: decode(encode(t)) == t for every string
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator((c for text in texts for c in chunks(text)), trainer=trainer)
        return cls(hf, {"vocab_size": vocab_size})

    def encode(self, text: str) -> list[int]:
        if not self._segmentable:
            return [i for e in self._encode_batch(list(chunks(text)), add_special_tokens=False) for i in e.ids]
        ids: list[int] = []
        for window in chunks(text, WINDOW_CHARS):
            ids.extend(self._encode_segments(SEGMENT.findall(window)))
        return ids

    def _encode_segments(self, segments: list[str]) -> list[int]:
        """Hugging Face encodes each distinct segment once (a 4-5x speedup on a novel:
        ~25k distinct segments among 240k); the rest is dictionary lookups."""
        memo = self._memo
        distinct = dict.fromkeys(segments)
        if len(memo) + len(distinct) > MEMO_SEGMENTS:
            memo.clear()
        new = [s for s in distinct if s not in memo]
        if new:
            memo.update(zip(new, (e.ids for e in self._encode_batch(new, add_special_tokens=False))))
        return list(itertools.chain.from_iterable(map(memo.__getitem__, segments)))

    def decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=True)

    def unknown(self, text: str) -> dict[str, int]:
        """Byte-level BPE represents every string; other Hugging Face models may map pieces to <unk>."""
        if self._unk_id is None:
            return {}
        counts = Counter()
        pieces = list(chunks(text))
        for piece, encoding in zip(pieces, self._hf.encode_batch(pieces, add_special_tokens=False)):
            counts.update(piece[a:b] for i, (a, b) in zip(encoding.ids, encoding.offsets) if i == self._unk_id)
        return dict(counts)

    def token_strings(self) -> list[str]:
        vocab = self._hf.get_vocab(with_added_tokens=True)
        return sorted(vocab, key=vocab.get)

    def to_json(self) -> str:
        return self._hf.to_str()

    def save(self, directory) -> None:
        write_tokenizer_json(directory, self.to_json())

    def fingerprint(self) -> str:
        return sha256_text(self.to_json())

    @classmethod
    def from_json(cls, content: str, path) -> BPETokenizer:
        from tokenizers import Tokenizer

        try:
            hf = Tokenizer.from_str(content)
        except Exception as exc:  # the Rust side raises a bare Exception with serde's message
            raise LmforgeError(f"{path}: Hugging Face tokenizers cannot read it ({exc}); "
                               "point at a valid tokenizer.json") from None
        return cls(hf)
