"""The standalone command that reproduces each stage, where the toolkit has one.

``mops-run RECIPE`` reproduces every stage; these are for a reader who wants one stage
alone, with the stages' own command lines. They read the finished stages' folders and write
under ``repro/`` (never into the cache). A stage whose settings a command line cannot
express (a LoRA method, a pruning dampening other than the default, ...) says so.
"""

from __future__ import annotations

import dataclasses
import shlex

from mops.prune.config import PruneConfig
from mops.train import TrainConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def repro(stage) -> str:
    """Where a reproducing command writes: beside the cache, never into it."""
    return f"repro/{stage.kind}-{stage.label.replace('/', '-')}"


def prune_command(stage) -> str:
    c = stage.settings["config"]  # the resolved PruneConfig
    args = ["prune", "--model", stage.spec["model"], "--method", c["method"]]
    args += ["--pattern", c["pattern"]] if c["pattern"] else ["--sparsity", str(c["sparsity"])]
    args += ["--calib", c["calib"], "--calib-samples", str(c["calib_samples"]), "--seq-len", str(c["seq_len"]),
             "--seed", str(c["seed"]), "--dtype", stage.settings["dtype"], "--device", stage.settings["device"],
             "--out", repro(stage)]
    default = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    missing = [k for k in ("dampening",) if c[k] != default[k]]
    note = f"  # no flag for {', '.join(missing)} (here {', '.join(str(c[k]) for k in missing)})" if missing else ""
    return shlex.join(args) + note


#: mops-recover's flag for each MixtureConfig field
MIXTURE_FLAGS = {"n_experts": "--experts", "prompt_len": "--prompt-len", "gate": "--gate", "combine": "--combine",
                 "gate_layer": "--gate-layer", "inject_layer": "--inject-layer", "gate_hidden": "--gate-hidden",
                 "temperature": "--temperature", "top_k": "--top-k", "router_noise": "--router-noise",
                 "shared_len": "--shared-len"}


def recover_flags() -> set[str]:
    """Every option mops-recover takes without --federated (its federated group adds flags
    that a one-process run ignores)."""
    from mops.recover_cli import build_parser

    return {flag for action in build_parser()._actions for flag in action.option_strings}


def recover_command(stage, base, dense) -> str:
    """``dense``: the recipe's dense model, distillation's teacher."""
    s = stage.settings
    if s["mixture"] is None or s["method"] in ("lora", "lora-equal"):
        return "# LoRA lives inside the base; no standalone command (mops-run trains it)"
    args = ["mops-recover", "--base", str(base)]
    for source in s["data"]["sources"]:
        args += ["--data", source]
    if s["data"]["limit_per_source"]:
        args += ["--limit-per-source", str(s["data"]["limit_per_source"])]
    for key, flag in MIXTURE_FLAGS.items():
        if s["mixture"].get(key) is not None:
            args += [flag, str(s["mixture"][key])]
    training, flags = s["training"], recover_flags()
    for key, value in training.items():
        if _flag(key) in flags:
            args += [_flag(key), str(value)]
    if training.get("distill"):
        args += ["--teacher", str(dense)]
    args += ["--test-examples", str(s["snapshot_examples"]), "--device", s["device"], "--out", repro(stage)]
    defaults = dataclasses.asdict(TrainConfig())
    missing = [k for k in training if _flag(k) not in flags and training[k] != defaults[k]]
    note = f"  # mops-recover has no flag for {', '.join(missing)}: mops-run only" if missing else ""
    return shlex.join(args) + note


def eval_command(stage, base, adapter, lora: bool) -> str:
    tasks = stage.settings["tasks"]
    if not tasks:
        return "# perplexities with intervals: mops-run only (mops.pipeline.measures)"
    if lora:
        return "# LoRA lives inside the base; mops-eval cannot load it (mops-run evaluates it with lm-eval's HFLM)"
    model = f"{stage.label.replace('/', '-')}={base}" + (f",adapter={adapter}" if adapter else "")
    model += "".join(f",{k}={stage.settings[k]}" for k, default in (("dtype", "float32"), ("device", "cpu"))
                     if stage.settings[k] != default)
    spec = ",".join(name if limit is None else f"{name}:{limit}" for name, limit in tasks)
    args = ["mops-eval", "--model", model, "--tasks", spec, "--batch-size", str(stage.settings["batch_size"])]
    if stage.settings["num_fewshot"] is not None:
        args += ["--num-fewshot", str(stage.settings["num_fewshot"])]
    return shlex.join(args + ["--out", repro(stage)]) + "  # the lm-eval columns; perplexities: mops-run only"
