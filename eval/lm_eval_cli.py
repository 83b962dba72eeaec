"""lm-eval's own command line with the ``mops`` model registered and our tasks on its include path.

    python -m mops.eval.lm_eval_cli --model mops \\
        --model_args pretrained=runs/demo/pruned/sparsegpt-2of4,adapter=runs/demo/adapters/sparsegpt-2of4-mops --tasks mops_mmlu

lm-eval 0.4 finds models only in its registry and has no plugin entry point, so a plain
``lm_eval --model mops`` does not know the model; this runs the same command line after
importing :mod:`mops.eval.harness`. Without ``--include_path``, our task folder is added.
"""

from __future__ import annotations

import sys


def main() -> None:
    import mops.eval.harness  # noqa: F401 - registers the "mops" model
    from lm_eval.__main__ import cli_evaluate
    from mops.eval.task_files import tasks_dir

    if not any(a == "--include_path" or a.startswith("--include_path=") for a in sys.argv[1:]) and len(sys.argv) > 1 \
            and sys.argv[1] not in ("-h", "--help"):
        sys.argv += ["--include_path", str(tasks_dir())]
    cli_evaluate()


if __name__ == "__main__":
    main()
