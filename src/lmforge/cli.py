"""The `lmforge` command: one verb per stage, each a thin shell over a library function.

User mistakes (LmforgeError) print as one line, `error: ...`, and exit with status 2; an interrupted
command (Ctrl-C, SIGTERM) exits with 130 after saving what it can.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys

from .errors import LmforgeError, shell_join

AUSTEN = ["gutenberg:austen-emma.txt", "gutenberg:austen-persuasion.txt"]


def _flag_overrides(args, names: dict[str, str], given: list[str] = ()) -> list[str]:
    """Convenience flags as dotted overrides (the same names a TOML file uses): {flag attr: section.key}.
    A flag and one of the `given` overrides that set one key to different values are refused."""
    from .config import parse_value

    out = []
    for attr, key in names.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        for item in given:
            name, _, text = item.partition("=")
            if name.strip() == key and parse_value(text.strip()) != value:
                flag = "--" + attr.replace("_", "-")
                shown = " ".join(value) if isinstance(value, list) else value
                raise LmforgeError(f"{flag} {shown} and {item} both set {key}; give one of them")
        out.append(f"{key}={json.dumps(value)}")
    return out


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM (`kill`, a job scheduler's stop) ends a command as Ctrl-C does: the training loop saves and
    stops, `prepare` removes its half-written folder, and the command ends with a note and status 130,
    not silently with 143."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (main() called from another thread): signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_out(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def cmd_train(args) -> int:
    from . import api
    from .config import parse_duration

    if args.resume and args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise LmforgeError("--resume continues the run in its own folder; drop --out (or drop --resume)")
    budget = None
    if args.budget is not None:
        if args.max_time is not None or args.max_steps is not None:
            raise LmforgeError("--budget is the training time; drop --max-time/--max-steps, or drop --budget")
        budget = parse_duration(args.budget)
    overrides = list(args.overrides) + _flag_overrides(args, {
        "max_steps": "train.max_steps", "max_time": "train.max_time", "seed": "train.seed", "arch": "model.arch",
        "tokenizer": "tokenizer.kind", "device": "train.device", "data": "data.sources",
        "encoding": "data.encoding", "errors": "data.errors", "jsonl_field": "data.jsonl_field"}, args.overrides)
    if args.no_progress:
        overrides.append("train.progress=false")
    lm, result = api.train(args.config, args.resume or args.out, preset=args.preset, overrides=overrides,
                           resume=args.resume is not None, budget=budget)
    from .training import distributed as dist

    if not dist.is_main():  # under torchrun, process 0 reports
        return 130 if result.interrupted else 0
    print(f"run: {result.run_dir}  steps {result.steps}, {result.tokens:,} tokens in {result.train_time:.0f} s "
          f"({result.tokens_per_s:,.0f} tokens/s)")
    if result.interrupted:
        return 130
    val = result.extra.get("val")
    if val:
        print(f"validation: {val['bits_per_byte']:.3f} bits per byte, perplexity {val['perplexity']:.2f}, "
              f"accuracy {val['accuracy']:.1%}")
        if "scored_chars" in val:  # a long split: its leading share
            rest = shell_join(["lmforge", "eval", result.run_dir])
            print(f"  (on the first {val['scored_chars']:,} of {val['val_chars']:,} characters of validation text, "
                  f"the same share of each document; `{rest}` scores it all)")
        if val["bits_per_byte_is_lower_bound"]:
            from .evaluation.likelihood import lower_bound_reason

            print(f"  (a lower bound: {lower_bound_reason(val)})")
    prompt = args.prompt if args.prompt is not None else lm.config["train"]["sample_prompt"]
    tokens = lm.config["train"]["sample_tokens"]
    if lm.config.get("finetune") or not tokens:
        return 0
    from .compare import original_passage, seed_phrase
    from .config import TrainConfig

    documents = lm.validation_documents()
    if args.prompt is None and prompt == TrainConfig().sample_prompt:  # the default, made for Austen
        prompt = seed_phrase(documents, prompt)
    print(f"\nsample ({prompt!r}, temperature 0.8):\n")
    _print_out(prompt)
    text = lm.generate(prompt, max_new_tokens=tokens, temperature=0.8, seed=0, on_text=_print_out)
    print("\n")
    # Beside the sample, what the author wrote after the same seed in text the model never trained on.
    original = original_passage(documents, prompt, len(text))
    if original is not None:
        print(f"original (validation text of {original[0]}, after its first {prompt!r}):\n")
        print(prompt + original[1] + "\n")
    return 0


def cmd_finetune(args) -> int:
    from pathlib import Path

    from . import api
    from .config import parse_duration
    from .training import distributed as dist

    settings = (args.set or []) + (["train.progress=false"] if args.no_progress else []) \
        + _flag_overrides(args, {"device": "train.device"}, args.set or [])
    if args.resume:
        setup = [flag for flag, value in (("BASE", args.base), ("--data", args.data), ("--out", args.out),
                                          ("--mode", args.mode), ("--task", args.task), ("--lr", args.lr),
                                          ("--freeze-layers", args.freeze_layers), ("--lora-rank", args.lora_rank),
                                          ("--lora-alpha", args.lora_alpha), ("--lora-dropout", args.lora_dropout),
                                          ("--lora-targets", args.lora_targets), ("--pooling", args.pooling),
                                          ("--template", args.template), ("--from-scratch", args.from_scratch or None),
                                          ("--encoding", args.encoding), ("--errors", args.errors),
                                          ("--jsonl-field", args.jsonl_field))
                 if value is not None]
        if setup:
            raise LmforgeError(f"--resume continues the fine-tune as it was set up; drop {', '.join(setup)} (only "
                               f"--max-time, --max-steps and --set train.threads=... and the like may change), or "
                               f"start a new fine-tune with another --out")
        from . import checkpoint

        if not checkpoint.read_config(Path(args.resume)).get("finetune"):
            raise LmforgeError(f"{args.resume} is not a fine-tune; continue its training with "
                               f"`{shell_join(['lmforge', 'train', '--resume', args.resume])}`, or fine-tune it "
                               f"with `{shell_join(['lmforge', 'finetune', args.resume])} --data ...`")
        lm, result = api.train(None, args.resume, resume=True, overrides=settings + _flag_overrides(args, {
            "max_steps": "train.max_steps"}, settings) + ([f"train.max_time={parse_duration(args.max_time)}"]
                                               if args.max_time else []))
    else:
        if not args.base or not args.data:
            raise LmforgeError("finetune needs a base run and --data (or --resume RUN to continue one)")
        text_options = [flag for flag, value in (("--encoding", args.encoding), ("--errors", args.errors),
                                                 ("--jsonl-field", args.jsonl_field)) if value is not None]
        if args.task in ("completion", "classify") and text_options:
            rows = "prompt/completion" if args.task == "completion" else "text/label"
            raise LmforgeError(f"{', '.join(text_options)} apply to text sources (--task lm); --task {args.task} "
                               f"reads one UTF-8 .jsonl of {rows} rows: drop {' and '.join(text_options)}")
        lm, result = api.finetune(
            args.base, args.data, args.out, task=args.task or "lm", mode=args.mode or "full", lr=args.lr,
            max_time=parse_duration(args.max_time), max_steps=args.max_steps,
            overrides=settings + _flag_overrides(args, {"encoding": "data.encoding", "errors": "data.errors",
                                                     "jsonl_field": "data.jsonl_field"}, settings),
            freeze_layers=args.freeze_layers, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, pooling=args.pooling, template=args.template,
            from_scratch=args.from_scratch or None,
            lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None)
    if not dist.is_main():  # under torchrun, process 0 reports
        return 130 if result.interrupted else 0
    # the task's own figures were printed as they were measured (finetuning.run.finetune_results)
    print(f"run: {result.run_dir}  {result.steps} steps, {result.extra['trainable_params']:,} trainable parameters")
    return 130 if result.interrupted else 0


def _compile_decoding(lm) -> None:
    """--compile: compile the decoding step, and say what was measured and whether it is used."""
    print("compiling the decoding step (seconds the first time; PyTorch caches it on disk)...", file=sys.stderr)
    result = lm.decoder.compile()
    times = result.get("step_us")
    measured = f": {times['compiled']:.0f} µs a step against {times['eager']:.0f} uncompiled" if times else ""
    if result["compiled"]:
        print(f"decoding step compiled in {result['compile_s']:.1f} s{measured}", file=sys.stderr)
    else:
        print(f"decoding step not compiled ({result['why']}){measured}", file=sys.stderr)


def cmd_generate(args) -> int:
    from . import api
    from .chat import unescape
    from .generation import SamplingConfig

    if args.num_samples < 1:
        raise LmforgeError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.greedy:
        given = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                          ("--top-p", args.top_p)) if value is not None]
        if given:
            raise LmforgeError(f"--greedy always takes the likeliest token, so {'/'.join(given)} would change "
                               f"nothing; drop {'them' if len(given) > 1 else 'it'}, or drop --greedy to sample")
    if "" in (args.stop or []):
        raise LmforgeError("--stop '' would stop nothing; give the text that ends the output (--stop '\\n' for a "
                           "line), or drop it")
    temperature = 0.0 if args.greedy else 0.8 if args.temperature is None else args.temperature
    sampling = SamplingConfig(args.max_new_tokens, temperature, args.top_k or None,  # 0: off, as in chat
                              args.top_p, args.seed, [unescape(s) for s in args.stop or []],
                              token_healing=not args.no_token_healing)
    lm = api.load(args.run, device=args.device, decoding="fp32" if args.exact else "auto")
    ids = lm.prompt_ids(args.prompt)
    for note in lm.prompt_notes(args.prompt, sampling.token_healing):
        print(f"note: {note}", file=sys.stderr)
    length, limit = len(ids), lm.decoder.max_context
    if limit is not None and length >= limit:  # a full context leaves no position for the first new token
        from .generation.engine import refill_length

        amount = "more than" if length > limit else "all of"
        print(f"note: the prompt is {length} tokens, {amount} the model's context of {limit}; it is continued "
              f"from its last {refill_length(limit)} tokens", file=sys.stderr)
    if args.compile:
        _compile_decoding(lm)
    if args.verbose:
        compiled = ", compiled step" if lm.decoder.compiled else ""
        print(f"decoding with {lm.decoding} weights, {lm.decoding_cache} KV cache{compiled} on {lm.device.type}",
              file=sys.stderr)
    for i in range(args.num_samples):
        _print_out(args.prompt)
        seed = None if sampling.seed is None else (sampling.seed + i) % 2**64  # the largest seed's next is 0
        lm.complete(args.prompt, SamplingConfig(**{**sampling.__dict__, "seed": seed}), on_text=_print_out)
        sys.stdout.write("\n")
        if args.num_samples > 1:
            print("-" * 40)
    return 0


def _check_port(host: str, port: int) -> None:
    import errno
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
            s.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise LmforgeError(f"port {port} on {host} is in use (another server?); stop it or choose another "
                               f"with --port") from None
        raise LmforgeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); check --host and --port") from None


def cmd_serve(args) -> int:
    import uvicorn

    from . import api
    from .device import physical_cores, set_threads
    from .serving.app import Settings, create_app

    threads = 1 if args.threads is None else args.threads
    for what, value, least in (("--max-batch", args.max_batch, 1), ("--max-waiting", args.max_waiting, 0),
                               ("--max-tokens", args.max_tokens, 1), ("--threads", threads, 1)):
        if value < least:
            raise LmforgeError(f"{what} must be at least {least}, got {value}")
    if not 1 <= args.port <= 65535:
        raise LmforgeError(f"--port must be between 1 and 65535, got {args.port}")
    _check_port(args.host, args.port)  # before the model loads: a taken port is a one-line error, at once
    lm = api.load(args.run, device=args.device, decoding="fp32" if args.exact else "auto")
    if lm.device.type == "cpu":  # the event loop needs a core of its own: with every core decoding, each streamed
        # token waits for it (on 2 cores, one torch thread served 734 tokens/s to one client against 361 with two)
        set_threads(args.threads or max(1, physical_cores() - 1))
    if args.compile:  # after the thread count: the step is timed as it will run
        _compile_decoding(lm)
    name = args.name or lm.run_dir.resolve().name  # `serve .` is named after the folder, not ''
    settings = Settings(name, api_key=args.api_key or None, max_batch=args.max_batch, max_waiting=args.max_waiting,
                        max_tokens=args.max_tokens)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this machine can use it",
              file=sys.stderr)
    gaps = lm.transcript_gaps()
    if gaps:
        print(f"note: this model's tokenizer cannot represent {', '.join(map(repr, gaps))}, which the chat transcript "
              f"marks turns with: /v1/chat/completions replies end only at the end of text or max_tokens",
              file=sys.stderr)
    compiled = ", compiled" if lm.decoder.compiled else ""
    print(f"serving {name} ({lm.config['model']['arch']}, {lm.num_params / 1e6:.2f}M parameters, {lm.decoding} "
          f"decoding, {lm.decoding_cache} cache{compiled}) at http://{args.host}:{args.port}/  "
          f"(OpenAI API under /v1)", file=sys.stderr)
    uvicorn.run(create_app(lm, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_chat(args) -> int:
    from . import api
    from .chat import run
    from .data.prepare import cache_root
    from .generation import SamplingConfig

    lm = api.load(args.run, device=args.device, decoding="fp32" if args.exact else "auto")
    if args.compile:
        _compile_decoding(lm)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, args.seed)
    run(lm, sampling, history_file=None if args.no_history else cache_root(None) / "chat_history")
    return 0


def _note_changed_text(lm) -> None:
    """Say so when the run's sources no longer hold the text it trained on (config.json's digest)."""
    from .training import distributed as dist

    started_on = lm.config.get("data_key")
    if started_on is None or not dist.is_main():
        return
    if lm.prepared_data().text_digest != started_on:
        print(f"note: the text of {', '.join(lm.config['data']['sources'])} has changed since this run trained on it; "
              f"these figures are on the text as it is now", file=sys.stderr)


def cmd_eval(args) -> int:
    from . import api
    from .device import resolve_device
    from .training import distributed as dist

    if dist.launched():  # torchrun -m lmforge eval: the processes share the scoring
        args.device = str(dist.start(resolve_device(args.device)))
    if not args.adapt and (args.adapt_lr is not None or args.adapt_lora):
        raise LmforgeError("--adapt-lr and --adapt-lora set up --adapt; add --adapt, or drop them")
    for flag, value, needed, given in (("--encoding", args.encoding, "--text FILE", args.text),
                                       ("--errors", args.errors, "--text FILE", args.text),
                                       ("--jsonl-field", args.jsonl_field, "--text FILE", args.text),
                                       ("--prompts", args.prompts, "--report DIR", args.report),
                                       ("--seed", args.seed, "--report DIR", args.report)):
        if value is not None and not given:  # not silently ignored
            raise LmforgeError(f"{flag} applies to {needed}; add it, or drop {flag}")
    reading = [flag for flag, value in (("--encoding", args.encoding), ("--errors", args.errors),
                                        ("--jsonl-field", args.jsonl_field)) if value is not None]
    args.encoding, args.errors = args.encoding or "utf-8", args.errors or "strict"
    args.jsonl_field, args.prompts = args.jsonl_field or "text", 100 if args.prompts is None else args.prompts
    args.seed = 0 if args.seed is None else args.seed
    lm = api.load(args.run, device=args.device)
    task = (lm.config.get("finetune") or {}).get("task")
    from .finetuning.run import holds_task_rows

    labelled = bool(args.text) and holds_task_rows(args.text, task)  # a .jsonl of the task's own rows
    if task in ("classify", "completion") and (labelled or not args.text) and not args.report:
        if args.adapt and labelled:
            raise LmforgeError(f"--adapt scores plain text; {args.text} holds this {task} run's rows, scored as its "
                               f"task: drop --adapt")
        if args.adapt:
            raise LmforgeError(f"--adapt scores text; give it with --text FILE (this {task} run's own figures come "
                               f"without --adapt)")
        if labelled and reading:
            raise LmforgeError(f"{args.text} holds this {task} run's rows, which are read as UTF-8 JSONL with their "
                               f"own fields: drop {reading[0]}")
        from .finetuning.run import finetune_results

        # the task's own figures, on its held-out rows (in the line the run printed when it finished) or on
        # every row of the --text file
        result = finetune_results(lm, args.text if labelled else None,
                                  log=print if dist.is_main() and not args.json else lambda *_: None)
        if dist.is_main() and args.json:
            print(json.dumps(result, indent=2))
        return 0
    if args.report:
        from pathlib import Path

        if args.adapt or args.json:
            flag = "--adapt" if args.adapt else "--json"
            raise LmforgeError(f"--report writes its own report.md and report.json; {flag} applies to the table "
                               f"eval prints: drop it, or run eval without --report")
        if dist.world_size() > 1:  # each process would write the same files at once, for no speed-up
            raise LmforgeError("--report runs in one process (its work is not shared out): run "
                               "`lmforge eval ... --report DIR` without torchrun")
        from .evaluation.report import write_report

        write_report(lm, Path(args.report), text_path=args.text, n_prompts=args.prompts, seed=args.seed,
                     progress=sys.stderr.isatty(),  # bars for a person watching, not in a log file
                     encoding=args.encoding, errors=args.errors, jsonl_field=args.jsonl_field)
        return 0
    if args.text:
        from .data import read_sources

        documents = read_sources([args.text], jsonl_field=args.jsonl_field, encoding=args.encoding,
                                 errors=args.errors)
        from .evaluation.likelihood import evaluate_documents

        result = evaluate_documents(lm.model, lm.tokenizer, [(d.name, d.text) for d in documents], device=lm.device)
    else:
        result = lm.evaluate()
        _note_changed_text(lm)
    if args.adapt:
        result = adapt_figures(lm, args, result)
    if not dist.is_main():
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [("all", result)] + list(result["documents"].items())
    adaptive = f" {'adaptive':>10}" if args.adapt else ""
    width = min(60, max(28, *(len(name) for name, _ in rows)))
    print(f"{'text':<{width}} {'bits/byte':>10}{adaptive} {'ppl/token':>10} {'top-1':>7} {'top-5':>7} {'tokens':>9} "
          f"{'bytes':>10}")
    for name, r in rows:
        extra = f" {r.get('adaptive_bits_per_byte', float('nan')):>10.4f}" if args.adapt else ""
        if len(name) > width:  # a long path keeps its end, the file's own name, and shows what it lost
            name = "…" + name[-(width - 1):]
        print(f"{name:<{width}} {r['bits_per_byte']:>10.4f}{extra} {r['perplexity']:>10.2f} {r['accuracy']:>7.1%} "
              f"{r['top5_accuracy']:>7.1%} {r['tokens']:>9,} {r['bytes']:>10,}")
    if "ppmd8_bits_per_byte" in result:
        print(f"PPMd order 8, after the run's training text: {result['ppmd8_bits_per_byte']:.4f} bits per byte")
    if result.get("bits_per_byte_is_lower_bound"):
        from .evaluation.likelihood import lower_bound_reason

        print(f"(a lower bound: {lower_bound_reason(result)})")
    return 0


def cmd_classify(args) -> int:
    from pathlib import Path

    from . import api
    from .data.sources import is_jsonl, read_file

    texts = list(args.texts)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise LmforgeError(f"--file {path} is not a file; give a text file (one text per line) or a .jsonl")
        documents = read_file(path, jsonl_field=args.jsonl_field, encoding=args.encoding, errors=args.errors,
                              training=False)
        if is_jsonl(path):
            texts += [d.text for d in documents]
        else:
            texts += [line for line in documents[0].text.splitlines() if line.strip()]
    if not texts:
        raise LmforgeError("nothing to classify; give texts after the run, or --file FILE")
    lm = api.load(args.run, device=args.device)
    for text, probs in zip(texts, lm.classify(texts)):
        label = max(probs, key=probs.get)
        if args.json:
            print(json.dumps({"text": text, "label": label, "probabilities": probs}))
        else:
            shown = " ".join(text.split())
            print(f"{label}\t{probs[label]:.3f}\t{shown[:70] + '…' if len(shown) > 70 else shown}")
    return 0


def adapt_figures(lm, args, static: dict) -> dict:
    """eval --adapt: the static figures, the adaptive ones beside them, and PPMd order 8 given the
    run's training text (the classical compressor that adapts as it codes)."""
    from .data import read_sources
    from .evaluation.baselines import compressor_bits_per_byte
    from .evaluation.likelihood import Score
    from .finetuning.adaptive import AdaptSettings, adaptive_score

    if args.text:
        documents = [(d.name, d.text) for d in read_sources([args.text], jsonl_field=args.jsonl_field,
                                                             encoding=args.encoding, errors=args.errors)]
    else:
        documents = lm.validation_documents()
    settings = AdaptSettings(lr=args.adapt_lr, lora=args.adapt_lora)
    total = Score()
    for name, text in documents:
        score = adaptive_score(lm.model, lm.tokenizer, text, settings, device=lm.device)
        static["documents"][name]["adaptive_bits_per_byte"] = score.bits_per_byte
        total += score
    static["adaptive_bits_per_byte"] = total.bits_per_byte
    static["adaptive"] = {"lr": settings.lr, "lora": settings.lora, "steps_per_window": settings.steps}
    try:
        train = lm.prepared_data().train_text.encode("utf-8")
        text = "".join(t for _, t in documents).encode("utf-8")
        static["ppmd8_bits_per_byte"] = compressor_bits_per_byte(train, text, "ppmd")
    except LmforgeError:  # no pyppmd, or the training text is not at hand: no yardstick
        pass
    return static


