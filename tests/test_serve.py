"""mops-serve: the OpenAI-compatible server, checked with the official ``openai`` client
against servers started on free local ports (tiny random Llamas with adapters trained in
seconds; one end-to-end check on the embedded model)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode
from prometheus_client.parser import text_string_to_metric_families

from mops.adapter import save_adapter
from mops.data import format_prompt, load_records, split_records, stratified_subset
from mops.mixture import MixtureConfig
from mops.models import load_model
from mops.serve.app import build_app
from mops.serve.batch_shapes import BatchShapes
from mops.serve.cli import entry, load_for_serving
from mops.serve.engine import Engine, Request
from mops.serve.runner import BackgroundServer
from mops.serve.sampling import SamplingParams
from mops.serve.text_stream import TextStream
from mops.train import TrainConfig, recover

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-mops"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and the machine may be busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def splits():
    return split_records(load_records(["dolly", "natural-instructions"], limit_per_source=80))


def train_adapter(base, splits, out, **mixture) -> str:
    model, tok = load_model(base)
    config = MixtureConfig(**{"n_experts": 3, "prompt_len": 4, "gate": "mops", "gate_layer": 1, **mixture})
    lm, _ = recover(model, tok, splits, config,
                    TrainConfig(steps=2, batch_size=2, max_len=96, eval_every=2, eval_examples=4, gate_pretrain_steps=10,
                                gate_pretrain_examples=48, checkpoint_every=2), progress=False)
    save_adapter(lm, out, base_name=str(base))
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_dir, splits, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {combine: train_adapter(tiny_dir, splits, root / combine, combine=combine)
            for combine in ("interpolate", "attention")}


@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny Llama with 16k positions: a request that keeps its row for many seconds."""
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=16384, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("long_tiny")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@contextlib.contextmanager
def serving(base, adapter=None, name=NAME, **engine):
    lm, tok, fingerprint = load_for_serving(base, adapter)
    eng = Engine(lm, tok, threads=1, **{"max_batch": 8, "max_queue": 16, **engine}).start()
    server = BackgroundServer(build_app(eng, name, fingerprint=fingerprint)).start()
    try:
        yield server.url, eng
    finally:
        server.stop()
        eng.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server(tiny_dir, adapters):
    with serving(tiny_dir, adapters["interpolate"]) as (url, eng):
        yield url, eng


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus-client's own parser: name{labels} -> value."""
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_prompts(splits, n: int = 6) -> list[str]:
    """Held-out prompts of different categories (so their gates differ), kept short."""
    by_category = {}
    for r in splits["test"]:
        if len(format_prompt(r)) < 600:
            by_category.setdefault(r.category, r)
    return [format_prompt(r) for r in list(by_category.values())[:n]]


test_prompts.__test__ = False  # a helper, not a test


# ----------------------------------------------------------------------------- the API


def test_completions_chat_models_and_health_with_the_openai_client(server):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list()] == [NAME]
    done = c.completions.create(model=NAME, prompt="### Instruction:\nName a color.\n\n### Response:\n", max_tokens=6,
                                temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.completion_tokens <= 6 and done.usage.prompt_tokens > 0
    chat = c.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": "Name a color."}],
                                     max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    # The chat is written into the adapter's template: the same text through /v1/completions gives the same reply.
    same = c.completions.create(model=NAME, prompt="### Instruction:\nBe brief.\n\nName a color.\n\n### Response:\n",
                                max_tokens=5, temperature=0)
    assert same.choices[0].text == chat.choices[0].message.content
    assert same.usage.prompt_tokens == chat.usage.prompt_tokens
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_streaming_gives_the_text_of_the_whole_reply(server):
    url, _ = server
    c = client(url)
    prompt = "### Instruction:\nWrite a sentence.\n\n### Response:\n"
    whole = c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": "Write a sentence."}]
    reply = c.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    deltas = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == reply.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_a_stop_string_ends_the_reply_before_it_streamed_or_not(server):
    url, _ = server
    c = client(url)
    prompt = "### Instruction:\nCount.\n\n### Response:\n"
    free = c.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    assert len(free) > 4
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    cut = free[: free.index(stop)]
    done = c.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "\x00never"])
    assert done.choices[0].text == cut and done.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut


