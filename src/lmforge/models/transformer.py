"""A decoder-only Transformer: (B, T) token ids -> (B, T, V) logits, with an explicit KV cache.

The defaults are a modern block (RoPE, pre-norm RMSNorm, QK-norm, ReLU² MLP, zero-initialised output
projections, tied head, value residual). The options cover GPT-2 and Llama exactly, so their weights
can be imported:

    GPT-2: norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=True, qk_norm=False,
           value_residual=False
    Llama: norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, qk_norm=False, value_residual=False,
           n_kv_heads < n_heads

Value residual: every layer after the first attends over a learned mix of its own values and the
first layer's, v = a·v + b·v₁ (a = b = 0.5 at the start), so later layers keep a direct path to
token-level information.

Parameter names (H = n_heads, K = n_kv_heads, hd = d_model // n_heads, F = d_ff, L = context_len):

    tok_emb.weight                 (V, D)   token embedding (also the output matrix when tied)
    pos_emb.weight                 (L, D)   learned positions, only when pos="learned"
    blocks.{i}.attn_norm.weight    (D,)     (+ .bias for layernorm with bias=True)
    blocks.{i}.attn.qkv.weight     ((H + 2K)·hd, D)  rows: H·hd query rows, then K·hd key rows,
                                            then K·hd value rows; head h owns rows h·hd..(h+1)·hd
    blocks.{i}.attn.qkv.bias       ((H + 2K)·hd,)    only when bias=True, same layout
    blocks.{i}.attn.q_norm.weight  (hd,)    only when qk_norm=True (RMSNorm over head_dim)
    blocks.{i}.attn.k_norm.weight  (hd,)
    blocks.{i}.attn.proj.weight    (D, H·hd) (+ .bias)  attention output projection
    blocks.{i}.attn.value_mix      (2,)     (a, b) of the value residual, in blocks 1.. only
    blocks.{i}.mlp_norm.weight     (D,)     (+ .bias)
    blocks.{i}.mlp.gate.weight     (F, D)   only for mlp="swiglu" (HF gate_proj)
    blocks.{i}.mlp.fc.weight       (F, D)   (+ .bias)  up projection (HF up_proj / GPT-2 c_fc)
    blocks.{i}.mlp.proj.weight     (D, F)   (+ .bias)  down projection (HF down_proj / GPT-2 c_proj)
    norm.weight                    (D,)     (+ .bias)  final norm
    lm_head.weight                 (V, D)   only when tie_embeddings=False; never has a bias

Note GPT-2's Conv1D stores weights as (in, out): the importer transposes them. RoPE uses the
Hugging Face Llama "rotate_half" convention: dimension j pairs with j + hd/2, inv_freq = θ^(-2i/hd).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import is_number
from lmforge.errors import LmforgeError

from .dropout import dropout

CHOICES = {"norm": ("rmsnorm", "layernorm"), "pos": ("rope", "learned"), "mlp": ("relu2", "gelu", "swiglu")}


@dataclass
class TransformerConfig:
    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (resolved on creation)
    context_len: int = 128  # training sequence length, also the KV cache size and max_context
    dropout: float = 0.05  # on the embedding and both residual branches; it pays on a 1 MB corpus
    # on the attention weights: none, since PyTorch's CPU flash kernel has no dropout and the math path it
    # falls back to made a step 194 ms against 167, for nothing measurable (1.4773 / 1.4794 bits per byte after
    # 880 steps with seeds 1337 / 7, against 1.4777 / 1.4779 with 0.05). Runs saved before this field
    # existed load with their `dropout` here, as they were trained.
    attention_dropout: float = 0.0
    d_ff: int | None = None  # MLP width; None = 4 * d_model (resolved on creation)
    norm: str = "rmsnorm"
    pos: str = "rope"
    mlp: str = "relu2"
    bias: bool = False  # biases on every Linear and LayerNorm except the output head
    qk_norm: bool = True
    tie_embeddings: bool = True  # head = embedding: 0.9M fewer parameters, 1.553 vs 1.563 bits per byte at 300 s
    logit_softcap: float | None = None  # logits -> softcap * tanh(logits / softcap)
    # later layers' values mix in the first layer's: 1.491 against 1.497 bits per byte after 880 steps.
    # A run saved before this option existed has none in its config.json and loads with False.
    value_residual: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        # Resolve the defaults that depend on other fields, so asdict() is explicit and rebuilds the same model.
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        self.d_ff = 4 * self.d_model if self.d_ff is None else self.d_ff
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "context_len", "d_ff"):
            value = getattr(self, name)
            if not is_number(value, integer=True) or value < 1:
                raise LmforgeError(f"model.{name} must be a positive integer, got {value!r}")
        if self.context_len < 2:  # decoding re-reads part of a full window, and a window of 1 has no part
            raise LmforgeError(f"model.context_len must be at least 2, got {self.context_len}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise LmforgeError(f"model.{name}={getattr(self, name)!r} is unknown; choose one of {', '.join(allowed)}")
        if self.d_model % self.n_heads:
            raise LmforgeError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                               f"pick n_heads that divides d_model")
        if self.n_heads % self.n_kv_heads:
            raise LmforgeError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}; "
                               f"pick n_kv_heads that divides n_heads")
        if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
            raise LmforgeError(f"RoPE needs an even head size, got d_model/n_heads = {self.d_model // self.n_heads}; "
                               f"change d_model or n_heads")
        for name in ("dropout", "attention_dropout"):  # their types are checked by build_model
            if not 0.0 <= getattr(self, name) < 1.0:
                raise LmforgeError(f"model.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise LmforgeError(f"model.logit_softcap must be a positive number or unset, got {self.logit_softcap!r}")
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise LmforgeError("model.rope_theta and model.norm_eps must be positive")


class _RMSNormFunction(torch.autograd.Function):
    """x * rsqrt(mean(x²) + eps) * weight with a hand-written backward. On the CPU, autograd's
    version differentiates pow/mean/rsqrt one op at a time; this one saves x̂ and rstd and needs
    four elementwise ops and two reductions."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        # vecdot reads x twice without writing x² out: large activations cost memory passes here.
        rstd = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1) / x.size(-1) + eps)  # (..., 1)
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad):
        x_hat, rstd, weight = ctx.saved_tensors
        g = grad * weight
        if x_hat.dtype != g.dtype:  # mixed precision: bf16 activations, fp32 gradients
            x_hat = x_hat.to(g.dtype)
        mean = torch.linalg.vecdot(g, x_hat).unsqueeze(-1) / x_hat.size(-1)  # mean(g · x̂) per row
        dx = torch.addcmul(g, x_hat, mean, value=-1).mul_(rstd)  # (g - x̂ · mean) · rstd
        dw = (grad * x_hat).reshape(-1, *weight.shape).sum(0)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension; `weight` is (D,) or broadcasts over x's trailing dimensions
    (the joint QK-norm passes one (heads, head_dim) weight for all query and key heads)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNormFunction.apply(x, weight, eps)
    if weight.dim() == 1:
        return F.rms_norm(x, (x.size(-1),), weight, eps)  # inference: one call
    return F.rms_norm(x, (x.size(-1),), None, eps) * weight


