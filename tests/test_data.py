"""Data: sources, the per-document split, the prepare cache, and deterministic batches."""
import json

import numpy as np
import pytest
import torch

from lmforge.data import get_batch, open_prepared, prepare, read_sources
from lmforge.data.batches import get_epoch_batch
from lmforge.errors import LmforgeError
from lmforge.tokenizers import train_tokenizer

AUSTEN = ["gutenberg:austen-emma.txt", "gutenberg:austen-persuasion.txt"]


def test_gutenberg_ids_and_globs_read_offline(gutenberg_dir):
    docs = read_sources(AUSTEN)
    assert [d.name for d in docs] == ["gutenberg:" + f for f in ("austen-emma.txt", "austen-persuasion.txt")]
    assert docs[0].text == (gutenberg_dir / "austen-emma.txt").read_text(encoding="latin-1")
    assert [d.name for d in read_sources(["gutenberg:austen-*"])][:2] == [d.name for d in docs]
    with pytest.raises(LmforgeError, match="austen-emma.txt"):
        read_sources(["gutenberg:nobody.txt"])


def test_missing_gutenberg_corpus_says_how_to_fix(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: False)  # offline
    with pytest.raises(LmforgeError, match="NLTK_DATA"):
        read_sources(["gutenberg:austen-emma.txt"])


def test_files_folders_globs_and_crlf(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_bytes(b"second\r\nfile\r\n")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
    docs = read_sources([str(tmp_path)])
    assert [d.text for d in docs] == ["first", "second\nfile\n"]
    assert [d.text for d in read_sources([str(tmp_path / "**" / "*.txt")])] == ["first", "second\nfile\n"]
    with pytest.raises(LmforgeError, match="matches no files"):
        read_sources([str(tmp_path / "*.csv")])
    # what Windows editors write: a byte-order mark, and CRLF also inside JSON strings
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello\r\nthere")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one\\r\\ntwo"}\r\n{"text": "three"}\r\n')
    assert [d.text for d in read_sources([str(tmp_path / "bom.txt"), str(tmp_path / "bom.jsonl")])] == \
        ["hello\nthere", "one\ntwo", "three"]
    from lmforge.data.examples import read_jsonl

    (tmp_path / "pairs.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b", "split": "train"}\n')
    assert read_jsonl(tmp_path / "pairs.jsonl", ("prompt", "completion"))[0]["completion"] == "b"


def test_a_file_named_twice_is_read_once_and_paths_read_as_a_user_types_them(tmp_path, monkeypatch, gutenberg_dir):
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes[1].txt").write_text("bracketed", encoding="utf-8")
    # the same file by name, by glob and by folder: its text once, not three times
    assert [d.text for d in read_sources([str(tmp_path / "a.txt"), str(tmp_path / "a*.txt"), str(tmp_path)])] \
        == ["first", "bracketed"]
    assert [d.name for d in read_sources(["gutenberg:austen-emma.txt", "gutenberg:austen-*"])] == \
        ["gutenberg:austen-emma.txt", "gutenberg:austen-persuasion.txt", "gutenberg:austen-sense.txt"]
    assert [d.text for d in read_sources([str(tmp_path / "notes[1].txt")])] == ["bracketed"]  # a file, not a glob
    monkeypatch.setenv("HOME", str(tmp_path))
    assert [d.text for d in read_sources(["~/a*.txt"])] == ["first"]  # "~" in a quoted glob too


def test_a_folder_leaves_out_hidden_files_and_folders_as_a_glob_does(tmp_path):
    (tmp_path / "notes.txt").write_text("Emma", encoding="utf-8")
    (tmp_path / ".~lock.txt").write_text("Emma", encoding="utf-8")  # an editor's lock file
    (tmp_path / ".ipynb_checkpoints").mkdir()  # Jupyter's copies
    (tmp_path / ".ipynb_checkpoints" / "notes-checkpoint.txt").write_text("Emma", encoding="utf-8")
    assert [d.name for d in read_sources([str(tmp_path)])] == [str(tmp_path / "notes.txt")]
    assert [d.name for d in read_sources([str(tmp_path / "**" / "*.txt")])] == [str(tmp_path / "notes.txt")]
    with pytest.raises(LmforgeError, match="empty name"):
        read_sources([""])  # not the current folder


