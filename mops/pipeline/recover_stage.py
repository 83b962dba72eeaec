"""The recover stage: one method of :mod:`mops.baselines` trained on one pruned model by
:func:`mops.train.recover`, as ``mops-recover`` and the recovery study train it.

The adapter (``adapter/``: PEFT-style config, tensors, ``history.json``, gate heatmap) is
written by :func:`mops.adapter.save_adapter`; a LoRA method also leaves ``lora.safetensors``,
its tensors by name, since they live inside the base. Training checkpoints go beside the
stage's folder, so a killed run continues from the last one, exactly.
"""

from __future__ import annotations

import json
import time

LORA_FILE = "lora.safetensors"
ADAPTER = "adapter"


def run(stage, job, tmp) -> dict:
    import torch
    from safetensors.torch import save_file

    from mops.adapter import save_adapter, weights_hash
    from mops.baselines import MethodSpec, prepare, trainable_count
    from mops.distill import TeacherTargets
    from mops.lora import lora_state
    from mops.models import load_model
    from mops.pipeline import prune_stage
    from mops.train import recover

    world, recipe = job.world, job.world.recipe
    method = stage.spec["method"]
    base_dir = prune_stage.checkpoint(job, stage.needs["pruned"])
    model, tokenizer = load_model(base_dir, dtype=recipe.dtype, device=recipe.device)
    base_hash = weights_hash(model)  # before LoRA puts tensors inside it
    spec = MethodSpec(method.name, method.mixture_overrides(), method.training_overrides(), method.title)
    torch.manual_seed(recipe.seed)  # LoRA's A matrices are drawn from the global generator: same seed, same start
    mixture, extra, about = prepare(spec, model, recipe.recover.budget.budget())
    config = recipe.recover.training_config(recipe.seed, method.training_overrides())
    # distillation's teacher is the recipe's dense model, the one the stage's base was pruned from
    teacher = TeacherTargets(load_model(world.checkpoint, dtype=recipe.dtype, device=recipe.device)[0]) \
        if config.distill else None
    n = recipe.recover.snapshot_examples
    snapshots = world.test_records(n) if n else []
    checkpoint = job.store.checkpoint(stage)
    resume = (checkpoint / "trainer_state.json").is_file()
    resumed_from = json.loads((checkpoint / "trainer_state.json").read_text())["step"] if resume else None
    logger = job.step_logger(stage)
    started = time.perf_counter()
    try:
        lm, history = recover(model, tokenizer, world.splits, mixture, config, checkpoint_dir=checkpoint, resume=resume,
                              progress=not job.quiet, on_step=logger, device=recipe.device,
                              snapshot_records=snapshots, extra_params=extra, teacher=teacher, lower=job.lower)
    finally:
        if logger:
            logger.finish()
    seconds = time.perf_counter() - started
    if not extra and weights_hash(model) != base_hash:  # cannot happen unless a bug trains the base
        raise RuntimeError("the base model's weights changed during training")
    save_adapter(lm, tmp / ADAPTER, base_name=str(base_dir), base_hash=base_hash, history=history, force=True,
                 extra={"method": method.name, "label": method.title, "data": recipe.data.sources,
                        "limit_per_source": recipe.data.limit_per_source, "training": stage.settings["training"],
                        **about})
    if extra:
        save_file(lora_state(model), tmp / LORA_FILE)
    val = history.get("validation") or []
    return {"method": method.name, "trainable_params": trainable_count(lm, extra), "train_seconds": seconds,
            "resumed_from_step": resumed_from, "steps": config.steps, "lora": about.get("lora"),
            "mixed_precision": history["mixed_precision"],
            "distill": config.distill,
            "validation": [{"step": v["step"], "ppl": v["ppl"]} for v in val],
            "gate_heatmap": (tmp / ADAPTER / "gate_heatmap.png").is_file()}
