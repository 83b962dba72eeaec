"""Why FedProx's proximal term, added to the loss, stalls a prompt client under AdamW.

One client's local steps of one round (client 0, round 2: no gate pretraining), from the
server's initial tensors, with FedProx's mu/2 ||w - w_global||^2 in the loss, as
``mops-recover --federated N --strategy fedprox`` trains. Before each optimizer step it prints,
for the prompt's vectors (``experts.weight``), the mean absolute gradient, how much of it is the
proximal term's (mu |w - w_global|), the loss's own, and how far the prompt has moved. AdamW
divides each coordinate's step by the root of its running squared gradient, so its first step
moves every coordinate by the learning rate, and at the second the proximal gradient is mu x lr
per coordinate; where that outweighs the loss's gradient, the normalised steps that follow answer
the pull more than the loss. ``--proximal decoupled`` avoids this (see
``mops.federated.client_app.pull_toward``).

    python benchmarks/fedprox_gradients.py --base runs/recovery/smollm2-135m-sparsegpt-3of4-calib64x256-seed0 \\
        --method prompt:lr=1.0 --mu 0.01
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the pruned checkpoint the clients train on")
    p.add_argument("--method", default="prompt:lr=1.0", help="what the client trains (mops-recover --method)")
    p.add_argument("--mu", type=float, default=0.01, help="FedProx's proximal weight (default: 0.01)")
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--data", nargs="+", default=["dolly", "natural-instructions"])
    args = p.parse_args(argv)

    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from mops.federated import cli as federated
    from mops.federated.client_app import local_train
    from mops.federated.common import load_splits
    from mops.federated.methods import setup_for
    from mops.federated.server_app import server_start
    from mops.recover_cli import build_parser

    parser = build_parser()
    federated.add_arguments(parser)
    flags = ["--base", args.base, *[a for d in args.data for a in ("--data", d)], "--federated", "4",
             "--partition", "skew", "--rounds", "20", "--local-steps", str(args.local_steps), "--batch-size", "4",
             "--max-len", "256", "--method", args.method, "--strategy", "fedprox", "--proximal-mu", str(args.mu),
             "--out", os.devnull, "--seed", "0", "--split-seed", "0"]
    config = federated.config_from_args(parser.parse_args(flags))
    config.validate()
    _, trainee = server_start(config, setup_for(config), load_splits(config))
    start = trainee.state()  # the server's round-1 tensors
    w0 = start["experts.weight"]

    print(f"|w_global| {w0.abs().mean():.3f} (mean absolute coordinate of the prompt)")
    print("| step | mean abs gradient | of it mu abs(w - w_global) | the loss's | abs(w - w_global) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    step = iter(range(1, 1_000_000))

    def before_step(optimizer, *_):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.shape == w0.shape:
                    moved = p.detach() - w0
                    prox = args.mu * moved
                    print(f"| {next(step)} | {p.grad.abs().mean():.2e} | {prox.abs().mean():.2e} | "
                          f"{(p.grad - prox).abs().mean():.2e} | {moved.abs().mean():.3f} |", flush=True)

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        local_train(config, 0, 2, start, proximal_mu=args.mu)
    finally:
        handle.remove()


if __name__ == "__main__":
    main()
