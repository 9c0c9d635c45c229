"""The `lmforge` command: one verb per stage, each a thin shell over a library function.

User mistakes (LmforgeError) print as one line, `error: ...`, and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import LmforgeError


def _train_overrides(args) -> list[str]:
    """Turn the convenience flags into dotted overrides (the same names a TOML file uses)."""
    out = list(args.overrides)
    flags = {"train.max_steps": args.max_steps, "train.max_time": args.max_time, "train.seed": args.seed,
             "model.arch": args.arch, "tokenizer.kind": args.tokenizer, "train.device": args.device,
             "data.sources": args.data, "data.encoding": args.encoding, "data.errors": args.errors}
    if args.max_steps is not None and args.max_time is None:
        flags["train.max_time"] = 0  # a step budget alone means no time limit
    out += [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    if args.no_progress:
        out.append("train.progress=false")
    return out


def cmd_train(args) -> None:
    from . import api

    budget = None
    if args.budget is not None:
        from .config import parse_duration

        if args.max_time is not None or args.max_steps is not None:
            raise LmforgeError("--budget is the training time; drop --max-time/--max-steps, or drop --budget")
        budget = parse_duration(args.budget)
    lm, result = api.train(args.config, args.resume or args.out, preset=args.preset,
                           overrides=_train_overrides(args), resume=args.resume is not None, budget=budget)
    val = result.extra.get("val")
    print(f"run: {result.run_dir}  steps {result.steps}, {result.tokens:,} tokens in {result.train_time:.0f} s "
          f"({result.tokens_per_s:,.0f} tokens/s)")
    if val:
        print(f"validation: {val['bits_per_byte']:.3f} bits per byte, perplexity {val['perplexity']:.2f}, "
              f"accuracy {val['accuracy']:.1%}")
        if val["bits_per_byte_is_lower_bound"]:
            print(f"  (a lower bound: {val['unknown_rate']:.2%} of validation tokens are <unk>, whose spelling "
                  f"costs nothing here)")
    if result.interrupted:
        return
    prompt = args.prompt if args.prompt is not None else lm.config["train"]["sample_prompt"]
    print(f"\nsample ({prompt!r}, temperature 0.8):\n")
    sys.stdout.write(prompt)
    text = lm.generate(prompt, max_new_tokens=lm.config["train"]["sample_tokens"], temperature=0.8, seed=0,
                       on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    print("\n")
    from .compare import original_passage

    # Beside the sample, what the author wrote after the same seed in text the model never trained on.
    original = original_passage(api.validation_documents(lm.config["data"]), prompt, len(text))
    if original is not None:
        print(f"original (validation text of {original[0]}, after its first {prompt!r}):\n")
        print(prompt + original[1] + "\n")


def cmd_generate(args) -> None:
    from . import api
    from .generation import SamplingConfig

    sampling = SamplingConfig(args.max_new_tokens, 0.0 if args.greedy else args.temperature, args.top_k,
                              args.top_p, args.seed, args.stop or [])
    lm = api.load(args.run, device=args.device)
    prompt = args.prompt
    finetuned = lm.config.get("finetune", {})
    if finetuned.get("task") == "completion":  # a prompt->completion run answers in its own template
        from .finetune.completion import render

        prompt = render(finetuned["template"], args.prompt)
    unknown = lm.tokenizer.unknown(args.prompt) if args.prompt else {}
    if unknown:
        pieces = ", ".join(f"{k!r}×{v}" for k, v in unknown.items())
        print(f"note: the tokenizer can't represent {pieces} in the prompt; replaced with <unk>", file=sys.stderr)
    for _ in range(args.num_samples):
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        lm.complete(prompt, sampling, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        if args.num_samples > 1:
            print("-" * 40)
        if sampling.seed is not None:
            sampling.seed += 1


def cmd_eval(args) -> None:
    from . import api

    lm = api.load(args.run, device=args.device)
    if args.report:
        from .evaluation.report import write_report

        write_report(lm, Path(args.report), text_path=args.text, n_prompts=args.prompts, seed=args.seed)
        return
    if args.text:
        from .data.sources import read_text

        result = lm.evaluate(read_text(args.text))
    else:
        result = lm.evaluate()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    rows = [("all", result)] + list(result["documents"].items())
    print(f"{'text':<28} {'bits/byte':>10} {'ppl/token':>10} {'top-1':>7} {'top-5':>7} {'tokens':>9} {'bytes':>10}")
    for name, r in rows:
        print(f"{name[:28]:<28} {r['bits_per_byte']:>10.4f} {r['perplexity']:>10.2f} {r['accuracy']:>7.1%} "
              f"{r['top5_accuracy']:>7.1%} {r['tokens']:>9,} {r['bytes']:>10,}")


def cmd_prepare(args) -> None:
    from .data import prepare

    options = {}
    for item in args.option or []:
        from .config import parse_value

        key, _, value = item.partition("=")
        options[key] = parse_value(value)
    prepared = prepare(args.sources, tokenizer=args.tokenizer, tokenizer_options=options,
                       val_fraction=args.val_fraction, cache_dir=args.cache_dir, jsonl_field=args.jsonl_field,
                       encoding=args.encoding, errors=args.errors)
    state = "reused" if prepared.reused else "written"
    print(f"{state}: {prepared.path}")
    print(f"tokenizer {prepared.tokenizer.kind}, vocab {prepared.tokenizer.vocab_size}; "
          f"{len(prepared.train):,} train tokens, {len(prepared.val):,} validation tokens")


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def cmd_compare(args) -> None:
    from . import api
    from .compare import compare
    from .config import parse_duration

    overrides = list(args.overrides) + ([f"data.sources={json.dumps(args.data)}"] if args.data else [])
    base = api.build_config(args.config, None, overrides)
    budget = None if args.budget in ("0", "none") else parse_duration(args.budget)
    out = Path(args.out)
    report = compare(_names(args.arch), _names(args.tokenizer), budget, args.match, out, base,
                     max_steps=args.max_steps, prompt=args.prompt)
    table = [line for line in (out / "report.md").read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    print("\n" + "\n".join(table))
    print(f"\nreport: {out / 'report.md'}, {out / 'report.json'}, {out / 'bpb_vs_time.png'}")
    if any(r["status"] != "ok" for r in report["candidates"]):
        raise LmforgeError(f"some candidates failed; their logs are in {out / 'logs'}")


def cmd_bench(args) -> None:
    from . import bench
    from .config import apply_overrides, parse_duration

    model_fields = apply_overrides({}, args.overrides).get("model", {})
    options = {"archs": _names(args.arch), "batch_size": args.batch_size, "steps": args.steps,
               "warmup": args.warmup, "device": args.device, "threads": args.threads,
               "new_tokens": args.new_tokens, "rounds": args.rounds, "model_fields": model_fields or None,
               "batch_sizes": tuple(int(b) for b in _names(args.batch_sizes)) if args.batch_sizes else None,
               "max_time": parse_duration(args.max_time) if args.max_time else None, "dtype": args.dtype,
               "compile": args.compile or None}
    if args.benchmark == "austen":  # trains through the normal config: pass overrides as they are
        options = {"max_time": options["max_time"], "overrides": args.overrides or None,
                   "device": args.device, "threads": args.threads}
    elif args.benchmark == "prepare":
        options = {}
    print(json.dumps(bench.run(args.benchmark, **{k: v for k, v in options.items() if v is not None}), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Build, train, evaluate and fine-tune small language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="read, split and tokenize text into a cached memory-mapped array")
    p.add_argument("sources", nargs="*", default=["gutenberg:austen-emma.txt", "gutenberg:austen-persuasion.txt"],
                   help="gutenberg:ID, text files, folders, globs or .jsonl files (default: Emma + Persuasion)")
    p.add_argument("--tokenizer", default="bpe", help="char, word or bpe (default bpe)")
    p.add_argument("--option", "-o", action="append", help="tokenizer option, e.g. -o vocab_size=2048")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--jsonl-field", default="text")
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--errors", default="strict", help="strict, replace or ignore undecodable bytes")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (default: a Transformer on Emma + Persuasion, 5 minutes)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.d_model=128 train.lr=1e-3")
    p.add_argument("--config", help="a TOML file with [data], [tokenizer], [model] and [train] tables")
    p.add_argument("--preset", help="a named config shipped with lmforge (e.g. tutorial)")
    p.add_argument("--out", help="run folder (default runs/<arch>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run exactly where it stopped")
    p.add_argument("--max-time", help="training time budget, e.g. 300, 90s, 5m")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--budget", help="training time, e.g. 5m, with the Transformer sized for it on this "
                                    "machine (from a few seconds' speed probe)")
    p.add_argument("--seed", type=int)
    p.add_argument("--arch", help="transformer, lstm, gru or cnn")
    p.add_argument("--tokenizer", help="char, word or bpe")
    p.add_argument("--data", nargs="+", help="text sources (as for prepare)")
    p.add_argument("--encoding", help="text encoding of the sources (default utf-8)")
    p.add_argument("--errors", help="strict, replace or ignore undecodable bytes")
    p.add_argument("--device", help="auto, cpu, cuda, mps")
    p.add_argument("--prompt", help="seed phrase for the sample printed at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue a seed phrase with a trained model")
    p.add_argument("run")
    p.add_argument("--prompt", "-p", default="")
    p.add_argument("--max-new-tokens", "-n", type=int, default=200)
    p.add_argument("--temperature", "-t", type=float, default=0.8)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop when this string is generated (repeatable)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="bits per byte, perplexity and accuracy of a trained model")
    p.add_argument("run")
    p.add_argument("--text", help="a UTF-8 text file (default: the run's validation split)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", metavar="DIR", help="write a full report (report.md, report.json, plots) to DIR")
    p.add_argument("--prompts", type=int, default=100, help="continuation prompts for the report (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="train several families under one budget and write a side-by-side report")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every candidate (model.* where the "
                                                "family has that field)")
    p.add_argument("--arch", default="lstm,gru,transformer,cnn", help="comma-separated families")
    p.add_argument("--tokenizer", help="comma-separated tokenizer kinds (default: the config's, bpe)")
    p.add_argument("--budget", default="5m", help="training time per candidate, e.g. 300, 90s, 5m (0 = none)")
    p.add_argument("--max-steps", type=int, help="also stop each candidate after this many steps")
    p.add_argument("--match", default="time", choices=["time", "params"],
                   help="time: default sizes, same budget; params: widths solved to the Transformer's parameter count")
    p.add_argument("--out", required=True, help="report folder (must be new or empty)")
    p.add_argument("--config", help="a TOML file with the shared [data], [tokenizer] and [train] settings")
    p.add_argument("--data", nargs="+", help="text sources (as for prepare)")
    p.add_argument("--prompt", help="seed phrase for every candidate's sample (default: train.sample_prompt)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="speed benchmarks as JSON (train: training tokens/s per family)")
    benchmarks = p.add_subparsers(dest="benchmark", required=True)
    for name, text in (("train", "training tokens/s per family: forward, backward, AdamW step"),
                       ("generate", "new tokens/s per family at batch 1 and 8 after a 1-token prompt"),
                       ("austen", "validation bits per byte of the default model after --max-time (300 s)"),
                       ("prepare", "tokenizer training and encoding speed, Austen preparation time")):
        b = benchmarks.add_parser(name, help=text)
        b.add_argument("overrides", nargs="*", help="model.key=value for the families that have that field")
        b.add_argument("--arch", help="comma-separated families, or all (default)")
        b.add_argument("--batch-size", type=int, help="train: sequences per step (default 16)")
        b.add_argument("--batch-sizes", help="generate: comma-separated batch sizes (default 1,8)")
        b.add_argument("--steps", type=int, help="train: timed steps (default 10)")
        b.add_argument("--warmup", type=int, help="untimed warm-up steps (train) or tokens (generate)")
        b.add_argument("--new-tokens", type=int, help="generate: tokens per sequence (default 500)")
        b.add_argument("--rounds", type=int, help="generate: timed runs per case, cases taking turns (default 5)")
        b.add_argument("--device", help="cpu (default), cuda, mps, auto")
        b.add_argument("--threads", type=int, help="torch threads (default: physical cores)")
        b.add_argument("--max-time", help="austen: training time budget (default 300 s)")
        b.add_argument("--dtype", help="train: auto (what training uses: bf16 autocast where the hardware has "
                                       "bf16 units), float32 or bfloat16")
        b.add_argument("--compile", action="store_true",
                       help="train: steps through torch.compile, as train.compile=true (compiling is in the warm-up)")
        b.set_defaults(func=cmd_bench)
    from .finetune.commands import register

    register(sub)  # finetune, import, export, data
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `section.key=value` overrides may also come after options (argparse stops collecting them there)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
