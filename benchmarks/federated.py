"""Federated MoPs against federated baselines under the MoPs appendix A skew, with intervals,
the bytes each round costs, each client's own view, and what a federated step costs.

For each pruning setting (SparseGPT; the checkpoint is shared with ``benchmarks/recovery.py``
under ``--work-dir``), every method trains with the same 4 clients, rounds, local steps,
batch and seed in Flower's simulation engine (``mops-recover --federated``, one process per
run, its command kept beside it), once per ``--seeds`` entry:

- ``mops``: the mixture ``mops-recover`` trains by default (``MixtureConfig()`` /
  ``TrainConfig()`` at run time);
- ``single``: one prompt of m vectors at the input (``--method prompt``: FedPrompt-style, the
  MoPs paper's federated baseline); ``prompt-equal``: one prompt with the mixture's
  parameter count; ``uniform``: K experts, fixed equal weights;
- ``lora``: federated LoRA, r = 8 on every attention and MLP projection, unmerged (its own
  learning rate, ``--lora-lr``);
- ``centralized``: MoPs trained in one process on the union of the clients' examples for
  the same total steps (rounds x local steps x clients), the cost of federation.

The split, the partition and the scored examples come from ``--split-seed``, so seeds
differ only in training. ``--partitions skew iid`` adds the i.i.d. control rows (for
``--iid-methods``). Every "A vs B" figure is ``ppl_A / ppl_B - 1`` with a paired bootstrap
95% interval over the held-out examples (the same resample for both; per seed, and with
each example's NLL averaged over the seeds). Each finished run is saved at once in
``benchmarks/results/federated_<name>.json`` (tables and plot redrawn from it); a rerun skips
finished runs and continues a killed federated run from its last completed round.

    python benchmarks/federated.py                                 # the issue's grid (hours of CPU)
    python benchmarks/federated.py --settings 3:4 --methods mops single --seeds 0      # a part of it
    python benchmarks/federated.py --name tune --score-split validation --seeds 0 --settings 3:4 \\
        --partitions skew --no-centralized --methods mops mops:lr=0.1 'mops@strategy=fedadam,server_lr=0.03' \\
        'mops:gate_lr=0@gate_init=server' 'mops@rounds=20,local_steps=5' single    # choices, on validation

A method is ``LABEL[:key=value,...][@option=value,...]``: LABEL one of ``mops single
prompt-equal uniform lora``; ``:`` overrides of the mixture or the training (as in
``mops.baselines``); ``@`` federated options of that run (``strategy``, ``proximal_mu``,
``proximal``, ``server_lr``, ``server_momentum``, ``server_betas=B1/B2``, ``server_tau``, ``gate_init``,
``rounds``, ``local_steps``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from mops.baselines import Budget, parse_method, prepare
from mops.cli_common import run_cli, setup_logging
from mops.errors import UserError
from mops.eval.bootstrap import format_delta, mean_over_seeds, paired_bootstrap, perplexity, verdict
from mops.mixture import MixtureConfig
from mops.models import DEFAULT_MODEL
from mops.outputs import SharedResults, library_versions, results_lock
from mops.train import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
LABELS = {"mops": "mops", "single": "prompt", "prompt-equal": "prompt-equal", "uniform": "uniform", "lora": "lora"}
BASELINES = ("single", "prompt-equal", "uniform", "lora")
#: the issue's targets: federated MoPs this far below the federated single prompt, whole interval below 0
TARGETS = {"3:4": -0.20, "2:4": -0.10}
FEDERATION_COST_TARGET = 0.10  # federated MoPs within 10% of centralized MoPs
STEP_COST_TARGET = 1.5  # a federated client step at most 1.5x a centralized step
FED_OPTIONS = {"strategy": str, "proximal_mu": float, "proximal": str, "server_lr": float, "server_momentum": float,
               "server_betas": str, "server_tau": float, "gate_init": str, "rounds": int, "local_steps": int}


def parse_args(argv):
    t = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--name", default="embedded", help="results stem: federated_<name>.* (default: embedded)")
    p.add_argument("--settings", nargs="+", default=["3:4", "2:4"], help="SparseGPT N:M patterns (default: 3:4 2:4)")
    p.add_argument("--methods", nargs="+", default=list(LABELS), help="LABEL[:key=value,...][@option=value,...] "
                   f"(default: {' '.join(LABELS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds (default: 0 1)")
    p.add_argument("--partitions", nargs="+", default=["skew", "iid"], help="skew (appendix A) and the iid control "
                   "(default: skew iid)")
    p.add_argument("--iid-methods", nargs="+", default=["mops", "single"],
                   help="the methods of the iid control rows (default: mops single)")
    p.add_argument("--no-centralized", dest="centralized", action="store_false",
                   help="skip centralized MoPs on the union of the clients' examples")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split, partition, scored examples, pruning")
    p.add_argument("--data", nargs="+", default=["dolly", "natural-instructions"])
    p.add_argument("--limit-per-source", type=int, default=None)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256, help="training tokens per example (default: 256)")
    p.add_argument("--experts", type=int, default=None, help="K (default: mops-recover's)")
    p.add_argument("--prompt-len", type=int, default=None, help="m (default: mops-recover's)")
    p.add_argument("--lr", type=float, default=None, help=f"prompts' learning rate (default: mops-recover's, {t.lr})")
    p.add_argument("--gate-lr", type=float, default=None, help=f"the gate's (default: mops-recover's, {t.gate_lr})")
    p.add_argument("--lr-warmup", type=int, default=None, help="steps of linear warmup of every rate, counted over the "
                   f"run's rounds (default: mops-recover's, {t.lr_warmup})")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="LoRA's learning rate (default: 2e-3, the study's)")
    p.add_argument("--gate-pretrain-examples", type=int, default=256,
                   help="gate-pretraining examples in all, each client its share (default: 256, as the study)")
    p.add_argument("--eval-examples", type=int, default=64, help="validation examples the server scores after "
                   "every --eval-every-rounds rounds (default: 64)")
    p.add_argument("--eval-every-rounds", type=int, default=2, help="(default: 2: rounds 0, 2, 4, ...)")
    p.add_argument("--test-examples", type=int, default=None, help="held-out examples scored at the end, "
                   "stratified (default: the whole split)")
    p.add_argument("--score-split", default="test", choices=("test", "validation"),
                   help="the split scored at the end: tune on validation, report on test (default: test)")
    p.add_argument("--extra", default="", help="more mops-recover options for every federated run")
    p.add_argument("--prune-method", default="sparsegpt")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--client-cpus", type=float, default=1.0)
    p.add_argument("--work-dir", default="runs/recovery", help="pruned checkpoints, shared with benchmarks/recovery.py")
    p.add_argument("--runs-dir", default="runs/federated", help="federated runs and their commands")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--reuse-only", action="store_true", help="start no run: tabulate what is finished")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- methods and runs


@dataclass(frozen=True)
class Method:
    label: str  # the whole spec, as tables show it
    kind: str  # mops, single, prompt-equal, uniform, lora
    spec: str  # the --method spec mops-recover gets
    options: dict  # federated options of this run

    @property
    def is_lora(self) -> bool:
        return self.kind == "lora"


def parse_label(text: str) -> Method:
    """``LABEL[:key=value,...][@option=value,...]`` -> a Method (one-line errors)."""
    head, _, fed = text.partition("@")
    kind, colon, overrides = head.partition(":")
    if kind not in LABELS:
        raise UserError(f"method {text!r}: expected one of {', '.join(LABELS)} (with :overrides and @options)")
    spec = LABELS[kind] + (":" + overrides if colon else "")
    parse_method(spec)  # bad overrides fail here, in one line
    options = {}
    for item in filter(None, fed.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in FED_OPTIONS:
            raise UserError(f"method {text!r}: {item!r} is not option=value with an option among {', '.join(FED_OPTIONS)}")
        try:
            options[key] = FED_OPTIONS[key](value)
        except ValueError:
            expected = {int: "a whole number", float: "a number"}[FED_OPTIONS[key]]
            raise UserError(f"method {text!r}: {key}={value!r} is not {expected}") from None
    return Method(text, kind, spec, options)


def run_key(setting: str, partition: str, label: str, seed: int | None) -> str:
    return f"{setting}/{partition}/{label}" + ("" if seed is None else f"/seed{seed}")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text.replace(":", "of", 1) if re.match(r"\d+:\d+$", text) else text)


def pruned_checkpoint(args, setting: str, make: bool = True) -> Path:
    """The pruned checkpoint, in the recovery study's folder naming (shared with it)."""
    folder = Path(args.work_dir) / (f"{Path(args.model).name}-{args.prune_method}-{setting.replace(':', 'of')}-calib"
                                    f"{args.calib_samples}x{args.calib_seq_len}-seed{args.split_seed}")
    if make and not (folder / "sparsity_report.json").is_file():
        from mops.models import load_model
        from mops.prune import PruneConfig
        from mops.prune.core import prune_to_folder

        model, tok = load_model(args.model)
        config = PruneConfig(method=args.prune_method, calib_samples=args.calib_samples, seq_len=args.calib_seq_len,
                             seed=args.split_seed, pattern=setting)
        prune_to_folder(model, tok, config, folder, model_name=args.model, force=True, quiet=True)
    return folder


