"""Continuous batching of a :class:`~mops.injection.PromptedLM`: one thread owns the model.

Requests wait in a bounded queue (:meth:`Engine.submit` refuses past it). The engine
thread loops:

1. rows whose client left are dropped (their slot is free for the next request);
2. waiting requests take the free rows: each is prefilled *alone*, exactly as
   :meth:`PromptedLM.generate` does it (the layers below the injection layer on its
   tokens, its own gate weights from its instruction, its own prompt, the layers above;
   a prompt every request shares has its keys and values computed once, at start-up),
   its keys and values, prompt positions included, are copied into its slot
   (:mod:`mops.serve.kv_slots`), and its first token is chosen;
3. one decode step runs every running row: each row feeds its last token at its own
   position, attends to its own slot with its own gate bias on its prompt columns
   (:mod:`mops.serve.decode_attention`), and chooses with its own sampling settings;
4. rows that hit a stop, the end-of-sequence token or their ``max_tokens`` report and
   leave; the others stay for the next step.

A row's arithmetic never depends on its neighbours: prefill is per request, and decode
steps run at batch sizes probed at start-up to reproduce a row's bits
(:mod:`mops.serve.batch_shapes`). So a greedy request gets the same tokens alone and in
any mixed batch.

Each request reports through its ``on_output`` callback, called on the engine thread
(the HTTP layer hands the outputs to its event loop).

All tensor work happens on the engine thread, start-up included (the caller's thread only
hands over the loaded model). A second thread with its own OpenMP team puts more OpenMP
threads in the process than there are cores, and libgomp then stops its workers spinning
between parallel regions: each of a decode step's hundreds of small regions pays a futex
wake-up, which made steps about 40% slower on 2 cores.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from mops.injection import PromptedLM
from mops.serve.batch_shapes import BatchShapes
from mops.serve.decode_attention import KEY_BLOCK, DecodeMasks, decoding
from mops.serve.kv_slots import SlotCache, SlotStore, round_up
from mops.serve.sampling import RowSampler, SamplingParams
from mops.serve.text_stream import TextStream

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should come back later."""


class EngineStopped(RuntimeError):
    """The engine is not running (shut down, or its start-up failed)."""


@dataclass
class Output:
    """What a request hears from the engine: new text, and on the last one why it ended."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Request:
    """One generation: the prompt's token ids, how to sample, where outputs go."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, on_output: Callable[[Output], None]):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_output = on_output
        self.cancelled = threading.Event()
        self.arrived = time.perf_counter()
        self.finished = False  # set (under the engine's lock) by its last output


@dataclass
class _Row:
    request: Request
    slot: int
    cached: int  # tokens of this request whose keys/values are in its slot (below the prompt offset)
    bias: torch.Tensor | None  # M: this row's attention bias toward its prompt positions
    sampler: RowSampler
    text: TextStream
    last_token: int = 0
    generated: int = 0
    done: bool = False


