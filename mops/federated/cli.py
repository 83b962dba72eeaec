"""``mops-recover --federated N ...``: the options of a federated run, and the call.

The mixture and training options of ``mops-recover`` keep their meaning (``--lr``,
``--gate-lr``, ``--batch-size``, ``--gate-pretrain-steps``, ``--eval-examples``, ...);
``--steps`` is replaced by ``--rounds`` x ``--local-steps``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields

from mops.cli_common import held_out_line
from mops.errors import UserError
from mops.federated.config import GATE_INITS, PROXIMAL_FORMS, SCORE_SPLITS, STRATEGIES, FederatedConfig
from mops.federated.partition import SCHEMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    f = parser.add_argument_group("federated (Flower simulation on this machine)")
    f.add_argument("--federated", type=int, metavar="N", help="train with N federated clients instead of one "
                   "process: a Flower strategy (--strategy) over the method's tensors (--method) for --rounds, in "
                   "Flower's simulation engine")
    f.add_argument("--rounds", type=int, default=5, help="federated rounds R (default: 5)")
    f.add_argument("--local-steps", type=int, default=10, help="optimizer steps E of each client per round (default: 10)")
    f.add_argument("--partition", default="skew", help=f"{', '.join(SCHEMES)}: how the training split is spread over "
                   "the clients; skew is the MoPs appendix A skew (default: skew)")
    f.add_argument("--fed-examples", type=int, default=5000, help="training examples spread over the clients, "
                   "stratified by category (default: 5000, or all when fewer)")
    f.add_argument("--skew-ratio", type=float, default=15.0, help="skew: the large partition of each category "
                   "over each small one (default: 15)")
    f.add_argument("--alpha", type=float, default=0.5, help="dirichlet: the concentration (default: 0.5)")
    f.add_argument("--strategy", default="fedavg", help=f"{', '.join(STRATEGIES)} (default: fedavg)")
    f.add_argument("--proximal-mu", type=float, default=0.01, help="fedprox: the proximal weight mu (default: 0.01)")
    f.add_argument("--proximal", default="loss", help=f"fedprox, {' or '.join(PROXIMAL_FORMS)}: mu/2 ||w - w_global||^2 "
                   "added to each client's loss (as published), or, decoupled from the gradients as AdamW decouples "
                   "weight decay, each tensor moved lr x mu of the way back to the global weights after every local "
                   "step (default: loss)")
    f.add_argument("--min-clients", type=int, help="a round needs replies from this many clients, else the run stops "
                   "(resumable) (default: more than half)")
    f.add_argument("--round-timeout", type=float, default=3600.0, help="seconds to wait for a round's replies; "
                   "clients later than that are left out of the round (default: 3600)")
    f.add_argument("--client-cpus", type=float, default=1.0, help="CPU cores per simulated client process (default: 1)")
    f.add_argument("--method", default="mops", help="what the clients train, a method of the recovery study "
                   "NAME[:key=value,...]: mops (the mixture the options above describe), prompt (one prompt of m "
                   "vectors at the input: the federated single prompt), prompt-equal, uniform, attempt, lora (r = "
                   "--lora-rank on every attention and MLP projection, unmerged), lora-equal (default: mops)")
    f.add_argument("--lora-rank", type=int, default=8, help="lora: the adapters' rank (default: 8)")
    f.add_argument("--server-lr", type=float, help="fedavgm / fedadam: the server's learning rate on the averaged "
                   "update (default: 1.0 / 0.1)")
    f.add_argument("--server-momentum", type=float, help="fedavgm: the server's momentum (default: 0.9)")
    f.add_argument("--server-betas", type=float, nargs=2, metavar=("BETA1", "BETA2"),
                   help="fedadam: the server's first and second moment decays (default: 0.9 0.99)")
    f.add_argument("--server-tau", type=float, help="fedadam: the adaptivity tau (default: 0.001)")
    f.add_argument("--gate-init", default="clients", help=f"{', '.join(GATE_INITS)}: where the gate is pretrained on "
                   "category labels: each client in round 1 on its own examples, averaged with the rest; or the "
                   "server, before round 1, on the union of the clients' pooled gate inputs and labels (with "
                   "--gate-lr 0 it then stays frozen and is never sent back) (default: clients)")
    f.add_argument("--eval-every-rounds", type=int, default=1, help="the server's validation perplexity every k "
                   "rounds and after the last (default: 1)")
    f.add_argument("--score-split", default="test", help=f"{', '.join(SCORE_SPLITS)}: the held-out split scored at "
                   "the end (--test-examples of it); validation for tuning (default: test)")
    f.add_argument("--no-base-score", dest="score_base", action="store_false", help="score only the adapter at "
                   "the end, not the base alone too (it is the same for every run on one base)")
    f.add_argument("--split-seed", type=int, help="seed of the data split, the partition and the scored examples, so "
                   "runs with other --seed values keep the same clients and test examples (default: --seed)")


def config_from_args(args) -> FederatedConfig:
    from mops.mixture import MixtureConfig
    from mops.train import TrainConfig

    if args.source_prompt:
        raise UserError("--source-prompt is not supported with --federated (the frozen experts would have to "
                        "be on every client); drop it")
    if args.limit_per_source is not None and args.limit_per_source < 1:
        raise UserError(f"--limit-per-source {args.limit_per_source}: expected a positive whole number")
    if args.teacher:
        raise UserError("--teacher is not supported with --federated (clients do not distill); drop it")
    # Every mixture and training option mops-recover has (their flags are the fields' names, --experts
    # apart), so one added there reaches the clients too; --steps is rounds x local steps here.
    mixture = MixtureConfig(n_experts=args.experts, **{f.name: getattr(args, f.name) for f in fields(MixtureConfig)
                                                       if f.name != "n_experts" and hasattr(args, f.name)})
    train = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                           if f.name not in ("steps", "eval_every", "checkpoint_every") and hasattr(args, f.name)})
    return FederatedConfig(base=args.base, data=list(args.data), n_clients=args.federated, rounds=args.rounds,
                           local_steps=args.local_steps, limit_per_source=args.limit_per_source,
                           partition=args.partition, total_examples=args.fed_examples, skew_ratio=args.skew_ratio,
                           alpha=args.alpha, strategy=args.strategy, proximal_mu=args.proximal_mu,
                           proximal=args.proximal,
                           min_clients=args.min_clients, round_timeout=args.round_timeout,
                           mixture=asdict(mixture), train=asdict(train), test_examples=args.test_examples,
                           device=args.device, method=args.method, lora_rank=args.lora_rank, server_lr=args.server_lr,
                           server_momentum=args.server_momentum,
                           beta1=args.server_betas[0] if args.server_betas else None,
                           beta2=args.server_betas[1] if args.server_betas else None, tau=args.server_tau,
                           gate_init=args.gate_init, eval_every_rounds=args.eval_every_rounds,
                           score_split=args.score_split, split_seed=args.split_seed, score_base=args.score_base)


def run_from_args(args) -> None:
    """The ``--federated`` branch of ``mops-recover``: build the config, run, summarise."""
    from mops.federated.simulation import run_federated

    config = config_from_args(args)
    history = run_federated(config, args.out, force=args.force, resume=args.resume, client_cpus=args.client_cpus,
                            quiet=args.quiet)
    print(summary(history, args.out))


def summary(history: dict, out) -> str:
    val = history["validation"]
    lines = [f"federated adapter -> {out}",
             f"  validation response ppl: {val[0]['ppl']:.2f} at round 0 -> {val[-1]['ppl']:.2f} at round {val[-1]['round']}"]
    for r in history["rounds"]:
        if r["missing"]:
            lines.append(f"  round {r['round']}: missing {', '.join(m['client'] for m in r['missing'])}")
    if "test" in history:
        t = history["test"]
        if t["base"]:
            line = held_out_line(t)
            lines.append(line if t["split"] == "test" else line.replace("held-out test", f"held-out {t['split']}"))
        else:
            lines.append(f"  held-out {t['split']} response ppl ({t['examples']} examples): with adapter "
                         f"{t['adapter']['ppl']:.2f}")
        lines.append("  on each client's own share: " + ", ".join(
            f"client {k} " + (f"{v['base_ppl']:.2f} -> " if v["base_ppl"] else "") + f"{v['adapter_ppl']:.2f}"
            for k, v in t["per_client"].items() if v["examples"]))
    return "\n".join(lines)


NEW_OPTIONS = {"method": "--method", "lora_rank": "--lora-rank", "server_lr": "--server-lr",
               "server_momentum": "--server-momentum", "server_betas": "--server-betas", "server_tau": "--server-tau",
               "gate_init": "--gate-init", "eval_every_rounds": "--eval-every-rounds", "score_split": "--score-split",
               "split_seed": "--split-seed", "score_base": "--no-base-score"}


def refuse_without_federated(args, parser: argparse.ArgumentParser) -> None:
    """Options that only a federated run reads, given without ``--federated``: a one-line error."""
    given = [flag for name, flag in NEW_OPTIONS.items() if getattr(args, name) != parser.get_default(name)]
    if given:
        raise UserError(f"{', '.join(given)}: only with --federated N (a centralized run takes its method's options "
                        "directly: --gate, --experts, ...)")
