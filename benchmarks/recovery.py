"""The recovery study: every method of ``mops.baselines`` at every pruning setting, with intervals.

For each setting the dense model is pruned once (SparseGPT by default; the checkpoint is
cached under ``--work-dir``), then every method trains on it with the same data, steps,
batch and seed, once per ``--seeds`` entry, and is scored on the same held-out examples
(the whole split by default). The split and the pruning use ``--split-seed``, so the
seeds differ only in training (initialisation, batch order, router noise). Each finished
cell is saved at once to ``benchmarks/results/recovery_<name>.json`` (with the Markdown
table, the chart and the gate heatmaps redrawn from it), so a rerun skips finished cells
and a grid can be completed over several runs, several at a time.

Every "MoPs vs a baseline" figure is ``ppl_mops / ppl_baseline - 1`` with a paired
bootstrap 95% interval over the test examples (``mops.eval.bootstrap``); with several
seeds, each example's NLL is first averaged over them.

    python benchmarks/recovery.py                                  # the committed CPU table
    python benchmarks/recovery.py --settings 3:4 --methods prompt-equal mops
    python benchmarks/recovery.py --name tune --score-split validation --seeds 0 --settings 3:4 \\
        --methods prompt-equal prompt-equal:lr=1.0 mops mops:top_k=1,router_noise=1.0    # choices, on validation
    python benchmarks/recovery.py --name transfer --score-data alpaca-eval gsm8k --settings 2:4 \\
        --methods none mops prompt-equal    # scored on instruction data no method trained on
    python benchmarks/recovery.py --model path/to/Llama-2-7b-hf --name llama2-7b --device cuda \\
        --steps 1000 --batch-size 8 --max-len 512 --calib-samples 128 --seq-len 2048

Methods are ``NAME[:key=value,...]`` (see ``mops.baselines``). The MoPs configuration and
its learning rates are ``mops-recover``'s defaults, chosen on the validation split (the
README lists what was tried); ``--experts``, ``--prompt-len`` and the layers set the budget.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mops.baselines import METHODS, SAME_BUDGET, Budget, parse_method, prepare, trainable_count
from mops.cli_common import run_cli, setup_logging
from mops.data import load_records, split_records, stratified_subset
from mops.distill import TeacherTargets
from mops.errors import UserError
from mops.eval.bootstrap import format_delta, mean_over_seeds, paired_bootstrap, perplexity, recovered_share, verdict
from mops.eval.perplexity import RESPONSE_MAX_LEN, require_same_model, response_perplexity
from mops.gate_analysis import draw_heatmaps
from mops.lower_cache import LowerStates
from mops.mixture import MixtureConfig
from mops.models import DEFAULT_MODEL, load_model
from mops.outputs import SharedResults, library_versions
from mops.prune import PruneConfig
from mops.prune.config import MISSION_SETTINGS
from mops.prune.core import prune_to_folder
from mops.train import TrainConfig, recover

RESULTS = Path(__file__).resolve().parent / "results"
# The table's settings, the aggressive ones first: they are where the target is measured.
DEFAULT_SETTINGS = ("3:4", "2:4", "0.85", "7:8")
DEFAULT_METHODS = ("none", "prompt", "prompt-equal", "uniform", "attempt", "lora", "lora-equal", "mops")


def parse_args(argv):
    m, t = MixtureConfig(), TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--name", default="embedded", help="results stem: recovery_<name>.* (default: embedded)")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                   help=f"sparsities (0.75) or N:M patterns (default: {' '.join(DEFAULT_SETTINGS)}; the mission's "
                        f"seven are {' '.join(MISSION_SETTINGS)})")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="NAME[:key=value,...]")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds (default: 0 1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the data split and the pruning calibration")
    p.add_argument("--prune-method", default="sparsegpt")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256, help="calibration sequence length (default: 256, for a CPU)")
    p.add_argument("--data", nargs="+", default=["dolly", "natural-instructions"])
    p.add_argument("--limit-per-source", type=int, default=None)
    p.add_argument("--experts", type=int, default=m.n_experts)
    p.add_argument("--prompt-len", type=int, default=m.prompt_len)
    p.add_argument("--gate-layer", type=int, default=None)
    p.add_argument("--inject-layer", type=int, default=None)
    p.add_argument("--gate-hidden", type=int, default=m.gate_hidden, help="the MoPs gate's width, part of the budget "
                   f"(0: a linear router) (default: {m.gate_hidden})")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256, help="training tokens per example")
    p.add_argument("--lr", type=float, default=t.lr, help=f"prompts' learning rate (default: {t.lr})")
    p.add_argument("--gate-lr", type=float, default=t.gate_lr, help=f"the gate's (default: {t.gate_lr})")
    p.add_argument("--lr-warmup", type=int, default=t.lr_warmup, help=f"steps of linear warmup of every rate "
                   f"(default: {t.lr_warmup})")
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--gate-pretrain-steps", type=int, default=t.gate_pretrain_steps)
    p.add_argument("--gate-pretrain-examples", type=int, default=256,
                   help="train examples the gate is pretrained on (default: 256)")
    p.add_argument("--test-examples", type=int, default=None,
                   help="held-out examples scored, stratified (default: the whole split)")
    p.add_argument("--score-split", default="test", choices=("test", "validation"),
                   help="the held-out split scored: tune on validation, report on test (default: test)")
    p.add_argument("--score-data", nargs="+", default=None, metavar="SOURCE",
                   help="score on these sources instead of a split of --data: instruction data no method trained "
                        "on (e.g. alpaca-eval gsm8k), a seeded, category-stratified --score-per-source of each")
    p.add_argument("--score-per-source", type=int, default=150,
                   help="examples of each --score-data source (default: 150)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, all cores)")
    p.add_argument("--work-dir", default="runs/recovery", help="where pruned checkpoints are cached")
    p.add_argument("--out-dir", default=str(RESULTS))
    return p.parse_args(argv)


def protocol(args) -> dict:
    """Everything that fixes a cell's number: a results file only grows under the same values."""
    keys = ("model", "prune_method", "calib_samples", "seq_len", "data", "limit_per_source", "split_seed", "experts",
            "prompt_len", "gate_layer", "inject_layer", "gate_hidden", "lora_rank", "steps", "batch_size", "max_len", "lr", "gate_lr",
            "lr_warmup", "lora_lr", "gate_pretrain_steps", "gate_pretrain_examples", "test_examples", "score_split")
    score_data = args.score_data and {"sources": args.score_data, "per_source": args.score_per_source}
    # the defaults of the MoPs configuration are part of what "mops" means
    return {k: getattr(args, k) for k in keys} | {"score_data": score_data, "test_max_len": RESPONSE_MAX_LEN,
                                                 "mops": asdict(MixtureConfig()), "training": _training_defaults()}


