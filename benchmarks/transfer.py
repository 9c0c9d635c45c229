"""The transfer report: pretrain on broad Gutenberg (no Emma or Persuasion at all), then fine-tune vs train from
scratch on 10/30/100% of Austen -> transfer.md + transfer.png; and author attribution -> authors.md.
Regenerate: python benchmarks/transfer.py --out reports/transfer --work runs/transfer --more PATH/gutenberg-more"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import lmforge
from lmforge import checkpoint as ckpt
from lmforge.config import AUSTEN
from lmforge.data import lm_batches, prepare_data
from lmforge.data.authors import write_authors
from lmforge.data.examples import read_jsonl
from lmforge.errors import LmforgeError
from lmforge.finetuning.classify import bag_of_words
from lmforge.finetuning.run import finetune_config, finetune_job
from lmforge.probe import machine
from lmforge.training.loop import train as train_loop

FRACTIONS = (0.1, 0.3, 1.0)
MODEL = {"arch": "transformer", "d_model": 128, "n_layers": 4, "n_heads": 4, "context_len": 128}


def pretrain_sources(more: Path) -> list[str]:
    """Every NLTK Gutenberg text except the two Austen novels we validate on, plus `more`."""
    from lmforge.data.sources import gutenberg_corpus

    held = {s.split(":", 1)[1] for s in AUSTEN}
    if not Path(more).is_dir():
        raise LmforgeError(f"--more {more} is not a folder; point it at the folder of extra Gutenberg novels")
    return [f"gutenberg:{f}" for f in gutenberg_corpus().fileids() if f not in held] + [str(more)]


def fraction_of(prepared, fraction: float):
    """`prepared` with only the first `fraction` of each document's training tokens (validation unchanged)."""
    spans = [d["train_tokens"] for d in prepared.meta["documents"]]
    eos = np.array([prepared.tokenizer.eos_id], dtype=prepared.train.dtype)
    parts = []
    for i, (a, b) in enumerate(spans):
        parts += ([eos] if i else []) + [np.asarray(prepared.train[a:a + int((b - a) * fraction)])]
    return dataclasses.replace(prepared, train=np.concatenate(parts))


def pretrain_base(work: Path, more: Path, pretrain_time: float = 240.0, cache_dir=None, threads: int | None = None,
                  log=print) -> dict:
    """The base both reports start from, pretrained into `work`/base unless an earlier run left it there;
    returns its summary (base.json)."""
    if not (work / "base.json").exists():
        train = {"max_time": pretrain_time, "batch_size": 16, "lr": 3e-3, "eval_interval": 250,
                 **({"threads": threads} if threads else {}), "progress": False, "sample_tokens": 0}
        cfg = {"data": {"sources": pretrain_sources(more), "cache_dir": cache_dir}, "train": train,
               "tokenizer": {"kind": "bpe", "vocab_size": 2048}, "model": MODEL}
        _, result = lmforge.train(cfg, out=work / "base", log=log, final_eval=False)
        (work / "base.json").write_text(json.dumps({"steps": result.steps, "train_time_s": result.train_time,
                                                    "tokens": result.tokens, "val_bpb": result.best_val_bpb}))
    return json.loads((work / "base.json").read_text())


def run_transfer(out: Path, work: Path, more: Path, pretrain_time: float = 240.0, finetune_time: float = 60.0,
                 fractions=FRACTIONS, cache_dir=None, threads: int | None = None, log=print) -> list[dict]:
    work, out = Path(work), Path(out)
    base = work / "base"
    summary = pretrain_base(work, more, pretrain_time, cache_dir, threads, log)
    # the same number of optimizer steps for every fine-tune, from the pretraining's measured speed
    steps = max(20, int(finetune_time * summary["steps"] / summary["train_time_s"]))
    base_lm = lmforge.load(base)
    tokenizer = base_lm.tokenizer
    if "austen_bpb" not in summary:  # the base on Austen's validation text with no fine-tuning at all
        from lmforge.evaluation.likelihood import evaluate_documents

        austen = prepare_data(finetune_config(base, AUSTEN), tokenizer)
        summary["austen_bpb"] = evaluate_documents(base_lm.model, tokenizer,
                                                   austen.validation_documents())["bits_per_byte"]
    (work / "base.json").write_text(json.dumps({**summary, "finetune_steps": steps}))
    rows = []
    for fraction in fractions:
        row = {"fraction": fraction, "steps": steps}
        for name, scratch, lr in (("pretrained", False, 1e-3), ("scratch", True, 3e-3)):
            run = work / f"{name}-{int(fraction * 100)}"
            if not (run / "summary.json").exists():
                finetune_fraction(base, run, fraction, scratch, lr, steps, threads, log)
            done = json.loads((run / "summary.json").read_text())
            row[name], row["train_tokens"] = done["val_bits_per_byte"], done["train_tokens"]
        rows.append(row)
        log(json.dumps(row))
    write_outputs(out, rows, summary, steps)
    return rows


