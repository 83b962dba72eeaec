"""The recovery study: every method of ``mops.baselines`` at every pruning setting.

For each setting the dense model is pruned once (SparseGPT by default; the checkpoint is
cached under ``--work-dir``), then every method trains on it with the same data, steps,
batch and seed, and is scored on the same held-out test examples. Each finished cell is
saved at once to ``benchmarks/results/recovery_<name>.json`` (with the Markdown table, the
chart and the gate heatmaps redrawn from it), so a rerun skips finished cells and a grid
can be completed over several runs.

    python benchmarks/recovery.py                                  # the committed CPU grid
    python benchmarks/recovery.py --settings 3:4 --methods prompt mops
    python benchmarks/recovery.py --settings 3:4 --methods none    # the dense and pruned cells, then
    python benchmarks/recovery.py --threads 1 --settings 3:4 0.75 0.90 2:4 &   # two runs, one core each,
    python benchmarks/recovery.py --threads 1 --settings 7:8 0.85 4:8          # share one results file
    python benchmarks/recovery.py --model path/to/Llama-2-7b-hf --name llama2-7b --device cuda \\
        --steps 500 --batch-size 8 --max-len 512 --test-examples 500 --calib-samples 128 --seq-len 2048

The default budget is sized for a 2-core CPU (about 90 minutes for the whole grid as two
one-thread runs, see the README). The defaults
(lr 0.3, gate lr 3e-4, K = 4, m = 10, l = g) were chosen on the validation split
(``--score-split validation``); the README lists what was tried.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mops.baselines import METHODS, SAME_BUDGET, Budget, prepare, trainable_count
from mops.cli_common import run_cli, setup_logging
from mops.data import load_records, split_records, stratified_subset
from mops.errors import UserError
from mops.eval.perplexity import RESPONSE_MAX_LEN, response_perplexity
from mops.gate_analysis import draw_heatmaps
from mops.models import DEFAULT_MODEL, load_model
from mops.outputs import library_versions, write_json_atomic
from mops.prune import PruneConfig
from mops.prune.config import MISSION_SETTINGS
from mops.prune.core import prune_to_folder
from mops.train import TrainConfig, recover

RESULTS = Path(__file__).resolve().parent / "results"
MOPS = ("mops", "mops-attention")  # the two combine modes of the method under study
# The aggressive settings first: they are where the target is measured.
DEFAULT_SETTINGS = ("3:4", "7:8", "0.75", "0.85", "0.90", "2:4", "4:8")
assert sorted(DEFAULT_SETTINGS) == sorted(MISSION_SETTINGS)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--name", default="embedded", help="results stem: recovery_<name>.* (default: embedded)")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="sparsities (0.75) or N:M patterns")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--prune-method", default="sparsegpt")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256, help="calibration sequence length (default: 256, for a CPU)")
    p.add_argument("--data", nargs="+", default=["dolly", "natural-instructions"])
    p.add_argument("--limit-per-source", type=int, default=None)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=10)
    p.add_argument("--gate-layer", type=int, default=None)
    p.add_argument("--inject-layer", type=int, default=None)
    p.add_argument("--gate-hidden", type=int, default=128)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256, help="training tokens per example")
    p.add_argument("--lr", type=float, default=0.3, help="prompts' learning rate")
    p.add_argument("--gate-lr", type=float, default=3e-4)
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--gate-pretrain-steps", type=int, default=50)
    p.add_argument("--gate-pretrain-examples", type=int, default=256,
                   help="train examples the gate is pretrained on (one partial forward each)")
    p.add_argument("--test-examples", type=int, default=64, help="held-out examples scored, stratified")
    p.add_argument("--score-split", default="test", choices=("test", "validation"),
                   help="the held-out split scored: tune on validation, report on test (default: test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, all cores)")
    p.add_argument("--work-dir", default="runs/recovery", help="where pruned checkpoints are cached")
    p.add_argument("--out-dir", default=str(RESULTS))
    return p.parse_args(argv)


def protocol(args) -> dict:
    """Everything that fixes a cell's number: a results file only grows under the same values."""
    keys = ("model", "prune_method", "calib_samples", "seq_len", "data", "limit_per_source", "experts", "prompt_len",
            "gate_layer", "inject_layer", "gate_hidden", "lora_rank", "steps", "batch_size", "max_len", "lr",
            "gate_lr", "lora_lr", "gate_pretrain_steps", "gate_pretrain_examples", "test_examples", "score_split", "seed")
    return {k: getattr(args, k) for k in keys} | {"test_max_len": RESPONSE_MAX_LEN}


