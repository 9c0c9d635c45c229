"""Generation: sampling distributions, stop strings and streaming text, and the batching engine that
every caller goes through (one request alone == the same request among others)."""
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.generation import Decoder, Engine, SamplingConfig, sample_next, sample_rows
from lmforge.generation.healing import heal
from lmforge.generation.sampling import choose
from lmforge.generation.text import TextStream
from lmforge.models import MODELS, build_model
from lmforge.tokenizers import train_tokenizer

TEXT = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition. " * 4
TINY = {
    "transformer": dict(d_model=32, n_layers=2, n_heads=4, context_len=24),
    "lstm": dict(d_model=32, d_hidden=32, n_layers=2),
    "gru": dict(d_model=32, d_hidden=32, n_layers=1),
    "cnn": dict(d_model=32, n_layers=2),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def char():
    return train_tokenizer("char", [TEXT])


def make(arch, vocab_size, seed=0):
    torch.manual_seed(seed)
    model = build_model(arch, vocab_size=vocab_size, **TINY[arch])
    with torch.no_grad():  # away from the identity-block init, so every layer matters
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def draw(logits, cfg, n=20000, seed=0):
    ids = sample_next(logits.expand(n, -1), cfg, torch.Generator().manual_seed(seed))
    return torch.bincount(ids, minlength=logits.size(-1)) / n


def test_temperature_and_top_k_draw_each_token_in_proportion():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    frequencies = draw(logits, SamplingConfig(temperature=0.8, top_k=4))
    kept = torch.tensor([True, True, True, False, True])  # top-4 drops the -1.0
    expected = torch.where(kept, logits[0] / 0.8, -math.inf).softmax(-1)
    assert frequencies[3] == 0
    assert (frequencies - expected).abs().max() < 0.015  # about 4 standard errors


def test_top_p_keeps_the_smallest_set_that_reaches_p_and_renormalises():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    frequencies = draw(probs.log()[None], SamplingConfig(temperature=1.0, top_p=0.8))
    # 0.5 + 0.25 = 0.75 < 0.8, so the third token is needed too; the rest never appear
    expected = torch.tensor([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9
    assert frequencies[3:].sum() == 0
    assert (frequencies - expected).abs().max() < 0.015
    always_first = draw(probs.log()[None], SamplingConfig(temperature=1.0, top_p=0.3), n=2000)
    assert always_first[0] == 1.0  # p below the largest probability: that token alone


@pytest.mark.parametrize("head", [0.85, 0.5])  # a nucleus of about 70 tokens; one of about 600
def test_top_p_over_a_large_vocabulary_keeps_exactly_the_nucleus(head):
    V, top_p = 1000, 0.86 if head > 0.8 else 0.8
    tail = torch.linspace(2.0, 1.0, V - 1)  # strictly decreasing, so the nucleus is one prefix
    probs = torch.cat([torch.tensor([head]), tail / tail.sum() * (1 - head)])
    before = probs.cumsum(0) - probs
    size = int((before < top_p).sum())  # tokens whose predecessors hold less than top_p
    frequencies = draw(probs.log()[None], SamplingConfig(temperature=1.0, top_p=top_p))
    assert frequencies[size:].sum() == 0 and frequencies[size - 1] > 0
    assert abs(frequencies[0] - head / probs[:size].sum()) < 0.015
    assert (size < 256) == (head > 0.8)  # within the first look, or past it


def test_a_token_with_no_probability_is_never_drawn_even_at_the_ends_of_the_uniform_range():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0]] * 2)
    lowest, highest = torch.tensor([[0.0], [1.0 - 2 ** -52]], dtype=torch.float64).unbind(0)
    assert int(choose(probs[:1], lowest[None].clone())) == 1
    assert int(choose(probs[:1], highest[None].clone())) == 3


