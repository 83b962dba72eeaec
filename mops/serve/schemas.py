"""Request bodies (validated by pydantic) and response bodies, in OpenAI's shapes.

Every field of OpenAI's completions and chat completions requests is accepted by name.
Fields this server implements: ``model``, ``prompt`` / ``messages``, ``max_tokens`` (and
chat's ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``, ``seed``,
``stream``, ``stream_options.include_usage``, ``user`` (ignored), and vLLM's extension
``ignore_eos`` (generate ``max_tokens`` tokens whatever the model's end-of-sequence token
says; stop strings still end a reply: what load tests use for replies of equal length). The others are accepted
at their default value only (``n = 1``, no penalties, no logprobs, no tools, ...): any
other value is a 400 naming the field, never silently ignored. An unknown field is a 400
too, as with OpenAI's API.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOPS = 4  # OpenAI's limit


def _only_default(name: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        shown = "".join(f" or send {a!r}" for a in allowed[:1])
        raise ValueError(f"{name} = {value!r} is not supported by mops-serve; leave it out{shown}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None


class GenerationFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool | None = False  # vLLM's extension: only max_tokens and stop strings end the reply

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v is not None and v != 1:
            raise ValueError(f"n = {v}: mops-serve returns one choice per request; send n = 1, or {v} requests "
                             "(concurrent requests share decode steps anyway)")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"{len(stops)} stop sequences; at most {MAX_STOPS}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v, info):
        _only_default(info.field_name, v, (0, 0.0))
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v, info):
        _only_default(info.field_name, v or None, ())
        return v


class CompletionRequest(GenerationFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError(f"{len(v)} prompts in one request; send one prompt per request "
                                 "(concurrent requests share decode steps anyway)")
            v = v[0]
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v, info):
        _only_default(info.field_name, v, (False,))
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v, info):
        _only_default(info.field_name, v, (0,))
        return v

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v, info):
        _only_default(info.field_name, v, (1,))
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v, info):
        _only_default(info.field_name, v or None, ())
        return v


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Ignore fields like ``refusal`` or ``annotations`` that clients copy back from earlier replies.
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    @field_validator("logprobs", "parallel_tool_calls", "store")
    @classmethod
    def _off(cls, v, info):
        _only_default(info.field_name, v, (False,))
        return v

    @field_validator("top_logprobs", "tools", "tool_choice", "functions", "function_call")
    @classmethod
    def _absent(cls, v, info):
        _only_default(info.field_name, v or None, ("none",) if info.field_name == "tool_choice" else ())
        return v

    @field_validator("response_format")
    @classmethod
    def _plain_text(cls, v, info):
        _only_default(info.field_name, v, ({"type": "text"},))
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
    """The bodies of one request's reply, for either endpoint."""

    def __init__(self, chat: bool, model: str, fingerprint: str):
        self.chat, self.model, self.fingerprint = chat, model, fingerprint
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, extra: dict | None = None) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices, **(extra or {})}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice], {"usage": usage(prompt_tokens, completion_tokens)})
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], {"usage": usage(prompt_tokens, completion_tokens)})

    def chunk(self, text: str = "", finish_reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], {"usage": usage(prompt_tokens, completion_tokens)})
