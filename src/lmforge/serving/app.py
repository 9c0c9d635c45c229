"""`lmforge serve`: an OpenAI-compatible HTTP API and a web playground over one loaded run.

`create_app(lm, settings)` builds the FastAPI application (testable without a port). Every request
goes to one `Worker`, whose engine decodes concurrent requests together (continuous batching); the
event loop only parses, waits and streams. Every failure a client can cause is a 4xx with an
OpenAI-style error body, and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LmforgeError
from ..generation import SamplingConfig
from .schemas import ChatRequest, CompletionRequest
from .worker import Busy, Worker

STATIC = Path(__file__).parent / "static"


@dataclass
class Settings:
    name: str  # the model id clients ask for
    api_key: str | None = None
    max_batch: int = 32  # requests decoded together
    max_waiting: int = 64  # requests queued beyond the batch before the server answers 429
    max_tokens: int = 2048  # the most new tokens one request may ask for
    max_prompt_tokens: int = 8192  # for models without a context limit
    max_body_bytes: int = 1 << 20
    default_chat_tokens: int = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def error_body(message: str, kind: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(lm, settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.worker.stop()

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=lifespan)
    app.state.lm, app.state.settings = lm, settings
    app.state.worker = Worker(lm, settings.max_batch, settings.max_waiting)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKey, key=settings.api_key)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(LmforgeError, _lmforge_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)  # HEAD: uptime checks
    async def playground():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.name, **app.state.worker.load}

    @app.get("/info")
    async def info():
        return model_info(lm, settings)

    @app.get("/loss.png")
    async def loss_curve():
        path = lm.run_dir / "loss.png" if lm.run_dir else None
        if path is None or not path.exists():
            raise APIError(404, "this run has no loss curve (loss.png)", code="not_found")
        return FileResponse(path, media_type="image/png")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(lm, settings)]}

    @app.get("/v1/models/{model_id:path}")  # a --name may hold "/" (org/model), as Hugging Face ids do
    async def model(model_id: str):
        check_model(model_id, settings)
        return model_card(lm, settings)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model, settings)
        prompts = completion_prompts(lm, body.prompt)
        return await respond(app, request, body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model, settings)
        text, stops = lm.chat_prompt([(m.role, m.content) for m in body.messages])
        body.stop = list(dict.fromkeys(body.stop + stops))
        return await respond(app, request, body, [(text, lm.prompt_ids(text), lm.prompt_tail(text))], chat=True)

    return app


# ---- requests -----------------------------------------------------------------------------------

def check_model(model_id: str, settings: Settings) -> None:
    if model_id != settings.name:
        raise APIError(404, f"the model {model_id!r} is not served here; this server serves {settings.name!r}",
                       param="model", code="model_not_found")


def completion_prompts(lm, prompt) -> list[tuple[str, list[int], str]]:
    """(text, ids, tail) per prompt: a string or a list of them (the run's template applied), or token
    ids. The tail is the last word when the ids end in <unk> for it (LanguageModel.prompt_tail)."""
    if isinstance(prompt, str):
        return [(prompt, lm.prompt_ids(prompt), lm.prompt_tail(prompt))]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, lm.prompt_ids(p), lm.prompt_tail(p)))
            continue
        bad = [i for i in p if not 0 <= i < lm.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{lm.tokenizer.vocab_size - 1})",
                           param="prompt")
        out.append((lm.tokenizer.decode(p), list(p), ""))
    if not out:
        raise APIError(400, "prompt is an empty list; send a string or a list of strings", param="prompt")
    return out


def sampling_for(body, settings: Settings, lm, prompt_ids: list[int], index: int, chat: bool) -> SamplingConfig:
    limit = lm.decoder.max_context or settings.max_prompt_tokens
    if len(prompt_ids) > limit:
        raise APIError(400, f"the prompt is {len(prompt_ids)} tokens, more than this model's context of {limit}; "
                            f"shorten it", param="messages" if chat else "prompt", code="context_length_exceeded")
    wanted = getattr(body, "max_completion_tokens", None)
    wanted = body.max_tokens if wanted is None else wanted
    if wanted is None:  # not asked for: the default, within this server's limit
        wanted = min(settings.default_chat_tokens, settings.max_tokens)
    if wanted > settings.max_tokens:
        raise APIError(400, f"max_tokens is {wanted}; this server allows at most {settings.max_tokens}",
                       param="max_tokens")
    seed = None if body.seed is None else body.seed + index
    return SamplingConfig(wanted, body.temperature, body.top_k, None if body.top_p >= 1.0 else body.top_p,
                          seed, list(body.stop), ignore_eos=body.ignore_eos,
                          token_healing=body.token_healing)


async def respond(app: FastAPI, request: Request, body, prompts, chat: bool):
    lm, settings, worker = app.state.lm, app.state.settings, app.state.worker
    jobs = []  # (choice index, prompt text, prompt ids, sampling, prompt tail)
    for p, (text, ids, tail) in enumerate(prompts):
        for j in range(body.n):
            index = p * body.n + j
            jobs.append((index, text, ids, sampling_for(body, settings, lm, ids, index, chat), tail))
    most = settings.max_batch + settings.max_waiting
    if len(jobs) > most:  # waiting cannot help: refuse for good, not with a 429
        raise APIError(400, f"this request asks for {len(jobs)} completions (n times the prompts); this server "
                            f"holds at most {most} at once", param="n")
    created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    streams = [Stream(worker) for _ in jobs]
    try:
        for stream, (_, _, ids, sampling, tail) in zip(streams, jobs):
            stream.start(ids, sampling, tail)
    except Busy as exc:
        for stream in streams:
            stream.cancel()
        raise APIError(429, str(exc), kind="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(sse(streams, jobs, body, rid, created, chat, include_usage, settings.name),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts = await gather(request, streams)
    if texts is None:  # nobody reads the answer: nginx's "client closed request", for the access log
        return Response(status_code=499)
    choices, completion_tokens = [], 0
    for stream, (index, text, *_), out in zip(streams, jobs, texts):
        completion_tokens += stream.request.new_tokens
        if chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": out.lstrip()},
                            "finish_reason": stream.finish_reason, "logprobs": None})
        else:
            choices.append({"index": index, "text": (text if body.echo else "") + out, "logprobs": None,
                            "finish_reason": stream.finish_reason})
    prompt_tokens = sum(len(ids) for _, ids, _ in prompts)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": settings.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class Stream:
    """One request's pieces, carried from the worker's thread into the event loop."""

    def __init__(self, worker: Worker):
        self.worker, self.request = worker, None
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def start(self, prompt_ids, sampling, tail: str = "") -> None:
        self.request = self.worker.submit(prompt_ids, sampling, self._update, tail)

    def _update(self, request, piece: str) -> None:  # on the worker's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (piece, request.finished))
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    async def pieces(self):
        if self.request is None:
            return
        while True:
            piece, finished = await self.queue.get()
            if piece:
                yield piece
            if finished:
                return

    def cancel(self) -> None:
        if self.request is not None and not self.request.finished:
            self.worker.cancel(self.request)

    @property
    def finish_reason(self) -> str:
        reason = self.request.finish_reason
        if reason == "error":
            raise APIError(500, self.request.error or "generation failed", kind="server_error")
        return reason


async def gather(request: Request, streams: list[Stream]) -> list[str] | None:
    """Every stream's whole text; None when the client disconnected, which cancels them all."""
    async def collect(stream: Stream) -> str:
        return "".join([piece async for piece in stream.pieces()])

    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=0.5)
            if not all(t.done() for t in tasks) and await request.is_disconnected():
                return None  # (an exception here would be logged as the server's failure)
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