def test_jsonl_documents_and_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one", "body": "x"}\n\n{"body": "y", "text": "two"}\n', encoding="utf-8")
    assert [(d.name, d.text) for d in read_sources([str(path)])] == [(f"{path}:1", "one"), (f"{path}:3", "two")]
    assert [d.text for d in read_sources([str(path)], jsonl_field="body")] == ["x", "y"]
    path.write_text('{"text": "one"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"data.jsonl:2: not valid JSON"):
        read_sources([str(path)])
    path.write_text('{"text": "one"}\n{"content": "two"}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"data.jsonl:2: no string field 'text'.*--jsonl-field"):
        read_sources([str(path)])
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"data.jsonl:1: field 'text' is a number, not a string"):
        read_sources([str(path)])


def test_bad_utf8_names_file_offset_and_fix(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(LmforgeError, match=r"latin.txt: byte 3 .*--encoding latin-1.*--errors replace"):
        read_sources([str(path)])
    assert read_sources([str(path)], encoding="latin-1")[0].text == "café au lait"
    assert read_sources([str(path)], errors="replace")[0].text == "caf\ufffd au lait"
    # JSON can escape half of a surrogate pair, which is no character (and no file could hold it as UTF-8)
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "bad \\ud800 x"}\n{"text": "smile \\ud83d\\ude00"}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"rows.jsonl:2: .*unpaired surrogate.*--errors replace"):
        read_sources([str(path)])
    assert [d.text for d in read_sources([str(path)], errors="replace")] == ["ok", "bad \ufffd x", "smile 😀"]
    assert read_sources([str(path)], errors="ignore")[1].text == "bad  x"


def test_a_full_disk_while_preparing_names_the_cache_and_leaves_nothing_half_written(tiny_file, tmp_path,
                                                                                     monkeypatch):
    import importlib

    prepare_module = importlib.import_module("lmforge.data.prepare")

    def full(*args, **kwargs):
        raise OSError("4194308 requested and 2072536 written")  # what numpy's tofile says

    monkeypatch.setattr(prepare_module, "_encode_to", full)
    with pytest.raises(LmforgeError, match=r"cannot write the data cache .*cache \(4194308 requested.*MiB free there\)"
                                           r"; free some space"):
        prepare([str(tiny_file)], tokenizer="char", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_file_and_empty_corpus(tmp_path):
    with pytest.raises(LmforgeError, match="nothere.txt does not exist"):
        read_sources([str(tmp_path / "nothere.txt")])
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="hold no text"):
        read_sources([str(tmp_path / "blank.txt")])
    with pytest.raises(LmforgeError, match="hold no text"):
        read_sources([])


