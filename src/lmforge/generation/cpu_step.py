"""A fast single-position Transformer step for CPU decoding: smaller weights and a flat function.

A decoding step multiplies each weight matrix by one new position per sequence, so it reads every
weight to use it once (or a few times). On a CPU that read bounds the matrix products: with the
standard 4-layer, d_model 256 Transformer its 17 matrices cost about 2 of the 3 ms of a batch-1
step in fp32. The rest of a step is about a hundred small tensor operations, each costing a few
microseconds of dispatch whatever its size.

`TransformerStep(model, weights)` attacks both: one flat function over prepared weights, with each
norm's gain folded into the matrix that follows it and no nn.Module calls, its matrices int8 with a
scale per row (a fast PyTorch kernel on CPUs with bf16 units) or fp16. It reads the model's weights
and never changes the model; `generation.Decoder` decides when to use it.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..device import all_but_global_state

FP16_MAX = 60000.0  # fp16 overflows at 65504: weights whose products could pass this keep fp32


def _stamps(tensors: list[torch.Tensor]) -> list[tuple]:
    """What identifies each tensor's contents: its storage address and version. In-place updates bump
    _version; tensors made under inference_mode have none (and stay fixed outside it), so their
    address alone identifies them (asking is_inference of each costs more than the rare exception)."""
    try:
        return [(t.data_ptr(), t._version) for t in tensors]
    except RuntimeError:
        return [(t.data_ptr(), None if t.is_inference() else t._version) for t in tensors]


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(weight.double(), dim=1)


_int8_ok: bool | None = None


def int8_matmul_available() -> bool:
    """Whether this CPU multiplies bf16 rows by int8 weights fast: PyTorch's weight-only int8 kernel
    (a private op, so it is probed once) on a CPU with bf16 units."""
    global _int8_ok
    if _int8_ok is None:
        from lmforge.device import cpu_has_bf16

        try:
            probe = torch._weight_int8pack_mm(torch.ones(1, 32, dtype=torch.bfloat16),
                                              torch.ones(8, 32, dtype=torch.int8), torch.ones(8, dtype=torch.bfloat16))
            _int8_ok = cpu_has_bf16() and bool((probe == 32).all())
        except (AttributeError, RuntimeError):
            _int8_ok = False
    return _int8_ok


class _Matrix:
    """A weight matrix prepared for decoding steps: `m(x)` is x @ Wᵀ for rows x in `m.dtype`. Held as
    int8 with one bf16 scale per row (bf16 rows in and out), fp16, or the fp32 weight itself."""
    __slots__ = ("dtype", "weight", "scales")

    def __init__(self, weight: torch.Tensor, int8: bool, input_bound: float, output_bound: float):
        self.scales = None
        # PyTorch's int8 kernel reads rows in blocks of 32 (other widths came out wrong or crashed it). The
        # scales, one per row, are rounded up to bf16 values, so that |w / scale| <= 127.
        if int8 and weight.size(1) % 32 == 0:
            scales = (weight.abs().amax(dim=1).clamp_min(1e-30) / 127 * (1 + 2 ** -7)).bfloat16()
            self.weight = torch.round(weight / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
            self.scales, self.dtype = scales, torch.bfloat16
        elif max(input_bound, output_bound) < FP16_MAX:  # no input or output element can leave fp16's range
            self.weight = weight.half()
            self.dtype = torch.float16
        else:
            self.weight, self.dtype = weight, weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales is None:
            return F.linear(x, self.weight)
        return torch._weight_int8pack_mm(x, self.weight, self.scales)


class TransformerStep:
    """One decoding step of a Transformer (RMSNorm, RoPE, no biases: lmforge's own block and Llama's)
    as a flat sequence of tensor operations over prepared weights.

    With x̂ = x · rsqrt(Σx² + D·eps), RMSNorm(x) · g = x̂ · (√D · g), so every norm's gain goes into
    the columns of the matrix after it and a norm costs three small ops. QK-norm's gain (times √hd)
    multiplies RoPE's cos and sin rows, and its per-head scale, being a scalar, is applied after the
    rotation. The residual stream stays fp32; attention runs in the KV cache's dtype, fp32 or bf16
    (the decoder's choice: halving the bytes each step reads from a long cache pays on some CPUs).

    The matrices: on a CPU with bf16 units, int8 with a bf16 scale per row (bf16 activations),
    which halves the bytes again and has a fast kernel there. Elsewhere fp16, for each matrix whose
    inputs and outputs provably stay within fp16's range (bounds from row norms: an input after a
    norm has length at most 1), else fp32."""

    traced = False  # True in the copy that CompiledStep hands to the compiler

    def __init__(self, model: nn.Module, int8: bool | None = None):
        cfg = model.config
        D, H, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
        hd = D // H
        int8 = int8_matmul_available() if int8 is None else int8
        self.heads, self.kv_heads, self.head_dim, self.mlp = H, K, hd, cfg.mlp
        self.softcap, self.qk_norm = cfg.logit_softcap, cfg.qk_norm
        self.sources = list(model.parameters())
        self.stamps = _stamps(self.sources)
        # every (parent's children, name, child) link: LoRA and merging swap layers through these
        self.links = [(parent._modules, name, child) for parent in model.modules()
                      for name, child in parent._modules.items()]
        with torch.no_grad():
            self.embedding = model.tok_emb.weight
            self.layers, gains, self.first_weights = [], [], []
            first_rows = None
            for block in model.blocks:
                attn, mlp = block.attn, block.mlp
                wqkv = attn.qkv.weight * (block.attn_norm.weight * math.sqrt(D))
                v_rows = _row_norms(wqkv[(H + K) * hd:]).view(K, hd)
                first_rows = v_rows if first_rows is None else first_rows
                # the value residual, v = a·v + b·v₁: a goes into this layer's value rows, b stays a scalar
                mix = None if attn.value_mix is None else [float(w) for w in attn.value_mix]
                self.first_weights.append(None if mix is None else mix[1])
                if mix is not None:
                    wqkv[(H + K) * hd:] *= mix[0]
                    v_rows = abs(mix[0]) * v_rows + abs(mix[1]) * first_rows  # a bound per element
                y_bound = float(v_rows.max())  # each element of an attention output mixes cached values
                y_norm = math.sqrt(H // K * float(v_rows.square().sum()))
                gain = block.mlp_norm.weight * math.sqrt(D)
                wfc = mlp.fc.weight * gain
                wgate = None if mlp.gate is None else mlp.gate.weight * gain
                fc_rows = _row_norms(wfc)
                if cfg.mlp == "relu2":
                    a_rows = fc_rows.square()
                elif cfg.mlp == "gelu":
                    a_rows = fc_rows + 1.0  # |gelu(z)| <= |z| + 0.17
                else:
                    gate_rows = _row_norms(wgate)
                    a_rows, fc_rows = fc_rows * gate_rows, torch.maximum(fc_rows, gate_rows)  # |silu(z)| <= |z|
                a_bound, a_norm = float(a_rows.max()), float(a_rows.square().sum().sqrt())
                # fc (and gate) and the activation after them share a dtype, so the activation bounds both
                fc_out = max(float(fc_rows.max()), a_bound)
                self.layers.append((
                    _Matrix(wqkv, int8, 1.0, float(_row_norms(wqkv).max())),
                    _Matrix(attn.proj.weight, int8, y_bound, float(_row_norms(attn.proj.weight).max()) * y_norm),
                    _Matrix(wfc, int8, 1.0, fc_out),
                    None if wgate is None else _Matrix(wgate, int8, 1.0, fc_out),
                    _Matrix(mlp.proj.weight, int8, a_bound, float(_row_norms(mlp.proj.weight).max()) * a_norm),
                ))
                if cfg.qk_norm:
                    gains.append(torch.cat([attn.q_norm.weight.expand(H, hd), attn.k_norm.weight.expand(K, hd)])
                                 * math.sqrt(hd))
                else:
                    gains.append(torch.ones(H + K, hd, device=wqkv.device))
            self.cos_gains = torch.stack(gains)  # (layers, H + K, hd)
            self.sin_gains = self.cos_gains.roll(hd // 2, -1)  # the halves swapped, as RoPE pairs them
            self.cos, self.sin = model.rope_cos, model.rope_sin
            head = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight
            head = head * (model.norm.weight * math.sqrt(D))
            self.head = _Matrix(head, int8, 1.0, float(_row_norms(head).max()))
            self.eps_d = torch.full((1, 1, 1), D * cfg.norm_eps, device=head.device)
            self.eps_hd = torch.full((1, 1, 1), hd * cfg.norm_eps, device=head.device)

    @staticmethod
    def covers(model: nn.Module) -> bool:
        """Whether the decoder computes exactly what this model's modules do (no LoRA or other wrappers)."""
        cfg = model.config
        if getattr(model, "arch", None) != "transformer":
            return False
        if cfg.norm != "rmsnorm" or cfg.pos != "rope" or cfg.bias or model.tok_emb.weight.dtype != torch.float32:
            return False
        linears = [model.lm_head] if model.lm_head is not None else []
        for block in model.blocks:
            linears += [block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj]
            linears += [block.mlp.gate] if block.mlp.gate is not None else []
        return all(type(m) is nn.Linear for m in linears)

    def fresh(self, model: nn.Module) -> bool:
        """Whether `model` still has the weights this step was built from, unchanged (an optimizer step
        or load_state_dict changes their stamps) and still the layers it was built from (LoRA swaps
        them). Checked every step, so it looks only at what can change, with dictionary lookups rather
        than module attributes: a few dozen stamps and links, about 8 µs, where covers() alone takes 30."""
        return all(children.get(name) is child for children, name, child in self.links) \
            and _stamps(self.sources) == self.stamps

    def _normed(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # x̂ = x · rsqrt(Σx² + D·eps): RMSNorm without its gain and √D, which are in the next weight
        return (x * _inverse_norm(x, self.eps_d, self.traced)).to(dtype)

    def __call__(self, tokens: torch.Tensor, state) -> torch.Tensor:
        """(B,) token ids, the KV cache -> (B, V) fp32 logits; writes each row's keys and values at
        that row's position and advances state.pos. Rows may be at different positions."""
        lo, hi = min(state.pos), max(state.pos)
        logits = self.run(tokens, lo if lo == hi else torch.tensor(state.pos), hi + 1, state.keys, state.values)
        state.pos = [p + 1 for p in state.pos]
        return logits

    def run(self, tokens: torch.Tensor, at: int | torch.Tensor, length: int, keys: list[torch.Tensor],
            values: list[torch.Tensor]) -> torch.Tensor:
        """The step itself: (B,) ids -> (B, V) logits. `at` is the position every row writes (an int),
        or each row's own (a (B,) tensor: rows attend to their own past only, through a mask); rows
        attend to the first `length` cache positions. Writes the new keys and values into `keys` and
        `values` in place. In the copy that CompiledStep traces (`traced`), norms and attention are
        spelt out in elementwise operations and sums, which the compiler fuses (PyTorch's fused
        attention kernel and batched products are opaque to it)."""
        B = tokens.size(0)
        H, K, hd = self.heads, self.kv_heads, self.head_dim
        if isinstance(at, int):  # every row at one position: plain slices, no mask
            mask = None
            cos, sin = self.cos[at], self.sin[at]  # (hd,)
        else:
            mask = torch.arange(length, device=at.device)[None, :] <= at[:, None]  # (B, length)
            cos, sin = self.cos[at][:, None], self.sin[at][:, None]  # (B, 1, hd)
        rows = torch.arange(B, device=tokens.device)
        cos = torch.mul(self.cos_gains[:, None], cos).unbind(0)  # per layer: (1 or B, H + K, hd)
        sin = torch.mul(self.sin_gains[:, None], sin).unbind(0)
        x = F.embedding(tokens, self.embedding)  # (B, D): a new tensor, updated in place below
        first = None  # the first layer's values, for the value residual
        for (qkv_w, out_w, fc_w, gate_w, proj_w), cos_l, sin_l, k_cache, v_cache, b in zip(
                self.layers, cos, sin, keys, values, self.first_weights):
            qkv = qkv_w(self._normed(x, qkv_w.dtype)).view(B, H + 2 * K, hd)
            v = qkv[:, H + K:]
            if first is None and self.first_weights[-1] is not None:  # only a model with the value residual
                first = v.float()
            if b is not None:
                v = torch.add(v.float(), first, alpha=b)
            qk = qkv[:, :H + K].float()
            # QK-norm's per-head scale, from the raw heads; its gain is in the cos and sin rows
            scale = _inverse_norm(qk, self.eps_hd, self.traced) if self.qk_norm else None
            # RoPE (HF's rotate_half: rolling a head by half its size swaps its halves)
            qk = torch.addcmul(qk * cos_l, qk.roll(hd // 2, -1), sin_l)
            if scale is not None:
                qk.mul_(scale)
            if mask is None:
                k_cache.select(2, at).copy_(qk[:, H:])
                v_cache.select(2, at).copy_(v)
            else:
                k_cache[rows, :, at] = qk[:, H:].to(k_cache.dtype)
                v_cache[rows, :, at] = v.to(v_cache.dtype)
            y = _attention(qk[:, :H], k_cache[:, :, :length], v_cache[:, :, :length], mask, self.traced)
            x += out_w(y.to(out_w.dtype))
            h = self._normed(x, fc_w.dtype)
            a = fc_w(h)
            if self.mlp == "relu2":
                a = a.relu_().mul_(a)
            elif self.mlp == "gelu":
                a = F.gelu(a, approximate="tanh")
            else:
                a = F.silu(gate_w(h)).mul_(a)
            x += proj_w(a.to(proj_w.dtype))
        logits = self.head(self._normed(x, self.head.dtype)).float()
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)


def _inverse_norm(x: torch.Tensor, eps_n: torch.Tensor, traced: bool) -> torch.Tensor:
    """rsqrt(Σx² + n·eps) over the last dimension (of size n), keeping it. Eagerly as one batched
    product (a single op); traced for compiling, as a sum of squares, which fuses with its neighbours."""
    if traced:
        return (x.square().sum(-1, keepdim=True) + eps_n.view(-1)).rsqrt()
    n = x.size(-1)
    return torch.baddbmm(eps_n, x.reshape(-1, 1, n), x.reshape(-1, n, 1)).view(*x.shape[:-1], 1).rsqrt_()


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               traced: bool) -> torch.Tensor:
    """One new query per row over its cached past: q (B, H, hd), keys and values (B, K, L, hd), mask
    (B, L) or None -> (B, H · hd), heads grouped over K key heads as in grouped-query attention;
    in the cache's dtype eagerly, fp32 traced."""
    B, H, hd = q.shape
    K = keys.size(1)
    if not traced:  # in the cache's dtype (traced, the products promote to fp32 and fuse with the casts)
        y = F.scaled_dot_product_attention(q.to(keys.dtype).unsqueeze(2), keys, values, enable_gqa=K != H,
                                           attn_mask=None if mask is None else mask[:, None, None, :])
        return y.view(B, H * hd)
    q = q.view(B, K, H // K, 1, hd)
    scores = (q * keys.unsqueeze(2)).sum(-1) * hd ** -0.5  # (B, K, H/K, L)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(-1).unsqueeze(-1)  # (B, K, H/K, L, 1)
    return (weights * values.unsqueeze(2)).sum(-2).reshape(B, H * hd)


class CompiledStep:
    """A TransformerStep's batch-1 steps compiled by torch.compile: Inductor turns the step's
    hundred-odd small operations into a few fused C++ loops and calls the matrix products' kernels
    directly, so a step no longer pays PyTorch's few microseconds of dispatch per operation.
    Compiling takes seconds (a C++ compiler must be installed; PyTorch caches the result on disk),
    so `Decoder.compile` does it only when asked, and keeps it only where it measured it faster.

    Batches of several rows step uncompiled: there the compiled step was no faster (its fused
    attention loops lose to PyTorch's attention kernel as the rows' caches grow). The position is
    a tensor and the attention masked, so one graph serves every position; the span attended starts
    at 2 (the compiler specialises sizes of 1; the extra position is masked), and a step that fills
    the cache's last position (a span as long as the cache, which it would also specialise) runs
    uncompiled: once per refill of a full context."""

    def __init__(self, step: TransformerStep):
        self.step = step
        traced = copy.copy(step)
        traced.traced = True
        self.fn = torch.compile(traced.run, dynamic=True,
                                options={"cpp_wrapper": True, "guard_filter_fn": all_but_global_state})

    @staticmethod
    @contextlib.contextmanager
    def tracing():
        """The settings to make the first calls (the compilation) under: Python floats in the step (the
        value residual's weights) kept as constants. Otherwise Dynamo traces them as symbols, then
        restarts its analysis to turn them back into constants: 7.4 s against 3.9 s on a warm cache.
        Inductor's note that a fused loop mixes bf16 and fp16 (fp16 weights beside a bf16 cache) is
        not for the user: the loop computes in fp32."""
        config = torch._dynamo.config
        patch = hasattr(config, "specialize_float")
        constants = config.patch(specialize_float=True) if patch else contextlib.nullcontext()
        with warnings.catch_warnings(), constants:
            warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")
            yield

    def __call__(self, tokens: torch.Tensor, state) -> torch.Tensor:
        length = max(state.pos[0] + 1, 2)
        if tokens.size(0) != 1 or length >= state.keys[0].size(2):
            return self.step(tokens, state)
        # Called under inference mode (Decoder.step), which makes the copy an inference tensor whatever
        # `tokens` was: the compiler's checks tell the two kinds apart, and a mismatch compiles anew.
        logits = self.fn(tokens.clone(), torch.tensor(state.pos), length, state.keys, state.values)
        state.pos = [state.pos[0] + 1]
        return logits
