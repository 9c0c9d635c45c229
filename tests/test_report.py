"""`lmforge eval RUN --report DIR` on tiny in-process runs: files, fields, sane numbers, word tokenizers."""
import json

import pytest

import lmforge
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.evaluation.continuation import make_prompts
from lmforge.evaluation.report import PLOTS, write_report

N_PROMPTS = 6


def quiet(*_):
    pass


def _train(tmp_path, source, tokenizer):
    config = {
        "data": {"sources": [str(source)], "cache_dir": str(tmp_path / "cache")},
        "tokenizer": {"kind": tokenizer},
        "model": {"arch": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "context_len": 32},
        "train": {"max_steps": 20, "max_time": 0, "batch_size": 8, "warmup_steps": 5, "eval_interval": 10,
                  "progress": False, "sample_tokens": 10},
    }
    lm, _ = lmforge.train(config, out=tmp_path / f"run-{tokenizer}", log=quiet, final_eval=False)
    return lm


@pytest.fixture(scope="module")
def austen_file(tmp_path_factory):
    """60 kB of Emma: enough sentence starts and varied text for every metric to mean something."""
    from conftest import CORPUS

    if CORPUS is None:
        pytest.skip("no Gutenberg corpus here: set NLTK_DATA to a folder holding corpora/gutenberg")
    GUTENBERG = CORPUS / "corpora" / "gutenberg"
    text = (GUTENBERG / "austen-emma.txt").read_text(encoding="latin-1")[10_000:70_000]
    path = tmp_path_factory.mktemp("data") / "emma-slice.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def char_report(tmp_path_factory, austen_file):
    tmp = tmp_path_factory.mktemp("char")
    lm = _train(tmp, austen_file, "char")
    report = write_report(lm, tmp / "report", n_prompts=N_PROMPTS, seed=0, progress=False, log=quiet)
    return lm, report, tmp / "report"


def test_report_folder_holds_markdown_json_and_plots(char_report):
    _, report, out = char_report
    for name in ("report.md", "report.json", *PLOTS):
        assert (out / name).stat().st_size > 0, name
    assert (out / "per_document_bpb.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert not [p.name for p in out.iterdir() if "tmp" in p.name]  # no temp files left behind
    md = (out / "report.md").read_text()
    from lmforge.evaluation.continuation import TEMPERATURE, TOP_K

    lm = char_report[0]
    for sample in report["continuation"]["samples"][:3]:  # each model sample is what generate writes
        again = lm.generate(sample["prompt"], len(sample["original"]) + 8, TEMPERATURE, top_k=TOP_K,
                            seed=sample["seed"])
        assert again.startswith(sample["model"])
    for heading in ("Likelihood", "Baselines", "Continuation test", "Samples", "Definitions", "PPMd"):
        assert heading in md, heading
    assert "per_document_bpb.png" in md and "baselines.png" in md


def test_report_numbers_are_complete_and_sane(char_report):
    lm, report, _ = char_report
    lik, base, con = report["likelihood"], report["baselines"], report["continuation"]
    assert lik["bits_per_byte"] == pytest.approx(lm.evaluate()["bits_per_byte"])  # same as `lmforge eval`
    for field in ("perplexity", "accuracy", "top5_accuracy", "unknown_rate", "documents"):
        assert field in lik
    # Compressors that have read the train split need well under 8 bits per byte of English,
    # and PPMd (a context model) beats gzip (32 kB window of LZ77 matches).
    comp = base["compressors"]
    assert set(comp) == {"gzip", "bzip2", "xz", "ppmd"}
    assert all(0.5 < v < 6 for v in comp.values()), comp
    assert comp["ppmd"] < comp["gzip"]
    # A 5-gram with context beats a context-free unigram; a byte unigram of English costs ~4.5 bits.
    assert base["kn5"]["bits_per_byte"] < base["unigram"]["bits_per_byte"]
    assert 3.5 < base["unigram"]["bits_per_byte"] < 5.5
    assert con["settings"]["prompts"] == N_PROMPTS and len(con["samples"]) == N_PROMPTS
    for key in ("model", "kn5", "unigram", "original"):
        s = con["systems"][key]
        assert 0 <= s["copy_rate"] <= 1 and 0 <= s["repetition_rate"] <= 1 and 0 < s["distinct_1"] <= 1
    for key in ("model", "kn5", "unigram"):
        assert 0 <= con["systems"][key]["chrf"] <= 100 and con["systems"][key]["bits_per_byte"] > 0
    assert con["systems"]["kn5"]["bits_per_byte"] < con["systems"]["unigram"]["bits_per_byte"]
    for s in con["samples"]:  # every generation is trimmed to its original's length
        assert s["original"][:1].isspace() and not s["prompt"][-1:].isspace()
        assert all(len(s[key]) <= len(s["original"]) for key in ("model", "kn5", "unigram"))


def test_rewriting_a_report_overwrites_only_an_earlier_report(char_report, tmp_path):
    lm, _, _ = char_report
    out = tmp_path / "again"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "report.md").write_text("old")
    with pytest.raises(LmforgeError, match="holds report.md, not an earlier lmforge report"):
        write_report(lm, out, n_prompts=3, seed=1, progress=False, log=quiet)
    assert (out / "report.md").read_text() == "old"
    (out / "report.md").unlink()
    write_report(lm, out, n_prompts=2, seed=1, progress=False, log=quiet)
    report = write_report(lm, out, n_prompts=3, seed=1, progress=False, log=quiet)  # the earlier one, refreshed
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "report.json").read_text())["continuation"]["settings"]["prompts"] == 3
    assert report["continuation"]["settings"]["prompts"] == 3


