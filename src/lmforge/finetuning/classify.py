"""Text classification on a pretrained body: a pooled linear head on `model.hidden(...)`, metrics, and a
bag-of-words baseline.

In: {"text": ..., "label": ...} rows and a base model. Out: class logits (B, C), accuracy and macro-F1.
The head is a small module on the language model's final hidden states; `Classifier` joins the two
so that one forward gives class logits (the training loop, and DistributedDataParallel, see one model).
"""
from __future__ import annotations

import math
import re
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LmforgeError
from ..data.examples import pad

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


class Classifier(nn.Module):
    """A language model (`lm`) and a classification head on its hidden states: forward (B, T) ids ->
    (B, C) class logits. The language model's weights keep their names under `lm.`."""

    def __init__(self, lm: nn.Module, n_classes: int, pad_id: int, pooling: str):
        super().__init__()
        self.lm = lm
        self.classifier = ClassifierHead(lm.hidden_size, n_classes, pad_id, pooling)
        self.config, self.arch = lm.config, lm.arch
        for p in lm.parameter_groups()["head"]:  # next-token logits are not used: the head stays as it was
            p.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lm.hidden(tokens)
        return self.classifier(hidden, tokens)

    def flops_per_token(self) -> int:
        return self.lm.flops_per_token()

    def parameter_groups(self) -> dict[str, list]:
        groups = self.lm.parameter_groups()
        return {**groups, "other": groups["other"] + list(self.classifier.parameters())}


@torch.no_grad()
def predict(model, sequences: list[list[int]], pad_id: int, batch_size: int = 32) -> list[int]:
    model.eval()
    out = []
    for i in range(0, len(sequences), batch_size):
        x = pad(sequences[i:i + batch_size], pad_id).to(next(model.parameters()).device)
        out += model(x).argmax(-1).tolist()
    return out


def scores(gold: list[int], predicted: list[int]) -> dict:
    """Accuracy and macro-F1: the unweighted mean of F1 over the classes that occur among the gold or
    the predicted labels (as scikit-learn counts it), so a class with no held-out rows that is never
    predicted does not count as an F1 of 0."""
    f1s = []
    for c in sorted(set(gold) | set(predicted)):
        tp = sum(g == c and p == c for g, p in zip(gold, predicted))
        fp = sum(g != c and p == c for g, p in zip(gold, predicted))
        fn = sum(g == c and p != c for g, p in zip(gold, predicted))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    accuracy = sum(g == p for g, p in zip(gold, predicted)) / max(1, len(gold))
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / max(1, len(f1s)), "n": len(gold)}


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
    return scores(yte.tolist(), linear(xte).argmax(-1).tolist())
