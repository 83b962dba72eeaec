"""What the server and the clients share: the data and its partition, the frozen base
(loaded once per process and cached there, never sent), and the measure of what travels."""

from __future__ import annotations

import logging
import time
from functools import lru_cache

import numpy as np

from mops.data import EncodedExample, InstructionRecord, encode_example, load_records, split_records
from mops.federated.config import FederatedConfig
from mops.federated.partition import apportion, partition

log = logging.getLogger("mops.federated")
BASE_LOADS = [0]  # how many times this process has read a base from disk (1 per kind: cached, never sent)


def load_frozen_base(spec: str, device: str = "cpu"):
    """``(model, tokenizer, weights sha256)``: a fresh copy of the base, frozen."""
    from mops.models import load_model, weights_hash

    model, tokenizer = load_model(spec, device=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    BASE_LOADS[0] += 1
    log.info("loaded the frozen base %s in this process", spec)
    return model, tokenizer, weights_hash(model)


@lru_cache(maxsize=2)
def cached_base(spec: str, device: str = "cpu"):
    """The frozen base, loaded once per process (prompt methods share it)."""
    return load_frozen_base(spec, device)


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
    return _splits(tuple(config.data), config.limit_per_source, config.data_seed)


@lru_cache(maxsize=4)
def _parts(data, limit_per_source, seed, n_clients, scheme, total, ratio, alpha):
    train = _splits(data, limit_per_source, seed)["train"]
    return partition(train, n_clients, scheme, total, ratio, alpha, seed)


def client_partitions(config: FederatedConfig) -> list[list[InstructionRecord]]:
    """Every client's training records; each client computes the same split from the seed
    and keeps its own part (as ``flwr-datasets`` partitioners do)."""
    return _parts(tuple(config.data), config.limit_per_source, config.data_seed, config.n_clients, config.partition,
                  config.total_examples, config.skew_ratio, config.alpha)


_ENCODED: dict[tuple, list[EncodedExample]] = {}


def client_examples(config: FederatedConfig, partition_id: int, tokenizer) -> list[EncodedExample]:
    """A client's training records, tokenized once per process (they come back every round)."""
    key = (tuple(config.data), config.limit_per_source, config.data_seed, config.n_clients, config.partition,
           config.total_examples, config.skew_ratio, config.alpha, partition_id, config.base,
           config.train_config().max_len)
    if key not in _ENCODED:
        if len(_ENCODED) >= 8:  # another run in this process: forget the old one's
            _ENCODED.clear()
        max_len = config.train_config().max_len
        _ENCODED[key] = [encode_example(tokenizer, r, max_len) for r in client_partitions(config)[partition_id]]
    return _ENCODED[key]


def categories(config: FederatedConfig) -> list[str]:
    """Every category of the training split, sorted: the gate's category -> expert map."""
    return sorted({r.category for r in load_splits(config)["train"]})


def expert_targets(records, all_categories: list[str], n_experts: int) -> list[int]:
    """Category c (in the global sorted order) -> expert c mod K, the same on every client."""
    index = {c: i % n_experts for i, c in enumerate(all_categories)}
    return [index[r.category] for r in records]


def gate_pretrain_share(config: FederatedConfig, partition_id: int) -> int:
    """How many of ``gate_pretrain_examples`` (a total over all clients, as one centralized
    run pretrains on that many) this client pretrains on: a share by its example count."""
    sizes = [len(p) for p in client_partitions(config)]
    total = min(config.train_config().gate_pretrain_examples, sum(sizes))
    return max(1, apportion(total, sizes)[partition_id])


def tensor_bytes(content) -> int:
    """Bytes of the tensors a message carries: numel x itemsize of every Array in every
    ArrayRecord of its ``RecordDict`` (the .npy header and key of each, ~130 bytes, left out)."""
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
               for record in content.array_records.values() for a in record.values())


class Stopwatch:
    """Wall and CPU seconds of consecutive phases. CPU time is this process's (all its
    threads): on a shared machine it is what a phase costs, where wall time also counts
    waiting for a core."""

    def __init__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self.laps: dict[str, dict[str, float]] = {}

    def lap(self, name: str) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = {"wall": wall - self._wall, "cpu": cpu - self._cpu}
        self._wall, self._cpu = wall, cpu
        return self.laps[name]


def process_tree_cpu() -> dict:
    """CPU seconds (user + system) so far of this process and of every process below it:
    in Flower's simulation engine, Ray's daemons and every client process, with everything
    they did (starting, imports, loading the base, training). A run's whole cost."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    own = t.user + t.system + t.children_user + t.children_system  # reaped children count too
    others, count = 0.0, 0
    for p in me.children(recursive=True):
        try:
            c = p.cpu_times()
        except psutil.Error:  # gone meanwhile
            continue
        others, count = others + c.user + c.system, count + 1
    return {"this_process": own, "other_processes": others, "processes": count, "total": own + others}
