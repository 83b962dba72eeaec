"""How ``mops-serve`` serves: a load test on the loopback address, against the same server
one request at a time, against ``transformers serve``, and without the adapter.

Servers, each its own process on a free port of 127.0.0.1, run one after another so each
has the machine to itself:

- ``mops-serve``        -- ``mops-serve --base B --adapter A`` (continuous batching);
- ``one-at-a-time``     -- the same with ``--max-batch 1``: what the batching gains;
- ``no-adapter``        -- ``mops-serve --base B``: what the adapter costs;
- ``transformers-serve`` -- ``transformers serve B --continuous-batching`` on the same pruned
  base, no adapter: the peer (if its continuous batching fails on this machine, it runs
  without, and the table says so).

Clients: at each level of concurrency (1, 4, 16, 64), that many clients each send streamed
``/v1/completions`` requests one after another, greedy, ``max_tokens`` tokens, prompts from
the held-out test split of the recovery data in the toolkit's instruction template, in an
order that mixes categories (so a batch mixes tasks). A level ends after its number of
requests, or once its time budget is spent (no new requests are sent; those in flight
finish, each within the request timeout). Every reply is ``max_tokens`` tokens long
(``ignore_eos``, vLLM's extension, which ``mops-serve`` implements; ``transformers serve``
gets the same through its ``generation_config`` field): the recovered model ends its
replies earlier than the bare base, and tokens/s over replies of different lengths would
measure the replies, not the servers (``--natural-length`` measures them as they come, with
each server's mean reply length in the table). Measured per server and level: generated tokens
per second (the servers' own usage counts, over the level's wall time), time to first token
and latency (p50 / p95 / p99), completed, failed (an error answer), lost (no complete answer:
a dropped connection, a timeout, a stream without its end) and rejected (a 503) requests.

Then the queue bound: ``mops-serve`` with a small batch and queue (``--overload-batch``,
``--overload-queue``) under ``--overload-clients`` clients that do not retry: past the bound
every extra request must get a clean 503 (with ``Retry-After`` and an OpenAI-style error
body), and none may fail or be lost.

    python benchmarks/serving.py            # writes benchmarks/results/serving_embedded.{md,json,png}
    python benchmarks/serving.py --quick    # a smoke run of a few seconds per server, into runs/serving_quick/

The base and adapter default to the demo's (``bash scripts/demo.sh`` writes them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from mops.adapter import read_adapter_config
from mops.cli_common import run_cli, setup_logging
from mops.data import format_prompt, load_records, split_records, stratified_subset
from mops.errors import UserError
from mops.outputs import library_versions, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
SERVERS = ("mops-serve", "one-at-a-time", "no-adapter", "transformers-serve")
LABELS = {
    "mops-serve": "mops-serve (adapter, batched)",
    "one-at-a-time": "mops-serve, one request at a time",
    "no-adapter": "mops-serve, no adapter",
    "transformers-serve": "transformers serve (no adapter)",
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/demo/pruned/sparsegpt-2of4", help="the pruned base (default: the demo's)")
    p.add_argument("--adapter", default="runs/demo/adapters/sparsegpt-2of4-mops", help="its MoPs adapter (default: the demo's)")
    p.add_argument("--data", default="dolly+natural-instructions", help="sources whose held-out test split gives the prompts")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=2, help="requests per client at each level (default: 2; "
                   "at least --min-requests in all)")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--level-seconds", type=float, default=240.0, help="time budget of one level (default: 240)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=384, help="prompts longer than this are not drawn")
    p.add_argument("--prompts", type=int, default=256, help="held-out prompts to draw from (stratified)")
    p.add_argument("--max-batch", type=int, default=64, help="mops-serve's --max-batch (default: 64, the most clients)")
    p.add_argument("--max-queue", type=int, default=256, help="mops-serve's --max-queue, above every level's clients")
    p.add_argument("--overload-clients", type=int, default=64)
    p.add_argument("--overload-batch", type=int, default=4)
    p.add_argument("--overload-queue", type=int, default=4)
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    p.add_argument("--no-overload", action="store_true", help="skip the queue-bound check")
    p.add_argument("--threads", type=int, help="CPU threads of every server (OMP_NUM_THREADS; default: torch's)")
    p.add_argument("--startup-seconds", type=float, default=600.0)
    p.add_argument("--name", default="embedded", help="results stem: serving_<name>.* (default: embedded)")
    p.add_argument("--out-dir", default=None, help=f"default: {RESULTS} ({'runs/serving_quick'} with --quick)")
    p.add_argument("--work-dir", default="runs/serving", help="server logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--natural-length", action="store_true",
                   help="let replies end at the end-of-sequence token (default: every reply max_tokens long)")
    p.add_argument("--quick", action="store_true", help="a smoke run: levels 1 and 4, 4 requests each, 8 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.min_requests, args.max_tokens = [1, 4], 1, 4, 8
        args.level_seconds, args.prompts, args.overload_clients = 60.0, 16, 12
        args.overload_batch, args.overload_queue, args.max_batch = 2, 2, 8
        args.name = "quick" if args.name == "embedded" else args.name
        args.out_dir = args.out_dir or "runs/serving_quick"
    args.out_dir = Path(args.out_dir or RESULTS)
    if not Path(args.base).exists() and args.base != "smollm2-135m":
        raise UserError(f"--base {args.base}: not found; run `bash scripts/demo.sh` (it writes runs/demo/) or pass --base")
    args.adapter_config = read_adapter_config(args.adapter, hint="run `bash scripts/demo.sh` (it writes "
                                              "runs/demo/adapters/sparsegpt-2of4-mops) or pass --adapter")
    if min(args.clients) < 1 or args.max_tokens < 1 or args.requests < 1:
        raise UserError(f"--clients {' '.join(map(str, args.clients))}, --requests {args.requests}, --max-tokens "
                        f"{args.max_tokens}: expected positive whole numbers")
    return args


# ----------------------------------------------------------------------------- prompts


def held_out_prompts(args, tokenizer) -> list[dict]:
    """Held-out test prompts in the instruction template, categories interleaved."""
    records = split_records(load_records(args.data.split("+"), seed=args.seed), seed=args.seed)["test"]
    records = [r for r in records if len(tokenizer(format_prompt(r))["input_ids"]) <= args.max_prompt_tokens]
    records = stratified_subset(records, args.prompts, args.seed)
    by_category: dict[str, list] = {}
    for r in records:
        by_category.setdefault(r.category, []).append(r)
    order = []
    while any(by_category.values()):  # round-robin: consecutive requests come from different tasks
        for items in by_category.values():
            if items:
                order.append(items.pop())
    return [{"prompt": format_prompt(r), "category": r.category} for r in order]


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    command: list[str]
    model: str  # what requests send as `model`
    note: str = ""
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def server_specs(args) -> list[Server]:
    from mops.models import resolve_checkpoint

    base, adapter = str(Path(resolve_checkpoint(args.base)).resolve()), str(Path(args.adapter).resolve())
    ours = [str(BIN / "mops-serve"), "--base", base, "--quiet", "--max-queue", str(args.max_queue)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    adapter_name = Path(adapter).name
    specs = {
        "mops-serve": Server("mops-serve", ours + ["--adapter", adapter, "--max-batch", str(args.max_batch)] + threads,
                             adapter_name),
        "one-at-a-time": Server("one-at-a-time", ours + ["--adapter", adapter, "--max-batch", "1"] + threads,
                                adapter_name),
        "no-adapter": Server("no-adapter", ours + ["--max-batch", str(args.max_batch)] + threads, Path(base).name),
        "transformers-serve": Server("transformers-serve", [str(BIN / "transformers"), "serve", base, "--device", "cpu",
                                                            "--dtype", "float32", "--continuous-batching",
                                                            "--log-level", "warning"], base, "continuous batching"),
    }
    return [specs[name] for name in args.servers]


def start(server: Server, args, log_dir: Path) -> None:
    server.port = free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{server.name}.log", "w")
    server.proc = subprocess.Popen([*server.command, "--port", str(server.port), "--host", "127.0.0.1"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.startup_seconds
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {server.proc.returncode} at start-up; "
                               f"see {log_dir / f'{server.name}.log'}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    stop(server)
    raise RuntimeError(f"{server.name} did not answer /health within {args.startup_seconds:.0f} s")


def stop(server: Server) -> None:
    if server.proc is None or server.proc.poll() is not None:
        return
    server.proc.send_signal(signal.SIGINT)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()  # our own child, by its pid
        server.proc.wait()


# ----------------------------------------------------------------------------- clients


@dataclass
class Outcome:
    status: str  # completed, failed, lost, rejected
    tokens: int = 0
    ttft: float | None = None
    latency: float | None = None
    category: str = ""
    detail: str = ""
    clean_503: bool = False


async def one_request(client: httpx.AsyncClient, server: Server, item: dict, args) -> Outcome:
    body = {"model": server.model, "prompt": item["prompt"], "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if not args.natural_length:  # every reply max_tokens long: the same work for every server
        if server.name == "transformers-serve":
            body["generation_config"] = json.dumps({"eos_token_id": -1, "do_sample": False})
        else:
            body["ignore_eos"] = True
    began = time.perf_counter()
    ttft, tokens, finished = None, None, False
    try:
        async with client.stream("POST", f"{server.url}/v1/completions", json=body,
                                  timeout=httpx.Timeout(args.request_timeout, connect=30)) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                clean = r.status_code == 503 and "retry-after" in r.headers and _is_openai_error(text)
                status = "rejected" if r.status_code == 503 else "failed"
                return Outcome(status, category=item["category"], detail=f"{r.status_code}: {text[:200]}",
                               clean_503=clean)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Outcome("failed", category=item["category"], detail=str(chunk["error"])[:200])
                for choice in chunk.get("choices") or []:
                    if choice.get("text") and ttft is None:
                        ttft = time.perf_counter() - began
                    finished = finished or choice.get("finish_reason") is not None
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Outcome("lost", category=item["category"], detail=f"{type(e).__name__}: {e}"[:200])
    latency = time.perf_counter() - began
    if not finished or tokens is None:
        return Outcome("lost", category=item["category"], detail="the stream ended without a finish reason and usage")
    return Outcome("completed", tokens, ttft if ttft is not None else latency, latency, item["category"])


def _is_openai_error(text: str) -> bool:
    with contextlib.suppress(ValueError, TypeError):
        error = json.loads(text)["error"]
        return bool(error["message"]) and "type" in error
    return False


async def load_level(server: Server, prompts: list[dict], clients: int, n_requests: int, args) -> tuple[list, float]:
    """``clients`` clients, each sending one request after another, until ``n_requests`` were
    sent or the time budget is spent. Returns the outcomes and the level's wall time."""
    queue = iter(range(n_requests))
    outcomes: list[Outcome] = []
    began = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:

        async def worker():
            for i in queue:
                if time.perf_counter() - began > args.level_seconds:
                    return
                outcomes.append(await one_request(client, server, prompts[i % len(prompts)], args))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return outcomes, time.perf_counter() - began


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(outcomes: list[Outcome], wall: float, clients: int, planned: int) -> dict:
    done = [o for o in outcomes if o.status == "completed"]
    ttft = [o.ttft for o in done]
    latency = [o.latency for o in done]
    tokens = sum(o.tokens for o in done)
    out = {"clients": clients, "planned_requests": planned, "sent": len(outcomes), "completed": len(done),
           "failed": sum(o.status == "failed" for o in outcomes), "lost": sum(o.status == "lost" for o in outcomes),
           "rejected": sum(o.status == "rejected" for o in outcomes),
           "clean_503": sum(o.clean_503 for o in outcomes), "generated_tokens": tokens, "wall_s": wall,
           "tokens_per_s": tokens / wall if wall > 0 else None,
           "requests_per_s": len(done) / wall if wall > 0 else None,
           "mean_tokens_per_request": statistics.mean(o.tokens for o in done) if done else None,
           "categories": len({o.category for o in outcomes})}
    for name, values in (("ttft", ttft), ("latency", latency)):
        for q in (50, 95, 99):
            out[f"{name}_p{q}_s"] = percentile(values, q)
    out["errors"] = sorted({o.detail for o in outcomes if o.status != "completed"})[:5]
    return out