def cmd_prepare(args) -> int:
    from .config import parse_overrides
    from .data import prepare

    prepared = prepare(args.sources, tokenizer=args.tokenizer,
                       tokenizer_options=parse_overrides(args.option or [], sections=None, what="-o"),
                       val_fraction=args.val_fraction, cache_dir=args.cache_dir, jsonl_field=args.jsonl_field,
                       encoding=args.encoding, errors=args.errors)
    print(f"{'reused' if prepared.reused else 'written'}: {prepared.path}")
    from .tokenizers import vocab_text

    print(f"tokenizer {prepared.tokenizer.kind}, {vocab_text(prepared.tokenizer)}; "
          f"{len(prepared.train):,} train tokens, {len(prepared.val):,} validation tokens")
    if prepared.unknown:  # pieces of the text the tokenizer has no entry for (a char vocabulary from other text)
        from .data.prepare import unknown_examples

        print(f"note: {sum(prepared.unknown.values()):,} piece(s) of the text are <unk> to this tokenizer "
              f"({unknown_examples(prepared.unknown)})")
    return 0


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def cmd_compare(args) -> int:
    from pathlib import Path

    from .compare import compare, table_lines
    from .config import build_config, parse_duration

    overrides = list(args.overrides) + _flag_overrides(args, {"data": "data.sources"}, args.overrides)
    base = build_config(args.config, None, overrides)
    budget = None if args.budget in ("0", "none") else parse_duration(args.budget)
    budget = budget or None  # "0s" as "0": no time budget (then --max-steps must be given)
    out = Path(args.out)
    report = compare(_names(args.arch), _names(args.tokenizer), budget, args.match, out, base,
                     max_steps=args.max_steps, prompt=args.prompt)
    print("\n" + "\n".join(table_lines(report)))
    print(f"\nreport: {out / 'report.md'}, {out / 'report.json'}, {out / 'bpb_vs_time.png'}")
    if any(r["status"] != "ok" for r in report["candidates"]):
        raise LmforgeError(f"some candidates failed; their logs are in {out / 'logs'}")
    return 0


