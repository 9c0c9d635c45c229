"""Byte-level BPE via Hugging Face `tokenizers`; saved in Hugging Face's own tokenizer.json format.

The same class wraps any Hugging Face tokenizer.json (GPT-2's, an imported model's), so it is
also how imported models tokenize.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from ..config import is_number
from ..device import physical_cores
from ..errors import LmforgeError
from . import EOS, checked_ids, sha256_text, write_special_tokens, write_tokenizer_json

CHUNK_CHARS = 1 << 16  # long texts are encoded as chunks this long, in parallel
# GPT-2's pre-tokenizer pattern, which Hugging Face's ByteLevel(use_regex=True) applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# End-of-text names in other Hugging Face tokenizers, tried when <|endoftext|> is absent.
EOS_NAMES = [EOS, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]"]


def chunks(text: str, size: int = CHUNK_CHARS, spaces: bool = True):
    """Cut `text` into pieces of about `size` characters, just before a newline that follows a
    non-space character, or where no such newline comes within another `size` (a text without line
    ends), with `spaces`, before a space that follows one. Byte-level pre-tokenization never joins
    across such a point, so encoding the pieces gives the same ids as encoding the whole text."""
    start = 0
    while len(text) - start > size:
        cut = _cut_before(text, "\n", start + size, start + 2 * size)
        if cut is None and spaces:
            cut = _cut_before(text, " ", start + size, start + 2 * size)
        if cut is None:
            cut = _cut_before(text, "\n", start + 2 * size, len(text))
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _cut_before(text: str, char: str, lo: int, hi: int) -> int | None:
    """The first position in [lo, hi) holding `char` after a non-space character, or None."""
    cut = text.find(char, lo, hi)
    while cut > 0 and text[cut - 1].isspace():
        cut = text.find(char, cut + 1, hi)
    return cut if cut > 0 else None


def gpt2_style(hf) -> bool:
    """True when `hf` is byte-level BPE that pre-tokenizes exactly like GPT-2 (our bpe, GPT-2's own)."""
    from tokenizers import models, pre_tokenizers

    pre, model = hf.pre_tokenizer, hf.model
    plain_added = [t for t in hf.get_added_tokens_decoder().values() if not t.special]
    return (isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex and not pre.add_prefix_space
            and hf.normalizer is None and not plain_added and isinstance(model, models.BPE)
            and model.dropout is None and not model.continuing_subword_prefix and not model.end_of_word_suffix)


def byte_level_ranks(hf) -> tuple[dict[bytes, int], list[int]] | None:
    """The tokenizer as tiktoken's merge table: byte string -> rank (the 256 bytes, then one rank per
    merge, in merge order), and rank -> the Hugging Face id; None when it cannot be one."""
    import json

    from tokenizers import pre_tokenizers

    model = json.loads(hf.to_str())["model"]
    vocab = model["vocab"]
    # ByteLevel writes byte b as a printable character; alphabet() lists them in an arbitrary order.
    to_byte = {char: byte for byte, char in enumerate(_byte_chars())}
    if set(to_byte) != set(pre_tokenizers.ByteLevel.alphabet()) or any(char not in vocab for char in to_byte):
        return None  # not the byte table we know, or a byte without a token: Hugging Face encodes instead
    ranks, ids = {}, []
    for char, byte in sorted(to_byte.items(), key=lambda item: item[1]):
        ranks[bytes([byte])] = len(ids)
        ids.append(vocab[char])
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(to_byte[c] for c in left + right)
        if token not in ranks and left + right in vocab:
            ranks[token] = len(ids)
            ids.append(vocab[left + right])
    return ranks, ids


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (byte b at index b)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


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


def leading_special(hf) -> int | None:
    """The special token this tokenizer puts before every text (a Llama's <s> or <|begin_of_text|>),
    which its model always read first; None when it adds none (GPT-2's, and lmforge's own)."""
    plain = hf.encode("a", add_special_tokens=False).ids
    full = hf.encode("a", add_special_tokens=True).ids
    specials = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    if len(full) > len(plain) and full[0] in specials and full[1:len(plain) + 1] == plain:
        return full[0]
    return None


class BPETokenizer:
    kind = "bpe"
    DEFAULTS = {"vocab_size": 4096}

    def __init__(self, hf, options: dict | None = None, eos: str | None = None):
        """`eos`: the end-of-text token's name where the model's folder declares it (tokenizer_config.json),
        else the first of EOS_NAMES the vocabulary holds."""
        self._hf = hf
        # text spelling a special token ("<|endoftext|>") is encoded as ordinary text, never as the token
        self._hf.encode_special_tokens = True
        self.eos_id = find_eos(hf)
        self.declared_eos = eos if eos is not None and hf.token_to_id(eos) not in (None, self.eos_id) else None
        if self.declared_eos is not None:
            self.eos_id = hf.token_to_id(eos)
        self.bos_id = leading_special(hf)
        self.options = dict(options or {"vocab_size": self.vocab_size})
        unk_token = getattr(hf.model, "unk_token", None)
        self.unk_id = hf.token_to_id(unk_token) if unk_token else None  # byte-level: None
        # encode_batch_fast (tokenizers >= 0.21) skips computing offsets we don't need
        self._encode_batch = getattr(hf, "encode_batch_fast", hf.encode_batch)
        self._fast = None  # (tiktoken Encoding, rank -> id array), built on first use
        # GPT-2-style byte-level BPE encodes a text cut at chunks()'s points exactly as the whole text; other
        # Hugging Face tokenizers (a SentencePiece model's prefix space, say) take each text whole
        self.cuttable = gpt2_style(hf)

    def _fast_encoder(self):
        """GPT-2-style BPE runs through tiktoken: the same pattern and merges, about 3x faster than
        Hugging Face's encoder on one thread, and in parallel over chunks. tiktoken merges the adjacent
        pair whose joined bytes rank lowest, Hugging Face the pair whose merge comes first; the ids
        were identical on every Gutenberg text we have, for vocabularies of 512 to 16,384 (tested), and
        any rare difference would still be a valid encoding of the same text."""
        if self._fast is None:
            self._fast = False
            table = byte_level_ranks(self._hf) if gpt2_style(self._hf) else None
            if table is not None:
                import tiktoken

                ranks, ids = table
                self._fast = (tiktoken.Encoding("lmforge-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                                special_tokens={}), np.asarray(ids, dtype=np.int64))
        return self._fast

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not is_number(vocab_size, integer=True) or vocab_size < 257:
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
        fast = self._fast_encoder()
        if not fast:
            pieces = list(chunks(text)) if self.cuttable else [text]
            return [i for e in self._encode_batch(pieces, add_special_tokens=False) for i in e.ids]
        encoding, ids = fast
        pieces = list(chunks(text))
        ranks = (encoding.encode_ordinary(text) if len(pieces) == 1 else
                 [r for rs in encoding.encode_ordinary_batch(pieces, num_threads=physical_cores()) for r in rs])
        return ids[np.asarray(ranks, dtype=np.int64)].tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode(checked_ids(ids, self.vocab_size), skip_special_tokens=True)

    def unknown(self, text: str) -> dict[str, int]:
        """Byte-level BPE represents every string; other Hugging Face models may map pieces to <unk>."""
        if self.unk_id is None:
            return {}
        counts = Counter()
        pieces = list(chunks(text)) if self.cuttable else [text]
        for piece, encoding in zip(pieces, self._hf.encode_batch(pieces, add_special_tokens=False)):
            counts.update(piece[a:b] for i, (a, b) in zip(encoding.ids, encoding.offsets) if i == self.unk_id)
        return dict(counts)

    def token_strings(self) -> list[str]:
        vocab = self._hf.get_vocab(with_added_tokens=True)
        return sorted(vocab, key=vocab.get)

    def token_bytes(self) -> list[bytes | None] | None:
        """The bytes each id writes (None for special tokens), for token healing; None unless this is
        GPT-2-style byte-level BPE, whose decoding is the concatenation of its tokens' bytes."""
        if not gpt2_style(self._hf):
            return None
        to_byte = {char: byte for byte, char in enumerate(_byte_chars())}
        specials = {i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
        out: list[bytes | None] = [None] * self.vocab_size
        for token, i in self._hf.get_vocab(with_added_tokens=True).items():
            if i not in specials and i < len(out) and all(c in to_byte for c in token):
                out[i] = bytes(to_byte[c] for c in token)
        return out

    def to_json(self) -> str:
        return self._hf.to_str()

    def save(self, directory) -> None:
        write_tokenizer_json(directory, self.to_json())
        if self.declared_eos is not None:  # Hugging Face's place for it, read back by load_tokenizer
            write_special_tokens(directory, self.declared_eos)

    def fingerprint(self) -> str:
        extra = "" if self.declared_eos is None else f"\neos: {self.declared_eos}"  # it separates documents
        return sha256_text(self.to_json() + extra)

    @classmethod
    def from_json(cls, content: str, path, eos: str | None = None) -> BPETokenizer:
        from tokenizers import Tokenizer

        try:
            hf = Tokenizer.from_str(content)
        except Exception as exc:  # the Rust side raises a bare Exception with serde's message
            raise LmforgeError(f"{path}: Hugging Face tokenizers cannot read it ({exc}); "
                               "point at a valid tokenizer.json") from None
        return cls(hf, eos=eos)
