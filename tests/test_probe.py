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
    caches = choice["batch8_decode_step_us"]  # a bf16 KV cache only where it measured faster here
    assert (choice["cache"] == "bf16") == bool(caches and caches["fp32"] >= caches["bf16"] * 1.05)
    assert main(["doctor"]) == 0  # the cached answer, as text
    out = capsys.readouterr().out
    assert f"training dtype: {choice['dtype']}" in out and report["machine"]["cpu"] in out
    assert "(probed earlier" in out  # read back, not measured in no time


def test_a_run_records_the_measured_dtype(served_run):
    config = json.loads((served_run / "config.json").read_text())
    assert config["train"]["dtype"] in ("float32", "bfloat16") and config["train"]["attention"] in ("float32", "native")
    lm = lmforge.load(served_run)
    assert lm.decoding in ("int8", "fp16", "fp32") and lm.decoding_cache in ("fp32", "bf16")
    assert lmforge.load(served_run, cache="bf16").decoding_cache == "bf16"
    assert lmforge.load(served_run, decoding="fp32").decoding_cache == "fp32"


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


def _threads_used(tuner, costs, units):
    """Feed `units` units to a tuner (each takes costs[thread count]); the thread count of each unit."""
    used = []
    for _ in range(units):
        n = torch.get_num_threads()
        used.append(n)
        tuner.record(costs[n])
    return used


def test_the_thread_tuner_judges_a_count_by_its_total_time():
    # beside a busy process two threads give some normal steps among much slower ones (measured while
    # decoding: 1.9, 6.2, 2.0 ms ... against a steady 2.8 at one thread); the median of a trial favours
    # two threads, the time taken favours one
    before = torch.get_num_threads()
    try:
        tuner, used = ThreadTuner(2), []
        pattern = {2: [1.9, 6.2, 2.0], 1: [2.8]}
        for i in range(40):  # the next check is due at unit 43
            n = torch.get_num_threads()
            used.append(n)
            tuner.record(pattern[n][i % len(pattern[n])])
        assert tuner.current == 1 and used[6:] == [1] * 34
    finally:
        torch.set_num_threads(before)


def test_short_calls_start_from_the_count_the_last_one_kept(monkeypatch):
    # generations come in short calls: the next one starts where the last one settled
    # (beside a busy process, one thread) instead of spending its first units finding that out again
    from lmforge import device

    monkeypatch.setattr(device, "_kept", {})
    before = torch.get_num_threads()
    try:
        busy = {2: 3.0, 1: 1.0}
        first = ThreadTuner(2, period=20, kind="decode")
        assert _threads_used(first, busy, 8) == [2, 2, 2, 1, 1, 1, 1, 1] and first.current == 1
        torch.set_num_threads(2)  # whatever ran in between
        second = ThreadTuner(2, period=20, kind="decode")
        assert torch.get_num_threads() == 1 and _threads_used(second, busy, 20) == [1] * 20  # next check at 20
        assert _threads_used(ThreadTuner(2, kind="serve"), busy, 3) == [2, 2, 2]  # another kind of work
        assert _threads_used(ThreadTuner(2), busy, 3) == [2, 2, 2]  # no kind: every call starts afresh
        stale = ThreadTuner(2, period=20, kind="decode", remember_s=0.0)  # too long ago: start afresh
        assert _threads_used(stale, busy, 3) == [2, 2, 2]
    finally:
        torch.set_num_threads(before)


def test_the_thread_tuner_checks_a_quiet_machine_less_and_less_often():
    before = torch.get_num_threads()
    try:
        quiet = {2: 0.5, 1: 1.0}
        used = _threads_used(ThreadTuner(2), quiet, 1000)
        # a trial of 3 units after 3 units, then after gaps of 40, 80, 160 and 320 at most: 6 checks, not 23
        starts = [i for i, n in enumerate(used) if n == 1 and (i == 0 or used[i - 1] == 2)]
        assert starts == [3, 43, 123, 283, 603, 923] and used.count(1) == 18
    finally:
        torch.set_num_threads(before)