def finetune_fraction(base: Path, run: Path, fraction: float, scratch: bool, lr: float, steps: int, threads: int,
                      log) -> None:
    """Fine-tune `base` (or, scratch, its architecture from random weights) on the first `fraction` of
    each Austen book's training tokens; validation is always the whole validation split."""
    config = finetune_config(base, AUSTEN, mode="full", max_steps=steps, lr=lr, from_scratch=scratch,
                             overrides=[*([f"train.threads={threads}"] if threads else []), "train.progress=false",
                                        f"train.eval_interval={max(1, steps // 4)}"])
    job = finetune_job(config, log=log)
    subset = fraction_of(prepare_data(config, job.tokenizer), fraction)
    t = config.train
    job.batches = lm_batches(subset, job.model.config.context_len, t.batch_size, t.seed, t.eval_batches)
    train_loop(config, run, job, log=log)
    val = lmforge.load(run).evaluate()
    ckpt.write_json(run / "summary.json", {"val_bits_per_byte": val["bits_per_byte"], "train_tokens": len(subset.train)})


def write_outputs(out: Path, rows: list[dict], base_summary: dict, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Transfer: pretrained on broad Gutenberg, fine-tuned on Austen vs trained from scratch", "",
             f"Base: Transformer {MODEL['d_model']}d × {MODEL['n_layers']} layers, bpe 2048, pretrained "
             f"{base_summary['train_time_s']:.0f} s ({base_summary['steps']} steps, {base_summary['tokens']:,} tokens) "
             f"on NLTK Gutenberg minus Emma and Persuasion, plus gutenberg-more. Each Austen run: {steps} steps "
             "(batch 16 × 128 tokens), the base's tokenizer; fine-tune lr 1e-3, scratch lr 3e-3. "
             f"The base alone, before any Austen: {base_summary['austen_bpb']:.3f} bits per byte.", "",
             "Validation bits per byte on the last 10% of Emma and Persuasion (lower is better):", "",
             "| Austen training text | tokens | from scratch | pretrained + fine-tuned | gain |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['fraction']:.0%} | {r['train_tokens']:,} | {r['scratch']:.3f} | {r['pretrained']:.3f} | "
                     f"{r['scratch'] - r['pretrained']:.3f} |")
    lines += ["", f"Regenerate: `python benchmarks/transfer.py --out reports/transfer --work runs/transfer --more ...` "
              f"(generated {time.strftime('%Y-%m-%d')})."]
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["train_tokens"] for r in rows]
    ax.plot(x, [r["scratch"] for r in rows], "o-", label="from scratch")
    ax.plot(x, [r["pretrained"] for r in rows], "s-", label="pretrained + fine-tuned")
    ax.set_xscale("log")
    ax.set_xlabel("Austen training tokens (10%, 30%, 100%)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"Data efficiency, {steps} steps per run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "transfer.png", dpi=110)
    plt.close(fig)


