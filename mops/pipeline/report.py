"""The report stage: ``report.md``, a self-contained ``report.html`` and ``report.json``.

One table with every model (dense, each pruned setting, each recovery method): measured
sparsity, WikiText-2 and held-out response perplexity with 95% bootstrap intervals, each
model against the one it came from (paired bootstrap on the same examples), the share of
the pruning damage recovered, lm-eval scores with lm-eval's stderr (marked where a
difference is within it), trainable parameters and training seconds; then the recovery
chart, per-category bars, training curves, gate heatmaps, the recipe, library versions and
the command that reproduces each stage. Everything is read from the finished stages.
"""

from __future__ import annotations

import json
import shutil
import sys

from mops.pipeline import charts, commands, eval_stage, prune_stage, recover_stage
from mops.eval.bootstrap import recovered_share
from mops.pipeline.measures import within_stderr
from mops.pipeline.table import APPROX, table_cells


def rows(job, stages) -> list[dict]:
    """One row per model, in table order, with everything the table and charts show."""
    from mops.eval.bootstrap import paired_bootstrap

    by_label = {s.label: s for s in stages if s.kind == "eval"}
    evals = {label: eval_stage.read(job, s) for label, s in by_label.items()}
    recovers = {s.label: job.store.record(s) for s in stages if s.kind == "recover"}
    resamples, seed = job.world.recipe.evaluate.resamples, job.world.recipe.seed

    def row(label, kind, setting=None, method=None, reference=None):
        e = evals[label]
        out = {"label": label, "kind": kind, "setting": setting, "method": method, "sparsity": e["sparsity"]["overall"],
               "wikitext2": {k: e["wikitext2"][k] for k in ("ppl", "low", "high", "windows", "seq_len", "protocol")},
               "response": {k: e["response"][k] for k in ("ppl", "low", "high", "examples", "tokens", "per_category")},
               "lm_eval": e["lm_eval"], "lm_eval_version": e["lm_eval_version"], "reference": reference,
               "stage_key": by_label[label].key}
        if reference:
            ref = evals[reference]
            out["vs_reference"] = paired_bootstrap(e["response"]["per_example"], ref["response"]["per_example"],
                                                   resamples=resamples, seed=seed)
            for score, ref_score in zip(out["lm_eval"], ref["lm_eval"]):
                score["within_stderr"] = within_stderr(score["value"], score["stderr"], ref_score["value"],
                                                       ref_score["stderr"])
        if kind == "recovered":
            r = recovers[label]["result"]
            out["recovered_share"] = recovered_share(evals["dense"]["response"]["ppl"],
                                                     evals[setting]["response"]["ppl"], e["response"]["ppl"])
            out |= {"trainable_params": r["trainable_params"], "train_seconds": r["train_seconds"],
                    "resumed_from_step": r["resumed_from_step"], "mixed_precision": r.get("mixed_precision", "no"),
                    "distill": r.get("distill", 0.0)}
        return out

    table = [row("dense", "dense")]
    for entry in job.world.recipe.prune:
        table.append(row(entry.name, "pruned", setting=entry.name, reference="dense"))
        for method in (job.world.recipe.recover.methods if job.world.recipe.recover else []):
            if method.name != "none":
                table.append(row(f"{entry.name}/{method.title}", "recovered", entry.name, method.title, entry.name))
    return table


# ----------------------------------------------------------------------------- text


def stderr_summary(table: list[dict]) -> list[str]:
    """Per lm-eval column: which comparisons exceed lm-eval's stderr and which do not."""
    lines = []
    for i, s in enumerate(table[0]["lm_eval"]):
        apart = [r["label"] for r in table if r.get("reference") and r["lm_eval"][i].get("within_stderr") is False]
        within = [r["label"] for r in table if r.get("reference") and r["lm_eval"][i].get("within_stderr")]
        col = f"{s['task']} {s['metric']} ({s['n']} examples)"
        if not within and not apart:
            lines.append(f"{col}: lm-eval gives no stderr for this metric; differences are not tested.")
        elif within and not apart:
            lines.append(f"{col}: every difference is within lm-eval's stderr; this column tells no model apart.")
        else:
            lines.append(f"{col}: beyond the stderr: {', '.join(apart) or 'none'}; "
                         f"within it: {', '.join(within) or 'none'}.")
    return lines