def test_rows_sample_with_their_own_settings_and_generators():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    configs = [SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0, seed=5),
               SamplingConfig(temperature=0.7, top_k=5, seed=9)]
    ids = sample_rows(logits, configs, [None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)])
    assert ids[0] == int(logits[0].argmax())
    alone = [int(sample_next(logits[i:i + 1], configs[i], torch.Generator().manual_seed(s))) for i, s in
             ((1, 5), (2, 9))]
    assert ids[1:] == alone  # the same token as a batch of one with the same seed


def test_extreme_temperatures_are_greedy_or_uniform_within_top_k_never_garbage():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    for tiny in (1e-30, 1e-300, 5e-324):  # below float32's reach: as greedy, not a division by zero
        assert draw(logits, SamplingConfig(temperature=tiny), n=50).tolist() == [0, 0, 0, 0, 1]
        assert draw(logits, SamplingConfig(temperature=tiny, top_k=3), n=50).tolist() == [0, 0, 0, 0, 1]
    flat = draw(logits, SamplingConfig(temperature=1e300, top_k=3))  # the 3 likeliest, equally: not ids 0..2
    assert flat[2] == flat[3] == 0 and (flat[[0, 1, 4]] - 1 / 3).abs().max() < 0.02


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=math.nan), dict(top_p=0), dict(top_p=1.5),
                                 dict(top_k=0), dict(max_new_tokens=-1), dict(max_new_tokens=2.5), dict(seed="x"),
                                 dict(seed=-1), dict(stop="."), dict(temperature=math.inf)])
def test_nonsensical_sampling_values_are_rejected(bad):
    with pytest.raises(LmforgeError):
        SamplingConfig(**bad)


def test_text_stream_holds_back_what_may_become_a_stop_string(char):
    stream = TextStream(char, ["the end"])
    shown = "".join(stream.push(i) for i in char.encode("so it was. the en"))
    assert shown == "so it was. "  # "the en" could still become "the end"
    shown += "".join(stream.push(i) for i in char.encode("d and more"))
    shown += stream.finish()
    assert shown == "so it was. " and stream.stopped_by == "the end"


def test_text_stream_never_splits_a_character():
    bpe = train_tokenizer("bpe", ["naïve café " * 50], vocab_size=260)
    ids = bpe.encode("café ☃ ok")
    stream = TextStream(bpe, [])
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == "café ☃ ok" and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("arch", list(MODELS))
def test_greedy_engine_equals_recomputing_from_scratch(arch, char):
    model = make(arch, char.vocab_size)
    prompt = char.encode("Emma Wood")
    engine = Engine(Decoder(model), char)
    request = engine.submit(prompt, SamplingConfig(max_new_tokens=40, temperature=0))
    engine.run()
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(40):  # the Transformer's 24-token context fills up on the way: windows then slide
            window = seq[:, -model.max_context:] if model.max_context else seq
            logits, _ = model(window)
            logits[..., char.unk_id] = float("-inf")  # never sampled
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    expected = seq[0, len(prompt):].tolist()
    if char.eos_id in expected:
        expected = expected[:expected.index(char.eos_id)]
    if arch == "transformer":  # the engine re-feeds 3/4 of a window when the cache fills, not a full window
        expected, got = expected[:24 - len(prompt)], request.new_ids[:24 - len(prompt)]
    else:
        got = request.new_ids
    assert got == expected


@pytest.mark.parametrize("arch", ["transformer", "gru"])
def test_a_seeded_request_gives_the_same_text_alone_and_among_others(arch, char):
    model = make(arch, char.vocab_size)
    decoder = Decoder(model)
    settings = dict(max_new_tokens=30, temperature=0.9, top_p=0.95)
    alone = Engine(decoder, char)
    solo = alone.submit(char.encode("Emma"), SamplingConfig(seed=11, **settings))
    alone.run()

    crowd = Engine(decoder, char, max_batch=4)
    early = crowd.submit(char.encode("handsome, clever"), SamplingConfig(seed=1, **settings))
    for _ in range(5):
        crowd.step()  # the first request is 5 tokens in when the others arrive
    ours = crowd.submit(char.encode("Emma"), SamplingConfig(seed=11, **settings))
    late = crowd.submit(char.encode("a comfortable home and"), SamplingConfig(seed=2, temperature=0.0,
                                                                           max_new_tokens=8))
    crowd.run()
    assert ours.new_ids == solo.new_ids and ours.text == solo.text
    assert early.finished and late.finish_reason == "length" and len(late.new_ids) == 8


