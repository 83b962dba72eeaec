"""``run_federated(config, out)``: the ServerApp and N ClientApps in Flower's simulation
engine (Ray) on one machine; what ``mops-recover --federated N`` calls."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mops.errors import UserError
from mops.federated.common import Stopwatch, client_partitions, log
from mops.federated.config import FederatedConfig
from mops.federated.methods import method_mixture
from mops.federated.partition import category_counts, counts_markdown
from mops.federated.server_app import (
    FederatedServer,
    checkpoint_dir_for,
    make_server_app,
)
from mops.models import check_causal_lm, resolve_checkpoint
from mops.outputs import check_output_dir


def run_federated(config: FederatedConfig, out, *, force: bool = False, resume: bool = False,
                  client_cpus: float = 1.0, client_app=None, save_rounds: bool = False, on_round=None,
                  quiet: bool = False) -> dict:
    """Run the federated recovery; return the server's history (also in ``out/history.json``).

    ``client_cpus``: CPU cores Ray gives each client process (2 cores and 1 per client:
    two clients train at a time). ``client_app`` replaces the default ClientApp (e.g. one
    with Flower mods around it). ``save_rounds`` keeps every client's returned tensors and
    each round's aggregate under ``out/rounds/``.
    """
    from flwr.simulation import run_simulation

    started = Stopwatch()  # the startup's cost counts: Ray, Flower and the checks below
    config.validate()
    if not client_cpus > 0:
        raise UserError(f"--client-cpus {client_cpus}: expected a positive number of cores")
    # Bad mixture sizes or layers fail here, in one line, before Ray starts.
    model_config = check_causal_lm(resolve_checkpoint(config.base))
    config.mixture_config().resolved(model_config.num_hidden_layers)
    method_mixture(config, model_config.hidden_size, model_config.num_hidden_layers)
    check_output_dir(out, force or resume)
    ckpt = checkpoint_dir_for(out)
    if ckpt.exists() and not (resume or force):
        raise UserError(f"an interrupted federated run left a checkpoint at {ckpt}; pass --resume to continue it, "
                        "or --force to start over")
    if force and not resume:
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)
    # Partition here first: bad partition settings fail before Ray starts, and the table is shown.
    table = category_counts(client_partitions(config))
    print(f"{config.partition} partition of the training split over {config.n_clients} clients:\n"
          f"{counts_markdown(table)}", flush=True)
    if config.device.startswith("cuda"):
        gpus = 1.0 / min(config.n_clients, 4)
    else:
        gpus = 0.0
    server = FederatedServer(config, out, resume=resume, force=force, save_rounds=save_rounds, on_round=on_round,
                             started=started)
    if client_app is None:
        from mops.federated.client_app import app as client_app
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Flower 1.41 passes client_resources to Ray's actor options. Without restarts, a client
    # process that dies stays in Flower's pool and fails every later client sent to it;
    # max_restarts brings a fresh process (which loads the base once again) for the next one.
    backend = ray_backend(client_cpus, gpus, quiet)
    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(server_app=make_server_app(server), client_app=client_app, num_supernodes=config.n_clients,
                   backend_config=backend)
    if server.history is None:
        raise RuntimeError("the federated run ended without a result (see the log above)")
    log.info("federated adapter -> %s", Path(out))
    return server.history


def usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. under ``taskset``), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ray_backend(client_cpus: float, gpus: float, quiet: bool) -> dict:
    """Flower's Ray backend: each client process gets ``client_cpus`` of the cores this process
    may use. Ray counts the machine's cores otherwise, so a run pinned to one core of two
    would train two clients at a time on that one core, each step slower for the sharing."""
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": gpus, "max_restarts": -1},
            "init_args": {"num_cpus": usable_cores(), "logging_level": "ERROR" if quiet else "WARNING",
                          "log_to_driver": not quiet, "include_dashboard": False}}
