"""Federated MoPs against a federated single prompt and fixed uniform weights, with the
same clients, rounds, local steps and seed, at a few pruning settings; writes
``benchmarks/results/federated_<name>.{md,json}`` and a per-round perplexity plot.

Each pruned checkpoint is made once with the ``prune`` command (SparseGPT, cached under
``--runs-dir``); each federated run is ``mops-recover --federated N ...`` in Flower's
simulation engine, and its command line is kept beside it, so a rerun reuses finished
runs with the same command and redoes the rest. Validation perplexity (every round) is
what any tuning looks at; the held-out test split is scored once, at the end.

    nice -n 5 python benchmarks/federated.py               # the committed table (about 25 min on 2 cores)
    python benchmarks/federated.py --settings 2:4 --rounds 2 --local-steps 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mops.cli_common import run_cli, setup_logging
from mops.models import DEFAULT_MODEL
from mops.outputs import library_versions, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
METHODS = {  # name -> mops-recover mixture options
    "mops": ["--gate", "mops"],
    "single": ["--gate", "single", "--experts", "1"],
    "uniform": ["--gate", "uniform"],
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--name", default="embedded", help="results file stem: federated_<name>.* (default: embedded)")
    p.add_argument("--settings", nargs="+", default=["2:4", "3:4"], help="SparseGPT N:M patterns (default: 2:4 3:4)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--data", nargs="+", default=["dolly", "natural-instructions"])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--partition", default="skew")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=128, help="training and validation tokens per example (default: 128)")
    p.add_argument("--gate-pretrain-steps", type=int, default=30)
    p.add_argument("--gate-pretrain-examples", type=int, default=128)
    p.add_argument("--eval-examples", type=int, default=24, help="validation examples, every round (default: 24)")
    p.add_argument("--test-examples", type=int, default=60, help="held-out test examples, at the end (default: 60)")
    p.add_argument("--extra", default="", help="more mops-recover options for every run, e.g. '--lr 0.1'")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default="runs/federated", help="pruned checkpoints and adapters (default: runs/federated)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--reuse-only", action="store_true", help="start no run: tabulate the finished ones, mark the rest")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def pruned_checkpoint(args, pattern: str) -> Path:
    out = Path(args.runs_dir) / f"sparsegpt-{pattern.replace(':', 'of')}"
    if not (out / "sparsity_report.json").is_file():
        cmd = [str(BIN / "prune"), "--model", args.model, "--method", "sparsegpt", "--pattern", pattern,
               "--calib", "dolly", "--calib-samples", str(args.calib_samples), "--seq-len", str(args.calib_seq_len),
               "--seed", str(args.seed), "--out", str(out), "--force"]
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return out


def federated_command(args, base: Path, method: str, out: Path) -> list[str]:
    cmd = [str(BIN / "mops-recover"), "--base", str(base)]
    for d in args.data:
        cmd += ["--data", d]
    cmd += ["--federated", str(args.clients), "--partition", args.partition, "--rounds", str(args.rounds),
            "--local-steps", str(args.local_steps), "--experts", str(args.experts), "--prompt-len", str(args.prompt_len),
            "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
            "--gate-pretrain-steps", str(args.gate_pretrain_steps),
            "--gate-pretrain-examples", str(args.gate_pretrain_examples), "--eval-examples", str(args.eval_examples),
            "--test-examples", str(args.test_examples), "--seed", str(args.seed)]
    cmd += METHODS[method] + shlex.split(args.extra)  # later options win: single's --experts 1
    return cmd + ["--out", str(out), "--force", "--quiet"]


def run_one(args, base: Path, method: str, setting: str) -> dict:
    out = Path(args.runs_dir) / setting.replace(":", "of") / method
    cmd = federated_command(args, base, method, out)
    stamp = out.parent / f"{method}.command"
    if not ((out / "history.json").is_file() and stamp.is_file() and stamp.read_text() == shlex.join(cmd)):
        if args.reuse_only:
            return None
        print("$", shlex.join(cmd), flush=True)
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        (out.parent / f"{method}.seconds").write_text(f"{time.perf_counter() - started:.1f}")
        stamp.write_text(shlex.join(cmd))
    history = json.loads((out / "history.json").read_text())
    seconds = out.parent / f"{method}.seconds"
    return {
        "command": shlex.join(cmd).replace(str(BIN) + "/", ""),
        "validation_per_round": [round(v["ppl"], 4) for v in history["validation"]],
        "test_ppl": history["test"]["adapter"]["ppl"],
        "base_test_ppl": history["test"]["base"]["ppl"],
        "test_per_category": history["test"]["adapter"]["per_category"],
        "missing": [m["client"] for r in history["rounds"] for m in r["missing"]],
        "wall_seconds": float(seconds.read_text()) if seconds.is_file() else None,
        "partition_counts": history["partition_counts"],
    }


def write_outputs(args, results: dict, out_dir: Path) -> None:
    stem = out_dir / f"federated_{args.name}"
    write_json_atomic(stem.with_suffix(".json"), results)
    lines = [f"# Federated MoPs on {args.model}: mops vs a single prompt vs uniform weights", "",
             (f"Made by `{shlex.join(['python', 'benchmarks/federated.py', *results['argv']])}` (rerun it to reproduce; "
             "finished runs are reused)."), "",
             (f"- clients: {args.clients}, {args.partition} partition of the {'+'.join(args.data)} train split "
             "(appendix A: each category in N parts, one 15x each other one; counts below)"),
             (f"- {args.rounds} rounds x {args.local_steps} local steps x batch {args.batch_size} ({args.max_len} tokens), "
             "FedAvg of the trainable tensors (experts and gate), Flower simulation engine"),
             (f"- mixture: K = {args.experts} experts of m = {args.prompt_len} vectors, l = g = round(0.3 L), "
             f"gate pretrained {args.gate_pretrain_steps} steps on {args.gate_pretrain_examples} of each client's records "
             f"(category c -> expert c mod K) in round 1; single: one "
             f"prompt of m = {args.prompt_len}; uniform: K experts, fixed equal weights"),
             (f"- validation: response perplexity of {args.eval_examples} stratified validation examples every round "
             f"(server side); test: {args.test_examples} stratified held-out test examples, 512 tokens, at the end"),
             ("- pruning: SparseGPT, calibration "
             f"{args.calib_samples} windows of {args.calib_seq_len} tokens of dolly, seed {args.seed}"), "",
             "| setting | pruned | " + " | ".join(args.methods) + " | mops below single |",
             "| --- | ---: | " + " | ".join("---:" for _ in args.methods) + " | ---: |"]
    for setting, row in results["settings"].items():
        cells = [f"{row[m]['test_ppl']:.2f}" if row.get(m) else "not run" for m in args.methods]
        gap = ""
        if row.get("mops") and row.get("single"):
            gap = f"{100 * (row['single']['test_ppl'] - row['mops']['test_ppl']) / row['single']['test_ppl']:+.1f}%"
        done = [r for r in row.values() if r]
        base = f"{done[0]['base_test_ppl']:.2f}" if done else ""
        lines.append(f"| {setting} | {base} | " + " | ".join(cells) + f" | {gap} |")
    lines += ["", ("Held-out test response perplexity (lower is better); 'mops below single' is how much lower "
              "federated MoPs is than the federated single prompt (negative: higher). The target is +20%."), "",
              "Validation perplexity per round (round 0 = the initial global adapter):", "",
              "| setting | method | " + " | ".join(f"r{i}" for i in range(args.rounds + 1)) + " | seconds |",
              "| --- | --- | " + " | ".join("---:" for _ in range(args.rounds + 1)) + " | ---: |"]
    for setting, row in results["settings"].items():
        for m in args.methods:
            if not row.get(m):
                continue
            v = row[m]["validation_per_round"]
            secs = row[m]["wall_seconds"]
            lines.append(f"| {setting} | {m} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {secs or 0:.0f} |")
    finished = [r for row in results["settings"].values() for r in row.values() if r]
    from mops.federated.partition import counts_markdown

    lines += ["", "Category counts of each client (the same for every run):", "",
              counts_markdown(finished[0]["partition_counts"]) if finished else "(no finished run)", "",
              f"![validation perplexity per round](federated_{args.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    plot(args, results, stem.with_suffix(".png"))


def plot(args, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results["settings"])
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for m in args.methods:
            if not results["settings"][setting].get(m):
                continue
            v = results["settings"][setting][m]["validation_per_round"]
            ax.plot(range(len(v)), v, marker="o", label=m)
        ax.set_title(f"SparseGPT {setting}, {args.clients} skewed clients")
        ax.set_xlabel("round")
        ax.set_ylabel("validation response ppl")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(args.quiet)
    out_dir = Path(args.out_dir)
    results = {"model": args.model, "settings": {}, "versions": library_versions(),
               # the command that makes these runs (--reuse-only only tabulates the same runs)
               "argv": [a for a in (sys.argv[1:] if argv is None else argv) if a != "--reuse-only"],
               "options": {k: v for k, v in vars(args).items() if k not in ("out_dir", "quiet")}}
    for setting in args.settings:
        if args.reuse_only:
            base = Path(args.runs_dir) / f"sparsegpt-{setting.replace(':', 'of')}"
        else:
            base = pruned_checkpoint(args, setting)
        results["settings"][setting] = {m: run_one(args, base, m, setting) for m in args.methods}
        write_outputs(args, results, out_dir)  # partial tables are written as they complete
    print((out_dir / f"federated_{args.name}.md").read_text())


if __name__ == "__main__":
    sys.exit(run_cli(main))