class Engine:
    def __init__(self, lm: PromptedLM, tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 max_context: int = 2048, threads: int | None = None, metrics=None):
        self.lm, self.model, self.tokenizer = lm, lm.base, tokenizer
        config = self.model.config
        self.max_batch, self.max_queue, self.threads, self.metrics = max_batch, max_queue, threads, metrics
        self.prompt_len = lm.mixture.prompt_positions
        self.max_context = min(max_context, config.max_position_embeddings - self.prompt_len)
        # Decode attention sees a row's whole context; with a sliding-window model that is exact
        # only while prompt + context fit in the window.
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if window:
            self.max_context = min(self.max_context, window - self.prompt_len)
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.inject_layer = lm.inject_layer
        self.n_layers = config.num_hidden_layers
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        store = dict(rows=max_batch, kv_heads=kv_heads, head_dim=head_dim, dtype=self.dtype, device=self.device)
        self.cache = SlotCache(SlotStore(self.inject_layer, max_length=self.max_context, **store),
                               SlotStore(self.n_layers - self.inject_layer,
                                         max_length=self.prompt_len + self.max_context, **store),
                               self.inject_layer)
        self.prompt_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # set at start-up, in _run
        self.shapes: BatchShapes | None = None
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[_Row] = []
        self._in_flight = 0  # submitted and not yet finished (waiting, being prefilled or running)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # ------------------------------------------------------------------ control
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="mops-serve-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise EngineStopped(f"the engine failed to start: {self._startup_error}") from self._startup_error
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def submit(self, request: Request) -> None:
        """Queue a request; :class:`QueueFull` past ``max_batch`` running and ``max_queue``
        waiting requests. The bound counts every request not yet finished, those being
        prefilled included, so a burst gets exactly ``max_batch + max_queue`` in."""
        if len(request.prompt_ids) + request.params.max_tokens > self.max_context:
            raise ValueError(f"{len(request.prompt_ids)} prompt tokens + max_tokens {request.params.max_tokens} "
                             f"exceed the context of {self.max_context}")
        with self._wake:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            if self._in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self._in_flight} requests are already in flight (the bound is {self.max_batch} "
                                f"running + {self.max_queue} waiting)")
            self._in_flight += 1
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """The client left: a waiting request leaves the queue now, a running one its row at the next step."""
        request.cancelled.set()
        with self._wake:
            try:
                self._waiting.remove(request)
            except ValueError:
                return  # running (the engine drops it) or already finished
        self._report(request, Output(finish_reason="cancelled", prompt_tokens=len(request.prompt_ids)))

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            if self.threads:
                torch.set_num_threads(self.threads)  # intra-op threads are set per calling thread
            self.shapes = BatchShapes.probe(self.model, self.max_batch)
            # A prompt every request shares runs through the upper layers once, here; prefill
            # then pays only for the request's own tokens (PromptedLM.generate does the same).
            with torch.inference_mode():
                self.prompt_kv = self.lm.shared_prompt_kv()
        except BaseException as e:  # noqa: BLE001 - reported to start()'s caller
            self._startup_error = e
            self._ready.set()
            return
        self._ready.set()
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._rows:
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as e:  # a bug must not take the server down: fail the rows in flight
                    log.exception("decode step failed; failing the %d running requests", len(self._rows))
                    for row in self._rows:
                        self._report(row.request, Output(finish_reason="error", error=f"{type(e).__name__}: {e}",
                                                         prompt_tokens=len(row.request.prompt_ids),
                                                         completion_tokens=row.generated))
                    self._rows = []
        self._shut_down()

    def _shut_down(self) -> None:
        with self._wake:
            left = list(self._waiting) + [row.request for row in self._rows]
            self._waiting.clear()
            self._rows = []
        for request in left:
            self._report(request, Output(finish_reason="error", error="the server is shutting down",
                                         prompt_tokens=len(request.prompt_ids)))

    def _report(self, request: Request, output: Output) -> None:
        if output.finished:
            with self._wake:
                if not request.finished:  # its place in the bound is free
                    request.finished = True
                    self._in_flight -= 1
        try:
            request.on_output(output)
        except Exception:  # a client's callback must not stop the engine
            log.exception("a request's output callback failed")

    # ------------------------------------------------------------------ rows
    def _drop_cancelled(self) -> None:
        for row in self._rows:
            if row.request.cancelled.is_set():
                row.done = True
                self._report(row.request, Output(finish_reason="cancelled", prompt_tokens=len(row.request.prompt_ids),
                                                 completion_tokens=row.generated))
        self._compact()

    def _admit(self) -> None:
        while len(self._rows) < self.max_batch:
            with self._wake:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            if request.cancelled.is_set():  # cancelled between leaving the queue and here
                self._report(request, Output(finish_reason="cancelled", prompt_tokens=len(request.prompt_ids)))
                continue
            try:
                row = self._prefill(request)
            except Exception as e:  # this request's problem only
                log.exception("prefill failed")
                self._report(request, Output(finish_reason="error", error=f"{type(e).__name__}: {e}",
                                             prompt_tokens=len(request.prompt_ids)))
                continue
            if not row.done:
                self._rows.append(row)

    def _prefill(self, request: Request) -> _Row:
        """The request alone, as :meth:`PromptedLM.generate` prefills it; its first token."""
        began = time.perf_counter()
        lm, model = self.lm, self.model
        ids = torch.tensor([request.prompt_ids], device=self.device)
        mask = torch.ones_like(ids)
        keys = mask.bool()
        cache = DynamicCache(config=model.config)
        hidden, gate_states, positions = lm.lower(ids, mask, cache)
        _, prompt, bias = lm.mix(gate_states, keys, 1)
        hidden = lm.upper(hidden, keys, positions, prompt, bias, cache, self.prompt_kv)
        logits = model.lm_head(model.model.norm(hidden[:, -1])).float()
        slot = len(self._rows)
        layers = cache.layers
        l = self.inject_layer
        self.cache.lower.load(slot, [c.keys for c in layers[:l]], [c.values for c in layers[:l]])
        self.cache.upper.load(slot, [c.keys for c in layers[l:]], [c.values for c in layers[l:]])
        row = _Row(request, slot, cached=len(request.prompt_ids), bias=None if bias is None else bias[0],
                   sampler=RowSampler(request.params), text=TextStream(self.tokenizer, request.params.stop))
        if self.metrics is not None:
            now = time.perf_counter()
            self.metrics.prefill_seconds.observe(now - began)
            self.metrics.queue_seconds.observe(began - request.arrived)
            self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        self._accept(row, row.sampler.choose(logits[0]))
        if self.metrics is not None:
            self.metrics.ttft.observe(time.perf_counter() - request.arrived)
        return row

    def _accept(self, row: _Row, token: int) -> None:
        """Append a chosen token to its row, report the text it adds, and end the row if due."""
        row.last_token = token
        row.generated += 1
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
        finish = None
        if token in self.eos and not row.request.params.ignore_eos:
            text, finish = row.text.flush(), "stop"
        else:
            text, stopped = row.text.push(token)
            if stopped:
                finish = "stop"
            elif row.generated >= row.request.params.max_tokens:
                text, finish = text + row.text.flush(), "length"
        row.done = finish is not None
        self._report(row.request, Output(text, [token], finish, prompt_tokens=len(row.request.prompt_ids),
                                         completion_tokens=row.generated))

    def _compact(self) -> None:
        """Finished rows leave; the last running row takes each freed slot (slots stay 0..n-1)."""
        for i in sorted((i for i, row in enumerate(self._rows) if row.done), reverse=True):
            last = self._rows[-1]
            if i != len(self._rows) - 1:
                self.cache.lower.move(last.slot, i, last.cached)
                self.cache.upper.move(last.slot, i, self.prompt_len + last.cached)
                last.slot = i
                self._rows[i] = last
            self._rows.pop()

    # ------------------------------------------------------------------ a decode step
    def _step(self) -> None:
        began = time.perf_counter()
        rows = self._rows
        n = len(rows)
        b = self.shapes.padded(n)
        pad = [0] * (b - n)  # padding rows: free slots, one valid position, outputs dropped
        tokens = torch.tensor([r.last_token for r in rows] + pad, device=self.device)[:, None]
        cached = torch.tensor([r.cached for r in rows] + pad, device=self.device)
        M = self.prompt_len
        self.cache.lower.reserve(b, int(cached.max()) + 1)  # padding rows read slots n..b-1
        self.cache.upper.reserve(b, M + int(cached.max()) + 1)
        masks = DecodeMasks(self._mask(cached + 1, 0, rows), self._mask(M + cached + 1, M, rows), self.inject_layer)
        self.cache.begin_step(cached, cached + M)
        model = self.model
        hidden = model.model.embed_tokens(tokens)
        with decoding(model.config):
            if self.inject_layer:
                hidden = self._layers(hidden, model.model.layers[: self.inject_layer], cached[:, None], masks)
            hidden = self._layers(hidden, model.model.layers[self.inject_layer :], cached[:, None] + M, masks)
        logits = model.lm_head(model.model.norm(hidden[:, -1])).float()[:n]
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            row.cached += 1
            self._accept(row, greedy[i] if row.sampler.greedy else row.sampler.choose(logits[i]))
        self._compact()
        if self.metrics is not None:
            self.metrics.batch_size.observe(n)
            self.metrics.padded_batch_size.observe(b)
            self.metrics.step_seconds.observe(time.perf_counter() - began)

    def _layers(self, hidden, layers, positions, masks: DecodeMasks):
        rope = self.model.model.rotary_emb(hidden, position_ids=positions)
        for layer in layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, past_key_values=self.cache,
                           use_cache=True, position_embeddings=rope, decode_masks=masks)
        return hidden

    def _mask(self, lengths: torch.Tensor, prompt_len: int, rows: list[_Row]) -> torch.Tensor:
        """Rows x padded keys: 0 on each row's valid keys (its gate bias on the prompt's), very negative elsewhere."""
        width = round_up(int(lengths.max()), KEY_BLOCK)
        columns = torch.arange(width, device=self.device)
        mask = torch.zeros(len(lengths), width, dtype=self.dtype, device=self.device)
        mask.masked_fill_(columns[None] >= lengths[:, None], torch.finfo(self.dtype).min)
        for i, row in enumerate(rows):
            if prompt_len and row.bias is not None:
                mask[i, :prompt_len] += row.bias.to(self.dtype)
        return mask
