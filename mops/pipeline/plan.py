"""From a checked recipe to the ordered stages of a run, each with its key.

    dense model ─┬─ eval dense
                 └─ prune P ─┬─ eval P
                             └─ recover P/M ── eval P/M      (for every P, every method M)
    every eval, prune and recover stage ── report

Settings are resolved here (the stages' dataclass defaults read now, the mixture each
baseline trains computed as :mod:`mops.baselines` builds it), so a key changes exactly when
what the stage would compute changes. ``none`` trains nothing: it is the pruned row.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from mops.pipeline.cache import Stage, Store
from mops.pipeline.fingerprints import canonical_sha256
from mops.pipeline.world import World, calibration_sha256, resolved_mixtures, wikitext_sha256

TOOLKIT = ("mops-toolkit",)
PRUNE_LIBS = TOOLKIT + ("torch", "transformers", "llmcompressor", "compressed-tensors")
RECOVER_LIBS = TOOLKIT + ("torch", "transformers", "accelerate", "peft")
EVAL_LIBS = TOOLKIT + ("torch", "transformers", "lm_eval", "numpy")
REPORT_LIBS = TOOLKIT + ("matplotlib",)


def build_plan(world: World, recipe_text: str, recipe_path: str = "") -> list[Stage]:
    recipe = world.recipe
    runtime = {"device": recipe.device, "dtype": recipe.dtype}
    dense_key = canonical_sha256(world.model_fingerprint)
    eval_settings = evaluation_settings(world) | runtime
    stages: list[Stage] = []

    def evaluation(label: str, model: str, model_key: str, needs: dict) -> Stage:
        stage = Stage("eval", label, 1, eval_settings, {"model": model_key}, EVAL_LIBS, needs=needs,
                      spec={"model": model})
        stages.append(stage)
        return stage

    evaluation("dense", "dense", dense_key, {})
    mixtures = resolved_mixtures(world) if recipe.recover else {}
    for entry in recipe.prune:
        config = entry.config(recipe.seed)
        prune = Stage("prune", entry.name, 1, {
            "config": config.to_dict(),
            "calibration_sha256": calibration_sha256(config.calib, recipe.seed) if config.needs_calibration else None,
            **runtime}, {"model": dense_key}, PRUNE_LIBS, spec={"entry": entry, "model": recipe.model})
        stages.append(prune)
        evaluation(entry.name, "pruned", prune.key, {"pruned": prune})
        for method in (recipe.recover.methods if recipe.recover else []):
            if method.name == "none":
                continue
            recover = Stage("recover", f"{entry.name}/{method.title}", 1,
                            recovery_settings(world, method, mixtures[method.title]) | runtime,
                            {"pruned": prune.key}, RECOVER_LIBS, needs={"pruned": prune}, spec={"method": method})
            stages.append(recover)
            evaluation(recover.label, "recovered", recover.key, {"pruned": prune, "recovered": recover})
    report_inputs = {f"{s.kind}:{s.label}": s.key for s in stages}
    # the report quotes the recipe and names its file: either changing reruns the report (seconds)
    stages.append(Stage("report", "report", 1, {"recipe_sha256": canonical_sha256(recipe_text),
                                                "recipe_path": str(recipe_path)}, report_inputs,
                        REPORT_LIBS, needs={s.kind + ":" + s.label: s for s in stages}))
    return stages


def evaluation_settings(world: World) -> dict:
    from mops.eval.perplexity import RESPONSE_MAX_LEN
    from mops.pipeline.harness import tasks_sha256

    e, recipe = world.recipe.evaluate, world.recipe
    return {
        "wikitext": {"seq_len": e.wikitext.seq_len, "windows": e.wikitext.windows, "sha256": wikitext_sha256()},
        "response": {"examples": e.response.examples, "max_len": RESPONSE_MAX_LEN, "sources": recipe.data.sources,
                     "limit_per_source": recipe.data.limit_per_source, "records_sha256": world.records_sha256},
        "tasks": [[t.name, t.lm_eval_limit] for t in e.tasks], "num_fewshot": e.num_fewshot,
        "tasks_sha256": tasks_sha256() if e.tasks else None,
        "batch_size": e.batch_size, "resamples": e.resamples, "seed": recipe.seed,
    }


def recovery_settings(world: World, method, mixture) -> dict:
    recipe, recover = world.recipe, world.recipe.recover
    budget = recover.budget.budget()
    return {
        "method": method.name,
        "mixture": None if mixture is None else asdict(mixture),
        "budget": {"mops": asdict(budget.mops), "lora_rank": budget.lora_rank},
        "training": asdict(recover.training_config(recipe.seed, method.training_overrides())),
        "data": {"sources": recipe.data.sources, "limit_per_source": recipe.data.limit_per_source,
                 "records_sha256": world.records_sha256, "seed": recipe.seed},
        "snapshot_examples": recover.snapshot_examples,
    }


def describe(stages: list[Stage], store: Store) -> list[tuple[Stage, str]]:
    """What a run would do with each stage: reuse it, resume it from a checkpoint, or run it."""
    out = []
    for stage in stages:
        if store.done(stage):
            what = "reuse"
        elif stage.kind == "recover" and (store.checkpoint(stage) / "trainer_state.json").is_file():
            step = json.loads((store.checkpoint(stage) / "trainer_state.json").read_text())["step"]
            what = f"resume at step {step}"
        else:
            what = "run"
        out.append((stage, what))
    return out


def plan_text(described: list[tuple[Stage, str]], store: Store) -> str:
    width = max(len(s.label) for s, _ in described)
    lines = [f"plan for {store.out} ({len(described)} stages):"]
    for stage, what in described:
        lines.append(f"  {stage.kind:<8} {stage.label:<{width}}  {stage.short}  {what}")
    runs = sum(what != "reuse" for _, what in described)
    lines.append(f"{runs} to run, {len(described) - runs} reused")
    return "\n".join(lines)
