"""A causal convolutional language model: (B, T) token ids -> (B, T, V) logits, with rolling conv buffers.

Gated, dilated causal 1-D convolutions with residual connections (Dauphin et al. 2017's gated linear
units, stacked with WaveNet-style doubling dilations). Each block: RMSNorm -> causal conv (left padding
only, so position t sees t and earlier) to 2·d_model channels -> GLU (a · sigmoid(b)) -> 1×1 projection
-> dropout -> residual. There are no position embeddings: convolution already knows relative order.

The state is, per layer, the last (kernel_size - 1)·dilation inputs of that layer's conv, (B, D, width).
Zeros are exactly the left padding a full forward uses, so decoding step by step gives the same logits.

Parameter names:

    embed.weight                          (V, D)
    blocks.{i}.norm.weight                (D,)
    blocks.{i}.conv.weight, .bias         (2D, D, kernel_size) and (2D,); output channels: value half,
                                          then gate half
    blocks.{i}.proj.weight, .bias         (D, D)
    norm.weight                           (D,)
    lm_head.weight                        (V, D)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import is_number
from lmforge.errors import LmforgeError

from .dropout import dropout


@dataclass
class CNNConfig:
    vocab_size: int
    d_model: int = 256
    n_layers: int = 8
    kernel_size: int = 3
    # None = 1, 2, 4, ... doubling per layer, restarting at 1 before one cycle's receptive field
    # would exceed context_len (resolved on creation, so asdict() holds the explicit list).
    dilations: tuple[int, ...] | None = None
    context_len: int = 256  # training sequence length; inference is unbounded
    dropout: float = 0.1

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "kernel_size", "context_len"):
            value = getattr(self, name)
            if not is_number(value, integer=True) or value < 1:
                raise LmforgeError(f"model.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dilations is None:
            cycle = 1  # the number of doublings whose field, 1 + (k - 1)(2^cycle - 1), fits in context_len
            while cycle < self.n_layers and 1 + (self.kernel_size - 1) * (2 ** (cycle + 1) - 1) <= self.context_len:
                cycle += 1
            self.dilations = tuple(2 ** (i % cycle) for i in range(self.n_layers))
        self.dilations = tuple(self.dilations)  # JSON gives a list back
        if len(self.dilations) != self.n_layers or not all(
                is_number(d, integer=True) and d >= 1 for d in self.dilations):
            raise LmforgeError(f"model.dilations must be {self.n_layers} positive integers (one per layer), "
                               f"got {list(self.dilations)}; or leave it unset")


class ConvBlock(nn.Module):
    def __init__(self, cfg: CNNConfig, dilation: int):
        super().__init__()
        self.width = (cfg.kernel_size - 1) * dilation  # how many past inputs the conv reaches back
        self.dropout = cfg.dropout
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.conv = nn.Conv1d(cfg.d_model, 2 * cfg.d_model, cfg.kernel_size, dilation=dilation)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x, buffer=None):  # x (B, T, D), buffer (B, D, width) -> (B, T, D), new buffer
        h = self.norm(x).transpose(1, 2)  # (B, D, T)
        # the past on the left: the buffer, or zeros (causal padding) at the start of a sequence
        h = F.pad(h, (self.width, 0)) if buffer is None else torch.cat([buffer.to(h.dtype), h], dim=2)
        new_buffer = None if buffer is None else h[:, :, h.size(2) - self.width:]  # the last `width` inputs
        if x.size(1) == 1:  # one new position (decoding): the conv is one matrix product over its k taps;
            # PyTorch's CPU conv takes a slow element-by-element path for dilated, one-output convolutions
            taps = h[:, :, ::self.conv.dilation[0]]  # (B, D, k), oldest first, as the kernel is laid out
            h = F.linear(taps.flatten(1), self.conv.weight.flatten(1), self.conv.bias)[:, :, None]  # (B, 2D, 1)
        else:
            h = self.conv(h)
        h = F.glu(h, dim=1)  # (B, 2D, T) -> (B, D, T): value · sigmoid(gate)
        h = self.proj(h.transpose(1, 2))  # (B, T, D)
        return x + dropout(h, self.dropout, self.training), new_buffer


class CNNModel(nn.Module):
    arch = "cnn"

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(ConvBlock(cfg, d) for d in cfg.dilations)
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Embedding and lm_head ~ N(0, 0.02); conv weights ~ N(0, 1/sqrt(kernel_size·D)) so the GLU's
        inputs start near unit scale; biases 0; norm weights 1; each block's proj zero, so every block
        starts as the identity."""
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        nn.init.ones_(self.norm.weight)
        for block in self.blocks:
            nn.init.ones_(block.norm.weight)
            nn.init.normal_(block.conv.weight, std=(block.conv.weight[0].numel()) ** -0.5)
            nn.init.zeros_(block.conv.bias)
            nn.init.zeros_(block.proj.weight)
            nn.init.zeros_(block.proj.bias)

    @property
    def receptive_field(self) -> int:
        """How many tokens (the current one included) can influence one position's logits."""
        return 1 + sum(block.width for block in self.blocks)

    @property
    def max_context(self) -> None:
        return None  # finite receptive field, but the rolling buffers let it run forever

    @property
    def hidden_size(self) -> int:
        return self.config.d_model

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return ("proj", "lm_head")

    def parameter_groups(self) -> dict[str, list]:
        """embeddings, layers (one list per block, in order), head and the rest (the final norm)."""
        return {"embeddings": [self.embed.weight], "layers": [list(block.parameters()) for block in self.blocks],
                "head": [self.lm_head.weight], "other": list(self.norm.parameters())}

    def init_state(self, batch_size: int, device, dtype) -> list[torch.Tensor]:
        """One zero buffer (B, D, (kernel_size - 1)·dilation) per layer: the causal left padding."""
        return [torch.zeros(batch_size, self.config.d_model, block.width, device=device, dtype=dtype)
                for block in self.blocks]

    @staticmethod
    def select_state(state: list[torch.Tensor], rows: list[int]) -> list[torch.Tensor]:
        index = torch.tensor(rows, device=state[0].device)
        return [buffer.index_select(0, index) for buffer in state]

    @staticmethod
    def cat_states(states: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.cat(buffers) for buffers in zip(*states)]

    def hidden(self, tokens: torch.Tensor, state: list[torch.Tensor] | None = None):
        """(B, T) ids -> final normed hidden states (B, T, D) and the new per-layer buffers (None when
        no state was given). The state passed in is left unchanged."""
        x = self.embed(tokens)  # (B, T, D)
        x = dropout(x, self.config.dropout, self.training)
        new_state = []
        for block, buffer in zip(self.blocks, state or [None] * len(self.blocks)):
            x, buffer = block(x, buffer)
            new_state.append(buffer)
        return self.norm(x), None if state is None else new_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # (B, T, D) -> (B, T, V)

    def forward(self, tokens: torch.Tensor, state: list[torch.Tensor] | None = None):
        hidden, state = self.hidden(tokens, state)
        return self.head(hidden), state

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward) = 6·N, N = matmul parameters: per block the conv
        (kernel_size·D·2D) and the 1×1 projection (D·D), plus the output head (D·V). Embedding lookup,
        biases, norms and the GLU are left out."""
        cfg = self.config
        per_block = cfg.kernel_size * cfg.d_model * 2 * cfg.d_model + cfg.d_model * cfg.d_model
        return 6 * (cfg.n_layers * per_block + cfg.d_model * cfg.vocab_size)