@contextlib.contextmanager
def results_lock(out_json: Path):
    """Held while a run reads, merges and rewrites the results file, so that runs on other
    settings (``--threads 1`` each: two of them use 2 cores better than one) can share it."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with open(out_json.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def recovered_share(dense: float, pruned: float, method: float) -> float:
    """(log ppl_pruned - log ppl_method) / (log ppl_pruned - log ppl_dense): 1 is all of the damage."""
    return (math.log(pruned) - math.log(method)) / (math.log(pruned) - math.log(dense))


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(quiet=True)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: expected a positive whole number")
        torch.set_num_threads(args.threads)
    for m in args.methods:
        if m not in METHODS:
            raise UserError(f"--methods {m!r}: expected some of {', '.join(METHODS)}")
    prune_configs = {s: PruneConfig(method=args.prune_method, calib_samples=args.calib_samples, seq_len=args.seq_len,
                                    seed=args.seed, **({"pattern": s} if ":" in s else {"sparsity": float(s)}))
                     for s in args.settings}
    budget = Budget(args.experts, args.prompt_len, args.gate_layer, args.inject_layer, args.gate_hidden, args.lora_rank)
    out_json = Path(args.out_dir) / f"recovery_{args.name}.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"cells": {}}
    if results.get("protocol", protocol(args)) != protocol(args):
        raise UserError(f"{out_json} was made with other settings; use --name for a new study or delete it")
    results.update(protocol=protocol(args), versions=library_versions())

    splits = split_records(load_records(args.data, args.limit_per_source, args.seed), args.seed)
    test = stratified_subset(splits[args.score_split], args.test_examples, args.seed)

    def score(model, tok):
        return response_perplexity(model, tok, test, progress=False)

    def merge_other_runs() -> None:  # another run (other settings) may share the file: take its cells in
        if out_json.is_file():
            results["cells"] = json.loads(out_json.read_text())["cells"] | results["cells"]

    def save(key: str, cell: dict) -> None:
        with results_lock(out_json):
            merge_other_runs()
            results["cells"][key] = cell
            write_json_atomic(out_json, results)
            render(results, out_json)
        print(f"{key:>22}  ppl {cell['ppl']:8.2f}  recovered {cell.get('recovered', float('nan')):6.3f}  "
              f"params {cell['trainable_params']:>9,}  {cell['seconds']:6.0f}s", flush=True)

    if "dense" not in results["cells"]:
        started = time.perf_counter()
        model, tok = load_model(args.model, device=args.device)
        save("dense", {"setting": "dense", "method": "dense", **cell_scores(score(model, tok)),
                       "trainable_params": 0, "seconds": time.perf_counter() - started})
    dense_ppl = results["cells"]["dense"]["ppl"]
    for setting, prune_config in prune_configs.items():
        todo = [m for m in args.methods if f"{setting}/{m}" not in results["cells"]]
        if not todo:
            continue
        pruned_dir = Path(args.work_dir) / (f"{Path(args.model).name}-{args.prune_method}-"
                                            f"{prune_config.setting.replace(':', 'of')}-calib{args.calib_samples}x"
                                            f"{args.seq_len}-seed{args.seed}")
        if not (pruned_dir / "sparsity_report.json").is_file():
            model, tok = load_model(args.model, device=args.device)
            prune_to_folder(model, tok, prune_config, pruned_dir, model_name=args.model, force=True, quiet=True)
        sparsity = json.loads((pruned_dir / "sparsity_report.json").read_text())["overall_sparsity"]
        for method in ["none"] + [m for m in todo if m != "none"]:  # the pruned score comes first: shares need it
            key = f"{setting}/{method}"
            with results_lock(out_json):
                merge_other_runs()
            if key in results["cells"]:
                continue
            started = time.perf_counter()
            model, tok = load_model(pruned_dir, device=args.device)
            cell = {"setting": setting, "method": method, "sparsity": sparsity}
            if method == "none":
                cell.update(cell_scores(score(model, tok)), trainable_params=0)
            else:
                cell.update(train_cell(method, model, tok, splits, test, budget, args, score))
            cell["seconds"] = time.perf_counter() - started
            pruned_ppl = cell["ppl"] if method == "none" else results["cells"][f"{setting}/none"]["ppl"]
            cell["recovered"] = recovered_share(dense_ppl, pruned_ppl, cell["ppl"])
            save(key, cell)
    with results_lock(out_json):  # redrawn from the file as it stands, with every run's cells
        render(json.loads(out_json.read_text()), out_json)


def train_cell(method, model, tok, splits, test, budget: Budget, args, score) -> dict:
    mixture, extra = prepare(method, model, budget)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lora_lr if method == "lora" else args.lr,
                         gate_lr=args.gate_lr, gate_pretrain_steps=args.gate_pretrain_steps,
                         gate_pretrain_examples=args.gate_pretrain_examples, max_len=args.max_len,
                         eval_every=args.steps, checkpoint_every=args.steps, seed=args.seed)
    started = time.perf_counter()
    # only the train split goes in: the study scores its own held-out set, so the trainer's
    # validation passes (two per cell) would be time spent on numbers nobody reads
    lm, history = recover(model, tok, {"train": splits["train"]}, mixture, config, progress=False,
                          device=args.device, snapshot_records=test, extra_params=extra)
    train_seconds = time.perf_counter() - started
    return {
        **cell_scores(score(lm, tok)),
        "trainable_params": trainable_count(lm, extra),
        "train_seconds": train_seconds,
        "mixture": asdict(lm.mixture.config),
        "train_loss": history["train_loss"],
        "gate_snapshots": history.get("gate_snapshots"),
    }


def cell_scores(result: dict) -> dict:
    return {"ppl": result["ppl"], "per_category": result["per_category"], "test_tokens": result["tokens"]}


# ----------------------------------------------------------------------------- outputs


def render(results: dict, out_json: Path) -> None:
    out_json.with_suffix(".md").write_text(markdown(results, out_json.stem))
    draw_chart(results, out_json.with_suffix(".png"))
    gates = out_json.parent / f"{out_json.stem}_gates"
    for key, cell in results["cells"].items():
        if cell.get("gate_snapshots"):
            gates.mkdir(exist_ok=True)
            stem = key.replace("/", "_").replace(":", "of")  # 3:4/mops -> 3of4_mops
            (gates / f"{stem}.json").write_text(json.dumps(cell["gate_snapshots"], indent=2) + "\n")
            draw_heatmaps(cell["gate_snapshots"], gates / f"{stem}.png", title=f"{cell['method']} at {cell['setting']}")


def _settings_and_methods(cells: dict):
    settings, methods = [], []
    for cell in cells.values():
        if cell["setting"] != "dense":
            settings += [cell["setting"]] if cell["setting"] not in settings else []
            methods += [cell["method"]] if cell["method"] not in methods else []
    methods.sort(key=lambda m: METHODS.index(m))
    settings.sort(key=sparsity_order)
    return settings, methods


def sparsity_order(setting: str) -> tuple[float, bool]:
    """Settings from the mildest to the most aggressive: 2:4, 4:8, 0.75, 3:4, 0.85, 7:8, 0.90."""
    if ":" in setting:
        n, m = setting.split(":")
        return int(n) / int(m), True
    return float(setting), False


def markdown(results: dict, stem: str) -> str:
    p, cells = results["protocol"], results["cells"]
    settings, methods = _settings_and_methods(cells)
    dense = cells.get("dense", {}).get("ppl", float("nan"))
    lines = [
        f"# Recovery study on {p['model']}",
        "",
        f"Made by `python benchmarks/recovery.py` (rerun it to reproduce; finished cells are kept). "
        f"Pruning: {p['prune_method']}, calibrated on {p['calib_samples']} x {p['seq_len']} Dolly tokens. "
        f"Training (every method alike): {p['steps']} steps x {p['batch_size']} examples of {'+'.join(p['data'])} "
        f"(train split, {p['max_len']} tokens), seed {p['seed']}; K = {p['experts']}, m = {p['prompt_len']}, "
        f"g/l = {p['gate_layer'] or 'round(0.3 L)'}/{p['inject_layer'] or 'g'}, gate r = {p['gate_hidden']}, "
        f"lr {p['lr']} (prompts) / {p['gate_lr']} (gate) / {p['lora_lr']} (LoRA r = {p['lora_rank']}), "
        f"{p['gate_pretrain_steps']} gate-pretraining steps on {p['gate_pretrain_examples']} examples. Score: response-only perplexity of "
        f"{p['test_examples']} stratified held-out {p['score_split']} examples ({p['test_max_len']} tokens); dense model: "
        f"**{dense:.2f}**. Recovered = (log ppl_pruned - log ppl) / (log ppl_pruned - log ppl_dense).",
        "",
        "## Held-out perplexity",
        "",
        "| setting | " + " | ".join(methods) + "".join(f" | {m} vs best same-budget" for m in MOPS) + " |",
        "| --- | " + " | ".join("---:" for _ in methods) + " | ---:" * len(MOPS) + " |",
    ]
    for s in settings:
        row = [f"{cells[f'{s}/{m}']['ppl']:.2f}" if f"{s}/{m}" in cells else "" for m in methods]
        base = [cells[f"{s}/{m}"]["ppl"] for m in SAME_BUDGET if f"{s}/{m}" in cells]
        for m in MOPS:  # the target: at least 10% below the best of prompt-equal, uniform and attempt
            row.append(f"{100 * (cells[f'{s}/{m}']['ppl'] / min(base) - 1):+.1f}%" if base and f"{s}/{m}" in cells else "")
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    lines += ["", "## Every cell", "",
              "| setting | method | ppl | recovered | trainable params | train s | cell s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in settings:
        for m in methods:
            c = cells.get(f"{s}/{m}")
            if c:
                train_s = f"{c['train_seconds']:.0f}" if "train_seconds" in c else ""
                lines.append(f"| {s} | {m} | {c['ppl']:.2f} | {c['recovered']:.3f} | {c['trainable_params']:,} | "
                             f"{train_s} | {c['seconds']:.0f} |")
    categories = sorted(cells.get("dense", {}).get("per_category", {}))
    lines += ["", "## Per category", "", "| setting | method | " + " | ".join(categories) + " |",
              "| --- | --- | " + " | ".join("---:" for _ in categories) + " |"]
    if "dense" in cells:
        lines.append("| dense | | " + " | ".join(f"{cells['dense']['per_category'][c]:.2f}" for c in categories) + " |")
    for s in settings:
        for m in methods:
            c = cells.get(f"{s}/{m}")
            if c:
                lines.append(f"| {s} | {m} | " + " | ".join(f"{c['per_category'][k]:.2f}" for k in categories) + " |")
    lines += ["", f"Gate heatmaps (mean gate weight per test category and expert, before training, after gate "
              f"pretraining, midway, at the end), with their numbers: `{stem}_gates/`.", "",
              f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}."]
    return "\n".join(lines) + "\n"


def draw_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    settings, methods = _settings_and_methods(cells)
    if not settings:
        return
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(settings), 4))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, s in enumerate(settings) if f"{s}/{m}" in cells]
        ys = [cells[f"{s}/{m}"]["ppl"] for s in settings if f"{s}/{m}" in cells]
        ax.bar(xs, ys, width, label=m)
    if "dense" in cells:
        ax.axhline(cells["dense"]["ppl"], color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_yscale("log")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_xlabel("pruning setting")
    ax.set_ylabel("held-out response perplexity (log)")
    ax.set_title(f"Recovery of {results['protocol']['model']} ({results['protocol']['prune_method']})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(run_cli(main))
