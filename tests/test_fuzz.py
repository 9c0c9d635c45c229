"""Property-based tests: random and malformed input thrown at every door (tokenizers, config files and
overrides, JSONL, the CLI, damaged run folders, the HTTP API). Every case ends in a valid result or a
clear error (LmforgeError, a usage message, a 4xx) and never touches what is already written.
Examples are derandomized, so CI sees the same cases every run; `FUZZ_EXAMPLES` scales them up."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.errors import LmforgeError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))
FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)  # surrogates and controls too
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                     max_size=4), max_leaves=12)
COUNTS = {}  # examples run per target, printed at the end of the session by test_zz_report


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


def count(target: str) -> None:
    COUNTS[target] = COUNTS.get(target, 0) + 1


def fingerprint(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.lock"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizers():
    from conftest import TINY_TEXT

    from lmforge.tokenizers import train_tokenizer

    return {kind: train_tokenizer(kind, [TINY_TEXT + "naïve café ☃ 日本\n"], **opts)
            for kind, opts in (("char", {}), ("word", {"min_freq": 1}), ("bpe", {"vocab_size": 300}))}


@settings(max_examples=examples(150), **FUZZ)
@given(text=ANY_TEXT)
def test_tokenizers_take_any_string(tokenizers, text):
    for kind, tok in tokenizers.items():
        count(f"tokenizer {kind}")
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size and i != tok.eos_id for i in ids)
        decoded = tok.decode(ids)
        assert isinstance(decoded, str) and isinstance(tok.unknown(text), dict)
        valid = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") == text if text else True
        if kind == "bpe" and valid:
            assert decoded == text  # byte-level BPE represents every string exactly
        if kind == "char" and not tok.unknown(text):
            assert decoded == text


def test_tokenizers_take_a_huge_string(tokenizers):
    huge = ("Emma \x00\x1b ☃ " * 20_000)[:150_000]
    for tok in tokenizers.values():
        assert len(tok.decode(tok.encode(huge))) > 0


@settings(max_examples=examples(200), **FUZZ)
@given(text=ANY_TEXT)
def test_any_toml_file_is_a_config_or_one_clear_error(tmp_path_factory, text):
    count("config file")
    path = tmp_path_factory.mktemp("toml") / "c.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        lmforge.build_config(path)
    except LmforgeError as e:
        assert "\n" not in str(e).strip() or "TOML" in str(e)


KEYS = ["data.sources", "data.val_fraction", "data.encoding", "data.errors", "tokenizer.kind", "tokenizer.vocab_size",
        "model.arch", "model.d_model", "model.dropout", "model.n_heads", "train.lr", "train.batch_size",
        "train.max_time", "train.max_steps", "train.dtype", "train.optimizer", "train.threads", "finetune.base",
        "nonsense.key", "train", "train.lr.x"]


@settings(max_examples=examples(300), **FUZZ)
@given(items=st.lists(st.tuples(st.sampled_from(KEYS), st.text(max_size=20) | st.integers().map(str)
                                | st.floats().map(repr) | st.sampled_from(["true", "[1, 2]", '"x"', "{a = 1}", "0", "-1",
                                                                           "1e400", "nan", "[]"])), max_size=5))
def test_any_overrides_are_a_config_or_one_clear_error(items):
    count("overrides")
    try:
        config = lmforge.build_config(overrides=[f"{k}={v}" for k, v in items])
        from lmforge.training.jobs import check

        check(config)
    except LmforgeError:
        pass


@settings(max_examples=examples(200), **FUZZ)
@given(data=st.binary(max_size=400) | st.lists(JSON_VALUES, max_size=5).map(
    lambda rows: "\n".join(json.dumps(r) for r in rows).encode()))
def test_any_jsonl_file_is_documents_or_one_clear_error(tmp_path_factory, data):
    from lmforge.data import read_sources
    from lmforge.data.examples import read_jsonl

    count("jsonl")
    path = tmp_path_factory.mktemp("jsonl") / "x.jsonl"
    path.write_bytes(data)
    for read in (lambda: read_sources([str(path)]), lambda: read_jsonl(path, ("text", "label")),
                 lambda: read_jsonl(path, ("prompt", "completion"))):
        try:
            read()
        except LmforgeError:
            pass


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import TINY_TEXT

    folder = tmp_path_factory.mktemp("fuzzrun")
    (folder / "tiny.txt").write_text(TINY_TEXT)
    config = {"data": {"sources": [str(folder / "tiny.txt")], "cache_dir": str(folder / "cache")},
              "tokenizer": {"kind": "char"},
              "model": {"arch": "transformer", "d_model": 16, "n_layers": 1, "n_heads": 2, "context_len": 16},
              "train": {"max_steps": 4, "max_time": 0, "batch_size": 4, "progress": False, "threads": 1}}
    lmforge.train(config, out=folder / "run", log=lambda *_: None)
    return folder / "run"


FILES = ["config.json", "model.safetensors", "tokenizer.json", "manifest.json", "checkpoints/step-00000004/model.safetensors",
         "checkpoints/step-00000004/trainer_state.json", "checkpoints/step-00000004/average.safetensors"]


@settings(max_examples=examples(120), **FUZZ)
@given(file=st.sampled_from(FILES), how=st.sampled_from(["truncate", "flip", "delete", "garbage", "json"]),
       at=st.floats(0, 1), payload=st.binary(min_size=1, max_size=64), value=JSON_VALUES)
def test_a_damaged_run_folder_loads_or_names_the_problem_and_is_left_as_it_was(tiny_run, tmp_path_factory, file, how,
                                                                              at, payload, value):
    count("damaged run folder")
    run = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(tiny_run, run)
    target = run / file
    data = target.read_bytes()
    cut = int(len(data) * at)
    if how == "truncate":
        target.write_bytes(data[:cut])
    elif how == "flip":
        target.write_bytes(data[:cut] + bytes([data[cut % len(data)] ^ payload[0] or 1]) + data[cut + 1:])
    elif how == "delete":
        target.unlink()
    elif how == "garbage":
        target.write_bytes(payload)
    else:
        target.write_text(json.dumps(value))
    before = fingerprint(run)
    try:
        lm = lmforge.load(run)
        assert lm.generate("Emma", 3, seed=0) is not None
    except LmforgeError as e:
        assert "\n" not in str(e)
    try:
        lmforge.train(None, out=run, resume=True, log=lambda *_: None, final_eval=False,
                      overrides=["train.max_steps=4"])
    except LmforgeError as e:
        assert "\n" not in str(e)
    else:
        return  # the resume repaired nothing it should not have: it trained from a readable point
    assert fingerprint(run) == before  # a refused resume writes nothing


ARGS = st.lists(st.sampled_from(["--prompt", "Emma", "-n", "3", "0", "-1", "nan", "inf", "1e9", "--seed", "--top-k",
                                 "--top-p", "--temperature", "--stop", "", "--greedy", "--num-samples", "--exact",
                                 "--json", "--text", "/nonexistent", "--device", "cuda", "mps", "x", "--report",
                                 "--max-new-tokens", "\udcff", "☃", "--jsonl-field", "--encoding", "bogus",
                                 "--errors", "replace"]), max_size=6)


@settings(max_examples=examples(150), **FUZZ)
@given(verb=st.sampled_from(["generate", "eval"]), args=ARGS)
def test_the_cli_answers_any_arguments_with_a_result_or_one_line(tiny_run, capsys, verb, args):
    count(f"cli {verb}")
    if "--report" in args:
        return  # writes a report folder: covered in test_report.py
    if verb == "generate" and "-n" not in args and "--max-new-tokens" not in args:
        args = args + ["-n", "3"]
    before = fingerprint(tiny_run)
    try:
        code = main([verb, str(tiny_run), *args])
    except SystemExit as e:  # argparse: a usage line and the error
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2 and err.startswith("error: "):
        assert len(err.strip().splitlines()) == 1
    assert fingerprint(tiny_run) == before


@settings(max_examples=examples(150), **FUZZ)
@given(body=JSON_VALUES, extra=st.dictionaries(st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "top_k",
                                                                 "n", "stream", "stop", "seed", "echo", "messages",
                                                                 "model", "logprobs", "stream_options"]),
                                                JSON_VALUES, max_size=5),
       endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_the_api_answers_any_body_with_a_result_or_a_4xx(served, body, extra, endpoint):
    import httpx

    from conftest import KEY

    count(f"http {endpoint}")
    _, server = served
    payload = {"model": "austen", **extra} if isinstance(body, dict) or not extra else body
    if isinstance(payload, dict) and "max_tokens" not in extra:
        payload["max_tokens"] = 4
    response = httpx.post(server.url + endpoint, content=json.dumps(payload),  # NaN and Infinity included
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and "Traceback" not in error["message"]


def test_zz_report_examples_per_target(capsys):
    with capsys.disabled():
        print("\nfuzz cases per target:", json.dumps(dict(sorted(COUNTS.items()))))
