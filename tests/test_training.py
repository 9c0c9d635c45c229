"""Training, checkpoints, resume, generation and evaluation through the Python API."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge import api
from lmforge.errors import LmforgeError
from lmforge.generation import SamplingConfig, generate_ids, sample_next
from lmforge.training.plots import read_metrics


def tiny_config(text_file, cache_dir, arch="transformer", tokenizer="char", steps=30, **train):
    model = {"transformer": {"d_model": 32, "n_layers": 2, "n_heads": 2, "context_len": 32, "dropout": 0.1},
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
                 "summary.json", "last/trainer_state.json", "last/optimizer0.safetensors"):
        assert (result.run_dir / name).exists(), name
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["val"]["bits_per_byte"] > 0
    assert result.steps == 30


def test_loaded_model_matches_the_trained_weights(run):
    lm, result = run
    again = lmforge.load(result.run_dir)
    x = torch.randint(0, lm.tokenizer.vocab_size, (2, 16))
    torch.testing.assert_close(lm.model(x)[0], again.model(x)[0], rtol=0, atol=0)
    assert lm.generate("Emma", max_new_tokens=20, seed=3) == again.generate("Emma", max_new_tokens=20, seed=3)


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tiny_file, tmp_path):
    config = tiny_config(tiny_file, tmp_path / "cache", steps=24)
    lmforge.train(config, out=tmp_path / "straight", log=quiet, final_eval=False)

    def interrupt(step):
        if step == 11:
            raise KeyboardInterrupt

    from lmforge.training.loop import train as loop_train

    cfg = api.build_config(config)
    result = loop_train(cfg, tmp_path / "resumed", log=quiet, on_step=interrupt)
    assert result.interrupted and result.steps == 11
    lmforge.train(None, out=tmp_path / "resumed", resume=True, log=quiet, final_eval=False)
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = json.loads((tmp_path / "resumed" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 24


def test_resume_with_a_conflicting_model_is_refused(run):
    _, result = run
    with pytest.raises(LmforgeError, match="conflict"):
        lmforge.train(None, out=result.run_dir, resume=True, overrides=["model.d_model=64"], log=quiet)


def test_training_into_an_existing_run_is_refused_and_leaves_it_intact(run, tiny_file, tmp_path):
    _, result = run
    before = (result.run_dir / "model.safetensors").read_bytes()
    with pytest.raises(LmforgeError, match="already holds a run"):
        lmforge.train(tiny_config(tiny_file, tmp_path / "cache"), out=result.run_dir, log=quiet)
    with pytest.raises(LmforgeError, match="not empty"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        lmforge.train(tiny_config(tiny_file, tmp_path / "cache"), out=tmp_path / "other", log=quiet)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert (result.run_dir / "model.safetensors").read_bytes() == before


def test_cached_generation_equals_full_recomputation(run):
    lm, _ = run
    model = lm.model
    prompt = torch.tensor([lm.tokenizer.encode("Emma Wood")])
    cfg = SamplingConfig(max_new_tokens=20, temperature=0)
    cached = torch.stack(list(generate_ids(model, prompt, cfg)), dim=1)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq[:, prompt.size(1):])


def test_generation_beyond_the_context_window_keeps_going(run):
    lm, _ = run
    text = lm.generate("Emma", max_new_tokens=100, seed=1)  # context_len is 32
    assert len(text) > 50


def test_sampling_options_and_stop_strings(run):
    lm, _ = run
    assert lm.generate("Emma", max_new_tokens=30, seed=5) == lm.generate("Emma", max_new_tokens=30, seed=5)
    greedy = lm.generate("Emma", max_new_tokens=30, temperature=0)
    assert greedy == lm.generate("Emma", max_new_tokens=30, temperature=0, seed=9)
    top = lm.generate("Emma", max_new_tokens=30, top_k=1, seed=2)
    assert top == greedy  # top-k 1 is greedy
    stopped = lm.generate("Emma", max_new_tokens=60, temperature=0, stop=[" "])
    assert " " not in stopped and len(stopped) < 60
    pieces = list(lm.stream("Emma", max_new_tokens=30, temperature=0))
    assert "".join(pieces) == greedy


def test_sampling_draws_each_token_in_proportion_to_its_probability():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]]).expand(20000, 5)  # 20,000 independent draws
    ids = sample_next(logits, SamplingConfig(temperature=0.8, top_k=4), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(ids, minlength=5) / ids.numel()
    kept = torch.tensor([True, True, True, False, True])  # top-4 drops the -1.0
    expected = torch.where(kept, logits[0] / 0.8, -math.inf).softmax(-1)
    assert frequencies[3] == 0
    assert (frequencies - expected).abs().max() < 0.015  # about 4 standard errors


@pytest.mark.parametrize("bad, match", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
])
def test_nonsensical_sampling_values_are_rejected(run, bad, match):
    lm, _ = run
    with pytest.raises(LmforgeError, match=match):
        lm.generate("Emma", **bad)


def test_evaluation_scores_every_byte_once(run):
    lm, _ = run
    text = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home. " * 12
    result = lm.evaluate(text)
    assert result["bytes"] == len(text.encode())
    assert result["tokens"] == len(lm.tokenizer.encode(text))  # char: one prediction per character
    assert 0 < result["bits_per_byte"] < 8
    assert math.isclose(result["perplexity"], math.exp(result["nats_per_token"]))


def test_sliding_windows_score_each_position_exactly_once():
    from lmforge.evaluation.likelihood import _windows

    for n in (2, 5, 33, 34, 100, 257):
        scored = []
        for start, end, first in _windows(n, window=33, stride=16):
            assert end - start <= 33 and start < first <= end
            assert first - start >= min(first, 17) - 1  # each scored token sees half a window
            scored += list(range(first, end))
        assert scored == list(range(1, n))


@pytest.mark.parametrize("arch", ["lstm", "gru", "cnn"])
def test_every_family_trains_through_the_same_loop(arch, tiny_file, tmp_path):
    lm, result = lmforge.train(tiny_config(tiny_file, tmp_path / "cache", arch=arch, steps=15),
                               out=tmp_path / arch, log=quiet)
    assert result.extra["val"]["bits_per_byte"] > 0
    assert lm.model.arch == arch
    assert len(lm.generate("Emma", max_new_tokens=10, seed=0)) > 0


def test_budget_rule_grows_the_model_with_compute():
    from lmforge.sizing import ANCHOR_COMPUTE, LADDER, choose

    options = {"vocab_size": 4096, "context_len": 128}
    picks = [choose(options, ANCHOR_COMPUTE * f)[0]["d_model"] for f in (1 / 15, 1 / 3, 1, 6, 100, 10_000)]
    assert picks == sorted(picks) and picks[0] == 128 and picks[-1] == LADDER[-1]
    assert choose(options, ANCHOR_COMPUTE)[0] == {"d_model": 256, "n_layers": 4, "n_heads": 4}  # the anchor itself
    assert choose(options, ANCHOR_COMPUTE / 3)[0]["d_model"] == 192  # measured best after 100 s
