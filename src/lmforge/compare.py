"""Architecture families side by side: train each candidate (arch × tokenizer) on the same data and
split under the same budget, then write a report folder (report.md, report.json, bpb_vs_time.png).

Each candidate is one `lmforge train` in its own process, so peak memory is measured per candidate
and a crash costs only its row; every row carries the exact command that reruns it.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from .config import AUSTEN, RunConfig, TrainConfig
from .errors import LmforgeError, shell_join
from .models import build_model, config_class, count_params, fields_of_none
from .training.plots import read_metrics

MATCHES = ("time", "params")
REFERENCE = "transformer"  # --match params sizes every family to this family's default parameter count
WIDTH = {"transformer": "d_model", "lstm": "d_hidden", "gru": "d_hidden", "cnn": "d_model"}  # the knob solved for
WIDTH_STEP = 16  # widths are multiples of this (keeps attention heads and RoPE pairs whole)
PARAM_TOLERANCE = 0.10
SAMPLE_TOKENS = 200
SAMPLE_CHARS = 160  # of each sample shown in the table (report.json keeps the whole text)
SAMPLE_SEED = 0
SAMPLE_TEMPERATURE = 0.8
BUDGET_FLAGS = ("max_time", "max_steps")  # set per comparison, never copied from the base config


def compare(archs: list[str], tokenizers: list[str] | None, budget_s: float | None, match: str,
            out_dir: str | Path, base_config: RunConfig | None = None, *, max_steps: int | None = None,
            prompt: str | None = None, log=print) -> dict:
    """Train every arch × tokenizer candidate into out_dir/<arch>-<tokenizer>/ and write the report.

    `budget_s` is each candidate's training time (train.max_time); `max_steps` caps steps as well
    (either may be None, not both). `match` is "time" (default sizes, same wall-clock budget) or
    "params" (each family's width solved so its parameter count is within 10% of the Transformer's
    default). Data, split, seed and other training options come from `base_config`.
    Returns the report dict (also written as report.json).
    """
    base = base_config or RunConfig()
    tokenizers = tokenizers or [base.tokenizer.kind]
    check_request(archs, tokenizers, budget_s, max_steps, match)
    # each model field goes to the families that have it (base_overrides): one that none has is a mistake
    unused = fields_of_none(archs, base.model.options)
    if unused:
        raise LmforgeError(f"model.{unused[0]} is a field of none of the families compared ({', '.join(archs)}); "
                           f"check its spelling, or drop it")
    documents = validation_parts(base)
    if prompt is None:
        prompt = base.train.sample_prompt
        if prompt == TrainConfig().sample_prompt and list(base.data.sources) != AUSTEN:
            prompt = seed_phrase(documents, prompt)  # the default seed is Austen's
    # what the author wrote after the same phrase, in text no candidate trains on: the samples' yardstick
    original = original_passage(documents, prompt, SAMPLE_CHARS - len(shortened(prompt)))
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LmforgeError(f"{out_dir} exists and is not empty; choose another --out (nothing was written)")
    # sized before anything is written: a size that cannot be matched leaves no folder behind
    matched = {tokenizer: matched_sizes(archs, tokenizer, base) if match == "params" else {}
               for tokenizer in tokenizers}
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)

    rows = []
    for tokenizer in tokenizers:
        sizes = matched[tokenizer]
        for arch in archs:
            name = f"{arch}-{tokenizer}"
            args = train_args(arch, tokenizer, out_dir / name, budget_s, max_steps, prompt, base, sizes.get(arch, {}))
            log(f"[{len(rows) + 1}/{len(archs) * len(tokenizers)}] {name}: {shell_join(['lmforge', *args])}")
            rows.append(run_candidate(name, arch, tokenizer, args, out_dir, prompt))
            log(f"    {row_summary(rows[-1])}")
    from .probe import machine

    threads = base.train.threads or "the tuner's choice of"
    report = {"machine": f"{machine()['cpu']}, {threads} torch threads", "budget_s": budget_s,
              "max_steps": max_steps, "match": match, "prompt": prompt,
              "original": None if original is None else {"document": original[0], "text": prompt + original[1]},
              "data": base.data.sources, "val_fraction": base.data.val_fraction, "seed": base.train.seed,
              "candidates": rows}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    plot_bpb_vs_time(rows, out_dir / "bpb_vs_time.png")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def check_request(archs, tokenizers, budget_s, max_steps, match) -> None:
    from .tokenizers import TOKENIZERS

    if not archs:
        raise LmforgeError("--arch is empty; name families to compare, e.g. --arch lstm,gru,transformer,cnn")
    for arch in archs:
        config_class(arch)  # raises for an unknown arch, naming the valid ones
    for kind in tokenizers:
        if kind not in TOKENIZERS:
            raise LmforgeError(f"unknown tokenizer {kind!r} in --tokenizer; choose from {', '.join(TOKENIZERS)}")
    if len(set(archs)) != len(archs) or len(set(tokenizers)) != len(tokenizers):
        raise LmforgeError("--arch and --tokenizer must not repeat a name")
    if budget_s is None and max_steps is None:
        raise LmforgeError("give a budget: --budget 5m (and/or --max-steps N)")
    if max_steps is not None and max_steps < 1:
        raise LmforgeError(f"--max-steps must be at least 1, got {max_steps}")
    if match not in MATCHES:
        raise LmforgeError(f"--match must be {' or '.join(MATCHES)}, got {match!r}")


def base_overrides(base: RunConfig, arch: str, tokenizer: str) -> list[str]:
    """The base config's departures from the defaults as dotted overrides (what a rerun must repeat).
    Model fields apply to the families that have them; tokenizer options only to the same kind."""
    default, given = RunConfig().to_dict(), base.to_dict()
    out = []
    for section in ("data", "train"):
        for key, value in given[section].items():
            if key not in BUDGET_FLAGS and value != default[section][key] and value is not None:
                out.append(f"{section}.{key}={json.dumps(value)}")
    if base.tokenizer.kind == tokenizer:
        out += [f"tokenizer.{k}={json.dumps(v)}" for k, v in base.tokenizer.options.items()]
    fields = {f for f in config_class(arch).__dataclass_fields__}
    out += [f"model.{k}={json.dumps(v)}" for k, v in base.model.options.items() if k in fields]
    return out


def train_args(arch, tokenizer, run_dir: Path, budget_s, max_steps, prompt, base, sizes: dict) -> list[str]:
    """The `lmforge train` arguments of one candidate."""
    args = ["train", "--out", str(run_dir), "--arch", arch, "--tokenizer", tokenizer]
    if budget_s is not None:
        args += ["--max-time", f"{budget_s:g}"]
    if max_steps is not None:
        args += ["--max-steps", str(max_steps)]
    args += ["--prompt", prompt, "--no-progress"]
    return args + base_overrides(base, arch, tokenizer) + [f"model.{k}={v}" for k, v in sizes.items()]


def matched_sizes(archs: list[str], tokenizer: str, base: RunConfig) -> dict[str, dict]:
    """{arch: {width field: value}} so each family's parameter count is near the Transformer default's."""
    from .data import prepare

    d = base.data
    options = base.tokenizer.options if base.tokenizer.kind == tokenizer else {}
    vocab_size = prepare(d.sources, tokenizer=tokenizer, tokenizer_options=options, val_fraction=d.val_fraction,
                         cache_dir=d.cache_dir, jsonl_field=d.jsonl_field, encoding=d.encoding,
                         errors=d.errors).tokenizer.vocab_size
    fixed = {arch: {k: v for k, v in base.model.options.items() if k in config_class(arch).__dataclass_fields__}
             for arch in set(archs) | {REFERENCE}}
    target = count_params(build_model(REFERENCE, vocab_size=vocab_size, **fixed[REFERENCE]))
    sizes = {}
    for arch in archs:
        if arch == REFERENCE:
            continue
        knob = WIDTH[arch]
        if knob in base.model.options:
            raise LmforgeError(f"--match params sets {arch}'s model.{knob} to match the {REFERENCE}'s size; drop "
                               f"model.{knob}={base.model.options[knob]}, or keep it with --match time")

        def params(width: int) -> int:
            return count_params(build_model(arch, vocab_size=vocab_size, **{**fixed[arch], knob: width}))

        width = solve_width(params, target)
        if abs(params(width) - target) > PARAM_TOLERANCE * target:
            raise LmforgeError(f"--match params: no {knob} brings {arch} within {PARAM_TOLERANCE:.0%} of the "
                               f"{REFERENCE}'s {target:,} parameters; change its other fields (model.n_layers)")
        sizes[arch] = {knob: width}
    return sizes


def solve_width(params, target: int) -> int:
    """The multiple of WIDTH_STEP whose parameter count is closest to `target`.

    Every family's count is a quadratic in its width (w×w, w×V and w×fixed matrices, w-long vectors),
    so three small widths determine it and no large model has to be built (orthogonal init is slow)."""
    w0, w1, w2 = WIDTH_STEP, 2 * WIDTH_STEP, 3 * WIDTH_STEP
    p0, p1, p2 = params(w0), params(w1), params(w2)
    a = (p2 - 2 * p1 + p0) / (2 * WIDTH_STEP**2)
    b = (p1 - p0) / WIDTH_STEP - a * (w0 + w1)
    c = p0 - a * w0**2 - b * w0
    if a > 0:
        root = (-b + math.sqrt(max(0.0, b * b - 4 * a * (c - target)))) / (2 * a)
    else:
        root = (target - c) / max(b, 1e-9)
    near = max(1, round(root / WIDTH_STEP))
    widths = [WIDTH_STEP * k for k in (near - 1, near, near + 1) if k >= 1]
    return min(widths, key=lambda w: abs(a * w * w + b * w + c - target))


def run_candidate(name: str, arch: str, tokenizer: str, args: list[str], out_dir: Path, prompt: str) -> dict:
    """Train one candidate in a child process; read back its summary, curve, peak memory and a sample."""
    log_path = out_dir / "logs" / f"{name}.log"
    rerun = [f"{a}-rerun" if i and args[i - 1] == "--out" else a for i, a in enumerate(args)]  # the row's folder is taken
    row = {"name": name, "arch": arch, "tokenizer": tokenizer, "command": shell_join(["lmforge", *rerun]),
           "run_dir": str(out_dir / name), "log": str(log_path)}
    with open(log_path, "w") as log_file:
        code, peak = run_child([sys.executable, "-m", "lmforge.cli", *args], log_file)
    row.update(returncode=code, peak_rss_bytes=peak)
    summary_path = out_dir / name / "summary.json"
    if code != 0 or not summary_path.exists():
        row["status"] = f"failed (exit {code}); see {log_path}"
        return row
    row["status"] = "ok"
    summary = json.loads(summary_path.read_text())
    val = summary["val"]
    row.update(params=summary["params"], steps=summary["steps"], tokens=summary["tokens"],
               train_time_s=summary["train_time_s"], tokens_per_s=summary["tokens_per_s"],
               val_bpb=val["bits_per_byte"], bpb_is_lower_bound=val["bits_per_byte_is_lower_bound"],
               unknown_rate=val["unknown_rate"])
    curve = [r for r in read_metrics(out_dir / name / "metrics.jsonl") if "val_bpb" in r]
    row["curve"] = [(r["train_time"], r["val_bpb"]) for r in curve]
    if curve:
        best = min(curve, key=lambda r: r["val_bpb"])
        row.update(time_to_best_s=best["train_time"], best_step=best["step"])
    row.update(candidate_sample(out_dir / name, prompt))
    return row


def run_child(argv: list[str], log_file) -> tuple[int, int | None]:
    """Run argv to completion; (exit status, the child's own peak resident memory in bytes or None)."""
    proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    if not hasattr(os, "wait4"):  # Windows: no per-child rusage
        return proc.wait(), None
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:  # the child got Ctrl-C too and saves its state; let it finish
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is reaped
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return proc.returncode, usage.ru_maxrss * scale


def candidate_sample(run_dir: Path, prompt: str) -> dict:
    """The same prompt, seed and temperature for every candidate; also FLOPs per token from the model."""
    from .api import load

    lm = load(run_dir)
    text = lm.generate(prompt, max_new_tokens=SAMPLE_TOKENS, temperature=SAMPLE_TEMPERATURE, seed=SAMPLE_SEED)
    fields = {k: v for k, v in lm.config["model"]["options"].items()
              if k in ("d_model", "d_hidden", "n_layers", "context_len")}
    return {"sample": prompt + text, "flops_per_token": lm.model.flops_per_token(), "model": fields}


def original_passage(documents: list[tuple[str, str]], prompt: str, n_chars: int) -> tuple[str, str] | None:
    """(document name, the text after the first whole-word occurrence of `prompt`), about n_chars long
    and cut at a word end; None when no document holds the prompt."""
    if not prompt.strip():
        return None
    pattern = re.compile(r"(?<!\w)" + re.escape(prompt) + r"(?!\w)")
    for name, text in documents:
        hit = pattern.search(text)
        if hit:
            rest = text[hit.end():hit.end() + n_chars + 1]
            cut = max(rest.rfind(" "), rest.rfind("\n"))
            return name, rest[:cut] if len(rest) > n_chars and cut > 0 else rest[:n_chars]
    return None


def validation_parts(config: RunConfig) -> list[tuple[str, str]]:
    """(name, validation text) of each document the config's data names, split as prepare splits it."""
    from .data.prepare import split_text
    from .data.sources import read_sources

    d = config.data
    documents = read_sources(d.sources, jsonl_field=d.jsonl_field, encoding=d.encoding, errors=d.errors)
    return [(doc.name, split_text(doc.text, d.val_fraction)[1]) for doc in documents]


def seed_phrase(documents: list[tuple[str, str]], prompt: str) -> str:
    """`prompt` if some validation document holds it, else three words from the validation text (a
    capitalised word and the two after it; else any three words, in any alphabet; else, in a script
    that does not space its words, such as Chinese, the first few letters of a run of them), so that a
    sample on any text has an original beside it."""
    if original_passage(documents, prompt, 1) is not None:
        return prompt
    for pattern, most in ((r"(?<![\w'])[A-Z][a-z]+ [a-z]+ [a-z]+\b", None),
                          (r"(?<![\w'])[^\W\d_]+ [^\W\d_]+ [^\W\d_]+(?![\w'])", None), (r"[^\W\d_]{2,}", 6)):
        for _, text in documents:
            hit = re.search(pattern, text)
            if hit:
                return hit.group()[:most]
    return prompt


def row_summary(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    mark = "≥ " if row["bpb_is_lower_bound"] else ""
    return (f"{row['params'] / 1e6:.2f}M params, {row['tokens_per_s']:,.0f} tokens/s, "
            f"val {mark}{row['val_bpb']:.3f} bits/byte, peak {_mib(row['peak_rss_bytes'])}")


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def _cell(text: str) -> str:
    """`text` for one cell of a Markdown table, shown as written: on one line, the characters Markdown
    reads as markup (pipes, backticks, emphasis, links, HTML) escaped, control characters (which a barely
    trained model's sample can hold, a NUL say) written as escapes."""
    text = re.sub(r"([\\`*_\[\]<>|~&])", r"\\\1", re.sub(r"\s+", " ", text).strip())
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


PROMPT_CHARS = 60  # of a long prompt shown in the report's text and samples (report.json keeps it whole)


def shortened(prompt: str) -> str:
    return prompt if len(prompt) <= PROMPT_CHARS else "…" + prompt[-(PROMPT_CHARS - 1):]


def shown_sample(sample: str, prompt: str) -> str:
    """A sample for the table: a long prompt's end only, so the model's own text shows, then cut to
    SAMPLE_CHARS."""
    if len(prompt) > PROMPT_CHARS and sample.startswith(prompt):
        sample = shortened(prompt) + sample[len(prompt):]
    return sample[:SAMPLE_CHARS] + ("…" if len(sample) > SAMPLE_CHARS else "")


def code_cell(text: str) -> str:
    """`text` as inline code in a Markdown table cell: fenced by more backticks than it holds in a row
    (so its own backticks stay), its pipes escaped (GitHub's tables read \\| as | in code too)."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def table_lines(report: dict) -> list[str]:
    """The report's table for a terminal: report.md's, without its rerun column (Markdown escapes in a
    command would not paste into a shell), then each row's rerun command as it runs."""
    rows = [line for line in render_markdown(report, rerun=False).splitlines() if line.startswith("|")]
    return [*rows, "", "rerun a row exactly:", *(f"  {r['command']}" for r in report["candidates"])]


def render_markdown(report: dict, rerun: bool = True) -> str:
    budget = [f"{report['budget_s']:g} s of training" if report["budget_s"] else None,
              f"at most {report['max_steps']} step{'s' if report['max_steps'] != 1 else ''}"
              if report["max_steps"] else None]
    lines = [
        "# Architecture comparison", "",
        f"Data: {', '.join(report['data'])} (last {report['val_fraction']:.0%} of each document validates). "
        f"Budget: {' and '.join(b for b in budget if b)} per candidate; sizes matched by {report['match']}; "
        f"seed {report['seed']}. Machine: {report.get('machine', 'not recorded')} (tokens/s compare only "
        f"within one machine).", "",
        "Validation bits per byte is scored on the whole validation split with the best checkpoint. "
        "**≥** marks a lower bound: that tokenizer maps unseen pieces to `<unk>`, whose spelling costs "
        "nothing, so the true cost is higher (the OOV column says how often). Samples continue "
        f"{shortened(report['prompt'])!r} at temperature {SAMPLE_TEMPERATURE}, seed {SAMPLE_SEED}. Peak memory is the "
        "training process's maximum resident set size. Time to best is training time (evaluation "
        "excluded) at the evaluation with the lowest validation loss. The rerun command repeats a row "
        "exactly, into a folder of its own (`<row>-rerun`).", "",
        "| candidate | params | train tokens/s | val bits/byte | OOV rate | time to best | peak memory | sample |"
        + (" rerun |" if rerun else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |" + (" --- |" if rerun else ""),
    ]
    for r in report["candidates"]:
        last = f" {code_cell(r['command'])} |" if rerun else ""
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | | | {_cell(r['status'])} | | | {_mib(r['peak_rss_bytes'])} | |{last}")
            continue
        mark = "≥ " if r["bpb_is_lower_bound"] else ""
        best = f"{r['time_to_best_s']:.3g} s" if "time_to_best_s" in r else "n/a"
        sample = shown_sample(r["sample"], report["prompt"])
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} | {mark}{r['val_bpb']:.3f} "
                     f"| {r['unknown_rate']:.2%} | {best} | {_mib(r['peak_rss_bytes'])} | {_cell(sample)} |{last}")
    original = report.get("original")
    if original:
        lines += ["", f"The original, from the validation text of {original['document']} (after its first "
                      f"{shortened(report['prompt'])!r}): {_cell(shown_sample(original['text'], report['prompt']))}"]
    lines += ["", "![validation bits per byte against training time](bpb_vs_time.png)", ""]
    return "\n".join(lines)


def plot_bpb_vs_time(rows: list[dict], out: Path) -> Path:
    """Each candidate's periodic validation estimate (the training loop's fixed windows) over training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if not r.get("curve"):
            continue
        times, bpb = zip(*r["curve"])
        label = r["name"] + (" (lower bound)" if r["bpb_is_lower_bound"] else "")
        ax.plot(times, bpb, marker="o", ms=3, lw=1.2, label=label, ls="--" if r["bpb_is_lower_bound"] else "-")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation bits per byte (periodic estimate)")
    ax.set_title("Validation bits per byte against training time")
    finite = [b for r in rows for _, b in r.get("curve", []) if math.isfinite(b)]
    if finite:  # the first evaluations of a fresh model can be far above the rest; keep the end in view
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 4 * min(finite)) * 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
