"""``mops-eval``: several models on several lm-eval tasks, one comparison table.

    mops-eval --model dense=smollm2-135m --model pruned=runs/demo/pruned/sparsegpt-2of4 \\
        --model recovered=runs/demo/pruned/sparsegpt-2of4,adapter=runs/demo/adapters/sparsegpt-2of4-mops \\
        --tasks mops_wikitext2,mops_ni_mc,mops_mmlu --limit 8 --out runs/demo/eval

Each ``--model LABEL=BASE[,key=value...]`` is evaluated through lm-eval's
``simple_evaluate`` with the registered ``mops`` model (``pretrained=BASE`` plus the keys:
``adapter``, ``dtype``, ``device``, ``batch_size``, ``max_length``, ``check_base``). The
output folder gets ``comparison.md`` and ``comparison.json`` (one row per model, one column
per task or group asked for) and, in ``lm_eval/``, lm-eval's own results file of each model;
it is written atomically, after every model has run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from importlib import metadata
from pathlib import Path

from mops.cli_common import run_cli, setup_logging
from mops.errors import UserError
from mops.outputs import atomic_dir, check_output_dir

MODEL_KEYS = ("adapter", "dtype", "device", "batch_size", "max_length", "check_base")
#: The metric each kind of task is summarised by in the table (lm-eval keeps the others).
PRIMARY_METRICS = ("acc", "word_perplexity", "byte_perplexity", "exact_match")
DEFAULT_TASKS = "mops_wikitext2,mops_ni_mc,mops_mmlu"


def parse_model(spec: str) -> tuple[str, dict]:
    """``LABEL=BASE[,key=value...]`` -> (label, model_args for the ``mops`` model)."""
    label, sep, rest = spec.partition("=")
    parts = [p for p in rest.split(",") if p]
    if not sep or not label or not parts or "=" in parts[0]:
        raise UserError(f"--model {spec!r}: expected LABEL=BASE[,key=value...], e.g. "
                        "recovered=runs/demo/pruned/sparsegpt-2of4,adapter=runs/demo/adapters/sparsegpt-2of4-mops")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", label):
        raise UserError(f"--model {spec!r}: label {label!r}: use letters, digits, '.', '_' and '-' (it names a file)")
    args = {"pretrained": parts[0]}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if not eq or key not in MODEL_KEYS:
            raise UserError(f"--model {spec!r}: {part!r}: expected key=value with key in {', '.join(MODEL_KEYS)}")
        args[key] = value
    return label, args


def check_models(models: list[tuple[str, dict]]) -> None:
    """What can be checked before any model is loaded: labels, adapter folders and files."""
    from mops.adapter import read_adapter_config
    from mops.models import resolve_checkpoint

    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        raise UserError(f"--model labels must differ; got {', '.join(labels)}")
    for label, args in models:
        resolve_checkpoint(args["pretrained"])  # a missing base fails here, with its own message
        if "adapter" in args:
            if not Path(args["adapter"]).is_dir():
                raise UserError(f"--model {label}: adapter {args['adapter']!r}: no such folder; "
                                "expected a folder written by mops-recover")
            read_adapter_config(args["adapter"])


def check_tasks(names: list[str], manager) -> None:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        ours = sorted(n for n in known if n.startswith("mops_") and not n.startswith(("mops_mmlu_", "mops_response_")))
        raise UserError(f"--tasks: unknown task {', '.join(map(repr, unknown))}; ours: {', '.join(ours)} "
                        "(and every mops_mmlu_<subject>, mops_mmlu_5shot_<subject>, mops_response_<category>; "
                        "lm-eval's own with --lm-eval-tasks)")


def columns(results: dict, names: list[str]) -> list[tuple[str, str]]:
    """(task, metric) per table column: the asked task or group, or a group's subtasks when
    the group itself has no aggregate (``mops_response``)."""
    cols = []
    for name in names:
        tasks = [name] if _metric(results["results"].get(name, {})) else results.get("group_subtasks", {}).get(name, [name])
        cols += [(t, _metric(results["results"].get(t, {})) or "") for t in tasks]
    return cols


def _metric(row: dict) -> str | None:
    return next((m for m in PRIMARY_METRICS if f"{m},none" in row), None)


def comparison(runs: dict[str, dict], names: list[str], settings: dict) -> dict:
    first = next(iter(runs.values()))
    cols = columns(first, names)
    table = {label: {f"{t} {m}": r["results"].get(t, {}).get(f"{m},none") for t, m in cols} for label, r in runs.items()}
    samples = {t: _samples(first, t) for t, _ in cols}
    higher = {f"{t} {m}": first.get("higher_is_better", {}).get(t, {}).get(m) for t, m in cols}
    return {"columns": [f"{t} {m}" for t, m in cols], "rows": table, "higher_is_better": higher,
            "samples": samples, "settings": settings}


def _samples(results: dict, task: str) -> int | None:
    """Examples scored for a task, or for a group summed over its subtasks."""
    if task in results.get("n-samples", {}):
        return results["n-samples"][task].get("effective")
    subtasks = results.get("group_subtasks", {}).get(task)
    if not subtasks:
        return None
    counts = [_samples(results, t) for t in subtasks]
    return None if None in counts else sum(counts)


def markdown(comp: dict) -> str:
    def arrow(col):
        return {True: " ↑", False: " ↓"}.get(comp["higher_is_better"].get(col), "")

    def cell(v):
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else f"{v:.2f}"

    head = "| model | " + " | ".join(c + arrow(c) for c in comp["columns"]) + " |"
    rule = "| --- |" + " ---: |" * len(comp["columns"])
    rows = [f"| {label} | " + " | ".join(cell(row[c]) for c in comp["columns"]) + " |" for label, row in comp["rows"].items()]
    s = comp["settings"]
    shots = "task defaults" if s["num_fewshot"] is None else s["num_fewshot"]
    limits = ", ".join(f"{t} {'all' if n is None else n}" for t, n in s["tasks"].items())
    note = (f"lm-eval {s['lm_eval']}; few-shot: {shots}; limit per (sub)task: {limits}; "
            "examples scored: " + ", ".join(f"{t} {n}" for t, n in comp["samples"].items()))
    return "\n".join([head, rule, *rows, "", note]) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mops-eval", description="Evaluate models on lm-eval tasks (ours or lm-eval's) "
                                "and write one comparison table.")
    p.add_argument("--model", action="append", required=True, metavar="LABEL=BASE[,key=value...]",
                   help="a model to evaluate (repeatable): BASE is a checkpoint folder, a .gguf file or smollm2-135m; "
                   f"keys: {', '.join(MODEL_KEYS)}")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated tasks or groups, each optionally NAME:LIMIT "
                   f"(default: {DEFAULT_TASKS})")
    p.add_argument("--limit", type=float, help="at most this many examples per task (below 1: a fraction of each task); "
                   "the default for tasks without their own :LIMIT")
    p.add_argument("--max-length", type=int, help="text tokens per forward pass, for every model without its own "
                   "max_length (default: the model's positions minus the prompt's)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", default="4", help="requests per forward pass (default: 4)")
    p.add_argument("--lm-eval-tasks", action="store_true", help="also offer lm-eval's own tasks (they read their "
                   "data sets from the Hugging Face hub or its cache; without, only ours are indexed, which is faster)")
    p.add_argument("--out", required=True, help="folder for the comparison table and lm-eval's results files")
    p.add_argument("--force", action="store_true", help="replace an output folder that already holds files")
    p.add_argument("--quiet", action="store_true", help="no progress bars or lm-eval logs")
    return p


def parse_tasks(text: str, default_limit: float | None) -> list[tuple[str, float | None]]:
    """``name[:limit],...`` -> (name, limit) pairs; a limit of 1 or more counts examples,
    below 1 it is a fraction of each task (lm-eval's convention)."""
    out = []
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition(":")
        limit = default_limit
        if sep:
            try:
                limit = float(value)
            except ValueError:
                raise UserError(f"--tasks {item!r}: expected NAME or NAME:LIMIT with a number") from None
        if limit is not None and limit <= 0:
            raise UserError(f"--tasks {item!r}: the limit must be positive")
        out.append((name, int(limit) if limit is not None and limit >= 1 else limit))
    if not out:
        raise UserError("--tasks: expected at least one task name")
    return out


def merge(parts: list[dict]) -> dict:
    """One results dict from several simple_evaluate calls over disjoint tasks."""
    merged = {}
    for r in parts:
        for key, value in r.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged.setdefault(key, value)
    return merged


def evaluate_model(model_args: dict, tasks: list[tuple[str, float | None]], manager, num_fewshot) -> list[dict]:
    """Load the model once, then one simple_evaluate call per distinct limit."""
    import lm_eval
    from mops.eval.harness import MopsLM

    lm = MopsLM(**model_args)
    by_limit: dict = {}
    for name, limit in tasks:
        by_limit.setdefault(limit, []).append(name)
    runs = []
    for limit, names in by_limit.items():
        start = time.time()
        r = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                    log_samples=False)
        r["config"]["model_args"] = model_args
        r["mops_eval_seconds"] = time.time() - start
        runs.append(r)
    return runs


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    if args.quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # our tasks read local files; so must lm-eval's
    models = [parse_model(m) for m in args.model]
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit}: expected a positive number")
    tasks = parse_tasks(args.tasks, args.limit)
    names = [name for name, _ in tasks]
    check_output_dir(args.out, args.force)
    check_models(models)

    from lm_eval.utils import handle_non_serializable
    from mops.eval.task_files import task_manager

    manager = task_manager(include_defaults=args.lm_eval_tasks)
    check_tasks(names, manager)
    defaults = {"batch_size": args.batch_size, **({"max_length": args.max_length} if args.max_length else {})}
    runs = {}
    # Models with an adapter first: a base that does not match its adapter is refused
    # before the other models spend their time.
    for label, model_args in sorted(models, key=lambda m: "adapter" not in m[1]):
        runs[label] = evaluate_model({**defaults, **model_args}, tasks, manager, args.num_fewshot)
    runs = {label: runs[label] for label, _ in models}
    settings = {"tasks": dict(tasks), "num_fewshot": args.num_fewshot,
                "models": {label: {**defaults, **a} for label, a in models}, "lm_eval": metadata.version("lm_eval"),
                "seconds": {label: round(sum(r["mops_eval_seconds"] for r in parts), 1) for label, parts in runs.items()}}
    comp = comparison({label: merge(parts) for label, parts in runs.items()}, names, settings)
    table = markdown(comp)
    with atomic_dir(args.out, args.force) as tmp:
        (tmp / "comparison.md").write_text(table)
        (tmp / "comparison.json").write_text(json.dumps(comp, indent=2) + "\n")
        (tmp / "lm_eval").mkdir()
        for label, parts in runs.items():
            for i, r in enumerate(parts):  # lm-eval's own results, one file per simple_evaluate call
                name = f"{label}.json" if len(parts) == 1 else f"{label}.{i + 1}.json"
                (tmp / "lm_eval" / name).write_text(json.dumps(r, indent=2, default=handle_non_serializable) + "\n")
    print(table, end="")
    print(f"-> {args.out}")


def entry() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