def test_requests_arriving_together_are_prefilled_together(char, monkeypatch):
    # eight prompts of one length: one batched prefill (about the cost of one), and no concatenation
    # (each copies every row's cache); prompts of other lengths: one prefill per length, one concatenation
    model = make("transformer", char.vocab_size)
    decoder = Decoder(model)
    settings = dict(max_new_tokens=12, temperature=0.9)
    alone = []
    for seed in range(8):
        engine = Engine(decoder, char)
        alone.append(engine.submit(char.encode("Emma"), SamplingConfig(seed=seed, **settings)))
        engine.run()
    joins, prefills = [], []
    cat_states, prefill = decoder.cat_states, decoder.prefill
    monkeypatch.setattr(decoder, "cat_states", lambda states: joins.append(len(states)) or cat_states(states))
    monkeypatch.setattr(decoder, "prefill", lambda ids: prefills.append(tuple(ids.shape)) or prefill(ids))
    engine = Engine(decoder, char, max_batch=8)
    together = [engine.submit(char.encode("Emma"), SamplingConfig(seed=seed, **settings)) for seed in range(8)]
    engine.step()
    assert len(engine.running) == 8 and prefills == [(8, 4)] and joins == []
    engine.run()
    assert [r.new_ids for r in together] == [r.new_ids for r in alone]
    joins.clear(), prefills.clear()
    mixed = [engine.submit(char.encode(p), SamplingConfig(seed=1, **settings)) for p in ("Emma", "Jane", "Harriet")]
    engine.step()
    assert prefills == [(2, 4), (1, 7)] and joins == [2]
    assert [r.request for r in engine.running] == mixed  # in order of arrival, group by group
    engine.run()


def test_rows_leaving_and_joining_a_running_batch_keep_every_requests_text(char):
    # requests of different lengths come and go through a batch of 3: the last rows move into the places
    # of those that leave, newcomers are written into the buffers' spare rows, and no text changes
    model = make("transformer", char.vocab_size)
    decoder = Decoder(model)
    prompts = ["Emma", "Harriet Smith", "Jane", "Mr. Knightley", "rich", "clever", "a comfortable home"]
    settings = [SamplingConfig(max_new_tokens=4 + 5 * (i % 3), temperature=0.9, seed=i) for i in range(len(prompts))]
    alone = []
    for prompt, sampling in zip(prompts, settings):
        engine = Engine(decoder, char)
        alone.append(engine.submit(char.encode(prompt), sampling))
        engine.run()
    engine = Engine(decoder, char, max_batch=3)
    crowd = [engine.submit(char.encode(prompt), sampling) for prompt, sampling in zip(prompts, settings)]
    buffers = set()
    while not engine.idle:
        engine.step()
        if engine.state is not None and engine.state.room is not None:
            buffers.add(engine.state.room[0][0].data_ptr())
    assert [r.new_ids for r in crowd] == [r.new_ids for r in alone]
    assert len(buffers) == 1  # one set of buffers, allocated once: joining rows fill its spare rows
    _, wide = decoder.prefill(torch.zeros(16, 1, dtype=torch.long))
    wide = decoder.cat_states([wide, decoder.prefill(torch.zeros(1, 1, dtype=torch.long))[1]])  # 17 rows: room 32
    assert decoder.select_state(wide, list(range(12))).room is not None  # leaving rows: the buffers stay
    assert decoder.select_state(wide, [3, 1]).room is None  # a batch shrunk to a few rows gives them back


