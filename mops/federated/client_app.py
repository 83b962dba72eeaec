"""The Flower ``ClientApp``: local training of the method's tensors (a mixture's experts and
gate, or LoRA's matrices).

Each message carries the run's :class:`FederatedConfig` (as JSON) and, for training, the
global tensors. The client keeps its frozen base in the process (loaded once, checked
against the server's weights hash; LoRA methods inject their adapters into it once), and
its tokenized records too; it trains for E local steps on its own partition
(response-only loss, AdamW with the experts' and the gate's learning rates, a fresh
optimizer each round, as FedAvg clients do; FedProx adds mu/2 ||w - w_global||^2 to the loss,
or, decoupled, moves each tensor lr x mu of the way back after every step), and
replies with the tensors it changed, its example count (the FedAvg weight) and how long
each part took.

The gate learns the category -> expert map (category c -> expert c mod K, the same on
every client) either here, in round 1, on the client's own share of the pretraining
examples (``gate_init = "clients"``: the pretrained gates are then averaged with the
rest), or on the server before round 1 from every client's pooled gate inputs and labels
(``"server"``: the ``query.gate`` handler below sends them once).
"""

from __future__ import annotations

import os

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
    BASE_LOADS,
    Stopwatch,
    categories,
    client_examples,
    client_partitions,
    expert_targets,
    gate_pretrain_share,
    log,
    process_lower_states,
)
from mops.federated.config import CONFIG_KEY, FederatedConfig
from mops.federated.methods import Trainee, setup_for, uploaded_names
from mops.lower_cache import pooled_gate_inputs
from mops.train import (
    BatchOrder,
    autocast,
    pretrain_gate,
    resolve_mixed_precision,
    schedule_lr,
    trainable_groups,
    training_loss,
)

GATE_QUERY = "query.gate"  # the server asks for pooled gate inputs and labels (gate_init = "server")


def phase_metrics(watch: Stopwatch) -> dict[str, float]:
    """``seconds-PHASE`` (wall) and ``cpu-PHASE`` of each lap, as a MetricRecord holds them."""
    out = {}
    for phase, t in watch.laps.items():
        out[f"seconds-{phase}"], out[f"cpu-{phase}"] = t["wall"], t["cpu"]
    return out


def round_seed(seed: int, partition_id: int, server_round: int) -> int:
    """Each client sees its own batch order, new every round, reproducible from the seed."""
    return (seed * 1_000_003 + partition_id) * 1_009 + server_round


def gate_examples(config: FederatedConfig, partition_id: int, tokenizer):
    """This client's share of the gate-pretraining examples and their expert labels."""
    records = client_partitions(config)[partition_id]
    tc = config.train_config()
    subset = stratified_subset(records, gate_pretrain_share(config, partition_id), config.seed)
    targets = expert_targets(subset, categories(config), config.mixture_config().n_experts)
    return [encode_example(tokenizer, r, tc.max_len) for r in subset], targets


@torch.no_grad()
def pull_toward(optimizer, tensors: dict, anchor: dict, mu: float) -> None:
    """FedProx's pull, decoupled from the gradients: each named tensor moves lr x mu of the way
    back to its anchor (its group's learning rate now), whatever the scale of its gradients."""
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, start in anchor.items():
        p = tensors[name]
        if id(p) in rate:  # a tensor no group trains stays where it is
            p.lerp_(start, rate[id(p)] * mu)


