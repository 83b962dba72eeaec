"""The eval stage: one model (dense, pruned, or a pruned model with a recovery method) scored
on WikiText-2 and the held-out response examples, each with a 95% bootstrap interval, and
on the recipe's lm-eval tasks with lm-eval's stderr.

``eval.json`` keeps every per-window and per-example NLL, so the report can compare any
two models on the same examples (paired bootstrap) without scoring anything again.
"""

from __future__ import annotations

import gc
import json
import time

EVAL_JSON = "eval.json"


def load_scored(stage, job):
    """(model to score, tokenizer, how lm-eval gets it, measured sparsity of the base)."""
    from mops.adapter import load
    from mops.models import load_model
    from mops.pipeline import prune_stage, recover_stage
    from mops.pipeline.measures import measured_sparsity

    recipe = job.world.recipe
    kind = stage.spec["model"]
    base = job.world.checkpoint if kind == "dense" else str(prune_stage.checkpoint(job, stage.needs["pruned"]))
    model, tokenizer = load_model(base, dtype=recipe.dtype, device=recipe.device)
    sparsity = measured_sparsity(model)  # of the base: LoRA stays unmerged, prompts add no weights
    harness_args = {"pretrained": base, "batch_size": recipe.evaluate.batch_size, "dtype": recipe.dtype,
                    "device": recipe.device}
    if kind != "recovered":
        return model, tokenizer, harness_args, sparsity
    folder = job.store.folder(stage.needs["recovered"])
    lora_file = folder / recover_stage.LORA_FILE
    if lora_file.is_file():
        from safetensors.torch import load_file

        from mops.lora import add_lora

        layout = json.loads((folder / recover_stage.ADAPTER / "mops_config.json").read_text())["lora"]
        add_lora(model, layout["rank"], targets=layout["targets"],
                 layers=None if layout["layers"] == "all" else layout["layers"])
        missing, unexpected = model.load_state_dict(load_file(lora_file), strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise RuntimeError(f"{lora_file}: LoRA tensors do not match the layout {layout}")
        model.eval()
        return model, tokenizer, (model, tokenizer, recipe.evaluate.batch_size), sparsity
    adapter = folder / recover_stage.ADAPTER
    return load(model, adapter), tokenizer, harness_args | {"adapter": str(adapter)}, sparsity


def run(stage, job, tmp) -> dict:
    from mops.eval.perplexity import response_perplexity, wikitext_perplexity
    from mops.pipeline.harness import run_tasks, scores
    from mops.pipeline.measures import ppl_interval

    recipe, e = job.world.recipe, job.world.recipe.evaluate
    started = time.perf_counter()
    seconds = {}  # where an eval's time goes, part by part (the main job has 15 minutes in all)

    def lap(part: str) -> None:
        seconds[part] = time.perf_counter() - started - sum(seconds.values())

    model, tokenizer, harness, sparsity = load_scored(stage, job)
    lap("load")
    wiki = wikitext_perplexity(model, tokenizer, e.wikitext.seq_len, e.wikitext.windows, progress=not job.quiet)
    wiki |= ppl_interval({"nll": wiki["per_window"], "tokens": [wiki["seq_len"] - 1] * wiki["windows"]},
                         e.resamples, recipe.seed)
    lap("wikitext2")
    test = job.world.test_records(e.response.examples)
    response = response_perplexity(model, tokenizer, test, progress=not job.quiet, lower=job.lower)
    response |= ppl_interval(response["per_example"], e.resamples, recipe.seed)
    lap("response")
    result = {"label": stage.label, "model": stage.spec["model"], "sparsity": sparsity, "wikitext2": wiki,
              "response": response, "lm_eval": [], "lm_eval_version": None}
    if isinstance(harness, dict):  # lm-eval loads its own copy: free this one first (a 7B model twice is too much)
        del model
        gc.collect()
    if e.tasks:
        from importlib import metadata

        from lm_eval.utils import handle_non_serializable

        tasks = [(t.name, t.lm_eval_limit) for t in e.tasks]
        runs = run_tasks(harness, tasks, e.num_fewshot, quiet=job.quiet)
        result["lm_eval"] = scores(runs, [name for name, _ in tasks])
        result["lm_eval_version"] = metadata.version("lm_eval")
        for i, r in enumerate(runs):  # lm-eval's own results files, as mops-eval keeps them
            (tmp / f"lm_eval.{i + 1}.json").write_text(json.dumps(r, indent=2, default=handle_non_serializable) + "\n")
        lap("lm_eval")
    result["seconds"] = time.perf_counter() - started
    result["seconds_by_part"] = seconds
    (tmp / EVAL_JSON).write_text(json.dumps(result) + "\n")
    return {"wikitext2_ppl": wiki["ppl"], "response_ppl": response["ppl"],
            "lm_eval": {f"{s['task']} {s['metric']}": s["value"] for s in result["lm_eval"]}}


def read(job, stage) -> dict:
    return json.loads((job.store.folder(stage) / EVAL_JSON).read_text())