async def sse(streams, jobs, body, rid: str, created: int, chat: bool, include_usage: bool, name: str):
    """Server-sent events as OpenAI's clients parse them: `data: {chunk}` lines, then `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices, usage=None) -> str:
        chunk = {"id": rid, "object": kind, "created": created, "model": name, "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def choice(index, text, finish=None, first=False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

    merged: asyncio.Queue = asyncio.Queue()
    begun = [not chat] * len(streams)  # a reply starts at its first visible character (after "Assistant:")

    async def forward(i: int, stream: Stream):
        async for piece in stream.pieces():
            await merged.put((i, piece))
        await merged.put((i, None))

    tasks = [asyncio.ensure_future(forward(i, s)) for i, s in enumerate(streams)]
    try:
        for (index, text, *_) in jobs:  # every choice opens at once (with the prompt, for echo)
            yield event([choice(index, text if getattr(body, "echo", False) else "", first=True)])
        open_streams = len(streams)
        while open_streams:
            i, piece = await merged.get()
            index = jobs[i][0]
            if piece is None:
                open_streams -= 1
                try:
                    reason = streams[i].finish_reason
                except APIError as exc:
                    yield f"data: {json.dumps(error_body(exc.message, exc.kind))}\n\n"
                    reason = "stop"
                yield event([choice(index, "", reason)])
            else:
                if not begun[i]:
                    piece = piece.lstrip()
                    begun[i] = bool(piece)
                if piece:
                    yield event([choice(index, piece)])
        if include_usage:
            prompt_tokens = sum(len(ids) for _, _, ids, *_ in jobs[::body.n])
            completion = sum(s.request.new_tokens for s in streams)
            yield event([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                             "total_tokens": prompt_tokens + completion})
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects mid-stream: its requests leave the batch at once
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


# ---- model information ----------------------------------------------------------------------------

def model_card(lm, settings: Settings) -> dict:
    created = int((lm.run_dir / "config.json").stat().st_mtime) if lm.run_dir else 0
    return {"id": settings.name, "object": "model", "created": created, "owned_by": "lmforge"}


def model_info(lm, settings: Settings) -> dict:
    """What the playground shows: the model, its tokenizer, its training summary."""
    summary = {}
    if lm.run_dir and (lm.run_dir / "summary.json").exists():
        try:
            summary = json.loads((lm.run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
    options = lm.config["model"]["options"]
    return {"name": settings.name, "arch": lm.config["model"]["arch"], "parameters": lm.num_params,
            "tokenizer": lm.tokenizer.kind, "vocab_size": lm.tokenizer.vocab_size,
            "context_len": lm.decoder.max_context, "decoding": lm.decoding,
            "decoding_cache": lm.decoding_cache, "compiled_step": lm.decoder.compiled,
            "size": {k: options[k] for k in ("d_model", "d_hidden", "n_layers", "n_heads") if k in options},
            "val_bits_per_byte": (summary.get("val") or {}).get("bits_per_byte") or summary.get("val_bits_per_byte"),
            # a fine-tune's own held-out figure, when it has no validation text (prompt -> completion, classify)
            "completion_bits_per_byte": summary.get("completion_bits_per_byte"), "accuracy": summary.get("accuracy"),
            "steps": summary.get("steps"), "train_time_s": summary.get("train_time_s"),
            "template": lm.template, "finetune": (lm.config.get("finetune") or {}).get("task"),
            "has_loss_curve": bool(lm.run_dir and (lm.run_dir / "loss.png").exists()),
            "api_key_required": bool(settings.api_key), "max_tokens": settings.max_tokens}


# ---- errors and limits ----------------------------------------------------------------------------

async def _api_error(request: Request, exc: APIError):
    return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


async def _lmforge_error(request: Request, exc: LmforgeError):
    return JSONResponse(error_body(str(exc), "invalid_request_error"), status_code=400)


async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [part for part in first.get("loc", ()) if part != "body"]
    # a union's alternatives are named in the location ("prompt", "list[int]"): the field is what came before
    where = [str(part) for part in loc if isinstance(part, int) or part.isidentifier() and part not in _TYPE_NAMES]
    param = ".".join(where) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", None
    elif not where and first.get("type") == "missing":
        message = "the request body is empty; send a JSON object (Content-Type: application/json)"
    elif not where and first.get("type") != "value_error":  # not an object (a value error: one of the checks)
        message = "the request body must be a JSON object, sent with Content-Type: application/json"
    elif not where:  # a check across fields names the parameter it refuses first
        words = message.split()
        param = words[0] if words and words[0].isidentifier() else None
    elif first.get("type") == "missing":
        message = f"{param} is required"
    elif len(where) < len(loc):
        message = f"{param} must be {_ACCEPTED.get(where[-1], 'of another type; see the OpenAI API reference')}"
    else:
        message = f"{param}: {message}"
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}
_ACCEPTED = {"prompt": "a string, a list of strings, a list of token ids or a list of such lists",
             "stop": "a string or a list of strings", "content": "a string or a list of text parts"}


async def _http_error(request: Request, exc: StarletteHTTPException):
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)


async def _unexpected_error(request: Request, exc: Exception):
    return JSONResponse(error_body(f"internal error ({type(exc).__name__})", "server_error"), status_code=500)


class ApiKey:
    """Every /v1/ request must carry `Authorization: Bearer <key>`; the page and /health need none.

    A plain ASGI middleware (not `@app.middleware`): it hands the endpoint the server's own `receive`,
    so a request still sees at once when its client has gone.
    """

    def __init__(self, app, key: str):
        self.app, self.expected = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            scheme, _, given = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
            # the scheme is case-insensitive (RFC 7235: "bearer" is "Bearer"); the key is compared exactly
            if not (scheme.lower() == b"bearer" and secrets.compare_digest(given.strip(), self.expected)):
                message = "missing or wrong API key; send the header 'Authorization: Bearer <key>'"
                return await _send_json(send, 401, error_body(message, "invalid_request_error",
                                                              code="invalid_api_key"))
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether or not they declare a length."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # answer now; to the endpoint, the client has gone
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message):  # what the endpoint answers after a refusal goes nowhere
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded)

    async def _refuse(self, send):
        await _send_json(send, 413, error_body(f"the request body is over {self.limit} bytes", "invalid_request_error",
                                               code="request_too_large"))


async def _send_json(send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
