"""Several processes with torchrun (gloo on the CPU): DDP and FSDP2 end where one process ends with the
same global batch, a run killed under torchrun resumes under torchrun or alone, and a 2-process
evaluation gives the single-process bits per byte."""
import json
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

import lmforge
from lmforge.cli import main

STEPS = 16
SETTINGS = ["--arch", "transformer", "--tokenizer", "char", "--no-progress", "model.d_model=32", "model.n_layers=2",
            "model.n_heads=2", "model.context_len=32", "model.dropout=0.0", "train.batch_size=8", "train.grad_accum=2",
            "train.eval_interval=8", "train.checkpoint_interval=4", "train.threads=1", "train.dtype=\"float32\"",
            "train.sample_tokens=0", "train.warmup_steps=4"]


def torchrun(*args, processes=2, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={processes}", "-m", "lmforge", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(child: subprocess.Popen, timeout=180) -> str:
    out, err = child.communicate(timeout=timeout)
    assert child.returncode == 0, err[:3000]
    assert "Warning" not in err, err[:3000]  # nothing that reads like a problem when all went well
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import TINY_TEXT

    folder = tmp_path_factory.mktemp("dist")
    (folder / "tiny.txt").write_text(TINY_TEXT * 3)
    common = ["--data", str(folder / "tiny.txt"), *SETTINGS, f"data.cache_dir={json.dumps(str(folder / 'cache'))}"]
    main(["train", "--out", str(folder / "single"), "--max-steps", str(STEPS), *common])
    return folder, common


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_end_where_one_does(setup, parallel):
    folder, common = setup
    out = folder / f"two-{parallel}"
    text = finish(torchrun("train", "--out", str(out), "--max-steps", str(STEPS), *common,
                           f"train.parallel=\"{parallel}\""))
    assert text.count("run: ") == 1  # process 0 alone reports
    single = load_file(str(folder / "single" / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))
    two = load_file(str(out / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))
    assert max_diff(single, two) < 1e-4
    a = json.loads((folder / "single" / "summary.json").read_text())["val"]["bits_per_byte"]
    b = json.loads((out / "summary.json").read_text())["val"]["bits_per_byte"]
    assert abs(a - b) < 1e-4
    state = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["tokens"] == STEPS * 2 * 8 * 32  # the global batch: 2 micro-batches of 8 x 32 tokens


def test_a_recurrent_model_shards_too(setup, tmp_path):
    # an LSTM is sharded whole (no blocks): evaluation's forward leaves it gathered, and its weights
    # must still be saved whole
    folder, common = setup
    lstm = [a for a in common if not a.startswith(("model.n_heads", "model.context_len"))]
    lstm[lstm.index("--arch") + 1] = "lstm"
    main(["train", "--out", str(tmp_path / "single"), "--max-steps", "8", *lstm])
    finish(torchrun("train", "--out", str(tmp_path / "two"), "--max-steps", "8", *lstm, 'train.parallel="fsdp"'))
    weights = [load_file(str(tmp_path / run / "checkpoints" / "step-00000008" / "model.safetensors"))
               for run in ("single", "two")]
    assert max_diff(*weights) < 1e-4


def test_a_two_process_evaluation_equals_one(setup):
    folder, _ = setup
    text = finish(torchrun("eval", str(folder / "single"), "--json"))
    two = json.loads(text)
    one = lmforge.load(folder / "single").evaluate()
    assert two["bits_per_byte"] == pytest.approx(one["bits_per_byte"], rel=1e-9)
    assert two["tokens"] == one["tokens"] and two["bytes"] == one["bytes"]


def test_a_killed_torchrun_resumes_under_torchrun_and_alone(setup, tmp_path):
    folder, common = setup
    out = tmp_path / "run"
    child = torchrun("train", "--out", str(out), "--max-steps", str(STEPS), *common, "train.checkpoint_interval=2",
                     start_new_session=True)
    deadline = time.time() + 120
    while not any((out / "checkpoints").glob("step-0000000[6-9]")) if (out / "checkpoints").exists() else True:
        assert time.time() < deadline and child.poll() is None
        time.sleep(0.05)
    import os

    os.killpg(child.pid, signal.SIGKILL)  # torchrun and both workers, mid-run
    child.communicate()
    import shutil

    alone = tmp_path / "alone"
    shutil.copytree(out, alone)
    finish(torchrun("train", "--resume", str(out)))
    assert main(["train", "--resume", str(alone)]) == 0
    single = load_file(str(folder / "single" / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))
    for run in (out, alone):
        resumed = load_file(str(run / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))
        assert max_diff(single, resumed) < 1e-4


def test_a_time_limited_run_under_torchrun_evaluates_and_ends_together(setup, tmp_path):
    # Each process times its own steps; had each counted its own training time, one would evaluate or
    # stop while the other took another step, and both would wait for each other.
    folder, common = setup
    text = finish(torchrun("train", "--out", str(tmp_path / "run"), "--max-time", "4s", *common))
    assert text.count("run: ") == 1 and "validation:" in text
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "val_loss" in line]
    assert len(evals) >= 10  # a time budget evaluates every tenth of it, and once at the end


