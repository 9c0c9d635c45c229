"""`lmforge serve`: a real server on a loopback port, called through the official `openai` client and
raw HTTP: seeded requests match `lmforge generate`, streams match whole answers, concurrent requests
batch, and every bad request is a 4xx with an OpenAI-style body while the server keeps serving."""
import json
import threading
import time

import pytest

import lmforge

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from lmforge.serving.app import Settings, create_app  # noqa: E402

from conftest import KEY, Server  # noqa: E402


def quiet(*_):
    pass


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key=KEY, max_retries=0)


def test_models_and_health(served, client):
    lm, server = served
    assert [m.id for m in client.models.list().data] == ["austen"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0
    info = httpx.get(server.url + "/info").json()
    assert info["parameters"] == lm.num_params and info["decoding"] == lm.decoding
    assert info["decoding_cache"] == lm.decoding_cache
    assert info["val_bits_per_byte"] == pytest.approx(lm.evaluate()["bits_per_byte"])


def test_a_seeded_completion_is_what_lmforge_generate_prints(served, client):
    lm, _ = served
    answer = client.completions.create(model="austen", prompt="Emma Wood", max_tokens=40, temperature=0.9,
                                       top_p=0.95, seed=7)
    expected = lm.complete("Emma Wood", lmforge.generation.SamplingConfig(40, 0.9, None, 0.95, 7))
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason  # "stop" if it ended its text early
    n = len(expected.token_ids)
    assert (n == 40) == (expected.finish_reason == "length") and n > 0
    assert answer.usage.prompt_tokens == len("Emma Wood") and answer.usage.completion_tokens == n
    assert answer.usage.total_tokens == len("Emma Wood") + n


def test_streaming_gives_the_same_text_piece_by_piece(client):
    settings = dict(model="austen", prompt="Emma Wood", max_tokens=50, seed=3, temperature=0.8,
                    extra_body={"ignore_eos": True})
    whole = client.completions.create(**settings)
    chunks = list(client.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len([c for c in chunks if c.choices and c.choices[0].text]) > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 50


def test_n_choices_echo_and_stop(served, client):
    lm, _ = served
    answer = client.completions.create(model="austen", prompt="Emma", max_tokens=20, n=2, seed=10, echo=True)
    texts = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    assert texts == ["Emma" + lm.generate("Emma", 20, temperature=1.0, seed=s) for s in (10, 11)]
    greedy = lm.generate("Emma", 40, temperature=0)
    stop = greedy[5:7]
    stopped = client.completions.create(model="austen", prompt="Emma", max_tokens=40, temperature=0, stop=[stop])
    assert stopped.choices[0].text == greedy[:greedy.index(stop)] and stopped.choices[0].finish_reason == "stop"


def test_chat_uses_the_documented_transcript(served, client):
    lm, _ = served
    answer = client.chat.completions.create(model="austen", messages=[
        {"role": "system", "content": "Austen"}, {"role": "user", "content": "Who is Emma?"}],
        max_tokens=30, temperature=0)
    prompt = "Austen\n\nUser: Who is Emma?\nAssistant:"
    assert lm.chat_prompt([("system", "Austen"), ("user", "Who is Emma?")]) == (prompt, ["\nUser:"])
    expected = lm.generate(prompt, 30, temperature=0, stop=["\nUser:"]).lstrip()  # from its first character
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="austen", messages=[{"role": "user", "content": "Who is Emma?"}],
                                              max_tokens=30, temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == lm.generate("User: Who is Emma?\nAssistant:", 30,
                                                                    temperature=0, stop=["\nUser:"]).lstrip()
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError, match="tools"):  # refused, not silently ignored
        client.chat.completions.create(model="austen", messages=[{"role": "user", "content": "Hi"}], tools=[tool])


def test_concurrent_requests_are_decoded_together_and_each_matches_its_solo_answer(served, client):
    lm, server = served
    results, peak = {}, []

    def ask(i):
        results[i] = client.completions.create(model="austen", prompt="Emma", max_tokens=300, seed=i,
                                               temperature=0.8).choices[0].text

    def watch():  # one connection, polled as fast as it answers: the requests last well under a second
        with httpx.Client() as http:
            while len(results) < 8:
                peak.append(http.get(server.url + "/health").json()["running"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert max(peak) >= 4  # several requests shared the batch at once
    for i in (0, 5):  # batched with others, each is what it would be alone (up to batched rounding)
        solo = lm.generate("Emma", 120, temperature=0.8, seed=i)
        assert results[i][:40] == solo[:40]


@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": "Emma", "temperature": -1}, 400, "temperature"),
    ({"prompt": "Emma", "top_p": 0}, 400, "top_p"),
    ({"prompt": "Emma", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "Emma", "logprobs": 3}, 400, "logprobs"),
    ({"prompt": "Emma", "logprobs": 0}, 400, "logprobs"),  # 0 asks for the chosen tokens' logprobs
    ({"prompt": "Emma", "stream_options": {"include_usage": True}}, 400, "stream_options"),  # without stream
    ({"prompt": "Emma", "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "include_usage"),
    ({"prompt": "Emma", "n": 99}, 400, "n"),
    ({"prompt": "x" * 100}, 400, "context"),
    ({"prompt": [999999]}, 400, "vocabulary"),
    ({"prompt": "Emma", "model": "gpt-4"}, 404, "gpt-4"),
    ({"prompt": "Emma", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": {"not": "text"}}, 400, "prompt"),
    ({}, 400, "required"),
    ({"prompt": "Emma", "max_tokens": "5"}, 400, "max_tokens"),  # OpenAI's types, not guesses at them
    ({"prompt": "Emma", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "Emma", "stream": "yes"}, 400, "stream"),
    ({"prompt": "Emma", "repetition_penalty": 1.3}, 400, "repetition_penalty"),  # other servers' extensions
    ({"prompt": "Emma", "min_p": 0.1}, 400, "min_p"),
])
def test_bad_requests_get_openai_style_4xx_and_the_server_keeps_serving(served, body, status, needle):
    _, server = served
    payload = {"model": "austen", **body} if "model" not in body and body else body
    response = httpx.post(server.url + "/v1/completions", json=payload, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] and "Traceback" not in response.text
    if needle in ("logprobs", "temperature", "prompt", "stop"):
        assert error["param"] == needle
    ok = httpx.post(server.url + "/v1/completions", json={"model": "austen", "prompt": "Emma", "max_tokens": 3},
                    headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_malformed_bodies_keys_and_sizes(served):
    _, server = served
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad_json = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=auth)
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    huge = httpx.post(server.url + "/v1/completions", content=b" " * (2 << 20), headers=auth)
    assert huge.status_code == 413
    chunked = httpx.post(server.url + "/v1/completions", content=iter([b" " * (1 << 16)] * 32), headers=auth)
    assert chunked.status_code == 413 and "bytes" in chunked.json()["error"]["message"]  # no length declared
    for content, headers, message, param in [
            (b"", auth, "body is empty", None),
            (b'{"model": "austen", "prompt": }', auth, "not valid JSON", None),
            (b'{"model": "austen", "prompt": 5}', auth, "prompt", "prompt"),
            (b'{"model": "austen", "prompt": "Emma \\ud800", "echo": true}', auth, "surrogate", "prompt"),
            (b"Emma", {**auth, "Content-Type": "text/plain"}, "application/json", None)]:
        error = httpx.post(server.url + "/v1/completions", content=content, headers=headers).json()["error"]
        assert message in error["message"] and error["param"] == param, error
    lone = b'{"model": "austen", "messages": [{"role": "user", "content": "\\udc00"}]}'
    error = httpx.post(server.url + "/v1/chat/completions", content=lone, headers=auth).json()["error"]
    assert "surrogate" in error["message"] and error["param"] == "messages.0.content", error
    assert httpx.get(server.url + "/v1/models").status_code == 401
    wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/").status_code == 200  # the playground page itself needs no key
    assert httpx.head(server.url + "/").status_code == 200  # uptime checks
    lower = httpx.get(server.url + "/v1/models", headers={"Authorization": f"bearer {KEY}"})
    assert lower.status_code == 200  # the scheme's case does not matter (RFC 7235); the key's does
    neutral = httpx.post(server.url + "/v1/completions", headers=auth, json={
        "model": "austen", "prompt": "Emma", "max_tokens": 2, "repetition_penalty": 1.0, "min_p": 0})
    assert neutral.status_code == 200  # an extension at its neutral value changes nothing: accepted


def test_a_model_id_with_a_slash_and_max_completion_tokens_zero(served_run):
    lm = lmforge.load(served_run)
    server = Server(create_app(lm, Settings("lab/austen-v1")))
    try:
        card = httpx.get(server.url + "/v1/models/lab/austen-v1")
        assert card.status_code == 200 and card.json()["id"] == "lab/austen-v1"
        answer = httpx.post(server.url + "/v1/chat/completions", json={
            "model": "lab/austen-v1", "messages": [{"role": "user", "content": "Emma"}],
            "max_completion_tokens": 0, "max_tokens": 5}).json()
        assert answer["usage"]["completion_tokens"] == 0 and answer["choices"][0]["finish_reason"] == "length"
    finally:
        server.stop()


def test_a_full_queue_answers_429_and_a_disconnect_frees_the_slot(served_run, capfd):
    run = served_run
    lm = lmforge.load(run)
    server = Server(create_app(lm, Settings("austen", max_batch=1, max_waiting=0, max_tokens=100_000)))
    try:
        body = {"model": "austen", "prompt": "Emma", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", server.url + "/v1/completions", json=body) as first:
                lines = first.iter_lines()
                next(lines)  # the request is decoding (the iterator is kept: dropping it closes the stream)
                busy = httpx.post(server.url + "/v1/completions", json={**body, "stream": False})
                assert busy.status_code == 429 and "busy" in busy.json()["error"]["message"]
                assert busy.headers["Retry-After"] == "1"
                assert httpx.get(server.url + "/health").json()["active"] == 1
            # the stream was closed mid-way: its slot frees at once, long before 2,000 tokens
        def freed() -> bool:
            deadline = time.time() + 5
            while httpx.get(server.url + "/health").json()["active"] and time.time() < deadline:
                time.sleep(0.02)
            return httpx.get(server.url + "/health").json()["active"] == 0

        assert freed()
        with pytest.raises(httpx.ReadTimeout):  # a whole answer waited for, then given up: the same
            httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 100_000},
                       timeout=1.0)
        assert freed()
        assert "Exception in ASGI application" not in capfd.readouterr().err  # a client leaving is no failure
        again = httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 5})
        assert again.status_code == 200
        # more choices than the server ever decodes at once: no retry can help, so a 400 that says so
        too_many = httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "n": 2})
        assert too_many.status_code == 400 and "at most 1" in too_many.json()["error"]["message"]
    finally:
        server.stop()


