"""The Flower ``ServerApp``: R rounds of a Flower strategy over the method's tensors.

Each round the server sends the global tensors to every connected client, waits up to
``round_timeout`` seconds, and aggregates what arrived with Flower's own strategy
(:mod:`mops.federated.strategies`: FedAvg, FedProx, FedAvgM, FedAdam). A client that
crashes, raises or times out is named in the log and in the history; a round with fewer
than ``required_clients`` replies stops the run (the last completed round stays
checkpointed, so ``resume`` continues once the clients are back). The global adapter's
validation perplexity is measured here, on the server's own copy of the base, every
``eval_every_rounds`` rounds; every round is checkpointed with the server optimiser's
moments, so a killed server resumes exactly. At the end the adapter is written
(atomically) with the held-out perplexity, overall and on each client's own share.

With ``gate_init = "server"`` a gate round comes first: every client sends the pooled gate
inputs and category labels of its share of the pretraining examples (d numbers per
example, once; the examples themselves stay), and the server pretrains the gate on their
union. ``gate_lr`` 0 then keeps that gate: it travels down every round, never back.

The history records, per round and client, the bytes of the tensors in the message sent
to it and in its reply, and the seconds each part of the round took.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load_file, save_file

from mops.adapter import write_adapter_files
from mops.data import encode_example, stratified_subset
from mops.errors import UserError
from mops.eval.perplexity import RESPONSE_MAX_LEN, response_perplexity
from mops.federated.client_app import GATE_QUERY
from mops.federated.common import (
    Stopwatch,
    client_partitions,
    load_splits,
    log,
    process_lower_states,
    process_tree_cpu,
    tensor_bytes,
)
from mops.federated.config import CONFIG_KEY, FederatedConfig
from mops.federated.methods import LORA_FILE, Trainee, adapters_off, lora_state, setup_for, uploaded_names
from mops.federated.partition import category_counts, counts_markdown, held_out_shares
from mops.federated.strategies import make_strategy, optimiser_state, restore_optimiser_state
from mops.outputs import atomic_dir
from mops.train import pretrain_gate

CKPT_STATE = "server_state.json"
CKPT_TENSORS = "global.safetensors"
CKPT_OPTIMISER = "server_optimiser.safetensors"


def checkpoint_dir_for(out) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.federated-checkpoint"


def _reason(msg: Message) -> str:
    text = str(msg.error.reason)
    # Ray wraps the client's exception in its traceback; its last non-empty line says what happened.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("^~ ")]
    return (lines[-1] if lines else text)[:300]


def save_server_checkpoint(folder: Path, state: dict, optimiser: dict, completed: int, history: dict,
                           config) -> None:
    with atomic_dir(folder, force=True) as tmp:
        save_file(state, tmp / CKPT_TENSORS)
        save_file(optimiser, tmp / CKPT_OPTIMISER)
        (tmp / CKPT_STATE).write_text(json.dumps({"round": completed, "history": history,
                                                   "fingerprint": config.fingerprint()}))


#: settings added after server checkpoints were first written, each at the value that does what
#: the code did before it existed: a checkpoint without the key resumes under that value only.
#: (Not every default qualifies: ``lora_lr`` came after federated LoRA, which had trained at ``lr``.)
ADDED_SETTINGS = {"proximal": "loss"}


def server_start(config: FederatedConfig, setup, splits: dict) -> tuple[list, Trainee]:
    """The server's validation examples and its round-1 tensors: the global experts start from
    real activations of those (validation) inputs; LoRA starts as its injection left it."""
    tc = config.train_config()
    val = stratified_subset(splits["validation"], tc.eval_examples, config.data_seed)
    examples = [encode_example(setup.tokenizer, r, tc.max_len) for r in val]
    return val, Trainee(setup, examples, config.seed, initialise=not setup.lora)


def load_server_checkpoint(folder: Path, config: FederatedConfig) -> tuple[dict, dict, int, dict]:
    """(global tensors, server optimiser moments, completed rounds, history)."""
    if not (folder / CKPT_STATE).is_file():
        raise UserError(f"--resume: no federated checkpoint at {folder}; start without --resume")
    state = json.loads((folder / CKPT_STATE).read_text())
    now = config.fingerprint()
    saved = ADDED_SETTINGS | state["fingerprint"]
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise UserError(f"--resume: the checkpoint at {folder} was made with other {', '.join(changed)}; "
                        "rerun with the original options, or start over with --force")
    return load_file(folder / CKPT_TENSORS), load_file(folder / CKPT_OPTIMISER), state["round"], state["history"]


def client_phases(metrics) -> dict[str, dict[str, float]]:
    """A reply's ``seconds-PHASE`` / ``cpu-PHASE`` metrics as {phase: {wall, cpu}}, with the total."""
    phases = {}
    for key, wall in metrics.items():
        if key.startswith("seconds-"):
            phase = key.removeprefix("seconds-")
            phases[phase] = {"wall": float(wall), "cpu": float(metrics[f"cpu-{phase}"])}
    return phases | {"total": {"wall": float(metrics["seconds"]), "cpu": float(metrics["cpu"])}}


