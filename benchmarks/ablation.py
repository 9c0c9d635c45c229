"""What each choice of the default model buys: 300-s runs on the Austen split, each adding one change.

    python benchmarks/ablation.py --out ablation          # about 35 minutes on a 2-core CPU

Each step trains with `lmforge train --max-time 300` and the overrides below, cumulatively: a
nanoGPT-like start (characters, LayerNorm, learned positions, GELU, tied head, cosine schedule,
fp32, no dropout), then BPE-4096, the modern block, the warm-up-stable-decay schedule, bf16 autocast
on CPUs with bf16 units (on other CPUs that step is fp32 again), and dropout 0.05 (= the default).
A step whose run folder already holds summary.json is read, not retrained. Prints the table as
JSON and writes bpb_vs_time.png (each run's periodic validation estimate against training time).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge import api
from lmforge.compare import plot_bpb_vs_time
from lmforge.training.plots import read_metrics

GPT2_BLOCK = ["model.norm=layernorm", "model.pos=learned", "model.mlp=gelu", "model.qk_norm=false",
              "model.tie_embeddings=true"]
FP32 = ["train.dtype=float32"]
NO_DROPOUT = ["model.dropout=0.0"]
STEPS = [
    ("a_baseline", "characters, GPT-2 block, cosine",
     ["tokenizer.kind=char", *GPT2_BLOCK, "train.schedule=cosine", *FP32, *NO_DROPOUT]),
    ("b_bpe", "+ BPE-4096 tokenizer", [*GPT2_BLOCK, "train.schedule=cosine", *FP32, *NO_DROPOUT]),
    ("c_block", "+ RoPE, RMSNorm, QK-norm, ReLU², untied head", ["train.schedule=cosine", *FP32, *NO_DROPOUT]),
    ("d_wsd", "+ warm-up-stable-decay schedule", [*FP32, *NO_DROPOUT]),
    ("e_bf16", "+ bf16 autocast where the CPU has bf16 units", NO_DROPOUT),
    ("f_default", "+ dropout 0.05 (the default)", []),
]


def run(out: Path, max_time: float = 300.0) -> list[dict]:
    rows = []
    for name, change, overrides in STEPS:
        run_dir = out / name
        if not (run_dir / "summary.json").exists():
            api.train(None, run_dir, overrides=[f"train.max_time={max_time}", "train.progress=false", *overrides],
                      log=lambda *_: None)
        summary = json.loads((run_dir / "summary.json").read_text())
        curve = [(r["train_time"], r["val_bpb"]) for r in read_metrics(run_dir / "metrics.jsonl") if "val_bpb" in r]
        rows.append({"name": change, "run": name, "overrides": overrides, "curve": curve,
                     "bits_per_byte": summary["val"]["bits_per_byte"], "tokens_per_s": summary["tokens_per_s"],
                     "steps": summary["steps"], "params": summary.get("params"),
                     "bpb_is_lower_bound": summary["val"]["bits_per_byte_is_lower_bound"]})
    plot_bpb_vs_time(rows, out / "bpb_vs_time.png")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ablation", help="folder for the runs, the plot and nothing else")
    parser.add_argument("--max-time", type=float, default=300.0, help="training seconds per step")
    args = parser.parse_args()
    if not args.max_time > 0:
        parser.error(f"--max-time must be positive, got {args.max_time:g}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run(out, args.max_time)
    print(json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in rows], indent=2))


if __name__ == "__main__":
    from lmforge.errors import LmforgeError

    try:
        main()
    except LmforgeError as e:  # bad input: one line, as lmforge's own commands say it
        sys.exit(f"error: {e}")
