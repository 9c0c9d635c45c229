"""How well a model predicts a text: bits per byte, perplexity per token, top-1/top-5 accuracy.

Every token of the text is scored exactly once. A bounded-context model (the Transformer) reads
overlapping windows with a stride of half its context, so each scored token sees at least half a
window of history; recurrent and convolutional models carry their state through the whole text.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from ..device import ThreadTuner, configured_threads
from ..errors import LmforgeError
from ..tokenizers import start_id



@dataclass
class Score:
    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    correct1: int = 0
    correct5: int = 0
    unknown: int = 0  # tokens that are <unk>: their spelling costs nothing, so bits per byte is a lower bound
    dropped: int = 0  # texts whose stop words the tokenizer removed: never predicted, they cost nothing either
    lowercased: int = 0  # texts the tokenizer lowercased: their capital letters cost nothing

    def __iadd__(self, other: "Score") -> "Score":
        for name in FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @property
    def bits_per_byte(self) -> float:
        return self.nats / max(self.bytes, 1) / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats / max(self.tokens, 1))

    def summary(self) -> dict:
        return {
            "bits_per_byte": self.bits_per_byte,
            "perplexity": self.perplexity,
            "accuracy": self.correct1 / max(self.tokens, 1),
            "top5_accuracy": self.correct5 / max(self.tokens, 1),
            "nats_per_token": self.nats / max(self.tokens, 1),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "unknown_rate": self.unknown / max(self.tokens, 1),
            # An <unk> prediction pays nothing for the word's spelling, nor a removed stop word for being
            # there: the true cost is higher.
            "bits_per_byte_is_lower_bound": self.unknown > 0 or self.dropped > 0 or self.lowercased > 0,
            "stop_words_removed": self.dropped > 0,
            "lowercased": self.lowercased > 0,
        }


FIELDS = tuple(f.name for f in fields(Score))  # the counts that add up over documents and processes


def lower_bound_reason(summary: dict) -> str | None:
    """Why a summary's bits per byte is only a lower bound, in words; None when it is the real cost."""
    reasons = []
    if summary.get("stop_words_removed"):
        reasons.append("the tokenizer removes stop words, which cost nothing here (not comparable with other runs)")
    if summary.get("lowercased"):
        reasons.append("the tokenizer lowercases the text, so capital letters cost nothing here (not comparable "
                       "with other runs)")
    if summary.get("unknown_rate"):
        reasons.append(f"{percent(summary['unknown_rate'])} of the tokens are <unk>, whose spelling costs nothing")
    return "; ".join(reasons) or None


def percent(rate: float) -> str:
    """A rate as a percentage to two places; one that would round to 0.00% is "under 0.01%"."""
    return f"{rate:.2%}" if rate >= 0.00005 else "under 0.01%"


def _score_positions(logits: torch.Tensor, targets: torch.Tensor) -> Score:
    """logits (N, V), targets (N,) -> summed loss and hit counts (the loss summed in float64)."""
    logits = logits.float()
    nats = F.cross_entropy(logits, targets, reduction="none").double().sum().item()
    top5 = logits.topk(min(5, logits.size(-1)), dim=-1).indices
    hits = top5 == targets[:, None]
    return Score(nats=nats, tokens=targets.numel(), correct1=int(hits[:, 0].sum()), correct5=int(hits.any(-1).sum()))


def _windows(n: int, window: int, stride: int):
    """(start, end, first scored) triples: windows seq[start:end] whose predictions for positions
    first..end-1 are kept, so positions 1..n-1 are each scored exactly once."""
    end = min(window, n)
    yield 0, end, 1
    while end < n:
        new_end = min(end + stride, n)
        yield max(0, new_end - window), new_end, end
        end = new_end


WINDOW_TOKENS = 4096  # a bounded-context model scores at least this many positions per forward pass
QUIET_S = 10.0  # a scoring done within this many seconds says nothing; a longer one reports its progress
LOUD_CHARS = 1_000_000  # (and only on a text this long: Austen's validation split is 0.2M characters)


class Progress:
    """How far a long scoring has come, on stderr: nothing in its first QUIET_S seconds, then a line at
    each tenth of the text with the time left (a 60 MB text takes many minutes on a laptop)."""

    def __init__(self, total_chars: int, loud: bool = True):
        self.total, self.loud, self.tic = max(1, total_chars), loud, time.perf_counter()
        self.finished, self.mark = 0, 0.1  # characters of the documents scored; the next tenth to report

    def document(self, chars: int):
        """The function score_ids calls with the share of a `chars`-long document it has scored."""
        counted = False

        def update(share: float) -> None:
            nonlocal counted
            if counted:
                return
            done = (self.finished + share * chars) / self.total
            spent = time.perf_counter() - self.tic
            if done >= self.mark:
                if self.loud and spent >= QUIET_S and done < 1:
                    print(f"scoring: {done:.0%} of {self.total / 1e6:,.1f}M characters after {spent:,.0f} s, about "
                          f"{spent * (1 - done) / done:,.0f} s left", file=sys.stderr, flush=True)
                self.mark = math.floor(done * 10 + 1) / 10
            if share >= 1:
                self.finished, counted = self.finished + chars, True
        return update