def subset_perplexity(result: dict, indices: list[int]) -> float | None:
    """Token-weighted perplexity of some of a result's examples (``per_example`` sums)."""
    nll = sum(result["per_example"]["nll"][i] for i in indices)
    tokens = sum(result["per_example"]["tokens"][i] for i in indices)
    return math.exp(nll / tokens) if tokens else None


class FederatedServer:
    """One run of the server side; ``serve(grid)`` is the ServerApp's main."""

    def __init__(self, config: FederatedConfig, out, *, resume: bool = False, force: bool = False,
                 save_rounds: bool = False, on_round: Callable[[int, dict], None] | None = None,
                 started: Stopwatch | None = None):
        self.config, self.out, self.resume, self.force = config, Path(out), resume, force
        self.save_rounds, self.on_round = save_rounds, on_round
        self.started = started  # running since the simulation was asked for (Ray's start counts)
        self.checkpoint_dir = checkpoint_dir_for(out)
        self.rounds_dir = self.out.parent / f".{self.out.name}.rounds"
        self.history: dict | None = None  # the finished run's history
        self.running: dict = {}  # the history while the rounds run

    # -------------------------------------------------------------- pieces
    def _message_config(self) -> ConfigRecord:
        return ConfigRecord({CONFIG_KEY: self.config.to_json(), "base-hash": self.setup.base_hash})

    def _validate(self, state: dict) -> dict:
        watch = Stopwatch()
        self.trainee.load(state)
        result = response_perplexity(self.trainee.lm.eval(), self.setup.tokenizer, self.val,
                                     self.config.train_config().max_len, progress=False, lower=process_lower_states())
        spent = watch.lap("validation")
        return {"ppl": result["ppl"], "per_category": result["per_category"], "examples": result["examples"],
                "seconds": spent["wall"], "cpu": spent["cpu"]}

    def _hello(self, grid: Grid) -> dict[int, int]:
        """Ask every connected node for its partition id (and so load every client's base up front)."""
        c = self.config
        deadline = time.time() + c.round_timeout
        while len(nodes := list(grid.get_node_ids())) < c.n_clients and time.time() < deadline:
            time.sleep(1)
        if len(nodes) < c.required_clients:
            raise UserError(f"only {len(nodes)} of {c.n_clients} clients connected within {c.round_timeout:.0f} s")
        record = RecordDict({"config": self._message_config()})
        replies = grid.send_and_receive([Message(record, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes],
                                        timeout=c.round_timeout)
        names = {}
        for r in replies:
            if r.has_error():
                log.warning("node %d did not say hello: %s", r.metadata.src_node_id, _reason(r))
            else:
                names[r.metadata.src_node_id] = int(r.content["hello"]["partition-id"])
        return names

    def _name(self, node_id: int) -> str:
        p = self.node_partition.get(node_id)
        return f"client {p}" if p is not None else f"node {node_id}"

    def _key(self, node_id: int) -> str:
        p = self.node_partition.get(node_id)
        return str(p) if p is not None else f"node {node_id}"

    def _exchange(self, label: str, messages: list[Message]) -> tuple[list[Message], list[dict], dict]:
        """Send, wait, sort the replies from the missing; (good replies, missing, bytes sent to each)."""
        c = self.config
        down = {self._key(m.metadata.dst_node_id): tensor_bytes(m.content) for m in messages}
        sent = {m.metadata.dst_node_id for m in messages}
        replies = list(self.grid.send_and_receive(messages, timeout=c.round_timeout))
        good = [r for r in replies if not r.has_error()]
        missing = [{"client": self._name(n), "node_id": n, "reason": "no reply within the round timeout"}
                   for n in sorted(sent - {r.metadata.src_node_id for r in replies})]
        missing += [{"client": self._name(r.metadata.src_node_id), "node_id": r.metadata.src_node_id,
                     "reason": _reason(r)} for r in replies if r.has_error()]
        for m in missing:
            log.warning("%s: %s missing: %s", label, m["client"], m["reason"])
        if len(good) < c.required_clients:
            raise UserError(f"{label}: {len(good)} of {len(sent)} clients replied, fewer than the "
                            f"{c.required_clients} required (missing: {', '.join(m['client'] for m in missing)}); "
                            "the completed rounds are checkpointed, rerun with --resume")
        for r in good:  # names learnt from replies too (a node that missed the hello)
            self.node_partition.setdefault(r.metadata.src_node_id, int(r.content["metrics"]["partition-id"]))
        return good, missing, down

    def _gate_round(self, history: dict) -> None:
        """Pretrain the gate here, on the union of the clients' pooled gate inputs and labels."""
        watch = Stopwatch()
        record = RecordDict({"config": self._message_config()})
        nodes = sorted(self.grid.get_node_ids())
        good, missing, down = self._exchange("gate round", [Message(record, dst_node_id=n, message_type=GATE_QUERY)
                                                            for n in nodes])
        good.sort(key=lambda r: int(r.content["metrics"]["partition-id"]))  # the union in a fixed order
        pooled = torch.cat([torch.from_numpy(r.content["arrays"]["pooled"].numpy()) for r in good])
        targets = torch.cat([torch.from_numpy(r.content["arrays"]["targets"].numpy()) for r in good]).tolist()
        losses = pretrain_gate(self.trainee.lm, [], targets, self.config.train_config(), progress=False, pooled=pooled)
        history["gate_round"] = {
            "clients": [int(r.content["metrics"]["partition-id"]) for r in good], "missing": missing,
            "examples": {self._key(r.metadata.src_node_id): int(r.content["arrays"]["targets"].shape[0]) for r in good},
            "bytes_down": down, "bytes_up": {self._key(r.metadata.src_node_id): tensor_bytes(r.content) for r in good},
            "client_timing": {self._key(r.metadata.src_node_id): {"wall": float(r.content["metrics"]["seconds"]),
                                                                   "cpu": float(r.content["metrics"]["cpu"])}
                              for r in good},
            "loss_first": losses[0], "loss": losses[-1], "timing": watch.lap("gate round")}
        log.info("gate round: the gate pretrained on %d examples of %d clients, loss %.3f -> %.3f", len(targets),
                 len(good), losses[0], losses[-1])

    def _round(self, rnd: int, state: dict, up: list[str]) -> tuple[dict, dict]:
        """One round: send, collect, aggregate; (the new global tensors, the history entry)."""
        watch = Stopwatch()
        frozen = {k: v for k, v in state.items() if k not in up}
        messages = list(self.strategy.configure_train(rnd, ArrayRecord({k: state[k] for k in up}),
                                                      self._message_config(), self.grid))
        if frozen:  # tensors the clients use but never change: down only, beside the strategy's
            for m in messages:
                m.content["frozen"] = ArrayRecord(frozen)
        good, missing, down = self._exchange(f"round {rnd}", messages)
        for r in good:  # how many times each client process has loaded the frozen base (1: cached, never sent)
            self.running.setdefault("base_loads", {})[str(int(r.content["metrics"]["pid"]))] = \
                int(r.content["metrics"]["base-loads"])
        exchange = watch.lap("exchange")
        new_arrays, metrics = self.strategy.aggregate_train(rnd, good)
        # FedAdam's step comes back in float64; the global tensors keep the clients' dtype
        new_state = {**frozen, **{k: v.to(state[k].dtype) for k, v in new_arrays.to_torch_state_dict().items()}}
        aggregate = watch.lap("aggregate")
        replies = {str(int(r.content["metrics"]["partition-id"])): r for r in good}
        if self.save_rounds:  # what each client returned and the aggregate, for checking the strategies
            folder = self.rounds_dir / f"round_{rnd}"
            folder.mkdir(parents=True, exist_ok=True)
            for pid, r in replies.items():
                save_file(dict(r.content["arrays"].to_torch_state_dict()), folder / f"client_{pid}.safetensors")
            save_file(new_state, folder / "global.safetensors")
        client_timing = {pid: client_phases(r.content["metrics"]) for pid, r in replies.items()}
        entry = {"round": rnd,
                 "clients": sorted(int(p) for p in replies),
                 "examples": {p: int(r.content["metrics"]["num-examples"]) for p, r in replies.items()},
                 "missing": missing,
                 "train_loss": float(metrics["train-loss"]) if metrics and "train-loss" in metrics else None,
                 "client_seconds": {p: t["total"]["wall"] for p, t in client_timing.items()},
                 "bf16_clients": sorted(int(p) for p, r in replies.items() if int(r.content["metrics"].get("bf16", 0))),
                 "bytes_down": down,
                 "bytes_up": {p: tensor_bytes(r.content) for p, r in replies.items()},
                 "timing": {"clients": client_timing, "exchange": exchange, "aggregate": aggregate}}
        return new_state, entry

    def _score(self, state: dict, splits: dict) -> dict:
        """The held-out examples (test, or validation when tuning) with the base alone and with
        the adapter, overall and on each client's share of them."""
        c = self.config
        scored = stratified_subset(splits[c.score_split], c.test_examples, c.data_seed)
        base = None
        if c.score_base:
            with adapters_off(self.setup.model) if self.setup.lora else contextlib.nullcontext():
                base = response_perplexity(self.setup.model, self.setup.tokenizer, scored, progress=False)
        self.trainee.load(state)
        adapter = response_perplexity(self.trainee.lm.eval(), self.setup.tokenizer, scored, progress=False)
        shares = held_out_shares(scored, client_partitions(c), c.data_seed)
        per_client = {str(k): {"examples": len(idx), "indices": idx,
                               "base_ppl": subset_perplexity(base, idx) if base else None,
                               "adapter_ppl": subset_perplexity(adapter, idx)} for k, idx in enumerate(shares)}
        return {"split": c.score_split, "examples": len(scored), "max_len": RESPONSE_MAX_LEN, "base": base,
                "adapter": adapter, "per_client": per_client}

    def _checkpoint(self, state: dict, completed: int, history: dict, up: list[str]) -> None:
        save_server_checkpoint(self.checkpoint_dir, state, optimiser_state(self.strategy, up), completed, history,
                               self.config)

    # -------------------------------------------------------------- the run
    def serve(self, grid: Grid) -> dict:
        c = self.config
        self.grid = grid
        one_off = {"startup": self.started.lap("startup")} if self.started else {}  # Ray and Flower coming up
        watch = Stopwatch()
        self.setup = setup_for(c)
        splits = load_splits(c)
        self.val, self.trainee = server_start(c, self.setup, splits)
        self.strategy = make_strategy(c)
        up = uploaded_names(c, self.trainee)
        one_off["server_setup"] = watch.lap("server setup")
        self.node_partition = self._hello(grid)
        one_off["hello"] = watch.lap("hello")  # every client process loads its base here
        if self.resume:
            state, moments, done, history = load_server_checkpoint(self.checkpoint_dir, c)
            restore_optimiser_state(self.strategy, moments, up)
            history.setdefault("resumed_after", []).append(done)  # its timing counts this process's part only
            log.info("resumed the federated run after round %d of %d", done, c.rounds)
        else:
            done = 0
            history = {"method": c.method, "uploaded": up, "validation": [], "rounds": [],
                       "partition_counts": category_counts(client_partitions(c))}
            self.running = history
            if c.gate_init == "server":
                self._gate_round(history)
            state = self.trainee.state()
            history["validation"].append({"round": 0, **self._validate(state)})
            shutil.rmtree(self.rounds_dir, ignore_errors=True)
            if self.save_rounds:
                (self.rounds_dir / "round_0").mkdir(parents=True)
                save_file(state, self.rounds_dir / "round_0" / "global.safetensors")
            self._checkpoint(state, 0, history, up)
        self.running = history
        timing = history.setdefault("timing", {})
        for k, v in one_off.items():  # a resumed run pays them again
            timing[k] = {u: timing.get(k, {}).get(u, 0.0) + v[u] for u in ("wall", "cpu")}
        for rnd in range(done + 1, c.rounds + 1):
            whole = Stopwatch()
            state, entry = self._round(rnd, state, up)
            if rnd % c.eval_every_rounds == 0 or rnd == c.rounds:
                history["validation"].append({"round": rnd, **self._validate(state)})
                v = history["validation"][-1]
                entry["timing"]["validation"] = {"wall": v["seconds"], "cpu": v["cpu"]}
            history["rounds"].append(entry)
            watch = Stopwatch()
            self._checkpoint(state, rnd, history, up)
            entry["timing"]["checkpoint"] = watch.lap("checkpoint")
            entry["timing"]["round"] = whole.lap("round")
            entry["seconds"] = entry["timing"]["round"]["wall"]
            log.info("round %d/%d: %d clients (%s), validation ppl %.3f, %.1f s", rnd, c.rounds, len(entry["clients"]),
                     "missing " + ", ".join(m["client"] for m in entry["missing"]) if entry["missing"] else "none missing",
                     history["validation"][-1]["ppl"], entry["seconds"])
            if self.on_round:
                self.on_round(rnd, history)
        timing["process_tree_after_rounds"] = process_tree_cpu()  # before scoring: what training cost
        watch = Stopwatch()
        if c.test_examples:
            history["test"] = self._score(state, splits)
        timing["final_scoring"] = watch.lap("final scoring")
        self.trainee.load(state)
        extra = {"federated": asdict(c), "method": c.method, "data": c.data,
                 "split_sizes": {k: len(v) for k, v in splits.items()}, **self.setup.about}
        with atomic_dir(self.out, force=self.force or self.resume) as tmp:
            write_adapter_files(self.trainee.lm, tmp, base_name=c.base, base_hash=self.setup.base_hash, extra=extra)
            if self.setup.lora:  # unmerged: the adapters' own tensors, under the base's names
                save_file(lora_state(self.setup), tmp / LORA_FILE)
            (tmp / "history.json").write_text(json.dumps(history, indent=2) + "\n")
            (tmp / "partition.md").write_text(counts_markdown(history["partition_counts"]) + "\n")
            if self.save_rounds and self.rounds_dir.exists():
                self.rounds_dir.rename(tmp / "rounds")
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)  # the adapter is complete
        self.history = history
        return history


