"""Run `lmforge bench austen` once per set of overrides, one after another, and keep every result.

    python benchmarks/sweep.py --out sweep.jsonl baseline= muon=train.optimizer=muon \
        "ctx256=model.context_len=256 train.batch_size=8"

Each argument is NAME=OVERRIDES (space-separated section.key=value; empty for the defaults). Each run
is a child process, so they never share state; results append to --out as JSON lines (the name, the
overrides and bench austen's JSON), and a table is printed at the end. Run it on a quiet machine:
300 s of training per entry, plus evaluation.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("entries", nargs="+", help="NAME=OVERRIDES")
    p.add_argument("--out", default="sweep.jsonl")
    p.add_argument("--max-time", default="300")
    args = p.parse_args()
    out, failed = Path(args.out), 0
    for entry in args.entries:
        name, _, overrides = entry.partition("=")
        result = subprocess.run([sys.executable, "-m", "lmforge", "bench", "austen", "--max-time", args.max_time,
                                 *overrides.split()], capture_output=True, text=True)
        failed += result.returncode != 0
        if result.returncode != 0:
            row = {"name": name, "overrides": overrides, "error": (result.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            row = {"name": name, "overrides": overrides, **json.loads(result.stdout)}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row.get(k) for k in ("name", "bits_per_byte", "steps", "tokens_per_s", "error")}),
              flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    print("\n| name | overrides | val bits/byte | steps | tokens/s |\n|---|---|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | `{r['overrides']}` | failed | | |")
        else:
            print(f"| {r['name']} | `{r['overrides']}` | {r['bits_per_byte']:.4f} | {r['steps']} | "
                  f"{r['tokens_per_s']:,.0f} |")
    if failed:
        sys.exit(f"{failed} of the {len(args.entries)} entries failed (their errors are in {out})")


if __name__ == "__main__":
    from lmforge.errors import LmforgeError

    try:
        main()
    except LmforgeError as e:  # bad input: one line, as lmforge's own commands say it
        sys.exit(f"error: {e}")