def test_split_is_int_len_times_0_9_per_document(tmp_path):
    texts = ["a" * 95 + "b" * 13, "c" * 7 + "d" * 50]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    p = prepare([str(tmp_path / "0.txt"), str(tmp_path / "1.txt")], cache_dir=tmp_path / "cache")
    cuts = [int(len(t) * 0.9) for t in texts]
    assert [d.text for d in p.documents] == [t[c:] for t, c in zip(texts, cuts)]
    assert p.val_text == "".join(t[c:] for t, c in zip(texts, cuts))
    assert (p.path / "train.txt").read_text(encoding="utf-8") == "".join(t[:c] for t, c in zip(texts, cuts))
    eos = p.tokenizer.eos_id
    # documents joined by eos: train = doc0 train, eos, doc1 train
    assert p.train.tolist() == p.tokenizer.encode(texts[0][:cuts[0]]) + [eos] + p.tokenizer.encode(texts[1][:cuts[1]])
    assert [p.val[slice(*d.tokens)].tolist() for d in p.documents] == [p.tokenizer.encode(d.text) for d in p.documents]
    assert p.val[p.documents[0].tokens[1]] == eos
    with pytest.raises(LmforgeError, match="val_fraction"):
        prepare([str(tmp_path / "0.txt")], val_fraction=1.0, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_prepare_writes_a_self_describing_cache_and_reuses_it(kind, tiny_file, tmp_path):
    options = {"vocab_size": 300} if kind == "bpe" else {}
    first = prepare([str(tiny_file)], tokenizer=kind, tokenizer_options=options, cache_dir=tmp_path)
    assert not first.reused
    assert sorted(f.name for f in first.path.iterdir()) == [
        "meta.json", "tokenizer.json", "train.bin", "train.txt", "val.bin", "val.txt"]
    meta = json.loads((first.path / "meta.json").read_text(encoding="utf-8"))
    assert meta["dtype"] == "uint16" and meta["train_tokens"] == len(first.train)
    assert meta["tokenizer"]["kind"] == kind and meta["tokenizer"]["fingerprint"] == first.tokenizer.fingerprint()
    doc = meta["documents"][0]
    assert doc["val_bytes"] == len(first.val_text.encode("utf-8")) == first.documents[0].bytes
    second = prepare([str(tiny_file)], tokenizer=kind, tokenizer_options=options, cache_dir=tmp_path)
    assert second.reused and second.path == first.path
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_cache_key_follows_content_and_options(tiny_file, tmp_path):
    base = prepare([str(tiny_file)], cache_dir=tmp_path)
    assert prepare([str(tiny_file)], tokenizer_options={}, cache_dir=tmp_path).path == base.path
    assert prepare([str(tiny_file)], val_fraction=0.2, cache_dir=tmp_path).path != base.path
    word = prepare([str(tiny_file)], tokenizer="word", tokenizer_options={"min_freq": 1}, cache_dir=tmp_path)
    other = prepare([str(tiny_file)], tokenizer="word", tokenizer_options={"min_freq": 3}, cache_dir=tmp_path)
    assert len({base.path, word.path, other.path}) == 3
    tiny_file.write_text(tiny_file.read_text() + "More.", encoding="utf-8")
    assert prepare([str(tiny_file)], cache_dir=tmp_path).path != base.path
    with pytest.raises(LmforgeError, match="valid options"):
        prepare([str(tiny_file)], tokenizer="char", tokenizer_options={"size": 3}, cache_dir=tmp_path)


def test_a_damaged_or_abandoned_cache_is_made_again_and_prepare_shares_trains_cache(tiny_file, tmp_path,
                                                                                      monkeypatch):
    import os

    from lmforge.config import RunConfig
    from lmforge.data import prepare_data

    first = prepare([str(tiny_file)], cache_dir=tmp_path)
    for size in (500, 501):  # token files cut short (an odd size is not even whole tokens): made again, not read
        with open(first.path / "train.bin", "r+b") as f:
            f.truncate(size)
        again = prepare([str(tiny_file)], cache_dir=tmp_path)
        assert not again.reused and len(again.train) == len(first.train) == again.meta["train_tokens"]
    stale = tmp_path / ".tmp-abc-12345678"  # left by a prepare killed two days ago
    stale.mkdir()
    os.utime(stale, (0, 0))
    fresh = tmp_path / ".tmp-def-12345678"  # a prepare still running
    fresh.mkdir()
    (tmp_path / "other.txt").write_text("Emma Woodhouse, handsome, clever and rich.\n" * 20, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    made = prepare(["other.txt"], cache_dir=tmp_path)  # a relative path, as a user types it
    assert not stale.exists() and fresh.exists()
    config = RunConfig.from_dict({"data": {"sources": ["other.txt"], "cache_dir": str(tmp_path)}}, "test")
    # what train reads is what prepare wrote: the same tokenizer by default (BPE), the same names
    assert prepare_data(config).path == made.path and made.tokenizer.kind == "bpe"


def test_default_cache_dir_from_environment(tiny_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "env-cache"))
    assert prepare([str(tiny_file)]).path.parent == tmp_path / "env-cache"
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "a-file"))  # said as such, not as "File exists"
    with pytest.raises(LmforgeError, match="a-file is a file, not a folder; set LMFORGE_CACHE"):
        prepare([str(tiny_file)])


def test_given_tokenizer_encodes_new_text_and_reports_unknown(tiny_file, tmp_path):
    base = train_tokenizer("char", ["Emma Woodhouse"])
    p = prepare([str(tiny_file)], tokenizer_obj=base, cache_dir=tmp_path)
    assert p.tokenizer is base and p.meta["tokenizer"]["trained"] is False
    assert p.unknown[","] > 0 and "E" not in p.unknown
    again = prepare([str(tiny_file)], tokenizer_obj=base, cache_dir=tmp_path)
    assert again.reused and again.unknown == p.unknown
    assert open_prepared(p.path).tokenizer.fingerprint() == base.fingerprint()


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_a_long_text_prepared_a_piece_at_a_time_is_encoded_as_the_whole(kind, gutenberg_dir, tmp_path, monkeypatch):
    # A corpus of hundreds of MB is encoded a few MB at a time, straight to the token files (not a Python
    # int per token in memory): the pieces, cut at line ends, must give the ids of the whole text.
    import importlib

    prepare_module = importlib.import_module("lmforge.data.prepare")  # (lmforge.data.prepare is the function)

    monkeypatch.setattr(prepare_module, "PIECE_CHARS", 3000)  # Persuasion in about 150 pieces
    options = {"vocab_size": 400} if kind == "bpe" else {}
    p = prepare(["gutenberg:austen-persuasion.txt"], tokenizer=kind, tokenizer_options=options, cache_dir=tmp_path)
    text = p.train_text
    assert len(list(prepare_module._pieces(text))) > 100
    whole = train_tokenizer(kind, [text], **options)
    assert whole.fingerprint() == p.tokenizer.fingerprint()  # trained on the pieces: the same tokenizer
    assert p.train.tolist() == whole.encode(text) and p.val.tolist() == whole.encode(p.val_text)
    assert p.meta["train_tokens"] == len(p.train) and p.meta["documents"][0]["val_bytes"] == len(
        p.val_text.encode("utf-8"))