def test_ignore_eos_generates_max_tokens_past_the_end_of_sequence_token(server):
    url, eng = server
    c = client(url)
    prompt = "### Instruction:\nCount.\n\n### Response:\n"
    tokens = run_engine(eng, [eng.tokenizer(prompt)["input_ids"]], SamplingParams(max_tokens=6, temperature=0))[0]
    eos = eng.eos
    eng.eos = {tokens[0]}  # the reply's first token now ends it
    try:
        ended = c.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
        kept = c.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    finally:
        eng.eos = eos
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 1
    assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 6


def test_text_stream_holds_back_what_may_start_a_stop_string(tokenizer):
    ids = tokenizer("The cat sat on the mat. The end")["input_ids"]
    stream = TextStream(tokenizer, stop=("mat.",))
    pieces, stopped = [], False
    for token in ids:
        piece, stopped = stream.push(token)
        pieces.append(piece)
        assert "ma" not in "".join(pieces) or stopped  # a possible stop prefix is never handed out early
        if stopped:
            break
    assert stopped and "".join(pieces) == "The cat sat on the "
    plain = TextStream(tokenizer)
    assert "".join(plain.push(t)[0] for t in ids) + plain.flush() == "The cat sat on the mat. The end"


# ----------------------------------------------------------------------------- batching


def gate_weights(lm, tok, prompt: str) -> torch.Tensor:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        _, gate_states, _ = lm.lower(ids, torch.ones_like(ids))
        return lm.mix(gate_states, torch.ones_like(ids).bool(), 1)[0][0]


