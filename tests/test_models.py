"""Model families: shapes, causality, stateful == full forward, save/load, learning, config errors."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.models import MODELS, build_model, config_class, count_params
from lmforge.models.dropout import dropout

V = 40
TINY = {
    "transformer": dict(d_model=32, n_layers=2, n_heads=4, context_len=32),
    "lstm": dict(d_model=32, d_hidden=32, n_layers=2, context_len=32),
    "gru": dict(d_model=32, d_hidden=32, n_layers=2, context_len=32),
    "cnn": dict(d_model=32, n_layers=2, kernel_size=3, context_len=32),
}
# Extra Transformer shapes the importer needs to represent exactly, plus the remaining options.
VARIANTS = {
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=True, qk_norm=False,
                 value_residual=False),
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, qk_norm=False, n_kv_heads=2,
                  value_residual=False),
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
    # state=None starts fresh and keeps no state: nothing comes back to continue
    assert model(x[:, :12])[1] is None


@pytest.mark.parametrize("arch,extra", CASES, ids=IDS)
def test_rows_of_a_state_can_be_taken_apart_and_joined_at_different_lengths(arch, extra):
    # What continuous batching does: sequences that started at different times, decoded in one batch.
    model = make(arch, **extra)
    a, b = tokens(batch=1, length=14, seed=2), tokens(batch=1, length=9, seed=3)
    dtype = torch.float32
    _, sa = model(a[:, :10], model.init_state(1, a.device, dtype))
    _, sb = model(b[:, :5], model.init_state(1, b.device, dtype))
    state = model.cat_states([sa, sb])  # row 0 holds 10 positions, row 1 holds 5
    steps = []
    for i in range(4):
        logits, state = model(torch.cat([a[:, 10 + i:11 + i], b[:, 5 + i:6 + i]]), state)
        steps.append(logits)
    steps = torch.cat(steps, dim=1)
    torch.testing.assert_close(steps[0], model(a)[0][0, 10:14], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps[1], model(b)[0][0, 5:9], rtol=1e-5, atol=1e-5)
    only_b = model.select_state(state, [1])  # b alone continues where it was
    logits, _ = model(a[:, :1] * 0 + 7, only_b)
    torch.testing.assert_close(logits[0, 0], model(torch.cat([b, b[:, :1] * 0 + 7], dim=1))[0][0, 9],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(MODELS))
def test_parameter_groups_cover_every_parameter_once(arch):
    model = make(arch)
    groups = model.parameter_groups()
    listed = groups["embeddings"] + [p for layer in groups["layers"] for p in layer] + groups["head"] + groups["other"]
    assert sorted(map(id, listed)) == sorted(map(id, model.parameters()))
    assert len(groups["layers"]) == model.config.n_layers
    hidden, _ = model.hidden(tokens())
    assert hidden.shape[-1] == model.hidden_size


def test_transformer_refuses_to_run_past_max_context():
    model = make("transformer")
    _, state = model(tokens(length=30), model.init_state(2, "cpu", torch.float32))
    with pytest.raises(LmforgeError, match="max_context"):
        model(tokens(length=3), state)
    with pytest.raises(LmforgeError, match="max_context"):
        model(tokens(length=33))


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


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_cpu_dropout_drops_at_its_rate_keeps_the_mean_and_repeats_with_the_seed(p):
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.003, dropped  # 400,000 draws: a standard error of 0.0003-0.0008
    assert y.unique().tolist() == [0.0, pytest.approx(1 / (1 - p), rel=1e-4)]
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # the gradient passes where the element was kept, scaled alike
    torch.manual_seed(3)
    assert torch.equal(dropout(x, p), y)
    assert dropout(x, p, training=False) is x and dropout(x, 0.0) is x
    rows = dropout(torch.ones(4096, 4, dtype=torch.bfloat16), 0.5)  # each lane of a 64-bit draw drops alike
    assert rows.dtype == torch.bfloat16
    assert ((rows == 0).float().mean(dim=0) - 0.5).abs().max() < 0.04


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
    with pytest.raises(LmforgeError, match="model.d_model must be a whole number"):
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


def _decoded(decoder, x, prefill):
    """Logits of positions prefill.. of x through `decoder`: a prefill, then one position per step."""
    logits, state = decoder.prefill(x[:, :prefill])
    out = [logits]
    for i in range(prefill, x.size(1) - 1):
        logits, state = decoder.step(x[:, i], state)
        out.append(logits)
    return torch.stack(out, dim=1), state


DECODED = {"default": {}, "llama": VARIANTS["llama"], "softcap_mqa": VARIANTS["softcap_mqa"],
           "gelu_tied": dict(mlp="gelu", tie_embeddings=True, qk_norm=False),
           "d_ff_40": dict(d_ff=40)}  # the int8 kernel takes widths in blocks of 32: this proj stays fp16


@pytest.mark.parametrize("weights", ["fp16", "int8"])
@pytest.mark.parametrize("variant", list(DECODED))
def test_transformer_step_matches_the_modules(variant, weights):
    from lmforge.generation import Decoder
    from lmforge.generation.cpu_step import int8_matmul_available

    if weights == "int8" and not int8_matmul_available():
        pytest.skip("no fast int8 kernel on this CPU: the decoder uses fp16 there")
    model = make("transformer", **DECODED[variant])
    x = tokens(batch=3, length=21)
    full, _ = model(x)
    steps, state = _decoded(Decoder(model, weights), x, 8)
    assert state.pos == [20, 20, 20]
    proj = Decoder(model, weights)._fast_step().layers[0][4]
    assert proj.dtype == (torch.bfloat16 if weights == "int8" and proj.weight.size(1) % 32 == 0 else torch.float16)
    # fp16 rounds each product to ~4e-4; int8 weights with a scale per row, and bf16 activations, to ~1%
    tolerance = 2e-2 if weights == "int8" else 2e-3
    torch.testing.assert_close(steps.log_softmax(-1), full[:, 7:20].log_softmax(-1), rtol=0, atol=tolerance)
    exact, _ = _decoded(Decoder(model, "fp32"), x, 8)
    torch.testing.assert_close(exact, full[:, 7:20], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights,cache", [("fp32", "fp32"), ("fp16", "fp32"), ("int8", "fp32"), ("fp16", "bf16")])
def test_transformer_step_decodes_rows_at_different_positions(weights, cache):
    from lmforge.generation import Decoder
    from lmforge.generation.cpu_step import int8_matmul_available

    if weights == "int8" and not int8_matmul_available():
        pytest.skip("no fast int8 kernel on this CPU")
    model = make("transformer")
    decoder = Decoder(model, weights, cache)
    a, b = tokens(batch=1, length=12, seed=4), tokens(batch=1, length=12, seed=5)
    _, sa = decoder.prefill(a[:, :9])
    _, sb = decoder.prefill(b[:, :4])
    state = decoder.cat_states([sa, sb])
    rows = []
    for i in range(3):
        logits, state = decoder.step(torch.stack([a[0, 9 + i], b[0, 4 + i]]), state)
        rows.append(logits)
    rows = torch.stack(rows, dim=1)
    assert state.keys[0].dtype == (torch.bfloat16 if cache == "bf16" else torch.float32)
    tolerance = 2e-2 if cache == "bf16" else {"fp32": 1e-5, "fp16": 2e-3, "int8": 2e-2}[weights]
    torch.testing.assert_close(rows[0].log_softmax(-1), model(a)[0][0, 9:12].log_softmax(-1), rtol=0, atol=tolerance)
    torch.testing.assert_close(rows[1].log_softmax(-1), model(b)[0][0, 4:7].log_softmax(-1), rtol=0, atol=tolerance)


@pytest.mark.parametrize("variant", ["default", "llama", "softcap_mqa"])
def test_a_bf16_cache_decodes_close_to_the_modules(variant):
    # the int8/fp16 step keeps keys and values in bf16 where the probe measured it faster: half the bytes
    # read per step, each rounded to 3 significant digits
    from lmforge.generation import Decoder

    model = make("transformer", **DECODED[variant])
    x = tokens(batch=3, length=21)
    steps, state = _decoded(Decoder(model, "fp16", "bf16"), x, 8)
    assert all(k.dtype == v.dtype == torch.bfloat16 for k, v in zip(state.keys, state.values))
    torch.testing.assert_close(steps.log_softmax(-1), model(x)[0][:, 7:20].log_softmax(-1), rtol=0, atol=2e-2)


def test_a_bf16_cache_is_handed_to_the_modules_in_their_dtype():
    # where the flat step cannot run (adapters wrap the layers; more rows than it takes) the modules
    # decode the same state: its cache comes back to fp32 first, and joins bf16 rows again later
    from lmforge.finetuning.lora import apply_lora
    from lmforge.generation import Decoder

    model = make("transformer", tie_embeddings=False)
    decoder = Decoder(model, "fp16", "bf16")
    a, b = tokens(batch=1, length=12, seed=4), tokens(batch=1, length=12, seed=5)
    with torch.no_grad():
        _, state = decoder.prefill(a[:, :6])
        apply_lora(model, rank=2)  # adapters start at zero: the same function, now through the modules
        logits, state = decoder.step(a[:, 6], state)
        assert decoder._fast_step() is None
        assert state.keys[0].dtype == torch.float32
        torch.testing.assert_close(logits.log_softmax(-1), model(a[:, :7])[0][:, 6].log_softmax(-1), rtol=0, atol=2e-2)
        state = decoder.cat_states([state, decoder.prefill(b[:, :3])[1]])
        assert state.keys[0].dtype == torch.bfloat16 and state.pos == [7, 3]
        logits, state = decoder.step(torch.stack([a[0, 7], b[0, 3]]), state)
        torch.testing.assert_close(logits[1].log_softmax(-1), model(b[:, :4])[0][0, 3].log_softmax(-1), rtol=0, atol=2e-2)


@pytest.mark.parametrize("cache", ["fp32", "bf16"])
def test_a_prompt_leaves_the_same_state_as_one_fed_into_a_full_cache(cache):
    # the decoder feeds a prompt over buffers of its own length, then moves them into full-context
    # ones of its cache dtype: the logits and the cache are exactly those of the plain path
    from lmforge.generation import Decoder

    model = make("transformer")
    decoder = Decoder(model, "fp16", cache)
    for length in (1, 7, model.max_context):
        x = tokens(batch=2, length=length)
        with torch.inference_mode():
            logits, state = decoder.prefill(x)
            plain_logits, plain = model(x, model.init_state(2, torch.device("cpu"), torch.float32))
        assert torch.equal(logits, plain_logits[:, -1]) and state.pos == plain.pos == [length, length]
        for ours, theirs in zip(state.keys + state.values, plain.keys + plain.values):
            assert ours.shape == theirs.shape and ours.dtype == decoder.cache_dtype
            assert torch.equal(ours, theirs.to(ours.dtype))


def test_a_bf16_cache_is_refused_with_fp32_decoding():
    from lmforge.generation import Decoder

    with pytest.raises(LmforgeError, match="bf16 cache goes with int8 or fp16"):
        Decoder(make("transformer"), "fp32", "bf16")
    with pytest.raises(LmforgeError, match="unknown decoding cache 'fp8'"):
        Decoder(make("transformer"), "fp16", "fp8")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's own machinery
@pytest.mark.parametrize("cache", ["fp32", "bf16"])
def test_compiled_step_decodes_as_the_uncompiled_one_until_the_weights_change(cache):
    # grouped-query attention, SwiGLU and an untied head; fp16, which every CPU has
    from lmforge.generation import Decoder

    model = make("transformer", **VARIANTS["llama"], tie_embeddings=False)
    decoder, plain = Decoder(model, "fp16", cache), Decoder(model, "fp16", cache)
    result = decoder.compile(steps=4, rounds=1, always=True)
    if not result["compiled"] and result["why"].startswith("torch.compile failed"):
        pytest.skip(result["why"])  # no working C++ compiler here: decoding stays uncompiled
    assert result["compiled"] and decoder.compiled and result["max_logit_difference"] < 1e-2
    assert result["step_us"].keys() == {"eager", "compiled"}

    def decode(decoder, prompts, new):  # rows at different positions, then `new` steps of each row's own ids
        states = [decoder.prefill(p[:, :n])[1] for p, n in prompts]
        state, out = decoder.cat_states(states), []
        for i in range(new):
            ids = torch.stack([p[0, n + i] for p, n in prompts])
            logits, state = decoder.step(ids, state)
            out.append(logits)
        return torch.stack(out, 1), state

    a, b = tokens(batch=1, length=32, seed=4), tokens(batch=1, length=32, seed=5)
    # one row to the end of the context; the last position (the cache's full length) steps uncompiled.
    # No step compiles again: not for ids made outside inference mode (as the engine's are), nor for
    # another thread count (as the thread tuner sets)
    from torch._dynamo.utils import counters

    graphs, threads = counters["stats"]["unique_graphs"], torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        fast, state = decode(decoder, [(a, 1)], 30)
    finally:
        torch.set_num_threads(threads)
    assert counters["stats"]["unique_graphs"] == graphs
    slow, _ = decode(plain, [(a, 1)], 30)
    assert state.pos == [31] and decoder.compiled
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-3)
    torch.testing.assert_close(fast[0].log_softmax(-1), model(a)[0][0, 1:31].log_softmax(-1), rtol=0, atol=2e-3)
    # rows at different positions step uncompiled, exactly as without compiling
    assert torch.equal(decode(decoder, [(a, 9), (b, 4)], 5)[0], decode(plain, [(a, 9), (b, 4)], 5)[0])
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # new weights: the compiled step, built from the old ones, is dropped
    flipped, _ = decode(decoder, [(a, 1)], 8)
    assert not decoder.compiled
    torch.testing.assert_close(flipped, -slow[:, :8], rtol=0, atol=2e-3)


def test_decoder_follows_weight_updates_and_steps_aside_for_adapters():
    from lmforge.finetuning.lora import apply_lora
    from lmforge.generation import Decoder

    model = make("transformer", tie_embeddings=False)
    decoder = Decoder(model, "fp16")
    x = tokens(length=12)
    with torch.no_grad():
        steps, _ = _decoded(decoder, x, 6)
        model.lm_head.weight.mul_(-1)  # an in-place update (an optimizer step) must reach the fp16 copies
        flipped, _ = _decoded(decoder, x, 6)
        torch.testing.assert_close(flipped, -steps, rtol=0, atol=1e-5)
        apply_lora(model, rank=2)  # adapters wrap the Linears: the modules decode, adapters included
        model.lm_head.lora_b.normal_()
        adapted, _ = _decoded(decoder, x, 6)
        assert decoder._fast_step() is None
        torch.testing.assert_close(adapted, model(x)[0][:, 5:11], rtol=1e-5, atol=1e-5)


def test_fp16_step_keeps_fp32_where_fp16_could_overflow():
    from lmforge.generation import Decoder

    model = make("transformer")
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight.mul_(300.0)  # relu² of its outputs could pass fp16's 65504
    x = tokens(length=12)
    full, _ = model(x)
    decoder = Decoder(model, "fp16")
    qkv, out, fc, _, proj = decoder._fast_step().layers[0]
    assert (qkv.dtype, out.dtype, fc.dtype, proj.dtype) == (torch.float16, torch.float16, torch.float32, torch.float32)
    steps, _ = _decoded(decoder, x, 6)
    assert torch.isfinite(steps).all()
    torch.testing.assert_close(steps, full[:, 5:11], rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("arch", list(MODELS))
def test_every_family_decodes_as_load_sets_it_up(arch):
    # lmforge.load picks each family's decoding weights (int8/fp16 for a CPU Transformer, fp32 for the
    # others, whose steps are cell- and conv-bound); every choice must match the model's own forward.
    from lmforge.generation import Decoder, default_weights

    model = make(arch)
    weights = default_weights(model, torch.device("cpu"))
    assert (weights != "fp32") == (arch == "transformer")
    x = tokens(length=16)
    steps, _ = _decoded(Decoder(model, weights), x, 5)
    tolerance = {"fp32": 1e-5, "fp16": 2e-3, "int8": 2e-2}[weights]
    torch.testing.assert_close(steps.log_softmax(-1), model(x)[0][:, 4:15].log_softmax(-1), rtol=0, atol=tolerance)


def test_fp16_and_int8_decoding_is_refused_where_the_flat_step_cannot_run():
    from lmforge.generation import Decoder

    with pytest.raises(LmforgeError, match="fp32"):
        Decoder(make("lstm"), "int8")
    with pytest.raises(LmforgeError, match="fp32"):
        Decoder(make("transformer", **VARIANTS["gpt2"]), "fp16")  # LayerNorm, learned positions


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
