"""Kill anywhere, resume exactly: SIGKILL training at random moments, resume, and compare.

    python benchmarks/chaos.py --trials 20 --finetune-trials 5 --out chaos-runs   # about 30 minutes

Each trial starts `lmforge train` (or `lmforge finetune`: full, LoRA, classification, completion) in a
child process, kills it with SIGKILL after a random time — during a step, an evaluation or a
checkpoint write — restarts it with `--resume`, and repeats until the run finishes on its own. The
final weights (model.safetensors and the last resume point, and a fine-tune's adapter or head) and the
metrics log (timings left out) must be bitwise identical to an uninterrupted run of the same config.
Prints JSON: identical / total per kind, kills, how many kills landed during a file write, and how many
starts ran unkilled to their next resume point (after 5 kills in a row that all came before one).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmforge.checkpoint import resume_points

TEXT = "gutenberg:austen-persuasion.txt"
TRAIN = ["--arch", "transformer", "--tokenizer", "char", "--max-steps", "300", "--no-progress",
         "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.context_len=128", "train.batch_size=16",
         "train.eval_interval=20", "train.eval_batches=16", "train.checkpoint_interval=15", "train.threads=1",
         "train.sample_tokens=0", "train.warmup_steps=10"]
TIMINGS = ("train_time", "tokens_per_s")
STALLED = 5


def lmforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", *args]


def digest(run: Path) -> dict:
    """What must match: the weights files, the newest resume point, and metrics without timings."""
    out = {}
    for name in ("model.safetensors", "adapter.safetensors", "classifier.safetensors"):
        if (run / name).exists():
            out[name] = hashlib.sha256((run / name).read_bytes()).hexdigest()
    points = resume_points(run)  # newest first
    if points:
        out["resume point"] = points[0].name
        out["resume weights"] = hashlib.sha256((points[0] / "model.safetensors").read_bytes()).hexdigest()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out["metrics"] = hashlib.sha256(json.dumps([{k: v for k, v in r.items() if k not in TIMINGS}
                                                for r in rows]).encode()).hexdigest()
    return out


def newest_point(run: Path) -> Path | None:
    return next(iter(resume_points(run)), None)


def run_to_the_end(start: list[str], resume: list[str], run: Path, rng: random.Random, max_kill_s: float) -> dict:
    """Start, SIGKILL at random moments, resume, until the run finishes; count kills and where they hit.
    After STALLED kills in a row with no new resume point (kills that come before a start-up is over),
    the next start runs unkilled until its next resume point, so that a short --max-kill-s still ends."""
    kills, in_write, command, stalled, spared = 0, 0, start, 0, 0
    while True:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before = newest_point(run)
        deadline = time.monotonic() + rng.uniform(0.5, max_kill_s)
        if stalled >= STALLED:
            deadline, stalled, spared = float("inf"), 0, spared + 1
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            if deadline == float("inf") and newest_point(run) != before:
                deadline = time.monotonic() + rng.uniform(0.0, 0.5)  # a resume point written: kill soon after
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()
            kills += 1
            leftovers = [p for p in run.rglob("*") if p.name.startswith(".") and "tmp" in p.name]
            in_write += bool(leftovers)
            stalled = 0 if newest_point(run) != before else stalled + 1
            command = resume if (run / "config.json").exists() else start  # killed before it was a run: again
            continue
        if child.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {child.stderr.read().decode()[-500:]}")
        return {"kills": kills, "kills_during_a_write": in_write, "unkilled_starts": spared}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="chaos-runs", help="a folder for the runs (emptied first)")
    p.add_argument("--trials", type=int, default=20, help="training trials")
    p.add_argument("--finetune-trials", type=int, default=5, help="trials per fine-tuning kind")
    p.add_argument("--max-kill-s", type=float, default=15.0, help="kills come 0.5 s to this long after a start")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.max_kill_s > 0.5 or args.trials < 0 or args.finetune_trials < 0:
        p.error("--max-kill-s must be above 0.5 and the trial counts at least 0")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = random.Random(args.seed)
    cache = f"data.cache_dir={json.dumps(str(out / 'cache'))}"
    results = {}

    reference = out / "train-reference"
    subprocess.run(lmforge("train", "--out", str(reference), "--data", TEXT, *TRAIN, cache), check=True,
                   stdout=subprocess.DEVNULL)
    expected = digest(reference)
    rows = []
    for i in range(args.trials):
        run = out / f"train-{i}"
        tic = time.time()
        row = run_to_the_end(lmforge("train", "--out", str(run), "--data", TEXT, *TRAIN, cache),
                             lmforge("train", "--resume", str(run)), run, rng, args.max_kill_s)
        rows.append({**row, "identical": digest(run) == expected, "seconds": round(time.time() - tic, 1)})
        print(json.dumps({"train trial": i, **rows[-1]}), file=sys.stderr)
    results["train"] = rows

    pairs, labels = out / "pairs.jsonl", out / "labels.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Who is {n}?", "completion": f"{n} is in Persuasion.",
                                         "split": "val" if k == 0 else "train"}) + "\n"  # one of each for validation
                             for k in range(10) for n in ("Anne", "Frederick", "Sir Walter", "Mary", "Louisa",
                                                          "Henrietta")))
    labels.write_text("".join(json.dumps({"text": t * (1 + k % 3), "label": lab}) + "\n" for k in range(60)
                              for t, lab in ((" Anne walked.", "a"), (" The captain rode.", "b"))))
    kinds = {"full": ["--data", TEXT, "--mode", "full"], "lora": ["--data", TEXT, "--mode", "lora"],
             "classify": ["--data", str(labels), "--task", "classify"],
             "completion": ["--data", str(pairs), "--task", "completion", "--mode", "lora"]}
    tune = ["--max-steps", "150", "--set", "train.eval_interval=20", "--set", "train.checkpoint_interval=15",
            "--set", "train.threads=1", "--set", "train.progress=false", "--set", cache]
    for kind, data in (kinds.items() if args.finetune_trials else ()):
        reference = out / f"{kind}-reference"
        subprocess.run(lmforge("finetune", str(out / "train-reference"), *data, *tune, "--out", str(reference)),
                       check=True, stdout=subprocess.DEVNULL)
        expected = digest(reference)
        rows = []
        for i in range(args.finetune_trials):
            run = out / f"{kind}-{i}"
            row = run_to_the_end(lmforge("finetune", str(out / "train-reference"), *data, *tune, "--out", str(run)),
                                 lmforge("finetune", "--resume", str(run)), run, rng, args.max_kill_s)
            rows.append({**row, "identical": digest(run) == expected})
            print(json.dumps({f"{kind} trial": i, **rows[-1]}), file=sys.stderr)
        results[f"finetune {kind}"] = rows

    summary = {kind: {"identical": sum(r["identical"] for r in rows), "trials": len(rows),
                      "kills": sum(r["kills"] for r in rows),
                      "kills_during_a_write": sum(r["kills_during_a_write"] for r in rows),
                      "unkilled_starts": sum(r["unkilled_starts"] for r in rows)}
               for kind, rows in results.items()}
    print(json.dumps({"benchmark": "chaos", "summary": summary, "trials": results}, indent=2))


if __name__ == "__main__":
    from lmforge.errors import LmforgeError

    try:
        main()
    except LmforgeError as e:  # bad input: one line, as lmforge's own commands say it
        sys.exit(f"error: {e}")
