"""Continuous batching: requests are decoded together, joining and leaving the batch between steps.

In: requests (prompt ids and sampling settings) submitted at any time. Out: each request's new ids and
text, piece by piece, and why it ended. Every generation in lmforge runs through `Engine`: a single
`lmforge generate` is a batch of one, the server's clients share one batch (as vLLM and TGI do).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..device import ThreadTuner, configured_threads
from ..tokenizers import start_id
from .decoder import Decoder
from .healing import heal
from .sampling import SamplingConfig, sample_rows
from .text import TextStream

EOS_NAME = "<|endoftext|>"


def refill_length(max_context: int) -> int:
    """When a bounded-context model's cache is full, the last 3/4 of a window is fed again: one prefill
    then buys a quarter window of cheap single-token steps."""
    return max(1, (max_context * 3) // 4)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    sampling: SamplingConfig
    max_chars: int | None = None  # also end ("length") once the text is this long
    on_update: Callable[["Request", str], None] | None = None  # (request, new text): from the engine's thread
    tail: str = ""  # the prompt's last word when its last id is <unk> for it (healing.prompt_tail)
    new_ids: list[int] = field(default_factory=list)  # healed, the first rewrites the prompt's last token
    healed: bool = False  # whether it was: that token is not one of the max_new_tokens
    text: str = ""  # the text handed out so far
    finish_reason: str | None = None  # "stop" (end of text or a stop string), "length", "cancelled" or "error"
    stopped_by: str | None = None
    cancelled: bool = False
    error: str | None = None
    _pieces: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def new_tokens(self) -> int:
        """Tokens written after the prompt's own (a healed token takes the place of the prompt's last)."""
        return len(self.new_ids) - self.healed

    def take(self) -> str:
        """The text produced since the last take."""
        pieces, self._pieces = self._pieces, []
        return "".join(pieces)


@dataclass(eq=False)
class _Row:
    request: Request
    generator: torch.Generator | None
    stream: TextStream | None
    history: list[int]  # prompt (as fed) and generated ids: what a refill re-feeds
    length: int = 0  # positions held in the state
    pending: int = 0  # the last sampled id, fed at the next step


def _by_length(starts: list[tuple]) -> list[list[tuple]]:
    """The admitted requests grouped by the length of what they feed (in order of arrival): one group
    is one batched prefill, which costs little more than one request's (8 one-token prompts of the
    standard Transformer: about 7 ms together, against 30 ms one by one)."""
    groups: dict[int, list[tuple]] = {}
    for start in starts:
        groups.setdefault(len(start[1]), []).append(start)
    return list(groups.values())


class Engine:
    """Holds the running batch. `submit` queues a request; each `step` admits waiting requests (one
    prefill for those whose prompts have one length), feeds every running row its last token in one
    batched decoder step, samples the next, and retires finished rows. Not thread-safe: one thread calls
    submit/cancel/step (the server wraps it)."""

    def __init__(self, decoder: Decoder, tokenizer=None, max_batch: int = 32, tune_threads: bool = True):
        self.decoder, self.tokenizer, self.max_batch = decoder, tokenizer, max_batch
        self.eos_id = None if tokenizer is None else tokenizer.eos_id
        self.start_id = None if tokenizer is None else start_id(tokenizer)  # what an empty prompt feeds
        # never sampled: <unk> stands for text outside the vocabulary, and would be written as "<unk>"
        unk_id = getattr(tokenizer, "unk_id", None)
        self.unk = None if unk_id is None else torch.tensor([unk_id], device=decoder.device)
        # A decoding step takes a millisecond or two: re-checking the thread count every 40 steps, as for
        # training steps, spent 2-3% of the tokens on trials at the slower count. Every 200 steps (or 2 s)
        # a wrong choice (a trial misled by noise) still lasts only a fraction of a second. Step times
        # follow the batch size and context length, not only the load, so they do not trigger checks.
        # tune_threads=False: the configured count throughout. Some CPUs round fp32 products differently
        # with one and two threads (a prompt's forward pass, on an Intel Xeon), so a request that must
        # repeat exactly (seeded or greedy: `lmforge generate`) cannot change count on a clock.
        cpu = decoder.device.type == "cpu"
        self.tuner = ThreadTuner(configured_threads(), period=200, max_gap=200, drift=None, period_s=2.0,
                                 enabled=cpu and tune_threads, kind="decode")
        if cpu and not tune_threads:
            torch.set_num_threads(configured_threads())
        self.waiting: deque[Request] = deque()
        self.running: list[_Row] = []
        self.joining: list[_Row] = []  # rows being prefilled at this step, until they join the batch
        self.state = None
        # The server sets this: a request whose prompt fails to start ends with an error of its own
        # instead of raising (which ends every running request); elsewhere errors propagate.
        self.contain_errors = False

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def submit(self, prompt_ids: list[int], sampling: SamplingConfig, *, max_chars: int | None = None,
               on_update=None, tail: str = "") -> Request:
        return self.add(Request(list(prompt_ids), sampling, max_chars, on_update, tail))

    def add(self, request: Request) -> Request:
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away); its row leaves the batch at the next step."""
        request.cancelled = True

    def fail(self, message: str) -> None:
        """End every request with `message` as its error (the decoder raised); the engine stays usable."""
        self._fail([r.request for r in self.running + self.joining] + list(self.waiting), message)
        self.running, self.joining, self.waiting, self.state = [], [], deque(), None

    def _fail(self, requests: list[Request], message: str) -> None:
        for request in requests:
            if request.finished:  # a row whose prefill ended it before another's failed
                continue
            request.error = message
            request.finish_reason = "error"
            self._emit(request, "")

    def step(self) -> None:
        self._retire()
        self.joining = []  # the rows being prefilled, until they join the batch
        starts = []  # (row, ids to feed, ids its first token may be) of the requests admitted now
        while self.waiting and len(self.running) + len(starts) < self.max_batch:
            request = self.waiting.popleft()
            if request.cancelled:
                request.finish_reason = "cancelled"
                self._emit(request, "")
            else:
                try:
                    new = self._start(request)
                except Exception as exc:
                    if not self.contain_errors:
                        raise
                    # in the server a request whose start fails ends alone: the running rows are not touched yet
                    self._fail([request], f"generation failed ({type(exc).__name__}: {exc})")
                    continue
                starts += new
                self.joining += [row for row, _, _ in new]  # fail() reaches them from here on, should anything raise
        joining = []  # (rows, their state) that join the batch at this step, in order
        try:
            for group in _by_length(starts):
                joining += self._prefill_group(group)
            limit = self.decoder.max_context
            for row in [r for r in self.running if limit is not None and r.length >= limit]:
                self._remove([row])  # its cache is full: re-feed the recent past, then it rejoins at the end
                self.joining.append(row)
                joining += self._prefill_group([(row, row.history[-refill_length(limit):], None)])
        except Exception as exc:  # the rows being admitted end with the error, not forgotten; the running go on
            self._fail([row.request for row in self.joining], f"generation failed ({type(exc).__name__}: {exc})")
            self.joining = []
            raise
        if joining:  # one cat_states for all of them (into the cache's spare rows, where it has enough)
            self.running += [row for rows, _ in joining for row in rows]
            states = ([] if self.state is None else [self.state]) + [state for _, state in joining]
            self.state = states[0] if len(states) == 1 else self.decoder.cat_states(states)
        self.joining = []
        if not self.running:
            return
        tokens = torch.tensor([row.pending for row in self.running])
        tic = time.perf_counter()
        logits, self.state = self.decoder.step(tokens, self.state)
        self.tuner.record((time.perf_counter() - tic) / len(self.running))
        logits = self._without_unk(logits)
        for row in self.running:
            row.length += 1
        ids = sample_rows(logits, [r.request.sampling for r in self.running], [r.generator for r in self.running])
        for row, token in zip(self.running, ids):
            self._accept(row, token)
        self._retire()
        if self.idle:
            self.tuner.settle()

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while not self.idle:
            self.step()

    # ---- rows -------------------------------------------------------------------------------------

    def _start(self, request: Request) -> list[tuple[_Row, list[int], torch.Tensor | None]]:
        """[(row, the ids to feed, the ids its first token may be or None)], or [] when it needs no prefill."""
        cfg = request.sampling
        generator = None
        if cfg.seed is not None:
            generator = torch.Generator(device=self.decoder.device).manual_seed(cfg.seed)
        ids = request.prompt_ids or ([self.start_id] if self.start_id is not None else [0])
        limit = self.decoder.max_context
        if limit is not None and len(ids) >= limit:  # a full cache leaves no position for the next token
            ids = ids[-refill_length(limit):]
        healed = heal(self.tokenizer, ids, request.tail) if cfg.token_healing else None
        allowed, known = None, ""  # known: the text of the prompt's last token, which the first new one repeats
        if healed is not None:
            ids, known, allowed = healed
        stream = None if self.tokenizer is None else TextStream(self.tokenizer, cfg.stop, ids, skip=len(known))
        row = _Row(request, generator, stream, list(ids))
        if cfg.max_new_tokens == 0:
            self._finish(row, "length")
            return []
        request.healed = healed is not None  # its first token takes the place of the prompt's last
        return [(row, ids, allowed)]

    def _prefill_group(self, group: list[tuple[_Row, list[int], torch.Tensor | None]]) -> list[tuple[list, object]]:
        """Feed each row its ids (all of one length) in one batch, and sample each row's next token, one of
        its allowed ids if it has them (token healing): [(the rows that go on, their state)], or []. In the
        server (contain_errors), a group whose prefill fails is fed again one request at a time, so that
        only a request that fails alone ends with the error."""
        rows = [row for row, _, _ in group]
        try:
            logits, state = self.decoder.prefill(torch.tensor([ids for _, ids, _ in group]))
        except Exception as exc:
            if not self.contain_errors:
                raise
            if len(group) > 1:
                return [joined for one in group for joined in self._prefill_group([one])]
            self.joining = [r for r in self.joining if r is not rows[0]]
            self._fail([rows[0].request], f"generation failed ({type(exc).__name__}: {exc})")
            return []
        for row, ids, _ in group:
            row.length = len(ids)
        logits = self._without_unk(logits)
        if any(allowed is not None for _, _, allowed in group):  # (new tensors: the logits may be inference ones)
            logits = torch.stack([scores if allowed is None else
                                  torch.full_like(scores, float("-inf")).index_copy_(0, allowed, scores[allowed])
                                  for scores, (_, _, allowed) in zip(logits, group)])
        tokens = sample_rows(logits, [row.request.sampling for row in rows], [row.generator for row in rows])
        for row, token in zip(rows, tokens):
            self._accept(row, token)
        keep = [i for i, row in enumerate(rows) if not row.request.finished]
        if not keep:
            return []
        if len(keep) < len(rows):
            state = self.decoder.select_state(state, keep)
        return [([rows[i] for i in keep], state)]

    def _without_unk(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits with <unk>'s at -inf (a new tensor: the decoder's may be inference tensors)."""
        return logits if self.unk is None else logits.index_fill(1, self.unk, float("-inf"))

    def _accept(self, row: _Row, token: int) -> None:
        request = row.request
        if token == self.eos_id and not request.sampling.ignore_eos:
            self._finish(row, "stop", EOS_NAME)
            return
        request.new_ids.append(token)
        row.history.append(token)
        row.pending = token
        piece = row.stream.push(token) if row.stream is not None else ""
        if row.stream is not None and row.stream.stopped_by is not None:
            self._finish(row, "stop", row.stream.stopped_by, piece)
        elif request.new_tokens >= request.sampling.max_new_tokens:
            self._finish(row, "length", None, piece)
        elif request.max_chars is not None and len(row.stream.text) >= request.max_chars:
            self._finish(row, "length", None, piece)
        elif piece:
            self._emit(request, piece)

    def _finish(self, row: _Row, reason: str, stopped_by: str | None = None, piece: str = "") -> None:
        request = row.request
        if row.stream is not None:
            piece += row.stream.finish()
        request.finish_reason, request.stopped_by = reason, stopped_by
        self._emit(request, piece)

    @staticmethod
    def _emit(request: Request, piece: str) -> None:
        request.text += piece
        if piece:
            request._pieces.append(piece)
        if request.on_update is not None:
            request.on_update(request, piece)

    def _retire(self) -> None:
        gone = [r for r in self.running if r.request.finished or r.request.cancelled]
        for row in gone:
            if not row.request.finished:
                row.request.finish_reason = "cancelled"
                self._emit(row.request, "")
        self._remove(gone)

    def _remove(self, rows: list[_Row]) -> None:
        """Take `rows` out of the batch: the last rows move into their places (so a Transformer copies
        only those rows' caches, see KVCache.select_state)."""
        if not rows:
            return
        gone = {i for i, r in enumerate(self.running) if r in rows}
        n = len(self.running) - len(gone)
        last = [i for i in range(n, len(self.running)) if i not in gone]
        keep = [i if i not in gone else last.pop() for i in range(n)]
        self.state = self.decoder.select_state(self.state, keep) if keep else None
        self.running = [self.running[i] for i in keep]