def test_a_prefill_that_fails_ends_every_request_of_the_step_with_the_error(char, monkeypatch):
    # the server ends what ran with the error and keeps serving: no request may be left waiting forever,
    # also those prefilled at the same step before the one that failed
    model = make("transformer", char.vocab_size)
    decoder = Decoder(model)
    engine = Engine(decoder, char, max_batch=4)
    requests = [engine.submit(char.encode(p), SamplingConfig(max_new_tokens=5, temperature=0))
                for p in ("Emma", "Harriet", "Jane", "Mr. Knightley")]
    prefill, calls = decoder.prefill, []

    def failing(ids):
        calls.append(ids)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return prefill(ids)

    monkeypatch.setattr(decoder, "prefill", failing)
    with pytest.raises(RuntimeError):
        engine.step()
    engine.fail("generation failed (RuntimeError: out of memory)")
    assert [r.finish_reason for r in requests] == ["error"] * 4
    assert all("out of memory" in r.error for r in requests) and engine.idle
    monkeypatch.setattr(decoder, "prefill", prefill)
    again = engine.submit(char.encode("Emma"), SamplingConfig(max_new_tokens=5, temperature=0))
    engine.run()  # the engine stays usable
    assert again.finish_reason == "length" and len(again.new_ids) == 5
    # the first prefill of a step fails: the requests admitted with it, not yet prefilled, end too, even
    # for a caller that goes on without fail(); a request already running is not touched
    running = engine.submit(char.encode("Emma"), SamplingConfig(max_new_tokens=5, temperature=0))
    engine.step()
    requests = [engine.submit(char.encode(p), SamplingConfig(max_new_tokens=5, temperature=0))
                for p in ("Emma", "Harriet")]
    monkeypatch.setattr(decoder, "prefill", lambda ids: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError):
        engine.step()
    assert [r.finish_reason for r in requests] == ["error"] * 2 and all("out of memory" in r.error for r in requests)
    engine.run()
    assert running.finish_reason == "length" and len(running.new_ids) == 5 and engine.idle


def test_in_the_server_a_request_that_fails_to_start_ends_alone(char, monkeypatch):
    model = make("transformer", char.vocab_size)
    decoder = Decoder(model)
    engine = Engine(decoder, char, max_batch=4)
    engine.contain_errors = True  # as the server's worker sets it
    running = engine.submit(char.encode("Emma"), SamplingConfig(max_new_tokens=8, temperature=0))
    engine.step()
    prefill = decoder.prefill

    def failing(ids):
        raise IndexError("index 128 is out of bounds")

    monkeypatch.setattr(decoder, "prefill", failing)
    bad = engine.submit(char.encode("Harriet"), SamplingConfig(max_new_tokens=8, temperature=0))
    engine.step()
    monkeypatch.setattr(decoder, "prefill", prefill)
    engine.run()
    assert bad.finish_reason == "error" and "IndexError" in bad.error
    assert running.finish_reason == "length" and len(running.new_ids) == 8
    # prefilled together with a good one of the same length, a bad prompt still fails alone
    poison = char.encode("J")[0]

    def failing_with(ids):
        if (ids == poison).any():
            raise IndexError("index 128 is out of bounds")
        return prefill(ids)

    monkeypatch.setattr(decoder, "prefill", failing_with)
    good, bad = (engine.submit(char.encode(p), SamplingConfig(max_new_tokens=8, temperature=0))
                 for p in ("Emma", "Jane"))
    engine.run()
    assert bad.finish_reason == "error" and good.finish_reason == "length" and len(good.new_ids) == 8