def test_bpe_cuts_a_text_without_line_ends_at_spaces_and_encodes_it_as_the_whole():
    from lmforge.tokenizers.bpe import chunks

    text = ("It was a truth  universally acknowledged,\tthat a single man... " * 400).replace("\n", " ")
    pieces = list(chunks(text, 1000))
    assert "".join(pieces) == text and len(pieces) > 10 and max(map(len, pieces)) < 2100  # not one piece
    assert list(chunks(text, 1000, spaces=False)) == [text]  # prepare's cut: line ends only
    bpe = train_tokenizer("bpe", [text[:5000]], vocab_size=300)
    assert bpe.encode(text) == [i for piece in pieces for i in bpe.encode(piece)]
    assert bpe.encode(text) == bpe._hf.encode(text, add_special_tokens=False).ids  # Hugging Face's own, whole


def test_prepare_austen_bpe(gutenberg_dir, tmp_path):
    p = prepare(AUSTEN, tokenizer="bpe", tokenizer_options={"vocab_size": 512}, cache_dir=tmp_path)
    emma = (gutenberg_dir / "austen-emma.txt").read_text(encoding="latin-1")
    assert p.documents[0].text == emma[int(len(emma) * 0.9):]
    assert p.tokenizer.decode(p.val[slice(*p.documents[0].tokens)].tolist()) == p.documents[0].text


def test_get_batch_is_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, 4, 16, seed=1, step=7)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    again, _ = get_batch(tokens, 4, 16, seed=1, step=7)
    assert torch.equal(x, again)
    assert not torch.equal(x, get_batch(tokens, 4, 16, seed=1, step=8)[0])
    assert not torch.equal(x, get_batch(tokens, 4, 16, seed=2, step=7)[0])
    # the last window that fits is reachable, nothing past the end is
    x, y = get_batch(np.arange(17, dtype=np.uint16), 8, 16, seed=0, step=0)
    assert torch.equal(y[0], torch.arange(1, 17))


def test_epoch_batches_read_every_window_once_per_pass():
    tokens = np.arange(1000, dtype=np.uint16)
    per_pass = (1000 - 16) // 16  # 61 windows of 17 tokens from an offset below 16
    starts = [get_epoch_batch(tokens, 8, 16, seed=1, step=s)[0][:, 0].tolist() for s in range(16)]
    flat = [start for batch in starts for start in batch]
    for first in (flat[:per_pass], flat[per_pass:2 * per_pass]):  # each pass: a shuffled tiling, no repeats
        offset = first[0] % 16
        assert sorted(first) == list(range(offset, offset + 16 * per_pass, 16))
    assert flat[:per_pass] != flat[per_pass:2 * per_pass]  # a new offset or order each pass
    x, y = get_epoch_batch(tokens, 8, 16, seed=1, step=7)  # a batch across two passes, still a pure function
    assert torch.equal(x, get_epoch_batch(tokens, 8, 16, seed=1, step=7)[0])
    assert torch.equal(y[:, :-1], x[:, 1:]) and int(y.max()) < 1000
    # ranks take their share of the same batch
    halves = [get_epoch_batch(tokens, 8, 16, seed=1, step=3, rank=r, world=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), get_epoch_batch(tokens, 8, 16, seed=1, step=3)[0])


def test_a_split_under_two_windows_long_still_gives_whole_windows():
    for n in range(17, 40):  # one window of 17 tokens fits, a second does not
        tokens = np.arange(n, dtype=np.uint16)
        for step in range(20):
            x, y = get_epoch_batch(tokens, 4, 16, seed=1337, step=step)
            assert int(y.max()) < n and torch.equal(y[:, :-1], x[:, 1:])


def test_get_batch_too_short():
    with pytest.raises(LmforgeError, match="has 16 tokens, fewer than context_len \\+ 1 = 17"):
        get_batch(np.arange(16, dtype=np.uint16), 2, 16, seed=0, step=0)
