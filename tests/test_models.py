"""Model families: shapes, causality, stateful == full forward, save/load, learning, config errors."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.models import MODELS, build_model, config_class, count_params

V = 40
TINY = {
    "transformer": dict(d_model=32, n_layers=2, n_heads=4, context_len=32),
    "lstm": dict(d_model=32, d_hidden=32, n_layers=2, context_len=32),
    "gru": dict(d_model=32, d_hidden=32, n_layers=2, context_len=32),
    "cnn": dict(d_model=32, n_layers=2, kernel_size=3, context_len=32),
}
# Extra Transformer shapes the importer needs to represent exactly, plus the remaining options.
VARIANTS = {
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=True, qk_norm=False),
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, qk_norm=False, n_kv_heads=2),
    "softcap_mqa": dict(n_kv_heads=1, logit_softcap=5.0, d_ff=48),
}
CASES = [(arch, {}) for arch in MODELS] + [("transformer", extra) for extra in VARIANTS.values()]
IDS = list(MODELS) + [f"transformer-{name}" for name in VARIANTS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy shared CPU their barriers stall.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(arch, seed=0, **extra):
    torch.manual_seed(seed)
    model = build_model(arch, vocab_size=V, **{**TINY[arch], **extra})
    if arch in ("transformer", "cnn"):
        # Output projections start at zero (identity blocks); perturb every weight so the tests
        # exercise attention, convolutions and MLPs rather than an embedding -> head shortcut.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tokens(batch=2, length=16, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,extra", CASES, ids=IDS)
def test_shapes_and_contract(arch, extra):
    model = make(arch, **extra)
    x = tokens()
    logits, state = model(x)
    assert logits.shape == (2, 16, V) and logits.dtype == torch.float32
    hidden, _ = model.hidden(x)
    torch.testing.assert_close(model.head(hidden), logits)
    assert model.arch == arch and model.config.context_len == 32
    assert model.max_context == (32 if arch == "transformer" else None)
    assert model.flops_per_token() > 6 * count_params(model, exclude_embeddings=True) // 2
    names = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for target in model.lora_targets:  # every target names at least one nn.Linear
        assert any(name.split(".")[-1] == target for name in names), target


@pytest.mark.parametrize("arch,extra", CASES, ids=IDS)
def test_causal(arch, extra):
    model = make(arch, **extra)
    x = tokens()
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % V
    before, _ = model(x)
    after, _ = model(y)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=0)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


@pytest.mark.parametrize("arch,extra", CASES, ids=IDS)
def test_stateful_equals_full_forward(arch, extra):
    model = make(arch, **extra)
    x = tokens(length=20)
    full, _ = model(x)
    for chunks in ([1] * 20, [3, 5, 1, 7, 4]):  # token by token, then uneven chunks
        state, pieces, start = model.init_state(2, x.device, torch.float32), [], 0
        for size in chunks:
            logits, state = model(x[:, start:start + size], state)
            pieces.append(logits)
            start += size
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    # state=None starts fresh and returns a state that continues the sequence
    first, state = model(x[:, :12])
    rest, _ = model(x[:, 12:], state)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_transformer_refuses_to_run_past_max_context():
    model = make("transformer")
    _, state = model(tokens(length=30))
    with pytest.raises(LmforgeError, match="max_context"):
        model(tokens(length=3), state)


def test_cnn_receptive_field():
    model = make("cnn", dilations=[1, 2])
    assert model.receptive_field == 1 + 2 * 1 + 2 * 2
    x = tokens(length=20)
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % V
    a, _ = model(x)
    b, _ = model(y)
    changed = (a - b).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == list(range(5, 5 + model.receptive_field))


@pytest.mark.parametrize("arch,extra", CASES, ids=IDS)
def test_safetensors_and_config_round_trip(arch, extra, tmp_path):
    model = make(arch, **extra)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    fields = json.loads(json.dumps(dataclasses.asdict(model.config)))  # as config.json stores them
    torch.manual_seed(123)
    rebuilt = build_model(model.arch, **fields).eval()
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    x = tokens()
    torch.testing.assert_close(rebuilt(x)[0], model(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("arch,extra", CASES, ids=IDS)
def test_adam_lowers_loss_on_a_repeated_batch(arch, extra):
    torch.manual_seed(0)
    model = build_model(arch, vocab_size=V, **{**TINY[arch], **extra, "dropout": 0.0})
    x = tokens(length=17)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_dropout_only_in_training():
    model = build_model("lstm", vocab_size=V, **{**TINY["lstm"], "dropout": 0.5})
    x = tokens()
    torch.testing.assert_close(model.eval()(x)[0], model(x)[0])
    model.train()
    assert not torch.allclose(model(x)[0], model(x)[0])


def test_build_model_rejects_mistakes():
    with pytest.raises(LmforgeError, match="transformer, lstm, gru, cnn"):
        build_model("mamba", vocab_size=V)
    with pytest.raises(LmforgeError, match="n_head.*valid fields:.*n_heads"):
        build_model("transformer", vocab_size=V, n_head=4)
    with pytest.raises(LmforgeError, match="d_model=30 is not divisible by model.n_heads=4"):
        build_model("transformer", vocab_size=V, d_model=30)
    with pytest.raises(LmforgeError, match="n_kv_heads"):
        build_model("transformer", vocab_size=V, n_kv_heads=3)
    with pytest.raises(LmforgeError, match="model.mlp='geglu'.*swiglu"):
        build_model("transformer", vocab_size=V, mlp="geglu")
    with pytest.raises(LmforgeError, match="cell"):
        build_model("lstm", vocab_size=V, cell="gru")
    with pytest.raises(LmforgeError, match="dilations"):
        build_model("cnn", vocab_size=V, n_layers=2, dilations=[1, 2, 4])
    with pytest.raises(LmforgeError, match="vocab_size"):
        build_model("cnn", d_model=32)
    with pytest.raises(LmforgeError, match="d_model must be a positive integer"):
        build_model("gru", vocab_size=V, d_model="32")
    assert config_class("gru") is config_class("lstm")


def test_tutorial_lstm_parameter_count():
    # Keras tutorial: Embedding(V, 128) -> LSTM(256) -> Dense(V). torch keeps two LSTM biases where
    # Keras keeps one, hence the extra 4·256 (same function: the biases simply add).
    vocab = 80
    model = build_model("lstm", vocab_size=vocab, d_model=128, d_hidden=256, n_layers=1)
    keras = vocab * 128 + 4 * (128 * 256 + 256 * 256 + 256) + (256 * vocab + vocab)
    assert count_params(model) == keras + 4 * 256
    assert count_params(model, exclude_embeddings=True) == keras + 4 * 256 - vocab * 128
    assert model.lora_targets == ("lm_head",)


def test_tied_head_shares_the_embedding_and_saves_once():
    model = make("transformer", **VARIANTS["gpt2"])
    assert "lm_head.weight" not in model.state_dict()
    assert count_params(model) == count_params(model, exclude_embeddings=True) + (V + 32) * 32
    assert "lm_head" not in model.lora_targets


def test_hand_written_backwards_match_autograd():
    from lmforge.models.transformer import ReLUSquared, RMSNorm, _RMSNormFunction

    x = torch.randn(3, 5, 8, dtype=torch.double, requires_grad=True)
    w = torch.randn(8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (x, w))
    assert torch.autograd.gradcheck(ReLUSquared.apply, (x,))
    heads = torch.randn(2, 4, 3, 8, dtype=torch.double).transpose(1, 2).requires_grad_()  # strided, as QK-norm sees it
    per_head = torch.randn(4, 8, dtype=torch.double, requires_grad=True)  # one weight row per head
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (heads, per_head))
    norm = RMSNorm(8, 1e-5).double()
    norm.weight.data.copy_(w.detach())
    torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (8,), w, 1e-5))


def _cached_steps(model, x, prefill):
    """Logits of positions prefill.. of x, one position per call after a cached prefill, and the state."""
    state = model.init_state(x.size(0), x.device, torch.float32)
    _, state = model(x[:, :prefill], state)
    return torch.cat([model(x[:, i:i + 1], state)[0] for i in range(prefill, x.size(1))], dim=1), state


def test_fp16_decoding_of_linear_layers_is_close_and_follows_weight_updates():
    # GPT-2's block (LayerNorm, learned positions) is not the TransformerDecoder's: its Linears decode
    # through fp16 copies
    from lmforge.models.decoding import DecodeLinear, fp32_weights, prepare_for_decoding

    model = make("transformer", **VARIANTS["gpt2"])
    x = tokens(length=12)
    full, _ = model(x)
    prepare_for_decoding(model)
    assert sum(isinstance(m, DecodeLinear) for m in model.modules()) == 4 * 2  # qkv, proj, fc, proj per block
    torch.testing.assert_close(model(x)[0], full, rtol=0, atol=0)  # several positions: the fp32 weights
    exact_step, _ = _cached_steps(model, x, 11)  # autograd on: fp32 as well
    torch.testing.assert_close(exact_step, full[:, 11:], rtol=0, atol=1e-5)
    with torch.no_grad():  # as generation runs: one position per row uses the fp16 copies
        half_step, state = _cached_steps(model, x, 11)
        assert state.decoder is False and not torch.equal(half_step, exact_step)
        torch.testing.assert_close(half_step, exact_step, rtol=0, atol=5e-3)
        with fp32_weights():  # scoring: fp32 even for one position
            torch.testing.assert_close(_cached_steps(model, x, 11)[0], exact_step, rtol=0, atol=1e-5)
        model.blocks[1].mlp.proj.weight.mul_(-1)  # an in-place update (an optimizer step) must reach the copies
        torch.testing.assert_close(_cached_steps(model, x, 11)[0], model(x)[0][:, 11:], rtol=0, atol=5e-3)


DECODED = {"default": {}, "llama": VARIANTS["llama"], "softcap_mqa": VARIANTS["softcap_mqa"],
           "gelu_tied": dict(mlp="gelu", tie_embeddings=True, qk_norm=False),
           "d_ff_40": dict(d_ff=40)}  # the int8 kernel takes widths in blocks of 32: this proj stays fp16


@pytest.mark.parametrize("int8", [False, True], ids=["fp16", "int8"])
@pytest.mark.parametrize("variant", list(DECODED))
def test_transformer_decoder_matches_the_modules(variant, int8):
    from lmforge.models.decoding import TransformerDecoder, int8_matmul_available, prepare_for_decoding

    if int8 and not int8_matmul_available():
        pytest.skip("no fast int8 kernel on this CPU: the decoder uses fp16 there")
    model = make("transformer", **DECODED[variant])
    x = tokens(batch=3, length=20)
    full, _ = model(x)
    prepare_for_decoding(model)
    model._decoder = TransformerDecoder(model, int8=int8)
    with torch.no_grad():
        steps, state = _cached_steps(model, x, 8)
    assert state.decoder is model._decoder and state.pos == 20
    proj = model._decoder.layers[0][4]
    assert proj.dtype == (torch.bfloat16 if int8 and proj.weight.size(1) % 32 == 0 else torch.float16)
    # fp16 rounds each product to ~4e-4; int8 weights with a scale per row, and bf16 activations, to ~1%
    tolerance = 2e-2 if int8 else 2e-3
    torch.testing.assert_close(steps.log_softmax(-1), full[:, 8:].log_softmax(-1), rtol=0, atol=tolerance)


def test_transformer_decoder_steps_aside_for_exact_scoring_adapters_and_weight_updates():
    from lmforge.finetune.lora import apply_lora
    from lmforge.models.decoding import TransformerDecoder, fp32_weights, prepare_for_decoding

    model = prepare_for_decoding(make("transformer"))
    x = tokens(length=12)
    with torch.no_grad():
        full, _ = model(x)
        steps, state = _cached_steps(model, x, 6)
        assert isinstance(state.decoder, TransformerDecoder)
        with fp32_weights():  # scoring runs the fp32 modules: no decoder
            exact, state = _cached_steps(model, x, 6)
        assert state.decoder is None
        torch.testing.assert_close(exact, full[:, 6:], rtol=0, atol=1e-5)
        model.lm_head.weight.mul_(-1)  # an in-place update rebuilds the decoder from the new weights
        flipped, _ = _cached_steps(model, x, 6)
        torch.testing.assert_close(flipped, -steps, rtol=0, atol=1e-5)
        apply_lora(model, rank=2)  # adapters wrap the Linears: the modules decode, adapters included
        model.lm_head.lora_b.normal_()
        adapted, state = _cached_steps(model, x, 6)
        assert state.decoder is False
        torch.testing.assert_close(adapted, model(x)[0][:, 6:], rtol=0, atol=5e-3)


def test_fp16_decoder_keeps_fp32_where_fp16_could_overflow():
    from lmforge.models.decoding import TransformerDecoder, prepare_for_decoding

    model = make("transformer")
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight.mul_(300.0)  # relu² of its outputs could pass fp16's 65504
    x = tokens(length=12)
    full, _ = model(x)
    prepare_for_decoding(model)
    decoder = model._decoder = TransformerDecoder(model, int8=False)
    qkv, out, fc, _, proj = decoder.layers[0]
    assert (qkv.dtype, out.dtype, fc.dtype, proj.dtype) == (torch.float16, torch.float16, torch.float32, torch.float32)
    with torch.no_grad():
        steps, _ = _cached_steps(model, x, 6)
    assert torch.isfinite(steps).all()
    torch.testing.assert_close(steps, full[:, 6:], rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("variant", ["default", "llama"])
def test_transformer_trains_under_bf16_autocast(variant):
    # bf16 autocast: the hand-written backwards see bf16 activations and fp32 gradients (and on a CPU,
    # attention runs in fp32)
    model = make("transformer", dropout=0.0, **({} if variant == "default" else VARIANTS["llama"])).train()
    x = tokens()
    reference, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(x)
        changed, _ = model(torch.cat([x[:, :9], (x[:, 9:] + 1) % V], dim=1))  # tokens 9.. differ
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.1)  # bf16 rounds to ~0.4%
    assert torch.equal(changed[:, :9], logits[:, :9])  # causal: a position never sees later tokens
    F.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
