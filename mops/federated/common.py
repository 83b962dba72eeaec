"""What the server and the clients share: the data and its partition, the frozen base
(loaded once per process and cached there, never sent), and the tensors that travel."""

from __future__ import annotations

import logging
from functools import lru_cache

import torch

from mops.adapter import weights_hash
from mops.data import InstructionRecord, load_records, split_records
from mops.federated.config import FederatedConfig
from mops.federated.partition import partition
from mops.mixture import Mixture

log = logging.getLogger("mops.federated")


@lru_cache(maxsize=2)
def cached_base(spec: str, device: str = "cpu"):
    """``(model, tokenizer, weights sha256)`` of the frozen base, loaded once per process."""
    from mops.models import load_model

    model, tokenizer = load_model(spec, device=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded the frozen base %s once in this process", spec)
    return model, tokenizer, weights_hash(model)


@lru_cache(maxsize=1)
def process_lower_states():
    """One store of the frozen lower layers' states per process (server or client): the
    same examples are trained on or scored every round."""
    from mops.lower_cache import LowerStates

    return LowerStates()


@lru_cache(maxsize=4)
def _splits(data: tuple[str, ...], limit_per_source: int | None, seed: int) -> dict[str, list[InstructionRecord]]:
    return split_records(load_records(list(data), limit_per_source, seed), seed)


def load_splits(config: FederatedConfig) -> dict[str, list[InstructionRecord]]:
    """train / validation / test, exactly as ``mops-recover`` splits the same data and seed."""
    return _splits(tuple(config.data), config.limit_per_source, config.seed)


@lru_cache(maxsize=4)
def _parts(data, limit_per_source, seed, n_clients, scheme, total, ratio, alpha):
    train = _splits(data, limit_per_source, seed)["train"]
    return partition(train, n_clients, scheme, total, ratio, alpha, seed)


def client_partitions(config: FederatedConfig) -> list[list[InstructionRecord]]:
    """Every client's training records; each client computes the same split from the seed
    and keeps its own part (as ``flwr-datasets`` partitioners do)."""
    return _parts(tuple(config.data), config.limit_per_source, config.seed, config.n_clients, config.partition,
                  config.total_examples, config.skew_ratio, config.alpha)


def categories(config: FederatedConfig) -> list[str]:
    """Every category of the training split, sorted: the gate's category -> expert map."""
    return sorted({r.category for r in load_splits(config)["train"]})


def trainable_state(mixture: Mixture) -> dict[str, torch.Tensor]:
    """Only what trains (experts, gate, ATTEMPT's target prompt): what a client sends."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in mixture.named_parameters() if p.requires_grad}


def load_trainable(mixture: Mixture, state: dict[str, torch.Tensor]) -> None:
    expected = {n for n, p in mixture.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise ValueError(f"federated tensors {sorted(state)} do not match this mixture's {sorted(expected)}")
    with torch.no_grad():
        params = dict(mixture.named_parameters())
        for name, value in state.items():
            params[name].copy_(value.to(params[name]))