def run_engine(eng: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Submit all at once; each request's generated token ids."""
    out = [[] for _ in prompts]
    finished = threading.Semaphore(0)

    def collector(i):
        def on_output(o):
            out[i].extend(o.token_ids)
            if o.finished:
                finished.release()
        return on_output

    for i, ids in enumerate(prompts):
        eng.submit(Request(ids, params, collector(i)))
    for _ in prompts:
        assert finished.acquire(timeout=120)
    return out


@pytest.mark.parametrize("combine,gate", [("interpolate", "mops"), ("attention", "mops"), ("attention", "attempt")])
def test_engine_rows_in_a_mixed_batch_equal_each_request_alone_and_generate(tiny_dir, splits, tmp_path, combine, gate):
    adapter = train_adapter(tiny_dir, splits, tmp_path / "ad", combine=combine, gate=gate)
    lm, tok, _ = load_for_serving(tiny_dir, adapter)
    prompts = test_prompts(splits)
    weights = torch.stack([gate_weights(lm, tok, p) for p in prompts])
    # The rows really mix different gate weights (ATTEMPT's gate, at temperature d*e, is nearly flat here).
    assert (weights - weights[0]).abs().max() > (1e-3 if gate == "mops" else 0)
    ids = [tok(p)["input_ids"] for p in prompts]
    eng = Engine(lm, tok, max_batch=8, max_queue=16, threads=1).start()
    try:
        greedy = SamplingParams(max_tokens=12, temperature=0)
        alone = [run_engine(eng, [x], greedy)[0] for x in ids]
        together = run_engine(eng, ids, greedy)
    finally:
        eng.stop()
    assert together == alone
    for x, tokens in zip(ids, alone):  # and the tokens are PromptedLM.generate's (the reference loop)
        reference = lm.generate(torch.tensor([x]), max_new_tokens=12)[0, len(x):].tolist()
        assert tokens == reference[: len(tokens)]


class TensorWork(TorchFunctionMode):
    """Records, on the thread that enters it (torch function modes are per thread), every
    torch call that returns a non-empty tensor."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) and result.numel():
            self.calls.append(getattr(func, "__name__", str(func)))
        return result


def test_only_the_engine_thread_computes(tiny_dir, adapters, splits):
    # A second thread with its own OpenMP team makes libgomp stop spinning between parallel
    # regions (more OpenMP threads than cores), which made every decode step ~40% slower on
    # 2 cores: the shared prompt's keys and values were computed on the caller's thread.
    lm, tok, _ = load_for_serving(tiny_dir, adapters["attention"])
    assert lm.mixture.prompt_is_shared
    with TensorWork() as work:
        eng = Engine(lm, tok, max_batch=4, max_queue=4, threads=1).start()
        try:
            tokens = run_engine(eng, [tok(p)["input_ids"] for p in test_prompts(splits, 2)],
                                SamplingParams(max_tokens=4, temperature=0))
        finally:
            eng.stop()
    assert eng.prompt_kv is not None and all(len(t) == 4 for t in tokens)
    assert work.calls == []


def test_batch_sizes_probed_on_this_machine_include_the_largest_and_pad_upward(tiny_dir):
    model, _ = load_model(tiny_dir)
    shapes = BatchShapes.probe(model, 12)
    assert shapes.sizes[-1] == 12
    assert all(shapes.padded(n) >= n and shapes.padded(n) in shapes.sizes for n in range(1, 13))
    assert BatchShapes.probe(model, 1).sizes == [1]


def send_together(fn, items):
    """Call fn on every item at once (one thread each, released together)."""
    barrier = threading.Barrier(len(items))

    def go(item):
        barrier.wait()
        return fn(item)

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(go, items))


def test_a_mixed_batch_over_http_equals_each_request_alone(tiny_dir, adapters, splits):
    prompts = test_prompts(splits)
    with serving(tiny_dir, adapters["attention"]) as (url, _):
        c = client(url)

        def complete(prompt):
            return c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

        alone = [complete(p) for p in prompts]
        before = metrics(url)
        together = send_together(complete, prompts)
        after = metrics(url)
    assert together == alone
    steps = after["mops_serve_batch_size_count{}"] - before["mops_serve_batch_size_count{}"]
    single = after["mops_serve_batch_size_bucket{le=1.0}"] - before["mops_serve_batch_size_bucket{le=1.0}"]
    assert steps > single  # some decode steps really ran several requests together


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(server):
    url, _ = server
    c = client(url)
    prompt = "### Instruction:\nSay something.\n\n### Response:\n"

    def sample(seed):
        return c.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=1.0, top_p=0.9,
                                    seed=seed).choices[0].text

    alone = sample(7)
    assert sample(7) == alone
    together = send_together(sample, [7, 8, 9, 7])
    assert together[0] == together[3] == alone
    assert len(set(together[:3])) > 1  # other seeds draw other tokens


# ----------------------------------------------------------------------------- bad input


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
# (endpoint, the body's fields given the server's context length, the field the 400 must name)
BAD_INPUTS = {
    "malformed field": ("completions", lambda n: {"prompt": "x", "temperature": "hot"}, "temperature"),
    "missing field": ("completions", lambda n: {"max_tokens": 4}, "prompt"),
    "unknown field": ("completions", lambda n: {"prompt": "x", "foo": 1}, "foo"),
    "unknown model": ("completions", lambda n: {"prompt": "x", "model": "gpt-4o"}, "model"),
    "n > 1": ("completions", lambda n: {"prompt": "x", "n": 2}, "n"),
    "chat n > 1": ("chat", lambda n: {**CHAT, "n": 3}, "n"),
    "prompt longer than the context": ("completions", lambda n: {"prompt": [5] * n}, "prompt"),
    "chat longer than the context": ("chat", lambda n: {"messages": [{"role": "user", "content": "word " * n}]},
                                     "messages"),
    "max_tokens 0": ("completions", lambda n: {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    "max_tokens past the context": ("completions", lambda n: {"prompt": "x", "max_tokens": n}, "max_tokens"),
    "max_completion_tokens past the context": ("chat", lambda n: {**CHAT, "max_completion_tokens": 10**6},
                                               "max_completion_tokens"),
    "chat max_tokens negative": ("chat", lambda n: {**CHAT, "max_tokens": -1}, "max_tokens"),
    "temperature above 2": ("completions", lambda n: {"prompt": "x", "temperature": 2.5}, "temperature"),
    "top_p 0": ("completions", lambda n: {"prompt": "x", "top_p": 0}, "top_p"),
    "five stop strings": ("completions", lambda n: {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "logprobs": ("completions", lambda n: {"prompt": "x", "logprobs": 2}, "logprobs"),
    "two prompts": ("completions", lambda n: {"prompt": ["one", "two"]}, "prompt"),
    "token id past the vocabulary": ("completions", lambda n: {"prompt": [10**9]}, "prompt"),
    "empty prompt": ("completions", lambda n: {"prompt": ""}, "prompt"),
    "presence_penalty": ("chat", lambda n: {**CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    "tools": ("chat", lambda n: {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "no messages": ("chat", lambda n: {"messages": []}, "messages"),
    "last message not the user's": ("chat", lambda n: {"messages": [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "yo"}]},
                                    "messages[1].role"),
    "unknown role": ("chat", lambda n: {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    "image content": ("chat", lambda n: {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0].type"),
}


def post_bad(url: str, endpoint: str, fields: dict) -> dict:
    """Through the official client's own post(): the body goes out exactly as written, a
    missing field included; returns the 400's error object."""
    with pytest.raises(openai.BadRequestError) as e:
        client(url).post("/chat/completions" if endpoint == "chat" else "/completions",
                         body={"model": NAME, **fields}, cast_to=object)
    assert e.value.status_code == 400
    return e.value.body


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_is_a_400_naming_the_field(server, case):
    url, eng = server
    endpoint, fields, param = BAD_INPUTS[case]
    error = post_bad(url, endpoint, fields(eng.max_context))
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error


def test_bad_inputs_are_counted_and_leave_the_server_healthy(server):
    url, eng = server
    before = metrics(url)
    for endpoint, fields, _ in BAD_INPUTS.values():
        post_bad(url, endpoint, fields(eng.max_context))
    after = metrics(url)
    invalid = sum(after[k] - before[k] for k in after if k.startswith("mops_serve_requests_total{")
                  and "outcome=invalid" in k)
    assert invalid == len(BAD_INPUTS)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_a_body_that_is_not_a_json_object_is_a_400(server):
    url, _ = server
    for content in (b'{"model": "tiny-mops", "prompt": ', b"[1, 2]"):
        r = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "invalid_json" and "JSON" in error["message"]


# ----------------------------------------------------------------------------- overload and disconnects


def test_past_the_queue_bound_a_request_gets_a_clean_503_with_retry_after(long_tiny_dir):
    with serving(long_tiny_dir, max_batch=1, max_queue=1, max_context=16000) as (url, eng):
        c = client(url)
        holder = c.completions.create(model=NAME, prompt="Hold the row", max_tokens=15000, temperature=0, stream=True)
        next(iter(holder))  # it runs: the one row is taken
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(c.completions.create, model=NAME, prompt="Wait", max_tokens=3, temperature=0)
            wait_for(lambda: httpx.get(f"{url}/health").json()["waiting"] == 1, what="a waiting request")

            def refused(_):
                with pytest.raises(openai.InternalServerError) as e:
                    c.completions.create(model=NAME, prompt="One too many", max_tokens=3)
                return e.value

            errors = send_together(refused, range(8))
            assert all(e.status_code == 503 and e.response.headers["retry-after"] == "1" for e in errors)
            assert all(e.body["code"] == "server_overloaded" for e in errors)
            assert httpx.get(f"{url}/health").json()["waiting"] == 1  # the queue never grew past its bound
            holder.close()  # the holder leaves; the waiting request gets the row and completes
            assert waiting.result(timeout=60).choices[0].finish_reason in ("length", "stop")
        counts = metrics(url)
    assert counts["mops_serve_requests_total{endpoint=completions,outcome=overloaded}"] == 8
    assert counts["mops_serve_requests_total{endpoint=completions,outcome=completed}"] == 1


def test_a_burst_gets_exactly_max_batch_plus_max_queue_requests_in(long_tiny_dir):
    """Requests being prefilled count toward the bound: a burst of 10 at --max-batch 2
    --max-queue 2 gets 4 in and 6 clean 503s, however the engine's admission interleaves."""
    with serving(long_tiny_dir, max_batch=2, max_queue=2, max_context=16000) as (url, eng):
        def attempt(_):  # an accepted request runs for seconds: long after the burst has arrived
            body = {"model": NAME, "prompt": "Hold", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
            return httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code

        codes = send_together(attempt, range(10))
        assert sorted(codes) == [200] * 4 + [503] * 6
        assert eng.running == 0 and eng.waiting == 0


def test_a_client_that_leaves_frees_its_row(long_tiny_dir):
    with serving(long_tiny_dir, max_batch=2, max_queue=2, max_context=16000) as (url, eng):
        c = client(url)
        stream = c.completions.create(model=NAME, prompt="Go on", max_tokens=15000, temperature=0, stream=True)
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        assert eng.running == 1
        stream.close()  # mid-stream
        wait_for(lambda: eng.running == 0, 10, "the row to be freed")
        # The same for a client that stops waiting for a whole (non-streamed) reply.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "Go on", "max_tokens": 15000, "temperature": 0},
                       timeout=httpx.Timeout(10, read=1.0))
        wait_for(lambda: eng.running == 0, 10, "the row to be freed")
        counts = metrics(url)
        assert counts["mops_serve_requests_total{endpoint=completions,outcome=cancelled}"] == 2
        assert counts["mops_serve_generated_tokens_total{}"] < 15000  # they stopped long before their max_tokens
        assert c.completions.create(model=NAME, prompt="Still here", max_tokens=2).usage.completion_tokens <= 2


def test_metrics_parse_with_prometheus_clients_parser_and_add_up(server):
    url, _ = server
    c = client(url)
    before = metrics(url)
    done = c.completions.create(model=NAME, prompt="Count with me", max_tokens=5, temperature=0)
    after = metrics(url)
    families = {f.name: f.type for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    for name, kind in [("mops_serve_requests", "counter"), ("mops_serve_generated_tokens", "counter"),
                       ("mops_serve_prompt_tokens", "counter"), ("mops_serve_queue_depth", "gauge"),
                       ("mops_serve_running_requests", "gauge"), ("mops_serve_batch_size", "histogram"),
                       ("mops_serve_time_to_first_token_seconds", "histogram"),
                       ("mops_serve_request_latency_seconds", "histogram"), ("mops_serve_decode_step_seconds", "histogram")]:
        assert families.get(name) == kind, name

    def delta(key):
        return after[key] - before.get(key, 0.0)

    assert delta("mops_serve_generated_tokens_total{}") == done.usage.completion_tokens
    assert delta("mops_serve_prompt_tokens_total{}") == done.usage.prompt_tokens
    assert delta("mops_serve_requests_total{endpoint=completions,outcome=completed}") == 1
    assert delta("mops_serve_time_to_first_token_seconds_count{}") == 1
    assert delta("mops_serve_request_latency_seconds_count{}") == 1
    assert after["mops_serve_queue_depth{}"] == 0 and after["mops_serve_running_requests{}"] == 0


# ----------------------------------------------------------------------------- the command


@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "--port '70000': expected a TCP port number in 1-65535"),
    (["--port", "http"], "--port 'http': expected a TCP port number"),
    (["--max-batch", "0"], "--max-batch 0: expected 1 or more"),
    (["--max-queue", "-1"], "--max-queue -1: expected 0 or more"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_command_lines_get_one_line_errors(tiny_dir, capsys, args, message):
    assert entry(["--base", tiny_dir, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("script,args,message", [
    ("serving.py", ["--base", "nowhere"], "--base nowhere: not found"),
    ("serving.py", ["--adapter", "nowhere"], "adapter 'nowhere': no mops_config.json; expected a folder written by "
                                             "mops-recover; run `bash scripts/demo.sh`"),
    ("serving.py", ["--requests", "0"], "--requests 0, --max-tokens 64: expected positive whole numbers"),
    ("serving_engine.py", ["--adapter", "nowhere"], "adapter 'nowhere': no mops_config.json; expected a folder "
                                                    "written by mops-recover; run `bash scripts/demo.sh`"),
    ("serving_engine.py", ["--rounds", "0"], "--rounds 0, --max-batch 64: expected positive whole numbers"),
    ("serving_engine.py", ["--max-batch", "4"], "--max-batch 4: expected positive whole numbers, and --max-batch at "
                                                "least --requests"),
])
def test_the_serving_benchmarks_refuse_bad_arguments_in_one_line(tiny_dir, adapters, script, args, message):
    known = {"--base": tiny_dir, "--adapter": adapters["attention"]}  # valid unless the case overrides them
    given = [x for key, value in known.items() if key not in args for x in (key, value)] + args
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *given], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_the_engine_benchmark_times_every_prefill_and_step_through_the_metrics_hook(tiny_dir, adapters, tmp_path):
    args = ["--base", tiny_dir, "--adapter", adapters["attention"], "--requests", "3", "--max-tokens", "4",
            "--rounds", "1", "--max-batch", "3", "--threads", "1", "--out-dir", str(tmp_path)]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving_engine.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = json.loads((tmp_path / "serving_engine.json").read_text())["runs"]
    for run in (runs["adapter"][0], runs["no adapter"][0]):
        # 3 requests x 4 tokens: the first from each prefill, then 3 steps of all three rows
        assert run["tokens"] == 12 and run["steps"] == 3 and run["full_step_ms"] > 0 and run["prefill_ms"] > 0


def test_a_missing_base_or_an_adapter_of_another_base_is_refused_in_one_line(tmp_path, tiny_untied_dir, adapters,
                                                                             capsys):
    assert entry(["--base", str(tmp_path / "nowhere"), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and err.count("\n") == 1
    assert entry(["--base", tiny_untied_dir, "--adapter", adapters["interpolate"], "--port", str(free_port()),
                  "--quiet"]) == 2  # quiet: no loading progress bars beside the error
    err = capsys.readouterr().err
    assert "was trained on" in err and err.count("\n") == 1


def test_a_port_in_use_is_refused_before_loading_anything(tiny_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert entry(["--base", tiny_dir, "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen there" in err and err.count("\n") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_mops_serve_command_serves_and_stops_cleanly(tiny_dir, adapters):
    port = free_port()
    script = Path(sys.executable).parent / "mops-serve"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mops.serve.cli"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([*command, "--base", tiny_dir, "--adapter", adapters["interpolate"], "--port", str(port),
                             "--max-batch", "2", "--threads", "1", "--quiet"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/health").status_code == 200
            return False

        wait_for(up, 120, "mops-serve to start")
        name = Path(adapters["interpolate"]).name  # the default model name
        done = client(url).completions.create(model=name, prompt="Hello", max_tokens=3, temperature=0)
        assert done.usage.completion_tokens <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0


def test_nothing_in_the_core_imports_the_server():
    importer = re.compile(r"^\s*(from\s+mops\.serve|import\s+mops\.serve|from\s+mops\s+import\s+.*\bserve\b)", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("mops", "prune", "eval", "kernels")
                 for p in (ROOT / folder).rglob("*.py")
                 if "serve" not in p.relative_to(ROOT).parts[:2] and importer.search(p.read_text())]
    assert offenders == []


# ----------------------------------------------------------------------------- the embedded model


@pytest.mark.embedded
def test_a_mixed_batch_on_the_embedded_model_equals_each_request_alone(tmp_path):
    """A recovered SmolLM2-135M (adapter trained for a few steps here) serving held-out prompts
    of six categories at once: each greedy reply is the reply it gets alone, token for token,
    and the reply of PromptedLM.generate."""
    splits = split_records(load_records(["dolly", "natural-instructions"], limit_per_source=120))
    adapter = train_adapter("smollm2-135m", splits, tmp_path / "ad", n_experts=4, prompt_len=4, gate_layer=None,
                            combine="attention")
    lm, tok, _ = load_for_serving("smollm2-135m", adapter)
    prompts = test_prompts({"test": stratified_subset(splits["test"], 60)})
    ids = [tok(p)["input_ids"] for p in prompts]
    weights = torch.stack([gate_weights(lm, tok, p) for p in prompts])
    assert (weights - weights[0]).abs().max() > 1e-3
    eng = Engine(lm, tok, max_batch=8, max_queue=16, threads=1).start()
    server = BackgroundServer(build_app(eng, NAME)).start()
    try:
        c = client(server.url)

        def complete(prompt):
            return c.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

        alone = [complete(p) for p in prompts]
        together = send_together(complete, prompts)
        greedy = SamplingParams(max_tokens=10, temperature=0)
        tokens = run_engine(eng, ids, greedy)
    finally:
        server.stop()
        eng.stop()
    assert together == alone
    for x, got in zip(ids, tokens):
        reference = lm.generate(torch.tensor([x]), max_new_tokens=10)[0, len(x):].tolist()
        assert got == reference[: len(got)]