def run_server(server: Server, prompts: list[dict], args, log_dir: Path) -> dict:
    started = time.perf_counter()
    try:
        start(server, args, log_dir)
    except RuntimeError as e:
        if server.name != "transformers-serve" or "--continuous-batching" not in server.command:
            raise
        print(f"  {server.name}: {e}; again without continuous batching", file=sys.stderr)
        server.command.remove("--continuous-batching")
        server.note = "continuous batching failed to start here; sequential generate()"
        start(server, args, log_dir)
    startup = time.perf_counter() - started
    levels = []
    try:
        warm, _ = asyncio.run(load_level(server, prompts, 1, 2, args))  # first-request costs stay out of the table
        if server.name == "transformers-serve" and "--continuous-batching" in server.command and \
                any(o.status != "completed" for o in warm):
            stop(server)
            server.command.remove("--continuous-batching")
            server.note = f"continuous batching failed on this machine ({warm[0].detail[:80]}); sequential generate()"
            start(server, args, log_dir)
            asyncio.run(load_level(server, prompts, 1, 2, args))
        for clients in args.clients:
            planned = max(args.min_requests, args.requests * clients)
            outcomes, wall = asyncio.run(load_level(server, prompts, clients, planned, args))
            level = summarize(outcomes, wall, clients, planned)
            levels.append(level)
            print(f"  {server.name:<19} {clients:>3} clients: {level['tokens_per_s'] or 0:8.1f} tok/s, "
                  f"{level['completed']}/{level['sent']} completed, failed {level['failed']}, lost {level['lost']}, "
                  f"rejected {level['rejected']}", file=sys.stderr)
    finally:
        stop(server)
    return {"name": server.name, "label": LABELS[server.name], "note": server.note, "command": server.command,
            "startup_s": startup, "levels": levels}


