"""The `finetune`, `import`, `export` and `data` verbs of the `lmforge` command: thin shells over
lmforge.finetune (heavy imports happen inside each handler). `register(subparsers)` adds them.
"""
from __future__ import annotations

from ..errors import LmforgeError


def _overrides(items) -> dict:
    from ..config import parse_value

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1 or key.split(".")[0] not in ("train", "data"):
            raise LmforgeError(f"--set {item!r} is not train.KEY=VALUE or data.KEY=VALUE")
        out[key] = parse_value(value)
    return out


def cmd_finetune(args) -> None:
    from ..config import parse_duration
    from .run import finetune

    lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
            "targets": args.lora_targets.split(",") if args.lora_targets else None}
    run, summary = finetune(args.base, args.data, args.out, mode=args.mode, task=args.task,
                            freeze_layers=args.freeze_layers, lora=lora, pooling=args.pooling,
                            template=args.template, max_time=parse_duration(args.max_time),
                            max_steps=args.max_steps, lr=args.lr, overrides=_overrides(args.set))
    print(f"run: {run}  {summary['steps']} steps, {summary['trainable_params']:,} trainable parameters")
    for key in ("val_bits_per_byte", "accuracy", "macro_f1"):
        if key in summary:
            print(f"{key}: {summary[key]:.4f}")


def _only_hf(kind: str) -> None:
    if kind != "hf":
        raise LmforgeError(f"unknown format {kind!r}; the only one is hf (Hugging Face GPT-2 / Llama)")


def cmd_import(args) -> None:
    from .hf import import_hf

    _only_hf(args.format)
    import_hf(args.directory, args.out, context_len=args.context_len)


def cmd_export(args) -> None:
    from .hf import export_hf

    _only_hf(args.format)
    print(f"wrote {export_hf(args.run, args.directory)}")


def cmd_data(args) -> None:
    from .authors import write_authors

    if args.dataset != "authors":
        raise LmforgeError(f"unknown dataset {args.dataset!r}; the built-in one is authors")
    counts = write_authors(args.out, args.more, args.passage_chars)
    print(f"wrote {args.out}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))


def register(sub) -> None:
    p = sub.add_parser("finetune", help="continue training a run on new data (full, freeze or lora)")
    p.add_argument("base", help="the base run folder")
    p.add_argument("--data", nargs="+", required=True, help="text sources (lm) or one .jsonl (classify, completion)")
    p.add_argument("--mode", default="full", help="full, freeze or lora (default full)")
    p.add_argument("--task", default="lm", help="lm, completion or classify (default lm)")
    p.add_argument("--out", help="run folder (default runs/<base>-<task>-<mode>-<time>)")
    p.add_argument("--max-time", help="training time budget, e.g. 60, 90s, 5m (default 60 s)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3; lora 3e-3)")
    p.add_argument("--freeze-layers", type=int, help="freeze: layers frozen after the embeddings (default half)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", help="comma-separated module names (default: model.lora_targets)")
    p.add_argument("--pooling", default="mean", help="classify: mean or last")
    p.add_argument("--template", help="completion: prompt template with {prompt}")
    p.add_argument("--set", action="append", metavar="train.KEY=VALUE", help="other train/data options")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("import", help="import a Hugging Face GPT-2 / Llama folder as a run")
    p.add_argument("format", help="hf")
    p.add_argument("directory")
    p.add_argument("--out", required=True)
    p.add_argument("--context-len", type=int, help="cap the context length (default the model's, at most 8192)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="export a run as a Hugging Face folder")
    p.add_argument("format", help="hf")
    p.add_argument("run")
    p.add_argument("directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="build a built-in dataset (authors: author attribution)")
    p.add_argument("dataset", help="authors")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--more", default="../shared/corpora/gutenberg-more", help="the gutenberg-more folder")
    p.add_argument("--passage-chars", type=int, default=600)
    p.set_defaults(func=cmd_data)