def test_a_completion_run_chats_in_its_own_template(served_run, tmp_path):
    run = served_run
    rows = [{"prompt": f"say {i % 3}", "completion": "Emma " * (i % 3 + 1), "split": "val" if i < 4 else "train"}
            for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    lmforge.finetune(run, [str(tmp_path / "pairs.jsonl")], tmp_path / "tuned", task="completion", max_steps=10,
                     overrides=["train.threads=1", "train.progress=false",
                                f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"], log=quiet)
    lm = lmforge.load(tmp_path / "tuned")
    server = Server(create_app(lm, Settings("tuned")))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        chat = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "say 1"}],
                                              max_tokens=12, temperature=0)
        completion = client.completions.create(model="tuned", prompt="say 1", max_tokens=12, temperature=0)
        expected = lm.generate("say 1", 12, temperature=0)  # what `lmforge generate` and the API give
        assert chat.choices[0].message.content == expected.lstrip() and completion.choices[0].text == expected
        info = httpx.get(server.url + "/info").json()  # the playground shows the fine-tune's held-out figure
        assert info["val_bits_per_byte"] is None and info["completion_bits_per_byte"] > 0
    finally:
        server.stop()


def test_a_prompt_ending_in_a_word_written_as_unk_is_healed_through_the_api(tmp_path):
    # "Mr." is in this vocabulary only as "Mr. ": the prompt's ids end in <unk>, and its text rides along
    (tmp_path / "mr.txt").write_text("Mr. Knightley came; Mr. Elton went.\n" * 60)
    config = {"data": {"sources": [str(tmp_path / "mr.txt")], "cache_dir": str(tmp_path / "cache")},
              "tokenizer": {"kind": "word"},
              "model": {"arch": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "context_len": 32},
              "train": {"max_steps": 30, "max_time": 0, "batch_size": 8, "warmup_steps": 5, "threads": 1,
                        "progress": False, "sample_tokens": 0}}
    lm, _ = lmforge.train(config, out=tmp_path / "run", log=quiet, final_eval=False)
    assert lm.prompt_ids("It was Mr.")[-1] == lm.tokenizer.unk_id
    server = Server(create_app(lm, Settings("mr")))
    try:
        body = {"model": "mr", "prompt": "It was Mr.", "max_tokens": 4, "temperature": 0}
        healed = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["text"]
        typed = httpx.post(server.url + "/v1/completions", json={**body, "token_healing": False}).json()
        assert healed == lm.generate("It was Mr.", 4, temperature=0) and healed.startswith(" ")  # "Mr. ", less "Mr."
        assert typed["choices"][0]["text"] == lm.generate("It was Mr.", 4, temperature=0, token_healing=False)
    finally:
        server.stop()


def test_a_request_that_names_no_length_gets_at_most_the_servers_limit(served_run):
    lm = lmforge.load(served_run)
    server = Server(create_app(lm, Settings("austen", max_tokens=20)))
    try:
        body = {"model": "austen", "messages": [{"role": "user", "content": "Emma"}], "ignore_eos": True}
        answer = httpx.post(server.url + "/v1/chat/completions", json=body)  # the default, 256, is over 20
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] <= 20
        asked = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 21})
        assert asked.status_code == 400 and "at most 20" in asked.json()["error"]["message"]
    finally:
        server.stop()


def test_a_prompt_filling_the_context_is_continued_and_null_max_tokens_means_16(served):
    lm, server = served
    prompt = ("Emma Woodhouse, handsome, clever, and rich " * 4)[:lm.decoder.max_context]
    assert len(lm.prompt_ids(prompt)) == lm.decoder.max_context
    body = {"model": "austen", "prompt": prompt, "max_tokens": None, "ignore_eos": True, "temperature": 0}
    answer = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 16  # OpenAI's default for completions
