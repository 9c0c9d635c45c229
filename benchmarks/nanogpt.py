"""lmforge's training step beside nanoGPT's, in the same run on the same machine, at the standard shape.

    git clone https://github.com/karpathy/nanoGPT    # anywhere: lmforge never ships its code
    python benchmarks/nanogpt.py --nanogpt path/to/nanoGPT

The standard shape: 4 layers, 4 heads, d_model 256, a 256-token context, batch 16, no dropout, random
ids over the Austen character vocabulary (82). nanoGPT runs as its train.py does on a CPU: its GPT
(bias off, as train.py defaults), its configure_optimizers AdamW (unfused on a CPU), fp32, clipping
at 1.0. lmforge runs training.step.train_step with its default (auto) dtype, chosen by the probe,
and again in fp32. The cases take turns, one timed step each per round, after warm-up steps; each
reports its median. MFU divides the FLOPs of a step (6N + attention, the PaLM count both models
share) by the faster of this machine's fp32 and bf16 matmul peaks, measured in the same run.
Prints JSON, the CPU named.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPE = {"n_layers": 4, "n_heads": 4, "d_model": 256, "context_len": 256}
BATCH, VOCAB = 16, 82


def nanogpt_case(path: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = module
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    config = module.GPTConfig(block_size=SHAPE["context_len"], vocab_size=VOCAB, n_layer=SHAPE["n_layers"],
                              n_head=SHAPE["n_heads"], n_embd=SHAPE["d_model"], dropout=0.0, bias=False)
    with contextlib.redirect_stdout(sys.stderr):  # nanoGPT prints its sizes; stdout is for the JSON
        model = module.GPT(config)
        optimizer = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")

    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # the same count as lmforge's: 6 x matmul parameters (its tied head included, positions not) + attention
    flops = 6 * model.get_num_params() + 12 * SHAPE["n_layers"] * SHAPE["d_model"] * SHAPE["context_len"]
    return step, flops


def lmforge_case(dtype: torch.dtype, attention: str):
    from lmforge.config import TrainConfig
    from lmforge.models import build_model
    from lmforge.training.optim import build_optimizers
    from lmforge.training.step import lm_loss, train_step

    torch.manual_seed(0)
    model = build_model("transformer", vocab_size=VOCAB, dropout=0.0, **SHAPE).train()
    model.set_attention_upcast(attention != "native")
    optimizers = build_optimizers(model, TrainConfig(max_steps=1))

    def step(x, y):
        train_step(model, model, optimizers, [(x, y)], lm_loss, device=torch.device("cpu"), dtype=dtype,
                   grad_clip=1.0)
    return step, model.flops_per_token()


def main() -> None:
    from lmforge.device import measure_peak_flops, set_threads
    from lmforge.probe import choices, machine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", required=True, type=Path, help="a nanoGPT checkout (its model.py is loaded)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    if not (args.nanogpt / "model.py").is_file():
        p.error(f"{args.nanogpt} is not a nanoGPT checkout (no model.py); "
                "git clone https://github.com/karpathy/nanoGPT")
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be at least 1 and --warmup at least 0")
    threads = set_threads(None)
    picked = choices(torch.device("cpu"))
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[picked["dtype"]]
    cases = {"nanogpt": nanogpt_case(args.nanogpt),
             f"lmforge default ({picked['dtype']})": lmforge_case(dtype, picked["attention"]),
             "lmforge float32": lmforge_case(torch.float32, "float32")}
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(VOCAB, (BATCH, SHAPE["context_len"] + 1), generator=g)
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # nanoGPT views its targets
    times = {name: [] for name in cases}
    for round_ in range(args.warmup + args.rounds):
        for name, (step, _) in cases.items():
            tic = time.perf_counter()
            step(x, y)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - tic)
    peaks = {name: measure_peak_flops(torch.device("cpu"), 2048, dtype=d) for name, d in
             (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    tokens = BATCH * SHAPE["context_len"]
    speeds = {name: tokens / statistics.median(t) for name, t in times.items()}
    best_peak = max(peaks.values())
    out = {"benchmark": "nanogpt side by side", "cpu": machine()["cpu"], "threads": threads,
           "shape": {**SHAPE, "batch": BATCH, "vocab": VOCAB}, "rounds": args.rounds,
           "tokens_per_s": {k: round(v) for k, v in speeds.items()},
           "ratio_to_nanogpt": {k: round(v / speeds["nanogpt"], 3) for k, v in speeds.items() if k != "nanogpt"},
           "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
           "mfu_vs_faster_peak": {k: round(v * cases[k][1] / best_peak, 3) for k, v in speeds.items()},
           "probe": {k: picked[k] for k in ("dtype", "attention")}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    from lmforge.errors import LmforgeError

    try:
        main()
    except LmforgeError as e:  # bad input: one line, as lmforge's own commands say it
        sys.exit(f"error: {e}")