#: study options added after files were made, at the value that trains as before they existed
NEUTRAL = {"lr_warmup": 0, "score_data": None}


def scored_on(p: dict) -> str:
    """What a file's cells were scored on, in words: a split of the training sources, or others."""
    data = p.get("score_data")
    if not data:
        return p["score_split"]
    return f"{' + '.join(data['sources'])} (never trained on; {data['per_source']} of each)"


def same_protocol(saved: dict, now: dict) -> bool:
    """Equal, except that a default added to the code since (a new option of MixtureConfig or
    TrainConfig, at a value that changes nothing it did before) is not a difference."""
    now = {k: v for k, v in now.items() if k in saved or k not in NEUTRAL or v != NEUTRAL[k]}
    for key in ("mops", "training"):
        now[key] = {k: v for k, v in now[key].items() if k in saved.get(key, {})}
    return saved == now


def _training_defaults() -> dict:
    t = asdict(TrainConfig())
    return {k: t[k] for k in ("warm_steps", "balance", "gate_pretrain_lr")}


def require_unseen(scored: list, trained: list, what: str) -> None:
    """Scored examples must not be training data: the same instruction, context and response
    in both is refused in one line, whatever the sources are called."""
    seen = {(r.instruction, r.context, r.response) for r in trained}
    if shared := sum((r.instruction, r.context, r.response) in seen for r in scored):
        raise UserError(f"{what}: {shared} of its {len(scored)} examples are also in --data (the same instruction, "
                        "context and response); score on data the methods do not train on")


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(quiet=True)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: expected a positive whole number")
        torch.set_num_threads(args.threads)
    specs = [parse_method(m) for m in args.methods]
    if args.test_examples is not None and args.test_examples < 1:
        raise UserError(f"--test-examples {args.test_examples}: expected a positive whole number")
    if args.score_per_source < 1:
        raise UserError(f"--score-per-source {args.score_per_source}: expected a positive whole number")
    for spec in specs:  # a bad --steps, --lr, ... is refused now, not after pruning and the first cells
        train_config(args, spec, seed=0).validate()
    prune_configs = {s: PruneConfig(method=args.prune_method, calib_samples=args.calib_samples, seq_len=args.seq_len,
                                    seed=args.split_seed, **({"pattern": s} if ":" in s else {"sparsity": float(s)}))
                     for s in args.settings}
    mops = MixtureConfig(n_experts=args.experts, prompt_len=args.prompt_len, gate_layer=args.gate_layer,
                         inject_layer=args.inject_layer, gate_hidden=args.gate_hidden)
    budget = Budget(mops, args.lora_rank)
    out_json = Path(args.out_dir) / f"recovery_{args.name}.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"cells": {}}
    if not same_protocol(results.get("protocol", protocol(args)), protocol(args)):
        raise UserError(f"{out_json} was made with other settings; use --name for a new study or delete it")
    results.update(protocol=protocol(args), versions=library_versions())

    records = load_records(args.data, args.limit_per_source, args.split_seed)
    splits = split_records(records, args.split_seed)
    held = (load_records(args.score_data, args.score_per_source, args.split_seed) if args.score_data
            else splits[args.score_split])
    if args.score_data:  # by content, so a --data source given again as a file is caught too
        require_unseen(held, records, what=f"--score-data {' '.join(args.score_data)}")
    test = stratified_subset(held, args.test_examples or len(held), args.split_seed)
    results["test_sources"] = [r.source for r in test]  # per_example's order: the by-source table

    shared = SharedResults(out_json, results, "cells", render)

    def save(key: str, cell: dict) -> None:
        shared.save(key, cell)
        print(f"{key:>40}  ppl {cell['ppl']:9.2f}  params {cell['trainable_params']:>9,}  {cell['seconds']:6.0f}s",
              flush=True)

    if "dense" not in results["cells"]:
        started = time.perf_counter()
        model, tok = load_model(args.model, device=args.device)
        save("dense", {"setting": "dense", "method": "dense", **cell_scores(response_perplexity(model, tok, test, progress=False)),
                       "trainable_params": 0, "seconds": time.perf_counter() - started})
    teacher = None  # the dense model's targets, loaded when a method distills
    for setting, prune_config in prune_configs.items():
        # the pruned model's score first (every share needs it), then seed by seed: a partial
        # run has every method of its first seed
        todo = [(parse_method("none"), None)] if cell_key(setting, "none", None) not in results["cells"] else []
        todo += [(s, seed) for seed in args.seeds for s in specs if s.name != "none"
                 if cell_key(setting, s.spec, seed) not in results["cells"]]
        if not todo:
            continue
        pruned_dir = Path(args.work_dir) / (f"{Path(args.model).name}-{args.prune_method}-"
                                            f"{prune_config.setting.replace(':', 'of')}-calib{args.calib_samples}x"
                                            f"{args.seq_len}-seed{args.split_seed}")
        if not (pruned_dir / "sparsity_report.json").is_file():
            model, tok = load_model(args.model, device=args.device)
            prune_to_folder(model, tok, prune_config, pruned_dir, model_name=args.model, force=True, quiet=True)
        sparsity = json.loads((pruned_dir / "sparsity_report.json").read_text())["overall_sparsity"]
        pruned_cell = results["cells"].get(cell_key(setting, "none", None))
        if pruned_cell:  # a checkpoint pruned again elsewhere differs: its cells would not pair with the file's
            require_same_model(*load_model(pruned_dir, device=args.device), test, pruned_cell["per_example"],
                               pruned_dir, out_json)
        lower = LowerStates()  # one store per pruned model: its methods share the frozen layers below l
        if teacher is None and any(s.training.get("distill") for s, _ in todo):
            teacher = TeacherTargets(load_model(args.model, device=args.device)[0])  # one for every setting
        for spec, seed in todo:
            key = cell_key(setting, spec.spec, seed)
            if shared.has(key):
                continue
            started = time.perf_counter()
            model, tok = load_model(pruned_dir, device=args.device)
            cell = {"setting": setting, "method": spec.spec, "seed": seed, "sparsity": sparsity}
            if spec.name == "none":
                cell.update(cell_scores(response_perplexity(model, tok, test, progress=False)), trainable_params=0,
                            positions_added=0)
            else:
                cell.update(train_cell(spec, seed, model, tok, splits, test, budget, args, lower, teacher))
            cell["seconds"] = time.perf_counter() - started
            save(key, cell)
    shared.redraw()  # with every run's cells (and this run's test sources)