def scored_records(args):
    """The held-out examples every run scores (the same for every method and seed)."""
    from mops.data import load_records, split_records, stratified_subset

    splits = split_records(load_records(args.data, args.limit_per_source, args.split_seed), args.split_seed)
    held = splits[args.score_split]
    return splits, stratified_subset(held, args.test_examples or len(held), args.split_seed)


def federated_command(args, base: Path, method: Method, partition: str, seed: int, out: Path) -> list[str]:
    o = method.options
    cmd = [str(BIN / "mops-recover"), "--base", str(base)]
    for d in args.data:
        cmd += ["--data", d]
    if args.limit_per_source:
        cmd += ["--limit-per-source", str(args.limit_per_source)]
    cmd += ["--federated", str(args.clients), "--partition", partition, "--rounds", str(o.get("rounds", args.rounds)),
            "--local-steps", str(o.get("local_steps", args.local_steps)), "--batch-size", str(args.batch_size),
            "--max-len", str(args.max_len), "--gate-pretrain-examples", str(args.gate_pretrain_examples),
            "--eval-examples", str(args.eval_examples), "--eval-every-rounds", str(args.eval_every_rounds),
            "--test-examples", str(args.test_examples_resolved), "--score-split", args.score_split,
            "--seed", str(seed), "--split-seed", str(args.split_seed), "--method", method.spec, "--no-base-score",
            "--client-cpus", str(args.client_cpus)]
    for flag, value in (("--experts", args.experts), ("--prompt-len", args.prompt_len), ("--gate-lr", args.gate_lr),
                        ("--lr", args.lr), ("--lr-warmup", args.lr_warmup), ("--lora-lr", args.lora_lr)):
        if value is not None:
            cmd += [flag, str(value)]
    for key, value in o.items():
        if key not in ("rounds", "local_steps"):
            cmd += [f"--{key.replace('_', '-')}", *str(value).split("/")]  # server_betas=0.9/0.99: two numbers
    return cmd + shlex.split(args.extra) + ["--out", str(out), "--quiet"]


def check_command(cmd: list[str]) -> None:
    """Parse and validate a run's mops-recover options here, so a bad one fails in one line
    before hours of other runs, not when its turn comes."""
    from mops.federated import cli as federated
    from mops.recover_cli import build_parser

    parser = build_parser()
    federated.add_arguments(parser)
    federated.config_from_args(parser.parse_args(cmd[1:])).validate()