@pytest.mark.parametrize("weights", ["fp32", "fast"])
def test_a_prompt_as_long_as_the_context_is_continued(char, weights):
    model = make("transformer", char.vocab_size)
    decoder = Decoder(model, "fp16" if weights == "fast" else "fp32")
    limit = decoder.max_context
    prompt = (char.encode("Emma Woodhouse, handsome, clever, and rich, ") * limit)[:limit]
    engine = Engine(decoder, char, max_batch=2)
    requests = [engine.submit(prompt[:n], SamplingConfig(max_new_tokens=5, temperature=0)) for n in (limit, limit - 1)]
    engine.run()
    assert [len(r.new_ids) for r in requests] == [5, 5]


def test_cancelled_requests_leave_the_batch_and_others_continue(char):
    model = make("transformer", char.vocab_size)
    engine = Engine(Decoder(model), char, max_batch=2)
    a = engine.submit(char.encode("Emma"), SamplingConfig(max_new_tokens=20, temperature=0))
    b = engine.submit(char.encode("rich"), SamplingConfig(max_new_tokens=20, temperature=0))
    engine.step()
    engine.step()
    engine.cancel(a)
    engine.step()
    assert len(engine.running) == 1 and engine.running[0].request is b
    engine.run()
    alone = Engine(Decoder(model), char)
    again = alone.submit(char.encode("rich"), SamplingConfig(max_new_tokens=20, temperature=0))
    alone.run()
    assert b.new_ids == again.new_ids


def test_stop_strings_end_a_request_with_the_text_before_them(char):
    model = make("transformer", char.vocab_size)
    engine = Engine(Decoder(model), char)
    free = engine.submit(char.encode("Emma"), SamplingConfig(max_new_tokens=40, temperature=0))
    engine.run()
    assert len(free.text) > 6
    stop = free.text[3:5]
    engine = Engine(Decoder(model), char)
    stopped = engine.submit(char.encode("Emma"), SamplingConfig(max_new_tokens=40, temperature=0, stop=[stop]))
    engine.run()
    assert stopped.finish_reason == "stop" and stopped.stopped_by == stop
    assert stopped.text == free.text[:free.text.index(stop)]
    assert stopped.take() == stopped.text  # what was streamed is exactly the final text


class Scripted:
    """A decoder whose next-token scores never change: what the engine picks from them is plain to see."""
    device, max_context = torch.device("cpu"), None

    def __init__(self, scores):
        self.scores = scores

    def prefill(self, ids):
        return self.scores.expand(ids.size(0), -1).clone(), None

    def step(self, tokens, state):
        return self.scores.expand(tokens.size(0), -1).clone(), state


def test_token_healing_lets_the_model_choose_how_the_prompts_last_word_goes_on():
    # The word tokenizer keeps a word's trailing space: "was" without one ends a prompt, but in the
    # text it only comes before punctuation, so a model asked to go on after it broke the line.
    word = train_tokenizer("word", ["Emma was happy. It was, she said.\nShe wasted time.\n" * 2])
    fed, known, allowed = heal(word, word.encode("Emma was"))
    assert word.decode(fed) == "Emma " and known == "was"
    assert sorted(word.decode([i]) for i in allowed.tolist()) == ["was", "was ", "wasted "]
    assert heal(word, word.encode("Emma was ")) is None  # the last token is the only one that begins so
    assert heal(train_tokenizer("char", [TEXT]), [3, 4]) is None  # one character per token: nothing to heal
    bpe = train_tokenizer("bpe", [TEXT], vocab_size=300)
    fed, known, allowed = heal(bpe, bpe.encode("Emma "))  # a prompt ending in a space, for byte-level BPE
    assert bpe.decode(fed) + known == "Emma " and len(allowed) > 1
    assert all(bpe.decode([i]).startswith(" ") for i in allowed.tolist())
    assert heal(bpe, bpe.encode("café")) is None  # its last token is not a whole character

    scores = torch.zeros(word.vocab_size)  # a line break is the likeliest token, "was " the next
    scores[word.encode("\n")[0]], scores[word.encode("was ")[0]] = 5.0, 4.0
    texts = {}
    for healing in (True, False):
        engine = Engine(Scripted(scores), word)
        request = engine.submit(word.encode("Emma was"),
                                SamplingConfig(max_new_tokens=3, temperature=0, stop=["was"], token_healing=healing))
        engine.run()
        assert request.finish_reason == "length"  # the prompt's own "was" is not a stop string's match
        assert request.new_tokens == 3 and len(request.new_ids) == 3 + healing  # the healed one rewrites "was"
        texts[healing] = request.text
    assert texts == {True: " \n\n\n", False: "\n\n\n"}  # three tokens after the prompt's text, either way
    engine = Engine(Scripted(scores), word)
    request = engine.submit(word.encode("Emma was"), SamplingConfig(max_new_tokens=0))
    engine.run()
    assert (request.text, request.new_tokens, request.finish_reason) == ("", 0, "length")  # nothing generated