def _counts(text: str | None, flag: str, example: str) -> tuple[int, ...] | None:
    """A comma-separated list of whole numbers >= 1 (batch sizes, client counts), or None if not given."""
    if not text:
        return None
    try:
        counts = tuple(int(c) for c in _names(text))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise LmforgeError(f"{flag} {text!r} must be whole numbers >= 1, e.g. {example}")
    return counts


# the options each benchmark takes (bench.BENCHMARKS' parameters; `overrides` are model fields, or for
# austen any section's), so that each one's --help lists its own; serve's own flags are added apart
BENCH_TAKES = {
    "train": {"arch", "overrides", "batch_size", "steps", "warmup", "vocab_size", "device", "threads", "dtype",
              "compile"},
    "generate": {"arch", "overrides", "batch_sizes", "new_tokens", "warmup", "rounds", "vocab_size", "device",
                 "threads", "compile"},
    "austen": {"max_time", "overrides", "device", "threads"},
    "prepare": set(),
    "serve": {"threads"},
}


def cmd_bench(args) -> int:
    from . import bench
    from .config import parse_duration, parse_overrides

    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--rounds", args.rounds, 1),
                               ("--new-tokens", args.new_tokens, 1), ("--batch-size", args.batch_size, 1),
                               ("--threads", args.threads, 1), ("--vocab-size", args.vocab_size, 2),
                               ("--max-tokens", getattr(args, "max_tokens", None), 1)):
        if value is not None and value < least:
            raise LmforgeError(f"{flag} must be at least {least}, got {value}")
    batch_sizes = _counts(args.batch_sizes, "--batch-sizes", "1,8")
    clients = _counts(getattr(args, "clients", None), "--clients", "1,8,32")
    duration = parse_duration(args.duration) if getattr(args, "duration", None) else None
    if duration is not None and duration <= 0:
        raise LmforgeError(f"--duration must be positive, got {args.duration!r}")
    # every option given goes to the benchmark, which refuses the ones it does not take
    options = {"archs": _names(args.arch) if args.arch else None, "batch_size": args.batch_size,
               "steps": args.steps, "warmup": args.warmup, "device": args.device, "threads": args.threads,
               "new_tokens": args.new_tokens, "rounds": args.rounds, "batch_sizes": batch_sizes,
               "max_time": parse_duration(args.max_time) if args.max_time else None, "dtype": args.dtype,
               "compile": args.compile or None, "vocab_size": args.vocab_size}
    if args.benchmark == "austen":  # trains through the normal config: overrides of any section, as they are
        options["overrides"] = args.overrides or None
    elif args.overrides:  # train and generate take model fields only
        options["model_fields"] = parse_overrides(args.overrides, sections=("model",)).get("model", {})
    if args.benchmark == "serve":
        options.update(run=args.run, clients=clients, duration=duration, max_tokens=args.max_tokens)
    print(json.dumps(bench.run(args.benchmark, **{k: v for k, v in options.items() if v is not None}), indent=2))
    return 0