def run_federated(args, base: Path, method: Method, partition: str, seed: int, setting: str) -> dict | None:
    """One federated run (reused when finished with the same command; resumed when killed)."""
    from mops.federated.server_app import CKPT_STATE, checkpoint_dir_for

    out = Path(args.runs_dir) / args.name / slug(setting) / partition / slug(method.label) / f"seed{seed}"
    cmd = federated_command(args, base, method, partition, seed, out)
    stamp = out.parent / f"seed{seed}.command"
    done = (out / "history.json").is_file() and stamp.is_file() and stamp.read_text() == shlex.join(cmd)
    if not done:
        if args.reuse_only:
            return None
        out.parent.mkdir(parents=True, exist_ok=True)
        resumable = (checkpoint_dir_for(out) / CKPT_STATE).is_file() and stamp.is_file() and \
            stamp.read_text() == shlex.join(cmd)
        stamp.write_text(shlex.join(cmd))  # before the run: a killed run resumes only under the same command
        print("$", shlex.join(cmd), flush=True)
        started = time.perf_counter()
        subprocess.run(cmd + (["--resume"] if resumable else ["--force"]), check=True)
        (out.parent / f"seed{seed}.seconds").write_text(f"{time.perf_counter() - started:.1f}")
    history = json.loads((out / "history.json").read_text())
    seconds = out.parent / f"seed{seed}.seconds"
    o = method.options
    return federated_cell(history, shlex.join(cmd).replace(str(BIN) + "/", ""),
                          float(seconds.read_text()) if seconds.is_file() else None,
                          o.get("local_steps", args.local_steps))


def federated_cell(history: dict, command: str, wall: float | None, local_steps: int) -> dict:
    """What the tables need from a federated run's history."""
    t = history["test"]
    client_steps = sum(len(r["clients"]) for r in history["rounds"]) * local_steps
    return {"kind": "federated", "command": command, "method": history["method"],
            "ppl": t["adapter"]["ppl"], "per_example": t["adapter"]["per_example"],
            "per_category": t["adapter"]["per_category"],
            "per_client": {k: {"examples": c["examples"], "indices": c["indices"]} for k, c in t["per_client"].items()},
            "validation": [[v["round"], v["ppl"]] for v in history["validation"]],
            "missing": [m["client"] for r in history["rounds"] for m in r["missing"]],
            "communication": communication(history), "cost": federated_cost(history, client_steps),
            "wall_seconds": wall, "partition_counts": history["partition_counts"],
            "precision": client_precision(history),
            "resumed_after": history.get("resumed_after", [])}


def client_precision(history: dict) -> str:
    """``bf16`` if every client of every round trained under bf16 autocast, ``no`` if none did
    (runs from before the option: float32), else ``mixed`` (``auto`` on unlike machines)."""
    used = {c in r.get("bf16_clients", []) for r in history["rounds"] for c in r["clients"]}
    if used == {True}:
        return "bf16"
    return "mixed" if True in used else "no"


def communication(history: dict) -> dict:
    """Bytes of tensors per client and round, down (in the server's message) and up (in the
    client's reply), as the history recorded them from the messages; the gate round apart."""
    down = [n for r in history["rounds"] for n in r["bytes_down"].values()]
    up = [n for r in history["rounds"] for n in r["bytes_up"].values()]
    gate = history.get("gate_round")
    return {"down_per_client_round": statistics.mean(down), "up_per_client_round": statistics.mean(up),
            "down_total": sum(down), "up_total": sum(up), "tensors_up": len(history["uploaded"]),
            "gate_round_up_total": sum(gate["bytes_up"].values()) if gate else 0,
            "per_round": [{"round": r["round"], "down": r["bytes_down"], "up": r["bytes_up"]} for r in history["rounds"]]}


def federated_cost(history: dict, client_steps: int) -> dict:
    """CPU seconds of the run (every process of the simulation, until the rounds ended) per
    client step, and where they went."""
    timing = history["timing"]
    phases = {"client training steps": 0.0, "client gate pretraining": 0.0, "client set-up per round": 0.0,
              "client (de)serialisation": 0.0, "server validation": 0.0, "server aggregation": 0.0,
              "server checkpoint": 0.0}
    for r in history["rounds"]:
        t = r["timing"]
        for c in t["clients"].values():
            phases["client training steps"] += c["train"]["cpu"]
            phases["client gate pretraining"] += c["gate_pretrain"]["cpu"]
            phases["client set-up per round"] += c["setup"]["cpu"] + c["state"]["cpu"]
            phases["client (de)serialisation"] += c["serialise"]["cpu"]
        phases["server validation"] += t.get("validation", {}).get("cpu", 0.0)
        phases["server aggregation"] += t["aggregate"]["cpu"] + t["exchange"]["cpu"]
        phases["server checkpoint"] += t["checkpoint"]["cpu"]
    phases["server validation"] += history["validation"][0].get("cpu", 0.0)  # round 0
    if "gate_round" in history:
        g = history["gate_round"]
        phases["client gate pretraining"] += sum(c["cpu"] for c in g["client_timing"].values()) + g["timing"]["cpu"]
    phases["server set-up and hello"] = timing["server_setup"]["cpu"] + timing["hello"]["cpu"]
    tree = timing["process_tree_after_rounds"]["total"]
    phases["the rest: process start-up, base loading, Ray, Flower"] = max(0.0, tree - sum(phases.values()))
    return {"client_steps": client_steps, "cpu_total": tree, "cpu_per_client_step": tree / client_steps,
            "train_cpu_per_client_step": phases["client training steps"] / client_steps, "phases": phases,
            "final_scoring_cpu": timing["final_scoring"]["cpu"]}


