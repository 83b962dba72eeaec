"""``prune``: a dense Llama-family checkpoint in, a sparse checkpoint and its proof out."""

from __future__ import annotations

import argparse
import sys
from functools import partial

from mops.cli_common import run_cli, setup_logging
from mops.eval.perplexity import perplexity_suite
from mops.errors import UserError
from mops.models import DEFAULT_MODEL, load_model
from mops.outputs import check_output_dir
from mops.prune.config import METHODS, PruneConfig, parse_pattern
from mops.prune.core import prune_to_folder

EPILOG = """examples:
  prune --model smollm2-135m --method sparsegpt --pattern 2:4 --out runs/sgpt-2of4 --eval
  prune --model path/to/llama --method wanda --sparsity 0.75 --calib wikitext2 --out runs/wanda-75
"""


def sparsity_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--sparsity {text!r}: expected a fraction strictly between 0 and 1, e.g. 0.75") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prune", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint folder, .gguf file, hub id, or the embedded default (default: {DEFAULT_MODEL})")
    p.add_argument("--method", required=True, help=f"pruning algorithm: {', '.join(METHODS)}")
    which = p.add_argument_group("sparsity (give exactly one)")
    which.add_argument("--sparsity", type=str, help="unstructured sparsity, a fraction in (0, 1), e.g. 0.75")
    which.add_argument("--pattern", help="N:M: N zeros in every M consecutive input weights, e.g. 2:4, 4:8, 3:4, 7:8")
    p.add_argument("--calib", default="dolly",
                   help="calibration source: wikitext2 (validation split) or instruction sources joined by + "
                        "(train split), e.g. dolly+natural-instructions (default: dolly)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default: 128)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sequence (default: 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration draw and data splits (default: 0)")
    p.add_argument("--out", required=True, help="output folder for the pruned checkpoint (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an output folder that already holds files")
    p.add_argument("--eval", action="store_true", help="measure dense and pruned perplexity and add them to the report")
    p.add_argument("--eval-seq-len", type=int, help="WikiText-2 window length (default: --seq-len)")
    p.add_argument("--eval-windows", type=int, help="use only the first W WikiText-2 windows (default: all)")
    p.add_argument("--eval-data", default="dolly+natural-instructions",
                   help="instruction sources whose test split gives response perplexity (default: dolly+natural-instructions)")
    p.add_argument("--eval-examples", type=int, help="at most this many test examples, stratified (default: all)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-module logs")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    config = PruneConfig(
        method=args.method,
        sparsity=None if args.sparsity is None else sparsity_arg(args.sparsity),
        pattern=None if args.pattern is None else parse_pattern(args.pattern),
        calib=args.calib, calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed,
    )
    for flag in ("eval_windows", "eval_examples", "eval_seq_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive whole number")
    check_output_dir(args.out, args.force)  # refuse before minutes of work, not after
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    report = prune_to_folder(
        model, tokenizer, config, args.out, model_name=args.model, force=args.force,
        evaluate=partial(perplexity_suite, seq_len=args.eval_seq_len or args.seq_len, max_windows=args.eval_windows,
                         data=args.eval_data, max_examples=args.eval_examples, seed=args.seed,
                         progress=not args.quiet) if args.eval else None,
        quiet=args.quiet,
    )
    print(summary(report, args.out))


def summary(report: dict, out) -> str:
    lines = [
        f"pruned {report['model']} with {report['method']} to {report['setting']} -> {out}",
        f"  measured sparsity of {len(report['modules'])} decoder Linear modules: {report['overall_sparsity']:.4f}"
        + ("" if report["nm_compliance"] is None else f"; {report['setting']} compliance: {report['nm_compliance']:.4f}"),
        f"  left dense: {', '.join(report['dense_modules']) or 'none'}"
        + (" (lm_head tied to embeddings)" if report["lm_head_tied_to_embeddings"] else ""),
    ]
    if "eval" in report:
        d, p = report["eval"]["dense"], report["eval"]["pruned"]
        lines += [
            f"  {'':10} {'wikitext2 ppl':>14} {'response ppl':>13}",
            f"  {'dense':10} {d['wikitext2']['ppl']:14.2f} {d['response']['ppl']:13.2f}",
            f"  {'pruned':10} {p['wikitext2']['ppl']:14.2f} {p['response']['ppl']:13.2f}",
            f"  ({d['wikitext2']['protocol']}; response ppl on {d['response']['examples']} test examples of {d['response']['data']})",
        ]
    return "\n".join(lines)


def entry(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(entry())
