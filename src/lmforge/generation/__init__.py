"""Text from a seed phrase: greedy, temperature, top-k, top-p sampling, stop strings and streaming.

One path serves every caller and family: `Decoder` runs the model (prefill once, then one position
per step through its state: KV cache, recurrent state or convolution buffers), `Engine` batches
requests, `sample_rows` picks tokens and `TextStream` turns them into text. `lmforge generate`, the
Python API, the evaluation report and the server all generate through `Engine`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from .decoder import Decoder, default_weights
from .engine import Engine, Request
from .sampling import SamplingConfig, sample_next, sample_rows

__all__ = ["Decoder", "Engine", "Generation", "Request", "SamplingConfig", "default_weights", "generate",
           "sample_next", "sample_rows", "stream"]


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # the new ids; with token healing the first one rewrites the prompt's last token
    prompt_tokens: int
    finish_reason: str  # "stop" (end of text or a stop string) or "length" (max_new_tokens)
    stopped_by: str | None = None


def stream(decoder: Decoder, tokenizer, prompt_ids: list[int], sampling: SamplingConfig,
           tail: str = "") -> Iterator[str]:
    """Yield the continuation of `prompt_ids` piece by piece; the generator returns a Generation.
    `tail`: the prompt's last word when its last id is <unk> for it (healing.prompt_tail)."""
    engine = Engine(decoder, tokenizer, max_batch=1, tune_threads=not sampling.repeatable)
    request = engine.submit(prompt_ids, sampling, tail=tail)
    while not request.finished:
        engine.step()
        piece = request.take()
        if piece:
            yield piece
    return Generation(request.text, request.new_ids, len(prompt_ids), request.finish_reason, request.stopped_by)


def generate(decoder: Decoder, tokenizer, prompt_ids: list[int], sampling: SamplingConfig,
             on_text: Callable[[str], None] | None = None, tail: str = "") -> Generation:
    """Continue `prompt_ids`; `on_text` receives the new text piece by piece as it is decoded."""
    pieces = stream(decoder, tokenizer, prompt_ids, sampling, tail)
    while True:
        try:
            piece = next(pieces)
        except StopIteration as finished:
            return finished.value
        if on_text is not None:
            on_text(piece)
