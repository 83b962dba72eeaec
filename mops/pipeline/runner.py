"""Carry out a plan: reuse what is finished, resume what was interrupted, run the rest, in
order, then put the report at the top of the output folder."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mops.pipeline import eval_stage, prune_stage, recover_stage, report
from mops.pipeline.cache import Stage, Store
from mops.pipeline.plan import describe, plan_text
from mops.pipeline.table import table_cells
from mops.pipeline.world import World

RUNNERS = {"prune": prune_stage.run, "recover": recover_stage.run, "eval": eval_stage.run, "report": report.run}
PUBLISHED = ("report.md", "report.html", "report.json")


@dataclass
class Job:
    """The job at hand, as every stage's ``run(stage, job, tmp)`` reads it: the checked recipe and
    data, the cache, the options."""

    world: World
    store: Store
    recipe_path: str
    recipe_text: str
    quiet: bool = False
    report_to: str = "none"

    def step_logger(self, stage: Stage):
        if self.report_to == "none":
            return None
        from mops.pipeline.trackers import StepLogger, make_tracker

        return StepLogger([make_tracker(self.report_to, self.store.out, stage)])

    @cached_property
    def lower(self):
        """The frozen layers' states below the injection layer (:class:`mops.lower_cache.LowerStates`),
        shared by every stage of this run: the recover stage computes the held-out examples' states
        for its gate snapshots, and the recovered model's eval reads them back instead of running
        those layers again. Exact: an example's states never depend on which run computed them, and
        the store empties itself when another base asks."""
        from mops.lower_cache import LowerStates

        return LowerStates()


def execute(job: Job, stages: list[Stage], echo=print) -> dict:
    """Run every stage that is not finished; return the report stage's record."""
    store = job.store
    described = describe(stages, store)
    echo(plan_text(described, store))
    write_index(store, stages)
    for i, (stage, what) in enumerate(described, 1):
        if what == "reuse":
            continue
        echo(f"[{i}/{len(stages)}] {stage.kind} {stage.label}: {what} ...")
        started = time.perf_counter()
        store.build(stage, lambda tmp, s=stage: RUNNERS[s.kind](s, job, tmp), started=time.time())
        echo(f"[{i}/{len(stages)}] {stage.kind} {stage.label}: done in {time.perf_counter() - started:.0f} s "
             f"-> {store.folder(stage)}")
    link_outputs(store, stages)
    final = stages[-1]
    for name in PUBLISHED:
        store.publish(name, store.folder(final) / name)
    return store.record(final)


def link_outputs(store: Store, stages: list[Stage]) -> None:
    """What a user takes elsewhere (``mops-serve``, ``mops.load``) under names a person can type:
    ``pruned/<setting>`` is a pruned checkpoint, ``adapters/<setting>-<method>`` its adapter."""
    for stage in stages:
        if stage.kind == "prune":
            store.link(f"pruned/{stage.label}", store.folder(stage) / prune_stage.CHECKPOINT)
        elif stage.kind == "recover":
            store.link(f"adapters/{stage.label.replace('/', '-')}", store.folder(stage) / recover_stage.ADAPTER)


def write_index(store: Store, stages: list[Stage]) -> None:
    """``stages.json``: which folder holds which stage of this recipe (the folders are named by key)."""
    from mops.outputs import write_json_atomic

    path = store.out / "stages.json"
    write_json_atomic(path, [
        {"kind": s.kind, "label": s.label, "key": s.key, "folder": str(store.folder(s).relative_to(store.out))}
        for s in stages])
    path.chmod(0o644)  # mkstemp makes 0600; outputs are meant to be shared


def summary(store: Store) -> str:
    """The table as the terminal shows it, read back from the published report."""
    data = json.loads((Path(store.out) / "report.json").read_text())
    head, body = table_cells(data["rows"])
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)
