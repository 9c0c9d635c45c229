"""Tokenizers: exact round trips, save/load, unknown pieces, and clear errors for bad kinds/options."""
import json

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizers import EOS, TOKENIZERS, load_tokenizer, train_tokenizer

ODD_TEXT = "naïve café — 日本語 \t tabs\r\n\x00 \U0001F600 <|endoftext|> end"


@pytest.fixture(scope="module")
def emma(gutenberg_dir_module):
    return (gutenberg_dir_module / "austen-emma.txt").read_text(encoding="latin-1")


@pytest.fixture(scope="module")
def gutenberg_dir_module():
    from conftest import CORPUS

    if CORPUS is None:
        pytest.skip("no Gutenberg corpus here: set NLTK_DATA to a folder holding corpora/gutenberg")
    GUTENBERG = CORPUS / "corpora" / "gutenberg"
    return GUTENBERG


@pytest.fixture(scope="module")
def bpe(emma):
    return train_tokenizer("bpe", [emma], vocab_size=1024)


def test_char_round_trips_emma(austen_text):
    tok = train_tokenizer("char", [austen_text])
    ids = tok.encode(austen_text)
    assert len(ids) == len(austen_text)
    assert tok.decode(ids) == austen_text
    assert tok.unknown(austen_text) == {}


def test_bpe_round_trips_emma_and_any_string(emma, bpe):
    assert bpe.decode(bpe.encode(emma)) == emma
    assert bpe.decode(bpe.encode(ODD_TEXT)) == ODD_TEXT
    assert bpe.unknown(ODD_TEXT) == {}


def test_bpe_fast_encoding_matches_hugging_face(emma, bpe):
    # tiktoken encodes our byte-level BPE (in parallel chunks); it must give Hugging Face's exact ids
    assert bpe._fast_encoder()
    for text in (emma, ODD_TEXT, "   leading and trailing spaces   \n\n\n", "x" * 3000 + "'ll 123,456"):
        assert bpe.encode(text) == bpe._hf.encode(text, add_special_tokens=False).ids


def test_word_round_trips_in_vocabulary_text(tiny_text):
    tok = train_tokenizer("word", [tiny_text], min_freq=1)
    text = "Emma Woodhouse, handsome, clever, and rich, with very little to distress or vex her.\n\nEmma "
    assert tok.unknown(text) == {}
    assert tok.decode(tok.encode(text)) == text


def test_word_vocabulary_keeps_spacing_and_unknown_whitespace(tiny_text):
    tok = train_tokenizer("word", [tiny_text], min_freq=1)
    strings = tok.token_strings()
    assert "Emma " in strings and "her" in strings
    ids = tok.encode("Zebra and Quokka.")
    assert tok.decode(ids) == "<unk> and <unk>."
    assert tok.unknown("Zebra and Quokka. Zebra") == {"Zebra": 2, "Quokka": 1}
    # "." is known, ". " (with a space) is not: it becomes "." + " ", exactly
    assert tok.decode(tok.encode("her. Emma  her\n\n\n\n\n\n")) == "her. Emma  her\n\n\n\n\n\n"