@torch.inference_mode()
def score_ids(model, ids: list[int], bos: int, *, device="cpu", batch_windows: int | None = None,
              chunk: int = 1024, part: tuple[int, int] = (0, 1), progress=None) -> Score:
    """Score `ids` given a leading `bos` token: predictions for every id, each exactly once. With
    part=(rank, world) a bounded-context model scores only that process's share of the windows,
    `batch_windows` at a time (default: 8, or more for short contexts, so that a forward pass takes
    about WINDOW_TOKENS positions: a small model's pass costs mostly its fixed overhead). `progress` is
    called with the share scored so far (Progress.document)."""
    seq = torch.tensor([bos] + list(ids), dtype=torch.long, device=device)
    n = seq.numel()
    total = Score()
    progress = progress or (lambda share: None)
    if n < 2:
        progress(1.0)
        return total
    limit = model.max_context
    if limit is None:
        dtype = next(model.parameters()).dtype
        state = model.init_state(1, device, dtype)
        for begin in range(0, n - 1, chunk):
            x = seq[begin:min(begin + chunk, n - 1)][None]
            y = seq[begin + 1:begin + 1 + x.size(1)]
            logits, state = model(x, state)
            total += _score_positions(logits[0], y)
            progress((begin + x.size(1)) / (n - 1))
        return total
    window, stride = limit + 1, max(1, limit // 2)  # window+1 tokens give `limit` predictions
    batch_windows = batch_windows or max(8, WINDOW_TOKENS // limit)
    spans = list(_windows(n, window, stride))[part[0]::part[1]]
    # No `kind`: a scoring call checks at the same windows whatever ran before it, so its trials (which
    # may round differently at the other count) fall alike in a repeated or resumed run.
    tuner = ThreadTuner(configured_threads(), period=20, trial=3, enabled=seq.device.type == "cpu")
    for i in range(0, len(spans), batch_windows):
        tic = time.perf_counter()
        group = spans[i:i + batch_windows]
        lengths = {end - start for start, end, _ in group}
        # The output head runs only where a prediction is kept: a window after the first keeps its
        # last `stride` positions, so half of the head's work is skipped (the head of the default
        # model is about a quarter of its forward pass).
        skip = min(first - start - 1 for start, _, first in group)
        if len(lengths) == 1:  # full windows: one batched forward
            x = torch.stack([seq[start:end - 1] for start, end, _ in group])
            logits = model.head(model.hidden(x)[0][:, skip:])
        else:
            logits = [model.head(model.hidden(seq[start:end - 1][None])[0][:, skip:])[0] for start, end, _ in group]
        kept = [logits[row][first - start - 1 - skip:end - start - 1 - skip] for row, (start, end, first)
                in enumerate(group)]
        total += _score_positions(torch.cat(kept), torch.cat([seq[first:end] for _, end, first in group]))
        tuner.record(time.perf_counter() - tic)
        progress(min(1.0, (i + len(group)) / len(spans)))
    tuner.settle()
    progress(1.0)
    return total


def evaluate_text(model, tokenizer, text: str, *, device="cpu", part: tuple[int, int] = (0, 1),
                  progress=None) -> Score:
    ids = tokenizer.encode(text)
    score = score_ids(model, ids, start_id(tokenizer), device=device, part=part, progress=progress)
    if part[0] == 0:  # the text's own counts, once
        score.bytes = len(text.encode("utf-8"))
        unk = getattr(tokenizer, "unk_id", None)
        score.unknown = sum(1 for i in ids if i == unk) if unk is not None else 0
        options = getattr(tokenizer, "options", {})
        score.dropped = int(bool(options.get("remove_stopwords")))
        score.lowercased = int(bool(options.get("lowercase")))
    return score


def evaluate_documents(model, tokenizer, documents: list[tuple[str, str]], *, device="cpu") -> dict:
    """Overall and per-document scores for (name, text) pairs; the overall numbers pool all bytes.
    Under torchrun the processes share the work (a bounded-context model's windows, or whole documents
    for the others) and add up their sums, so every process gets the single-process figures."""
    from ..training import distributed as dist

    rank, world = dist.rank(), dist.world_size()
    scores = []
    chars = sum(len(text) for _, text in documents)
    progress = Progress(chars, loud=rank == 0 and chars >= LOUD_CHARS)
    for i, (_, text) in enumerate(documents):
        done = progress.document(len(text))
        if model.max_context is not None:
            scores.append(evaluate_text(model, tokenizer, text, device=device, part=(rank, world), progress=done))
        elif i % world == rank:
            scores.append(evaluate_text(model, tokenizer, text, device=device, progress=done))
        else:
            scores.append(Score())
            done(1.0)
    if world > 1:
        table = torch.tensor([[getattr(s, f) for f in FIELDS] for s in scores], dtype=torch.float64)
        table = torch.tensor(dist.sum_floats(table.flatten().tolist()), dtype=torch.float64).view(len(scores), -1)
        scores = [Score(row[0].item(), *(int(v) for v in row[1:].tolist())) for row in table]
    total, per_doc = Score(), {}
    for (name, _), score in zip(documents, scores):
        per_doc[name] = score.summary()
        total += score
    if total.tokens == 0:  # not a perfect score: nothing was scored at all
        removes = getattr(tokenizer, "options", {}).get("remove_stopwords")
        stop_words = " (its stop words are removed)" if removes else ""
        raise LmforgeError(f"the text holds no token this model scores: it is empty after tokenizing{stop_words}; "
                           f"give longer text")
    return {**total.summary(), "documents": per_doc}


def score_to_dict(score: Score) -> dict:
    return asdict(score)
