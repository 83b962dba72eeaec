"""Prune the embedded model (or any --model) with every method at every setting and
write ``benchmarks/results/prune_<name>.{md,json}``.

Each run loads the dense model fresh, prunes it through the same ``prune_to_folder``
the ``prune`` command uses (so sparsity is measured from the saved weights), evaluates
WikiText-2 and held-out response perplexity, and saves the row at once: a rerun skips
rows already in the JSON, so the table can be completed over several runs.

    python benchmarks/prune_table.py                      # the committed table
    python benchmarks/prune_table.py --methods wanda --settings 2:4 0.75
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mops.cli_common import run_cli, setup_logging
from mops.eval.perplexity import perplexity_suite
from mops.models import DEFAULT_MODEL, load_model
from mops.outputs import library_versions, write_json_atomic
from mops.prune import METHODS, PruneConfig
from mops.prune.config import MISSION_SETTINGS
from mops.prune.core import prune_to_folder

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--name", default="embedded", help="results file stem: prune_<name>.md/.json (default: embedded)")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--settings", nargs="+", default=list(MISSION_SETTINGS))
    p.add_argument("--calib", default="dolly")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default: 64, for a CPU)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration sequence length (default: 256, for a CPU)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16, help="first W WikiText-2 windows (default: 16)")
    p.add_argument("--eval-data", default="dolly+natural-instructions")
    p.add_argument("--eval-examples", type=int, default=120, help="held-out test examples, stratified (default: 120)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(RESULTS))
    return p.parse_args(argv)


def protocol(args) -> dict:
    return {
        "model": args.model,
        "calibration": f"{args.calib_samples} windows of {args.seq_len} tokens from the {args.calib} train split, seed {args.seed}",
        "wikitext2": f"WikiText-2 raw test, rows joined by \\n\\n, first {args.eval_windows} non-overlapping "
                     f"{args.eval_seq_len}-token windows, token-level mean NLL",
        "response": f"response-only perplexity of {args.eval_examples} stratified test examples of {args.eval_data}",
        "sparsity": "measured from the saved checkpoint: zeros / weights over every decoder nn.Linear",
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(quiet=True)
    configs = [PruneConfig(method=m, calib=args.calib, calib_samples=args.calib_samples, seq_len=args.seq_len,
                           seed=args.seed, **({"pattern": s} if ":" in s else {"sparsity": float(s)}))
               for m in args.methods for s in args.settings]
    out_json = Path(args.out_dir) / f"prune_{args.name}.json"
    table = json.loads(out_json.read_text()) if out_json.is_file() else {"rows": []}
    if table.get("protocol", protocol(args)) != protocol(args):
        sys.exit(f"{out_json} was made with another protocol; use --name for a new table or delete it")
    table.update(protocol=protocol(args), versions=library_versions())
    done = {(r["method"], r["setting"]) for r in table["rows"]}
    evaluate = lambda model, tok: perplexity_suite(  # noqa: E731
        model, tok, args.eval_seq_len, args.eval_windows, args.eval_data, args.eval_examples, args.seed, progress=False)

    def save(row):
        table["rows"].append(row)
        order = {("dense", "dense"): -1, **{(c.method, c.setting): i for i, c in enumerate(configs)}}
        table["rows"].sort(key=lambda r: order.get((r["method"], r["setting"]), len(order)))
        write_json_atomic(out_json, table)
        out_json.with_suffix(".md").write_text(markdown(table))
        print(f"{row['method']:>10} {row['setting']:>6}  sparsity {row['sparsity']:.4f}  wikitext2 {row['wikitext2_ppl']:9.2f}  "
              f"response {row['response_ppl']:8.2f}  {row['prune_seconds']:7.1f}s", flush=True)

    if ("dense", "dense") not in done:
        model, tok = load_model(args.model, device=args.device)
        result = evaluate(model, tok)
        save(row_of("dense", "dense", 0.0, None, 0.0, result))
    for config in configs:
        if (config.method, config.setting) in done:
            continue
        model, tok = load_model(args.model, device=args.device)
        with tempfile.TemporaryDirectory() as work:  # the checkpoint is only needed to measure it
            report = prune_to_folder(model, tok, config, Path(work) / "ckpt", model_name=args.model, quiet=True)
        started = time.perf_counter()
        result = evaluate(model, tok)
        save(row_of(config.method, config.setting, report["overall_sparsity"], report["nm_compliance"],
                    report["prune_seconds"], result, eval_seconds=time.perf_counter() - started))


def row_of(method, setting, sparsity, compliance, prune_seconds, result, eval_seconds=None) -> dict:
    return {
        "method": method, "setting": setting, "sparsity": sparsity, "nm_compliance": compliance,
        "wikitext2_ppl": result["wikitext2"]["ppl"], "response_ppl": result["response"]["ppl"],
        "response_ppl_per_category": result["response"]["per_category"],
        "prune_seconds": prune_seconds, "eval_seconds": eval_seconds,
    }


def markdown(table: dict) -> str:
    p = table["protocol"]
    lines = [
        f"# Pruning {p['model']}: every method at every setting",
        "",
        "Made by `python benchmarks/prune_table.py` (rerun it to reproduce; finished rows are kept).",
        "",
        f"- calibration: {p['calibration']}",
        f"- WikiText-2 perplexity: {p['wikitext2']}",
        f"- response perplexity: {p['response']}",
        f"- sparsity: {p['sparsity']}; N:M compliance = share of M-groups with at least N zeros",
        f"- versions: {', '.join(f'{k} {v}' for k, v in table['versions'].items())}",
        "",
        "| method | setting | sparsity | N:M compliance | WikiText-2 ppl | response ppl | prune s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table["rows"]:
        compliance = "" if r["nm_compliance"] is None else f"{r['nm_compliance']:.4f}"
        lines.append(f"| {r['method']} | {r['setting']} | {r['sparsity']:.4f} | {compliance} | {r['wikitext2_ppl']:.2f} | "
                     f"{r['response_ppl']:.2f} | {r['prune_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run_cli(main))
