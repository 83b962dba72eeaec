"""The prune stage: :func:`mops.prune.core.prune_to_folder` on the dense model, into the
stage's folder (``checkpoint/`` with its ``sparsity_report.json``)."""

from __future__ import annotations

CHECKPOINT = "checkpoint"


def run(stage, job, tmp) -> dict:
    from mops.models import load_model
    from mops.prune.core import prune_to_folder

    recipe = job.world.recipe
    model, tokenizer = load_model(job.world.checkpoint, dtype=recipe.dtype, device=recipe.device)
    report = prune_to_folder(model, tokenizer, stage.spec["entry"].config(recipe.seed), tmp / CHECKPOINT,
                             model_name=recipe.model, force=True, quiet=job.quiet)
    return {"setting": report["setting"], "method": report["method"], "overall_sparsity": report["overall_sparsity"],
            "nm_compliance": report["nm_compliance"], "prune_seconds": report["prune_seconds"],
            "wall_seconds": report["wall_seconds"]}


def checkpoint(job, stage):
    """Where a finished prune stage keeps the pruned model."""
    return job.store.folder(stage) / CHECKPOINT
