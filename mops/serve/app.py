"""The HTTP API (FastAPI): OpenAI's completions and chat completions, models, health, metrics.

Routes validate and tokenize on the event loop, hand the request to the engine thread
(:mod:`mops.serve.engine`) and wait for its outputs on an asyncio queue: a whole JSON body,
or server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``) with ``stream: true``.

Bad input is a 400 naming the field (:mod:`mops.serve.errors`); a full waiting queue is a
503 with ``Retry-After``; a client that leaves (a closed stream, or a dropped connection
while it waits for a whole body) cancels its request, which frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from mops.serve.chat import chat_prompt
from mops.serve.engine import Engine, EngineStopped, Output, QueueFull
from mops.serve.engine import Request as EngineRequest
from mops.serve.errors import APIError, bad_request, install_handlers
from mops.serve.metrics import ServeMetrics
from mops.serve.sampling import SamplingParams
from mops.serve.schemas import ChatRequest, CompletionRequest, ResponseShape

log = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
DISCONNECT_POLL_SECONDS = 0.25
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the stream ends, so its cleanup
    (cancelling the request) runs at once when a client leaves mid-stream."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass  # the client left; there is no one to answer
        finally:
            await self.body_iterator.aclose()


def sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class Pending:
    """One request in the engine, seen from the event loop: its outputs arrive on a queue."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.request = EngineRequest(prompt_ids, params, self._deliver)
        self.finished = False

    def _deliver(self, output: Output) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, output)
        except RuntimeError:
            pass  # the event loop is gone (shutdown)

    async def next(self, timeout: float | None = None) -> Output:
        output = await (asyncio.wait_for(self.queue.get(), timeout) if timeout else self.queue.get())
        self.finished = output.finished
        return output

    def cancel(self) -> None:
        if not self.finished:
            self.engine.cancel(self.request)


