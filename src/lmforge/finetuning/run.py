"""Fine-tuning as a configuration of the one training loop: a base run's model and tokenizer, new text,
prompt -> completion pairs or labelled examples, and full, frozen or LoRA training.

In: a RunConfig with a [finetune] section (`finetune_config` builds one from a base run). Out: a Job
for training.loop.train, and afterwards the task's own figures. The run folder loads like any other
(`model.safetensors` holds plain weights, LoRA merged; adapter.safetensors and classifier.safetensors
sit beside it), and resumes like any other (`lmforge train --resume RUN`).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from functools import partial
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import DEFAULT_WEIGHT_DECAY, RunConfig, as_raw, is_number, merge, parse_duration, parse_overrides
from ..data import lm_batches, prepare_data
from ..data.prepare import unknown_examples
from ..data.sources import is_jsonl
from ..data.examples import (DEFAULT_TEMPLATE, classification_batches, collate_pairs, completion_batches,
                             count_targets, encode_pair, held_out, inputs_targets, pad, read_jsonl, render)
from ..device import seed_everything
from ..errors import LmforgeError
from ..models import build_model
from ..training.loop import Job
from ..training.step import ClassifyLoss, evaluate_loss, lm_loss
from .classify import Classifier, predict, scores
from .freeze import freeze
from .lora import adapter_state, apply_lora, merge_state

DEFAULT_LR = {"full": 1e-3, "freeze": 1e-3, "lora": 3e-3}
ADAPTER = "adapter.safetensors"
CLASSIFIER = "classifier.safetensors"


APPLIES_TO = {"freeze_layers": ("mode", "freeze"), "lora_rank": ("mode", "lora"), "lora_alpha": ("mode", "lora"),
              "lora_dropout": ("mode", "lora"), "lora_targets": ("mode", "lora"), "pooling": ("task", "classify"),
              "template": ("task", "completion")}


def finetune_config(base, data, *, task: str = "lm", mode: str = "full", max_time: float | None = None,
                    max_steps: int | None = None, lr: float | None = None, overrides: list[str] | None = None,
                    **options) -> RunConfig:
    """The base run's tokenizer and model with the new data, a fine-tuning budget (default one minute)
    and a [finetune] section (`options`: freeze_layers, lora_rank, lora_alpha, lora_dropout,
    lora_targets, pooling, template, from_scratch). `overrides` are train.* / data.* settings."""
    if not isinstance(base, (str, Path)):
        raise LmforgeError(f"the base run must be a run folder's path, got {base!r}")
    base = Path(base).expanduser()
    if max_steps is not None and (not is_number(max_steps, integer=True) or max_steps < 1):
        raise LmforgeError(f"max_steps must be a whole number >= 1, got {max_steps!r}")
    max_time = parse_duration(max_time)  # seconds, or a duration such as "5m"
    if max_time is not None and not max_time >= 0:
        raise LmforgeError(f"max_time must be a duration, e.g. 90 (seconds) or '5m', got {max_time!r}")
    if isinstance(data, (str, Path)):
        data = [data]
    if not isinstance(data, (list, tuple)) or not data or not all(isinstance(d, (str, Path)) for d in data):
        raise LmforgeError(f"data must be a path, or a list of paths and gutenberg:IDs, got {data!r}")
    if overrides is not None and (isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides)):
        raise LmforgeError("overrides must be a list of 'section.key=value' strings, e.g. ['train.seed=1']")
    if options.get("from_scratch") and mode != "full":
        raise LmforgeError(f"--from-scratch trains every weight from random ones (the control for a full fine-tune); "
                           f"drop it, or use --mode full instead of --mode {mode}")
    for name, (field, wanted) in APPLIES_TO.items():  # an option for another mode or task: refused, not ignored
        if options.get(name) is not None and {"mode": mode, "task": task}[field] != wanted:
            flag = "--" + name.replace("_", "-")
            raise LmforgeError(f"{flag} applies to --{field} {wanted} only; drop it, or fine-tune with --{field} "
                               f"{wanted}")
    stored = ckpt.read_config(Path(base))
    raw = {k: json.loads(json.dumps(stored[k])) for k in ("data", "tokenizer", "train")}
    raw["model"] = {"arch": stored["model"]["arch"], "options": stored["model"]["options"]}
    raw["data"]["sources"] = [str(s) for s in data]
    if max_time is None and max_steps is None:
        max_time = 60.0
    ft = {"base": str(Path(base).resolve()), "task": task, "mode": mode,
          **{k: v for k, v in options.items() if v is not None}}
    if task == "completion":
        ft.setdefault("template", DEFAULT_TEMPLATE)
    if task == "classify" and len(raw["data"]["sources"]) == 1:  # (more sources are refused with the data)
        ft["labels"] = sorted({r["label"] for r in read_jsonl(raw["data"]["sources"][0], ("text", "label"))})
    raw["finetune"] = ft
    train = raw["train"]
    # weight decay pulls weights towards zero, not towards the base's: fine-tuning keeps the light default
    # whatever the base was pretrained with (--set train.weight_decay=... to change it), and moves the
    # embeddings no faster than the rest; a fine-tune is short, so its warm-up is at most 20 steps
    warmup = 20 if train.get("warmup_steps") is None else min(train["warmup_steps"], 20)
    train.update(max_time=max_time or 0, max_steps=max_steps, lr=DEFAULT_LR.get(mode, 1e-3) if lr is None else lr,
                 warmup_steps=warmup, keep_best=True, weight_decay=DEFAULT_WEIGHT_DECAY,
                 embedding_lr_scale=1.0,
                 # where and how the base ran is this machine's to decide again (--device, --set train.threads=N)
                 device="auto", threads=None)
    if max_steps is not None and max_time is None:
        train["eval_interval"] = min(train["eval_interval"], max(1, max_steps // 4))
    extra = parse_overrides(overrides or [], sections=("train", "data"), what="--set")
    return RunConfig.from_dict(merge(raw, as_raw(extra)), "fine-tuning config")


def finetune_job(config: RunConfig, tokenizer=None, resume: bool = False, log=print) -> Job:
    """The Job of a fine-tuning run. `tokenizer`: the run's own (resuming), else the base's. When
    resuming, the weights come from the run's resume point, so the base is not read."""
    ft = config.finetune
    base = Path(ft.base)
    if tokenizer is None:  # the base's, checked as loading the base would check it
        ckpt.check_manifest(base)
        tokenizer = ckpt.run_tokenizer(base, ckpt.read_config(base))
    seed_everything(config.train.seed)
    lm = build_model(config.model.arch, **config.model.options)
    if not resume and not ft.from_scratch:
        ckpt.load_weights(lm, base_weights(base), base / ckpt.WEIGHTS, f"the config.json of {base}")
    context_len = lm.config.context_len
    t = config.train
    if ft.task == "lm":
        prepared = prepare_data(config, tokenizer)
        report_unknown(prepared.unknown, tokenizer, log)
        batches = lm_batches(prepared, context_len, t.batch_size, t.seed, t.eval_batches, t.sampling)
        data_key = prepared.text_digest
    else:
        batches = (completion_data if ft.task == "completion" else classification_data)(config, tokenizer,
                                                                                          context_len, log)
        data_key = hashlib.sha256(Path(_one_jsonl(config)).read_bytes()).hexdigest()[:32]
    adapt(lm, ft)
    weights = partial(weight_files, ft=ft)
    if ft.task != "classify":
        return Job(lm, tokenizer, batches, weights=weights, data_key=data_key)
    model = Classifier(lm, len(ft.labels), tokenizer.eos_id, ft.pooling)
    return Job(model, tokenizer, batches, ClassifyLoss(), weights=weights, data_key=data_key)