def local_train(config: FederatedConfig, partition_id: int, server_round: int, global_state: dict,
                proximal_mu: float = 0.0) -> tuple[dict, dict]:
    """Train from ``global_state`` for ``config.local_steps`` steps; return the tensors to
    send back and what to report (examples, losses, seconds of each part)."""
    watch = Stopwatch()
    setup = setup_for(config)
    lower = process_lower_states()  # this process's store: a client's examples come back every round
    tc = config.train_config()
    examples = client_examples(config, partition_id, setup.tokenizer)
    trainee = Trainee(setup, examples, config.seed)
    trainee.load(global_state)
    lm = trainee.lm
    report = {"num-examples": len(examples), "partition-id": partition_id}
    watch.lap("setup")
    if (server_round == 1 and config.gate_init == "clients" and lm.mixture.needs_gate_states
            and tc.gate_pretrain_steps > 0):
        sub_examples, targets = gate_examples(config, partition_id, setup.tokenizer)
        report["gate-pretrain-loss"] = pretrain_gate(lm, sub_examples, targets, tc, progress=False, lower=lower)[-1]
        report["gate-pretrain-examples"] = len(sub_examples)
    watch.lap("gate_pretrain")
    # FedProx's anchor: the global tensors, after round 1's gate pretraining (that pretraining is the
    # gate's initialisation under gate_init=clients, so the pull does not undo it)
    anchor = {n: p.detach().clone() for n, p in trainee.tensors().items()} if proximal_mu > 0 else {}
    decoupled = bool(anchor) and config.proximal == "decoupled"
    optimizer = torch.optim.AdamW(trainable_groups(lm, tc, trainee.extra_params), weight_decay=0.0)
    order = BatchOrder(len(examples), tc.batch_size, tc.grad_accum, round_seed(config.seed, partition_id, server_round))
    # bf16 autocast, as centralized training: the upper layers' products only; the lower layers'
    # stored states, the gate pretraining above, AdamW and the tensors sent stay float32
    device = lm.mixture.experts.weight.device
    precision = resolve_mixed_precision(tc.mixed_precision, device)
    losses = []
    for step in range(config.local_steps):
        optimizer.zero_grad()
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            batch = [examples[i] for i in order.indices(step, micro)]
            # the run's step count (rounds before this one included): warm-up and router noise follow it
            with autocast(precision, device):
                out = training_loss(lm, batch, tc, (server_round - 1) * config.local_steps + step, micro, lower)
            loss = out.loss
            if anchor and not decoupled:
                params = trainee.tensors()
                loss = loss + proximal_mu / 2 * sum(((params[n] - a) ** 2).sum() for n, a in anchor.items())
            (loss / tc.grad_accum).backward()
            loss_sum += out.lm_loss / tc.grad_accum
        schedule_lr(optimizer, tc, (server_round - 1) * config.local_steps + step, config.rounds * config.local_steps)
        optimizer.step()
        if decoupled:
            pull_toward(optimizer, trainee.tensors(), anchor, proximal_mu)
        losses.append(loss_sum)
    watch.lap("train")
    state = trainee.state(uploaded_names(config, trainee))
    watch.lap("state")
    report.update({"train-loss-first": losses[0], "train-loss": sum(losses) / len(losses),
                   "train-loss-last": losses[-1], "lr-last": optimizer.param_groups[0]["lr"], "pid": os.getpid(),
                   "bf16": int(precision == "bf16"),  # under auto, each client's own machine decides
                   "base-loads": BASE_LOADS[0]})  # 1: the base loaded once in this process
    report.update(phase_metrics(watch))
    log.info("client %d, round %d: %d steps on %d examples, loss %.3f -> %.3f", partition_id, server_round,
             config.local_steps, len(examples), losses[0], losses[-1])
    return state, report


def _config_of(msg: Message, context: Context) -> tuple[FederatedConfig, int]:
    config = FederatedConfig.from_json(msg.content["config"][CONFIG_KEY])
    partition_id = int(context.node_config["partition-id"])
    n = int(context.node_config.get("num-partitions", config.n_clients))
    if n != config.n_clients or not 0 <= partition_id < n:
        raise UserError(f"this node is partition {partition_id} of {n}; the server runs {config.n_clients} clients")
    base_hash = setup_for(config).base_hash
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

    @app.query(GATE_QUERY.split(".")[1])
    def gate_inputs(msg: Message, context: Context) -> Message:
        """This client's share of pretraining examples as the gate sees them (pooled states
        of the frozen layers below g, one d-vector each) with their expert labels."""
        watch = Stopwatch()
        config, partition_id = _config_of(msg, context)
        setup = setup_for(config)
        lm = Trainee(setup, [], config.seed).lm  # pooling needs the gate's kind only, not its weights
        examples, targets = gate_examples(config, partition_id, setup.tokenizer)
        pooled = pooled_gate_inputs(lm, examples, process_lower_states())
        arrays = ArrayRecord({"pooled": pooled.float().cpu().contiguous(), "targets": torch.tensor(targets)})
        spent = watch.lap("gate inputs")
        metrics = MetricRecord({"partition-id": partition_id, "seconds": spent["wall"], "cpu": spent["cpu"]})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        whole, watch = Stopwatch(), Stopwatch()
        config, partition_id = _config_of(msg, context)
        cfg = msg.content["config"]
        state = {}
        for record in msg.content.array_records.values():  # the strategy's tensors, and any held frozen
            state.update(record.to_torch_state_dict())
        received = watch.lap("receive")
        mu = float(cfg["proximal-mu"]) if "proximal-mu" in cfg else 0.0
        tensors, report = local_train(config, partition_id, int(cfg["server-round"]), state, mu)
        watch.lap("local")
        arrays = ArrayRecord(tensors)
        sent = watch.lap("serialise")
        report["seconds-serialise"] = received["wall"] + sent["wall"]
        report["cpu-serialise"] = received["cpu"] + sent["cpu"]
        total = whole.lap("total")
        report["seconds"], report["cpu"] = total["wall"], total["cpu"]
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(report)}), reply_to=msg)

    return app


app = make_client_app()