def run_centralized(args, base: Path, seed: int, method: Method) -> dict:
    """MoPs in one process on the union of the clients' examples, for the same total steps,
    scored on the same examples; its step's CPU time is what a federated step is held to."""
    from mops.eval.perplexity import response_perplexity
    from mops.federated.common import client_partitions
    from mops.federated.config import FederatedConfig
    from mops.lower_cache import LowerStates
    from mops.models import load_model
    from mops.train import recover

    torch.set_num_threads(1)  # as each federated client process runs
    federated = FederatedConfig(base=str(base), data=args.data, n_clients=args.clients, partition="skew",
                                limit_per_source=args.limit_per_source, split_seed=args.split_seed,
                                train=asdict(TrainConfig(seed=seed)))
    union = [r for part in client_partitions(federated) for r in part]
    steps = args.rounds * args.local_steps * args.clients
    model, tok = load_model(base)
    spec = parse_method(method.spec)
    mixture, _, _ = prepare(spec, model, Budget(budget_mixture(args)))
    config = TrainConfig(steps=steps, batch_size=args.batch_size, max_len=args.max_len,
                         gate_pretrain_examples=args.gate_pretrain_examples, eval_every=steps, checkpoint_every=50,
                         seed=seed, **{k: v for k, v in (("lr", args.lr), ("gate_lr", args.gate_lr),
                                                          ("lr_warmup", args.lr_warmup)) if v is not None})
    config = replace(config, **spec.training)
    variant = "" if method.label == "mops" else f"-{slug(method.label)}"  # plain mops: the path runs already have
    checkpoint = Path(args.runs_dir) / args.name / "centralized" / f"{slug(str(base.name))}{variant}-seed{seed}"
    resume = (checkpoint / "trainer_state.json").is_file()
    cpu_at = {}

    def on_step(step, _history):
        cpu_at[step] = time.process_time()

    started_cpu, started = time.process_time(), time.perf_counter()
    lm, history = recover(model, tok, {"train": union}, mixture, config, checkpoint_dir=checkpoint, resume=resume,
                          progress=False, lower=LowerStates(), on_step=on_step)
    run_cpu = time.process_time() - started_cpu
    first, last = min(cpu_at), max(cpu_at)
    step_cpu = (cpu_at[last] - cpu_at[first]) / max(1, last - first)  # steps after the first one timed
    _, scored = scored_records(args)
    result = response_perplexity(lm, tok, scored, progress=False)
    return {"kind": "centralized", "command": f"recover() on the union of the clients' {len(union)} examples, "
            f"{steps} steps x {args.batch_size}, {config.max_len} tokens, seed {seed}, 1 thread",
            "method": method.spec, "mixed_precision": history["mixed_precision"], "ppl": result["ppl"],
            "per_example": result["per_example"],
            "per_category": result["per_category"], "steps": steps, "resumed": resume,
            "cost": {"step_cpu": step_cpu, "run_cpu_per_step": None if resume else run_cpu / steps,
                     "train_seconds": history["train_seconds_this_run"]},
            "wall_seconds": time.perf_counter() - started}


def budget_mixture(args) -> MixtureConfig:
    """The MoPs budget: mops-recover's defaults, with the study's --experts / --prompt-len."""
    m = MixtureConfig()
    return replace(m, n_experts=args.experts or m.n_experts, prompt_len=args.prompt_len or m.prompt_len)


def run_pruned(args, base: Path) -> dict:
    from mops.eval.perplexity import response_perplexity
    from mops.models import load_model

    model, tok = load_model(base)
    _, scored = scored_records(args)
    result = response_perplexity(model, tok, scored, progress=False)
    return {"kind": "none", "command": f"response_perplexity() of {base} as it is", "ppl": result["ppl"],
            "per_example": result["per_example"], "per_category": result["per_category"]}


# ----------------------------------------------------------------------------- the grid


def protocol(args) -> dict:
    """Everything that fixes a run's number: a results file only grows under the same values."""
    keys = ("model", "data", "limit_per_source", "split_seed", "clients", "rounds", "local_steps", "batch_size",
            "max_len", "experts", "prompt_len", "lr", "gate_lr", "lr_warmup", "lora_lr", "gate_pretrain_examples", "eval_examples",
            "eval_every_rounds", "test_examples_resolved", "score_split", "extra", "prune_method", "calib_samples",
            "calib_seq_len")
    t = asdict(TrainConfig())
    return {k: getattr(args, k) for k in keys} | {"mops": asdict(MixtureConfig()),
                                                 "training": {k: t[k] for k in ("lr", "gate_lr", "lr_warmup", "warm_steps", "balance",
                                                                                 "gate_pretrain_steps",
                                                                                 "gate_pretrain_lr")}}


def same_protocol(saved: dict, now: dict) -> bool:
    """Equal once each rate is the one the runs trained at: the flag where given, else
    mops-recover's default of the day (a file made before ``lr_warmup`` existed trained without
    one). A file made before a default changed grows again when the old value is given by hand
    (``--lr 0.3 --lr-warmup 0``), and a plain rerun after the change is refused."""
    def effective(p: dict) -> dict:
        p = json.loads(json.dumps(p))
        for key, before in (("lr", None), ("gate_lr", None), ("lr_warmup", 0)):
            default = p.get("training", {}).pop(key, before)
            p[key] = default if p.get(key) is None else p[key]
        return p
    return effective(saved) == effective(now)


def todo(args) -> list[tuple[str, str, Method | None, int | None]]:
    """(setting, partition, method, seed) in the order that gives the headline first."""
    methods = [parse_label(m) for m in args.methods]
    iid = [m for m in methods if m.label in args.iid_methods]
    out = []
    for seed in args.seeds:
        for setting in args.settings:
            for partition in args.partitions:
                for m in (methods if partition == "skew" else iid):
                    out.append((setting, partition, m, seed))
            if args.centralized and "skew" in args.partitions:
                out += [(setting, "centralized", parse_label(label), seed) for label in centralized_labels(methods)]
    return out


