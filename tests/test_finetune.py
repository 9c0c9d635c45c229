"""Fine-tuning: freezing, LoRA, completion-only loss, classification, the author split, and the CLI verbs."""
import json

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.cli import main
from lmforge.data.batches import IGNORE
from lmforge.data.examples import inputs_targets
from lmforge.errors import LmforgeError
from lmforge.finetuning.lora import LoRALinear, apply_lora, merge_lora
from lmforge.models import build_model
from lmforge.training.plots import read_metrics
from lmforge.training.step import lm_loss

TINY_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "context_len": 32}
QUIET = ["train.threads=1", "train.progress=false"]


def quiet(*_):
    pass


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import TINY_TEXT

    folder = tmp_path_factory.mktemp("ft")
    (folder / "base.txt").write_text(TINY_TEXT)
    (folder / "new.txt").write_text("Anne Elliot, with an elegant mind and a sweet character.\n" * 40)
    config = {"data": {"sources": [str(folder / "base.txt")], "cache_dir": str(folder / "cache")},
              "tokenizer": {"kind": "char"}, "model": {"arch": "transformer", **TINY_MODEL},
              "train": {"max_steps": 20, "max_time": 0, "batch_size": 8, "warmup_steps": 5, "eval_interval": 10,
                        "progress": False, "threads": 1}}
    lmforge.train(config, out=folder / "base", log=quiet)
    return folder


def tune(base, name, **kwargs):
    kwargs.setdefault("max_steps", 6)
    overrides = [*QUIET, f"data.cache_dir={json.dumps(str(base / 'cache'))}"]
    lm, result = lmforge.finetune(base / "base", kwargs.pop("data", [str(base / "new.txt")]), base / name,
                                  overrides=overrides, log=quiet, **kwargs)
    return result.run_dir, result.extra


