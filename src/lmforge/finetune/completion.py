"""Prompt -> completion fine-tuning: JSONL pairs, a prompt template, and a loss on completion tokens only.

In: {"prompt": ..., "completion": ...} rows and a base tokenizer. Out: batches whose targets are -100
(ignored by the loss) wherever the next token is still part of the prompt; generation uses the same template.
"""
from __future__ import annotations

from ..errors import LmforgeError
from ..training.loop import Batches
from .examples import pad, sampler

DEFAULT_TEMPLATE = "### Prompt:\n{prompt}\n### Completion:\n"
IGNORE = -100


def render(template: str, prompt: str) -> str:
    if "{prompt}" not in template:
        raise LmforgeError(f"the prompt template {template!r} has no {{prompt}} placeholder; add one")
    return template.replace("{prompt}", prompt)


def encode_pair(tokenizer, template: str, prompt: str, completion: str, context_len: int) -> tuple[list[int], int]:
    """(ids, n_prompt): template(prompt) tokens, then completion tokens and end-of-text, at most
    context_len + 1 ids; an over-long prompt loses its start, an over-long completion its end."""
    p = tokenizer.encode(render(template, prompt))
    c = tokenizer.encode(completion) + [tokenizer.eos_id]
    if len(p) + len(c) > context_len + 1:
        p = p[-max(1, context_len // 2):]  # keep the prompt's end and room for the completion
    return (p + c)[:context_len + 1], len(p)


def inputs_targets(ids: list[int], n_prompt: int) -> tuple[list[int], list[int]]:
    """x = ids[:-1], y = ids[1:] with every target inside the prompt set to -100."""
    return ids[:-1], [IGNORE if i + 1 < n_prompt else t for i, t in enumerate(ids[1:])]


def completion_batches(examples: dict, pad_id: int):
    """make_batches for the training loop; `examples` maps split -> [(ids, n_prompt)]."""
    def make(prepared, context_len, cfg, device) -> Batches:
        train = [inputs_targets(*e) for e in examples["train"]]
        val = [inputs_targets(*e) for e in examples["val"]]
        draw = sampler(len(train), cfg.batch_size, cfg.seed)

        def collate(items):
            return pad([x for x, _ in items], pad_id).to(device), pad([y for _, y in items], IGNORE).to(device)

        def sample(index):
            return collate([train[i] for i in draw(index)])
        windows = [collate(val[i:i + cfg.batch_size]) for i in range(0, len(val), cfg.batch_size)]
        targets = sum(sum(t != IGNORE for t in y) for _, y in val)
        # val_bpb: loss per completion target (end-of-text included) over the completions' UTF-8 bytes
        return Batches(sample, cfg.batch_size * context_len * cfg.grad_accum, windows,
                       targets / max(1, examples["val_bytes"]))
    return make


def generate_completion(lm, prompt: str, **sampling) -> str:
    """Generate with a completion run's own prompt template (read from its config.json)."""
    template = lm.config.get("finetune", {}).get("template", DEFAULT_TEMPLATE)
    return lm.generate(render(template, prompt), **sampling)
