"""`lmforge eval RUN --report DIR`: likelihood, n-gram and compressor baselines, and the continuation
test, written as report.md, report.json and PNG plots.

In: a loaded LanguageModel (and optionally a text file). Out: the report dict, also saved as report.json.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import LmforgeError
from . import continuation as cont
from .baselines import COMPRESSORS, KneserNeyModel, UnigramModel, compressor_bits_per_byte
from .copying import CopyIndex
from .likelihood import Score, evaluate_text, percent

FORMAT_VERSION = 1
KN_ORDER = 5
SAMPLES_SHOWN = 5
PLOTS = ("per_document_bpb.png", "baselines.png")
COLORS = ("C3", "C0", "0.6")  # model, Kneser-Ney, unigram: the model stands out in every plot
SYSTEMS = {"model": "model", "kn5": f"Kneser-Ney {KN_ORDER}-gram (bytes)", "unigram": "unigram (bytes)"}
COMPRESSOR_LABELS = {"gzip": "gzip -9", "bzip2": "bzip2 -9", "xz": "xz -9e", "ppmd": "PPMd (order 8)"}
DEFINITIONS = [
    ("bits per byte", "total cross-entropy of the text in bits divided by its UTF-8 bytes: comparable across "
                      "tokenizers, models and compressors; lower is better."),
    ("perplexity per token", "exp(mean cross-entropy per token in nats): depends on the tokenizer, so compare "
                             "it only between runs with the same tokenizer."),
    ("top-1 / top-5 accuracy", "how often the true next token is the model's most likely token / among its five "
                               "most likely."),
    ("OOV rate", "share of tokens that are `<unk>` (word and char tokenizers); an `<unk>` costs nothing for "
                 "its spelling, so bits per byte is then a lower bound."),
    ("compressor bits per byte", "(compressed(train + text) - compressed(train)) x 8 / bytes(text): what a "
                                 "compressor that has read the training text spends on the new text."),
    ("chrF", "character 6-gram F-score (beta 2) of generations against the original continuations, 0-100 "
             "(sacrebleu)."),
    ("BLEU", "word 4-gram precision with a brevity penalty against the originals, 0-100 (sacrebleu, 13a)."),
    ("bits/byte on original", "what the system pays to predict the author's actual continuation given the "
                              "prompt."),
    ("distinct-n", "unique word n-grams / all word n-grams, pooled over the generations; low means repetitive."),
    ("repetition", f"share of a generation's word {cont.REPETITION_N}-grams that already occurred earlier in "
                   "it, averaged over generations."),
    ("copy rate", f"share of generations whose longest span found verbatim in the training text is at least "
                  f"{cont.COPY_THRESHOLD} characters (memorisation)."),
]


def write_report(lm, out_dir: Path, text_path=None, n_prompts: int = 100, seed: int = 0, *,
                 progress: bool = True, log=print, encoding: str = "utf-8", errors: str = "strict",
                 jsonl_field: str = "text") -> dict:
    """Evaluate `lm` on its validation split (or on `text_path`: a file, folder, glob, JSONL or
    gutenberg:ID, read as `lmforge eval --text` reads it) and write out_dir/report.md, report.json
    and the PNG plots; returns the report dict.

    Fails with LmforgeError if the text is missing, undecodable, or too short for `n_prompts` prompts.
    """
    started, timing = time.perf_counter(), {}
    _check_out_dir(Path(out_dir))
    documents, train_text = _read_split(lm, text_path, {"encoding": encoding, "errors": errors,
                                                        "jsonl_field": jsonl_field})
    train_bytes = train_text.encode("utf-8")
    text_bytes = "".join(text for _, text in documents).encode("utf-8")
    prompts = cont.make_prompts(documents, n_prompts, seed)  # fails early if the text is too short

    tick = time.perf_counter()
    likelihood = _likelihood(lm, documents, progress)
    timing["likelihood"] = time.perf_counter() - tick

    tick = time.perf_counter()
    baselines, baseline_section = _baselines(train_bytes, documents, text_bytes, progress)
    timing["baselines"] = time.perf_counter() - tick

    tick = time.perf_counter()
    continuation = _continuation(lm, baselines, prompts, train_text, seed, progress)
    timing["continuation"] = time.perf_counter() - tick
    timing["total"] = time.perf_counter() - started

    report = {
        "format_version": FORMAT_VERSION,
        "run": str(lm.run_dir) if lm.run_dir else None,
        "model": {"arch": lm.config["model"]["arch"], "parameters": lm.num_params,
                  "tokenizer": lm.tokenizer.kind, "vocab_size": lm.tokenizer.vocab_size},
        "text": {"source": str(text_path) if text_path else "validation split",
                 "documents": [name for name, _ in documents], "bytes": len(text_bytes),
                 "train_bytes": len(train_bytes)},
        "likelihood": likelihood,
        "baselines": baseline_section,
        "continuation": continuation,
        "timing_s": timing,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    plot_report(report, out_dir)
    _write_text(out_dir / "report.md", render_markdown(report))
    for line in summary_lines(report):
        log(line)
    log(f"report: {out_dir / 'report.md'}")
    return report


# ---- inputs -------------------------------------------------------------------------------------

REPORT_FILES = ("report.json", "report.md", *PLOTS)


def _check_out_dir(out_dir: Path) -> None:
    """A report goes into a new folder, or over an earlier report: never over files of the same names
    that lmforge did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LmforgeError(f"--report {out_dir} is a file; give a folder for the report")
    taken = [name for name in REPORT_FILES if (out_dir / name).exists()]
    if not taken:
        return
    try:
        earlier = json.loads((out_dir / "report.json").read_bytes())
    except (OSError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and "format_version" in earlier and "likelihood" in earlier):
        raise LmforgeError(f"{out_dir} holds {', '.join(taken)}, not an earlier lmforge report; the report would "
                           f"replace them: give another folder (nothing was written)")


