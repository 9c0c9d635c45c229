"""`lmforge compare` writes a report folder with a rerun command per row, marks word rows' bits per
byte as a lower bound, and `lmforge bench train` prints JSON; all on tiny models and a few KB of text."""
import json
import re
import shlex
import subprocess
from html import unescape as html_unescape

import pytest
import torch

from lmforge.cli import main
from lmforge.compare import matched_sizes, original_passage, seed_phrase, validation_parts
from lmforge.config import RunConfig, parse_overrides
from lmforge.errors import LmforgeError
from lmforge.models import build_model, count_params

TINY = ["model.d_model=32", "model.d_hidden=32", "model.n_layers=1", "model.n_heads=2", "model.context_len=32",
        "train.batch_size=8", "train.warmup_steps=2", "train.eval_interval=5", "train.threads=1"]
# Words only in the validation part (the last 10%), so the word tokenizer meets <unk> there.
UNSEEN = "Quixotic zebras juggled marmalade beneath Zanzibar lighthouses.\n"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    from conftest import TINY_TEXT

    folder = tmp_path_factory.mktemp("compare")
    (folder / "tiny.txt").write_text(TINY_TEXT + UNSEEN)
    out = folder / "report"
    code = main(["compare", "--arch", "lstm,transformer", "--tokenizer", "char,word", "--budget", "0",
                 "--max-steps", "10", "--out", str(out), "--data", str(folder / "tiny.txt"), "--prompt", "Emma",
                 f"data.cache_dir={json.dumps(str(folder / 'cache'))}", *TINY])
    assert code == 0
    return out


def test_report_folder_has_table_json_and_plot(report_dir):
    assert (report_dir / "bpb_vs_time.png").stat().st_size > 1000
    report = json.loads((report_dir / "report.json").read_text())
    names = [r["name"] for r in report["candidates"]]
    assert names == ["lstm-char", "transformer-char", "lstm-word", "transformer-word"]
    from lmforge.probe import machine

    assert report["machine"].startswith(machine()["cpu"])  # tokens/s mean something on one machine only
    assert f"Machine: {report['machine']}" in (report_dir / "report.md").read_text()
    # the samples' yardstick: what the text says after the prompt, in its validation part
    assert report["original"]["text"].startswith("Emma Woodhouse, ")
    assert report["original"]["text"][:40] in (report_dir / "report.md").read_text()
    table = [line for line in (report_dir / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1:-1] == [f" {c} " for c in ("candidate", "params", "train tokens/s", "val bits/byte",
                                                             "OOV rate", "time to best", "peak memory", "sample",
                                                             "rerun")]
    import lmforge

    for row in report["candidates"]:
        lm = lmforge.load(row["run_dir"])
        assert row["status"] == "ok" and row["params"] == lm.num_params and row["peak_rss_bytes"] > 2**20
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["train_time_s"])
        # every row's sample: the same prompt, seed and temperature, continued by that row's own model
        assert row["sample"] == "Emma" + lm.generate("Emma", max_new_tokens=200, temperature=0.8, seed=0)
        assert len(row["curve"]) == 2 and row["curve"][-1][1] == pytest.approx(row["val_bpb"], abs=0.5)
        line = next(line for line in table if line.startswith(f"| {row['name']} |"))
        assert f"`{row['command']}`" in line  # the rerun command sits beside its row


def test_the_rerun_command_repeats_the_row_exactly(report_dir):
    import lmforge

    row = json.loads((report_dir / "report.json").read_text())["candidates"][0]
    args = shlex.split(row["command"])
    assert args[:2] == ["lmforge", "train"] and args[args.index("--out") + 1] == row["run_dir"] + "-rerun"
    assert args[args.index("--arch") + 1] == "lstm" and args[args.index("--tokenizer") + 1] == "char"
    assert "model.n_heads=2" not in args  # a field the LSTM doesn't have is left out of its command
    assert main(args[1:]) == 0  # copied from the report, it runs (the row's own folder is left alone)
    again, original = lmforge.load(row["run_dir"] + "-rerun"), lmforge.load(row["run_dir"])
    x = __import__("torch").randint(0, again.tokenizer.vocab_size, (1, 16))
    assert __import__("torch").equal(again.model(x)[0], original.model(x)[0])  # the same weights: the same run