def overload_check(args, prompts: list[dict], log_dir: Path) -> dict:
    """Past the queue bound: only clean 503s, no failures, nothing lost, and the server still up."""
    spec = server_specs(argparse.Namespace(**{**vars(args), "servers": ["mops-serve"]}))[0]
    spec.name = "overload"
    for flag, value in (("--max-batch", args.overload_batch), ("--max-queue", args.overload_queue)):
        i = spec.command.index(flag)
        spec.command[i + 1] = str(value)
    start(spec, args, log_dir)
    try:
        clients = args.overload_clients  # one request each, all at once
        outcomes, wall = asyncio.run(load_level(spec, prompts, clients, clients, args))
        healthy = httpx.get(f"{spec.url}/health", timeout=10).status_code == 200
    finally:
        stop(spec)
    level = summarize(outcomes, wall, clients, clients)
    bound = args.overload_batch + args.overload_queue
    level.update({"max_batch": args.overload_batch, "max_queue": args.overload_queue, "bound": bound,
                  "unclean_503": level["rejected"] - level["clean_503"], "healthy_after": healthy})
    level["pass"] = (level["failed"] == 0 and level["lost"] == 0 and level["unclean_503"] == 0 and healthy
                     and level["completed"] >= min(bound, clients) and level["completed"] + level["rejected"] == clients)
    return level