class RMSNorm(nn.Module):
    """RMSNorm with a learnable `weight`, numerically the same as nn.RMSNorm and HF Llama's."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def make_norm(cfg: TransformerConfig, dim: int) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(dim, eps=cfg.norm_eps)  # x * rsqrt(mean(x²) + eps) * weight, as in HF Llama


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, head_dim), HF layout: the hd/2 frequencies repeated twice. The sin
    table's first half is negated, so rotate_half(x) * sin is swap_halves(x) * sin_table."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (L, hd/2)
    return torch.cat([angles, angles], dim=-1).cos().float(), torch.cat([-angles, angles], dim=-1).sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # (..., hd): rotate each pair (x[j], x[j + hd/2]) by its position's angle (HF's "rotate_half"
    # convention): x * cos + (-x[hd/2:], x[:hd/2]) * sin, the halves swapped by one flip.
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin


@dataclass
class KVCache:
    """The Transformer's decoding state: per-layer key and value buffers (B, n_kv_heads, context_len,
    head_dim) and, per row, how many positions they hold (`pos`).

    Rows may hold different lengths (a server decodes requests of different ages together); a call
    with several new positions needs rows of one length. The model writes the new keys and values
    into the buffers in place and advances `pos`: the state passed in is updated and returned.

    `room`: buffers with more rows than the state holds, whose first rows `keys` and `values` are (views),
    kept by cat_states and select_state so that a row joining or leaving a batch copies that row's
    cache, not every row's (each holds the whole context: a megabyte at the standard shape in bf16)."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pos: list[int]
    room: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def _room_rows(self) -> int:
        """How many rows the room holds (0 without one, or when `keys` are no longer its views)."""
        if self.room is None or self.room[0][0].data_ptr() != self.keys[0].data_ptr():
            return 0
        return self.room[0][0].size(0)


