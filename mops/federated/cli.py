"""``mops-recover --federated N ...``: the options of a federated run, and the call.

The mixture and training options of ``mops-recover`` keep their meaning (``--lr``,
``--gate-lr``, ``--batch-size``, ``--gate-pretrain-steps``, ``--eval-examples``, ...);
``--steps`` is replaced by ``--rounds`` x ``--local-steps``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from mops.cli_common import held_out_line
from mops.errors import UserError
from mops.federated.config import STRATEGIES, FederatedConfig
from mops.federated.partition import SCHEMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    f = parser.add_argument_group("federated (Flower simulation on this machine)")
    f.add_argument("--federated", type=int, metavar="N", help="train with N federated clients instead of one "
                   "process: FedAvg of the experts and the gate over --rounds, in Flower's simulation engine")
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
    f.add_argument("--min-clients", type=int, help="a round needs replies from this many clients, else the run stops "
                   "(resumable) (default: more than half)")
    f.add_argument("--round-timeout", type=float, default=3600.0, help="seconds to wait for a round's replies; "
                   "clients later than that are left out of the round (default: 3600)")
    f.add_argument("--client-cpus", type=float, default=1.0, help="CPU cores per simulated client process (default: 1)")


def config_from_args(args) -> FederatedConfig:
    from mops.mixture import MixtureConfig
    from mops.train import TrainConfig

    if args.source_prompt:
        raise UserError("--source-prompt is not supported with --federated (the frozen experts would have to "
                        "be on every client); drop it")
    if args.limit_per_source is not None and args.limit_per_source < 1:
        raise UserError(f"--limit-per-source {args.limit_per_source}: expected a positive whole number")
    mixture = MixtureConfig(n_experts=args.experts, prompt_len=args.prompt_len, gate=args.gate, combine=args.combine,
                            gate_layer=args.gate_layer, inject_layer=args.inject_layer, gate_hidden=args.gate_hidden,
                            temperature=args.temperature, top_k=args.top_k, router_noise=args.router_noise)
    train = TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, gate_lr=args.gate_lr,
                        gate_pretrain_steps=args.gate_pretrain_steps, gate_pretrain_lr=args.gate_pretrain_lr,
                        gate_pretrain_examples=args.gate_pretrain_examples, max_len=args.max_len, eval_examples=args.eval_examples, seed=args.seed,
                        mixed_precision=args.mixed_precision)
    return FederatedConfig(base=args.base, data=list(args.data), n_clients=args.federated, rounds=args.rounds,
                           local_steps=args.local_steps, limit_per_source=args.limit_per_source,
                           partition=args.partition, total_examples=args.fed_examples, skew_ratio=args.skew_ratio,
                           alpha=args.alpha, strategy=args.strategy, proximal_mu=args.proximal_mu,
                           min_clients=args.min_clients, round_timeout=args.round_timeout,
                           mixture=asdict(mixture), train=asdict(train), test_examples=args.test_examples,
                           device=args.device)


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
        lines.append(held_out_line(history["test"]))
    return "\n".join(lines)