# ----------------------------------------------------------------------------- outputs


def level_of(result: dict | None, clients: int) -> dict | None:
    if result is None:
        return None
    return next((lv for lv in result["levels"] if lv["clients"] == clients), None)


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not a.get("tokens_per_s") or not b.get("tokens_per_s"):
        return None
    return a["tokens_per_s"] / b["tokens_per_s"]


def targets(results: dict, overload: dict | None, at: int = 16) -> dict:
    by = {r["name"]: r for r in results}
    ours = level_of(by.get("mops-serve"), at)
    gain = ratio(ours, level_of(by.get("one-at-a-time"), at))
    peer = ratio(ours, level_of(by.get("transformers-serve"), at))
    keep = ratio(ours, level_of(by.get("no-adapter"), at))
    clean = all(lv["failed"] == 0 and lv["lost"] == 0 and lv["rejected"] == 0
                for r in results if r["name"].startswith(("mops", "one", "no-")) for lv in r["levels"])
    return {
        "clients": at,
        "batching_gain": gain, "batching_gain_pass": None if gain is None else gain >= 3.0,
        "vs_transformers_serve": peer, "vs_transformers_serve_pass": None if peer is None else peer >= 1.0,
        "adapter_cost": None if keep is None else 1 - keep,
        "adapter_cost_pass": None if keep is None else 1 - keep <= 0.15,
        "no_failed_or_lost_below_bound": clean,
        "only_clean_503_past_bound": None if overload is None else overload["pass"],
    }