@dataclass
class _Window:
    """Where one forward call's T new positions sit in the cache, and what they attend to."""
    start: int | None  # the first new position when every row is at the same one, else None
    index: torch.Tensor | None  # (B,) each row's new position, when rows differ (T = 1)
    length: int  # cache positions attended to: 0 .. length - 1
    mask: torch.Tensor | None  # True where a query may attend; None = causal or everything
    causal: bool


def _window(state: KVCache, T: int, context_len: int, device) -> _Window:
    lo, hi = min(state.pos), max(state.pos)
    if hi + T > context_len:
        raise LmforgeError(f"{hi + T} tokens exceed the Transformer's max_context={context_len}; "
                           f"crop the input or start a fresh state")
    if lo == hi:
        mask = None
        if lo > 0 and T > 1:  # query i (absolute position lo + i) sees keys <= lo + i
            mask = torch.arange(lo + T, device=device)[None, :] <= torch.arange(lo, lo + T, device=device)[:, None]
        return _Window(lo, None, lo + T, mask, causal=lo == 0 and T > 1)
    if T != 1:
        raise LmforgeError("rows of a Transformer state hold different lengths; feed them one position at a time")
    index = torch.tensor(state.pos, device=device)
    mask = (torch.arange(hi + 1, device=device)[None, :] <= index[:, None])[:, None, None, :]  # (B, 1, 1, hi + 1)
    return _Window(None, index, hi + 1, mask, causal=False)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.upcast = True  # on a CPU under bf16 autocast, attend in fp32 (Transformer.set_attention_upcast)
        # the value residual's (own, first layer's) weights; the first layer's values are the ones mixed in
        self.value_mix = nn.Parameter(torch.tensor([0.5, 0.5])) if cfg.value_residual and layer > 0 else None

    def forward(self, x, rope, cache: tuple[torch.Tensor, torch.Tensor] | None = None, window: _Window | None = None,
                first_values: torch.Tensor | None = None):
        """x (B, T, D) -> ((B, T, D), this layer's values (B, K, T, hd) before any mixing). `cache`: this
        layer's key and value buffers, written at `window`. `first_values`: the first layer's, for the
        value residual."""
        B, T, _ = x.shape
        H, K, hd = self.n_heads, self.n_kv_heads, self.head_dim
        # Query and key heads are normalised and rotated together, as one (B, T, H + K, hd) block:
        # half the elementwise calls, and each call has a fixed cost that shows in small steps.
        qk, v = self.qkv(x).view(B, T, H + 2 * K, hd).split([H + K, K], dim=2)
        if self.q_norm is not None:  # QK-norm (per head, over head_dim) comes before RoPE, as in Qwen3
            weight = torch.cat([self.q_norm.weight.expand(H, hd), self.k_norm.weight.expand(K, hd)])
            qk = rms_norm(qk, weight, self.q_norm.eps)
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.transpose(1, 2).split([H, K], dim=1)  # (B, H, T, hd), (B, K, T, hd)
        v = own = v.transpose(1, 2)  # (B, K, T, hd)
        if self.value_mix is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * first_values
        mask, causal = None, T > 1
        if cache is not None:
            k_cache, v_cache = cache
            if window.start is not None:
                k_cache[:, :, window.start:window.start + T] = k
                v_cache[:, :, window.start:window.start + T] = v
            else:  # one new position per row, each at its own place
                rows = torch.arange(B, device=x.device)
                k_cache[rows, :, window.index] = k[:, :, 0]
                v_cache[rows, :, window.index] = v[:, :, 0]
            k, v = k_cache[:, :, :window.length], v_cache[:, :, :window.length]  # (B, K, length, hd)
            mask, causal = window.mask, window.causal
        attend = partial(F.scaled_dot_product_attention, attn_mask=mask, is_causal=causal,
                         dropout_p=self.dropout if self.training else 0.0, enable_gqa=K != H)
        if self.upcast and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # PyTorch's CPU flash-attention kernel can be slower in bf16 than in fp32 (on a Zen 4: 46 against
            # 37 ms forward and backward per layer at the standard training shape); the probe decides
            with torch.autocast("cpu", enabled=False):
                y = attend(q.float(), k.float(), v.float())
        else:
            y = attend(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * hd)), own  # (B, H, T, hd) -> (B, T, D)


