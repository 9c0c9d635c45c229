"""`finetune(base_run, data, ...)`: continue training a run on new text, prompt -> completion pairs or labelled
examples, in full, freeze or LoRA mode, through the one training loop. Out: a run folder that `lmforge.load`
reads (LoRA merged; adapter.safetensors, classifier.safetensors beside it; "finetune" in config.json)."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import RunConfig
from ..errors import LmforgeError
from ..tokenizers import load_tokenizer

MODES = ("full", "freeze", "lora")
TASKS = ("lm", "completion", "classify")
DEFAULT_LR = {"full": 1e-3, "freeze": 1e-3, "lora": 3e-3}
ADAPTER = "adapter.safetensors"
CLASSIFIER = "classifier.safetensors"


def base_run(base) -> tuple[dict, dict, object]:
    """(config, weights, tokenizer) of the base run; plain weights only (a classifier head is dropped)."""
    config = ckpt.read_config(Path(base))
    state = ckpt.load_tensors(Path(base) / ckpt.WEIGHTS)
    return config, state, load_tokenizer(base)


def finetune_config(base_config: dict, data, *, max_time=60.0, max_steps=None, lr=None, mode="full",
                    overrides: dict | None = None) -> RunConfig:
    """The base run's data/tokenizer/model/train sections with the new data and the new budget."""
    raw = {k: json.loads(json.dumps(base_config[k])) for k in ("data", "tokenizer", "train")}
    raw["model"] = {"arch": base_config["model"]["arch"], "options": base_config["model"]["options"]}
    raw["data"]["sources"] = [str(s) for s in ([data] if isinstance(data, (str, Path)) else data)]
    train = raw["train"]
    train.update(max_time=max_time, max_steps=max_steps, lr=lr or DEFAULT_LR[mode],
                 warmup_steps=min(train["warmup_steps"], 20), keep_best=True)
    if max_steps is not None and max_time is None:
        train["eval_interval"] = min(train["eval_interval"], max(1, max_steps // 4))
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    return RunConfig.from_dict(raw, "fine-tuning config")


def trainable_fn(mode: str, freeze_layers: int | None, lora: dict, after=None, record: dict | None = None):
    from .freeze import freeze
    from .lora import apply_lora

    if mode not in MODES:
        raise LmforgeError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}")

    def trainable(model):
        if mode == "freeze":
            n = model.config.n_layers // 2 if freeze_layers is None else freeze_layers
            freeze(model, n)
        elif mode == "lora":
            apply_lora(model, lora.get("targets"), lora.get("rank", 8), lora.get("alpha", 16.0),
                       lora.get("dropout", 0.0))
        if after is not None:
            after(model)
        if record is not None:
            record["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable


def finetune(base, data, out=None, *, mode: str = "full", task: str = "lm", freeze_layers: int | None = None,
             lora: dict | None = None, pooling: str = "mean", template: str | None = None,
             max_time: float | None = None, max_steps: int | None = None, lr: float | None = None,
             overrides: dict | None = None, log=print, prepared=None, scratch: bool = False):
    """Fine-tune the run `base` on `data`; returns (run_dir, summary dict). With scratch=True the base's
    weights are not loaded (the same architecture, tokenizer and budget from random init: the control)."""
    from ..data import prepare
    from ..training.loop import train

    if task not in TASKS:
        raise LmforgeError(f"unknown fine-tuning task {task!r}; choose one of {', '.join(TASKS)}")
    if mode not in MODES:
        raise LmforgeError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}")
    if max_time is None and max_steps is None:
        max_time = 60.0  # the default budget: one minute
    base_config, state, tokenizer = base_run(base)
    lora = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": None, **(lora or {})}
    config = finetune_config(base_config, data, max_time=max_time, max_steps=max_steps, lr=lr, mode=mode,
                             overrides=overrides)
    if out is None:
        out = Path("runs") / f"{Path(base).name}-{task}-{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    context_len = base_config["model"]["options"]["context_len"]
    record = {"base": str(base), "base_tokenizer": tokenizer.fingerprint(), "mode": mode, "task": task,
              "scratch": scratch}
    hooks = {}
    if task == "lm":
        d = config.data
        prepared = prepared or prepare(d.sources, tokenizer_obj=tokenizer, val_fraction=d.val_fraction,
                                       cache_dir=d.cache_dir, jsonl_field=d.jsonl_field, encoding=d.encoding,
                                       errors=d.errors)
        record["unknown"] = report_unknown(prepared.unknown, tokenizer, log)
    else:
        prepared, hooks, extra = task_data(task, config.data.sources, tokenizer, context_len, pooling, template, log)
        record.update(extra)
    after = hooks.pop("after", None)
    if mode == "freeze":
        record["freeze_layers"] = base_config["model"]["options"].get("n_layers", 0) // 2 \
            if freeze_layers is None else freeze_layers
    if mode == "lora":
        record["lora"] = lora
    result = train(config, out, log=log, init_weights=None if scratch else state, prepared=prepared,
                   trainable=trainable_fn(mode, freeze_layers, lora, after, record), **hooks)
    run_dir = Path(result.run_dir)
    split_weights(run_dir, mode, lora)
    data_config = ckpt.read_config(run_dir)
    data_config["finetune"] = record
    ckpt.write_json(run_dir / ckpt.CONFIG, data_config)
    summary = {"steps": result.steps, "tokens": result.tokens, "train_time_s": result.train_time,
               "best_val_bpb": result.best_val_bpb, "trainable_params": record.get("trainable_params"),
               **evaluate_run(run_dir, task, log)}
    ckpt.write_json(run_dir / "summary.json", summary)
    return run_dir, summary


def report_unknown(unknown: dict, tokenizer, log) -> dict:
    """Log what the base tokenizer cannot represent in the new data (the top pieces); return it."""
    if unknown:
        total = sum(unknown.values())
        top = ", ".join(f"{k!r}×{v}" for k, v in list(unknown.items())[:10])
        log(f"note: the base {tokenizer.kind} tokenizer cannot represent {total} piece(s) of the new data "
            f"({len(unknown)} distinct: {top}); they are encoded as <unk>")
    return dict(list(unknown.items())[:50])


def task_data(task, sources, tokenizer, context_len, pooling, template, log):
    """A minimal prepared stand-in (tokenizer, token counts) plus the loop hooks for a labelled task."""
    from types import SimpleNamespace

    from . import classify, completion
    from .examples import read_jsonl

    if len(sources) != 1:
        raise LmforgeError(f"--task {task} takes one .jsonl file as --data, got {len(sources)} sources")
    unknown = Counter()
    if task == "completion":
        template = template or completion.DEFAULT_TEMPLATE
        completion.render(template, "")
        rows = read_jsonl(sources[0], ("prompt", "completion"))
        examples = {s: [completion.encode_pair(tokenizer, template, r["prompt"], r["completion"], context_len)
                        for r in rows if r["split"] == s] for s in ("train", "val")}
        examples["val_bytes"] = sum(len(r["completion"].encode("utf-8")) for r in rows if r["split"] == "val")
        for r in rows:
            unknown.update(tokenizer.unknown(r["prompt"] + r["completion"]))
        hooks = {"make_batches": completion.completion_batches(examples, tokenizer.eos_id)}
        extra = {"template": template, "examples": {s: len(examples[s]) for s in ("train", "val")}}
    else:
        rows = read_jsonl(sources[0], ("text", "label"))
        labels = sorted({r["label"] for r in rows})
        if len(labels) < 2:
            raise LmforgeError(f"{sources[0]} has {len(labels)} label(s); classification needs at least two")
        index = {label: i for i, label in enumerate(labels)}
        examples = {s: [(tokenizer.encode(r["text"])[:context_len], index[r["label"]])
                        for r in rows if r["split"] == s] for s in ("train", "val")}
        for r in rows:
            unknown.update(tokenizer.unknown(r["text"]))
        hooks = {"make_batches": classify.classify_batches(examples, tokenizer.eos_id),
                 "loss_fn": classify.classify_loss,
                 "after": lambda model: classify.add_head(model, len(labels), tokenizer.eos_id, pooling)}
        extra = {"labels": labels, "pooling": pooling, "data": str(sources[0]),
                 "examples": {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}}
    extra["unknown"] = report_unknown(dict(unknown.most_common()), tokenizer, log)
    counts = [len(ids) for s in ("train", "val") for ids, *_ in examples[s]]
    prepared = SimpleNamespace(tokenizer=tokenizer, train=range(sum(counts[:len(examples["train"])])),
                               val=range(sum(counts[len(examples["train"]):])))
    return prepared, hooks, extra


def split_weights(run_dir: Path, mode: str, lora: dict) -> None:
    """Leave model.safetensors loadable by the plain model: merge LoRA into it (the adapter goes to
    adapter.safetensors) and move a classifier head to classifier.safetensors."""
    from .lora import adapter_state, merge_state

    state = ckpt.load_tensors(run_dir / ckpt.WEIGHTS)
    head = {k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")}
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    if head:
        ckpt.save_tensors(run_dir / CLASSIFIER, head)
    if mode == "lora":
        meta = {"rank": str(lora["rank"]), "alpha": str(lora["alpha"]), "scale": str(lora["alpha"] / lora["rank"])}
        ckpt.save_tensors(run_dir / ADAPTER, adapter_state(state), metadata=meta)
        state = merge_state(state, lora["alpha"] / lora["rank"])
    ckpt.save_tensors(run_dir / ckpt.WEIGHTS, state)


def evaluate_run(run_dir: Path, task: str, log) -> dict:
    """lm: bits per byte on the new data's validation split; classify: accuracy and macro-F1 on the
    held-out split; completion: the best validation loss already recorded."""
    from .. import api

    if task == "lm":
        val = api.load(run_dir).evaluate()
        log(f"validation: {val['bits_per_byte']:.4f} bits per byte")
        return {"val_bits_per_byte": val["bits_per_byte"]}
    if task == "classify":
        result = evaluate_classifier(run_dir)
        log(f"held-out ({result['n']} examples): accuracy {result['accuracy']:.1%}, macro-F1 {result['macro_f1']:.3f}")
        return result
    return {}


def load_classifier(run_dir):
    """(model with its classifier head, tokenizer, config) from a classification run."""
    from .. import api
    from .classify import add_head

    lm = api.load(run_dir)
    ft = lm.config.get("finetune", {})
    if ft.get("task") != "classify":
        raise LmforgeError(f"{run_dir} is not a classification run; fine-tune one with --task classify")
    add_head(lm.model, len(ft["labels"]), lm.tokenizer.eos_id, ft["pooling"])
    lm.model.classifier.load_state_dict(ckpt.load_tensors(Path(run_dir) / CLASSIFIER))
    return lm.model.eval(), lm.tokenizer, lm.config


def evaluate_classifier(run_dir, data=None) -> dict:
    from .classify import predict, scores
    from .examples import held_out, read_jsonl

    model, tokenizer, config = load_classifier(run_dir)
    ft = config["finetune"]
    index = {label: i for i, label in enumerate(ft["labels"])}
    rows = [r for r in held_out(read_jsonl(data or ft["data"], ("text", "label"))) if r["label"] in index]
    context_len = config["model"]["options"]["context_len"]
    predicted = predict(model, [tokenizer.encode(r["text"])[:context_len] for r in rows], tokenizer.eos_id)
    return scores([index[r["label"]] for r in rows], predicted, len(index))