def test_word_rows_mark_bits_per_byte_as_a_lower_bound(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    table = (report_dir / "report.md").read_text()
    for row in report["candidates"]:
        if row["tokenizer"] == "word":
            assert row["bpb_is_lower_bound"] and row["unknown_rate"] > 0
            assert f"| ≥ {row['val_bpb']:.3f} | {row['unknown_rate']:.2%} |" in table


def test_match_params_solves_widths_within_ten_percent(tiny_file, tmp_path):
    raw = parse_overrides([f"data.sources={json.dumps([str(tiny_file)])}", "tokenizer.kind=\"char\"",
                               f"data.cache_dir={json.dumps(str(tmp_path))}", "model.n_layers=2"])
    base = RunConfig.from_dict(raw)
    sizes = matched_sizes(["lstm", "gru", "cnn", "transformer"], "char", base)
    assert set(sizes) == {"lstm", "gru", "cnn"}
    vocab = json.loads(next(tmp_path.glob("*/meta.json")).read_text())["vocab_size"]
    target = count_params(build_model("transformer", vocab_size=vocab, n_layers=2))
    for arch, fields in sizes.items():
        n = count_params(build_model(arch, vocab_size=vocab, n_layers=2, **fields))
        assert abs(n - target) <= 0.1 * target, (arch, fields, n, target)
    given = RunConfig.from_dict({**raw, "model": {**raw["model"], "d_hidden": 32}})  # a width the user set
    with pytest.raises(LmforgeError, match="--match params sets lstm's model.d_hidden .* drop model.d_hidden=32"):
        matched_sizes(["lstm", "transformer"], "char", given)
    from lmforge.compare import compare

    with pytest.raises(LmforgeError, match="d_hidden"):  # refused before its folder is made: a rerun may use it
        compare(["lstm", "transformer"], ["char"], None, "params", tmp_path / "out", given, max_steps=1)
    assert not (tmp_path / "out").exists()


def test_original_passage_follows_the_first_whole_word():
    docs = [("a", "Theatre aside, the day was fine and the evening finer.")]
    name, text = original_passage(docs, "the", 12)
    assert name == "a" and text == " day was" and original_passage(docs, "nowhere", 10) is None


def test_the_sample_after_training_on_other_text_starts_from_words_of_that_text():
    # "Emma Woodhouse" (the default seed) is in no Dickens: the sample starts from the validation text
    # instead, so that what Dickens wrote next can be printed beside it
    dickens = [("carol", "to begin with. Marley was dead: there is no doubt whatever about that.")]
    assert seed_phrase(dickens, "Emma Woodhouse") == "Marley was dead"
    assert original_passage(dickens, seed_phrase(dickens, "Emma Woodhouse"), 10) == ("carol", ": there is")
    austen = [("emma", "said Emma Woodhouse, handsome, clever")]
    assert seed_phrase(austen, "Emma Woodhouse") == "Emma Woodhouse"
    # other alphabets, and scripts that do not space their words
    assert seed_phrase([("ru", "— Всё смешалось в доме Облонских.")], "Emma Woodhouse") == "Всё смешалось в"
    assert seed_phrase([("zh", "1. 天下大势，分久必合，合久必分。")], "Emma Woodhouse") == "天下大势"
    assert seed_phrase([("ja", "吾輩は猫である。名前はまだ無い。")], "Emma Woodhouse") == "吾輩は猫であ"
    assert seed_phrase([("digits", "1 2 3 ... 42")], "Emma Woodhouse") == "Emma Woodhouse"  # nothing to start from


def test_compare_on_other_text_takes_its_seed_from_that_texts_validation_part(tmp_path):
    from lmforge.config import DataConfig, RunConfig

    (tmp_path / "carol.txt").write_text("Scrooge signed it. " * 90 + "Marley was dead, to begin with. " * 10)
    config = RunConfig(data=DataConfig(sources=[str(tmp_path / "carol.txt")]))
    assert seed_phrase(validation_parts(config), "Emma Woodhouse") == "Marley was dead"


def test_bench_train_prints_json(capsys):
    code = main(["bench", "train", "--arch", "lstm,cnn", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                 "--vocab-size", "82",
                 "--threads", "1", "model.d_model=16", "model.d_hidden=16", "model.n_layers=1", "model.context_len=8"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["families"]) == {"lstm", "cnn"} and result["peak_flops_best"] > 0
    for family in result["families"].values():
        assert family["tokens_per_s"] > 0 and family["params"] > 0 and family["flops_per_token"] > 0
        assert 0 < family["peak_flops"] <= result["peak_flops_best"] and family["mfu"] > 0
        assert family["context_len"] == 8
    assert result["cpu"]  # every figure names the machine it was measured on


def test_bench_generate_decodes_as_load_sets_up(capsys):
    from lmforge.probe import choices

    code = main(["bench", "generate", "--arch", "transformer", "--batch-sizes", "1,2", "--new-tokens", "4",
                 "--warmup", "2", "--rounds", "1", "--threads", "1", "model.d_model=32", "model.n_layers=1",
                 "model.n_heads=2", "model.context_len=16"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    family = result["families"]["transformer"]
    measured = choices(torch.device("cpu"))  # the probe's choice is what lmforge.load decodes with here
    assert family["decoding"] == measured["decoding"]
    assert family["cache"] == (measured["cache"] if measured["decoding"] != "fp32" else "fp32")
    assert set(family["batch"]) == {"1", "2"} and all(b["new_tokens_per_s"] > 0 for b in family["batch"].values())
    # the time to the first token is for a prompt the 16-position context can take, and says how long it was
    assert family["time_to_first_token_s"] > 0 and family["time_to_first_token_prompt_tokens"] == 15
    pytest.importorskip("transformers")
    assert result["reference_hf_gpt2"]["new_tokens_per_s"] > 0
    code = main(["bench", "generate", "--arch", "transformer", "--batch-sizes", "1", "--new-tokens", "20",
                 "--warmup", "2", "--rounds", "1", "--threads", "1", "model.d_model=32", "model.n_layers=1",
                 "model.n_heads=2", "model.context_len=16"])
    result = json.loads(capsys.readouterr().out)  # more new tokens than GPT-2's 16 positions: lmforge slides on
    assert code == 0 and "--new-tokens 15" in result["reference_hf_gpt2"]["skipped"]
    assert result["families"]["transformer"]["batch"]["1"]["new_tokens_per_s"] > 0


def test_each_benchmark_help_lists_the_options_it_takes(capsys):
    import inspect

    from lmforge import bench
    from lmforge.cli import BENCH_TAKES

    for name, fn in bench.BENCHMARKS.items():
        params = set(inspect.signature(fn).parameters)
        for dest in BENCH_TAKES[name]:
            assert {"arch": "archs", "overrides": "overrides" if name == "austen" else "model_fields"}.get(dest, dest) \
                in params, (name, dest)
    with pytest.raises(SystemExit):
        main(["bench", "generate", "--help"])
    text = capsys.readouterr().out
    assert "--rounds" in text and "--new-tokens" in text and "--dtype" not in text and "--max-time" not in text
    with pytest.raises(SystemExit):
        main(["bench", "austen", "--help"])
    text = capsys.readouterr().out
    assert "--max-time" in text and "--steps" not in text and "--arch" not in text


@pytest.mark.parametrize("argv, needle", [
    (["train", "--steps", "0"], "--steps must be at least 1"),
    (["generate", "--rounds", "0"], "--rounds must be at least 1"),
    (["generate", "--batch-sizes", "0"], "--batch-sizes"),
    (["prepare", "--steps", "3"], "takes no --steps"),  # an option a benchmark does not take is refused, not ignored
])
def test_bench_refuses_numbers_it_cannot_use(argv, needle, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1


def test_compare_refuses_a_step_budget_below_one_before_training(tmp_path, capsys):
    assert main(["compare", "--arch", "lstm", "--max-steps", "0", "--out", str(tmp_path / "cmp")]) == 2
    assert "--max-steps must be at least 1" in capsys.readouterr().err and not (tmp_path / "cmp").exists()


def test_a_model_field_no_compared_family_has_is_refused(tmp_path, capsys):
    code = main(["compare", "--arch", "transformer,lstm", "--max-steps", "1", "--out", str(tmp_path / "cmp"),
                 "model.d_modle=64"])  # a typo that no family would take
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.d_modle" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cmp").exists()


def test_a_sample_in_the_report_table_stays_one_visible_cell():
    from lmforge.compare import _cell

    # a barely trained byte-level model writes any byte: a NUL or a DEL would vanish or break the table
    assert _cell("Emma|was\x00 \n\nhere\x7f") == "Emma\\|was\\x00 here\\x7f"


def test_a_long_prompt_with_newlines_and_pipes_keeps_the_table_one_row_per_candidate():
    from markdown_it import MarkdownIt

    from lmforge.compare import render_markdown, table_lines
    from lmforge.errors import shell_join

    prompt = "Chapter I.\n\nShe said | twice, `C:\\|D` " * 20  # a user's passage as the seed
    args = ["train", "--out", "cmp/lstm-char", "--prompt", prompt]
    row = {"name": "lstm-char", "status": "ok", "command": shell_join(["lmforge", *args]), "params": 1e5,
           "tokens_per_s": 1000.0, "val_bpb": 2.5, "bpb_is_lower_bound": False, "unknown_rate": 0.0,
           "time_to_best_s": 3.0, "peak_rss_bytes": 2 ** 28, "sample": prompt + "and the model went on"}
    report = {"budget_s": 10, "max_steps": None, "data": ["x.txt"], "val_fraction": 0.1, "match": "params",
              "seed": 0, "prompt": prompt, "candidates": [row]}
    # report.md, as a Markdown reader sees it: one row of 9 cells, the sample's and the command's text whole
    html = MarkdownIt("commonmark").enable("table").render(render_markdown(report))
    cells = re.split(r"<td[^>]*>", html.split("<tbody>")[1])[1:]
    assert len(cells) == 9  # no pipe of the prompt splitting a cell
    assert "twice, `C:\\|D` and the model went on" in cells[7]  # the model's own text, after the prompt's end
    command = re.search(r"<code>(.*)</code>", cells[8], re.S).group(1)
    assert html_unescape(command) == row["command"]  # its backticks and backslashes kept
    # the terminal's table: the same row, then the rerun command as it pastes into a shell
    lines = table_lines(report)
    assert len(lines[2].replace("\\|", "").split("|")) == 10  # 8 cells: the command comes after the table
    command = lines[-1].strip()
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {command.removeprefix('lmforge ')}"],
                         capture_output=True, text=True).stdout
    assert out.split("\0")[:-1] == args
    assert len(render_markdown(report)) < 3000  # the prompt is not repeated whole in the text
