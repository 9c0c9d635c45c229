"""The continuation test: prompts at sentence starts in held-out text, continuations from the model
and from byte-level n-gram baselines, and the metrics comparing each with what the author wrote.

In: documents [(name, text)], a model + tokenizer, baselines over UTF-8 bytes. Out: plain dicts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..errors import LmforgeError
from ..generation import SamplingConfig
from ..generation.healing import prompt_tail
from ..tokenizers import bos_prefix, start_id
from .copying import CopyIndex
from .likelihood import score_ids
from .text_metrics import bleu, chrf, distinct_n, repetition_rate, sentence_start_candidates, sentence_starts

PROMPT_CHARS = 100  # the prompt: a sentence start and up to this many characters, cut at a word end
CONTINUATION_CHARS = 200  # the original continuation: up to this many following characters, cut at a word end
TEMPERATURE = 0.8
TOP_K = 50  # model sampling only; the byte-level baselines sample from their full distribution
COPY_THRESHOLD = 50  # characters: a generation "copies" if it holds a training span this long
REPETITION_N = 4


@dataclass
class Prompt:
    document: str
    offset: int  # character offset of the sentence start in the document
    prompt: str
    original: str  # what the author wrote next; starts with the whitespace after the prompt


def _cut_at_word_end(text: str, start: int, limit: int) -> int:
    """End offset of text[start:start+limit], moved back so it ends at a word end (before whitespace)."""
    end = min(start + limit, len(text))
    if end < len(text) and not text[end].isspace():
        while end > start and not text[end - 1].isspace():
            end -= 1  # back to the start of the word that straddles the limit
    while end > start and text[end - 1].isspace():
        end -= 1
    return end if end > start else min(start + limit, len(text))  # one word longer than the limit


def make_prompts(documents: list[tuple[str, str]], count: int, seed: int) -> list[Prompt]:
    """`count` prompts spread over the documents in proportion to their length (largest remainder),
    each within one document: a document gets no more than it has sentence starts with room after them."""
    if count < 1:
        raise LmforgeError(f"the continuation test needs at least one prompt, got --prompts {count}")
    room = PROMPT_CHARS + CONTINUATION_CHARS
    capacity = np.array([len(sentence_start_candidates(text, room)) for _, text in documents])
    if capacity.sum() < count:
        chars = sum(len(text) for _, text in documents)
        most = int(capacity.sum())
        fix = f"ask for at most {most} prompt{'s' if most > 1 else ''} (--prompts), or " if most else ""
        raise LmforgeError(f"asked for {count} prompts, but the held-out text ({chars:,} characters in "
                           f"{len(documents)} document{'s' if len(documents) > 1 else ''}) has {most} sentence "
                           f"starts with {room} characters after them in the same document; {fix}give longer "
                           f"documents (--text FILE)")
    sizes = np.array([len(text) for _, text in documents], dtype=np.float64)
    shares = sizes / sizes.sum() * count
    per_doc = np.minimum(np.floor(shares).astype(int), capacity)
    while per_doc.sum() < count:  # the largest remainders first, among documents with room left
        spare = np.where(per_doc < capacity, shares - per_doc, -np.inf)
        per_doc[int(np.argmax(spare))] += 1
    prompts = []
    for (name, text), n in zip(documents, per_doc):
        if n == 0:
            continue
        for start in sentence_starts(text, int(n), PROMPT_CHARS + CONTINUATION_CHARS, seed):
            end = _cut_at_word_end(text, start, PROMPT_CHARS)
            stop = _cut_at_word_end(text, end, CONTINUATION_CHARS)
            prompts.append(Prompt(name, start, text[start:end], text[end:stop]))
    return prompts


def _token_budget(tokenizer, original: str) -> int:
    # The original's own token count plus slack: a sample may use shorter tokens than the author's
    # text; the decoded text is trimmed to the original's length in characters afterwards.
    return int(len(tokenizer.encode(original)) * 1.5) + 8


def sample_seed(seed: int, i: int) -> int:
    """The sampling seed of prompt i in a report made with `seed`."""
    return seed * 100_003 + i


def model_continuations(lm, prompts: list[Prompt], seed: int, progress: bool = True) -> tuple[list[str], list[float]]:
    """Sampled continuations (trimmed to each original's length) and the nats the model spends on
    each true continuation given its prompt.

    Each prompt is generated alone, prompt i with the seed sample_seed(seed, i), exactly as `lmforge
    generate --seed` does it, so every sample can be reproduced from the command line (batched
    decoding rounds differently with the number of rows).
    """
    tokenizer = lm.tokenizer
    encoded = [tokenizer.encode(p.prompt) for p in prompts]
    start = start_id(tokenizer)  # what the model reads first (scoring); generation puts a tokenizer's own first
    lead = bos_prefix(tokenizer)
    bar = tqdm(total=2 * len(prompts), desc="model continuations", unit="prompt", disable=not progress,
               dynamic_ncols=True)
    texts = []
    for i, (ids, p) in enumerate(zip(encoded, prompts)):
        engine = lm.engine(max_batch=1, tune_threads=False)  # as `lmforge generate --seed` runs one
        request = engine.submit(lead + ids, SamplingConfig(_token_budget(tokenizer, p.original), TEMPERATURE, TOP_K,
                                                    seed=sample_seed(seed, i)), max_chars=len(p.original),
                                tail=prompt_tail(tokenizer, p.prompt))
        engine.run()
        texts.append(request.text[:len(p.original)])
        bar.update(1)
    nats = []
    for ids, p in zip(encoded, prompts):
        # Both calls score the prompt's tokens in the same first window, so the difference is the
        # cost of the continuation given the whole prompt (exact while the prompt fits max_context;
        # a longer prompt's later tokens are windowed slightly differently in the two calls).
        full = score_ids(lm.model, ids + tokenizer.encode(p.original), start, device=lm.device)
        nats.append(full.nats - score_ids(lm.model, ids, start, device=lm.device).nats)
        bar.update(1)
    bar.close()
    return texts, nats


def baseline_continuations(baseline, prompts: list[Prompt], seed: int, name: str,
                           progress: bool = True) -> tuple[list[str], list[float]]:
    """The same as model_continuations for a byte-level baseline (vocab 256, UTF-8 bytes)."""
    rng = np.random.default_rng(seed)
    texts, nats = [], []
    for p in tqdm(prompts, desc=f"{name} continuations", unit="prompt", disable=not progress, dynamic_ncols=True):
        context, target = list(p.prompt.encode("utf-8")), list(p.original.encode("utf-8"))
        sampled = baseline.sample(context, len(target), rng, temperature=TEMPERATURE)
        texts.append(bytes(sampled).decode("utf-8", errors="replace")[:len(p.original)])
        nats.append(float(-byte_logprobs(baseline, bytes(context + target))[len(context):].sum()))
    return texts, nats


def byte_logprobs(baseline, data: bytes) -> np.ndarray:
    """(len(data),) log p of each byte; UnigramModel has no token_logprobs, so it is looked up."""
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    if hasattr(baseline, "token_logprobs"):
        return baseline.token_logprobs(ids)
    return baseline.logprobs()[ids]


def continuation_metrics(texts: list[str], prompts: list[Prompt], copy_index: CopyIndex,
                         nats: list[float] | None = None) -> dict:
    """chrF/BLEU against the originals, bits per byte on the originals, distinct-n, repetition, copying.

    With `nats` None the texts are the originals themselves: only the reference-free metrics apply.
    """
    originals = [p.original for p in prompts]
    copies = [copy_index.longest_copy(t)[0] for t in texts]
    return {
        "chrf": chrf(texts, originals) if nats is not None else None,
        "bleu": bleu(texts, originals) if nats is not None else None,
        "bits_per_byte": (sum(nats) / sum(len(o.encode("utf-8")) for o in originals) / math.log(2)
                          if nats is not None else None),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "repetition_rate": float(np.mean([repetition_rate(t, REPETITION_N) for t in texts])),
        "copy_rate": float(np.mean([c >= COPY_THRESHOLD for c in copies])),
        "mean_longest_copy": float(np.mean(copies)),
        "max_longest_copy": int(max(copies)),
        "mean_chars": float(np.mean([len(t) for t in texts])),
    }