def run_authors(out: Path, work: Path, more: Path, steps: int | None = None, threads: int | None = None,
                adapter_time: float = 60.0, adapter_mode: str = "full", pretrain_time: float = 240.0,
                log=print) -> dict:
    """Author attribution with the transfer base, three ways, against bag-of-words: a classification head
    on the pretrained body (full fine-tune), the same from scratch, and the language model's own
    likelihood: one copy of the base fine-tuned per author (`adapter_mode` full, or lora for small
    adapters) on that author's training passages, a test passage going to the author whose model codes it
    in the fewest bits per byte (the fine-tunes and the scoring within 10 minutes). Accuracy and macro-F1
    on the test regions; writes authors.md into `out`."""
    import time

    from lmforge.finetuning.classify import scores

    work, out = Path(work), Path(out)
    data = work / "authors.jsonl"
    if not data.exists():
        write_authors(data, more)
    rows = read_jsonl(data, ("text", "label"))
    labels = sorted({r["label"] for r in rows})
    base = pretrain_base(work, more, pretrain_time, threads=threads, log=log)
    steps = steps or base.get("finetune_steps") or max(20, int(60.0 * base["steps"] / base["train_time_s"]))
    quiet = ["train.progress=false"] + ([f"train.threads={threads}"] if threads else [])
    results = {}
    for name, scratch, lr in (("pretrained", False, 1e-3), ("scratch", True, 3e-3)):
        run = work / f"authors-{name}"
        if not (run / "summary.json").exists():
            lmforge.finetune(work / "base", [str(data)], run, task="classify", mode="full", max_steps=steps, lr=lr,
                             from_scratch=scratch, log=log, overrides=[*quiet, f"train.eval_interval={max(1, steps // 4)}"])
        results[name] = json.loads((run / "summary.json").read_text())
    tic = time.time()
    adapters = {}
    for author in labels:
        text = work / f"author-{author}.txt"
        text.write_text("\n\n".join(r["text"] for r in rows if r["label"] == author and r["split"] == "train"))
        run = work / f"authors-{adapter_mode}-{author}"
        if not (run / "summary.json").exists():
            lmforge.finetune(work / "base", [str(text)], run, mode=adapter_mode, max_time=adapter_time, log=log,
                             overrides=quiet)
        adapters[author] = lmforge.load(run)
    test = [r for r in rows if r["split"] == "test"]
    gold = [labels.index(r["label"]) for r in test]
    bits = [[adapters[a].evaluate(r["text"])["bits_per_byte"] * len(r["text"].encode()) for a in labels]
            for r in test]
    results["likelihood"] = scores(gold, [min(range(len(labels)), key=row.__getitem__) for row in bits])
    results["likelihood"]["wall_time_s"] = time.time() - tic
    # the head's log-probability of each author plus that author's model's log-likelihood (-bits · ln 2)
    probs = lmforge.load(work / "authors-pretrained").classify([r["text"] for r in test])
    both = [max(range(len(labels)), key=lambda j: math.log(p[labels[j]]) - row[j] * math.log(2))
            for p, row in zip(probs, bits)]
    results["both"] = scores(gold, both)
    pick = [(r["text"], labels.index(r["label"])) for r in rows]
    results["bag of words"] = bag_of_words([p for p, r in zip(pick, rows) if r["split"] == "train"],
                                           [p for p, r in zip(pick, rows) if r["split"] == "test"], len(labels))
    lines = ["# Author attribution", "",
             f"{len(labels)} authors ({', '.join(labels)}); passages of ~600 characters cut from each book's first 80% "
             f"(train, {sum(r['split'] == 'train' for r in rows)}), next 10% (val) and last 10% (test, "
             f"{sum(r['split'] == 'test' for r in rows)}). Head runs: {steps} steps, mean pooling, first 128 "
             f"tokens of each passage. Likelihood: the base fine-tuned per author ({adapter_mode}, {adapter_time:.0f} s "
             f"each on that author's training passages), the lowest bits per byte wins; fine-tunes and scoring took "
             f"{results['likelihood']['wall_time_s'] / 60:.1f} minutes. Data: `lmforge data authors`. The base's "
             "pretraining text held these books (all but Emma and Persuasion) unlabelled, test regions included.", "",
             "| model | test accuracy | macro-F1 |", "|---|---:|---:|"]
    names = {"likelihood": f"pretrained base fine-tuned per author ({adapter_mode}), lowest bits per byte",
             "pretrained": "pretrained base + classification head (full fine-tune)",
             "both": "both: the head's log-probability plus each author model's log-likelihood",
             "scratch": "same architecture from scratch + head", "bag of words": "bag-of-words linear (log counts, 5k words)"}
    for key, label in names.items():
        lines.append(f"| {label} | {results[key]['accuracy']:.1%} | {results[key]['macro_f1']:.3f} |")
    lines += ["", f"Regenerate: `python benchmarks/transfer.py --more ...` ({time.strftime('%Y-%m-%d')}, "
                  f"{machine()['cpu']})."]
    out.mkdir(parents=True, exist_ok=True)
    (out / "authors.md").write_text("\n".join(lines) + "\n")
    log(json.dumps({k: {m: v[m] for m in ("accuracy", "macro_f1")} for k, v in results.items()}))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reports/transfer")
    p.add_argument("--work", default="runs/transfer")
    p.add_argument("--more", required=True, help="the folder of extra Gutenberg novels (gutenberg-more)")
    p.add_argument("--pretrain-time", type=float, default=240.0, help="seconds of pretraining for the base")
    p.add_argument("--finetune-time", type=float, default=60.0,
                   help="seconds per Austen run of the transfer report (the authors report fine-tunes the base "
                        "60 s per author, and its head runs take a fixed number of steps)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--skip", choices=["transfer", "authors"], help="leave out one of the two reports")
    args = p.parse_args(argv)
    def log(message):  # progress on stderr: stdout is the one JSON document at the end
        print(message, file=sys.stderr, flush=True)

    out = {"benchmark": "transfer", "cpu": machine()["cpu"]}
    try:
        if args.skip != "transfer":
            out["transfer"] = run_transfer(Path(args.out), Path(args.work), Path(args.more), args.pretrain_time,
                                           args.finetune_time, threads=args.threads, log=log)
        if args.skip != "authors":
            out["authors"] = run_authors(Path(args.out), Path(args.work), Path(args.more), threads=args.threads,
                                         pretrain_time=args.pretrain_time, log=log)
    except LmforgeError as e:  # bad input: one line, as lmforge's own commands say it
        p.exit(2, f"error: {e}\n")
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