class Service:
    def __init__(self, engine: Engine, model_name: str, metrics: ServeMetrics, fingerprint: str, retry_after: int):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.fingerprint, self.retry_after = fingerprint, retry_after
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())

    # ------------------------------------------------------------------ checks
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(400, f"model {name!r} is not served here; this server serves {self.model_name!r} "
                           "(GET /v1/models)", "model", "model_not_found")

    def prompt_ids(self, body) -> tuple[list[int], str]:
        if isinstance(body, ChatRequest):
            return self.tokenizer(chat_prompt(body.messages))["input_ids"], "messages"
        prompt = body.prompt
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            vocab = len(self.tokenizer)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        if not ids:
            raise bad_request("prompt: empty; send at least one token of text", "prompt")
        return ids, "prompt"

    def sampling(self, body, n_prompt: int, prompt_field: str) -> SamplingParams:
        room = self.engine.max_context - n_prompt
        if room < 1:
            raise APIError(400, f"{prompt_field}: {n_prompt} tokens; this server's context holds "
                           f"{self.engine.max_context} tokens, prompt and completion together, so the prompt may "
                           f"have at most {self.engine.max_context - 1}", prompt_field, "context_length_exceeded")
        chat = isinstance(body, ChatRequest)
        limit = body.token_limit if chat else body.max_tokens
        field = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        if limit is None:
            limit = room if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
        elif limit > room:
            raise APIError(400, f"{field} = {limit}: the prompt takes {n_prompt} of this server's "
                           f"{self.engine.max_context} context tokens, so at most {room} can be generated", field,
                           "context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        return SamplingParams(max_tokens=limit, temperature=temperature, top_p=top_p, stop=tuple(body.stop or ()),
                              seed=body.seed, ignore_eos=bool(body.ignore_eos))

    # ------------------------------------------------------------------ a request
    async def generate(self, http: Request, body, endpoint: str) -> Response:
        try:
            self.check_model(body.model)
            ids, prompt_field = self.prompt_ids(body)
            params = self.sampling(body, len(ids), prompt_field)
        except APIError:
            self.metrics.requests.labels(endpoint, "invalid").inc()
            raise
        pending = Pending(self.engine, ids, params)
        try:
            self.engine.submit(pending.request)
        except (QueueFull, EngineStopped) as e:
            self.metrics.requests.labels(endpoint, "overloaded").inc()
            raise APIError(503, f"the server is at capacity ({e}); retry after {self.retry_after} s", None,
                           "server_overloaded", "server_error", {"Retry-After": str(self.retry_after)}) from e
        shape = ResponseShape(isinstance(body, ChatRequest), self.model_name, self.fingerprint)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(self.stream(pending, shape, endpoint, include_usage))
        return await self.whole(http, pending, shape, endpoint)

    async def whole(self, http: Request, pending: Pending, shape: ResponseShape, endpoint: str) -> Response:
        texts = []
        check_at = time.monotonic() + DISCONNECT_POLL_SECONDS
        try:
            while True:
                try:
                    output = await pending.next(DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    output = None
                if time.monotonic() >= check_at:  # by the clock: a busy queue never times out
                    check_at = time.monotonic() + DISCONNECT_POLL_SECONDS
                    if await http.is_disconnected():
                        pending.cancel()
                        self.metrics.requests.labels(endpoint, "cancelled").inc()
                        return Response(status_code=499)  # no one reads it
                if output is None:
                    continue
                texts.append(output.text)
                if output.finished:
                    break
        finally:
            pending.cancel()  # only if it did not finish (the handler itself was cancelled)
        if output.finish_reason == "error":
            self.metrics.requests.labels(endpoint, "error").inc()
            raise APIError(500, f"generation failed: {output.error}", None, "generation_failed", "server_error")
        self._completed(endpoint, pending)
        return JSONResponse(shape.whole("".join(texts), output.finish_reason, output.prompt_tokens,
                                        output.completion_tokens))

    async def stream(self, pending: Pending, shape: ResponseShape, endpoint: str, include_usage: bool):
        outcome = "cancelled"  # unless the stream runs to its end
        try:
            if shape.chat:
                yield sse(shape.chunk(first=True))
            while True:
                output = await pending.next()
                if output.finish_reason == "error":
                    outcome = "error"
                    yield sse({"error": {"message": f"generation failed: {output.error}", "type": "server_error",
                                         "param": None, "code": "generation_failed"}})
                    return
                if output.finish_reason == "cancelled":
                    return
                if output.text or output.finished:
                    finish = output.finish_reason
                    if output.text and finish and shape.chat:  # the text, then the reason, as OpenAI streams them
                        yield sse(shape.chunk(output.text))
                        yield sse(shape.chunk(finish_reason=finish))
                    else:
                        yield sse(shape.chunk(output.text, finish))
                if output.finished:
                    if include_usage:
                        yield sse(shape.usage_chunk(output.prompt_tokens, output.completion_tokens))
                    yield sse("[DONE]")
                    outcome = "completed"
                    return
        finally:
            pending.cancel()
            if outcome == "completed":
                self._completed(endpoint, pending)
            else:
                self.metrics.requests.labels(endpoint, outcome).inc()

    def _completed(self, endpoint: str, pending: Pending) -> None:
        self.metrics.requests.labels(endpoint, "completed").inc()
        self.metrics.latency.observe(time.perf_counter() - pending.request.arrived)


def build_app(engine: Engine, model_name: str, *, metrics: ServeMetrics | None = None, fingerprint: str = "",
              retry_after: int = 1) -> FastAPI:
    """The FastAPI app around a started (or to be started) engine; the app stops the engine on shutdown."""
    metrics = metrics or engine.metrics or ServeMetrics()
    engine.metrics = metrics  # the engine reports steps, prefills and tokens into the same registry
    metrics.watch(engine)
    service = Service(engine, model_name, metrics, fingerprint, retry_after)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="mops-serve", lifespan=lifespan)
    app.state.service = service

    def count_invalid(request: Request) -> None:
        endpoint = ENDPOINTS.get(request.url.path)
        if endpoint:
            metrics.requests.labels(endpoint, "invalid").inc()

    install_handlers(app, count_invalid)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await service.generate(request, body, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await service.generate(request, body, "chat_completions")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": service.created,
                                            "owned_by": "mops-toolkit"}]}

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.alive else "unavailable", "model": model_name, "running": engine.running,
                "waiting": engine.waiting, "max_batch": engine.max_batch, "max_queue": engine.max_queue,
                "max_context": engine.max_context}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return app
