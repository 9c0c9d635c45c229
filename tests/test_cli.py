"""The `lmforge` command end to end on a tiny corpus, and every bad input ending in one clear line."""
import json
import re
import shutil
import socket

import pytest

from lmforge.cli import main

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.context_len=32",
        "train.batch_size=8", "train.warmup_steps=5", "train.eval_interval=10", "train.threads=1", "train.sample_tokens=20"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from conftest import TINY_TEXT

    folder = tmp_path_factory.mktemp("cli")
    (folder / "tiny.txt").write_text(TINY_TEXT)
    code = main(["train", "--out", str(folder / "run"), "--data", str(folder / "tiny.txt"), "--tokenizer", "char",
                 "--max-steps", "40", "--no-progress", f"data.cache_dir={json.dumps(str(folder / 'cache'))}", *TINY])
    assert code == 0
    return folder


def test_a_long_validation_split_is_scored_on_a_share_of_each_document_after_training(tmp_path, capsys,
                                                                                         monkeypatch):
    # scoring a corpus's whole validation split (24M characters of a 245 MB corpus) took minutes after a
    # short run: the end-of-training figure takes a leading share, cut at a line end, and says so
    from conftest import TINY_TEXT

    from lmforge import api

    for i in range(2):
        (tmp_path / f"{i}.txt").write_text(TINY_TEXT * (i + 1))
    monkeypatch.setattr(api, "FINAL_EVAL_CHARS", 300)
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "0.txt"), str(tmp_path / "1.txt"),
                 "--tokenizer", "char", "--max-steps", "2", "--no-progress",
                 f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", *TINY]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    val = summary["val"]
    lm = api.load(str(tmp_path / "run"))
    docs = lm.validation_documents()
    assert val["val_chars"] == sum(len(text) for _, text in docs) > 300 >= val["scored_chars"] > 0
    assert all(text.endswith("\n") for _, text in docs)  # cut back to a line end, not on to the next (the end)
    assert val["tokens"] < lm.evaluate()["tokens"] and set(val["documents"]) == {name for name, _ in docs}
    assert f"on the first {val['scored_chars']:,} of {val['val_chars']:,} characters" in out