def test_a_word_known_only_with_a_space_after_it_is_written_by_the_model_not_fed_as_unk():
    word = train_tokenizer("word", ["Mr. Knightley came; Mr. Elton went.\n" * 2])
    ids = word.encode("It was Mr.")  # "Mr." is in the vocabulary only as "Mr. "
    assert ids[-1] == word.unk_id and word.prompt_tail("It was Mr.") == "Mr."
    assert word.prompt_tail("It was Mr. ") == "" and word.prompt_tail("Mr. Knightley came") == ""  # "came;"
    fed, known, allowed = heal(word, ids, "Mr.")
    assert fed == ids[:-1] and known == "Mr." and [word.decode([i]) for i in allowed.tolist()] == ["Mr. "]
    scores = torch.zeros(word.vocab_size)
    scores[word.encode("\n")[0]] = 5.0
    engine = Engine(Scripted(scores), word)
    request = engine.submit(ids, SamplingConfig(max_new_tokens=2, temperature=0), tail="Mr.")
    engine.run()
    assert request.text == " \n\n"  # "Mr. " less the "Mr." the prompt has, then the two likeliest tokens


def test_unk_is_never_sampled_even_where_the_model_likes_it_best(char):
    # a word model learns <unk> for rare words; written out it would be the literal text "<unk>"
    scores = torch.zeros(char.vocab_size)
    scores[char.unk_id], scores[char.encode("e")[0]] = 9.0, 1.0
    for sampling in (SamplingConfig(max_new_tokens=6, temperature=0),
                     SamplingConfig(max_new_tokens=200, seed=1, ignore_eos=True)):
        engine = Engine(Scripted(scores), char)
        request = engine.submit(char.encode("Emma"), sampling)
        engine.run()
        assert char.unk_id not in request.new_ids and "<unk>" not in request.text
    assert request.new_tokens == 200 and len(set(request.new_ids)) > 5  # sampled among the others, unchanged
    engine = Engine(Scripted(scores), char)
    request = engine.submit(char.encode("Emma"), SamplingConfig(max_new_tokens=6, temperature=0))
    engine.run()
    assert request.text == "eeeeee"  # greedy: the likeliest token after <unk>


def test_a_seeded_or_greedy_generation_keeps_the_configured_thread_count(char, monkeypatch):
    # some CPUs round a prompt's fp32 pass differently with one and two threads: a repeatable request
    # must not run at whatever count a thread tuner left, or change count on a clock
    import lmforge.device
    from lmforge.device import configured_threads
    from lmforge.generation import generate

    monkeypatch.setattr(lmforge.device, "_configured_threads", 2)
    decoder = Decoder(make("transformer", char.vocab_size))
    for sampling in (SamplingConfig(max_new_tokens=20, seed=3), SamplingConfig(max_new_tokens=20, temperature=0)):
        torch.set_num_threads(1)  # as a tuner may have left it
        counts = []
        generate(decoder, char, char.encode("Emma"), sampling, on_text=lambda _: counts.append(torch.get_num_threads()))
        assert counts and set(counts) == {configured_threads()}
    torch.set_num_threads(1)
