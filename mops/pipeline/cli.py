"""``mops-run RECIPE.yaml``: prune -> recover -> evaluate -> report, from one recipe.

The recipe is validated (schema, then against the model and data it names) before anything
is written; finished stages are reused, an interrupted recovery resumes from its last
checkpoint, and ``--dry-run`` prints the plan without running it. See
``examples/demo.yaml`` and the README's ``mops-run`` section.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mops.cli_common import run_cli, setup_logging
from mops.errors import UserError
from mops.pipeline.trackers import REPORT_TO


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mops-run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe (e.g. examples/demo.yaml)")
    p.add_argument("--out", help="output folder, instead of the recipe's out")
    p.add_argument("--dry-run", action="store_true", help="print the plan (what runs, what is reused) and stop")
    p.add_argument("--report-to", default="none", help=f"training curves to {', '.join(REPORT_TO)} (local files under "
                   "OUT/trackers; default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or library logs")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.report_to not in REPORT_TO:
        raise UserError(f"--report-to {args.report_to!r}: expected one of {', '.join(REPORT_TO)}")
    setup_logging(args.quiet)
    if args.quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # Every stage reads local files; a hub lookup would only hang on a machine without a network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from mops.pipeline.cache import Store
    from mops.pipeline.plan import build_plan, describe, plan_text
    from mops.pipeline.recipe import load_recipe
    from mops.pipeline.runner import Job, execute, summary
    from mops.pipeline.world import check_world

    recipe, text = load_recipe(args.recipe)
    if args.out:
        recipe = recipe.model_copy(update={"out": args.out})
    store = Store(recipe.out)
    store.check_owner()
    world = check_world(recipe)
    stages = build_plan(world, text, args.recipe)
    if args.dry_run:
        print(plan_text(describe(stages, store), store))
        print("nothing was run (--dry-run)")
        return
    job = Job(world, store, args.recipe, text, quiet=args.quiet, report_to=args.report_to)
    with store.session():
        execute(job, stages)
    print(summary(store))
    print(f"report -> {store.out / 'report.html'} (and report.md)")


def entry(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(entry())