def cmd_doctor(args) -> int:
    from .probe import report

    result = report(refresh=args.refresh, log=lambda message: print(message, file=sys.stderr))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m, c = result["machine"], result["choices"]
    print(f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['capability']}, bf16 units: "
          f"{'yes' if m['bf16_units'] else 'no'}); torch {m['torch']}")
    print(f"training dtype: {c['dtype']}   CPU attention under bf16: {c['attention']}   decoding weights: "
          f"{c['decoding']}   KV cache: {c.get('cache', 'fp32')}")
    for what, key, unit in (("training step", "train_step_ms", "ms"), ("decoding step", "decode_step_us", "µs"),
                            ("8-row decoding step, 256 tokens in, cache", "batch8_decode_step_us", "µs")):
        if c.get(key):
            print(f"  {what}: " + ", ".join(f"{k} {v:,} {unit}" for k, v in c[key].items()))
    compiled = result["compiled_training_step"]
    if compiled is None:
        print("  compiled training step: not measured yet (the first CPU run of 2 minutes or more measures it)")
    elif compiled["gain"] > 0:
        print(f"  compiled training step: {compiled['gain']:.2f}× the eager one's speed "
              f"({compiled['step_ms']['compiled']:,} against {compiled['step_ms']['eager']:,} ms), "
              f"{compiled['compile_s']:.0f} s to compile: runs compile where that pays for itself")
    else:
        print(f"  compiled training step: not available ({compiled['why']})")
    if "cuda" in result:
        print(f"GPU: {result['cuda']['device']}: training dtype {result['cuda']['dtype']}, decoding fp32")
    took = "" if result["probe_s"] is None else f" in {result['probe_s']} s"
    when = "probed now" if result["probed_now"] else "probed earlier"
    if result["cache"] is None:
        from .probe import cache_file

        print(f"({when}{took}; not cached: {cache_file().parent} cannot be written, so every run probes again; "
              f"set LMFORGE_CACHE to a writable folder)")
    else:
        print(f"({when}{took}; cached in {result['cache']}; lmforge doctor --refresh probes again)")
    return 0