def centralized_label(label: str) -> str:
    """The centralized MoPs run a federated run is held to (its quality and its step): plain
    ``mops`` in the federated run's precision (``mops:mixed_precision=bf16`` for a bf16 run)."""
    precision = parse_method(parse_label(label).spec).training.get("mixed_precision", "no")
    return "mops" if precision == "no" else f"mops:mixed_precision={precision}"


def centralized_labels(methods: list[Method]) -> list[str]:
    """Centralized MoPs in float32, and in each other precision a federated method trains in."""
    return ["mops"] + sorted({centralized_label(m.label) for m in methods} - {"mops"})


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(quiet=True)
    for p in args.partitions:
        if p not in ("skew", "iid"):
            raise UserError(f"--partitions {p!r}: expected skew or iid")
    for s in args.settings:
        if s not in TARGETS and not re.fullmatch(r"\d+:\d+", s):
            raise UserError(f"--settings {s!r}: expected N:M patterns such as 3:4 or 2:4")
    if args.test_examples is not None and args.test_examples < 1:
        raise UserError(f"--test-examples {args.test_examples}: expected a positive whole number")
    jobs = todo(args)  # bad method specs fail here, before anything runs
    _, scored = scored_records(args)
    args.test_examples_resolved = len(scored)
    for setting, partition, method, seed in jobs:
        if partition != "centralized":
            check_command(federated_command(args, Path("base"), method, partition, seed, Path("out")))
    out_json = Path(args.out_dir) / f"federated_{args.name}.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"runs": {}}
    if "runs" not in results:  # the file of this benchmark's first version (3 rounds x 4 steps, no intervals)
        print(f"{out_json}: made by an earlier version of this benchmark; replacing it", flush=True)
        results = {"runs": {}}
    if not same_protocol(results.get("protocol", protocol(args)), protocol(args)):
        raise UserError(f"{out_json} was made with other settings; use --name for a new study or delete it")
    results.update(protocol=protocol(args), versions=library_versions())

    shared = SharedResults(out_json, results, "runs", render)

    def save(key: str, cell: dict) -> None:
        shared.save(key, cell)
        print(f"{key:>48}  ppl {cell['ppl']:9.2f}", flush=True)

    checked = set()
    for setting, partition, method, seed in jobs:
        key = run_key(setting, partition, method.label, seed)
        if shared.has(key):
            continue
        if args.reuse_only:  # tabulate a federated run that finished outside this file; start nothing
            cell = None if partition == "centralized" else \
                run_federated(args, pruned_checkpoint(args, setting, make=False), method, partition, seed, setting)
            if cell:
                save(key, {"setting": setting, "partition": partition, "label": method.label, "seed": seed, **cell})
            continue
        base = pruned_checkpoint(args, setting)
        pruned = results["runs"].get(run_key(setting, "none", "pruned", None))
        if not pruned:
            save(run_key(setting, "none", "pruned", None), {"setting": setting, **run_pruned(args, base)})
        elif setting not in checked:  # a checkpoint pruned again elsewhere differs: its runs would not pair
            from mops.eval.perplexity import require_same_model
            from mops.models import load_model

            require_same_model(*load_model(base), scored, pruned["per_example"], base, out_json)
            checked.add(setting)
        if partition == "centralized":
            cell = run_centralized(args, base, seed, method)
        else:
            cell = run_federated(args, base, method, partition, seed, setting)
        save(key, {"setting": setting, "partition": partition, "label": method.label, "seed": seed, **cell})
    with results_lock(out_json):  # redrawn from the file as it stands, with every part's runs
        final = json.loads(out_json.read_text()) if out_json.is_file() else {}
        if final.get("runs"):
            render(final, out_json)
            print(out_json.with_suffix(".md").read_text())


# ----------------------------------------------------------------------------- tables


def seed_runs(runs: dict, setting: str, partition: str, label: str) -> list[dict]:
    prefix = run_key(setting, partition, label, None)
    return [c for k, c in sorted(runs.items()) if re.fullmatch(re.escape(prefix) + r"/seed\d+", k)]


def per_example_of(cell: dict, indices=None) -> dict:
    pe = cell["per_example"]
    if indices is None:
        return pe
    return {"nll": [pe["nll"][i] for i in indices], "tokens": [pe["tokens"][i] for i in indices]}


def compare(a_runs: list[dict], b_runs: list[dict], indices=None) -> dict | None:
    """A vs B: per common seed, and with each example's NLL averaged over the common seeds."""
    a = {c["seed"]: c for c in a_runs}
    b = {c["seed"]: c for c in b_runs}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    per_seed = {s: paired_bootstrap(per_example_of(a[s], indices), per_example_of(b[s], indices)) for s in seeds}
    mean = paired_bootstrap(mean_over_seeds([per_example_of(a[s], indices) for s in seeds]),
                            mean_over_seeds([per_example_of(b[s], indices) for s in seeds]))
    return {"seeds": seeds, "per_seed": per_seed, "mean": mean}


#: the training overrides only some kinds read (a key not here, such as steps or lr_schedule, every
#: kind reads): the single prompt has no gate, LoRA no prompt rate
READ_BY = {"lr": {"mops", "single", "prompt-equal", "uniform"}, "lora_lr": {"lora"}} | {
    k: {"mops"} for k in ("gate_lr", "warm_steps", "balance", "gate_pretrain_steps", "gate_pretrain_lr",
                          "gate_pretrain_examples")}