class ReLUSquared(torch.autograd.Function):
    """relu(x)² with a hand-written backward: 2·relu(x)·grad is one saved tensor and two ops, where
    autograd's relu-then-pow keeps both and runs pow's generic backward (~10% of a CPU step)."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        # 2 · grad · r in one pass (addcmul onto a broadcast zero), not two over a (B, T, 4D) tensor
        return torch.addcmul(grad.new_zeros(()), grad, r.to(grad.dtype), value=2.0)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):  # (B, T, D) -> (B, T, F) -> (B, T, D)
        if self.kind == "swiglu":
            return self.proj(F.silu(self.gate(x)) * self.fc(x))
        if self.kind == "gelu":  # GPT-2's "gelu_new" is the tanh approximation
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        h = self.fc(x)
        if torch.is_grad_enabled() and h.requires_grad:
            return self.proj(ReLUSquared.apply(h))
        return self.proj(h.relu_().square_())  # inference: in place, no autograd bookkeeping


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int = 0):
        super().__init__()
        self.attn_norm, self.attn = make_norm(cfg, cfg.d_model), Attention(cfg, layer)
        self.mlp_norm, self.mlp = make_norm(cfg, cfg.d_model), MLP(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, rope, cache=None, window=None, first_values=None):
        """(B, T, D) -> ((B, T, D), the attention's own values), a pre-norm residual block."""
        # Dropout is skipped outright unless training: single-token decoding is bound by per-op overhead.
        a, values = self.attn(self.attn_norm(x), rope, cache, window, first_values)
        x = x + dropout(a, self.dropout, self.training)
        m = self.mlp(self.mlp_norm(x))
        return x + dropout(m, self.dropout, self.training), values


class Transformer(nn.Module):
    arch = "transformer"

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_len, cfg.d_model) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.pos == "rope":  # not persistent: derived from the config, so not in the state_dict
            cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.context_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Embeddings and every Linear ~ N(0, 0.02); biases 0; norm weights 1; attn.proj and mlp.proj
        zero, so each block starts as the identity and the residual stream carries the embedding."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)

    @property
    def max_context(self) -> int:
        return self.config.context_len

    def set_attention_upcast(self, upcast: bool) -> None:
        """Whether attention runs in fp32 under CPU bf16 autocast (a speed choice, measured by the probe)."""
        for block in self.blocks:
            block.attn.upcast = upcast

    @property
    def hidden_size(self) -> int:
        return self.config.d_model

    @property
    def lora_targets(self) -> tuple[str, ...]:
        targets = ("qkv", "proj", "fc") + (("gate",) if self.config.mlp == "swiglu" else ())
        return targets + (() if self.config.tie_embeddings else ("lm_head",))

    def parameter_groups(self) -> dict[str, list]:
        """embeddings, layers (one list per block, in order), head (the untied output matrix) and the rest."""
        embeddings = [self.tok_emb.weight] + ([self.pos_emb.weight] if self.pos_emb is not None else [])
        return {"embeddings": embeddings, "layers": [list(block.parameters()) for block in self.blocks],
                "head": [] if self.lm_head is None else [self.lm_head.weight], "other": list(self.norm.parameters())}

    def init_state(self, batch_size: int, device, dtype, length: int | None = None) -> KVCache:
        """Empty buffers for `length` positions (default: the whole context; a prompt that fills a
        shorter buffer can be moved into a full one after, see Decoder.prefill)."""
        cfg = self.config
        shape = (batch_size, cfg.n_kv_heads, length or cfg.context_len, cfg.d_model // cfg.n_heads)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks]
        return KVCache(keys, [torch.zeros_like(k) for k in keys], [0] * batch_size)

    @staticmethod
    def select_state(state: KVCache, rows: list[int]) -> KVCache:
        """A state holding `rows` of `state`, in that order. Where each row either stays where it is or
        comes from past the new end (the last rows filling the places of those that left), the rows
        that move are copied within the buffers, which are kept (the old state is then spent);
        otherwise, or when the rows left would fill less than a quarter of them, into new buffers."""
        n, room = len(rows), state._room_rows()
        if room >= n > room // 4 and len(set(rows)) == n and all(r == i or r >= n for i, r in enumerate(rows)):
            for i, r in enumerate(rows):
                if r != i:
                    for buffer in state.keys + state.values:
                        buffer[i].copy_(buffer[r])
            keys, values = state.room
            return KVCache([k[:n] for k in keys], [v[:n] for v in values], [state.pos[r] for r in rows], state.room)
        index = torch.tensor(rows, device=state.keys[0].device)
        return KVCache([k.index_select(0, index) for k in state.keys], [v.index_select(0, index) for v in state.values],
                       [state.pos[r] for r in rows])

    @staticmethod
    def cat_states(states: list[KVCache]) -> KVCache:
        """One state whose rows are those of `states`, in order: written after the first state's rows
        into its room if it has enough (the first state is then spent), else into new buffers with room
        for as many rows again (up to the next power of two)."""
        first, total = states[0], sum(len(s.pos) for s in states)
        if first._room_rows() >= total:
            keys, values = first.room
            at, rest = len(first.pos), states[1:]
        else:
            rows = 1 << (total - 1).bit_length()
            keys = [k.new_empty((rows, *k.shape[1:])) for k in first.keys]
            values = [v.new_empty((rows, *v.shape[1:])) for v in first.values]
            at, rest = 0, states
        for s in rest:
            b = len(s.pos)
            for buffer, part in zip(keys + values, s.keys + s.values):
                buffer[at:at + b].copy_(part)
            at += b
        return KVCache([k[:total] for k in keys], [v[:total] for v in values], [p for s in states for p in s.pos],
                       (keys, values))

    def hidden(self, tokens: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache | None]:
        """(B, T) ids -> final normed hidden states (B, T, D), continuing from `state`; None starts a
        fresh sequence and keeps no cache (training, scoring whole windows)."""
        B, T = tokens.shape
        window = None if state is None else _window(state, T, self.config.context_len, tokens.device)
        if window is None and T > self.config.context_len:
            raise LmforgeError(f"{T} tokens exceed the Transformer's max_context={self.config.context_len}; "
                               f"crop the input")
        x = self.tok_emb(tokens)  # (B, T, D)
        if self.pos_emb is not None:
            x = x + (self.pos_emb(window.index)[:, None] if window is not None and window.index is not None
                     else self.pos_emb.weight[(window.start if window else 0):][:T])
        x = dropout(x, self.config.dropout, self.training)
        rope = None
        if self.config.pos == "rope":
            if window is not None and window.index is not None:  # (B, 1, 1, hd): one position per row
                rope = (self.rope_cos[window.index][:, None, None], self.rope_sin[window.index][:, None, None])
            else:  # (T, 1, hd): broadcast over the rows and over the heads of a (B, T, heads, hd) block
                start = window.start if window else 0
                rope = (self.rope_cos[start:start + T, None], self.rope_sin[start:start + T, None])
            rope = (rope[0].to(x.dtype), rope[1].to(x.dtype))
        first_values = None
        for i, block in enumerate(self.blocks):
            x, values = block(x, rope, None if state is None else (state.keys[i], state.values[i]), window, first_values)
            if i == 0 and self.config.value_residual:
                first_values = values
        if state is not None:
            state.pos = [p + T for p in state.pos]
        return self.norm(x), state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, V) logits, soft-capped when logit_softcap is set."""
        # Call lm_head as a module (not its .weight) so a LoRA wrapper around it takes effect.
        logits = F.linear(hidden, self.tok_emb.weight) if self.lm_head is None else self.lm_head(hidden)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def forward(self, tokens: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache | None]:
        hidden, state = self.hidden(tokens, state)
        return self.head(hidden), state

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), the PaLM estimate: 6·N + 12·n_layers·d_model·context_len,
        N = parameters of every matmul (the blocks' Linears and the output head, tied or not; embedding
        lookups excluded). The second term is attention's QKᵀ and AV over a full context."""
        cfg = self.config
        attn_width = (cfg.n_heads + 2 * cfg.n_kv_heads) * (cfg.d_model // cfg.n_heads)  # qkv output size
        mlp_mats = 3 if cfg.mlp == "swiglu" else 2
        per_layer = cfg.d_model * attn_width + cfg.d_model * cfg.d_model + mlp_mats * cfg.d_model * cfg.d_ff
        n = cfg.n_layers * per_layer + cfg.vocab_size * cfg.d_model  # blocks + output head
        return 6 * n + 12 * cfg.n_layers * cfg.d_model * cfg.context_len