def test_word_options(tiny_text):
    lower = train_tokenizer("word", [tiny_text], lowercase=True, min_freq=1)
    assert lower.decode(lower.encode("EMMA Woodhouse")) == "emma woodhouse"
    no_stop = train_tokenizer("word", [tiny_text], remove_stopwords=True, min_freq=1)
    assert "the " not in no_stop.token_strings() and "Emma " in no_stop.token_strings()
    # what a prompt loses, said as encode reads it (a lone surrogate, from an undecodable argv, included)
    assert no_stop.dropped("Emma was very \udcff happy") == ["was", "very"] and lower.dropped("the") == []
    # the words it leaves out cost nothing: its bits per byte is said to be a lower bound, and why
    from lmforge.evaluation.likelihood import evaluate_text, lower_bound_reason
    from lmforge.models import build_model

    model = build_model("lstm", vocab_size=no_stop.vocab_size, d_model=16, d_hidden=16, n_layers=1)
    summary = evaluate_text(model, no_stop, tiny_text).summary()
    assert summary["bits_per_byte_is_lower_bound"] and "removes stop words" in lower_bound_reason(summary)
    model = build_model("lstm", vocab_size=lower.vocab_size, d_model=16, d_hidden=16, n_layers=1)
    summary = evaluate_text(model, lower, tiny_text).summary()  # nor do capital letters, once lowercased
    assert summary["bits_per_byte_is_lower_bound"] and "lowercases the text" in lower_bound_reason(summary)
    with pytest.raises(LmforgeError, match="empty after tokenizing .its stop words are removed"):
        from lmforge.evaluation.likelihood import evaluate_documents

        evaluate_documents(model, no_stop, [("text", "the of and")])  # not a perfect score of 0 bits
    small = train_tokenizer("word", [tiny_text], max_vocab=10, min_freq=1)
    assert small.vocab_size == 10
    rare = train_tokenizer("word", [tiny_text + " Zanzibar"], min_freq=2)
    assert rare.unknown("Zanzibar") == {"Zanzibar": 1}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_save_load_same_ids_and_fingerprint(kind, tiny_text, tmp_path):
    options = {"vocab_size": 300} if kind == "bpe" else {}
    tok = train_tokenizer(kind, [tiny_text], **options)
    tok.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # one file, no temp left over
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.kind == kind and again.vocab_size == tok.vocab_size and again.eos_id == tok.eos_id
    assert again.encode(tiny_text) == tok.encode(tiny_text)
    assert again.fingerprint() == tok.fingerprint()


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_eos_never_comes_from_text_and_decodes_to_nothing(kind, tiny_text):
    tok = train_tokenizer(kind, [tiny_text + EOS], **({"vocab_size": 300} if kind == "bpe" else {}))
    assert tok.eos_id not in tok.encode("Emma " + EOS + " rich")
    assert tok.decode([tok.eos_id]) == ""


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_decoding_an_id_outside_the_vocabulary_is_an_error_not_some_other_token(kind, tiny_text):
    tok = train_tokenizer(kind, [tiny_text], **({"vocab_size": 300} if kind == "bpe" else {}))
    for bad in ([-1], [tok.vocab_size], [10**9]):  # -1 would be the last token; HF's decoder skips the others
        with pytest.raises(LmforgeError, match=f"token id {bad[0]} is outside the vocabulary"):
            tok.decode(bad)
    with pytest.raises(LmforgeError, match="whole-number token ids"):
        tok.decode([1.5])
    import numpy as np

    ids = tok.encode("Emma")
    assert tok.decode(np.array(ids)) == tok.decode(ids) != ""  # numpy ids are ids


def test_char_reports_unseen_characters():
    tok = train_tokenizer("char", ["abc abc"])
    ids = tok.encode("abzz!")
    assert ids[2:] == [tok.unk_id] * 3 and tok.decode(ids) == "ab<unk><unk><unk>"
    assert tok.unknown("abzz!") == {"z": 2, "!": 1}


def test_unknown_kind_and_option_errors(tiny_text):
    with pytest.raises(LmforgeError, match="char, word, bpe"):
        train_tokenizer("sentencepiece", [tiny_text])
    with pytest.raises(LmforgeError, match="vocab_size"):
        train_tokenizer("bpe", [tiny_text], vocab=100)
    with pytest.raises(LmforgeError, match="max_vocab, min_freq, lowercase, remove_stopwords"):
        train_tokenizer("word", [tiny_text], stopwords=True)
    with pytest.raises(LmforgeError, match="none"):
        train_tokenizer("char", [tiny_text], vocab_size=10)
    with pytest.raises(LmforgeError, match="257"):
        train_tokenizer("bpe", [tiny_text], vocab_size=100)


def test_load_any_hugging_face_tokenizer(tmp_path):
    """A non-BPE Hugging Face tokenizer.json (word level, with [UNK] and [SEP]) loads as well."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({"[UNK]": 0, "[SEP]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["[SEP]"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "bpe" and tok.eos_id == 1
    assert tok.encode("hello there world") == [2, 0, 3]
    assert tok.unknown("hello there world there") == {"there": 2}


def test_load_errors(tmp_path):
    with pytest.raises(LmforgeError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(LmforgeError, match="neither"):
        load_tokenizer(tmp_path)


def test_importing_lmforge_does_not_import_spacy():
    import subprocess
    import sys

    code = "import sys, lmforge.tokenizers, lmforge.data; assert 'spacy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_bpe_vocabulary_smaller_than_asked_says_so():
    from lmforge.tokenizers import vocab_text

    small = train_tokenizer("bpe", ["abab abab abab"], vocab_size=4096)  # few pairs to merge
    assert small.vocab_size < 4096
    assert vocab_text(small) == f"vocab {small.vocab_size} of the 4096 asked: the text has no more pairs to merge"
    assert vocab_text(train_tokenizer("char", ["abab"])) == f"vocab {train_tokenizer('char', ['abab']).vocab_size}"