def test_the_thread_tuner_checks_at_once_when_the_load_changes():
    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(2)
        _threads_used(tuner, {2: 0.5, 1: 1.0}, 700)  # the next scheduled check is at 923
        used = _threads_used(tuner, {2: 3.0, 1: 1.0}, 20)  # another process starts: two threads crawl
        assert tuner.current == 1 and used[-10:] == [1] * 10
        used = _threads_used(tuner, {2: 0.5, 1: 0.6}, 20)  # it stops: the one thread speeds up, so check
        assert tuner.current == 2 and used[-10:] == [2] * 10
    finally:
        torch.set_num_threads(before)


def test_a_resumed_thread_tuner_tries_the_same_units_as_an_uninterrupted_one():
    # on some CPUs the thread count changes a result's last bits: a resumed run must try the same steps
    before = torch.get_num_threads()
    try:
        quiet = {2: 0.5, 1: 1.0}
        straight = _threads_used(ThreadTuner(2), quiet, 400)
        for stop in (44, 45, 100, 123):  # 44 and 45: inside the trial of units 44-46
            resumed = _threads_used(ThreadTuner(2, start=stop), quiet, 400 - stop)
            assert resumed == straight[stop:], stop
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


def test_a_long_cpu_run_compiles_its_step_where_that_measured_worth_its_cost(monkeypatch):
    from lmforge import api, probe
    from lmforge.config import build_config

    asked = []
    measured = {"gain": 1.3, "compile_s": 15.0, "step_ms": {"eager": 130.0, "compiled": 100.0}}

    def compile_gain(dtype, attention, log=None, measure=True):  # as measured once on this machine
        if not measure:
            return None
        asked.append(dtype)
        return measured

    monkeypatch.setattr(probe, "compile_gain", compile_gain)
    monkeypatch.setattr(probe, "choices", lambda device: {"train_step_ms": {"float32": 100.0}})

    def decided(*overrides, budget=None):
        base = ["train.device=cpu", "train.dtype=float32", "train.attention=float32"]
        config = build_config(None, None, base + list(overrides))
        return api.with_compile_choice(config, log=lambda *_: None, budget=budget)[0].train.compile

    # 300 s at 1.3x saves 69 s, more than twice the 15 s of compiling; 100 s would save 23
    assert decided("train.max_time=300") is True and asked == ["float32"]
    assert decided("train.max_time=100", "model.d_model=512") is False and len(asked) == 1  # too short to measure
    measured["gain"] = 1.05
    assert decided("train.max_time=600") is False  # not faster by enough to be worth rounding differently
    measured.update(gain=0.0, why="torch.compile failed: no C++ compiler")
    assert decided("train.max_time=600") is False
    measured.update(gain=1.3)
    # a step limit: the probe's 100-ms step at its own shape, scaled to this run's work per step
    assert decided("train.max_time=0", "train.max_steps=20") is False
    assert decided("train.max_time=0", "train.max_steps=20000") is True
    assert decided("train.max_time=600", budget=60) is False  # --budget 1m: a minute, whatever the time limit
    asked.clear()
    assert decided("train.max_time=600", "train.compile=false") is False and not asked  # the user's word stands
    assert decided("train.max_time=600", "model.arch=lstm") is None and not asked  # other families: not measured
    from lmforge.training import distributed

    monkeypatch.setattr(distributed, "launched", lambda: True)
    assert decided("train.max_time=600") is None and not asked  # torchrun's processes would time it side by side


def test_a_damaged_probe_cache_is_measured_again(tmp_path):
    from lmforge.probe import _cached, machine

    facts = machine()
    for text in ("[]", '"text"', '{"machine": 3}', json.dumps({"machine": facts, "choices": [1]}), "{trunc"):
        (tmp_path / "probe.json").write_text(text)
        assert _cached(tmp_path / "probe.json", facts, "choices") is None  # not a crash: the probe runs again
    (tmp_path / "probe.json").write_text(json.dumps({"machine": facts, "choices": {"dtype": "float32"}}))
    assert _cached(tmp_path / "probe.json", facts, "choices") == {"dtype": "float32"}