def test_sigterm_stops_prepare_as_ctrl_c_does_leaving_no_half_written_folder(tmp_path, capsys, monkeypatch):
    import importlib
    import os
    import signal

    prepare_module = importlib.import_module("lmforge.data.prepare")

    def killed(*args, **kwargs):  # `kill PID` arrives while the text is being encoded
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop prepare")

    monkeypatch.setattr(prepare_module, "_encode_to", killed)
    (tmp_path / "a.txt").write_text("Emma Woodhouse, handsome, clever, and rich.\n" * 20)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["prepare", str(tmp_path / "a.txt"), "--tokenizer", "char", "--cache-dir", str(tmp_path / "c")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted" and list((tmp_path / "c").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # handed back


def test_compiling_without_a_cpp_compiler_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    from lmforge import api, device

    monkeypatch.setattr(api, "cpp_compiler", lambda: None)
    code = main(["train", "--out", str(tmp_path / "run"), "--tokenizer", "char", "--max-steps", "2", "--no-progress",
                 "--data", "gutenberg:austen-persuasion.txt", "train.compile=true", *TINY])
    one_line_error(capsys, code, "train.compile=true needs a C++ compiler", "train.compile=false")
    assert not (tmp_path / "run").exists()
    # Dynamo's wrapper says "raised:" on its first line; the cause is on the next
    wrapped = RuntimeError("backend='inductor' raised:\nCppCompileError: C++ compile error\n\nCommand: ...")
    assert device.compile_failure(wrapped) == "torch.compile failed: RuntimeError: CppCompileError: C++ compile error"
    monkeypatch.setattr(device, "cpp_compiler", lambda: None)
    assert device.compile_failure(wrapped) == "torch.compile failed: no C++ compiler found (install g++ or clang++)"


def test_generate_compile_falls_back_to_the_uncompiled_step_when_compiling_fails(cli_run, capsys, monkeypatch):
    import torch

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    from lmforge import probe

    measured = probe.choices  # on a busy machine the probe may find int8 no faster, and decode in fp32
    monkeypatch.setattr(probe, "choices", lambda *a, **k: {**measured(*a, **k), "decoding": "int8"})
    monkeypatch.setattr(torch, "compile", broken)
    capsys.readouterr()
    run = str(cli_run / "run")
    assert main(["generate", run, "--prompt", "Emma", "-n", "12", "--seed", "1", "--compile", "-v"]) == 0
    out, err = capsys.readouterr()
    assert "decoding step not compiled (torch.compile failed: RuntimeError: no C++ compiler found)" in err
    assert "compiled step" not in err and len(out) == len("Emma") + 12 + 1


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: ")
    for needle in needles:
        assert needle in last, last
    return last


def test_train_generate_eval_end_to_end(cli_run, capsys):
    import lmforge

    capsys.readouterr()
    run = str(cli_run / "run")
    lm = lmforge.load(run)
    assert main(["generate", run, "--prompt", "Emma", "-n", "30", "--seed", "1"]) == 0
    continuation = lm.generate("Emma", max_new_tokens=30, seed=1)
    assert len(continuation) == 30  # a char model: one character per token (no end of text in 30 here)
    assert capsys.readouterr().out == "Emma" + continuation + "\n"  # the API's continuation, after the prompt
    assert main(["generate", run, "--prompt", "Emma", "-n", "30", "--seed", "2", "--num-samples", "2"]) == 0
    two = capsys.readouterr().out.split("-" * 40 + "\n")
    assert two[:2] == ["Emma" + lm.generate("Emma", max_new_tokens=30, seed=s) + "\n" for s in (2, 3)]
    largest = 2**64 - 1  # the next sample's seed wraps to 0, rather than failing after the first sample
    assert main(["generate", run, "--prompt", "Emma", "-n", "5", "--seed", str(largest), "--num-samples", "2"]) == 0
    assert capsys.readouterr().out.split("-" * 40 + "\n")[1] == "Emma" + lm.generate("Emma", 5, seed=0) + "\n"
    assert main(["generate", run, "--prompt", "Emma", "-n", "30", "--seed", "1", "--top-k", "0"]) == 0
    assert capsys.readouterr().out == "Emma" + continuation + "\n"  # top-k 0 keeps every token, as chat's /top_k 0
    for flags in (["--temperature", "1.5"], ["--top-k", "5", "--top-p", "0.9"]):  # greedy would ignore them
        assert main(["generate", run, "--prompt", "Emma", "--greedy", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --greedy") and all(f in err for f in flags if f.startswith("--"))
    assert main(["eval", run, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bits_per_byte"] == pytest.approx(lm.evaluate()["bits_per_byte"], rel=1e-9)
    assert result["documents"].keys() == {str(cli_run / "tiny.txt")}
    assert main(["eval", run]) == 0
    out = capsys.readouterr().out
    assert f"{result['bits_per_byte']:.4f}" in out
    name = str(cli_run / "tiny.txt")
    assert (name if len(name) <= 60 else "…" + name[-59:]) in out  # the document's row names it whole
    deep = cli_run / ("long-folder-name-" * 4) / "austen-emma-chapter-one.txt"
    deep.parent.mkdir()
    deep.write_text((cli_run / "tiny.txt").read_text())
    assert main(["eval", run, "--text", str(deep)]) == 0
    out = capsys.readouterr().out
    row = out.splitlines()[2]
    assert row.startswith("…") and row.split()[0].endswith("/austen-emma-chapter-one.txt"), row
    assert "lower bound" not in out
    (cli_run / "snow.txt").write_text("Emma ☃☃☃ snow")  # characters the run never saw: the figure flatters
    assert main(["eval", run, "--text", str(cli_run / "snow.txt")]) == 0
    assert "a lower bound" in capsys.readouterr().out


def test_prepare_reports_and_reuses_its_cache(tmp_path, tiny_file, capsys):
    args = ["prepare", str(tiny_file), "--tokenizer", "char", "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("written")
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("reused")
    (tmp_path / "new.txt").write_text("abc " * 300 + "zé😀qq")  # the last 10% holds characters never trained on
    assert main(["prepare", str(tmp_path / "new.txt"), "--tokenizer", "char", "--cache-dir", str(tmp_path / "c")]) == 0
    note = capsys.readouterr().out.splitlines()[-1]
    assert "<unk>" in note and "'é'×1" in note and "'q'×2" in note


def test_unknown_prompt_characters_are_reported(cli_run, capsys):
    capsys.readouterr()
    assert main(["generate", str(cli_run / "run"), "--prompt", "Emma ☃", "-n", "5"]) == 0
    err = capsys.readouterr().err
    assert "☃" in err and "<unk>" in err
    assert main(["generate", str(cli_run / "run"), "--prompt", "Emma " * 100, "-n", "5"]) == 0
    assert "more than the model's context of" in capsys.readouterr().err  # said, not silently cut


def test_serve_on_a_taken_port_is_one_line(cli_run, capsys):
    pytest.importorskip("uvicorn")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(capsys, main(["serve", str(cli_run / "run"), "--port", str(port)]), "in use", "--port")


@pytest.mark.parametrize("args, needles", [
    (["generate", "{run}", "--temperature", "-1"], ["temperature"]),
    (["generate", "{run}", "--top-p", "1.5"], ["top_p"]),
    (["generate", "{run}", "--temperature", "nan"], ["temperature"]),
    (["generate", "{run}", "--num-samples", "-1"], ["--num-samples"]),
    (["generate", "{run}", "--stop", "x", "--stop", ""], ["--stop ''", "stop nothing"]),
    (["train", "--out", "{tmp}/r", "--max-time", "0"], ["give a budget", "--max-time 0 is no time limit"]),
    (["generate", "{run}", "--seed", "-1"], ["seed", "from 0"]),
    (["train", "--resume", "{run}", "--out", "{tmp}/elsewhere", "--max-steps", "50"], ["--resume", "--out"]),
    (["train", "--out", "{tmp}/r", "--max-steps", "1", "train.lr=abc"], ["train.lr", "abc"]),
    (["train", "--out", "{tmp}/r", "--max-steps", "1", "train.batch_size=abc"], ["train.batch_size", "abc"]),
    (["train", "--out", "{tmp}/r", "--max-steps", "1", "model.dropout=lots"], ["model.dropout", "lots"]),
    (["generate", "{tmp}", "--prompt", "x"], ["not an lmforge run"]),
    (["generate", "{tmp}/nowhere"], ["does not exist"]),
    (["eval", "{run}", "--text", "{tmp}/missing.txt"], ["missing.txt"]),
    (["eval", "{run}", "--adapt-lr", "0.1"], ["--adapt"]),
    (["train", "--out", "{tmp}/r", "--tokenizer", "klingon", "--max-steps", "1"], ["klingon", "char"]),
    (["train", "--out", "{tmp}/r", "--arch", "rnnx", "--max-steps", "1"], ["rnnx", "transformer"]),
    (["train", "--out", "{tmp}/r", "--max-steps", "1", "model.d_modle=3"], ["d_modle", "did you mean 'd_model'?"]),
    (["train", "--out", "{tmp}/r", "--max-steps", "1", "train.lr_typo=3"], ["lr_typo"]),
    (["train", "--out", "{tmp}/r", "--max-steps", "1", "train.batchsize=3"], ["did you mean 'batch_size'?"]),
    (["train", "--out", "{tmp}/r", "--max-steps", "1", "trian.lr=3"], ["did you mean 'train'?"]),
    (["train", "--out", "{tmp}/r", "--max-time", "five minutes"], ["five minutes"]),
    (["train", "--out", "{tmp}/r", "--data", "{tmp}/absent.txt", "--max-steps", "1"], ["absent.txt"]),
    (["train", "--out", "{tmp}/r", "--config", "{tmp}/absent.toml"], ["absent.toml"]),
    (["train", "--resume", "{run}", "--max-steps", "30", "model.d_model=64"], ["conflict", "d_model"]),
    (["train", "--out", "{tmp}/r", "--budget", "1m", "--max-time", "30"], ["--budget", "--max-time"]),
    (["train", "--out", "{tmp}/r", "--budget", "1m", "--arch", "gru"], ["--budget", "gru", "--max-time"]),
    (["train", "--out", "{tmp}/r", "--budget", "soon"], ["soon"]),
    (["train", "--out", "{tmp}/r", "gutenberg:austen-sense.txt"], ["--data gutenberg:austen-sense.txt"]),
    (["train", "--out", "{tmp}/r", "train.lr"], ["section.key=value"]),
    (["train", "--out", "{tmp}/r", "--seed", "7", "train.seed=9"], ["--seed 7 and train.seed=9", "give one"]),
    (["serve", "{run}", "--port", "99999"], ["--port", "65535"]),
    (["train", "--resume", "{run}", "--preset", "tutorial"], ["--preset"]),  # refused, not ignored
    (["train", "--resume", "{run}", "--max-steps", "1"], ["trained", "--max-steps 1"]),  # not a shorter config
    (["eval", "{run}", "--report", "{tmp}/report", "--json"], ["--report", "--json"]),
    (["serve", "{run}", "--threads", "-5"], ["--threads", "at least 1"]),
    (["serve", "{run}", "--max-waiting", "-1"], ["--max-waiting", "at least 0"]),
    (["finetune", "{run}", "--data", "{run}/../tiny.txt", "--out", "{tmp}/f", "--device", "tpu"], ["'tpu'", "cpu"]),
    (["bench", "serve", "--clients", "a,b"], ["--clients", "whole numbers"]),
    (["bench", "serve", "--duration", "0"], ["--duration", "positive"]),
    (["train", "--out", "{tmp}/r", "--seed", "-3", "--max-steps", "1"], ["train.seed", "-3"]),
    (["train", "--out", "{tmp}/r", "--max-steps", "1", "train.threads=100000"], ["train.threads", "1024"]),
])
def test_bad_input_gets_one_clear_line(cli_run, tmp_path, capsys, args, needles):
    args = [a.format(run=cli_run / "run", tmp=tmp_path) for a in args]
    one_line_error(capsys, main(args), *needles)


def test_bad_corpora_get_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "short.txt").write_text("Too short.")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    base = ["train", "--out", str(tmp_path / "r"), "--tokenizer", "char", "--max-steps", "1",
            f"data.cache_dir={json.dumps(str(tmp_path / 'c'))}", *TINY]
    one_line_error(capsys, main(base + ["--data", str(tmp_path / "empty.txt")]), "empty")
    one_line_error(capsys, main(base + ["--data", str(tmp_path / "short.txt")]), "context_len")
    line = one_line_error(capsys, main(base + ["--data", str(tmp_path / "latin.txt")]), "latin.txt", "byte 3")
    assert "encoding" in line
    assert main(base + ["--data", str(tmp_path / "latin.txt"), "--encoding", "latin-1"]) == 2  # decodes; too short
    assert "context_len" in capsys.readouterr().err
    (tmp_path / "long.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    one_line_error(capsys, main(base + ["--data", str(tmp_path / "long.txt"), "data.val_fraction=0.0002"]),
                   "validation split has 1 token(s)", "data.val_fraction")
    assert not (tmp_path / "r" / "config.json").exists()


def test_truncated_checkpoint_is_reported_and_left_alone(cli_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cli_run / "run", run)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    one_line_error(capsys, main(["generate", str(run), "--prompt", "Emma"]), "corrupt")
    assert len(weights.read_bytes()) == 100
    (run / "config.json").write_text("{ not json")
    one_line_error(capsys, main(["eval", str(run)]), "config")


def test_budget_sizes_the_model_and_sets_the_time(tmp_path, tiny_file, capsys):
    # A tiny budget on a tiny machine share picks the smallest rung; the run stops on time.
    args = ["train", "--out", str(tmp_path / "run"), "--data", str(tiny_file), "--tokenizer", "char", "--budget", "2s",
            "--no-progress", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", "model.context_len=32",
            "train.batch_size=4", "train.threads=1", "train.sample_tokens=5", "train.eval_batches=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "budget 2 s" in out and "d_model 128, 2 layers, 2 heads" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["options"]["d_model"] == 128 and config["model"]["options"]["n_layers"] == 2
    assert config["train"]["max_time"] == 2.0
    # A budget that reads the text many times gets more dropout and weight decay, unless the user chose them.
    many = re.search(r"about (\d+) passes over the training text: dropout 0.1", out)
    assert config["model"]["options"]["dropout"] == (0.1 if many else 0.05), out  # else the default
    if many:
        assert int(many.group(1)) >= 8  # more than 8.0 passes, printed rounded
        assert config["train"]["weight_decay"] == 1.5  # and more weight decay
        chosen_args = [*args[:2], str(tmp_path / "chosen"), *args[3:], "model.dropout=0.0", "train.weight_decay=0.2"]
        assert main(chosen_args) == 0
        assert "passes over the training text" not in capsys.readouterr().out
        chosen = json.loads((tmp_path / "chosen" / "config.json").read_text())
        assert (chosen["model"]["options"]["dropout"], chosen["train"]["weight_decay"]) == (0.0, 0.2)
    sized = ["train", "--out", str(tmp_path / "other"), "--budget", "2s", "model.n_layers=3"]
    one_line_error(capsys, main(sized), "model.n_layers", "--max-time")
    assert not (tmp_path / "other").exists()  # refused before the run folder was made


def test_the_python_api_names_wrong_arguments(cli_run, tmp_path, monkeypatch):
    import lmforge
    from lmforge.errors import LmforgeError
    from lmforge.generation import SamplingConfig

    lm = lmforge.load(cli_run / "run")
    for call, needle in [
            (lambda: lm.generate(123), "prompt must be a string"),
            (lambda: lm.generate(None), "prompt must be a string"),
            (lambda: lm.generate("Emma", on_text=5), "on_text"),
            (lambda: lm.complete("Emma", {"max_new_tokens": 10}), "SamplingConfig"),
            (lambda: lm.evaluate(""), "empty"),
            (lambda: lm.evaluate(["Emma"]), "string"),
            (lambda: lm.chat_prompt([("bot", "hi")]), "role 'bot'"),
            (lambda: lmforge.load(5), "path of a run folder"),
            (lambda: lmforge.load(cli_run / "tiny.txt"), "is a file"),
            (lambda: lmforge.train("[data]\nsources = ['x']\n", out=tmp_path / "r"), "not TOML text"),
            (lambda: lmforge.train(None, out=tmp_path / "r", overrides="train.max_steps=5"), "list"),
            (lambda: lmforge.train(None, out=5), "out must be the path"),
            (lambda: lmforge.train(None, out=tmp_path / "r", log=5), "log must be a function"),
            (lambda: lmforge.train(None, out=tmp_path / "r", on_step="x"), "on_step must be a function"),
            (lambda: lmforge.train(None, out=tmp_path / "r", budget="soon"), "cannot read duration"),
            (lambda: lmforge.load(cli_run / "run", device=None), "device must be a string"),
            (lambda: lm.generate("Emma", exact="no"), "exact must be True or False"),
            (lambda: lm.chat_prompt("Hi"), "messages must be a list"),
            (lambda: lm.generate("Emma", seed=2**64), "from 0 to 2**64 - 1"),
            (lambda: lmforge.finetune(cli_run / "run", [str(cli_run / "tiny.txt")], max_steps="2"), "max_steps"),
            (lambda: lmforge.finetune(cli_run / "run", ["gutenberg:austen-emma.txt"], task="classify"),
             "is a plain text"),
            (lambda: lmforge.finetune(cli_run / "run", [str(cli_run / "tiny.txt")], tmp_path / "big", mode="lora",
                                      lora_rank=10**6, max_steps=1, overrides=["train.progress=false"]),
             "LoRA rank 1000000 is more than the narrowest layer it adapts (32 wide)"),
            (lambda: lmforge.prepare(None), "sources must be"),
            (lambda: lmforge.prepare([""]), "empty name"),
            (lambda: lmforge.prepare([str(cli_run / "tiny.txt")], val_fraction="0.1"), "val_fraction"),
            (lambda: lmforge.prepare([str(cli_run / "tiny.txt")], errors="foo"), "errors must be"),
            (lambda: lmforge.prepare([str(cli_run / "tiny.txt")], tokenizer_options=[1]), "tokenizer_options"),
    ]:
        with pytest.raises(LmforgeError, match=re.escape(needle)):
            call()
    assert not (tmp_path / "r").exists() and not (tmp_path / "big").exists()  # refused before anything is written
    monkeypatch.setenv("HOME", str(cli_run))
    assert lmforge.load("~/run").num_params == lm.num_params  # "~" is the home folder, as in data sources
    # OpenAI-style messages are understood, not dropped
    assert lm.chat_prompt([{"role": "user", "content": "hi"}]) == lm.chat_prompt([("user", "hi")])
    # a nucleus so small it rounds to nothing in float32 still keeps the likeliest token: greedy
    tiny = lm.complete("Emma", SamplingConfig(10, top_p=1e-46, seed=0)).text
    assert tiny == lm.generate("Emma", 10, temperature=0)


def test_settings_written_after_data_sources_are_settings_not_sources():
    from lmforge.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["train", "--data", "book.txt", "train.max_time=5", "--out", "r"])
    assert args.data == ["book.txt"] and args.overrides == ["train.max_time=5"]
    for command in (["train"], ["compare", "--out", "r"], ["finetune", "base"]):  # --data twice: both, not the last
        assert parse_args(build_parser(), [*command, "--data", "a.txt", "--data", "b.txt"]).data == ["a.txt", "b.txt"]


def test_resuming_with_the_same_data_typed_as_a_relative_path_is_no_conflict(cli_run, monkeypatch, capsys):
    from lmforge.api import resume_config

    monkeypatch.chdir(cli_run)
    assert resume_config(cli_run / "run", None, ['data.sources=["tiny.txt"]']).data.sources == [
        str(cli_run / "tiny.txt")]
    one_line_error(capsys, main(["train", "--resume", "run", "--data", "other.txt"]), "data.sources")


def test_eval_options_that_need_another_option_are_refused_not_ignored(cli_run, capsys):
    one_line_error(capsys, main(["eval", str(cli_run / "run"), "--encoding", "latin-1"]), "--encoding", "--text FILE")
    one_line_error(capsys, main(["eval", str(cli_run / "run"), "--prompts", "5"]), "--prompts", "--report DIR")
    one_line_error(capsys, main(["eval", str(cli_run / "run"), "--seed", "3"]), "--seed", "--report DIR")
    one_line_error(capsys, main(["bench", "train", "model.bogus=1"]), "model.bogus is a field of none")
    one_line_error(capsys, main(["bench", "prepare", "--arch", "lstm"]), "takes no --arch")
    one_line_error(capsys, main(["bench", "train", "--dtype", "float16"]), "float16")


def test_a_stop_string_typed_with_backslash_escapes(cli_run, capsys):
    import lmforge

    lm = lmforge.load(cli_run / "run")
    seed = next(s for s in range(50) if "\n" in lm.generate("Emma", max_new_tokens=300, seed=s))  # a line ends
    capsys.readouterr()
    run = str(cli_run / "run")
    assert main(["generate", run, "--prompt", "Emma", "-n", "300", "--seed", str(seed), "--stop", r"\n"]) == 0
    out = capsys.readouterr().out
    assert out == "Emma" + lm.generate("Emma", max_new_tokens=300, seed=seed, stop=["\n"]) + "\n"
    assert out.count("\n") == 1


def test_a_run_still_training_says_so_instead_of_incomplete(cli_run, tmp_path, capsys):
    import shutil

    from lmforge import checkpoint

    shutil.copytree(cli_run / "run", tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").unlink()  # as before the first evaluation
    with checkpoint.RunLock(tmp_path / "run"):  # a training process holds the folder
        one_line_error(capsys, main(["eval", str(tmp_path / "run")]), "still being trained")
    one_line_error(capsys, main(["eval", str(tmp_path / "run")]), "is missing")


def test_train_reads_jsonl_from_the_field_its_error_names(tmp_path, tiny_file, capsys):
    from conftest import TINY_TEXT

    rows = [{"id": i, "body": para} for i, para in enumerate(TINY_TEXT.split("\n\n")) if para.strip()]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["train", "--data", str(tmp_path / "docs.jsonl"), "--tokenizer", "char", "--max-steps", "2", "--no-progress",
            f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", *TINY]
    one_line_error(capsys, main(args + ["--out", str(tmp_path / "a")]), "no string field 'text'", "--jsonl-field")
    assert main(args + ["--out", str(tmp_path / "b"), "--jsonl-field", "body"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["data"]["jsonl_field"] == "body"


def test_an_unknown_last_word_is_noted_unless_the_model_can_write_it(tmp_path, tiny_file, capsys):
    assert main(["train", "--data", str(tiny_file), "--tokenizer", "word", "--max-steps", "2", "--no-progress",
                 "--out", str(tmp_path / "w"), f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", *TINY]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "w"), "--prompt", "Emma Zzyzx", "-n", "3", "--greedy"]) == 0
    assert "'Zzyzx'×1" in capsys.readouterr().err  # no entry begins with it: fed as <unk>, and said so
    assert main(["generate", str(tmp_path / "w"), "--prompt", "Emma Woodh", "-n", "3", "--greedy"]) == 0
    assert "<unk>" not in capsys.readouterr().err  # "Woodhouse" begins with it: the model writes the word
    assert main(["train", "--data", str(tiny_file), "--tokenizer", "word", "--max-steps", "2", "--no-progress",
                 "--out", str(tmp_path / "s"), f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
                 "tokenizer.remove_stopwords=true", *TINY]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "s"), "--prompt", "Emma was very", "-n", "3"]) == 0
    err = capsys.readouterr().err  # the model never sees the stop words: the user is told what it reads
    assert "'was', 'very' are left out of the prompt; the model reads 'Emma '" in err
    assert main(["generate", str(tmp_path / "s"), "--prompt", "She was the", "-n", "3"]) == 0
    assert "the model reads none of it" in capsys.readouterr().err


def test_eval_of_a_run_whose_text_is_gone_says_how_to_score_other_text(tmp_path, tiny_file, capsys):
    book = tmp_path / "book.txt"
    book.write_text(tiny_file.read_text())
    assert main(["train", "--data", str(book), "--tokenizer", "char", "--max-steps", "2", "--no-progress",
                 "--out", str(tmp_path / "run"), f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", *TINY]) == 0
    book.unlink()
    capsys.readouterr()
    one_line_error(capsys, main(["eval", str(tmp_path / "run")]), "book.txt", "does not exist", "--text FILE")


def test_resume_takes_a_restated_default_as_no_change(tmp_path, tiny_file, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--out", run, "--data", str(tiny_file), "--max-steps", "2", "--no-progress",
                 f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", *TINY, "train.sample_tokens=0"]) == 0
    # the run recorded no tokenizer options: BPE's default vocabulary size, restated, changes nothing
    assert main(["train", "--resume", run, "--max-steps", "3", "--no-progress", "tokenizer.vocab_size=4096"]) == 0
    capsys.readouterr()
    one_line_error(capsys, main(["train", "--resume", run, "--max-steps", "4", "tokenizer.vocab_size=300"]),
                   "tokenizer.vocab_size=300 (the run has 4096)")


def test_train_logs_a_line_per_evaluation_when_its_output_is_a_file(tmp_path, tiny_file, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(tiny_file), "--max-steps", "4",
                 f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", *TINY, "train.eval_interval=2"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # a log file gets no progress bar's carriage returns
    lines = [line for line in err.splitlines() if "val_bpb" in line]
    assert [line.split(":")[0] for line in lines] == ["2/4 steps", "4/4 steps"]


def test_resume_refuses_to_retrain_a_finished_run_whose_resume_points_are_gone(cli_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cli_run / "run", run)
    weights = (run / "model.safetensors").read_bytes()
    (run / "checkpoints").rename(tmp_path / "moved")
    capsys.readouterr()
    one_line_error(capsys, main(["train", "--resume", str(run), "--max-steps", "60", "--no-progress"]),
                   "finished training and its resume points (checkpoints/) are gone: --resume would train it again "
                   "from the start over its model.safetensors", "lmforge finetune")
    (run / "checkpoints").write_bytes(b"")
    one_line_error(capsys, main(["train", "--resume", str(run), "--max-steps", "60", "--no-progress"]),
                   "checkpoints is a file", "move it away")
    assert (run / "model.safetensors").read_bytes() == weights


def test_train_into_a_folder_with_a_foreign_config_json_names_it(tmp_path, tiny_file, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text('{"mine": 1}')
    code = main(["train", "--out", str(tmp_path / "mine"), "--data", str(tiny_file), "--max-steps", "1"])
    one_line_error(capsys, code, "holds a config.json that lmforge did not write", "choose another --out")
    assert (tmp_path / "mine" / "config.json").read_text() == '{"mine": 1}'


def test_weights_that_do_not_fit_the_config_are_named_in_one_line(cli_run, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(cli_run / "run", run)
    weights = load_file(run / "model.safetensors")
    cases = [({"norm.weight": torch.ones(33)}, "norm.weight is [33], the model needs [32]"),
             ({"norm.weight": torch.ones(32, dtype=torch.int64)}, "norm.weight holds int64 values"),
             ({"norm.weight": torch.full((32,), float("nan"))}, "norm.weight holds NaN or infinite values")]
    capsys.readouterr()
    for change, problem in cases:
        save_file({**weights, **change}, run / "model.safetensors")
        for command in (["generate", str(run), "-n", "3"], ["eval", str(run)]):
            one_line_error(capsys, main(command), "model.safetensors does not match its config.json", problem)


def test_eval_report_never_replaces_files_it_did_not_write(cli_run, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "report.md").write_text("my notes")
    capsys.readouterr()
    one_line_error(capsys, main(["eval", str(cli_run / "run"), "--report", str(tmp_path / "notes"), "--prompts", "2"]),
                   "holds report.md, not an earlier lmforge report", "give another folder")
    assert (tmp_path / "notes" / "report.md").read_text() == "my notes"


def test_running_out_of_memory_is_one_line(cli_run, capsys, monkeypatch):
    import lmforge.api

    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 25600000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(lmforge.api, "load", too_big)
    capsys.readouterr()
    one_line_error(capsys, main(["generate", str(cli_run / "run"), "-n", "3"]), "not enough memory (23.8 GiB at once)",
                   "model.context_len")


def test_a_config_files_relative_data_paths_are_read_from_its_folder(tmp_path, monkeypatch):
    from lmforge.config import build_config

    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "run.toml").write_text('[data]\nsources = ["notes.txt", "books/*.txt", '
                                                    '"gutenberg:austen-emma.txt"]\ncache_dir = "cache"\n')
    monkeypatch.chdir(tmp_path)  # started from elsewhere: the file still means its own notes.txt
    config = build_config("project/run.toml", overrides=['data.val_fraction=0.2'])
    here = tmp_path / "project"
    assert config.data.sources == [str(here / "notes.txt"), str(here / "books" / "*.txt"), "gutenberg:austen-emma.txt"]
    assert config.data.cache_dir == str(here / "cache")
    # an override's path is the user's, typed where they are
    assert build_config("project/run.toml", overrides=['data.sources=["mine.txt"]']).data.sources == [
        str(tmp_path / "mine.txt")]
