"""lm-eval through ``mops-eval``'s own functions, plus lm-eval's stderr for every score.

Dense, pruned and MoPs-recovered models go through :func:`mops.eval.cli.evaluate_model`
(the registered ``mops`` model). A LoRA-recovered model is a base with tensors inside it,
which the ``mops`` model cannot load from a folder, so it is handed to lm-eval's own
``HFLM`` as a loaded model, with the same grouping by limit.
"""

from __future__ import annotations

import functools
import hashlib
import time

from mops.cli_common import stderr_kept_aside

SUFFIX = ",none"  # lm-eval's key suffix for the default filter


@functools.lru_cache(maxsize=1)
def task_manager():
    """lm-eval's TaskManager over our task folder only (indexing takes seconds: once per process)."""
    from mops.eval.task_files import task_manager as make

    return make(include_defaults=False)


def known_tasks() -> set[str]:
    return set(task_manager().all_tasks)


def tasks_sha256() -> str:
    """Our lm-eval task definitions, so an edited task YAML reruns evaluation."""
    from mops.eval.task_files import tasks_dir

    digest = hashlib.sha256()
    for path in sorted(tasks_dir().rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            digest.update(str(path.relative_to(tasks_dir())).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_tasks(model, tasks: list[tuple[str, float | None]], num_fewshot: int | None, quiet: bool = False) -> list[dict]:
    """lm-eval's results, one dict per distinct limit. ``model``: model_args for the ``mops``
    model, or a loaded Hugging Face model (wrapped in lm-eval's ``HFLM``)."""
    with stderr_kept_aside(quiet):
        return _run_tasks(model, tasks, num_fewshot)


def _run_tasks(model, tasks, num_fewshot) -> list[dict]:
    import lm_eval

    from mops.eval.cli import evaluate_model

    if isinstance(model, dict):
        return evaluate_model(model, tasks, task_manager(), num_fewshot)
    lm, tokenizer, batch_size = model
    from lm_eval.models.huggingface import HFLM

    harness = HFLM(pretrained=lm, tokenizer=tokenizer, batch_size=batch_size)
    by_limit: dict = {}
    for name, limit in tasks:
        by_limit.setdefault(limit, []).append(name)
    runs = []
    for limit, names in by_limit.items():  # as evaluate_model does: one call per limit
        start = time.time()
        r = lm_eval.simple_evaluate(model=harness, tasks=names, task_manager=task_manager(), limit=limit,
                                    num_fewshot=num_fewshot, log_samples=False)
        r["mops_eval_seconds"] = time.time() - start
        runs.append(r)
    return runs


def scores(runs: list[dict], names: list[str]) -> list[dict]:
    """One entry per table column: task, metric, value, lm-eval's stderr, examples scored."""
    from mops.eval.cli import comparison, merge

    merged = merge(runs)
    table = comparison({"model": merged}, names, settings={})
    out = []
    for column in table["columns"]:
        task, metric = column.split(" ", 1)
        row = merged["results"].get(task, {})
        stderr = row.get(f"{metric}_stderr{SUFFIX}")
        out.append({"task": task, "metric": metric, "value": table["rows"]["model"][column],
                    "stderr": stderr if isinstance(stderr, (int, float)) else None,
                    "n": table["samples"].get(task), "higher_is_better": table["higher_is_better"].get(column)})
    return out
