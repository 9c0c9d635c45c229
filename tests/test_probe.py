"""Choices made by measurement: the probe's choices follow its own timings and are recorded in the run;
the thread tuner moves to the thread count that is faster now, and back when that changes."""
import json

import torch

import lmforge
from lmforge.cli import main
from lmforge.device import ThreadTuner


def test_doctor_reports_choices_that_follow_its_timings(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    choice = report["choices"]
    steps, decode = choice["train_step_ms"], choice["decode_step_us"]
    if choice["dtype"] == "bfloat16":
        assert min(v for k, v in steps.items() if k.startswith("bfloat16")) * 1.1 <= steps["float32"]
    else:
        assert "bfloat16" not in steps or min(v for k, v in steps.items() if k.startswith("bfloat16")) * 1.1 > steps["float32"]
    assert decode[choice["decoding"]] <= min(decode.values()) * 1.06
    assert main(["doctor"]) == 0  # the cached answer, as text
    out = capsys.readouterr().out
    assert f"training dtype: {choice['dtype']}" in out and report["machine"]["cpu"] in out


def test_a_run_records_the_measured_dtype(served_run):
    config = json.loads((served_run / "config.json").read_text())
    assert config["train"]["dtype"] in ("float32", "bfloat16") and config["train"]["attention"] in ("float32", "native")
    assert lmforge.load(served_run).decoding in ("int8", "fp16", "fp32")


def test_the_thread_tuner_follows_the_faster_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tuner = ThreadTuner(2, period=5, trial=2, first=2)
        cost = {2: 3.0, 1: 1.0}  # a busy machine: one thread is three times faster
        for _ in range(20):
            tuner.record(cost[torch.get_num_threads()])
        assert tuner.current == 1 and torch.get_num_threads() in (1, 2)
        cost = {2: 0.5, 1: 1.0}  # the other process has finished: two threads win again
        for _ in range(40):
            tuner.record(cost[torch.get_num_threads()])
        assert tuner.current == 2
        assert not ThreadTuner(1).enabled  # one thread: nothing to choose
    finally:
        torch.set_num_threads(before)


def test_the_thread_tuner_hands_back_the_count_it_kept_when_the_work_pauses():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as earlier work (or a trial it was in the middle of) left it
        tuner = ThreadTuner(2, trial=3, first=1)
        assert torch.get_num_threads() == 2  # a tuner starts from the count it is given
        tuner.record(1.0)  # the first check is due: a trial with one thread begins
        assert tuner.trying == 1 and torch.get_num_threads() == 1
        tuner.settle()  # the work paused mid-trial: whatever runs next gets the count kept
        assert tuner.trying is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
