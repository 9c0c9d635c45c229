"""Model-free text metrics for generations: chrF/BLEU against references, distinct-n, repetition,
and the choice of sentence-start prompt positions in held-out text."""
import re

import numpy as np

from lmforge.errors import LmforgeError

# A sentence ends at . ! or ?, possibly followed by closing quotes or brackets; the next sentence
# starts at the first non-space character after whitespace, if that is a capital or an opening quote.
_SENTENCE_START = re.compile(r"""(\w*)([.!?])['")\]]*\s+(?=["'(]?[A-Z])""")
# A period after these (or after a single capital, an initial) does not end a sentence.
_ABBREVIATIONS = {"Mr", "Mrs", "Ms", "Dr", "St", "Sr", "Jr", "Prof", "Rev", "Capt", "Col", "Gen", "Lt"}


def _sacrebleu():
    try:
        import sacrebleu  # imported lazily: only the report needs it
    except ImportError as e:
        raise LmforgeError(
            "chrF/BLEU need the sacrebleu package; install it with `pip install sacrebleu` "
            "(or `pip install lmforge[eval]`)"
        ) from e
    return sacrebleu


def _check_pairs(hypotheses: list[str], references: list[str]) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise LmforgeError(
            f"got {len(hypotheses)} generations and {len(references)} references; "
            "pass one reference per generation (at least one)"
        )


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus-level chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100; one reference each."""
    _check_pairs(hypotheses, references)
    return float(_sacrebleu().corpus_chrf(hypotheses, [references]).score)


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus-level BLEU (sacrebleu defaults: 13a tokenization, 4-grams), 0-100; one reference each."""
    _check_pairs(hypotheses, references)
    return float(_sacrebleu().corpus_bleu(hypotheses, [references]).score)


def _word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise LmforgeError(f"n-gram size must be at least 1, got n={n}")
    words = text.split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / total word n-grams, pooled over all texts (words split on whitespace).

    N-grams never cross from one text into the next. Returns 0.0 when there is no n-gram at all.
    """
    grams = [g for text in texts for g in _word_ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 4) -> float:
    """Fraction of the word n-grams of one text that already occurred earlier in the same text.

    With G the whitespace-word n-grams in order (len(words) - n + 1 of them), this is
    #{i : G[i] == G[j] for some j < i} / len(G). A text with no repeated n-gram scores 0; "a b a b a b"
    with n=2 has G = ab, ba, ab, ba, ab and scores 3/5. Returns 0.0 when the text has fewer than n words.
    """
    grams = _word_ngrams(text, n)
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def _is_abbreviation(word: str, mark: str) -> bool:
    return mark == "." and (word in _ABBREVIATIONS or (len(word) == 1 and word.isupper()))


def sentence_start_candidates(text: str, min_chars: int) -> list[int]:
    """Every offset in `text` where a sentence starts with at least `min_chars` characters after it."""
    candidates = [m.end() for m in _SENTENCE_START.finditer(text) if not _is_abbreviation(*m.groups())]
    if text[:1].strip():
        candidates.insert(0, 0)  # the text's first character starts a sentence too
    return [c for c in candidates if len(text) - c >= min_chars]


def sentence_starts(text: str, count: int, min_chars: int, seed: int) -> list[int]:
    """`count` character offsets of sentence starts in `text`, sorted, spread over the whole text.

    Every offset leaves at least `min_chars` characters after it (room for prompt + reference).
    The candidates are cut into `count` consecutive groups and one is drawn from each with
    numpy's generator seeded by `seed`, so the same inputs always give the same offsets.
    Raises LmforgeError if the text has fewer usable sentence starts than `count`.
    """
    candidates = sentence_start_candidates(text, min_chars)
    if count < 1 or len(candidates) < count:
        fix = (f"ask for at most {len(candidates)} prompt{'s' if len(candidates) > 1 else ''} (--prompts) or "
               if candidates else "")
        raise LmforgeError(
            f"asked for {count} prompts but the held-out text ({len(text)} characters) has "
            f"{len(candidates)} sentence starts with {min_chars} characters after them; "
            f"{fix}give more held-out text"
        )
    rng = np.random.default_rng(seed)
    groups = np.array_split(np.array(candidates), count)
    return [int(rng.choice(group)) for group in groups]