def cell_key(setting: str, spec: str, seed: int | None) -> str:
    return f"{setting}/{spec}" + ("" if seed is None else f"/seed{seed}")


def train_config(args, spec, seed: int) -> TrainConfig:
    """What a cell trains with: the study's flags, then the method's overrides."""
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lora_lr=args.lora_lr,
                         gate_lr=args.gate_lr, lr_warmup=args.lr_warmup, gate_pretrain_steps=args.gate_pretrain_steps,
                         gate_pretrain_examples=args.gate_pretrain_examples, max_len=args.max_len,
                         eval_every=args.steps, checkpoint_every=args.steps, seed=seed)
    return replace(config, **spec.training)


def train_cell(spec, seed: int, model, tok, splits, test, budget: Budget, args, lower: LowerStates,
               teacher: TeacherTargets | None = None) -> dict:
    torch.manual_seed(seed)  # LoRA's A starts random: from the seed, not from whatever ran before
    mixture, extra, about = prepare(spec, model, budget)
    config = train_config(args, spec, seed)
    started = time.perf_counter()
    # only the train split goes in: the study scores its own held-out set, so the trainer's
    # validation passes would be time spent on numbers nobody reads
    lm, history = recover(model, tok, {"train": splits["train"]}, mixture, config, progress=False,
                          device=args.device, snapshot_records=test, extra_params=extra, lower=lower, teacher=teacher)
    train_seconds = time.perf_counter() - started
    return {
        **cell_scores(response_perplexity(lm, tok, test, progress=False, lower=lower)),
        "trainable_params": trainable_count(lm, extra),
        "train_seconds": train_seconds,
        "mixture": asdict(lm.mixture.config),
        "training": asdict(config),
        **about,
        "positions_added": lm.mixture.prompt_positions,
        "train_loss": history["train_loss"],
        "gate_snapshots": history.get("gate_snapshots"),
    }