def same_training(a: Method, b: Method) -> bool:
    """Whether two runs train alike in every setting both read (a key left out: its default)."""
    ta, tb, default = parse_method(a.spec).training, parse_method(b.spec).training, TrainConfig()
    return all(ta.get(k, getattr(default, k)) == tb.get(k, getattr(default, k)) for k in ta.keys() | tb.keys()
               if {a.kind, b.kind} <= READ_BY.get(k, set(LABELS)))


def like_for_like(ours: str, labels: list[str]) -> list[str]:
    """The baselines a MoPs run is compared with: those run under the same federated options
    (rounds x local steps, strategy) and the same training settings both read (``mops:lr=1.0``
    against ``single:lr=1.0``, not ``single``), so a schedule or a rate tuned for MoPs is not
    credited to the gate; a gate's own settings (``gate_lr``) leave the baselines as they are."""
    me = parse_label(ours)
    return [m for m in labels if (other := parse_label(m)).kind != "mops" and other.options == me.options
            and same_training(me, other)]


def extends(variant: str, labels: list[str]) -> list[str]:
    """The variants ``variant`` adds federated options to: the same method and overrides, with a
    proper subset of its options (``mops@rounds=20,local_steps=5`` for
    ``mops@rounds=20,local_steps=5,strategy=fedavgm``), so each added option is judged on its own.
    The plain method is left out: the tuning table has its own column for it."""
    ours = parse_label(variant)
    return [m for m in labels if (other := parse_label(m)).spec == ours.spec and other.options
            and other.options.items() < ours.options.items()]


def seed_mean_ppl(runs: list[dict], indices=None) -> float | None:
    return perplexity(mean_over_seeds([per_example_of(c, indices) for c in runs])) if runs else None


def layout(results: dict) -> tuple[list[str], list[str]]:
    settings, labels = [], []
    for c in results["runs"].values():
        if c["setting"] not in settings:
            settings.append(c["setting"])
        if c.get("partition") in ("skew", "iid") and c["label"] not in labels:
            labels.append(c["label"])
    settings.sort(key=lambda s: -int(s.split(":")[0]) / int(s.split(":")[1]))  # the most aggressive first
    labels.sort(key=lambda m: (list(LABELS).index(parse_label(m).kind), m))
    return settings, labels


def fmt(x, spec=".2f", empty="") -> str:
    return empty if x is None else format(x, spec)


def mib(n: float) -> str:
    return f"{n / 2**20:.3f}" if n < 2**20 * 10 else f"{n / 2**20:.1f}"