def _read_split(lm, text_path, options: dict) -> tuple[list[tuple[str, str]], str]:
    """([(name, text to evaluate)], training text): the run's validation documents from its prepared
    data, or the documents of `text_path` (read with `options`); the training text is what the
    baselines fit and what copying is checked against."""
    from ..data import read_sources

    documents = None if text_path is None else read_sources([text_path], **options)  # bad text fails first
    prepared = lm.prepared_data()
    if documents is None:
        return _distinct(lm.validation_documents()), prepared.train_text  # a classify run's refusal, in words
    return _distinct([(d.name, d.text) for d in documents]), prepared.train_text  # named as `lmforge eval` names them


def _distinct(documents: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every document under a name of its own (the tables and baselines are keyed by name)."""
    seen, out = Counter(), []
    for name, text in documents:
        seen[name] += 1
        out.append((name if seen[name] == 1 else f"{name} ({seen[name]})", text))
    return out


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- sections -----------------------------------------------------------------------------------

def _likelihood(lm, documents, progress: bool) -> dict:
    """The fields of `lmforge eval` (overall pools all bytes), plus the most common unknown pieces."""
    total, per_doc, unknown = Score(), {}, Counter()
    for name, text in tqdm(documents, desc="likelihood", unit="doc", disable=not progress, dynamic_ncols=True):
        score = evaluate_text(lm.model, lm.tokenizer, text, device=lm.device)
        per_doc[name] = score.summary()
        total += score
        if score.unknown:
            unknown.update(lm.tokenizer.unknown(text))
    return {**total.summary(), "documents": per_doc, "top_unknown": unknown.most_common(10)}


def _bits_per_byte(nats: float, n_bytes: int) -> float:
    return nats / max(n_bytes, 1) / math.log(2)


def _baselines(train_bytes: bytes, documents, text_bytes: bytes, progress: bool):
    """Byte-level unigram and Kneser-Ney models fitted on the train split, and the compressors."""
    ids = np.frombuffer(train_bytes, dtype=np.uint8).astype(np.int64)
    steps = tqdm(total=2 + len(COMPRESSORS), desc="baselines", unit="step", disable=not progress,
                 dynamic_ncols=True)
    models = {"unigram": UnigramModel(256).fit(ids)}
    steps.update(1)
    models["kn5"] = KneserNeyModel(256, order=KN_ORDER).fit(ids)
    steps.update(1)
    section = {}
    for key, baseline in models.items():
        docs = {}
        for name, text in documents:
            data = text.encode("utf-8")
            docs[name] = _bits_per_byte(-cont.byte_logprobs(baseline, data).sum(), len(data))
        pooled = sum(docs[n] * len(t.encode("utf-8")) for n, t in documents) / len(text_bytes)
        section[key] = {"bits_per_byte": pooled, "documents": docs}
    section["compressors"] = {}
    for method in COMPRESSORS:
        section["compressors"][method] = compressor_bits_per_byte(train_bytes, text_bytes, method)
        steps.update(1)
    steps.close()
    return models, section


def _continuation(lm, baselines, prompts, train_text: str, seed: int, progress: bool) -> dict:
    """Generate with the model and each baseline from the same prompts, and score all of them."""
    texts, nats = {}, {}
    texts["model"], nats["model"] = cont.model_continuations(lm, prompts, seed, progress)
    for key in ("kn5", "unigram"):
        texts[key], nats[key] = cont.baseline_continuations(baselines[key], prompts, seed, key, progress)
    index = CopyIndex(train_text)
    systems = {key: cont.continuation_metrics(texts[key], prompts, index, nats[key]) for key in texts}
    systems["original"] = cont.continuation_metrics([p.original for p in prompts], prompts, index)
    samples = [{"document": p.document, "offset": p.offset, "prompt": p.prompt, "original": p.original,
                "seed": cont.sample_seed(seed, i),  # `lmforge generate --seed` writes the model's text again
                **{key: texts[key][i] for key in texts}} for i, p in enumerate(prompts)]
    return {
        "settings": {"prompts": len(prompts), "prompt_chars": cont.PROMPT_CHARS,
                     "continuation_chars": cont.CONTINUATION_CHARS, "temperature": cont.TEMPERATURE,
                     "top_k": cont.TOP_K, "seed": seed, "copy_threshold": cont.COPY_THRESHOLD,
                     "repetition_n": cont.REPETITION_N},
        "systems": systems,
        "samples": samples,
    }


# ---- output -------------------------------------------------------------------------------------

def _bpb_rows(report: dict) -> list[tuple[str, float]]:
    """(label, bits per byte) for the model and every baseline, best first."""
    base = report["baselines"]
    rows = [("model", report["likelihood"]["bits_per_byte"])]
    rows += [(SYSTEMS[key], base[key]["bits_per_byte"]) for key in ("kn5", "unigram")]
    rows += [(COMPRESSOR_LABELS[m], v) for m, v in base["compressors"].items()]
    return sorted(rows, key=lambda row: row[1])


def summary_lines(report: dict) -> list[str]:
    """The short table printed after a report is written."""
    lik, systems = report["likelihood"], report["continuation"]["systems"]
    lines = [f"{'':<32} {'bits/byte':>9} {'chrF':>6} {'copy≥' + str(cont.COPY_THRESHOLD):>8}"]
    for label, value in _bpb_rows(report):
        key = next((k for k, v in SYSTEMS.items() if v == label), None)
        extra = (f"{systems[key]['chrf']:>6.1f} {systems[key]['copy_rate']:>8.0%}" if key else f"{'':>6} {'':>8}")
        flag = " (lower bound)" if label == "model" and lik["bits_per_byte_is_lower_bound"] else ""
        lines.append(f"{label:<32} {value:>9.3f} {extra}{flag}")
    return lines


def _cell(text: str, limit: int | None = None) -> str:
    """A markdown table cell: line breaks shown as spaces, pipes escaped."""
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        text = text[:limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render_markdown(report: dict) -> str:
    lik, base, con = report["likelihood"], report["baselines"], report["continuation"]
    model, text, settings = report["model"], report["text"], con["settings"]
    word_like = lik["bits_per_byte_is_lower_bound"]
    ppmd = base["compressors"]["ppmd"]
    bpb = lik["bits_per_byte"]
    where = "the run's validation split" if text["source"] == "validation split" else f"`{text['source']}`"
    out = [
        "# lmforge evaluation report", "",
        f"Run `{report['run']}`: {model['arch']}, {model['parameters']:,} parameters, {model['tokenizer']} "
        f"tokenizer (vocabulary {model['vocab_size']:,}). Evaluated on {where}: {len(text['documents'])} "
        f"document(s), {text['bytes']:,} bytes; baselines fitted on the {text['train_bytes']:,}-byte train split. "
        f"Took {report['timing_s']['total']:.0f} s.", "",
        f"**Headline: {bpb:.3f} bits per byte{' (a lower bound, see below)' if word_like else ''}**, "
        f"against {ppmd:.3f} for PPMd order 8 and {base['kn5']['bits_per_byte']:.3f} for a byte-level "
        f"Kneser-Ney {KN_ORDER}-gram: the model is {'better' if bpb < ppmd else 'worse'} than PPMd by "
        f"{abs(bpb - ppmd):.3f} bits per byte ({abs(bpb - ppmd) / ppmd:.0%}).", "",
        "## 1. Likelihood", "",
        "| text | bits/byte | perplexity/token | top-1 | top-5 | OOV rate | tokens | bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in [("**all**", lik)] + list(lik["documents"].items()):
        out.append(f"| {name} | {r['bits_per_byte']:.4f} | {r['perplexity']:.2f} | {r['accuracy']:.1%} | "
                   f"{r['top5_accuracy']:.1%} | {r['unknown_rate']:.2%} | {r['tokens']:,} | {r['bytes']:,} |")
    if lik.get("stop_words_removed"):
        out += ["", "**Bits per byte is a lower bound, not comparable with other runs:** this run's tokenizer "
                    "removes stop words, which the model never predicts and which cost nothing here."]
    if lik.get("lowercased"):
        out += ["", "**Bits per byte is a lower bound, not comparable with other runs:** this run's tokenizer "
                    "lowercases the text, so the model never pays for capital letters."]
    if lik["unknown_rate"]:
        pieces = ", ".join(f"`{w}` ×{n}" for w, n in lik["top_unknown"])
        out += ["", f"**Bits per byte is a lower bound:** {percent(lik['unknown_rate'])} of tokens are `<unk>`, and "
                    f"an `<unk>` pays nothing for the spelling of the word it stands for. Most common unknown "
                    f"pieces: {pieces}."]
    out += ["", "## 2. Baselines on the same text", "",
            "Lower is better. The n-gram models read UTF-8 bytes (vocabulary 256) and are fitted on the run's "
            "train split; each compressor is charged (compressed(train + text) − compressed(train)) × 8 / bytes.",
            "", "| predictor | bits/byte |", "|---|---:|"]
    out += [f"| {'**model**' if label == 'model' else label} | {value:.3f} |" for label, value in _bpb_rows(report)]
    out += ["", "| text | model | " + " | ".join(SYSTEMS[k] for k in ("kn5", "unigram")) + " |", "|---|---:|---:|---:|"]
    for name, r in lik["documents"].items():
        out.append(f"| {name} | {r['bits_per_byte']:.3f} | {base['kn5']['documents'][name]:.3f} | "
                   f"{base['unigram']['documents'][name]:.3f} |")
    out += ["", "![bits per byte per document](per_document_bpb.png)", "",
            "![model against baselines](baselines.png)", "",
            "## 3. Continuation test", "",
            f"{settings['prompts']} prompts start at sentence starts spread evenly over the text (seed "
            f"{settings['seed']}). A prompt is the sentence start plus up to {settings['prompt_chars']} characters, "
            f"cut at the end of a word; the original continuation is the next up to "
            f"{settings['continuation_chars']} characters, cut at a word end. Each system continues the prompt "
            f"and its text is trimmed to the original's length in characters. The model samples at temperature "
            f"{settings['temperature']} with top-k {settings['top_k']}; the byte n-gram baselines sample at "
            f"temperature {settings['temperature']} from their full distribution. The *original* row scores the "
            f"author's own continuations with the reference-free metrics, for scale.", "",
            "| system | chrF | BLEU | bits/byte on original | distinct-1 | distinct-2 | distinct-3 | repetition | "
            f"copy ≥{settings['copy_threshold']} chars | mean longest copy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in list(SYSTEMS.items()) + [("original", "original (the author)")]:
        s = con["systems"][key]
        out.append(f"| {label} | {_fmt(s['chrf'], '.1f')} | {_fmt(s['bleu'], '.2f')} | "
                   f"{_fmt(s['bits_per_byte'], '.3f')} | {s['distinct_1']:.3f} | {s['distinct_2']:.3f} | "
                   f"{s['distinct_3']:.3f} | {s['repetition_rate']:.3f} | {s['copy_rate']:.0%} | "
                   f"{s['mean_longest_copy']:.1f} |")
    out += ["", "## 4. Samples", "", "Line breaks are shown as spaces. All samples are in report.json.", "",
            "| prompt | original | generated (model) |", "|---|---|---|"]
    samples = con["samples"]
    for i in np.linspace(0, len(samples) - 1, min(SAMPLES_SHOWN, len(samples))).round().astype(int):
        s = samples[i]
        out.append(f"| {_cell(s['prompt'])} | {_cell(s['original'])} | {_cell(s['model'])} |")
    out += ["", "## 5. Definitions", ""] + [f"- **{name}**: {text}" for name, text in DEFINITIONS]
    return "\n".join(out) + "\n"


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    """per_document_bpb.png (model and n-gram baselines per document) and baselines.png (bits per byte
    and chrF of the model against every baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lik, base, systems = report["likelihood"], report["baselines"], report["continuation"]["systems"]
    names = list(lik["documents"])
    keys = ["model", "kn5", "unigram"]
    values = {"model": [lik["documents"][n]["bits_per_byte"] for n in names],
              **{k: [base[k]["documents"][n] for n in names] for k in ("kn5", "unigram")}}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(names) + 3), 4.2))
    width = 0.8 / len(keys)
    x = np.arange(len(names))
    for j, (key, color) in enumerate(zip(keys, COLORS)):
        bars = ax.bar(x + (j - 1) * width, values[key], width, label=SYSTEMS[key], color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(base["compressors"]["ppmd"], color="k", ls="--", lw=1,
               label=f"PPMd order 8, all text ({base['compressors']['ppmd']:.3f})")
    ax.set_xticks(x, names)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("Bits per byte per document")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    ax.set_ylim(0, max(max(v) for v in values.values()) * 1.12)
    paths = [_save(fig, out_dir / PLOTS[0], plt)]

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    rows = _bpb_rows(report)
    by_label = dict(zip(["model"] + [SYSTEMS[k] for k in keys[1:]], COLORS))
    colors = [by_label.get(label, "0.82") for label, _ in rows]  # compressors in light grey
    bars = left.barh([label for label, _ in rows][::-1], [v for _, v in rows][::-1], color=colors[::-1])
    left.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    left.set_xlabel("bits per byte on the evaluated text (lower is better)")
    left.set_xlim(0, max(v for _, v in rows) * 1.15)
    left.set_title("Likelihood against baselines")
    bars = right.bar([SYSTEMS[k].split(" (")[0] for k in keys], [systems[k]["chrf"] for k in keys], color=COLORS)
    right.bar_label(bars, fmt="%.1f", fontsize=8)
    right.set_ylabel("chrF against the original (higher is better)")
    right.set_title("Continuation test")
    right.tick_params(axis="x", labelsize=8)
    paths.append(_save(fig, out_dir / PLOTS[1], plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