def cell_scores(result: dict) -> dict:
    return {"ppl": result["ppl"], "per_category": result["per_category"], "test_tokens": result["tokens"],
            "test_examples": result["examples"], "per_example": result["per_example"]}


# ----------------------------------------------------------------------------- outputs


def seed_runs(cells: dict, setting: str, spec: str) -> list[dict]:
    """The cells of one method at one setting, one per seed (``none`` has one, unseeded)."""
    prefix = f"{setting}/{spec}"
    runs = [c for k, c in cells.items() if k == prefix or re.fullmatch(re.escape(prefix) + r"/seed\d+", k)]
    return sorted(runs, key=lambda c: -1 if c.get("seed") is None else c["seed"])  # seed 10 after seed 2


def summary(cells: dict, setting: str, spec: str, seeds: set | None = None) -> dict | None:
    """One method's cells at one setting, each example's NLL averaged over its seeds (or over
    ``seeds`` alone)."""
    runs = [r for r in seed_runs(cells, setting, spec) if seeds is None or r.get("seed") in seeds]
    if not runs:
        return None
    per_example = mean_over_seeds([r["per_example"] for r in runs])
    return {"ppl": perplexity(per_example), "per_example": per_example, "seeds": [r.get("seed") for r in runs],
            "params": runs[0]["trainable_params"], "runs": runs}