def make_server_app(server: FederatedServer) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server.serve(grid)

    return app


# ------------------------------------------------------------------ `flwr run` (SuperLink deployment)

RUN_CONFIG_KEYS = {  # [tool.flwr.app.config] key -> (FederatedConfig field, type)
    "clients": ("n_clients", int), "rounds": ("rounds", int), "local-steps": ("local_steps", int),
    "partition": ("partition", str), "fed-examples": ("total_examples", int), "alpha": ("alpha", float),
    "strategy": ("strategy", str), "proximal-mu": ("proximal_mu", float), "proximal": ("proximal", str),
    "min-clients": ("min_clients", int),
    "round-timeout": ("round_timeout", float), "test-examples": ("test_examples", int),
    "limit-per-source": ("limit_per_source", int), "method": ("method", str), "lora-rank": ("lora_rank", int),
    "server-lr": ("server_lr", float), "server-momentum": ("server_momentum", float), "gate-init": ("gate_init", str),
    "eval-every-rounds": ("eval_every_rounds", int), "score-split": ("score_split", str), "split-seed": ("split_seed", int),
}
MIXTURE_KEYS = {"experts": "n_experts", "prompt-len": "prompt_len", "gate": "gate", "combine": "combine"}
TRAIN_KEYS = ("lr", "gate-lr", "lora-lr", "batch-size", "max-len", "gate-pretrain-steps", "gate-pretrain-examples", "eval-examples",
              "seed")


def config_from_run_config(run_config) -> tuple[FederatedConfig, str]:
    """A FederatedConfig from ``[tool.flwr.app.config]`` (flat keys; ``data`` joined by ``+``)."""
    rc = dict(run_config)
    config = FederatedConfig(base=str(rc["base"]), data=str(rc["data"]).split("+"))
    for key, (name, cast) in RUN_CONFIG_KEYS.items():
        if key in rc:
            setattr(config, name, cast(rc[key]))
    if config.limit_per_source == 0:  # TOML has no null: 0 means every record
        config.limit_per_source = None
    for key, name in MIXTURE_KEYS.items():
        if key in rc:
            config.mixture[name] = rc[key]
    for key in TRAIN_KEYS:
        if key in rc:
            config.train[key.replace("-", "_")] = rc[key]
    config.validate()
    return config, str(rc.get("out", "runs/federated"))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, out = config_from_run_config(context.run_config)
    FederatedServer(config, out, resume=bool(context.run_config.get("resume", False)),
                    force=bool(context.run_config.get("force", False))).serve(grid)
