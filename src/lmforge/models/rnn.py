"""Recurrent language models: (B, T) token ids -> (B, T, V) logits, carrying (h, c) or h between calls.

LSTM and GRU share everything but the cell: embedding -> stacked torch nn.LSTM / nn.GRU (fused kernels,
far faster on CPU than a Python loop) -> optional projection d_hidden -> d_model when the output head is
tied to the embedding -> linear head over the vocabulary. The tutorial's Keras model (Embedding 128 ->
LSTM 256 -> Dense V) is `build_model("lstm", vocab_size=V, d_model=128, d_hidden=256, n_layers=1)`;
torch keeps two LSTM biases (b_ih, b_hh) where Keras keeps one, so it has 4·d_hidden more parameters
that compute the same function (an importer puts the Keras bias in b_ih and zeros in b_hh).

Parameter names:

    embed.weight                       (V, d_model)
    rnn.weight_ih_l{i}, rnn.weight_hh_l{i}, rnn.bias_ih_l{i}, rnn.bias_hh_l{i}
                                       torch's layout: gate rows i,f,g,o (LSTM) or r,z,n (GRU)
    proj.weight                        (d_model, d_hidden), only when tie_embeddings=True
    lm_head.weight, lm_head.bias       (V, d_hidden) and (V,), only when tie_embeddings=False

LoRA may wrap `lm_head` and `proj` (plain nn.Linear). The recurrent weights are not LoRA targets:
nn.LSTM / nn.GRU keep them as raw fused tensors, not nn.Linear modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import is_number
from lmforge.errors import LmforgeError

from .dropout import dropout

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class RNNConfig:
    vocab_size: int
    d_model: int = 256  # embedding size (and the projection's output size when tied)
    d_hidden: int = 512  # recurrent state size
    n_layers: int = 2
    context_len: int = 128  # truncated-BPTT length used in training; inference is unbounded
    dropout: float = 0.1  # on the embedding, between layers and on the top layer's output
    tie_embeddings: bool = False
    cell: str = "lstm"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_hidden", "n_layers", "context_len"):
            value = getattr(self, name)
            if not is_number(value, integer=True) or value < 1:
                raise LmforgeError(f"model.{name} must be a positive integer, got {value!r}")
        if self.cell not in CELLS:
            raise LmforgeError(f"model.cell={self.cell!r} is unknown; choose one of {', '.join(CELLS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"model.dropout must be in [0, 1), got {self.dropout!r}")


class RNNModel(nn.Module):
    def __init__(self, cfg: RNNConfig):
        super().__init__()
        self.config = cfg
        self.arch = cfg.cell
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # torch warns about inter-layer dropout with a single layer, where it would do nothing anyway.
        self.rnn = CELLS[cfg.cell](cfg.d_model, cfg.d_hidden, cfg.n_layers, batch_first=True,
                                   dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        # Tying needs the head's input to be d_model wide, so project the recurrent output down first.
        self.proj = nn.Linear(cfg.d_hidden, cfg.d_model, bias=False) if cfg.tie_embeddings else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_hidden, cfg.vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Keras-like, so the tutorial model starts where the tutorial's does: embedding ~ U(-0.05, 0.05);
        input weights and Linears Xavier-uniform; recurrent weights orthogonal per gate; biases 0,
        except the LSTM forget gate's input bias = 1 (remember by default)."""
        nn.init.uniform_(self.embed.weight, -0.05, 0.05)
        hidden = self.config.d_hidden
        for name, param in self.rnn.named_parameters():
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(param)
            elif name.startswith("weight_hh"):
                for gate in param.split(hidden, dim=0):  # (gates·H, H): one square block per gate
                    nn.init.orthogonal_(gate)
            else:
                nn.init.zeros_(param)
                if self.config.cell == "lstm" and name.startswith("bias_ih"):
                    param[hidden:2 * hidden] = 1.0  # gate order i, f, g, o
        for linear in (self.proj, self.lm_head):
            if linear is not None:
                nn.init.xavier_uniform_(linear.weight)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    @property
    def max_context(self) -> None:
        return None

    @property
    def hidden_size(self) -> int:
        return self.config.d_model if self.config.tie_embeddings else self.config.d_hidden

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return ("proj",) if self.config.tie_embeddings else ("lm_head",)

    def parameter_groups(self) -> dict[str, list]:
        """embeddings, layers (each recurrent layer's four tensors, in order), head and the rest (proj)."""
        layers = [[getattr(self.rnn, f"{kind}_l{i}") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                  for i in range(self.config.n_layers)]
        head = [] if self.lm_head is None else list(self.lm_head.parameters())
        return {"embeddings": [self.embed.weight], "layers": layers, "head": head,
                "other": [] if self.proj is None else [self.proj.weight]}

    def init_state(self, batch_size: int, device, dtype):
        """Zeros of shape (n_layers, B, d_hidden): a tuple (h, c) for the LSTM, h alone for the GRU."""
        shape = (self.config.n_layers, batch_size, self.config.d_hidden)
        h = torch.zeros(shape, device=device, dtype=dtype)
        return (h, torch.zeros_like(h)) if self.config.cell == "lstm" else h

    @staticmethod
    def select_state(state, rows: list[int]):
        """A new state holding `rows` of `state`, in that order (the batch is dimension 1)."""
        index = torch.tensor(rows, device=(state[0] if isinstance(state, tuple) else state).device)
        if isinstance(state, tuple):
            return tuple(t.index_select(1, index) for t in state)
        return state.index_select(1, index)

    @staticmethod
    def cat_states(states: list):
        if isinstance(states[0], tuple):
            return tuple(torch.cat(parts, dim=1) for parts in zip(*states))
        return torch.cat(states, dim=1)

    def hidden(self, tokens: torch.Tensor, state=None):
        """(B, T) ids -> top-layer outputs (B, T, d_hidden), or (B, T, d_model) when tied, and the new
        state (None when none was given). The state carries autograd history: detach it between
        truncated-BPTT windows. The state passed in is left unchanged."""
        x = self.embed(tokens)  # (B, T, d_model)
        x = dropout(x, self.config.dropout, self.training)
        out, new_state = self.rnn(x, state)  # (B, T, d_hidden); None starts from zeros
        out = dropout(out, self.config.dropout, self.training)
        if self.proj is not None:
            out = self.proj(out)  # (B, T, d_model)
        return out, None if state is None else new_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        # Call lm_head as a module (not its .weight) so a LoRA wrapper around it takes effect.
        return F.linear(hidden, self.embed.weight) if self.lm_head is None else self.lm_head(hidden)

    def forward(self, tokens: torch.Tensor, state=None):
        hidden, state = self.hidden(tokens, state)
        return self.head(hidden), state  # (B, T, V)

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward) = 6·N, N = matmul parameters: per layer
        gates·(input + d_hidden)·d_hidden (gates = 4 for LSTM, 3 for GRU), plus projection and head
        (tied or not). Embedding lookups, biases and elementwise gate math are left out."""
        cfg = self.config
        gates = 4 if cfg.cell == "lstm" else 3
        n = sum(gates * ((cfg.d_model if i == 0 else cfg.d_hidden) + cfg.d_hidden) * cfg.d_hidden
                for i in range(cfg.n_layers))
        n += cfg.d_hidden * cfg.d_model if cfg.tie_embeddings else 0
        n += cfg.vocab_size * (cfg.d_model if cfg.tie_embeddings else cfg.d_hidden)
        return 6 * n