def paired(cells: dict, setting: str, a: str, b: str) -> tuple[dict, dict] | None:
    """Two methods' summaries over the training seeds both ran (``none``, unseeded, pairs with
    any): averaging one over a seed the other never ran would credit it with that seed's luck."""
    seeds = [{r.get("seed") for r in seed_runs(cells, setting, m)} for m in (a, b)]
    common = None if None in seeds[0] | seeds[1] else seeds[0] & seeds[1]
    ours, theirs = summary(cells, setting, a, common), summary(cells, setting, b, common)
    if not (ours and theirs) or ours["per_example"]["tokens"] != theirs["per_example"]["tokens"]:
        return None
    return ours, theirs


def _settings_and_methods(cells: dict):
    settings, methods = [], []
    for cell in cells.values():
        if cell["setting"] != "dense":
            settings += [cell["setting"]] if cell["setting"] not in settings else []
            methods += [cell["method"]] if cell["method"] not in methods else []
    methods.sort(key=lambda m: (METHODS.index(parse_method(m).name), m))
    settings.sort(key=sparsity_order)
    return settings, methods


def sparsity_order(setting: str) -> tuple[float, bool]:
    """Settings from the mildest to the most aggressive: 2:4, 4:8, 0.75, 3:4, 0.85, 7:8, 0.90."""
    if ":" in setting:
        n, m = setting.split(":")
        return int(n) / int(m), True
    return float(setting), False


def comparisons(cells: dict, setting: str, methods: list[str]) -> list[dict]:
    """Every MoPs spec against the best spec (lowest perplexity) of each baseline kind: the
    paper's prompt, the equal-budget ones, and LoRA r = 8 (about 100x the parameters: what
    a larger adapter buys, for reference)."""
    out = []
    for spec in (m for m in methods if parse_method(m).name == "mops"):
        for kind in ("prompt", *SAME_BUDGET, "lora"):
            # each variant of the kind over the seeds it shares with ours; the best of them on those
            pairs = {m: paired(cells, setting, spec, m) for m in methods if parse_method(m).name == kind}
            pairs = {m: pair for m, pair in pairs.items() if pair}
            if not pairs:
                continue
            best = min(pairs, key=lambda m: pairs[m][1]["ppl"])
            pair = pairs[best]
            result = paired_bootstrap(pair[0]["per_example"], pair[1]["per_example"])
            out.append({"mops": spec, "baseline": best, "kind": kind, **result, "verdict": verdict(result),
                        "seeds": pair[0]["seeds"], "per_seed": per_seed(pair[0]["runs"], pair[1]["runs"])})
    return out


def extends(spec: str, methods: list[str]) -> list[str]:
    """The variants ``spec`` adds overrides to: the same method with a proper subset of its
    overrides, at the same values (``mops:combine=attention,gate_hidden=0`` for
    ``mops:combine=attention,gate_hidden=0,top_k=1``), so each added option is judged on its own."""
    ours = parse_method(spec)
    mine = {**ours.mixture, **ours.training}
    return [m for m in methods if (other := parse_method(m)).name == ours.name
            and {**other.mixture, **other.training}.items() < mine.items()]