def cmd_import(args) -> int:
    from .interop.hf import import_hf

    _only_hf(args.format)
    import_hf(args.directory, args.out, context_len=args.context_len)
    return 0


def cmd_export(args) -> int:
    from .interop.hf import export_hf

    _only_hf(args.format)
    print(f"wrote {export_hf(args.run, args.directory)}")
    return 0


def _only_hf(kind: str) -> None:
    if kind != "hf":
        raise LmforgeError(f"unknown format {kind!r}; the only one is hf (Hugging Face GPT-2 / Llama)")


def cmd_data(args) -> int:
    from .data.authors import write_authors

    if args.dataset != "authors":
        raise LmforgeError(f"unknown dataset {args.dataset!r}; the built-in one is authors")
    counts = write_authors(args.out, args.more, args.passage_chars)
    print(f"wrote {args.out}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))
    return 0


# ---- the parser -----------------------------------------------------------------------------------

def _data_flags(p, sources_help: str) -> None:
    p.add_argument("--data", nargs="+", action="extend", help=sources_help)
    p.add_argument("--encoding", help="text encoding of the sources (default utf-8)")
    p.add_argument("--errors", choices=["strict", "replace", "ignore"], help="what to do with undecodable bytes")
    p.add_argument("--jsonl-field", help=".jsonl sources: the field holding each document (default text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Build, train, evaluate and fine-tune small "
                                                                 "language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="read, split and tokenize text into a cached memory-mapped array")
    p.add_argument("sources", nargs="*", default=AUSTEN,
                   help="gutenberg:ID, text files, folders, globs or .jsonl files (default: Emma + Persuasion)")
    p.add_argument("--tokenizer", default="bpe", help="char, word or bpe (default bpe)")
    p.add_argument("--option", "-o", action="append", help="tokenizer option, e.g. -o vocab_size=2048")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="the end of each document kept for validation (default 0.1)")
    p.add_argument("--cache-dir", default=None, help="where prepared data is kept (default $LMFORGE_CACHE, else "
                                                     "~/.cache/lmforge)")
    p.add_argument("--jsonl-field", default="text", help=".jsonl sources: the field holding each document")
    p.add_argument("--encoding", default="utf-8", help="the text files' encoding (default utf-8)")
    p.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"],
                   help="what to do with undecodable bytes")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (default: a Transformer on Emma + Persuasion, 5 minutes)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.d_model=128 train.lr=1e-3")
    p.add_argument("--config", help="a TOML file with [data], [tokenizer], [model] and [train] tables")
    p.add_argument("--preset", help="a named config shipped with lmforge (e.g. tutorial)")
    p.add_argument("--out", help="run folder (default runs/<arch or preset>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run exactly where it stopped")
    p.add_argument("--max-time", help="training time budget, e.g. 300, 90s, 5m (default 250 s)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--budget", help="training time, e.g. 5m, with the Transformer sized for it on this "
                                    "machine (from a few seconds' speed probe)")
    p.add_argument("--seed", type=int, help="the run's random seed (default 1337)")
    p.add_argument("--arch", help="transformer, lstm, gru or cnn")
    p.add_argument("--tokenizer", help="char, word or bpe")
    _data_flags(p, "text sources (as for prepare)")
    p.add_argument("--device", help="auto, cpu, cuda, mps")
    p.add_argument("--prompt", help="seed phrase for the sample printed at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="continue training a run on new data (full, freeze or lora)")
    p.add_argument("base", nargs="?", help="the base run folder")
    p.add_argument("--data", nargs="+", action="extend", help="text sources (lm) or one .jsonl (classify, completion)")
    p.add_argument("--mode", help="full, freeze or lora (default full)")
    p.add_argument("--task", help="lm, completion or classify (default lm)")
    p.add_argument("--out", help="run folder (default runs/<base>-<task>-<mode>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted fine-tuning run")
    p.add_argument("--max-time", help="training time budget, e.g. 60, 90s, 5m (default 60 s)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3; lora 3e-3)")
    p.add_argument("--freeze-layers", type=int, help="freeze: layers frozen after the embeddings (default half)")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help="comma-separated module names (default: the model's lora_targets)")
    p.add_argument("--pooling", help="classify: mean or last (default mean)")
    p.add_argument("--template", help="completion: prompt template with {prompt}")
    p.add_argument("--from-scratch", action="store_true", help="the control: the base's architecture and tokenizer "
                                                               "from random weights")
    p.add_argument("--jsonl-field", help="--task lm with .jsonl data: the field holding each document (default text)")
    p.add_argument("--encoding", help="text encoding of the new data (default: the base run's, utf-8)")
    p.add_argument("--errors", choices=["strict", "replace", "ignore"], help="what to do with undecodable bytes")
    p.add_argument("--set", action="append", metavar="train.KEY=VALUE", help="other train/data options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", help="auto (the default: a GPU if there is one), cpu, cuda, mps")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="continue a seed phrase with a trained model")
    p.add_argument("run")
    p.add_argument("--prompt", "-p", default="")
    p.add_argument("--max-new-tokens", "-n", type=int, default=200)
    p.add_argument("--temperature", "-t", type=float, help="0.8 unless given; 0 is greedy")
    p.add_argument("--top-k", type=int, help="keep the K likeliest tokens (0: all, the default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append",
                   help="stop when this string is generated (repeatable; \\n, \\t and \\\\ as in chat: "
                        "--stop '\\n\\n')")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--no-token-healing", action="store_true",
                   help="feed the prompt's last token as it is (by default the model chooses how the prompt's "
                        "last word goes on: 'was' may become 'was ' or 'wasn')")
    p.add_argument("--exact", action="store_true", help="decode with the fp32 weights (not int8/fp16 copies)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step (seconds once; faster steps where measured so)")
    p.add_argument("--verbose", "-v", action="store_true", help="say which weights decode")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API and a web playground for a trained run")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--name", help="the model id clients ask for (default: the run folder's name)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond the batch before 429 (default 64)")
    p.add_argument("--max-tokens", type=int, default=2048, help="the most new tokens a request may ask for (default 2048)")
    p.add_argument("--exact", action="store_true", help="decode with the fp32 weights (not int8/fp16 copies)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step (seconds once; faster steps where measured so)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads for decoding (default: physical cores - 1)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="the server's log: warning (default), info (every request), debug")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="talk to a trained run in the terminal")
    p.add_argument("run")
    p.add_argument("--temperature", "-t", type=float, default=0.8)
    p.add_argument("--top-k", type=int, help="keep the K likeliest tokens (0: all, the default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-new-tokens", "-n", type=int, default=200)
    p.add_argument("--seed", type=int)
    p.add_argument("--exact", action="store_true", help="decode with the fp32 weights (not int8/fp16 copies)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step (seconds once; faster steps where measured so)")
    p.add_argument("--no-history", action="store_true", help="keep no input history on disk")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="bits per byte, perplexity and accuracy of a trained model")
    p.add_argument("run")
    p.add_argument("--text", help="a text or .jsonl file (default: the run's validation split)")
    p.add_argument("--jsonl-field", help="--text .jsonl: the field holding each document (default text)")
    p.add_argument("--encoding", help="--text: its encoding (default utf-8)")
    p.add_argument("--errors", choices=["strict", "replace", "ignore"],
                   help="--text: undecodable bytes (default strict)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--adapt", action="store_true", help="also score adaptively: the model learns from each window "
                                                         "after scoring it (dynamic evaluation), beside PPMd")
    p.add_argument("--adapt-lr", type=float, help="--adapt: learning rate (default 1e-4; LoRA 1e-3)")
    p.add_argument("--adapt-lora", action="store_true", help="--adapt: learn LoRA adapters only")
    p.add_argument("--report", metavar="DIR", help="write a full report (report.md, report.json, plots) to DIR")
    p.add_argument("--prompts", type=int, help="continuation prompts for the report (default 100)")
    p.add_argument("--seed", type=int, help="--report: the seed of its prompts and samples (default 0)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("classify", help="label texts with a classification run (finetune --task classify)")
    p.add_argument("run")
    p.add_argument("texts", nargs="*", help="texts to label")
    p.add_argument("--file", help="more texts: one per line, or a .jsonl with one object per line")
    p.add_argument("--jsonl-field", default="text", help="--file .jsonl: the field holding each text")
    p.add_argument("--encoding", default="utf-8", help="--file: its encoding")
    p.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"])
    p.add_argument("--json", action="store_true", help="one JSON object per text, with every label's probability")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_classify)

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
    p.add_argument("--data", nargs="+", action="extend", help="text sources (as for prepare)")
    p.add_argument("--prompt", help="seed phrase for every candidate's sample (default: train.sample_prompt)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="benchmarks; each prints one JSON object")
    benchmarks = p.add_subparsers(dest="benchmark", required=True)
    for name, text in (("train", "training tokens/s per family: forward, backward, AdamW step"),
                       ("generate", "new tokens/s per family at batch 1 and 8 after a 1-token prompt"),
                       ("austen", "validation bits per byte of the default model after --max-time (300 s)"),
                       ("prepare", "tokenizer training and encoding speed, Austen preparation time"),
                       ("serve", "a load test of lmforge serve: N concurrent streaming clients on loopback")):
        b = benchmarks.add_parser(name, help=text)
        takes = BENCH_TAKES[name]

        def option(dest: str, *flags: str, help: str, **kw) -> None:
            # an option this benchmark does not take stays parsed (and is refused by name), but out of its help
            b.add_argument(*flags, help=help if dest in takes else argparse.SUPPRESS, **kw)

        option("overrides", "overrides", nargs="*",
               help="section.key=value settings of the training run (any section)" if name == "austen"
               else "model.key=value for the families that have that field")
        b.add_argument("--json", action="store_true", help="(the output is always JSON)")
        option("arch", "--arch", help="comma-separated families, or all (default)")
        option("batch_size", "--batch-size", type=int, help="sequences per step (default 16)")
        option("batch_sizes", "--batch-sizes", help="comma-separated batch sizes (default 1,8)")
        option("steps", "--steps", type=int, help="timed steps (default 10)")
        option("warmup", "--warmup", type=int, help="untimed warm-up steps" if name == "train"
               else "untimed warm-up tokens per case")
        option("new_tokens", "--new-tokens", type=int, help="tokens per sequence (default 500)")
        option("rounds", "--rounds", type=int, help="timed runs per case, cases taking turns (default 5)")
        option("vocab_size", "--vocab-size", type=int,
               help="random ids over this many (default: the Austen char tokenizer's vocabulary, 82)")
        option("device", "--device", help="cpu (default), cuda, mps, auto")
        option("threads", "--threads", type=int, help="torch threads (default: physical cores)")
        option("max_time", "--max-time", help="training time budget (default 300 s)")
        option("dtype", "--dtype", help="auto (what training uses: the dtype the probe measured faster here), "
                                        "float32 or bfloat16")
        option("compile", "--compile", action="store_true",
               help="steps through torch.compile, as train.compile=true (compiling is in the warm-up)"
               if name == "train" else "the compiled decoding step too, as generate --compile")
        if name == "serve":
            b.add_argument("--run", help="the run folder to serve")
            b.add_argument("--clients", help="comma-separated client counts (default 1,8,32)")
            b.add_argument("--duration", help="time per client count (default 20 s)")
            b.add_argument("--max-tokens", type=int, help="new tokens per request (default 64)")
        b.set_defaults(func=cmd_bench)

    p = sub.add_parser("doctor", help="what this machine runs fastest: training dtype, decoding weights (a probe)")
    p.add_argument("--refresh", action="store_true", help="probe again instead of reading the cached result")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_doctor)

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
    p.add_argument("--more", required=True, help="the folder of extra Gutenberg novels (Dickens, Doyle, Stoker)")
    p.add_argument("--passage-chars", type=int, default=600)
    p.set_defaults(func=cmd_data)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """argparse stops collecting a positional list at the first option; `section.key=value` overrides
    that come after options are added back here."""
    from pathlib import Path

    from .config import SECTION_TYPES

    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "overrides") and getattr(args, "data", None):  # `--data books train.max_time=5`
        def setting(item: str) -> bool:
            key, sep, _ = item.partition("=")
            return bool(sep) and key.partition(".")[0] in SECTION_TYPES and not Path(item).exists()

        args.overrides = list(args.overrides or []) + [item for item in args.data if setting(item)]
        args.data = [item for item in args.data if not setting(item)] or None
    return args