def test_choices_that_name_no_setting_are_measured_again(tmp_path, monkeypatch):
    import torch

    from lmforge import probe

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    measured = {"dtype": "float32", "attention": "float32", "decoding": "fp32", "cache": "fp32"}
    monkeypatch.setattr(probe, "measure", lambda: dict(measured))
    damages = ({"dtype": "bfloat16"}, {**measured, "dtype": "float64"},  # valid JSON, not valid choices
               {**measured, "train_step_ms": "x"}, {**measured, "decode_step_us": {"int8": "fast"}})
    for damaged in damages:
        (tmp_path / "probe.json").write_text(json.dumps({"machine": probe.machine(), "choices": damaged}))
        assert {k: v for k, v in probe.choices(torch.device("cpu")).items() if k in measured} == measured
    report = probe.report()
    assert report["cache"] == str(tmp_path / "probe.json") and not report["probed_now"]
    # a compile measurement of the wrong shape is as if none were cached: `doctor` and runs read it
    facts = {**probe.machine(), "dtype": "float32", "attention": "float32"}
    for damaged in ({"compile_s": 3}, {"gain": 1.4}, {"gain": 0}, {"gain": 1.4, "compile_s": 3, "step_ms": []}):
        (tmp_path / "probe-compile.json").write_text(json.dumps({"machine": facts, "result": damaged}))
        assert probe.compile_gain("float32", "float32", measure=False) is None
    good = {"gain": 1.4, "compile_s": 3, "step_ms": {"eager": 70.0, "compiled": 50.0}}
    (tmp_path / "probe-compile.json").write_text(json.dumps({"machine": facts, "result": good}))
    assert probe.compile_gain("float32", "float32", measure=False) == good
    # a failure measured without a C++ compiler is measured again once one is installed
    failed = {"gain": 0.0, "why": "torch.compile failed: no C++ compiler found (install g++ or clang++)",
              "cpp_compiler": None}
    (tmp_path / "probe-compile.json").write_text(json.dumps({"machine": facts, "result": failed}))
    monkeypatch.setattr(probe, "cpp_compiler", lambda: "g++")
    assert probe.compile_gain("float32", "float32", measure=False) is None
    monkeypatch.setattr(probe, "cpp_compiler", lambda: None)
    assert probe.compile_gain("float32", "float32", measure=False) == failed
    # called from inference mode (`bench generate` on an empty cache), the probe still trains its steps
    monkeypatch.setattr(probe, "measure", lambda: dict(measured, grad=torch.is_grad_enabled()
                                                       and not torch.is_inference_mode_enabled()))
    with torch.inference_mode():
        assert probe.choices(torch.device("cpu"), refresh=True)["grad"] is True
    monkeypatch.setattr(probe, "measure", lambda: dict(measured))
    (tmp_path / "probe.json").write_text("{trunc")  # doctor says that it measures, rather than going quiet
    heard = []
    assert probe.report(log=heard.append)["probed_now"] and heard and "probing" in heard[0]


def test_runs_started_together_on_an_empty_cache_probe_once_and_choose_alike(tmp_path):
    # Two `lmforge train` started at once each timed the (shared) machine and could pick different dtypes:
    # the second now waits for the first one's probe and reads it.
    import os
    import subprocess
    import sys

    script = (
        "import json, os, sys, time, torch\n"
        "from lmforge import probe\n"
        "def measure():\n"
        "    open(os.path.join(sys.argv[1], f'measured-{os.getpid()}'), 'w').close()\n"
        "    time.sleep(1.0)\n"
        "    return {'dtype': 'float32' if os.getpid() % 2 else 'bfloat16', 'attention': 'float32',\n"
        "            'decoding': 'fp32', 'cache': 'fp32'}\n"
        "probe.measure = measure\n"
        "print(json.dumps(probe.choices(torch.device('cpu'))['dtype']))\n")
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")}
    children = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                 text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=120)[0] for child in children]
    assert all(child.returncode == 0 for child in children)
    assert len(list(tmp_path.glob("measured-*"))) == 1 and outputs[0] == outputs[1]
