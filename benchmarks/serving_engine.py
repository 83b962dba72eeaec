"""What ``mops-serve``'s engine costs with and without the adapter, with no HTTP in between.

For the base alone and for the base with the adapter (each loaded once, the same prompts),
``--requests`` held-out prompts are submitted at once to a fresh :class:`mops.serve.engine.Engine`;
every reply is ``--max-tokens`` greedy tokens (``ignore_eos``). Measured per engine: the
wall time and tokens/s of the whole batch, each request's prefill (alone, as the engine
runs it), and the decode steps, by how many rows they ran. The two engines alternate for
``--rounds`` rounds, so a slow moment of the machine hits both. It separates the engine's own
cost from the HTTP layer's in ``benchmarks/serving.py``'s table.

    python benchmarks/serving_engine.py     # -> benchmarks/results/serving_engine.{md,json}
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import threading
import time
import types
from pathlib import Path

import torch

from mops.adapter import read_adapter_config
from mops.cli_common import run_cli, setup_logging
from mops.data import format_prompt, load_records, split_records, stratified_subset
from mops.errors import UserError
from mops.outputs import library_versions, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/demo/pruned/sparsegpt-2of4", help="the pruned base (default: the demo's)")
    p.add_argument("--adapter", default="runs/demo/adapters/sparsegpt-2of4-mops", help="its adapter (default: the demo's)")
    p.add_argument("--data", default="dolly+natural-instructions")
    p.add_argument("--requests", type=int, default=16, help="requests submitted at once (default: 16)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per engine (default: 3)")
    p.add_argument("--max-batch", type=int, default=64, help="the engines' --max-batch (default: 64, as serving.py's)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    read_adapter_config(args.adapter, hint="run `bash scripts/demo.sh` or pass --adapter")
    if min(args.requests, args.max_tokens, args.rounds) < 1 or args.max_batch < args.requests:
        raise UserError(f"--requests {args.requests}, --max-tokens {args.max_tokens}, --rounds {args.rounds}, "
                        f"--max-batch {args.max_batch}: expected positive whole numbers, and --max-batch at least "
                        "--requests")
    return args


class Recorder:
    """Every value the engine reports through its public ``metrics`` hook, in order (the
    server's Prometheus histograms keep buckets, and this table needs medians)."""

    def __init__(self):
        self.values = collections.defaultdict(list)

    def __getattr__(self, name):  # any of ServeMetrics' instruments: .observe(v) or .inc(v)
        values = self.values[name]
        return types.SimpleNamespace(observe=values.append, inc=lambda v=1: values.append(v))


def one_batch(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Submit every prompt at once; time the batch, each prefill and each decode step."""
    from mops.serve.engine import Request
    from mops.serve.sampling import SamplingParams

    engine.metrics = recorder = Recorder()
    done, tokens = threading.Semaphore(0), [0]

    def on_output(out):
        tokens[0] += len(out.token_ids)
        if out.finished:
            done.release()

    began = time.perf_counter()
    for ids in prompts:
        engine.submit(Request(ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), on_output))
    for _ in prompts:
        done.acquire()
    wall = time.perf_counter() - began
    # A step reports its timing after its rows' outputs: wait for the last one. Every request
    # gets its first token from its prefill and the rest from steps (ignore_eos), one per row.
    values = recorder.values
    while sum(values["batch_size"]) < len(prompts) * (max_tokens - 1) or len(values["step_seconds"]) < len(
            values["batch_size"]):
        time.sleep(0.001)
    prefills = recorder.values["prefill_seconds"]
    steps = list(zip(recorder.values["batch_size"], recorder.values["step_seconds"], strict=True))
    full = [s for rows, s in steps if rows == len(prompts)]
    return {"wall_s": wall, "tokens": tokens[0], "tokens_per_s": tokens[0] / wall,
            "prefill_ms": 1000 * statistics.median(prefills), "steps": len(steps),
            "full_step_ms": 1000 * statistics.median(full) if full else None,
            "decode_s": sum(s for _, s in steps), "prefill_s": sum(prefills)}


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(quiet=True)
    torch.set_num_threads(args.threads)
    from mops.serve.cli import load_for_serving
    from mops.serve.engine import Engine

    loaded = {name: load_for_serving(args.base, adapter)[:2] for name, adapter in (("no adapter", None),
                                                                               ("adapter", args.adapter))}
    tokenizer = loaded["adapter"][1]
    records = split_records(load_records(args.data.split("+"), seed=args.seed), seed=args.seed)["test"]
    records = [r for r in records if len(tokenizer(format_prompt(r))["input_ids"]) <= args.max_prompt_tokens]
    prompts = [tokenizer(format_prompt(r))["input_ids"] for r in stratified_subset(records, args.requests, args.seed)]

    def measure(name: str) -> dict:
        # One engine at a time, each on a thread that ends with it: two engine threads alive at
        # once are two OpenMP teams, which slows both (see mops.serve.engine).
        lm, tok = loaded[name]
        engine = Engine(lm, tok, max_batch=args.max_batch, max_queue=args.requests, threads=args.threads).start()
        try:
            one_batch(engine, prompts[:2], 4)  # first-call costs (store growth, kernels) stay out
            return one_batch(engine, prompts, args.max_tokens)
        finally:
            engine.stop()

    runs = {name: [] for name in loaded}
    for _ in range(args.rounds):
        for name in loaded:
            runs[name].append(measure(name))
            print(f"{name:>10}: {runs[name][-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    summary = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0] if rs[0][key] is not None}
               for name, rs in runs.items()}
    cost = 1 - summary["adapter"]["tokens_per_s"] / summary["no adapter"]["tokens_per_s"]
    report = {"command": "python benchmarks/serving_engine.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "args": {k: v for k, v in vars(args).items()}, "prompt_tokens_mean": statistics.mean(map(len, prompts)),
              "runs": runs, "median": summary, "adapter_cost": cost, "versions": library_versions(),
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out_dir)
    write_json_atomic(out / "serving_engine.json", report)
    lines = ["# mops-serve's engine with and without the adapter (`benchmarks/serving_engine.py`)", "",
             f"{args.requests} held-out prompts ({report['prompt_tokens_mean']:.0f} tokens on average) submitted at "
             f"once to the engine, {args.max_tokens} greedy tokens each (`ignore_eos`), {args.threads} threads, no "
             f"HTTP; medians of {args.rounds} alternating rounds.", "",
             "| engine | tok/s | wall s | prefill ms (median, one request) | decode step ms (all rows running) | "
             "prefill s | decode s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in summary.items():
        lines.append(f"| {name} | {m['tokens_per_s']:.1f} | {m['wall_s']:.2f} | {m['prefill_ms']:.0f} | "
                     f"{m.get('full_step_ms', float('nan')):.0f} | {m['prefill_s']:.2f} | {m['decode_s']:.2f} |")
    lines += ["", f"Adapter cost (1 - with / without, tokens/s): {100 * cost:.1f}%.", "",
              f"Command: `{report['command']}`"]
    (out / "serving_engine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run_cli(main))
