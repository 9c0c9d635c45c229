"""A fair half: how fast lmforge trains, evaluates and decodes while another busy process shares the CPU.

    python benchmarks/contention.py            # about 8 minutes on 2 cores; run it on an otherwise quiet machine
    python benchmarks/contention.py decode     # one kind of work (train, eval, decode): about 3 minutes

For each kind of work — training steps of the default Transformer (through the loop's own thread
tuner), scoring a text (evaluation), and decoding 300 tokens at batch 1 — it measures throughput on
the quiet machine, then with one other CPU-heavy process running: a single-threaded spin loop, and a
second torch process multiplying matrices on every core (like a second training run). Each is run
with the thread tuner (the default) and with threads fixed at the core count (what lmforge did
before). Prints JSON: throughput, and each figure's ratio to the quiet one (the target is >= 0.45).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time


def spin(stop) -> None:
    while not stop.is_set():
        pass


def matmul(stop) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    a = torch.randn(1024, 1024)
    while not stop.is_set():
        a @ a


def work(kind: str, tuned: bool, seconds: float = 30.0) -> float:
    """Units per second of one kind of work, run for about `seconds`."""
    import torch

    from lmforge.config import TrainConfig
    from lmforge.device import ThreadTuner, physical_cores, set_threads
    from lmforge.evaluation.likelihood import score_ids
    from lmforge.generation import Decoder, Engine, SamplingConfig
    from lmforge.models import build_model
    from lmforge.training.optim import build_optimizers
    from lmforge.training.step import lm_loss, train_step

    cores = physical_cores()
    set_threads(cores)
    torch.manual_seed(0)
    model = build_model("transformer", vocab_size=4096, dropout=0.0)
    done, tic = 0, time.perf_counter()
    if kind == "train":
        tuner = ThreadTuner(cores, enabled=tuned)  # as the training loop sets it up
        optimizers = build_optimizers(model, TrainConfig(max_steps=1))
        batch = torch.randint(4096, (16, 129))
        while time.perf_counter() - tic < seconds:
            t = time.perf_counter()
            train_step(model, model, optimizers, [(batch[:, :-1], batch[:, 1:])], lm_loss,
                       device=torch.device("cpu"), dtype=torch.float32, grad_clip=1.0)
            tuner.record(time.perf_counter() - t)
            done += 16 * 128  # tokens
    elif kind == "eval":
        ids = torch.randint(1, 4096, (6000,)).tolist()
        if not tuned:
            ThreadTuner.record = lambda self, seconds: None  # threads fixed, as before the tuner
        while time.perf_counter() - tic < seconds:
            done += score_ids(model.eval(), ids, 0).tokens
    else:
        decoder = Decoder(model.eval(), "fp32")
        while time.perf_counter() - tic < seconds:
            engine = Engine(decoder, None, max_batch=1)
            engine.tuner.enabled = tuned
            engine.submit([0], SamplingConfig(max_new_tokens=300, seed=done, ignore_eos=True))
            engine.run()
            done += 300
    return done / (time.perf_counter() - tic)


def measure(kind: str, tuned: bool) -> float:
    """In a fresh process, so one measurement's thread settings never leak into the next."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(work, (kind, tuned))


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kinds", nargs="*", metavar="KIND", help="train, eval or decode (default: all three)")
    kinds = p.parse_args().kinds or ["train", "eval", "decode"]
    if not set(kinds) <= {"train", "eval", "decode"}:
        p.error(f"unknown kind in {' '.join(kinds)}; choose from train, eval, decode")
    ctx = multiprocessing.get_context("spawn")
    from lmforge.probe import machine

    results = {"benchmark": "contention", "cpu": machine()["cpu"], "logical_cpus": os.cpu_count()}
    for kind in kinds:
        row = {"quiet": statistics.median(measure(kind, True) for _ in range(2))}
        for busy_name, busy in (("spin", spin), ("matmul", matmul)):
            for tuned in (True, False):
                stop = ctx.Event()
                neighbour = ctx.Process(target=busy, args=(stop,))
                neighbour.start()
                time.sleep(1.0)
                try:
                    value = measure(kind, tuned)
                finally:
                    stop.set()
                    neighbour.join()
                name = f"with {busy_name}, {'tuned threads' if tuned else 'fixed threads'}"
                row[name] = value
                row[name + " / quiet"] = round(value / row["quiet"], 3)
        results[kind] = row
        print(json.dumps({kind: row}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    from lmforge.errors import LmforgeError

    try:
        main()
    except LmforgeError as e:  # bad input: one line, as lmforge's own commands say it
        sys.exit(f"error: {e}")