def base_weights(base: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_tensors(base / ckpt.WEIGHTS)


def adapt(model, ft) -> None:
    """Freeze layers or add LoRA adapters, as the [finetune] section says."""
    if ft.mode == "freeze":
        freeze(model, model.config.n_layers // 2 if ft.freeze_layers is None else ft.freeze_layers)
    elif ft.mode == "lora":
        apply_lora(model, _lora_targets(model, ft), ft.lora_rank, ft.lora_alpha, ft.lora_dropout)


def _lora_targets(model, ft) -> list[str] | None:
    """The layers LoRA adapts: those asked for (None: the family's own), leaving out the next-token
    output layer (lm_head) for a classifier, which never uses it: an adapter there would take no
    gradient (and an LSTM's or GRU's only target is that layer)."""
    if ft.task != "classify":
        return ft.lora_targets
    asked = list(ft.lora_targets or model.lora_targets)
    kept = [t for t in asked if t.rsplit(".", 1)[-1] != "lm_head"]
    if ft.lora_targets and len(kept) < len(asked):
        raise LmforgeError("a classifier does not use lm_head (the next-token output layer); drop it from "
                           "--lora-targets")
    if not kept:
        raise LmforgeError(f"LoRA on this {model.arch} model adapts only its output layer (lm_head), which a "
                           f"classifier does not use; fine-tune it with --mode freeze or --mode full")
    return kept


def weight_files(state: dict[str, torch.Tensor], ft) -> dict[str, dict[str, torch.Tensor]]:
    """model.safetensors loadable by the plain model (LoRA merged into it); the adapter and the
    classifier head in files of their own. `state` is the trained module's (a Classifier's: lm.*,
    classifier.*)."""
    files = {}
    if ft.task == "classify":
        files[CLASSIFIER] = {k.removeprefix("classifier."): v for k, v in state.items() if k.startswith("classifier.")}
        state = {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}
    if ft.mode == "lora":
        files[ADAPTER] = adapter_state(state)
        state = merge_state(state, ft.lora_alpha / ft.lora_rank)
    files[ckpt.WEIGHTS] = state
    return files


def report_unknown(unknown: dict, tokenizer, log) -> dict:
    """Log what the base tokenizer cannot represent in the new data (the top pieces); return it."""
    if unknown:
        log(f"note: the base {tokenizer.kind} tokenizer cannot represent {sum(unknown.values())} piece(s) of the "
            f"new data ({unknown_examples(unknown)}); they are encoded as <unk>")
    return dict(list(unknown.items())[:50])


def _one_jsonl(config: RunConfig) -> str:
    sources = config.data.sources
    if len(sources) != 1:
        raise LmforgeError(f"--task {config.finetune.task} takes one .jsonl file as --data, got {len(sources)} sources")
    return sources[0]


def _validation_rows(rows: list[dict], path: str, what: str) -> list[dict]:
    """The rows that validate during training; none is an error before training starts (the run keeps
    its best weights by their score)."""
    val = [r for r in rows if r["split"] == "val"]
    if not val:
        raise LmforgeError(f"{path} has no validation {what}; give some rows \"split\": \"val\" (rows without "
                           f"a split are assigned train/val/test 80/10/10 by a hash of their text)")
    return val


def encode_pairs(tokenizer, template: str, rows: list[dict], context_len: int) -> tuple[list, int, int]:
    """Each row's encoded pair (ids, n_prompt); the completion bytes their targets cover; how many pairs
    were cut to fit the context (encode_pair), which are scored on what was kept."""
    encoded = [encode_pair(tokenizer, template, r["prompt"], r["completion"], context_len) for r in rows]
    scored = sum(len(r["completion"].encode("utf-8")) if n is None else n for (_, _, n), r in zip(encoded, rows))
    return [(ids, n_prompt) for ids, n_prompt, _ in encoded], scored, sum(n is not None for _, _, n in encoded)


def completion_data(config: RunConfig, tokenizer, context_len: int, log):
    template = config.finetune.template
    path = _one_jsonl(config)
    rows = read_jsonl(path, ("prompt", "completion"))
    train, _, cut = encode_pairs(tokenizer, template, [r for r in rows if r["split"] == "train"], context_len)
    val, val_bytes, val_cut = encode_pairs(tokenizer, template, _validation_rows(rows, path, "pairs"), context_len)
    if cut + val_cut:
        log(f"note: {cut + val_cut} of {len(train) + len(val)} train and validation pairs are longer than the "
            f"model's context ({context_len} tokens): cut to fit (the prompt's start, then the completion's end), "
            f"they are trained and scored on what is kept")
    pairs = {"train": train, "val": val}
    unknown = Counter()
    for r in rows:  # the template's own characters too: they are in every example
        unknown.update(tokenizer.unknown(render(template, r["prompt"]) + r["completion"]))
    report_unknown(dict(unknown.most_common()), tokenizer, log)
    t = config.train
    return completion_batches(pairs, val_bytes, tokenizer.eos_id, context_len, t.batch_size, t.seed)


def classification_data(config: RunConfig, tokenizer, context_len: int, log):
    path = _one_jsonl(config)
    rows = read_jsonl(path, ("text", "label"))
    labels = config.finetune.labels or []
    if len(labels) < 2:
        raise LmforgeError(f"{path} has {len(labels)} label(s); classification needs at least two")
    if {r["label"] for r in rows} != set(labels):
        raise LmforgeError(f"{path} no longer holds the labels this run was set up with ({', '.join(labels)}); "
                           "restore the file, or start a new fine-tuning run")
    index = {label: i for i, label in enumerate(labels)}
    split = {"train": [r for r in rows if r["split"] == "train"], "val": _validation_rows(rows, path, "examples")}
    trained = {r["label"] for r in split["train"]}
    if len(trained) < 2:
        held = f"only {', '.join(map(repr, sorted(trained)))}" if trained else "no rows"
        raise LmforgeError(f"the training rows of {path} hold {held}; classification learns from at least two "
                           f"labels: give rows of each label \"split\": \"train\" (rows without a split are assigned "
                           f"train/val/test 80/10/10 by a hash of their text)")
    if trained != set(labels):
        log(f"note: no training row has the label(s) {', '.join(repr(x) for x in labels if x not in trained)}; "
            f"the classifier cannot learn to predict them")
    encoded = {s: [(tokenizer.encode(r["text"]), index[r["label"]]) for r in split[s]] for s in ("train", "val")}
    cut = sum(len(ids) > context_len for s in encoded.values() for ids, _ in s)
    if cut:
        log(f"note: {cut} of {sum(map(len, encoded.values()))} train and validation texts are longer than the "
            f"model's context ({context_len} tokens): the classifier reads the first {context_len} tokens of each "
            f"(as `lmforge classify` does)")
    examples = {s: [(ids[:context_len], label) for ids, label in rows] for s, rows in encoded.items()}
    empty = sum(not ids for s in examples.values() for ids, _ in s)
    if empty:  # stop words alone, with tokenizer.remove_stopwords: nothing to read
        raise LmforgeError(f"{empty} text(s) of {path} are empty after tokenizing; give each row words the "
                           f"tokenizer keeps")
    unknown = Counter()
    for r in rows:
        unknown.update(tokenizer.unknown(r["text"]))
    report_unknown(dict(unknown.most_common()), tokenizer, log)
    return classification_batches(examples, tokenizer.eos_id, config.train.batch_size, config.train.seed)


TASK_FIELDS = {"classify": ("text", "label"), "completion": ("prompt", "completion")}


def finetune_results(lm, data=None, log=print) -> dict:
    """The task's own figures for the run summary: classify, accuracy and macro-F1 on the held-out
    rows; lm, bits per byte on the new data's validation split; completion, bits per byte of the
    held-out completions. With `data` (a .jsonl of the task's rows), on every row of it instead."""
    task = lm.config["finetune"]["task"]
    if task == "lm":
        val = lm.evaluate()
        log(f"validation: {val['bits_per_byte']:.4f} bits per byte")
        return {"val": val, "val_bits_per_byte": val["bits_per_byte"]}
    where = "held-out" if data is None else str(data)
    if task == "classify":
        result = evaluate_classifier(lm, data)
        examples = "example" if result["n"] == 1 else "examples"
        log(f"{where} ({result['n']} {examples}): accuracy {result['accuracy']:.1%}, macro-F1 {result['macro_f1']:.3f}")
        return result
    result = evaluate_completions(lm, data)
    pairs = "pair" if result["n"] == 1 else "pairs"
    log(f"{where} ({result['n']} {pairs}): {result['completion_bits_per_byte']:.4f} bits per completion byte")
    return result


def holds_task_rows(path, task: str) -> bool:
    """Whether `path` is a .jsonl with a row holding `task`'s fields (then `eval --text` scores the task,
    and the reader names any row that lacks them, or bytes that are not UTF-8)."""
    path = Path(path).expanduser()
    if task not in TASK_FIELDS or not is_jsonl(path) or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as file:
            for line in file:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and all(f in row for f in TASK_FIELDS[task]):
                    return True
    except OSError:
        pass  # the reader names the problem
    return False


def _task_rows(lm, data, fields: tuple[str, ...]) -> tuple[list[dict], str]:
    """The rows to score, and their file: the held-out rows of the run's own data, or every row of `data`."""
    if data is None:
        source = lm.config["data"]["sources"][0]
        rows = held_out(read_jsonl(source, fields))
        if not rows:
            raise LmforgeError(f"{source} has no held-out rows to score; give some rows \"split\": \"val\"")
        return rows, source
    rows = read_jsonl(data, fields, training=False, option="--text")
    if not rows:
        raise LmforgeError(f"{data} has no rows to score; give one JSON object per line with "
                           f"{', '.join(map(repr, fields))}")
    return rows, str(data)


def evaluate_completions(lm, data=None, batch_size: int = 16) -> dict:
    """Bits per byte of the held-out completions (the test split, else val) given their prompts in the
    run's template, or of every pair in `data`: how well the run writes what follows each prompt, scored
    as the loop scores its validation pairs (end-of-text included, over the completions' UTF-8 bytes)."""
    ft = lm.config["finetune"]
    rows, _ = _task_rows(lm, data, ("prompt", "completion"))
    encoded, completion_bytes, _ = encode_pairs(lm.tokenizer, ft["template"], rows, lm.model.config.context_len)
    pairs = [inputs_targets(*e) for e in encoded]
    batches = [collate_pairs(pairs[i:i + batch_size], lm.tokenizer.eos_id) for i in range(0, len(pairs), batch_size)]
    loss = evaluate_loss(lm.model, batches, lm_loss, lm.device, torch.float32)  # per target
    targets = count_targets(pairs)
    return {"completion_bits_per_byte": loss * targets / max(1, completion_bytes) / math.log(2), "n": len(rows),
            "tokens": targets, "bytes": completion_bytes}


def load_classifier(lm) -> Classifier:
    """The classification model of a loaded classification run (its head from classifier.safetensors)."""
    ft = lm.config.get("finetune") or {}
    if ft.get("task") != "classify":
        raise LmforgeError(f"{lm.run_dir} is not a classification run; fine-tune one with --task classify")
    model = Classifier(lm.model, len(ft["labels"]), lm.tokenizer.eos_id, ft["pooling"])
    path = Path(lm.run_dir) / CLASSIFIER
    ckpt.load_weights(model.classifier, ckpt.load_tensors(path), path, "the run's labels and model")
    return model.to(lm.device).eval()


@torch.no_grad()
def class_probabilities(lm, texts: list[str], batch_size: int = 32) -> list[dict[str, float]]:
    """Each text's probability for every label of a classification run (the first context_len tokens
    of a text, as in training and evaluation)."""
    model = load_classifier(lm)
    labels = lm.config["finetune"]["labels"]
    ids = [lm.tokenizer.encode(t)[:model.config.context_len] for t in texts]
    if not all(ids):
        raise LmforgeError(f"text {next(i for i, x in enumerate(ids, 1) if not x)} is empty after tokenizing; "
                           "classify texts with at least one token")
    out = []
    for i in range(0, len(ids), batch_size):
        x = pad(ids[i:i + batch_size], lm.tokenizer.eos_id).to(lm.device)
        out += torch.softmax(model(x).float(), -1).tolist()
    return [dict(zip(labels, p)) for p in out]


def evaluate_classifier(lm, data=None) -> dict:
    """Accuracy and macro-F1 of a classification run on the held-out rows of its data, or on every row
    of `data`, a .jsonl of labelled texts."""
    model = load_classifier(lm)
    labels = lm.config["finetune"]["labels"]
    index = {label: i for i, label in enumerate(labels)}
    rows, source = _task_rows(lm, data, ("text", "label"))
    strange = sorted({r["label"] for r in rows} - set(index))
    if strange:
        raise LmforgeError(f"{source}: label(s) {', '.join(map(repr, strange[:5]))} are not among the run's "
                           f"labels ({', '.join(map(repr, labels))}); the classifier cannot predict them: remove "
                           f"those rows, or fine-tune with them")
    context_len = model.config.context_len
    predicted = predict(model, [lm.tokenizer.encode(r["text"])[:context_len] for r in rows], lm.tokenizer.eos_id)
    return scores([index[r["label"]] for r in rows], predicted)