def fmt(value, spec=".2f", none="–") -> str:
    return none if value is None else format(value, spec)


def markdown(report: dict) -> str:
    p, t = report["protocol"], report["targets"]
    lines = [f"# Serving: {p['base_name']} + {p['adapter_name']} (`benchmarks/serving.py`)", "",
             f"Load test on 127.0.0.1, {p['machine']}. Each server runs alone on the machine, one after another. "
             f"Clients send streamed `/v1/completions` requests one after another: greedy, `max_tokens` "
             f"{p['max_tokens']}, prompts from the held-out test split of {p['data']} ({p['prompts']} prompts of at "
             f"most {p['max_prompt_tokens']} tokens, {p['categories']} categories, interleaved so batches mix tasks). "
             f"A level sends max({p['min_requests']}, {p['requests_per_client']} x clients) requests, or stops sending "
             f"after {p['level_seconds']:.0f} s. "
             + ("Replies end at the end-of-sequence token (`--natural-length`). " if p.get("natural_length") else
                f"Every reply is {p['max_tokens']} tokens (`ignore_eos`; transformers serve: `generation_config` "
                "with `eos_token_id` -1), so every server does the same work. ")
             + "Tokens are the servers' own usage counts; tokens/s is over the level's "
             "wall time. TTFT: time to the first streamed text.", "",
             "| server | clients | tok/s | req/s | tokens / reply | TTFT p50 / p95 / p99 (s) | latency p50 / p95 / p99 (s) | completed | failed | lost | 503 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        for lv in r["levels"]:
            ttft = " / ".join(fmt(lv[f"ttft_p{q}_s"]) for q in (50, 95, 99))
            lat = " / ".join(fmt(lv[f"latency_p{q}_s"]) for q in (50, 95, 99))
            lines.append(f"| {r['label']} | {lv['clients']} | {fmt(lv['tokens_per_s'], '.1f')} | "
                         f"{fmt(lv.get('requests_per_s'))} | {fmt(lv['mean_tokens_per_request'], '.1f')} | {ttft} | {lat} | "
                         f"{lv['completed']}/{lv['sent']} | {lv['failed']} | {lv['lost']} | {lv['rejected']} |")
    notes = [f"- {r['label']}: {r['note']}" for r in report["results"] if r["note"]]
    if notes:
        lines += ["", *notes]
    o = report.get("overload")
    if o:
        lines += ["", f"Past the queue bound: mops-serve with `--max-batch {o['max_batch']} --max-queue {o['max_queue']}` "
                      f"(bound {o['bound']}) under {o['clients']} clients at once, no retries: {o['completed']} completed, "
                      f"{o['rejected']} rejected with 503 ({o['clean_503']} clean: `Retry-After` and an OpenAI-style "
                      f"body), {o['failed']} failed, {o['lost']} lost; healthy afterwards: {o['healthy_after']}."]
    at = t["clients"]
    lines += ["", f"Targets at {at} clients:", "",
              f"- batching gain (mops-serve / one at a time): {fmt(t['batching_gain'])}x (target >= 3x): "
              f"{verdict(t['batching_gain_pass'])}",
              f"- against transformers serve on the same base: {fmt(t['vs_transformers_serve'])}x (target >= 1x): "
              f"{verdict(t['vs_transformers_serve_pass'])}",
              f"- adapter cost (1 - with / without): {fmt(None if t['adapter_cost'] is None else 100 * t['adapter_cost'], '.1f')}% "
              f"(target <= 15%): {verdict(t['adapter_cost_pass'])}",
              f"- no failed, lost or rejected request below the queue bound: {verdict(t['no_failed_or_lost_below_bound'])}",
              f"- only clean 503s past it: {verdict(t['only_clean_503_past_bound'])}", "",
              f"Command: `{p['command']}`"]
    return "\n".join(lines) + "\n"


def verdict(ok) -> str:
    return "not measured" if ok is None else ("met" if ok else "**missed**")


def draw(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in report["results"]:
        xs = [lv["clients"] for lv in r["levels"]]
        left.plot(xs, [lv["tokens_per_s"] or 0 for lv in r["levels"]], marker="o", label=r["label"])
        right.plot(xs, [lv["latency_p95_s"] or float("nan") for lv in r["levels"]], marker="o", label=r["label"])
    for ax, title in ((left, "generated tokens / s"), (right, "latency p95 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"serving {report['protocol']['base_name']} on {report['protocol']['machine']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(quiet=True)
    from transformers import AutoTokenizer

    from mops.models import resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(args.base))
    prompts = held_out_prompts(args, tokenizer)
    if not prompts:
        raise UserError(f"--data {args.data}: no held-out prompt of at most {args.max_prompt_tokens} tokens")
    log_dir = Path(args.work_dir)
    results = []
    for server in server_specs(args):
        print(f"{server.name}: {' '.join(server.command)}", file=sys.stderr)
        results.append(run_server(server, prompts, args, log_dir))
    overload = None if args.no_overload else overload_check(args, prompts, log_dir)
    config = args.adapter_config
    report = {
        "protocol": {
            "base": args.base, "base_name": Path(args.base).name, "adapter": args.adapter,
            "adapter_name": Path(args.adapter).name, "mixture": config.get("mixture"), "data": args.data,
            "prompts": len(prompts), "categories": len({p["category"] for p in prompts}),
            "max_prompt_tokens": args.max_prompt_tokens, "max_tokens": args.max_tokens, "clients": args.clients,
            "requests_per_client": args.requests, "min_requests": args.min_requests,
            "level_seconds": args.level_seconds, "max_batch": args.max_batch, "max_queue": args.max_queue,
            "threads": args.threads, "natural_length": args.natural_length, "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
            "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "versions": library_versions(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "results": results,
        "overload": overload,
        "targets": targets(results, overload),
    }
    out = args.out_dir
    stem = out / f"serving_{args.name}"
    write_json_atomic(stem.with_suffix(".json"), report)
    text = markdown(report)
    tmp = stem.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, stem.with_suffix(".md"))
    draw(report, stem.with_suffix(".png"))
    print(text)
    print(f"wrote {stem}.md, .json and .png", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