def test_bad_text_under_torchrun_stops_every_process_with_its_message(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"binary\x00\xff\xfe data")
    child = torchrun("train", "--data", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "run"), *SETTINGS,
                     f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}")
    _, err = child.communicate(timeout=180)
    assert child.returncode != 0
    assert "is not valid utf-8; pass the file's encoding" in err
    assert "[rank1]: Traceback" not in err and "[rank0]: Traceback" not in err  # no process hangs or dumps
    assert not (tmp_path / "run").exists()


def test_a_taken_run_folder_or_a_report_under_torchrun_is_one_line_from_each_process(setup):
    folder, common = setup
    for args, messages in [(["train", "--out", str(folder / "single"), "--max-steps", "2", *common],
                            ["already holds a run; continue it with `lmforge train --resume",
                             "process 0 stopped the run"]),
                           (["eval", str(folder / "single"), "--report", str(folder / "report")],
                            ["--report runs in one process"] * 2)]:
        child = torchrun(*args)
        _, err = child.communicate(timeout=180)
        assert child.returncode != 0 and all(err.count(m) == messages.count(m) for m in messages), err[-3000:]
        assert err.count("error: ") == 2, err[-3000:]  # one line from each process (torchrun adds its summary)
        assert "[rank1]: Traceback" not in err and "[rank0]: Traceback" not in err, err[-3000:]
    assert not (folder / "report").exists()


def test_a_process_of_a_torchrun_job_probes_with_its_share_of_the_cores(monkeypatch):
    import torch

    from lmforge.config import TrainConfig
    from lmforge.device import physical_cores
    from lmforge.training.sizing import probe_tokens_per_s

    monkeypatch.setenv("RANK", "0")  # as torchrun starts the first of two processes on this machine
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    options = {"vocab_size": 40, "d_model": 32, "n_layers": 1, "n_heads": 2, "context_len": 16}
    probe_tokens_per_s(options, TrainConfig(batch_size=2, compile=False, dtype="float32"), steps=1, size={})
    assert torch.get_num_threads() == max(1, physical_cores() // 2)  # the share the run's loop will take


def test_a_finetune_under_torchrun_reports_once(setup, tmp_path):
    folder, _ = setup
    out = finish(torchrun("finetune", str(folder / "single"), "--data", str(folder / "tiny.txt"), "--mode", "lora",
                          "--max-steps", "4", "--out", str(tmp_path / "tuned"), "--no-progress",
                          "--set", "train.threads=1", "--set", f"data.cache_dir={json.dumps(str(folder / 'cache'))}"))
    assert out.count("run: ") == 1 and out.count("validation: ") == 1