def markdown(results: dict, stem: str) -> str:
    p, runs = results["protocol"], results["runs"]
    settings, labels = layout(results)
    split = p["score_split"]
    mops_labels = [m for m in labels if parse_label(m).kind == "mops"]
    lines = [f"# Federated MoPs on {p['model']}: skewed clients, baselines, intervals, bytes, cost", "",
             f"Made by `python benchmarks/federated.py` (rerun it to reproduce; finished runs are reused, a killed "
             f"run continues from its last round). {p['clients']} clients, the MoPs appendix A skew of the "
             f"{'+'.join(p['data'])} train split (each category in {p['clients']} parts, one 15x each other; `iid`: "
             f"the same examples dealt evenly), {p['rounds']} rounds x {p['local_steps']} local steps x batch "
             f"{p['batch_size']} ({p['max_len']} tokens), Flower simulation engine, FedAvg unless the method says "
             f"otherwise; gate pretrained on {p['gate_pretrain_examples']} examples in all (each client its share); "
             f"the MoPs configuration is mops-recover's default at run time ({_mixture_text(p['mops'])}), lr "
             f"{p['lr'] or p['training']['lr']} (prompts) / {p['gate_lr'] or p['training']['gate_lr']} (gate) / "
             f"{p['lora_lr']} (LoRA). Scored: response perplexity of {p['test_examples_resolved']} held-out "
             f"**{split}** examples (512 tokens each), token-weighted; with several seeds, of each example's NLL "
             f"averaged over them. Pruning: {p['prune_method']}, calibrated on "
             f"{p['calib_samples']} x {p['calib_seq_len']} Dolly tokens.", ""]
    lines += [f"## Held-out {split} perplexity", "",
              "| setting | partition | pruned | " + " | ".join(labels) + " | centralized mops |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in labels) + " | ---: |"]
    for s in settings:
        pruned = runs.get(run_key(s, "none", "pruned", None))
        for part in ("skew", "iid"):
            row = [fmt(seed_mean_ppl(seed_runs(runs, s, part, m))) for m in labels]
            if not any(row):
                continue
            central = fmt(seed_mean_ppl(seed_runs(runs, s, "centralized", "mops"))) if part == "skew" else ""
            lines.append(f"| {s} | {part} | {fmt(pruned and pruned['ppl'])} | " + " | ".join(row) + f" | {central} |")
    lines += ["", "## Federated MoPs against each baseline", "",
              "Each MoPs run against the baselines run under the same federated options and trained alike in what "
              "both read (the prompts' rate, steps, precision; not the gate's settings): "
              "ppl_MoPs / ppl_baseline - 1 with a paired bootstrap 95% interval over the held-out examples (2,000 "
              "resamples, the same for both); per seed, then with each example's NLL averaged over the seeds. "
              "Negative: MoPs is lower (better). Targets: "
              + ", ".join(f"{100 * v:+.0f}% or lower against `single` at {k}" for k, v in TARGETS.items())
              + ", with the whole interval below 0, for every seed.", "",
              "| setting | partition | MoPs | baseline | per seed | seeds averaged | verdict | target |",
              "| --- | --- | --- | --- | --- | ---: | --- | --- |"]
    for s in settings:
        for part in ("skew", "iid"):
            for ours in mops_labels:
                mine = seed_runs(runs, s, part, ours)
                central = centralized_label(ours)
                for base in like_for_like(ours, labels) + ["centralized"]:
                    other = seed_runs(runs, s, "centralized", central) if base == "centralized" else \
                        seed_runs(runs, s, part, base)
                    if base == "centralized" and part != "skew":
                        continue
                    c = compare(mine, other)
                    if not c:
                        continue
                    per_seed = "; ".join(f"seed {k}: {format_delta(v)}" for k, v in c["per_seed"].items())
                    name = f"centralized {central}" if base == "centralized" and central != "mops" else base
                    lines.append(f"| {s} | {part} | {ours} | {name} | {per_seed} | {format_delta(c['mean'])} | "
                                 f"{verdict(c['mean'])} | {_target(s, part, base, c)} |")
    lines += ["", "`centralized`: MoPs trained in one process on the union of the clients' examples for the same "
              "total steps (rounds x local steps x clients); the row is the cost of federation (target: within "
              f"+{100 * FEDERATION_COST_TARGET:.0f}%)."]
    lines += _variants(results, settings, labels)
    lines += _communication(results, settings, labels)
    lines += _per_client(results, settings, labels)
    lines += _cost(results, settings, labels)
    lines += _rounds_and_runs(results, settings, labels, stem)
    return "\n".join(lines) + "\n"


def _mixture_text(c: dict) -> str:
    gate = "linear router" if c["gate_hidden"] == 0 else f"gate width {c['gate_hidden']}"
    route = "soft routing" if c["top_k"] is None else f"top-{c['top_k']}"
    return f"K = {c['n_experts']}, m = {c['prompt_len']}, {c['combine']}, {gate}, {route}"


def _target(setting: str, partition: str, baseline: str, c: dict) -> str:
    if partition != "skew":
        return ""
    if baseline == "centralized":
        return "met" if c["mean"]["delta"] <= FEDERATION_COST_TARGET else "not met"
    kind = parse_label(baseline).kind
    if kind == "single" and setting in TARGETS:
        ok = all(r["delta"] <= TARGETS[setting] and r["high"] < 0 for r in c["per_seed"].values())
        return ("met" if ok else "not met") + f" ({100 * TARGETS[setting]:+.0f}%)"
    if kind == "prompt-equal" and setting == "3:4":
        return "met" if c["mean"]["delta"] < 0 else "not met"
    return ""


def _variants(results, settings, labels) -> list[str]:
    """Each variant (``mops:lr=0.1``, ``mops@strategy=fedadam``) against its plain method: the
    tuning table, on whatever split was scored."""
    runs = results["runs"]
    rows = []
    for s in settings:
        for part in ("skew", "iid"):
            for m in labels:
                plain = parse_label(m).kind
                if m == plain:
                    continue
                ours = seed_runs(runs, s, part, m)
                c = compare(ours, seed_runs(runs, s, part, plain))
                nested = [(o, compare(ours, seed_runs(runs, s, part, o))) for o in extends(m, labels)]
                nested = "; ".join(f"`{o}`: {format_delta(n['mean'])}" for o, n in nested if n)
                ppl = seed_mean_ppl(ours)
                if ppl is not None:
                    rows.append(f"| {s} | {part} | `{m}` | {ppl:.2f} | {format_delta(c['mean']) if c else ''} | {nested} |")
    if not rows:
        return []
    return ["", f"## Variants against their plain method ({results['protocol']['score_split']} split)", "",
            "Each variant's perplexity, and ppl_variant / ppl_plain - 1 [95% interval] where the plain method ran "
            "too; likewise against each variant it adds federated options to. The commands are in 'Every run'.", "",
            "| setting | partition | variant | ppl | against the plain method | against the variants it extends |",
            "| --- | --- | --- | ---: | ---: | --- |",
            *rows]


def _communication(results, settings, labels) -> list[str]:
    lines = ["", "## Communication", "",
             "Bytes of the tensors in each message (numel x itemsize of every array Flower carries; the .npy header "
             "and name of each, about 130 bytes a tensor, left out), per client and round, as the server recorded "
             "them from the messages it sent and the replies it received; MiB = 2^20 bytes.", "",
             "| method | tensors sent back | down per client per round (MiB) | up per client per round (MiB) | "
             "all clients, whole run (MiB) | gate round up (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for m in labels:
        cells = [c for c in results["runs"].values() if c.get("label") == m and c.get("communication")]
        if not cells:
            continue
        k = cells[0]["communication"]
        lines.append(f"| {m} | {k['tensors_up']} | {mib(k['down_per_client_round'])} | {mib(k['up_per_client_round'])} | "
                     f"{mib(k['down_total'] + k['up_total'])} | {mib(k['gate_round_up_total'])} |")
    return lines


def _per_client(results, settings, labels) -> list[str]:
    """Each client's own share, for every MoPs run against the single prompt it is compared with
    (:func:`like_for_like`: 10 x 10 against 10 x 10, 20 x 5 against 20 x 5, lr 1.0 against lr 1.0)."""
    runs = results["runs"]
    rows = []
    lines = ["", "## Each client on its own held-out share", "",
             "Each client's share of the held-out examples: every category split over the clients in proportion to "
             "their training examples of it, so a client's share has its own skewed mix (15 of every 18 examples "
             "of its large categories). Each MoPs run against the single prompt under the same federated options, "
             "trained alike; "
             "seeds averaged; `rare`: its large categories' share of all training examples (smaller: rarer tasks).",
             "",
             "| setting | mops | single | client | its large categories | rare | examples | mops ppl | single ppl | "
             "mops vs single |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    pairs = [(ours, base) for ours in labels if parse_label(ours).kind == "mops"
             for base in like_for_like(ours, labels) if parse_label(base).kind == "single"]
    for s in settings:
        for ours, base in pairs:
            mops, single = seed_runs(runs, s, "skew", ours), seed_runs(runs, s, "skew", base)
            if not mops or not single:
                continue
            counts = mops[0]["partition_counts"]
            totals = {cat: sum(counts[k][cat] for k in counts) for cat in next(iter(counts.values()))}
            for client, share in mops[0]["per_client"].items():
                mine = counts[f"client {client}"]
                large = [cat for cat in mine if mine[cat] == max(counts[k][cat] for k in counts) and mine[cat] > 1]
                rare = sum(totals[cat] for cat in large) / sum(totals.values())
                c = compare(mops, single, share["indices"]) if share["examples"] else None
                rows.append(f"| {s} | {ours} | {base} | {client} | {', '.join(large)} | {100 * rare:.0f}% | "
                             f"{share['examples']} | {fmt(seed_mean_ppl(mops, share['indices']))} | "
                             f"{fmt(seed_mean_ppl(single, share['indices']))} | "
                             f"{format_delta(c['mean']) if c else ''} |")
    return lines + rows if rows else []


def _cost(results, settings, labels) -> list[str]:
    runs = results["runs"]
    lines = ["", "## What a federated step costs", "",
             "CPU seconds (every process of the simulation: the server, Ray, each client process; until the "
             "last round ended, final scoring apart) per client step, against a step of centralized MoPs on one "
             f"thread with the same batch and precision (measured in the same study: a bf16 run against "
             f"`mops:mixed_precision=bf16`; none for a run whose clients differed). Target: at most "
             f"{STEP_COST_TARGET}x.", "",
             "| setting | partition | method | seed | client steps | CPU s per client step | of which training | "
             "centralized step CPU s | ratio | wall s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in settings:
        # each federated run against the centralized steps of its own precision
        central = {}
        for key, c in runs.items():
            if key.startswith(f"{s}/centralized/"):
                central.setdefault(c.get("mixed_precision", "no"), []).append(c["cost"]["step_cpu"])
        for part in ("skew", "iid"):
            for m in labels:
                for c in seed_runs(runs, s, part, m):
                    k = c["cost"]
                    # a run whose clients differed in precision (auto on unlike machines) has no like
                    steps = central.get(c.get("precision", "no"))
                    step = statistics.mean(steps) if steps else None
                    ratio = f"{k['cpu_per_client_step'] / step:.2f}x" if step else ""
                    seed = f"{c['seed']} (resumed: its last process only)" if c.get("resumed_after") else c["seed"]
                    lines.append(f"| {s} | {part} | {m} | {seed} | {k['client_steps']} | "
                                 f"{k['cpu_per_client_step']:.2f} | {k['train_cpu_per_client_step']:.2f} | "
                                 f"{fmt(step)} | {ratio} | {fmt(c['wall_seconds'], '.0f')} |")
    example = next((c for k, c in sorted(runs.items()) if c.get("kind") == "federated" and c["label"] == "mops"), None)
    if example:
        k = example["cost"]
        lines += ["", f"Where the CPU time of one run went (`{example['setting']}/{example['partition']}/mops/seed"
                  f"{example['seed']}`, {k['cpu_total']:.0f} CPU s before final scoring; the final scoring took "
                  f"{k['final_scoring_cpu']:.0f} more):", "", "| part | CPU s | share |", "| --- | ---: | ---: |"]
        for part, secs in sorted(k["phases"].items(), key=lambda x: -x[1]):
            lines.append(f"| {part} | {secs:.1f} | {100 * secs / k['cpu_total']:.1f}% |")
    return lines


def _rounds_and_runs(results, settings, labels, stem) -> list[str]:
    runs = results["runs"]
    lines = ["", "## Validation perplexity per round (server side, seed 0)", ""]
    rounds = sorted({r for c in runs.values() for r, _ in c.get("validation", [])})
    lines += ["| setting | partition | method | " + " | ".join(f"r{r}" for r in rounds) + " |",
              "| --- | --- | --- | " + " | ".join("---:" for _ in rounds) + " |"]
    for s in settings:
        for part in ("skew", "iid"):
            for m in labels:
                for c in seed_runs(runs, s, part, m)[:1]:
                    v = dict(c["validation"])
                    lines.append(f"| {s} | {part} | {m} | " + " | ".join(fmt(v.get(r)) for r in rounds) + " |")
    lines += ["", "## Every run", "", "| run | ppl | missing clients | command |", "| --- | ---: | --- | --- |"]
    for key, c in sorted(runs.items()):
        missing = ", ".join(sorted(set(c.get("missing", []))))
        lines.append(f"| {key} | {c['ppl']:.2f} | {missing} | `{c.get('command', '')}` |")
    first = next((c for c in runs.values() if c.get("partition_counts")), None)
    if first:
        from mops.federated.partition import counts_markdown

        lines += ["", "Category counts of each client (skew; the same for every skew run):", "",
                  counts_markdown(next(c for c in runs.values() if c.get("partition") == "skew")["partition_counts"])]
    lines += ["", f"![validation perplexity per round]({stem}.png)", "",
              f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}."]
    return lines


def render(results: dict, out_json: Path) -> None:
    out_json.with_suffix(".md").write_text(markdown(results, out_json.stem))
    plot(results, out_json.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, labels = layout(results)
    if not settings:
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 3.6), squeeze=False)
    for ax, s in zip(axes[0], settings):
        for m in labels:
            for part, style in (("skew", "-"), ("iid", ":")):
                runs = seed_runs(results["runs"], s, part, m)
                if runs:
                    rounds = [r for r, _ in runs[0]["validation"]]
                    ppl = [math.exp(statistics.mean(math.log(dict(c["validation"])[r]) for c in runs
                                                    if r in dict(c["validation"]))) for r in rounds]
                    ax.plot(rounds, ppl, style, marker="o", markersize=3, label=f"{m} ({part})")
        ax.set_title(f"{results['protocol']['prune_method']} {s}: validation, geometric mean over seeds", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("validation response ppl")
        ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(run_cli(main))