def variant_comparisons(cells: dict, setting: str, methods: list[str]) -> list[dict]:
    """Every variant against each variant it extends (:func:`extends`), over the seeds both ran."""
    out = []
    for spec in methods:
        for base in extends(spec, methods):
            pair = paired(cells, setting, spec, base)
            if pair:
                result = paired_bootstrap(pair[0]["per_example"], pair[1]["per_example"])
                out.append({"variant": spec, "extends": base, **result, "verdict": verdict(result),
                            "seeds": pair[0]["seeds"]})
    return out


def per_seed(ours: list[dict], theirs: list[dict]) -> dict[int, dict]:
    """The same comparison at each training seed both methods ran, when there are several:
    the bootstrap resamples examples, not training runs, so the seeds show the spread it leaves out."""
    mine = {r["seed"]: r for r in ours if r.get("seed") is not None}
    other = {r["seed"]: r for r in theirs if r.get("seed") is not None}
    common = sorted(mine.keys() & other.keys())
    if len(common) < 2:
        return {}
    return {s: paired_bootstrap(mine[s]["per_example"], other[s]["per_example"]) for s in common}


def by_source(results: dict, setting: str, compared: list[dict]) -> list[dict]:
    """Each comparison (of :func:`comparisons` at ``setting``) on each data source's test
    examples alone: the short fixed-format tasks and the long open answers need not agree, and
    the token-weighted whole counts the long answers most."""
    sources = results.get("test_sources")
    if not sources:
        return []
    cells, out = results["cells"], []
    for c in compared:
        ours, theirs = paired(cells, setting, c["mops"], c["baseline"])
        for source in sorted(set(sources)):
            idx = [i for i, s in enumerate(sources) if s == source]
            mine, other = (_examples(r["per_example"], idx) for r in (ours, theirs))
            result = paired_bootstrap(mine, other)
            out.append({"mops": c["mops"], "baseline": c["baseline"], "source": source, "examples": len(idx),
                        "tokens": sum(mine["tokens"]), **result, "verdict": verdict(result)})
    return out


def seed_list(seeds: list) -> str:
    return ", ".join(str(s) for s in seeds if s is not None)


def _examples(per_example: dict, idx: list[int]) -> dict:
    return {k: [per_example[k][i] for i in idx] for k in ("nll", "tokens")}


