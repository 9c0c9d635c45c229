"""Reliability: resume points survive kills and damage, bad files are named in one line, numerical
trouble never reaches a checkpoint, and the everyday failures a user hits each get a clear message."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge import checkpoint as ckpt
from lmforge.cli import main
from lmforge.errors import LmforgeError

PACKAGE = Path(lmforge.__file__).parent


def quiet(*_):
    pass


def tiny(text_file, cache, steps=24, **train):
    return {"data": {"sources": [str(text_file)], "cache_dir": str(cache)}, "tokenizer": {"kind": "char"},
            "model": {"arch": "transformer", "d_model": 32, "n_layers": 2, "n_heads": 2, "context_len": 32},
            "train": {"max_steps": steps, "max_time": 0, "batch_size": 8, "warmup_steps": 4, "eval_interval": 6,
                      "checkpoint_interval": 6, "progress": False, "threads": 1, "sample_tokens": 0, **train}}


def weights_of(run: Path, step: int | None = None) -> dict:
    folder = run if step is None else run / "checkpoints" / f"step-{step:08d}"
    return load_file(str(folder / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from conftest import TINY_TEXT

    folder = tmp_path_factory.mktemp("straight")
    (folder / "tiny.txt").write_text(TINY_TEXT)
    lmforge.train(tiny(folder / "tiny.txt", folder / "cache"), out=folder / "run", log=quiet)
    return folder


def test_only_the_newest_resume_points_are_kept(straight):
    points = sorted(p.name for p in (straight / "run" / "checkpoints").iterdir())
    assert points == ["step-00000018", "step-00000024"]  # keep_checkpoints = 2


def test_weights_are_readable_by_whoever_can_read_the_run(straight):
    # a server under another account, or a group, loads the weights the owner trained
    run = straight / "run"
    point = sorted((run / "checkpoints").iterdir())[-1]
    modes = {path.name: path.stat().st_mode & 0o777 for path in [run / "model.safetensors", *point.iterdir()]}
    assert set(modes.values()) == {(run / "config.json").stat().st_mode & 0o777}, modes


def test_a_damaged_newest_resume_point_falls_back_to_the_one_before_and_still_ends_the_same(straight, tmp_path):
    config = tiny(straight / "tiny.txt", straight / "cache")

    def stop_at_13(step):
        if step == 13:
            raise KeyboardInterrupt

    lmforge.train(config, out=tmp_path / "run", log=quiet, on_step=stop_at_13)
    newest = tmp_path / "run" / "checkpoints" / "step-00000013"
    data = bytearray((newest / "optimizer0.safetensors").read_bytes())
    data[-20] ^= 0xFF  # a flipped byte inside the tensor data
    (newest / "optimizer0.safetensors").write_bytes(bytes(data))
    lines = []
    lmforge.train(None, out=tmp_path / "run", resume=True, log=lines.append)
    assert any("step-00000013 cannot be used" in line and "damaged" in line for line in lines)
    assert any("resuming" in line and "step 12" in line for line in lines)
    assert same(weights_of(tmp_path / "run", 24), weights_of(straight / "run", 24))


def test_a_run_killed_before_its_first_resume_point_trains_again_from_the_start(straight, tmp_path):
    config = tiny(straight / "tiny.txt", straight / "cache")
    lmforge.train(config, out=tmp_path / "run", log=quiet, on_step=lambda step: (_ for _ in ()).throw(
        KeyboardInterrupt) if step == 3 else None)
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if SIGKILLed before it saved one
    lines = []
    lmforge.train(None, out=tmp_path / "run", resume=True, log=lines.append)
    assert any("before its first resume point" in line for line in lines)
    assert same(weights_of(tmp_path / "run", 24), weights_of(straight / "run", 24))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_weights_are_named_in_one_line(straight, tmp_path, capsys, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight / "run", run)
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        for i in range(4):  # four flipped bytes inside the tensor data: a valid file with wrong numbers
            data[len(data) // 2 + 97 * i] ^= 0x5A
    else:
        data = data[:len(data) // 2]
    weights.write_bytes(bytes(data))
    before = weights.read_bytes()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "model.safetensors" in err
    assert ("damaged" if damage == "flip" else "truncated or corrupt") in err
    assert weights.read_bytes() == before  # reading never writes


def test_changed_json_files_and_other_versions_are_named(straight, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight / "run", run)
    tokenizer = json.loads((run / "tokenizer.json").read_text())
    tokenizer["chars"][3] = "Z"
    (run / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(LmforgeError, match="tokenizer.json is damaged"):
        lmforge.load(run)
    shutil.copy(straight / "run" / "tokenizer.json", run / "tokenizer.json")
    text = (run / "config.json").read_text()  # damage that happens to hide the format version is damage
    (run / "config.json").write_text(text.replace('"format_version"', '"format_ver2ion"'))
    with pytest.raises(LmforgeError, match="config.json is damaged"):
        lmforge.load(run)
    # an edited size reads as a bad setting to the config's own checks: on resume, too, it is damage first
    (run / "config.json").write_text(text.replace('"d_model": 32', '"d_model": 33'))
    assert main(["train", "--resume", str(run)]) == 2
    assert "config.json is damaged" in capsys.readouterr().err
    shutil.copy(straight / "run" / "config.json", run / "config.json")
    config = json.loads((run / "config.json").read_text())
    for change, needle in [({"format_version": 99}, "another lmforge"), ({"model": {"arch": "transformer"}}, "model"),
                           ({"train": "fast"}, "train")]:
        (run / "config.json").write_text(json.dumps({**config, **change}))
        (run / "manifest.json").unlink(missing_ok=True)
        with pytest.raises(LmforgeError, match=needle):
            lmforge.load(run)
    (run / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "data"} | {"data": 3}))
    assert main(["generate", str(run), "--prompt", "Emma"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_a_full_disk_keeps_the_previous_resume_point_and_says_so(straight, tmp_path, monkeypatch):
    import errno

    calls = {"n": 0}
    real = ckpt.save_file

    def filling(tensors, path, metadata=None):
        calls["n"] += 1
        if "step-00000012" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", filling)
    config = tiny(straight / "tiny.txt", straight / "cache")
    with pytest.raises(LmforgeError) as raised:
        lmforge.train(config, out=tmp_path / "run", log=quiet)
    message = str(raised.value)
    assert "disk is full" in message and "step-00000006 is intact" in message and "--resume" in message
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000006"]
    monkeypatch.setattr(ckpt, "save_file", real)  # space freed
    lmforge.train(None, out=tmp_path / "run", resume=True, log=quiet)
    assert same(weights_of(tmp_path / "run", 24), weights_of(straight / "run", 24))


def test_a_diverging_run_stops_without_touching_good_weights(straight, tmp_path):
    from lmforge.api import build_config
    from lmforge.training.jobs import language_model_job
    from lmforge.training.loop import train as run_loop

    config = build_config(tiny(straight / "tiny.txt", straight / "cache", steps=40))
    job = language_model_job(config)

    def poison(step):
        if step == 14:  # something sends the weights to NaN after the resume point at step 12
            with torch.no_grad():
                job.model.tok_emb.weight.fill_(float("nan"))

    with pytest.raises(LmforgeError, match="not finite|non-finite"):
        run_loop(config, tmp_path / "run", job, log=quiet, on_step=poison)
    assert ckpt.all_finite(weights_of(tmp_path / "run"))
    for point in (tmp_path / "run" / "checkpoints").iterdir():
        assert ckpt.all_finite(load_file(str(point / "model.safetensors")))
    with pytest.raises(LmforgeError, match="non-finite"):
        lmforge.train(tiny(straight / "tiny.txt", straight / "cache", on_nonfinite="stop", lr=1e30, grad_clip=0.0),
                      out=tmp_path / "stop", log=quiet)


def test_float16_training_is_refused_with_what_to_use():
    with pytest.raises(LmforgeError, match="float16.*bfloat16"):
        lmforge.build_config(overrides=["train.dtype=float16"])


def test_nothing_in_the_package_unpickles_or_executes_code_from_files():
    banned = [r"\bimport pickle\b", r"\bpickle\.", r"\bcPickle\b", r"\bdill\b", r"\bshelve\b", r"\bmarshal\b",
              r"(?<![\w.])eval\(", r"(?<![\w.])exec\(", r"\byaml\.load\(", r"broadcast_object_list",
              r"numpy\.load\(.*allow_pickle=True"]
    found = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in banned:
            found += [f"{path.name}: {pattern}" for _ in re.finditer(pattern, text)]
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                found.append(f"{path.name}: torch.load without weights_only=True")
    assert found == []


def test_two_processes_cannot_train_into_one_folder(straight, tmp_path):
    config = tiny(straight / "tiny.txt", straight / "cache")
    (tmp_path / "run").mkdir()
    with ckpt.RunLock(tmp_path / "run"):  # another process holds the folder
        with pytest.raises(LmforgeError, match="in use by lmforge process"):
            lmforge.train(config, out=tmp_path / "run", log=quiet)
        # the refused start leaves the holder's lock be: a third process is kept out too
        assert (tmp_path / "run" / "run.lock").exists() and ckpt.training_process(tmp_path / "run")
    lmforge.train(config, out=tmp_path / "run", log=quiet)  # free again: trains
    with ckpt.RunLock(tmp_path / "run"):  # a new run into a folder being trained: not told to resume it
        with pytest.raises(LmforgeError, match="in use by lmforge process .*choose another --out"):
            lmforge.train(config, out=tmp_path / "run", log=quiet)
        # resuming it is refused before the machine is probed, and not told to pick another folder
        with pytest.raises(LmforgeError, match=r"being trained by lmforge process \d+; .*then resume it$"):
            lmforge.train(out=tmp_path / "run", resume=True, log=quiet)


def test_ctrl_c_while_preparing_data_leaves_no_half_cache(straight, tmp_path, monkeypatch):
    from lmforge.data import prepare
    from lmforge.tokenizers import char

    real = char.CharTokenizer.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(char.CharTokenizer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(straight / "tiny.txt")], tokenizer="char", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(char.CharTokenizer, "train", real)
    assert not prepare([str(straight / "tiny.txt")], tokenizer="char", cache_dir=tmp_path / "cache").reused


def _cli_config_args(config: dict) -> list[str]:
    args = []
    for section, values in config.items():
        for key, value in values.items():
            if key in ("arch", "kind"):
                continue
            args.append(f"{section}.{key}={json.dumps(value)}")
    return args


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_resume_point_and_exits_130(straight, tmp_path, sig):
    # eager: a 100,000-step run is long enough to compile its step, which took half a minute before step 1
    config = tiny(straight / "tiny.txt", straight / "cache", steps=100000, checkpoint_interval=100000,
                  checkpoint_time=100000, eval_interval=100000, compile=False)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmforge", "train", "--out", str(out), "--arch", "transformer", "--tokenizer", "char",
           *_cli_config_args(config)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180  # a loaded machine (the suite beside other work) starts slowly
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert time.time() < deadline and child.poll() is None, \
                child.stderr.read() if child.poll() else "no progress"
            time.sleep(0.1)
        child.send_signal(sig)
        out_text, err = child.communicate(timeout=60)
    finally:  # a failed wait must not leave a 100,000-step run behind
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, err
    assert "Traceback" not in err and "lmforge train --resume" in out_text
    points = list((out / "checkpoints").iterdir())
    assert len(points) == 1 and not (out / "summary.json").exists()
    step = json.loads((points[0] / "trainer_state.json").read_text())["step"]
    assert step >= 10


def test_a_killed_lora_finetune_resumes_and_generates(straight, tmp_path):
    base = straight / "run"
    common = dict(mode="lora", max_steps=16, lora_rank=4,
                  overrides=["train.threads=1", "train.progress=false", "train.eval_interval=4",
                             "train.checkpoint_interval=4", f"data.cache_dir={json.dumps(str(straight / 'cache'))}"])
    lmforge.finetune(base, [str(straight / "tiny.txt")], tmp_path / "straight", log=quiet, **common)

    from lmforge.finetuning.run import finetune_config
    config = finetune_config(base, [str(straight / "tiny.txt")], **common)

    def stop(step):
        if step == 10:
            raise KeyboardInterrupt

    _, result = lmforge.train(config, tmp_path / "resumed", log=quiet, on_step=stop)
    assert result.interrupted
    assert lmforge.load(tmp_path / "resumed").generate("Emma", 5, seed=0)  # the merged best weights load
    assert main(["finetune", "--resume", str(tmp_path / "resumed")]) == 0
    for name in ("model.safetensors", "adapter.safetensors"):
        assert same(load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))), name


@pytest.mark.parametrize("phase", ["last evaluation", "final figures"])
def test_sigterm_after_the_last_step_saves_says_so_and_a_resume_finishes(straight, tmp_path, monkeypatch, capsys,
                                                                         phase):
    import os

    from lmforge import api
    from lmforge.training import loop

    config = tiny(straight / "tiny.txt", straight / "cache", steps=26)  # its last evaluation is after the loop
    args = ["train", "--out", str(tmp_path / "run"), "--arch", "transformer", "--tokenizer", "char",
            *_cli_config_args(config)]
    real_evaluate, real_figures = loop.evaluate, api.final_figures

    def evaluate(model, job, state, *rest):
        if state.step == 26:  # a scheduler stops the job while the final weights are scored
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(model, job, state, *rest)

    def final_figures(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_figures(*args, **kwargs)

    if phase == "last evaluation":
        monkeypatch.setattr(loop, "evaluate", evaluate)
    else:
        monkeypatch.setattr(api, "final_figures", final_figures)
    assert main(args) == 130
    out, err = capsys.readouterr()
    assert f"lmforge train --resume {tmp_path / 'run'}" in out + err and "Traceback" not in err
    assert not (tmp_path / "run" / "summary.json").exists()
    saved = json.loads((sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "trainer_state.json").read_text())
    assert saved["step"] == 26  # the trained steps are kept: none is trained again
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 26
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command gave the handler back
