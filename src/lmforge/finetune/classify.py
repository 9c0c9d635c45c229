"""Text classification on a pretrained body: a pooled linear head on `model.hidden(...)`, metrics, and a
bag-of-words baseline.

In: {"text": ..., "label": ...} rows and a base model. Out: class logits (B, C), accuracy and macro-F1.
"""
from __future__ import annotations

import math
import re
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LmforgeError
from ..training.loop import Batches
from .examples import pad, sampler

POOLING = ("mean", "last")


class ClassifierHead(nn.Module):
    """Pools hidden states over the non-padding positions (mean, or the last one) -> Linear(D, C)."""

    def __init__(self, d_hidden: int, n_classes: int, pad_id: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLING:
            raise LmforgeError(f"--pooling {pooling!r} is unknown; choose one of {', '.join(POOLING)}")
        self.pooling, self.pad_id, self.dropout = pooling, pad_id, dropout
        self.proj = nn.Linear(d_hidden, n_classes)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.pad_id).to(hidden.dtype)  # (B, T); padding only ever follows the text
        if self.pooling == "mean":
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        else:
            last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,)
            pooled = hidden[torch.arange(len(hidden)), last]
        return self.proj(F.dropout(pooled, self.dropout, self.training))  # (B, D) -> (B, C)


def hidden_size(model: nn.Module) -> int:
    with torch.no_grad():
        was = model.training
        hidden, _ = model.eval().hidden(torch.zeros(1, 1, dtype=torch.int64, device=next(model.parameters()).device))
        model.train(was)
    return hidden.shape[-1]


def add_head(model: nn.Module, n_classes: int, pad_id: int, pooling: str) -> nn.Module:
    """Attach a trainable `model.classifier` (its weights are saved as classifier.*)."""
    model.classifier = ClassifierHead(hidden_size(model), n_classes, pad_id, pooling)
    return model


def classify_loss(model, x, y) -> torch.Tensor:
    return F.cross_entropy(class_logits(model, x).float(), y)


def class_logits(model, x) -> torch.Tensor:
    hidden, _ = model.hidden(x)
    return model.classifier(hidden, x)


def classify_batches(examples: dict, pad_id: int):
    """make_batches for the training loop; `examples` maps split -> [(ids, label index)]."""
    def make(prepared, context_len, cfg, device) -> Batches:
        train, val = examples["train"], examples["val"] or examples["train"][:cfg.batch_size]
        draw = sampler(len(train), cfg.batch_size, cfg.seed)

        def collate(items):
            return pad([ids for ids, _ in items], pad_id).to(device), torch.tensor([c for _, c in items], device=device)

        def sample(index):
            return collate([train[i] for i in draw(index)])
        windows = [collate(val[i:i + cfg.batch_size]) for i in range(0, len(val), cfg.batch_size)]
        # "val_bpb" in metrics.jsonl is then the validation loss in bits per example
        return Batches(sample, sum(len(train[i][0]) for i in draw(0)) * cfg.grad_accum, windows, 1.0)
    return make


@torch.no_grad()
def predict(model, sequences: list[list[int]], pad_id: int, batch_size: int = 32) -> list[int]:
    model.eval()
    out = []
    for i in range(0, len(sequences), batch_size):
        x = pad(sequences[i:i + batch_size], pad_id).to(next(model.parameters()).device)
        out += class_logits(model, x).argmax(-1).tolist()
    return out


def scores(gold: list[int], predicted: list[int], n_classes: int) -> dict:
    """Accuracy and macro-F1 (the unweighted mean of each class's F1)."""
    f1s = []
    for c in range(n_classes):
        tp = sum(g == c and p == c for g, p in zip(gold, predicted))
        fp = sum(g != c and p == c for g, p in zip(gold, predicted))
        fn = sum(g == c and p != c for g, p in zip(gold, predicted))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    accuracy = sum(g == p for g, p in zip(gold, predicted)) / max(1, len(gold))
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / max(1, n_classes), "n": len(gold)}


WORD = re.compile(r"[a-z']+")


def bag_of_words(train: list[tuple[str, int]], test: list[tuple[str, int]], n_classes: int,
                 max_words: int = 5000, epochs: int = 200, seed: int = 0) -> dict:
    """A linear softmax classifier on log(1 + word counts) of the train vocabulary's top `max_words` words,
    full-batch AdamW with weight decay: the baseline a language model should beat."""
    counts = Counter(w for text, _ in train for w in WORD.findall(text.lower()))
    vocab = {w: i for i, (w, _) in enumerate(counts.most_common(max_words))}

    def features(rows):
        x = torch.zeros(len(rows), len(vocab))
        for r, (text, _) in enumerate(rows):
            for w, n in Counter(WORD.findall(text.lower())).items():
                if w in vocab:
                    x[r, vocab[w]] = math.log1p(n)
        return x, torch.tensor([c for _, c in rows])

    (xtr, ytr), (xte, yte) = features(train), features(test)
    torch.manual_seed(seed)
    linear = nn.Linear(len(vocab), n_classes)
    opt = torch.optim.AdamW(linear.parameters(), lr=0.05, weight_decay=0.01)
    for _ in range(epochs):
        loss = F.cross_entropy(linear(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return scores(yte.tolist(), linear(xte).argmax(-1).tolist(), n_classes)