def main(argv: list[str] | None = None) -> int:
    # Arguments that were not valid UTF-8 arrive with surrogate escapes: write them back as the bytes
    # they were (stdout) or escaped (stderr), never fail on them.
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        try:
            # the server stops on SIGTERM itself; in chat, Ctrl-C stops an answer, not the session
            with _sigterm_as_ctrl_c() if args.func not in (cmd_serve, cmd_chat) else contextlib.nullcontext():
                return args.func(args) or 0
        finally:
            if "RANK" in os.environ:  # under torchrun: leave the process group cleanly (gloo aborts otherwise)
                from .training import distributed

                distributed.stop()
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went to `head` or similar, which has stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (MemoryError, RuntimeError) as e:  # torch's out-of-memory errors are RuntimeErrors
        text = str(e)
        if not isinstance(e, MemoryError) and "can't allocate memory" not in text and "out of memory" not in text:
            raise
        asked = re.search(r"tried to allocate (\d+) bytes", text)
        size = f" ({int(asked.group(1)) / 2 ** 30:,.1f} GiB at once)" if asked else ""
        print(f"error: not enough memory{size}; choose a smaller model, batch or context (model.d_model, "
              f"train.batch_size, model.context_len)", file=sys.stderr)
        return 2
    except OSError as e:  # the last line of defence: a file the library did not expect to fail
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path, its permissions and the free space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
