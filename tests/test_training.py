"""Training, checkpoints, resume, generation and evaluation through the Python API."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.config import TrainConfig
from lmforge.data.batches import get_batch, get_epoch_batch, lm_batches
from lmforge.errors import LmforgeError
from lmforge.models import build_model
from lmforge.training.optim import build_optimizers, lr_factor
from lmforge.training.plots import read_metrics
from lmforge.training.step import lm_loss, train_step


def tiny_config(text_file, cache_dir, arch="transformer", tokenizer="char", steps=30, **train):
    model = {"transformer": {"d_model": 32, "n_layers": 2, "n_heads": 2, "context_len": 32, "dropout": 0.1,
                             "tie_embeddings": False},  # a 32-wide head learns faster untied in 30 steps
             "lstm": {"d_model": 32, "d_hidden": 32, "n_layers": 1, "context_len": 32},
             "gru": {"d_model": 32, "d_hidden": 32, "n_layers": 1, "context_len": 32},
             "cnn": {"d_model": 32, "n_layers": 2, "context_len": 32}}[arch]
    return {
        "data": {"sources": [str(text_file)], "cache_dir": str(cache_dir)},
        "tokenizer": {"kind": tokenizer},
        "model": {"arch": arch, **model},
        "train": {"max_steps": steps, "max_time": 0, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5,
                  "eval_interval": 10, "progress": False, "threads": 1, "sample_tokens": 20, **train},
    }


def quiet(*_):
    pass


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import TINY_TEXT

    folder = tmp_path_factory.mktemp("trained")
    (folder / "tiny.txt").write_text(TINY_TEXT)
    return lmforge.train(tiny_config(folder / "tiny.txt", folder / "cache"), out=folder / "run", log=quiet)


def test_training_lowers_the_loss_and_writes_a_complete_run(run):
    lm, result = run
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png",
                 "summary.json", "manifest.json", "checkpoints/step-00000030/trainer_state.json",
                 "checkpoints/step-00000030/optimizer0.safetensors"):
        assert (result.run_dir / name).exists(), name
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert result.steps == 30 and summary["steps"] == 30
    # the trained model predicts the validation text far better than uniform guessing over its vocabulary
    uniform = math.log2(lm.tokenizer.vocab_size)  # bits per character = bits per byte for ASCII text
    assert summary["val"]["bits_per_byte"] < 0.75 * uniform


def test_loaded_model_matches_the_trained_weights(run):
    lm, result = run
    again = lmforge.load(result.run_dir)
    x = torch.randint(0, lm.tokenizer.vocab_size, (2, 16))
    torch.testing.assert_close(lm.model(x)[0], again.model(x)[0], rtol=0, atol=0)
    assert lm.generate("Emma", max_new_tokens=20, seed=3) == again.generate("Emma", max_new_tokens=20, seed=3)


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tiny_file, tmp_path):
    # dropout 0.1 is on: the resumed run must draw the same dropout masks as the straight one
    config = tiny_config(tiny_file, tmp_path / "cache", steps=24)
    lmforge.train(config, out=tmp_path / "straight", log=quiet, final_eval=False)

    def interrupt(step):
        if step == 11:
            raise KeyboardInterrupt

    _, result = lmforge.train(config, out=tmp_path / "resumed", log=quiet, on_step=interrupt)
    assert result.interrupted and result.steps == 11
    assert not (tmp_path / "resumed" / "summary.json").exists()  # an interrupted run is not reported as done
    lmforge.train(None, out=tmp_path / "resumed", resume=True, log=quiet, final_eval=False)
    for name in ("checkpoints/step-00000024/model.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000024" / "trainer_state.json").read_text())
    assert state["step"] == 24

    def rows(folder):  # the metrics log, without timings
        return [{k: v for k, v in r.items() if k not in ("train_time", "tokens_per_s")}
                for r in read_metrics(tmp_path / folder / "metrics.jsonl")]
    assert rows("resumed") == rows("straight")


def test_the_budget_the_user_names_is_the_one_that_binds(tiny_file, tmp_path):
    from lmforge.config import build_config

    assert build_config(None, None, ["train.max_steps=3"]).train.max_time is None  # steps alone: no time limit
    assert build_config(None, "tutorial", ["train.max_steps=3"]).train.max_time == 300  # the preset's stays
    assert build_config({"train": {"max_time": 60}}, None, ["train.max_steps=3"]).train.max_time == 60
    config = tiny_config(tiny_file, tmp_path / "cache", steps=4)
    del config["train"]["max_time"]
    budget = lmforge.train(config, out=tmp_path / "run", log=quiet, final_eval=False)[1].train_time + 0.5
    # continued with a time budget, the run's old step budget no longer stops it
    _, result = lmforge.train(None, out=tmp_path / "run", resume=True, overrides=[f"train.max_time={budget}"],
                              log=quiet, final_eval=False)
    assert result.steps > 4
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["max_steps"] is None and saved["max_time"] == budget
    lmforge.train(None, out=tmp_path / "run", resume=True, log=quiet, final_eval=False)  # finished: nothing to do
    with pytest.raises(LmforgeError, match="has trained for .* s already, more than --max-time 0.1 s"):
        lmforge.train(None, out=tmp_path / "run", resume=True, overrides=["train.max_time=0.1"], log=quiet)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"] == saved  # unchanged
    with pytest.raises(LmforgeError, match="--budget is the training time; drop train.max_steps"):
        lmforge.train(None, out=tmp_path / "other", budget=20, overrides=["train.max_steps=5"], log=quiet)


def test_a_run_whose_text_changed_is_not_resumed_on_the_new_text(tiny_file, tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text(tiny_file.read_text())
    config = tiny_config(text, tmp_path / "cache", steps=24)

    def interrupt(step):
        if step == 11:
            raise KeyboardInterrupt

    lmforge.train(config, out=tmp_path / "run", log=quiet, on_step=interrupt)
    text.write_text(tiny_file.read_text().replace("e", "E"))  # edited in between
    with pytest.raises(LmforgeError, match="has changed since"):
        lmforge.train(None, out=tmp_path / "run", resume=True, log=quiet, final_eval=False)
    from lmforge.cli import main

    assert main(["eval", str(tmp_path / "run")]) == 0  # scored, and said to be on other text
    assert "has changed since this run trained" in capsys.readouterr().err
    text.write_text(tiny_file.read_text())  # restored: the run goes on
    _, result = lmforge.train(None, out=tmp_path / "run", resume=True, log=quiet, final_eval=False)
    assert result.steps == 24


def test_a_compiled_cpu_run_repeats_bitwise_and_resumes_as_it_would_have_gone_on(tiny_file, tmp_path):
    # a compiled step on a CPU adds its partial sums in a fixed order (deterministic algorithms), so a
    # repeated run, and a resumed one, end with the same weights as an uninterrupted one
    try:
        torch.compile(lambda x: x * 2)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 - no working C++ compiler here
        pytest.skip(f"torch.compile does not work here: {type(e).__name__}")
    config = tiny_config(tiny_file, tmp_path / "cache", steps=10, compile=True, threads=2)
    for name in ("first", "second"):
        lmforge.train(config, out=tmp_path / name, log=quiet, final_eval=False)

    def interrupt(step):
        if step == 4:
            raise KeyboardInterrupt

    _, result = lmforge.train(config, out=tmp_path / "resumed", log=quiet, on_step=interrupt)
    assert result.interrupted and result.steps == 4
    import shutil

    shutil.copytree(tmp_path / "resumed", tmp_path / "eager")
    lmforge.train(None, out=tmp_path / "resumed", resume=True, log=quiet, final_eval=False)
    said = []  # resumed without compiling: it goes on, and says it will not end bit for bit
    lmforge.train(None, out=tmp_path / "eager", resume=True, overrides=["train.compile=false"], log=said.append,
                  final_eval=False)
    assert any("train.compile=true" in line and "bit for bit" in line for line in said)
    first = load_file(str(tmp_path / "first" / "model.safetensors"))
    assert json.loads((tmp_path / "first" / "config.json").read_text())["train"]["compile"] is True
    for other in ("second", "resumed"):
        weights = load_file(str(tmp_path / other / "model.safetensors"))
        assert all(torch.equal(first[key], weights[key]) for key in first), other


def test_a_run_saved_before_the_value_residual_the_embeddings_rate_and_attention_dropout_loads_as_it_was(
        tiny_file, tmp_path):
    from lmforge import checkpoint as ckpt

    config = tiny_config(tiny_file, tmp_path / "cache", steps=5)
    config["model"].update(value_residual=False, dropout=0.2, attention_dropout=0.2)
    lm, result = lmforge.train(config, out=tmp_path / "run", log=quiet)
    path = result.run_dir / ckpt.CONFIG  # what an older lmforge wrote: no value_residual field at all
    saved = json.loads(path.read_text())
    del saved["model"]["options"]["value_residual"]
    del saved["train"]["embedding_lr_scale"]
    del saved["model"]["options"]["attention_dropout"]
    path.write_text(json.dumps(saved))
    ckpt.write_manifest(result.run_dir, list(json.loads((result.run_dir / ckpt.MANIFEST).read_text())["files"]))
    old = lmforge.load(result.run_dir)
    assert old.model.config.value_residual is False
    assert old.model.config.attention_dropout == 0.2  # the shared rate, which it applied to attention too
    assert ckpt.read_config(result.run_dir)["train"]["embedding_lr_scale"] == 1.0  # the shared rate it trained with
    assert old.generate("Emma", 20, seed=1) == lm.generate("Emma", 20, seed=1)
    new = build_model("transformer", vocab_size=10)
    assert new.blocks[1].attn.value_mix is not None and new.blocks[1].attn.dropout == 0.0  # new models: as today


def test_resume_with_a_conflicting_model_is_refused(run):
    _, result = run
    with pytest.raises(LmforgeError, match="conflict"):
        lmforge.train(None, out=result.run_dir, resume=True, overrides=["model.d_model=64"], log=quiet)


def test_an_extended_run_that_is_interrupted_continues_to_its_new_budget(run, tmp_path):
    import shutil

    from lmforge import checkpoint as ckpt

    _, result = run
    run_dir = shutil.copytree(result.run_dir, tmp_path / "extended")
    with pytest.raises(LmforgeError, match="train.lr"):  # not the same run any more: refused, not ignored
        lmforge.train(None, out=run_dir, resume=True, overrides=["train.lr=0.5"], log=quiet)
    target = result.steps + 6

    def interrupt(step):
        if step == result.steps + 2:
            raise KeyboardInterrupt

    _, stopped = lmforge.train(None, out=run_dir, resume=True, overrides=[f"train.max_steps={target}"], log=quiet,
                               on_step=interrupt)
    assert stopped.interrupted and ckpt.read_config(run_dir)["train"]["max_steps"] == target
    _, done = lmforge.train(None, out=run_dir, resume=True, log=quiet, final_eval=False)  # as the run's message says
    assert done.steps == target
    lmforge.load(run_dir)  # the manifest still vouches for the rewritten config.json


def test_missing_data_fails_before_the_probe_times_anything(tmp_path, monkeypatch):
    import lmforge.probe

    monkeypatch.setattr(lmforge.probe, "choices", lambda *a, **k: pytest.fail("probed before reading the data"))
    config = tiny_config(tmp_path / "missing.txt", tmp_path / "cache", dtype="auto")
    with pytest.raises(LmforgeError, match="missing.txt"):
        lmforge.train(config, out=tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()
    (tmp_path / "short.txt").write_text("Emma was here.")  # fewer tokens than one window: said first, and alone
    said = []
    with pytest.raises(LmforgeError, match="fewer than context_len"):
        lmforge.train(tiny_config(tmp_path / "short.txt", tmp_path / "cache", dtype="auto"), out=tmp_path / "run",
                      log=said.append)
    assert said == [] and not (tmp_path / "run").exists()


def test_training_into_an_existing_run_is_refused_and_leaves_it_intact(run, tiny_file, tmp_path):
    _, result = run
    before = (result.run_dir / "model.safetensors").read_bytes()
    with pytest.raises(LmforgeError, match="already holds a run"):
        lmforge.train(tiny_config(tiny_file, tmp_path / "cache"), out=result.run_dir, log=quiet)
    with pytest.raises(LmforgeError, match="not an empty folder"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        lmforge.train(tiny_config(tiny_file, tmp_path / "cache"), out=tmp_path / "other", log=quiet)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(LmforgeError, match="notes.txt is a file; --out names the folder"):
        lmforge.train(tiny_config(tiny_file, tmp_path / "cache"), out=tmp_path / "other" / "notes.txt", log=quiet)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert (result.run_dir / "model.safetensors").read_bytes() == before


def test_keep_best_keeps_the_weights_of_the_best_evaluation(tmp_path):
    # The validation text (the last 10%) is unlike the training text: once the model starts to learn the
    # training text by heart, the validation loss gets worse after its best.
    from conftest import TINY_TEXT

    from lmforge.api import build_config
    from lmforge.training.jobs import language_model_job
    from lmforge.training.loop import train as run_loop

    text = TINY_TEXT * 2 + "zq xj vk " * 80
    (tmp_path / "text.txt").write_text(text)
    config = build_config(tiny_config(tmp_path / "text.txt", tmp_path / "cache", steps=60, eval_interval=5,
                                      lr=0.01, warmup_steps=0, decay_fraction=0.0, ema=0.0))
    job = language_model_job(config)
    snapshots = {}

    def snapshot(step):
        if step % 5 == 0:
            snapshots[step] = {k: v.clone() for k, v in job.model.state_dict().items()}

    run_loop(config, tmp_path / "run", job, log=quiet, on_step=snapshot)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])["step"]
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(saved[k], snapshots[best][k]) for k in saved)
    assert best != evals[-1]["step"]  # the test is only worth something when the best is not the last
    final = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000060" / "model.safetensors"))
    assert any(not torch.equal(saved[k], final[k]) for k in saved)


def test_the_saved_model_is_the_moving_average_of_the_weights(tiny_file, tmp_path):
    from lmforge.api import build_config
    from lmforge.training.average import WARM_IN
    from lmforge.training.jobs import language_model_job
    from lmforge.training.loop import train as run_loop

    config = build_config(tiny_config(tiny_file, tmp_path / "cache", steps=20, keep_best=False, ema=0.8))
    job = language_model_job(config)
    names = [n for n, p in job.model.named_parameters()]
    average = {n: p.detach().clone() for n, p in job.model.named_parameters()}

    def fold(step):
        decay = min(0.8, (1 + step) / (WARM_IN + step))
        for n, p in job.model.named_parameters():
            average[n].lerp_(p.detach(), 1 - decay)

    run_loop(config, tmp_path / "run", job, log=quiet, on_step=fold)
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    raw = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000020" / "model.safetensors"))
    kept = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000020" / "average.safetensors"))
    for n in names:
        torch.testing.assert_close(saved[n], average[n], rtol=0, atol=1e-6)
        assert torch.equal(kept[n], saved[n])
    assert any(not torch.equal(saved[n], raw[n]) for n in names)  # training went on with the raw weights


def _clone_pair(dropout=0.0):
    torch.manual_seed(0)
    a = build_model("transformer", vocab_size=30, d_model=32, n_layers=2, n_heads=2, context_len=16, dropout=dropout)
    b = build_model("transformer", vocab_size=30, d_model=32, n_layers=2, n_heads=2, context_len=16, dropout=dropout)
    b.load_state_dict(a.state_dict())
    return a, b


def test_accumulated_micro_batches_equal_one_large_batch():
    cfg = TrainConfig(max_steps=1)
    data = torch.randint(0, 30, (8, 17), generator=torch.Generator().manual_seed(1))
    x, y = data[:, :-1], data[:, 1:].clone()
    y[:3, :10] = -100  # masked targets (a completion's prompt): micro-batches hold different target counts
    big, small = _clone_pair()
    run = dict(device=torch.device("cpu"), dtype=torch.float32, grad_clip=1.0)
    a = train_step(big, big, build_optimizers(big, cfg), [(x, y)], lm_loss, **run)
    b = train_step(small, small, build_optimizers(small, cfg), [(x[:3], y[:3]), (x[3:], y[3:])], lm_loss, **run)
    assert math.isclose(a.loss, b.loss, rel_tol=1e-5) and math.isclose(a.grad_norm, b.grad_norm, rel_tol=1e-4)
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_a_step_with_a_non_finite_loss_changes_nothing():
    model, _ = _clone_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.randint(0, 30, (2, 17))
    with torch.no_grad():
        model.tok_emb.weight[data[0, 0]] = math.nan
    result = train_step(model, model, build_optimizers(model, TrainConfig(max_steps=1)),
                        [(data[:, :-1], data[:, 1:])], lm_loss, device=torch.device("cpu"), dtype=torch.float32,
                        grad_clip=1.0)
    assert result.skipped
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or k == "tok_emb.weight" for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_schedules_warm_up_then_hold_and_decay_or_follow_a_cosine():
    wsd = TrainConfig(max_steps=100, warmup_steps=10, decay_fraction=0.3, min_lr_ratio=0.1)
    assert lr_factor(0, 0.0, wsd) == pytest.approx(0.1) and lr_factor(9, 0.09, wsd) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, wsd) == 1.0 and lr_factor(69, 0.69, wsd) == 1.0  # stable until 70%
    assert lr_factor(85, 0.85, wsd) == pytest.approx(0.55) and lr_factor(99, 1.0, wsd) == pytest.approx(0.1)
    cosine = TrainConfig(max_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(50, 0.5, cosine) == pytest.approx(0.55) and lr_factor(99, 1.0, cosine) == pytest.approx(0.1)
    values = [lr_factor(s, s / 100, cosine) for s in range(10, 100)]
    assert values == sorted(values, reverse=True)
    short = TrainConfig(max_steps=40, warmup_steps=100, decay_fraction=0.3, min_lr_ratio=0.1)  # shorter than its warm-up
    assert lr_factor(20, 0.5, short) == pytest.approx(0.21) and lr_factor(39, 1.0, short) == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer,schedule", [("muon", "wsd"), ("adamw", "cosine"), ("muon", "cosine")])
def test_muon_and_both_schedules_train(optimizer, schedule, tiny_file, tmp_path):
    config = tiny_config(tiny_file, tmp_path / "cache", steps=20, optimizer=optimizer, schedule=schedule,
                         sample_tokens=0)
    lm, result = lmforge.train(config, out=tmp_path / "run", log=quiet)
    losses = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] - 0.3
    state = json.loads((result.run_dir / "checkpoints" / "step-00000020" / "trainer_state.json").read_text())
    assert len(state["optimizers"]) == (2 if optimizer == "muon" else 1)
    if optimizer == "muon":
        muon = state["optimizers"][0]["param_groups"][0]
        # the last step (19 of 20) ran at the schedule's factor for 95% of the budget
        assert muon["lr"] == pytest.approx(0.02 * lr_factor(19, 19 / 20, TrainConfig(**config["train"])))


def test_generation_beyond_the_context_window_keeps_going(run):
    lm, _ = run
    text = lm.generate("Emma", max_new_tokens=100, seed=1, stop=[])  # context_len is 32
    assert len(text) > 50


def test_api_sampling_options_and_stop_strings(run):
    lm, _ = run
    assert lm.generate("Emma", max_new_tokens=30, seed=5) == lm.generate("Emma", max_new_tokens=30, seed=5)
    assert lm.generate("Emma", max_new_tokens=30, seed=5) != lm.generate("Emma", max_new_tokens=30, seed=6)
    greedy = lm.generate("Emma", max_new_tokens=30, temperature=0)
    assert greedy == lm.generate("Emma", max_new_tokens=30, temperature=0, seed=9)
    assert lm.generate("Emma", max_new_tokens=30, top_k=1, seed=2) == greedy  # top-k 1 is greedy
    assert " " in greedy
    stopped = lm.generate("Emma", max_new_tokens=60, temperature=0, stop=[" "])
    assert stopped == greedy[:greedy.index(" ")]
    assert "".join(lm.stream("Emma", max_new_tokens=30, temperature=0)) == greedy
    exact = lm.generate("Emma", max_new_tokens=30, temperature=0, exact=True)
    fast = lmforge.load(lm.run_dir, decoding="int8")  # (the probe may choose fp32 on a busy machine)
    assert fast.generate("Emma", max_new_tokens=30, temperature=0)[:10] == exact[:10]


def test_evaluation_scores_every_byte_once(run):
    lm, _ = run
    text = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home. " * 12
    result = lm.evaluate(text)
    assert result["bytes"] == len(text.encode())
    assert result["tokens"] == len(lm.tokenizer.encode(text))  # char: one prediction per character
    assert math.isclose(result["perplexity"], math.exp(result["nats_per_token"]))
    shuffled = "".join(sorted(text))  # the same characters in an order the model never saw
    assert lm.evaluate(shuffled)["bits_per_byte"] > result["bits_per_byte"] + 0.5


def test_sliding_windows_score_each_position_exactly_once():
    from lmforge.evaluation.likelihood import _windows

    for n in (2, 5, 33, 34, 100, 257):
        scored = []
        for start, end, first in _windows(n, window=33, stride=16):
            assert end - start <= 33 and start < first <= end
            assert first - start >= min(first, 17) - 1  # each scored token sees half a window
            scored += list(range(first, end))
        assert scored == list(range(1, n))


def test_windowed_scoring_equals_scoring_each_window_in_full():
    import torch.nn.functional as F

    from lmforge.evaluation.likelihood import _windows, score_ids

    torch.manual_seed(0)
    model = build_model("transformer", vocab_size=50, d_model=32, n_layers=2, n_heads=2, context_len=16).eval()
    ids = torch.randint(1, 50, (150,)).tolist()
    score = score_ids(model, ids, bos=0, batch_windows=3)
    seq = torch.tensor([0] + ids)
    nats, correct = 0.0, 0
    with torch.no_grad():
        for start, end, first in _windows(len(seq), window=17, stride=8):
            logits = model(seq[start:end - 1][None])[0][0][first - start - 1:]  # every position, then the kept ones
            nats += F.cross_entropy(logits, seq[first:end], reduction="sum").item()
            correct += int((logits.argmax(-1) == seq[first:end]).sum())
    assert score.tokens == len(ids) and score.correct1 == correct
    assert math.isclose(score.nats, nats, rel_tol=1e-5)


@pytest.mark.parametrize("arch", ["transformer", "gru"])
def test_a_long_scoring_reports_its_progress(arch, monkeypatch, capsys):
    from lmforge.evaluation import likelihood
    from lmforge.tokenizers import train_tokenizer

    monkeypatch.setattr(likelihood, "QUIET_S", 0.0)  # as if each text took minutes
    monkeypatch.setattr(likelihood, "LOUD_CHARS", 1000)
    texts = [("a", "Emma Woodhouse, handsome. " * 800), ("b", "and rich. " * 1000)]
    tokenizer = train_tokenizer("char", [t for _, t in texts])
    model = build_model(arch, vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, context_len=16).eval()
    quiet_result = likelihood.evaluate_documents(model, tokenizer, texts[:1])  # 20,800 characters: loud
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("scoring: ") and line.endswith(" s left") for line in lines)
    shares = [int(line.split()[1].rstrip("%")) for line in lines]
    assert shares == sorted(set(shares)) and shares[-1] < 100  # each tenth once, in order; none at the end
    likelihood.evaluate_documents(model, tokenizer, texts)  # over two documents: shares of the whole
    shares = [int(line.split()[1].rstrip("%")) for line in capsys.readouterr().err.splitlines()]
    assert shares == sorted(set(shares)) and len(shares) >= 5
    monkeypatch.setattr(likelihood, "LOUD_CHARS", 100_000)  # a short text says nothing
    assert likelihood.evaluate_documents(model, tokenizer, texts[:1]) == quiet_result
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("arch", ["lstm", "gru", "cnn"])
def test_every_family_trains_through_the_same_loop(arch, tiny_file, tmp_path):
    lm, result = lmforge.train(tiny_config(tiny_file, tmp_path / "cache", arch=arch, steps=25),
                               out=tmp_path / arch, log=quiet)
    losses = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]
    assert lm.model.arch == arch and lm.decoding == "fp32"
    assert lm.generate("Emma", max_new_tokens=10, seed=0) == lm.generate("Emma", max_new_tokens=10, seed=0)


@pytest.mark.parametrize("arch, lr, decay, scale, warmup", [("transformer", 1.5e-3, 0.6, 3.0, 100),
                                                           ("lstm", 3e-3, 0.1, 1.0, 20), ("cnn", 3e-3, 0.1, 1.0, 20)])
def test_an_unset_rate_decay_and_warm_up_are_the_familys_own_and_the_run_records_them(arch, lr, decay, scale, warmup,
                                                                                     tiny_file, tmp_path):
    config = tiny_config(tiny_file, tmp_path / "cache", arch=arch, steps=40)  # its first log row, before any decay
    del config["train"]["lr"], config["train"]["warmup_steps"]
    config["train"].pop("weight_decay", None)
    _, result = lmforge.train(config, out=tmp_path / "run", log=quiet, final_eval=False)
    recorded = json.loads((result.run_dir / "config.json").read_text())["train"]
    assert (recorded["lr"], recorded["weight_decay"], recorded["embedding_lr_scale"]) == (lr, decay, scale)
    assert recorded["warmup_steps"] == warmup
    first = read_metrics(result.run_dir / "metrics.jsonl")[0]
    assert (first["step"], first["lr_factor"]) == (10, pytest.approx(10 / warmup))  # ten steps into the warm-up
    assert first["lr"] == pytest.approx(lr * 10 / warmup)  # the rate itself, as config.json's lr names it
    model = build_model(arch, **{k: v for k, v in config["model"].items() if k != "arch"}, vocab_size=40)
    groups = build_optimizers(model, TrainConfig(max_steps=1))[0].param_groups
    # hidden matrices, then the embeddings (and head) at their own rate; norms and biases never decay
    assert [(g["base_lr"], g["weight_decay"]) for g in groups] == [(lr, decay), (lr * scale, decay), (lr, 0.0)]
    assert groups[1]["params"][0] is model.parameter_groups()["embeddings"][0]
    muon = TrainConfig(max_steps=1, optimizer="muon")  # Muon's decay multiplies its own larger rate: 0.1
    assert [g["weight_decay"] for opt in build_optimizers(model, muon) for g in opt.param_groups][:2] == [0.1, 0.1]
    config["train"].update(lr=2e-3, weight_decay=0.3, embedding_lr_scale=2)  # values given are kept
    _, result = lmforge.train(config, out=tmp_path / "given", log=quiet, final_eval=False)
    recorded = json.loads((result.run_dir / "config.json").read_text())["train"]
    assert (recorded["lr"], recorded["weight_decay"], recorded["embedding_lr_scale"]) == (2e-3, 0.3, 2)
    with pytest.raises(LmforgeError, match="train.embedding_lr_scale must be a positive number, got 0"):
        lmforge.build_config(overrides=["train.embedding_lr_scale=0"])


def test_dropout_and_weight_decay_follow_the_passes_a_run_will_make_unless_the_user_chose_them(tiny_file, tmp_path):
    def chosen(out, arch="transformer", model=None, **train):
        config = tiny_config(tiny_file, tmp_path / "cache", arch=arch, steps=10, **train)
        config["model"].pop("dropout", None)
        config["model"].update(model or {})
        logged = []
        lmforge.train(config, out=tmp_path / out, log=logged.append, final_eval=False)
        saved = json.loads((tmp_path / out / "config.json").read_text())
        return saved["model"]["options"]["dropout"], saved["train"]["weight_decay"], " ".join(map(str, logged))

    # 10 steps of 8 x 32 tokens read the ~4,300 training characters under once: the family's defaults
    dropout, decay, logged = chosen("few")
    assert (dropout, decay) == (0.05, 0.6) and "passes" not in logged
    # 10 steps of 128 rows read them about 9 times: more of both, said in the log and recorded
    dropout, decay, logged = chosen("many", batch_size=128)
    assert (dropout, decay) == (0.1, 1.5)
    assert "about 9 passes over the training text: dropout 0.1, weight decay 1.5" in logged
    # a time limit: the passes come from this machine's speed, probed at the run's own size (about 50,000
    # tokens/s here, so 3 s make about 35 passes: a machine three times slower still makes more than 8)
    dropout, decay, logged = chosen("timed", max_steps=None, max_time=3.0, batch_size=128, eval_interval=1000)
    assert (dropout, decay) == (0.1, 1.5) and "passes over the training text" in logged
    # what the user chose is kept; the other families were not measured and keep theirs
    assert chosen("dropout", model={"dropout": 0.0}, batch_size=128)[:2] == (0.0, 1.5)
    assert chosen("decay", batch_size=128, weight_decay=0.2)[:2] == (0.1, 0.2)
    dropout, decay, logged = chosen("both", model={"dropout": 0.0}, batch_size=128, weight_decay=0.2)
    assert (dropout, decay) == (0.0, 0.2) and "passes" not in logged
    dropout, decay, logged = chosen("lstm", arch="lstm", batch_size=128)
    assert (dropout, decay) == (build_model("lstm", vocab_size=40).config.dropout, 0.1) and "passes" not in logged


def test_none_on_the_command_line_unsets_an_optional_field():
    config = lmforge.build_config(overrides=["train.lr=none", "train.threads=None", "train.max_steps=null"])
    assert (config.train.lr, config.train.threads, config.train.max_steps) == (None, None, None)
    with pytest.raises(LmforgeError, match="train.batch_size must be a whole number, got 'none'"):
        lmforge.build_config(overrides=["train.batch_size=none"])


def test_sampling_is_chosen_in_the_config(tmp_path):
    assert lmforge.build_config().train.sampling == "epochs"
    with pytest.raises(LmforgeError, match="train.sampling must be random or epochs, got 'shuffle'"):
        lmforge.build_config(overrides=["train.sampling=shuffle"])
    tokens = np.arange(2000, dtype=np.uint16)
    prepared = SimpleNamespace(train=tokens, val=tokens[:300], documents=[SimpleNamespace(bytes=300)])
    for sampling, draw in (("epochs", get_epoch_batch), ("random", get_batch)):
        batches = lm_batches(prepared, 16, 4, seed=3, eval_batches=1, sampling=sampling)
        assert torch.equal(batches.sample(5)[0], draw(tokens, 4, 16, seed=3, step=5)[0])


def test_budget_rule_grows_the_model_with_compute():
    from lmforge.training.sizing import ANCHOR_COMPUTE, LADDER, choose

    options = {"vocab_size": 4096, "context_len": 128}
    picks = [choose(options, ANCHOR_COMPUTE * f)[0]["d_model"] for f in (1 / 15, 1 / 3, 1, 6, 100, 10_000)]
    assert picks == sorted(picks) and picks[0] == 128 and picks[-1] == LADDER[-1]
    assert choose(options, ANCHOR_COMPUTE)[0] == {"d_model": 256, "n_layers": 4, "n_heads": 4}  # the anchor itself
    # measured on the Austen split on one machine: d_model 128 best after 30 and 60 s, 256 after 300 s
    assert [choose(options, c)[0]["d_model"] for c in (0.8e13, 1.77e13, 8.71e13)] == [128, 128, 256]
    assert choose(options, ANCHOR_COMPUTE / 2)[0]["d_model"] == 192  # between them
    from lmforge.training.sizing import ANCHOR_TOKENS

    # on the anchor's own text, more time buys more passes, not a larger model
    assert choose(options, ANCHOR_COMPUTE * 16, tokens=ANCHOR_TOKENS)[0]["d_model"] == 256
    assert choose(options, ANCHOR_COMPUTE * 16, tokens=ANCHOR_TOKENS * 20)[0]["d_model"] > 256


def test_adaptive_evaluation_learns_from_what_it_has_scored_and_leaves_the_model_alone(run):
    from lmforge.finetuning.adaptive import AdaptSettings, adaptive_score

    lm, _ = run
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    novel = "Quiet zebras juggle amber lanterns under violet skies. " * 12  # unlike the training text
    static = lm.evaluate(novel)
    adapted = adaptive_score(lm.model, lm.tokenizer, novel, AdaptSettings(lr=3e-3))
    assert adapted.tokens == static["tokens"] and adapted.bytes == static["bytes"]  # every token scored once
    assert adapted.bits_per_byte < 0.8 * static["bits_per_byte"]  # the repeats got cheap as it learned them
    lora = adaptive_score(lm.model, lm.tokenizer, novel, AdaptSettings(lr=3e-2, lora=True))
    assert lora.bits_per_byte < static["bits_per_byte"]
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_the_loss_plot_leaves_out_rows_it_cannot_read(tmp_path):
    from lmforge.training.plots import plot_losses

    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "val_losr": 2.9, "val_bpb": 3.1, "train_time": 1.0},  # edited by hand
            [1, 2], {"step": 3, "loss": "x"}, {"step": 4, "val_loss": 2.5, "val_bpb": 2.8, "train_time": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png") == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