def test_report_on_a_text_file_and_its_errors(char_report, tmp_path):
    lm, _, _ = char_report
    text = tmp_path / "other.txt"
    text.write_text(" ".join(["She smiled at him. He said nothing at all to anyone that day, and the "
                              "weather was fine."] * 40), encoding="utf-8")
    report = write_report(lm, tmp_path / "r", text_path=text, n_prompts=2, progress=False, log=quiet)
    assert report["text"]["documents"] == [str(text)]  # named as `lmforge eval --text` names it
    assert list(report["likelihood"]["documents"]) == [str(text)]
    assert report["text"]["bytes"] == len(text.read_bytes())
    # read as `eval --text` reads it: every JSONL document, from the field named
    line = "She smiled at him. He said nothing at all to anyone that day, and the weather was fine. " * 20
    (tmp_path / "two.jsonl").write_text("\n".join(json.dumps({"body": line}) for _ in range(2)))
    report = write_report(lm, tmp_path / "j", text_path=tmp_path / "two.jsonl", n_prompts=2, progress=False,
                          log=quiet, jsonl_field="body")
    assert report["text"]["documents"] == [f"{tmp_path / 'two.jsonl'}:{i}" for i in (1, 2)]
    for folder in ("a", "b"):  # two files of one name: two documents, each scored by every baseline
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ch.txt").write_text(line * (2 if folder == "a" else 3), encoding="utf-8")
    report = write_report(lm, tmp_path / "g", text_path=str(tmp_path / "*" / "ch.txt"), n_prompts=2,
                          progress=False, log=quiet)
    names = [str(tmp_path / folder / "ch.txt") for folder in ("a", "b")]
    assert list(report["likelihood"]["documents"]) == names == list(report["baselines"]["kn5"]["documents"])
    text.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(LmforgeError, match="not valid utf-8"):
        write_report(lm, tmp_path / "r", text_path=text, n_prompts=2, progress=False, log=quiet)
    with pytest.raises(LmforgeError, match="prompts"):
        write_report(lm, tmp_path / "r", text_path=None, n_prompts=100_000, progress=False, log=quiet)


def test_cli_writes_the_report_and_prints_the_summary(char_report, tmp_path, capsys):
    lm, _, _ = char_report
    assert main(["eval", str(lm.run_dir), "--report", str(tmp_path / "cli"), "--prompts", "2"]) == 0
    printed = capsys.readouterr().out
    assert "PPMd" in printed and str(tmp_path / "cli" / "report.md") in printed
    assert (tmp_path / "cli" / "report.json").exists()


def test_word_tokenizer_report_flags_bits_per_byte_as_a_lower_bound(tmp_path, austen_file):
    lm = _train(tmp_path, austen_file, "word")
    report = write_report(lm, tmp_path / "report", n_prompts=3, progress=False, log=quiet)
    lik = report["likelihood"]
    assert lik["bits_per_byte_is_lower_bound"] is True and lik["unknown_rate"] > 0
    assert lik["top_unknown"]
    assert "lower bound" in (tmp_path / "report" / "report.md").read_text()
    # a prompt ending in a word the vocabulary has only with a space after it: the model writes that word
    words = lm.tokenizer.token_strings()
    spaced = next(w for w in words if w.endswith(" ") and w[:-1].isalpha() and w[:-1] not in words)
    prompt = "and then " + spaced[:-1]
    assert lm.prompt_ids(prompt)[-1] == lm.tokenizer.unk_id and lm.prompt_tail(prompt) == spaced[:-1]
    out = lm.complete(prompt, lmforge.generation.SamplingConfig(3, 0.0))
    assert lm.tokenizer.decode(out.token_ids[:1]).startswith(spaced[:-1])


def test_prompts_are_spread_over_documents_by_length():
    docs = [("long", "Abc def. " * 300), ("short", "Xyz uvw. " * 100)]
    prompts = make_prompts(docs, 8, seed=0)
    assert [p.document for p in prompts].count("long") == 6
    assert [p.document for p in prompts].count("short") == 2
    for p in prompts:
        text = dict(docs)[p.document]
        assert text[p.offset:].startswith(p.prompt + p.original)
        assert len(p.prompt) <= 100 and len(p.original) <= 200


def test_prompts_go_only_to_documents_long_enough_to_hold_them():
    docs = [(f"short {i}", "Abc def. " * 10) for i in range(20)] + [("long", "Abc def. " * 200)]
    prompts = make_prompts(docs, 8, seed=0)  # by length the short ones would get some; none can hold one
    assert [p.document for p in prompts] == ["long"] * 8
    with pytest.raises(LmforgeError, match=r"asked for 8 prompts, but the held-out text \(1,800 characters in 20 "
                                           r"documents\) has 0 sentence starts"):
        make_prompts(docs[:20], 8, seed=0)