def test_frozen_parameters_do_not_change(base):
    run, summary = tune(base, "freeze", mode="freeze", freeze_layers=1)
    before, after = load_file(base / "base" / "model.safetensors"), load_file(run / "model.safetensors")
    frozen = [k for k in before if k.startswith(("tok_emb.", "blocks.0."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.1."))
    config = json.loads((run / "config.json").read_text())
    assert config["finetune"]["freeze_layers"] == 1
    # the base pretrained with the Transformer's heavy decay; fine-tuning decays lightly, towards zero
    assert json.loads((base / "base" / "config.json").read_text())["train"]["weight_decay"] == 0.6
    assert config["train"]["weight_decay"] == 0.1
    assert config["train"]["embedding_lr_scale"] == 1.0  # nor do the embeddings move faster than the rest
    assert summary["trainable_params"] == sum(v.numel() for k, v in before.items() if k not in frozen)


def test_new_data_uses_the_base_tokenizer_and_reports_what_it_cannot_represent(base):
    lines = []
    lmforge.finetune(base / "base", [str(base / "new.txt")], base / "unknown", max_steps=2, log=lines.append,
                     overrides=[*QUIET, f"data.cache_dir={json.dumps(str(base / 'cache'))}"])
    assert any("cannot represent 40 piece" in line and "'A'×40" in line for line in lines)
    assert (base / "unknown" / "tokenizer.json").read_text() == (base / "base" / "tokenizer.json").read_text()


@pytest.mark.parametrize("arch,fields", [("transformer", TINY_MODEL),
                                         ("lstm", {"d_model": 16, "d_hidden": 16, "n_layers": 1, "dropout": 0.0})])
def test_lora_starts_as_the_base_and_merging_preserves_outputs(arch, fields):
    torch.manual_seed(0)
    model = build_model(arch, vocab_size=40, **fields).eval()
    x = torch.randint(0, 40, (2, 12))
    reference = model(x)[0]
    names = {n for n, _ in model.named_parameters()}
    wrapped = apply_lora(model, rank=4, alpha=8.0)
    assert wrapped and all(isinstance(model.get_submodule(w), LoRALinear) for w in wrapped)
    assert names <= {n for n, _ in model.named_parameters()}  # base names kept
    torch.testing.assert_close(model(x)[0], reference, rtol=0, atol=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.1)
    adapted = model(x)[0]
    assert not torch.allclose(adapted, reference)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert {n for n, _ in model.named_parameters()} == names
    torch.testing.assert_close(model(x)[0], adapted, rtol=1e-5, atol=1e-5)


def test_only_adapter_parameters_get_gradients():
    model = build_model("transformer", vocab_size=40, **TINY_MODEL, tie_embeddings=False)
    apply_lora(model, ["qkv", "lm_head"], rank=2)
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_()  # B = 0 at the start would leave A's gradient zero
    lm_loss(model, x[:, :-1], x[:, 1:]).backward()
    for name, p in model.named_parameters():
        is_adapter = name.endswith(("lora_a", "lora_b"))
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
    with pytest.raises(LmforgeError, match="not LoRA targets"):
        apply_lora(build_model("transformer", vocab_size=40, **TINY_MODEL), ["tok_emb"])


def test_lora_run_saves_merged_weights_and_a_separate_adapter(base):
    run, _ = tune(base, "lora", mode="lora", lora_rank=4, lora_alpha=8.0)
    adapter = load_file(run / "adapter.safetensors")
    assert adapter and all(k.endswith(("lora_a", "lora_b")) for k in adapter)
    lm = lmforge.load(run, decoding="int8")  # merged: loads as a plain model, and decodes through the fast step
    assert lm.decoding == "int8"
    base_lm = lmforge.load(base / "base")
    apply_lora(base_lm.model, rank=4, alpha=8.0)
    base_lm.model.load_state_dict(adapter, strict=False)  # base weights + the adapter alone
    x = torch.randint(0, lm.tokenizer.vocab_size, (2, 16))
    torch.testing.assert_close(base_lm.model.eval()(x)[0], lm.model(x)[0], rtol=1e-4, atol=1e-5)
    config = json.loads((run / "config.json").read_text())
    assert config["finetune"]["mode"] == "lora" and config["finetune"]["base"].endswith("base")


def test_completion_loss_ignores_prompt_tokens():
    torch.manual_seed(0)
    model = build_model("transformer", vocab_size=30, **TINY_MODEL).eval()  # no dropout: compare losses exactly
    ids, n_prompt = list(range(1, 13)), 7
    x, y = (torch.tensor([v]) for v in inputs_targets(ids, n_prompt))
    assert (y[0, :n_prompt - 1] == IGNORE).all() and (y[0, n_prompt - 1:] != IGNORE).all()
    loss = lm_loss(model, x, y) / lm_loss.count(y)
    logits = model(x)[0][0]
    manual = torch.nn.functional.cross_entropy(logits[n_prompt - 1:], torch.tensor(ids[n_prompt:]))
    torch.testing.assert_close(loss, manual)
    # other prompt tokens as targets (same inputs): the same loss, since prompt targets are masked
    alt = ids[:1] + [0] * (n_prompt - 1) + ids[n_prompt:]
    summed = lm_loss(model, x, y).item()
    assert lm_loss(model, x, torch.tensor([inputs_targets(alt, n_prompt)[1]])).item() == summed
    changed = y.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 30  # a completion target does
    assert lm_loss(model, x, changed).item() != summed
    logits_leaf = model(x)[0].detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(logits_leaf.flatten(0, 1), y.flatten(), ignore_index=IGNORE).backward()
    assert logits_leaf.grad[0, :n_prompt - 1].abs().max() == 0 and logits_leaf.grad[0, n_prompt - 1:].abs().max() > 0


def test_completion_runs_generate_with_their_template_through_cli_and_api(base, capsys):
    rows = [{"prompt": f"say {i % 3}", "completion": "Emma " * (i % 3 + 1), "split": "val" if i < 4 else "train"}
            for i in range(30)]
    (base / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run, summary = tune(base, "completion", task="completion", data=[str(base / "pairs.jsonl")],
                        template="Q: {prompt}\nA: ", max_steps=30)
    lm = lmforge.load(run)
    assert lm.template == "Q: {prompt}\nA: "
    api_text = lm.generate("say 1", max_new_tokens=12, temperature=0.0)
    raw = lmforge.load(run)  # the same weights fed the bare prompt: a different continuation
    assert raw.prompt_ids("say 1") == lm.tokenizer.encode("Q: say 1\nA: ")
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "say 1", "-n", "12", "--greedy"]) == 0
    printed = capsys.readouterr().out
    assert printed == "say 1" + api_text + "\n"  # the CLI echoes the prompt, then the same continuation
    from lmforge.generation import generate

    untemplated = generate(lm.decoder, lm.tokenizer, lm.tokenizer.encode("say 1"),
                           lmforge.generation.SamplingConfig(12, 0.0)).text
    assert untemplated != api_text
    # `lmforge eval` scores what the run learnt: its held-out completions, as its own validation did
    best = min(r["val_bpb"] for r in read_metrics(run / "metrics.jsonl") if "val_bpb" in r)
    assert summary["completion_bits_per_byte"] == pytest.approx(best, abs=0.02)
    assert main(["eval", str(run)]) == 0
    assert f"{summary['completion_bits_per_byte']:.4f} bits per completion byte" in capsys.readouterr().out
    # and every pair of a new file: its held-out pairs alone score as the run did
    (base / "held.jsonl").write_text("\n".join(json.dumps({**r, "split": "train"}) for r in rows[:4]))
    assert main(["eval", str(run), "--text", str(base / "held.jsonl")]) == 0
    assert capsys.readouterr().out == (f"{base / 'held.jsonl'} (4 pairs): "
                                       f"{summary['completion_bits_per_byte']:.4f} bits per completion byte\n")
    with pytest.raises(LmforgeError, match="completion fine-tune"):  # no text split to score: said so
        lm.evaluate()


def test_classification_head_learns_a_separable_task(base, capsys):
    rows = [{"text": ("Emma handsome " if i % 2 else "rich world ") * (1 + i % 3), "label": "ab"[i % 2],
             "split": "test" if i < 12 else "val" if i < 20 else "train"} for i in range(80)]
    (base / "labels.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run, summary = tune(base, "classify", task="classify", data=[str(base / "labels.jsonl")], max_steps=40, lr=3e-3)
    assert summary["accuracy"] == 1.0 and summary["macro_f1"] == 1.0 and summary["n"] == 12
    assert (run / "classifier.safetensors").exists()
    assert json.loads((run / "config.json").read_text())["finetune"]["labels"] == ["a", "b"]
    body = lmforge.load(run)  # the body loads as a plain model
    from lmforge.finetuning.run import evaluate_classifier

    assert evaluate_classifier(body)["accuracy"] == 1.0
    probs = body.classify(["Emma handsome Emma handsome", "rich world"])  # what a user calls on new text
    assert [max(p, key=p.get) for p in probs] == ["b", "a"]
    assert all(set(p) == {"a", "b"} and abs(sum(p.values()) - 1) < 1e-5 for p in probs)
    with pytest.raises(LmforgeError, match="empty"):
        body.classify(["Emma", ""])
    with pytest.raises(LmforgeError, match="not a classification run"):
        lmforge.load(base / "base").classify(["Emma"])
    capsys.readouterr()  # the same from the command line: texts as arguments, or a file of them
    assert main(["classify", str(run), "Emma handsome Emma handsome", "rich world", "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in printed] == ["b", "a"] and printed[1]["text"] == "rich world"
    (base / "texts.txt").write_text("rich world rich world\n\nEmma handsome\n")
    assert main(["classify", str(run), "--file", str(base / "texts.txt")]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["a", "b"]
    (base / "texts.jsonl").write_text(json.dumps({"passage": "Emma handsome"}) + "\n")
    assert main(["classify", str(run), "--file", str(base / "texts.jsonl")]) == 2
    assert capsys.readouterr().err.endswith("no string field 'text' (it has 'passage'); add it, or name the field "
                                            "holding the text with --jsonl-field\n")  # no training hints
    assert main(["classify", str(run), "--file", str(base / "texts.jsonl"), "--jsonl-field", "passage"]) == 0
    assert capsys.readouterr().out.startswith("b\t")
    assert main(["classify", str(run)]) == 2
    assert capsys.readouterr().err == "error: nothing to classify; give texts after the run, or --file FILE\n"
    assert len(lmforge.load(run).classify("one passage")) == 1  # one text, not one per character
    assert main(["eval", str(run)]) == 0  # a classifier's own figures, not its texts scored as language
    assert capsys.readouterr().out.startswith(f"held-out ({summary['n']} examples): accuracy")
    # a new labelled file is scored as the task, every row of it (none is a training row), not as plain text
    (base / "new.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y, "split": "train"}) for t, y in
                                              [("rich world", "a"), ("Emma handsome", "b"), ("Emma handsome", "a")]))
    assert main(["eval", str(run), "--text", str(base / "new.jsonl")]) == 0
    assert capsys.readouterr().out == f"{base / 'new.jsonl'} (3 examples): accuracy 66.7%, macro-F1 0.667\n"
    (base / "odd.jsonl").write_text(json.dumps({"text": "rich world", "label": "c"}))
    assert main(["eval", str(run), "--text", str(base / "odd.jsonl")]) == 2
    assert "label(s) 'c' are not among the run's labels ('a', 'b')" in capsys.readouterr().err
    # labelled rows however the file is named or ordered, or encoded: never silently scored as plain text
    (base / "NEW.JSONL").write_bytes((base / "new.jsonl").read_bytes())
    assert main(["eval", str(run), "--text", str(base / "NEW.JSONL")]) == 0
    assert "(3 examples): accuracy 66.7%" in capsys.readouterr().out
    (base / "mixed.jsonl").write_text(json.dumps({"text": "rich world"}) + "\n" + (base / "new.jsonl").read_text())
    one_line_error(capsys, main(["eval", str(run), "--text", str(base / "mixed.jsonl")]), "mixed.jsonl:1: no string "
                                                                                           "field 'label'")
    (base / "latin.jsonl").write_bytes('{"text": "Café rich", "label": "a"}'.encode("latin-1"))
    for extra in ([], ["--encoding", "latin-1"]):
        one_line_error(capsys, main(["eval", str(run), "--text", str(base / "latin.jsonl"), *extra]),
                       "--encoding" if extra else "re-encode it")


def test_macro_f1_averages_the_labels_that_occur():
    from lmforge.finetuning.classify import scores

    # a third label with no held-out rows, never predicted, is no F1 of 0: a perfect score stays perfect
    assert scores([0, 1, 0, 1], [0, 1, 0, 1]) == {"accuracy": 1.0, "macro_f1": 1.0, "n": 4}
    assert scores([0, 0], [0, 2])["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)  # a wrong prediction counts


def test_classification_says_when_texts_are_cut_to_the_context(base):
    rows = [{"text": ("Emma handsome " if i % 2 else "rich world ") * (1 + 10 * (i % 3 == 0)), "label": "ab"[i % 2],
             "split": "val" if i < 8 else "train"} for i in range(40)]
    (base / "longtexts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    said = []
    lmforge.finetune(base / "base", [str(base / "longtexts.jsonl")], base / "longtexts", task="classify", max_steps=2,
                     overrides=[*QUIET, f"data.cache_dir={json.dumps(str(base / 'cache'))}"], log=said.append)
    cut = sum(len(r["text"]) > TINY_MODEL["context_len"] for r in rows)  # a character per token
    assert cut and any(line.startswith(f"note: {cut} of 40 train and validation texts are longer than the model's "
                                       f"context (32 tokens)") for line in said)


def test_author_split_has_no_overlap(gutenberg_dir):
    from conftest import MORE

    from lmforge.data.authors import author_rows

    if not MORE.is_dir():
        pytest.skip("gutenberg-more is not beside the project")
    rows = author_rows(MORE, passage_chars=400, caps={"train": 50, "val": 10, "test": 10})
    assert {r["label"] for r in rows} >= {"austen", "dickens", "chesterton"}
    by_book = {}
    for r in rows:
        by_book.setdefault(r["book"], []).append(r)
    for book, items in by_book.items():
        spans = sorted((r["start"], r["end"], r["split"]) for r in items)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), book  # no passage overlaps another
        order = [s for _, _, s in spans]  # regions: every train passage before every val before every test
        assert order == sorted(order, key=["train", "val", "test"].index), book
    texts = {s: {r["text"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["val"])
    assert not any(r["label"] in r["text"].lower() for r in rows if r["label"] in ("austen", "dickens"))


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("mode", ["full", "freeze", "lora"])
def test_finetune_cli_end_to_end(base, mode, capsys):
    out = base / f"cli-{mode}"
    code = main(["finetune", str(base / "base"), "--data", str(base / "new.txt"), "--mode", mode, "--max-steps", "4",
                 "--out", str(out), "--set", "train.threads=1", "--set", "train.progress=false",
                 "--set", f"data.cache_dir={json.dumps(str(base / 'cache'))}"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("bits per byte") == 1  # measured once, printed once
    bpb = float(printed.split("validation: ")[1].split()[0])
    assert bpb == pytest.approx(lmforge.load(out).evaluate()["bits_per_byte"], abs=1e-4)  # printed to 4 places
    assert main(["generate", str(out), "--prompt", "Anne", "-n", "10", "--seed", "0"]) == 0
    text = lmforge.load(out).generate("Anne", max_new_tokens=10, seed=0)
    assert capsys.readouterr().out == "Anne" + text + "\n"


@pytest.mark.parametrize("argv,needles", [
    (["--mode", "partial"], ["mode 'partial'", "full, freeze, lora"]),
    (["--task", "summarise"], ["task 'summarise'"]),
    (["--mode", "freeze", "--freeze-layers", "9"], ["--freeze-layers"]),
    (["--lora-rank", "4"], ["--lora-rank", "--mode lora"]),  # an option of another mode: refused, not ignored
    (["--mode", "lora", "--pooling", "last"], ["--pooling", "--task classify"]),
    (["--mode", "lora", "--lora-targets", "tok_emb"], ["tok_emb", "qkv"]),
    (["--task", "classify"], [".jsonl"]),
    (["--set", "model.d_model=8"], ["--set", "model settings cannot be set here"]),
    (["--lr", "0"], ["train.lr must be positive"]),
    (["--set", "train.lr=abc"], ["train.lr", "a number", "abc"]),
    (["--from-scratch", "--mode", "lora"], ["--from-scratch", "--mode full"]),  # random frozen weights: no control
    (["--task", "completion", "--encoding", "latin-1"], ["--encoding", "UTF-8 .jsonl"]),  # not silently ignored
])
def test_finetune_cli_bad_inputs(base, argv, needles, capsys):
    code = main(["finetune", str(base / "base"), "--data", str(base / "new.txt"), "--max-steps", "2",
                 "--out", str(base / "bad"), "--set", "train.threads=1", *argv])
    one_line_error(capsys, code, *needles)


def test_cli_missing_base_and_bad_verbs(base, tmp_path, capsys):
    missing = main(["finetune", str(tmp_path / "nope"), "--data", str(base / "new.txt")])
    one_line_error(capsys, missing, "does not exist")
    one_line_error(capsys, main(["finetune", "--resume", str(base / "base"), "--mode", "lora", "--lr", "0.1"]),
                   "--resume continues", "--mode, --lr")
    one_line_error(capsys, main(["import", "onnx", str(tmp_path), "--out", str(tmp_path / "r")]), "hf")
    one_line_error(capsys, main(["import", "hf", str(tmp_path), "--out", str(tmp_path / "r")]), "config.json")
    one_line_error(capsys, main(["export", "hf", str(base / "base"), str(tmp_path / "x")]), "neither GPT-2 nor Llama")
    one_line_error(capsys, main(["data", "poems", "--out", str(tmp_path / "p.jsonl"), "--more", str(tmp_path)]),
                   "authors")
    from conftest import MORE

    (tmp_path / "p.jsonl").write_text("kept\n")
    for chars, needle in (("-5", "at least"), ("100000000", "smaller --passage-chars")):  # not an empty dataset
        one_line_error(capsys, main(["data", "authors", "--out", str(tmp_path / "p.jsonl"), "--more", str(MORE),
                                     "--passage-chars", chars]), needle)
    assert (tmp_path / "p.jsonl").read_text() == "kept\n"


def test_pairs_longer_than_the_context_are_scored_on_what_was_kept(base):
    rows = [{"prompt": "say", "completion": "Emma " * 20, "split": "val" if i < 3 else "train"} for i in range(12)]
    (base / "long.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    said = []
    _, result = lmforge.finetune(base / "base", [str(base / "long.jsonl")], base / "long", task="completion",
                                 max_steps=3, overrides=[*QUIET, f"data.cache_dir={json.dumps(str(base / 'cache'))}"],
                                 log=said.append)
    assert any("12 of 12 train and validation pairs are longer than the model's context" in s for s in said)
    # char tokens: each kept completion character is one byte and one scored token (no end-of-text: cut off)
    assert result.extra["bytes"] == result.extra["tokens"] < 3 * 100


def test_jsonl_tasks_without_validation_rows_are_refused_before_training(base, capsys):
    pairs = [{"prompt": f"say {i}", "completion": "Emma", "split": "train"} for i in range(10)]
    (base / "trainonly.jsonl").write_text("\n".join(json.dumps(r) for r in pairs))
    labelled = [{"text": "Emma" * (i % 3 + 1), "label": "ab"[i % 2], "split": "train"} for i in range(10)]
    (base / "trainonly-labels.jsonl").write_text("\n".join(json.dumps(r) for r in labelled))
    for task, data, what in (("completion", "trainonly.jsonl", "pairs"), ("classify", "trainonly-labels.jsonl",
                                                                         "examples")):
        code = main(["finetune", str(base / "base"), "--data", str(base / data), "--task", task, "--max-steps", "2",
                     "--out", str(base / "noval"), "--set", "train.threads=1", "--set", "train.progress=false"])
        one_line_error(capsys, code, f"no validation {what}", '"split": "val"')
        assert not (base / "noval").exists()  # nothing left behind


def test_a_run_records_its_sources_wherever_it_was_started_from(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(base)
    run, _ = tune(base, "relative", data=["new.txt"], max_steps=2)
    assert json.loads((run / "config.json").read_text())["data"]["sources"] == [str(base / "new.txt")]
    monkeypatch.chdir(tmp_path)  # evaluated from elsewhere: the same text
    assert lmforge.load(run).evaluate()["bits_per_byte"] > 0
    # a finetune --resume of a plain training run would rewrite it: refused, and the run is untouched
    before = (base / "base" / "config.json").read_bytes()
    one_line_error(capsys, main(["finetune", "--resume", str(base / "base"), "--max-steps", "5"]),
                   "not a fine-tune", "lmforge train --resume")
    assert (base / "base" / "config.json").read_bytes() == before


def test_a_base_whose_tokenizer_was_swapped_is_refused_before_training(base, tmp_path, capsys):
    import shutil

    shutil.copytree(base / "base", tmp_path / "swapped")
    (tmp_path / "swapped" / "tokenizer.json").write_text('{"kind": "char", "chars": "ab"}')  # not the model's
    code = main(["finetune", str(tmp_path / "swapped"), "--data", str(base / "new.txt"), "--max-steps", "2",
                 "--out", str(tmp_path / "out"), "--set", "train.threads=1"])
    one_line_error(capsys, code, "tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_a_classification_whose_training_rows_hold_one_label_is_refused(base):
    rows = [{"text": f"Emma handsome {i}", "label": "pos", "split": "train"} for i in range(40)]
    rows += [{"text": f"rich world {i}", "label": "neg", "split": "val"} for i in range(10)]
    (base / "onelabel.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(LmforgeError, match="training rows of .* hold only 'pos'; classification learns from at least"):
        tune(base, "onelabel", task="classify", data=[str(base / "onelabel.jsonl")])
    assert not (base / "onelabel").exists()


def test_a_finetune_is_continued_with_finetune_resume(base):
    from lmforge.checkpoint import resume_command

    run, _ = tune(base, "hint", max_steps=2)
    assert resume_command(run) == f"lmforge finetune --resume {run}"
    assert resume_command(base / "base") == f"lmforge train --resume {base / 'base'}"
    # a folder whose name needs quoting is quoted, so the hint pastes into a shell as it reads
    assert resume_command(base / "my runs" / "é 1") == f"lmforge train --resume '{base / 'my runs' / 'é 1'}'"


def test_commands_suggested_in_messages_paste_into_a_shell(base, capsys):
    import re
    import shutil
    import subprocess

    odd = base / "it's $HOME é"
    shutil.copytree(base / "base", odd)
    for args, words in [(["finetune", "--resume", str(odd)], ["lmforge", "train", "--resume", str(odd)]),
                        (["train", "--out", str(odd), "--max-steps", "2"], ["lmforge", "train", "--resume", str(odd)])]:
        assert main(args) == 2
        command = re.search(r"`(lmforge [^`]*)`", capsys.readouterr().err).group(1)
        pasted = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], capture_output=True, text=True).stdout
        assert pasted.split("\0")[:-1] == words


def test_labelled_rows_that_cannot_train_and_folders_of_the_wrong_kind_are_named(base, tmp_path, capsys):
    rows = {"numbers": [{"text": f"Emma {i}", "label": i % 2} for i in range(20)],
            "empty": [{"text": "" if i > 15 else f"Emma {i}", "label": "ab"[i % 2]} for i in range(20)],
            "blank": [{"prompt": f"say {i}", "completion": ""} for i in range(20)]}
    for name, needles, task in (("numbers", ["'label' is 0, not a string", '"label": "0"'], "classify"),
                                ("empty", ["'text' is empty"], "classify"),
                                ("blank", ["every 'completion' is empty"], "completion")):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows[name]))
        code = main(["finetune", str(base / "base"), "--data", str(tmp_path / f"{name}.jsonl"), "--task", task,
                     "--max-steps", "2", "--out", str(tmp_path / "x"), "--set", "train.threads=1"])
        one_line_error(capsys, code, *needles)
        assert not (tmp_path / "x").exists()
    (tmp_path / "hf").mkdir()  # a Hugging Face folder where a run belongs, and a run where an HF folder does
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_line_error(capsys, main(["generate", str(tmp_path / "hf"), "-p", "Emma"]), "Hugging Face model folder",
                   "lmforge import hf")
    one_line_error(capsys, main(["import", "hf", str(base / "base"), "--out", str(tmp_path / "r")]),
                   "is an lmforge run already")
    one_line_error(capsys, main(["import", "hf", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]),
                   "does not exist")
    one_line_error(capsys, main(["data", "authors", "--out", str(tmp_path / "p.jsonl"), "--more", str(tmp_path)]),
                   f"--more {tmp_path} lacks")


def test_an_export_refusal_names_what_differs_from_the_closest_family():
    from lmforge.errors import LmforgeError
    from lmforge.interop.hf import GPT2, hf_family

    gqa = {**GPT2, "bias": True, "n_heads": 4, "n_kv_heads": 2}  # all GPT-2 but grouped-query attention
    with pytest.raises(LmforgeError, match=r"closest is GPT-2, which differs in n_kv_heads=2 \(GPT-2 has no "):
        hf_family(gqa)
    with pytest.raises(LmforgeError, match=r"closest is GPT-2, which differs in bias=False"):
        hf_family({**gqa, "bias": False, "n_kv_heads": 4})


def test_a_fine_tune_runs_where_this_machine_decides_not_where_the_base_ran(base):
    from lmforge.finetuning.run import finetune_config

    config = finetune_config(base / "base", [str(base / "new.txt")])  # the base trained with train.threads=1
    assert config.train.device == "auto" and config.train.threads is None  # as README says: --device auto
    assert finetune_config(base / "base", [str(base / "new.txt")], overrides=["train.threads=2"]).train.threads == 2


def test_lora_for_a_classifier_adapts_only_layers_it_uses_and_resumes(base):
    rows = [{"text": ("Emma handsome " if i % 2 else "rich world ") * (1 + i % 3), "label": "ab"[i % 2],
             "split": "test" if i < 12 else "val" if i < 20 else "train"} for i in range(60)]
    (base / "pairs-untied.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = [str(base / "pairs-untied.jsonl")]
    bases = {"transformer": {**TINY_MODEL, "tie_embeddings": False},
             "gru": {"d_model": 16, "d_hidden": 24, "n_layers": 1, "context_len": 32}}
    for arch, fields in bases.items():
        config = {"data": {"sources": [str(base / "base.txt")], "cache_dir": str(base / "cache")},
                  "tokenizer": {"kind": "char"}, "model": {"arch": arch, **fields},
                  "train": {"max_steps": 2, "max_time": 0, "batch_size": 8, "progress": False, "threads": 1,
                            "sample_tokens": 0}}
        lmforge.train(config, out=base / f"untied-{arch}", log=quiet)
    overrides = [*QUIET, f"data.cache_dir={json.dumps(str(base / 'cache'))}"]
    # a Transformer with its own output layer: LoRA goes on the blocks, not on the unused lm_head,
    # so every adapter trains and the run resumes (an adapter without gradients had no optimizer state)
    _, result = lmforge.finetune(base / "untied-transformer", data, base / "cls-lora", task="classify", mode="lora",
                                 max_steps=4, overrides=overrides, log=quiet)
    adapter = load_file(result.run_dir / "adapter.safetensors")
    assert adapter and not any(k.startswith("lm_head.") for k in adapter)
    assert all(v.abs().max() > 0 for k, v in adapter.items() if k.endswith("lora_b"))
    lmforge.train(None, result.run_dir, resume=True, overrides=["train.max_steps=6"], log=quiet)
    assert lmforge.load(result.run_dir).classify(["rich world"])[0].keys() == {"a", "b"}
    with pytest.raises(LmforgeError, match="a classifier does not use lm_head"):
        lmforge.finetune(base / "untied-transformer", data, base / "cls-head", task="classify", mode="lora",
                         lora_targets=["lm_head"], max_steps=2, overrides=overrides, log=quiet)
    # an untied GRU's only LoRA target is that output layer: refused, naming the modes that train something
    with pytest.raises(LmforgeError, match="adapts only its output layer .*--mode freeze or --mode full"):
        lmforge.finetune(base / "untied-gru", data, base / "gru-lora", task="classify", mode="lora", max_steps=2,
                         overrides=overrides, log=quiet)
    assert not (base / "gru-lora").exists()