def markdown(results: dict, stem: str) -> str:
    p, cells = results["protocol"], results["cells"]
    settings, methods = _settings_and_methods(cells)
    dense = cells.get("dense")
    dense_ppl = dense["ppl"] if dense else float("nan")
    seeds = sorted({c["seed"] for c in cells.values() if c.get("seed") is not None})
    lines = [
        f"# Recovery study on {p['model']}",
        "",
        f"Made by `python benchmarks/recovery.py` (rerun it to reproduce; finished cells are kept). "
        f"Pruning: {p['prune_method']}, calibrated on {p['calib_samples']} x {p['seq_len']} Dolly tokens. "
        f"Training (every method alike): {p['steps']} steps x {p['batch_size']} examples of {'+'.join(p['data'])} "
        f"(train split, {p['max_len']} tokens), seeds {', '.join(map(str, seeds))}; budget K = {p['experts']}, "
        f"m = {p['prompt_len']}, gate width {p['gate_hidden']}; lr {p['lr']} (prompts) / {p['gate_lr']} (gate) / {p['lora_lr']} (LoRA), "
        f"{p['gate_pretrain_steps']} gate-pretraining steps on {p['gate_pretrain_examples']} examples; the MoPs "
        f"configuration: {_config_text(p['mops'])}. Score: response-only perplexity of "
        f"{(dense or {}).get('test_examples', '?')} held-out {scored_on(p)} examples "
        f"({(dense or {}).get('test_tokens', '?')} response tokens, {p['test_max_len']} tokens per example), "
        f"token-weighted; with several seeds, of each example's NLL averaged over them. Dense model: "
        f"**{dense_ppl:.2f}**. Recovered = (log ppl_pruned - log ppl) / (log ppl_pruned - log ppl_dense).",
        "",
        "## Held-out perplexity (recovered share)",
        "",
        "| setting | " + " | ".join(methods) + " |",
        "| --- | " + " | ".join("---:" for _ in methods) + " |",
    ]
    for s in settings:
        pruned = summary(cells, s, "none")
        got = {m: summary(cells, s, m) for m in methods}
        # where the methods of a row ran different seeds, each cell says which it averages
        mixed = len({tuple(g["seeds"]) for g in got.values() if g and g["seeds"] != [None]}) > 1
        row = []
        for m in methods:
            g = got[m]
            if not g:
                row.append("")
                continue
            notes = []
            value = recovered_share(dense_ppl, pruned["ppl"], g["ppl"]) if pruned and dense else None
            if value is not None:
                notes.append(f"{100 * value:.0f}%")
            if mixed and g["seeds"] != [None]:
                notes.append(f"seed{'s' * (len(g['seeds']) > 1)} {seed_list(g['seeds'])}")
            row.append(f"{g['ppl']:.2f}" + (f" ({'; '.join(notes)})" if notes else ""))
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    lines += ["", "## MoPs against each baseline",
              "",
              f"ppl_MoPs / ppl_baseline - 1, paired bootstrap 95% interval over the {scored_on(p)} examples "
              "(2,000 resamples, the same for both methods). Lower is better for MoPs; an interval holding 0 is a tie. Each baseline "
              "kind is represented by its best variant in the file; `lora` (rank 8) has about 100x the mixture's "
              "parameters and is there for reference, not as an equal budget. With several seeds, the last column is the same "
              "comparison at each seed alone (the interval resamples examples, not training runs). Two methods "
              "are compared over the training seeds both ran.",
              "",
              "| setting | MoPs | baseline | seeds | MoPs vs baseline [95% interval] | verdict | each seed |",
              "| --- | --- | --- | --- | ---: | --- | --- |"]
    compared = {s: comparisons(cells, s, methods) for s in settings}
    for s in settings:
        for c in compared[s]:
            seeds = "; ".join(f"seed {k}: {format_delta(r)} {verdict(r)}" for k, r in c["per_seed"].items())
            lines.append(f"| {s} | {c['mops']} | {c['baseline']} | {seed_list(c['seeds'])} | {format_delta(c)} | "
                         f"{c['verdict']} | {seeds} |")
    nested = [{**x, "setting": s} for s in settings for x in variant_comparisons(cells, s, methods)]
    if nested:
        lines += ["", "## Variants against the variants they add options to", "",
                  "Each variant against every variant with a subset of its overrides (the same values), so each "
                  "added option is judged on its own: ppl_variant / ppl_other - 1, paired bootstrap 95% interval as "
                  "above, over the training seeds both ran.", "",
                  "| setting | variant | against | seeds | variant vs it [95% interval] | verdict |",
                  "| --- | --- | --- | --- | ---: | --- |"]
        lines += [f"| {r['setting']} | {r['variant']} | {r['extends']} | {seed_list(r['seeds'])} | {format_delta(r)} | "
                  f"{r['verdict']} |" for r in nested]
    rows = [r for s in settings for r in ({**x, "setting": s} for x in by_source(results, s, compared[s]))]
    if rows:
        lines += ["", "## MoPs against each baseline, by data source", "",
                  "The same comparisons on each source's held-out examples alone (seeds averaged as above).", "",
                  "| setting | MoPs | baseline | source | examples | response tokens | MoPs vs baseline [95% interval] "
                  "| verdict |", "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
        lines += [f"| {r['setting']} | {r['mops']} | {r['baseline']} | {r['source']} | {r['examples']} | "
                  f"{r['tokens']:,} | {format_delta(r)} | {r['verdict']} |" for r in rows]
    lines += ["", "## Every cell", "",
              "| setting | method | seed | ppl | trainable params | train s | positions added | lora layout |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in settings:
        for m in methods:
            for c in seed_runs(cells, s, m):
                train_s = f"{c['train_seconds']:.0f}" if "train_seconds" in c else ""
                lora = c.get("lora")
                layout = (f"r {lora['rank']}, {'/'.join(t.replace('_proj', '') for t in lora['targets'])}, layers "
                          f"{lora['layers'] if isinstance(lora['layers'], str) else len(lora['layers'])}") if lora else ""
                lines.append(f"| {s} | {m} | {'' if c.get('seed') is None else c['seed']} | {c['ppl']:.2f} | "
                             f"{c['trainable_params']:,} | {train_s} | {c.get('positions_added', '')} | {layout} |")
    categories = sorted((dense or {}).get("per_category", {}))
    lines += ["", "## Per category (seed 0 where trained)", "", "| setting | method | " + " | ".join(categories) + " |",
              "| --- | --- | " + " | ".join("---:" for _ in categories) + " |"]
    if dense:
        lines.append("| dense | | " + " | ".join(f"{dense['per_category'][c]:.2f}" for c in categories) + " |")
    for s in settings:
        for m in methods:
            runs = seed_runs(cells, s, m)
            if runs:
                lines.append(f"| {s} | {m} | " + " | ".join(f"{runs[0]['per_category'][k]:.2f}" for k in categories) + " |")
    lines += ["", f"Gate heatmaps (mean gate weight per test category and expert, before training, after gate "
              f"pretraining, midway, at the end), with their numbers: `{stem}_gates/`. Positions added: prompt "
              "positions in front of every request; each method's prefill speed is measured side by side by "
              "`python benchmarks/step_cost.py` (`step_cost_embedded.md`).", "",
              f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}."]
    return "\n".join(lines) + "\n"


def _config_text(c: dict) -> str:
    gate = "linear router" if c["gate_hidden"] == 0 else f"MLP gate r = {c['gate_hidden']}"
    route = "soft routing" if c["top_k"] is None else f"top-{c['top_k']} routing"
    noise = f", router noise {c['router_noise']}" if c["router_noise"] else ""
    return f"{c['combine']} mode, {gate}, {route}{noise}, tau {c['temperature']}"


def render(results: dict, out_json: Path) -> None:
    out_json.with_suffix(".md").write_text(markdown(results, out_json.stem))
    draw_chart(results, out_json.with_suffix(".png"))
    gates = out_json.parent / f"{out_json.stem}_gates"
    for key, cell in results["cells"].items():
        if cell.get("gate_snapshots"):
            gates.mkdir(exist_ok=True)
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", key.replace(":", "of", 1))  # 3:4/mops/seed0 -> 3of4_mops_seed0
            (gates / f"{stem}.json").write_text(json.dumps(cell["gate_snapshots"], indent=2) + "\n")
            draw_heatmaps(cell["gate_snapshots"], gates / f"{stem}.png", title=f"{cell['method']} at {cell['setting']}")


def draw_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    settings, methods = _settings_and_methods(cells)
    if not settings:
        return
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(settings), 4))
    for i, m in enumerate(methods):
        points = [(j, summary(cells, s, m)["ppl"]) for j, s in enumerate(settings) if summary(cells, s, m)]
        ax.bar([j + (i - (len(methods) - 1) / 2) * width for j, _ in points], [y for _, y in points], width, label=m)
    if "dense" in cells:
        ax.axhline(cells["dense"]["ppl"], color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_yscale("log")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_xlabel("pruning setting")
    ax.set_ylabel(f"held-out response perplexity (log), {scored_on(results['protocol'])}")
    ax.set_title(f"Recovery of {results['protocol']['model']} ({results['protocol']['prune_method']})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(run_cli(main))