def notes(job, table: list[dict]) -> list[str]:
    e, recipe = job.world.recipe.evaluate, job.world.recipe
    dense = table[0]
    out = [
        f"WikiText-2 ppl: {dense['wikitext2']['protocol']}. Response ppl: the response tokens of "
        f"{dense['response']['examples']} held-out test examples of {'+'.join(recipe.data.sources)} "
        f"({dense['response']['tokens']} tokens; the split recovery never trains on, seed {recipe.seed}), token-weighted.",
        f"[95%]: bootstrap intervals over windows / examples ({e.resamples} resamples). vs. reference: response ppl "
        "against the model it came from (pruned: dense; recovered: its pruned model), paired bootstrap on the same "
        "examples; an interval holding 0 is a tie. Damage recovered: (log ppl_pruned - log ppl) / (log ppl_pruned - "
        "log ppl_dense) on response ppl.",
    ]
    if table[0]["lm_eval"]:
        limits = ", ".join(f"{t.name} {'all' if t.lm_eval_limit is None else t.lm_eval_limit}" for t in e.tasks)
        out.append(f"lm-eval {dense['lm_eval_version']} scores ± lm-eval's stderr; limit per (sub)task: {limits}; "
                   f"few-shot: {'task defaults' if e.num_fewshot is None else e.num_fewshot}. {APPROX}: within the "
                   "combined stderr (sqrt(se1² + se2²)) of the reference row, not a difference to trust.")
        out += stderr_summary(table)
    if recipe.recover and any(m.name == "none" for m in recipe.recover.methods):
        out.append("Method none (the pruned model as is) is each pruned row.")
    lowered = sorted({f"{r['label']} ({r['mixed_precision']})" for r in table if r.get("mixed_precision", "no") != "no"})
    if lowered:
        out.append(f"Trained under mixed-precision autocast: {', '.join(lowered)}; the frozen lower layers and every "
                   "score in float32.")
    distilled = sorted({f"{r['label']} ({r['distill']:g})" for r in table if r.get("distill")})
    if distilled:
        out.append(f"Trained toward the dense model too (distillation, the KL's weight in the loss): {', '.join(distilled)}.")
    if any(r.get("resumed_from_step") is not None for r in table):
        out.append("train s of a resumed stage counts the run that finished it, not the killed ones.")
    return out


def markdown(job, table, figures: dict[str, str], reproduce: list[tuple[str, str]], versions: dict) -> str:
    head, body = table_cells(table)
    lines = [f"# mops-run report: {job.world.recipe.model}", "",
             f"Recipe `{job.recipe_path}`, output `{job.store.out}`.", "",
             "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    lines += [""] + [f"- {n}" for n in notes(job, table)] + [""]
    for title, path in figures.items():
        lines += [f"## {title}", "", f"![{title}]({path})", ""]
    lines += ["## Recipe", "", "```yaml", job.recipe_text.rstrip(), "```", "",
              "## Reproduce", "", f"Everything: `mops-run {job.recipe_path}` (finished stages are reused). "
              "Each stage alone:", "", "```bash"]
    for label, command in reproduce:
        lines += [f"# {label}", command]
    lines += ["```", "", "## Library versions", "",
              ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + "", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the stage


def run(stage, job, tmp) -> dict:
    from mops.pipeline.html_page import render_html

    stages = [s for s in stage.needs.values()]
    table = rows(job, stages)
    figures_dir = tmp / "figures"
    figures_dir.mkdir()
    figures = {}
    if any(r["kind"] == "recovered" for r in table):
        charts.recovery_chart(table, figures_dir / "recovery.png")
        figures["Recovery"] = figures_dir / "recovery.png"
    charts.category_chart(table, figures_dir / "categories.png")
    figures["Held-out response perplexity per category"] = figures_dir / "categories.png"
    histories = {}
    for s in stages:
        if s.kind == "recover":
            history = json.loads((job.store.folder(s) / recover_stage.ADAPTER / "history.json").read_text())
            histories[s.label] = history
            heatmap = job.store.folder(s) / recover_stage.ADAPTER / "gate_heatmap.png"
            if heatmap.is_file():
                name = s.label.replace("/", "_") + "_gates.png"
                shutil.copyfile(heatmap, figures_dir / name)
                figures[f"Gate weights per category: {s.label}"] = figures_dir / name
    if histories:
        charts.curves_chart(histories, figures_dir / "curves.png")
        figures["Training curves"] = figures_dir / "curves.png"
    reproduce = reproduce_lines(job, stages)
    versions = dict(stage.versions)
    for s in stages:
        versions |= s.versions
    versions |= {"python": sys.version.split()[0]}
    final = job.store.folder(stage)  # where the figures will be once this folder is renamed into place
    md_paths = {t: str((final / "figures" / p.name).relative_to(job.store.out)) for t, p in figures.items()}
    (tmp / "report.md").write_text(markdown(job, table, md_paths, reproduce, versions))
    (tmp / "report.html").write_text(render_html(job, table, figures, reproduce, versions, notes(job, table)))
    (tmp / "report.json").write_text(json.dumps({"rows": table, "versions": versions}, indent=2) + "\n")
    return {"rows": len(table), "figures": len(figures)}


def reproduce_lines(job, stages) -> list[tuple[str, str]]:
    out = []
    for s in stages:
        if s.kind == "prune":
            out.append((f"prune {s.label}", commands.prune_command(s)))
        elif s.kind == "recover":
            base = prune_stage.checkpoint(job, s.needs["pruned"])
            out.append((f"recover {s.label}", commands.recover_command(s, base, job.world.checkpoint)))
        elif s.kind == "eval":
            base = job.world.checkpoint if s.spec["model"] == "dense" else prune_stage.checkpoint(job, s.needs["pruned"])
            recovered = s.needs.get("recovered")
            adapter = job.store.folder(recovered) / recover_stage.ADAPTER if recovered else None
            lora = bool(recovered) and recovered.settings["method"] in ("lora", "lora-equal")
            out.append((f"eval {s.label}", commands.eval_command(s, base, adapter, lora)))
    return out
