"""Flower's own strategies for the server, and the state a resumed run must give back to them.

``fedavg`` / ``fedprox``: the example-weighted mean (FedProx's clients add the proximal
term). ``fedavgm`` (Hsu et al. 2019) and ``fedadam`` (Reddi et al. 2021) treat the mean's
change as a pseudo-gradient for a server optimiser (server learning rate, momentum, or
Adam's moments). Those moments live inside Flower's strategy objects; a server killed
between rounds saves them beside the global tensors, and a resumed run puts them back, so
it continues exactly.

We call the strategies' ``configure_train`` / ``aggregate_train`` from our own round loop
(``Strategy.start`` can neither resume from a round nor enforce a minimum of replies).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from mops.federated.config import FederatedConfig


def make_strategy(config: FederatedConfig):
    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": config.required_clients,
              "min_evaluate_nodes": 0, "min_available_nodes": config.required_clients}
    s = config.server_settings()
    if config.strategy == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)
    if config.strategy == "fedavgm":
        return FedAvgM(server_learning_rate=s["server_lr"], server_momentum=s["server_momentum"], **common)
    if config.strategy == "fedadam":
        return FedAdam(eta=s["server_lr"], eta_l=config.train_config().lr, beta_1=s["beta1"], beta_2=s["beta2"],
                       tau=s["tau"], **common)
    return FedAvg(**common)


def optimiser_state(strategy, names: list[str]) -> dict[str, torch.Tensor]:
    """The server optimiser's moments, by ``kind/tensor name`` (empty for FedAvg and FedProx,
    and before the first aggregation)."""
    out = {}
    if isinstance(strategy, FedAvgM) and strategy.momentum_vector is not None:
        # Flower keeps FedAvgM's momentum as a list in the order of the aggregated tensors
        out.update({f"momentum/{n}": torch.from_numpy(np.array(v)) for n, v in zip(names, strategy.momentum_vector,
                                                                               strict=True)})
    if isinstance(strategy, FedAdam):
        for kind, moments in (("m", strategy.m_t), ("v", strategy.v_t)):
            out.update({f"{kind}/{n}": torch.from_numpy(np.array(v)) for n, v in (moments or {}).items()})
    return out


def restore_optimiser_state(strategy, state: dict[str, torch.Tensor], names: list[str]) -> None:
    """Put saved moments back into a fresh strategy (the inverse of :func:`optimiser_state`)."""
    if not state:
        return
    if isinstance(strategy, FedAvgM):
        strategy.momentum_vector = [state[f"momentum/{n}"].numpy() for n in names]
    if isinstance(strategy, FedAdam):
        strategy.m_t = {n: state[f"m/{n}"].numpy() for n in names}
        strategy.v_t = {n: state[f"v/{n}"].numpy() for n in names}
