"""Damaged run folders: how many kinds of damage `lmforge.load` and `--resume` notice, and name.

    python benchmarks/corruption.py --out corruption-runs     # about a minute

Trains a small run, then for every file that matters and every kind of damage — truncated at five
points, one byte flipped at five points, deleted, replaced by garbage — copies the run, damages the
copy, and tries `lmforge.load` (and, for resume points, `lmforge train --resume`). A case is
*detected* when lmforge refuses in one line naming the damaged file (or, for a resume point, falls
back to the one before and says so), *harmless* when the damage provably changes nothing the model
uses (it loads and computes exactly what the undamaged run computes), and *missed* otherwise.
Prints JSON: detected / harmless / missed, per file and in all.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

import lmforge
from lmforge.errors import LmforgeError

FILES = ["config.json", "tokenizer.json", "model.safetensors", "manifest.json"]
POINT_FILES = ["model.safetensors", "optimizer0.safetensors", "average.safetensors", "trainer_state.json",
               "manifest.json"]


def damages(data: bytes):
    n = len(data)
    for at in (0.0, 0.1, 0.5, 0.9, 0.999):
        yield f"truncated at {at:.0%}", data[:int(n * at)]
    for at in (0.01, 0.2, 0.5, 0.8, 0.99):
        i = min(n - 1, int(n * at))
        yield f"byte flipped at {at:.0%}", data[:i] + bytes([data[i] ^ 0x41]) + data[i + 1:]
    yield "deleted", None
    yield "garbage", b"\x00\xff garbage \x13" * 7


def outputs(lm) -> torch.Tensor:
    x = torch.arange(1, 33).remainder(lm.tokenizer.vocab_size)[None]
    with torch.no_grad():
        return lm.model(x)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="corruption-runs")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "text.txt").write_text("Emma Woodhouse, handsome, clever, and rich, with a comfortable home.\n" * 300)
    config = {"data": {"sources": [str(out / "text.txt")], "cache_dir": str(out / "cache")}, "tokenizer": {"kind": "char"},
              "model": {"arch": "transformer", "d_model": 32, "n_layers": 2, "n_heads": 2, "context_len": 32},
              "train": {"max_steps": 12, "max_time": 0, "checkpoint_interval": 6, "eval_interval": 6, "progress": False}}
    run = out / "run"
    lmforge.train(config, run, log=lambda *_: None)
    reference = outputs(lmforge.load(run))
    counts, cases = {}, []
    targets = [(f, f) for f in FILES] + [(f"checkpoints/step-00000012/{f}", f) for f in POINT_FILES]
    for relative, name in targets:
        for kind, damaged in damages((run / relative).read_bytes()):
            copy = out / "case"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(run, copy)
            target = copy / relative
            if damaged is None:
                target.unlink()
            else:
                target.write_bytes(damaged)
            verdict = judge(copy, relative, reference)
            cases.append({"file": relative, "damage": kind, "verdict": verdict})
            counts.setdefault(relative, {"detected": 0, "harmless": 0, "missed": 0})[verdict] += 1
    total = {v: sum(c[v] for c in counts.values()) for v in ("detected", "harmless", "missed")}
    print(json.dumps({"benchmark": "corruption", "cases": len(cases), **total, "per_file": counts,
                      "missed_cases": [c for c in cases if c["verdict"] == "missed"]}, indent=2))


def judge(run: Path, relative: str, reference: torch.Tensor) -> str:
    lines = []
    if relative.startswith("checkpoints/"):
        try:
            lmforge.train(None, run, resume=True, log=lines.append, final_eval=False)
        except LmforgeError as e:
            return "detected" if "\n" not in str(e) else "missed"
        noticed = any("cannot be used" in line and "step-00000012" in line for line in lines)
        return "detected" if noticed else "harmless"
    try:
        lm = lmforge.load(run)
    except LmforgeError as e:
        return "detected" if Path(relative).name in str(e) or "config" in str(e) else "missed"
    return "harmless" if torch.equal(outputs(lm), reference) else "missed"


if __name__ == "__main__":
    main()
