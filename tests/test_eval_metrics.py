"""Model-free evaluation pieces: text metrics, copy detection, n-gram and compressor baselines."""
import sys

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.evaluation.baselines import KneserNeyModel, UnigramModel, compressor_bits_per_byte
from lmforge.evaluation.copying import CopyIndex, copy_rate
from lmforge.evaluation.text_metrics import bleu, chrf, distinct_n, repetition_rate, sentence_starts


def _chars(text: str) -> np.ndarray:
    # The fixture is read as latin-1, so every code point is a byte value < 256.
    return np.array([ord(c) for c in text], dtype=np.int64)


# ---- text metrics -------------------------------------------------------------------------------

def test_chrf_and_bleu_are_100_on_identical_and_low_on_unrelated_text(tiny_text):
    refs = [tiny_text[:200], tiny_text[200:400]]
    assert chrf(refs, refs) == pytest.approx(100.0)
    assert bleu(refs, refs) == pytest.approx(100.0)
    unrelated = ["The quick brown fox jumps over the lazy dog near 42 old barns.",
                 "Quantum chromodynamics governs gluons; zebras yawn at xylophones."]
    assert chrf(unrelated, refs) < 25
    assert bleu(unrelated, refs) < 5


def test_chrf_without_sacrebleu_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` fail
    with pytest.raises(LmforgeError, match="pip install sacrebleu"):
        chrf(["a"], ["a"])


def test_distinct_n_on_hand_counted_texts():
    texts = ["a b c a b", "a b"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)  # a b c a b a b: 3 unique of 7
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab bc ca ab | ab: n-grams stay inside a text
    assert distinct_n(texts, 5) == 1.0
    assert distinct_n(texts, 6) == 0.0
    assert distinct_n([], 1) == 0.0


def test_repetition_rate_on_hand_counted_texts():
    assert repetition_rate("a b a b a b", n=2) == pytest.approx(3 / 5)  # ab ba [ab ba ab]
    assert repetition_rate("x x x x", n=1) == pytest.approx(3 / 4)
    assert repetition_rate("one two three four five six") == 0.0
    assert repetition_rate("too short", n=4) == 0.0


def test_sentence_starts_finds_every_start_when_asked_for_all():
    text = 'Alpha beta. Gamma delta! "Quoted," she said. Epsilon met Mr. Zeta? eta. J. Theta'
    expected = [0, text.index("Gamma"), text.index('"Quoted'), text.index("Epsilon"), text.index("J.")]
    # Not starts: "eta." (lowercase), "Zeta" (after the title Mr.), "Theta" (after the initial J.).
    assert sentence_starts(text, 5, min_chars=1, seed=0) == expected
    with pytest.raises(LmforgeError, match="ask for at most 5 prompts"):
        sentence_starts(text, 6, min_chars=1, seed=0)
    with pytest.raises(LmforgeError, match="has 0 sentence starts .*; give more held-out text"):
        sentence_starts(text, 1, min_chars=len(text) + 1, seed=0)
    # min_chars drops the starts too close to the end.
    assert sentence_starts(text, 3, min_chars=len(text) - text.index('"Quoted'), seed=0) == expected[:3]


def test_sentence_starts_are_deterministic_and_spread(austen_text):
    text = austen_text[:100_000]
    starts = sentence_starts(text, 10, min_chars=300, seed=3)
    assert starts == sentence_starts(text, 10, min_chars=300, seed=3)
    assert starts != sentence_starts(text, 10, min_chars=300, seed=4)
    assert starts == sorted(starts) and len(set(starts)) == 10
    for s in starts:
        assert text[s - 1].isspace() and (text[s].isupper() or text[s] in "\"'(")
        assert len(text) - s >= 300
    # One draw per tenth of the candidates: the picks cover the text, not one corner of it.
    assert starts[0] < 15_000 and starts[-1] > 85_000


# ---- copying ------------------------------------------------------------------------------------

def _naive_longest_copy(generated: str, train: str) -> int:
    best = 0
    for i in range(len(generated)):
        for j in range(i + best + 1, len(generated) + 1):
            if generated[i:j] not in train:
                break
            best = j - i
    return best


def test_longest_copy_matches_brute_force_on_small_texts():
    rng = np.random.default_rng(0)
    for _ in range(30):
        train = "".join(rng.choice(list("abc"), size=200))
        generated = "".join(rng.choice(list("abcd"), size=40))
        length, start = CopyIndex(train).longest_copy(generated)
        assert length == _naive_longest_copy(generated, train)
        assert generated[start:start + length] in train


def test_copy_detection_finds_a_planted_span_and_nothing_in_shuffled_text(austen_text):
    rng = np.random.default_rng(1)
    train = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=20_000))
    # Filler drawn from digits, which never occur in the training text, so the copy cannot extend.
    filler = lambda k: "".join(rng.choice(list("0123456789"), size=k))
    planted = filler(100) + train[5000:5080] + filler(120)
    assert CopyIndex(train).longest_copy(planted) == (80, 100)

    text = austen_text[:200_000]
    index = CopyIndex(text)
    chars = list(text[50_000:50_300])
    rng.shuffle(chars)
    shuffled = "".join(chars)
    assert index.longest_copy(shuffled)[0] < 15
    copied = "Zzq" + text[120_000:120_060] + "qzZ"
    assert index.longest_copy(copied)[0] >= 60
    assert copy_rate([shuffled, copied], index, threshold=50) == 0.5


# ---- n-gram baselines ---------------------------------------------------------------------------

@pytest.fixture
def austen_split(austen_text):
    train, held_out = _chars(austen_text[:150_000]), _chars(austen_text[150_000:170_000])
    return train, held_out


@pytest.mark.parametrize("make", [lambda: UnigramModel(256), lambda: KneserNeyModel(256, order=5)])
def test_ngram_probabilities_sum_to_one_for_seen_and_unseen_contexts(make, austen_split):
    train, held_out = austen_split
    model = make().fit(train)
    unseen_token = 7  # a control character: absent from the text, yet it must get probability
    assert unseen_token not in set(train.tolist())
    for context in [[], train[1000:1004], train[:2], [unseen_token] * 4, [250, 251, 252, 253]]:
        probs = np.exp(model.logprobs(context))
        assert probs.shape == (256,)
        assert probs.sum() == pytest.approx(1.0, abs=1e-9)
        assert probs[unseen_token] > 0


def test_kneser_ney_sums_to_one_with_a_tiny_vocab_and_short_training_text():
    model = KneserNeyModel(vocab_size=4, order=5).fit([0, 1, 0, 1, 2])
    for context in [[], [0], [0, 1], [1, 0, 1, 2], [3, 3, 3, 3]]:
        assert np.exp(model.logprobs(context)).sum() == pytest.approx(1.0)
    assert np.exp(model.logprobs([0, 1, 0])).argmax() == 1  # "0 1 0" was always followed by 1


@pytest.mark.parametrize("make", [lambda: UnigramModel(256), lambda: KneserNeyModel(256, order=5)])
def test_score_equals_the_sum_of_per_position_logprobs(make, austen_split):
    train, held_out = austen_split
    model = make().fit(train)
    ids = np.concatenate([held_out[:300], [7, 7, 200]])  # includes unseen tokens and contexts
    order = getattr(model, "order", 1)
    per_position = [model.logprobs(ids[max(0, i - order + 1):i])[ids[i]] for i in range(len(ids))]
    assert model.score(ids) == pytest.approx(-sum(per_position), rel=1e-10)


def test_kneser_ney_beats_unigram_on_held_out_austen(austen_split):
    train, held_out = austen_split
    unigram = UnigramModel(256).fit(train).score(held_out)
    kneser_ney = KneserNeyModel(256, order=5).fit(train).score(held_out)
    bits_per_char = kneser_ney / len(held_out) / np.log(2)
    assert kneser_ney < 0.6 * unigram
    assert 1.5 < bits_per_char < 3.0


def test_sample_is_seeded_and_stays_in_the_vocab(austen_split):
    train, _ = austen_split
    model = KneserNeyModel(256, order=5).fit(train)
    context = _chars("Emma ")
    a = model.sample(context, 50, np.random.default_rng(0))
    assert a == model.sample(context, 50, np.random.default_rng(0))
    assert len(a) == 50 and all(0 <= t < 256 for t in a)
    # At a very low temperature, sampling is the argmax.
    greedy = int(np.argmax(model.logprobs(context)))
    assert model.sample(context, 1, np.random.default_rng(1), temperature=1e-3) == [greedy]


def test_token_ids_outside_the_vocab_are_rejected():
    with pytest.raises(LmforgeError, match="vocab_size"):
        KneserNeyModel(4).fit([0, 1, 4])


# ---- compressors --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["gzip", "bzip2", "xz", "ppmd"])
def test_compressor_bits_per_byte_is_low_on_repeats_and_high_on_noise(method, austen_text):
    train = austen_text[:30_000].encode("latin-1")
    repeat = train[10_000:14_000]
    noise = np.random.default_rng(0).integers(0, 256, size=4000, dtype=np.uint8).tobytes()
    repeat_bpb = compressor_bits_per_byte(train, repeat, method)
    noise_bpb = compressor_bits_per_byte(train, noise, method)
    # bzip2's block sort exploits an exact repeat less than the dictionary and context coders do.
    assert repeat_bpb < 1.5
    assert noise_bpb > 7.5


def test_unknown_compressor_is_a_one_line_error():
    with pytest.raises(LmforgeError, match="choose one of"):
        compressor_bits_per_byte(b"a", b"b", "zstd")
