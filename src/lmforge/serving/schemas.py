"""Request bodies of the OpenAI-compatible API, as pydantic models shaped like OpenAI's.

Fields OpenAI clients send that do not change what lmforge does (user, a logprobs of null...) are
accepted and ignored; values lmforge cannot honour (logprobs, penalties, logit_bias, best_of, and the
sampling extensions of other servers in EXTENSIONS) are a 400 that names the parameter. `top_k` and
`ignore_eos` are extensions (vLLM has the same two), and `token_healing` (true unless sent false: see
lmforge.generation.healing) is lmforge's own.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..api import ROLES

MAX_N = 8  # completions per prompt
MAX_STOP = 4  # stop strings, as OpenAI allows


def _whole_characters(texts) -> None:
    """JSON can spell half of a UTF-16 surrogate pair ("\\ud800") that no UTF-8 text holds: refuse it by
    name, rather than failing later while tokenizing or echoing it."""
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"holds an unpaired UTF-16 surrogate ({text[e.start]!r}), which is not "
                                 f"valid Unicode; send whole characters") from None


# Parameters other OpenAI-style servers (vLLM, TGI, llama.cpp) take that would change the text: a client
# sending one expects it to act, so anything but its neutral value is refused by name, not ignored.
EXTENSIONS = {"top_logprobs": (None, 0), "prompt_logprobs": (None, 0), "repetition_penalty": (None, 1),
              "min_p": (None, 0), "typical_p": (None, 1), "tfs_z": (None, 1), "mirostat": (None, 0),
              "min_tokens": (None, 0), "length_penalty": (None, 1), "use_beam_search": (None, False),
              "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
              "grammar": (None,), "json_schema": (None,), "tool_choice": (None, "none", "auto")}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class Sampling(BaseModel):
    # strict: a client that sends "5" or true for max_tokens, or "yes" for stream, learns of its bug (as
    # from OpenAI) instead of having it guessed at; an integer is still a valid float
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: Union[str, list[str], None] = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    logprobs: Union[bool, int, None] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension (as vLLM's): generate past the end-of-text token
    token_healing: bool = True  # an extension: regenerate the prompt's last token

    @model_validator(mode="before")
    @classmethod
    def _extensions(cls, data):
        if isinstance(data, dict):
            for name, neutral in EXTENSIONS.items():
                if name in data and data[name] not in neutral:
                    raise ValueError(f"{name} is not supported by this server; leave it out")
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        _whole_characters(stops)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return [s for s in stops if s]

    @model_validator(mode="after")
    def _unsupported(self):
        # logprobs: false asks for nothing, but a completion's logprobs: 0 asks for the chosen tokens' own
        if self.logprobs is not None and self.logprobs is not False:
            raise ValueError("logprobs is not supported by this server; leave it out")
        for name, neutral in (("presence_penalty", (0.0,)), ("frequency_penalty", (0.0,)),
                              ("logit_bias", (None, {}))):
            if getattr(self, name) not in neutral:
                raise ValueError(f"{name} is not supported by this server; leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = ""
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions (also when sent as null)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value):
        _whole_characters([value] if isinstance(value, str) else value)
        return value

    @model_validator(mode="after")
    def _completion_only(self):
        if self.max_tokens is None:
            self.max_tokens = 16
        if self.suffix:
            raise ValueError("suffix is not supported by this server; leave it out")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported by this server; leave it out")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal[ROLES]  # the roles the Python API understands
    content: Union[str, list[dict], None] = ""

    @field_validator("content")
    @classmethod
    def _text(cls, value):
        if isinstance(value, list):  # content parts: only text parts are understood
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in value):
                raise ValueError("only text content parts are supported")
            value = "".join(part["text"] for part in value)
        _whole_characters([value])
        return value or ""


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_only(self):
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise ValueError(f"{name} (function calling) is not supported by this server; leave it out")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format other than text is not supported by this server; leave it out")
        return self
