"""The Flower ``ClientApp``: local training of the mixture's trainable tensors.

Each message carries the run's :class:`FederatedConfig` (as JSON) and, for training, the
global experts and gate. The client keeps its frozen base in the process (loaded once,
checked against the server's weights hash), trains the mixture for E local steps on its
own partition (response-only loss, AdamW with the experts' and the gate's learning rates,
a fresh optimizer each round, as FedAvg clients do; FedProx adds mu/2 ||w - w_global||^2),
and replies with the tensors and its example count, the FedAvg weight.

In round 1 a client first pretrains the gate on its own records' categories (experts
frozen), with the global category -> expert map, so the averaged gates agree on experts.
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from mops.data import encode_example, stratified_subset
from mops.errors import UserError
from mops.federated.common import (
    cached_base,
    categories,
    client_partitions,
    load_trainable,
    log,
    process_lower_states,
    trainable_state,
)
from mops.federated.config import CONFIG_KEY, FederatedConfig
from mops.train import (
    BatchOrder,
    build_mixture,
    pretrain_gate,
    trainable_groups,
    training_loss,
)


def expert_targets(records, all_categories: list[str], n_experts: int) -> list[int]:
    """Category c (in the global sorted order) -> expert c mod K, the same on every client."""
    index = {c: i % n_experts for i, c in enumerate(all_categories)}
    return [index[r.category] for r in records]


def round_seed(seed: int, partition_id: int, server_round: int) -> int:
    """Each client sees its own batch order, new every round, reproducible from the seed."""
    return (seed * 1_000_003 + partition_id) * 1_009 + server_round


def local_train(config: FederatedConfig, partition_id: int, server_round: int, global_state: dict,
                proximal_mu: float = 0.0) -> tuple[dict, dict]:
    """Train from ``global_state`` for ``config.local_steps`` steps; return the new
    trainable tensors and what to report (examples, losses, seconds)."""
    started = time.perf_counter()
    model, tokenizer, _ = cached_base(config.base, config.device)
    lower = process_lower_states()  # this process's store: a client's examples come back every round
    records = client_partitions(config)[partition_id]
    tc = config.train_config()
    examples = [encode_example(tokenizer, r, tc.max_len) for r in records]
    lm = build_mixture(model, tokenizer, examples, config.mixture_config(), config.seed, initialise=False)
    load_trainable(lm.mixture, global_state)
    report = {"num-examples": len(records), "partition-id": partition_id}
    if server_round == 1 and lm.mixture.needs_gate_states and tc.gate_pretrain_steps > 0:
        subset = stratified_subset(records, tc.gate_pretrain_examples, config.seed)
        targets = expert_targets(subset, categories(config), lm.mixture.config.n_experts)
        sub_examples = [encode_example(tokenizer, r, tc.max_len) for r in subset]
        losses = pretrain_gate(lm, sub_examples, targets, tc, progress=False, lower=lower)
        report["gate-pretrain-loss"] = losses[-1]
    anchor = {n: p.detach().clone() for n, p in lm.mixture.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable_groups(lm, tc), weight_decay=0.0)
    order = BatchOrder(len(examples), tc.batch_size, tc.grad_accum, round_seed(config.seed, partition_id, server_round))
    losses = []
    for step in range(config.local_steps):
        optimizer.zero_grad()
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            batch = [examples[i] for i in order.indices(step, micro)]
            # the run's step count (rounds before this one included): warm-up and router noise follow it
            out = training_loss(lm, batch, tc, (server_round - 1) * config.local_steps + step, micro, lower)
            loss = out.loss
            if proximal_mu > 0:
                params = dict(lm.mixture.named_parameters())
                loss = loss + proximal_mu / 2 * sum(((params[n] - a) ** 2).sum() for n, a in anchor.items())
            (loss / tc.grad_accum).backward()
            loss_sum += out.lm_loss / tc.grad_accum
        optimizer.step()
        losses.append(loss_sum)
    report.update({"train-loss-first": losses[0], "train-loss": sum(losses) / len(losses),
                   "train-loss-last": losses[-1], "seconds": time.perf_counter() - started, "pid": os.getpid(),
                   "base-loads": cached_base.cache_info().misses})  # 1: the base loaded once in this process
    log.info("client %d, round %d: %d steps on %d examples, loss %.3f -> %.3f", partition_id, server_round,
             config.local_steps, len(records), losses[0], losses[-1])
    return trainable_state(lm.mixture), report


def _config_of(msg: Message, context: Context) -> tuple[FederatedConfig, int]:
    config = FederatedConfig.from_json(msg.content["config"][CONFIG_KEY])
    partition_id = int(context.node_config["partition-id"])
    n = int(context.node_config.get("num-partitions", config.n_clients))
    if n != config.n_clients or not 0 <= partition_id < n:
        raise UserError(f"this node is partition {partition_id} of {n}; the server runs {config.n_clients} clients")
    _, _, base_hash = cached_base(config.base, config.device)
    if base_hash != msg.content["config"]["base-hash"]:
        raise UserError(f"this node's base {config.base!r} (sha256 {base_hash[:12]}) is not the server's "
                        f"(sha256 {msg.content['config']['base-hash'][:12]})")
    return config, partition_id


def make_client_app(mods=None) -> ClientApp:
    """The ClientApp; ``mods`` are Flower client mods wrapped around every handler."""
    app = ClientApp(mods=mods or [])

    @app.query()
    def hello(msg: Message, context: Context) -> Message:
        """Say which partition this node holds (and load and check the base up front)."""
        _, partition_id = _config_of(msg, context)
        return Message(RecordDict({"hello": ConfigRecord({"partition-id": partition_id})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config, partition_id = _config_of(msg, context)
        cfg = msg.content["config"]
        state = msg.content["arrays"].to_torch_state_dict()
        mu = float(cfg["proximal-mu"]) if "proximal-mu" in cfg else 0.0
        tensors, report = local_train(config, partition_id, int(cfg["server-round"]), state, mu)
        content = RecordDict({"arrays": ArrayRecord(tensors), "metrics": MetricRecord(report)})
        return Message(content, reply_to=msg)

    return app


app = make_client_app()
