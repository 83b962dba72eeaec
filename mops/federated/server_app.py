"""The Flower ``ServerApp``: R rounds of FedAvg (or FedProx) over the experts and the gate.

Each round the server sends the global tensors to every connected client, waits up to
``round_timeout`` seconds, and aggregates what arrived with Flower's own strategy
(``flwr.serverapp.strategy.FedAvg`` / ``FedProx``: the example-weighted mean). A client
that crashes, raises or times out is named in the log and in the history; a round with
fewer than ``required_clients`` replies stops the run (the last completed round stays
checkpointed, so ``resume`` continues once the clients are back). After every round the
global adapter's validation perplexity is measured here, on the server's own copy of the
base, and the round is checkpointed; a killed server resumes from its last completed
round. At the end the adapter is written (atomically) with the held-out test perplexity.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx
from safetensors.torch import load_file, save_file

from mops.adapter import write_adapter_files
from mops.data import encode_example, stratified_subset
from mops.errors import UserError
from mops.eval.perplexity import RESPONSE_MAX_LEN, response_perplexity
from mops.federated.common import (
    cached_base,
    client_partitions,
    load_splits,
    load_trainable,
    log,
    process_lower_states,
    trainable_state,
)
from mops.federated.config import CONFIG_KEY, FederatedConfig
from mops.federated.partition import category_counts, counts_markdown
from mops.outputs import atomic_dir
from mops.train import build_mixture

CKPT_STATE = "server_state.json"
CKPT_TENSORS = "global.safetensors"


def checkpoint_dir_for(out) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.federated-checkpoint"


def make_strategy(config: FederatedConfig):
    """Flower's strategy; we call its configure/aggregate steps from our own round loop
    (``Strategy.start`` can neither resume from a round nor enforce a minimum of replies)."""
    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": config.required_clients,
              "min_evaluate_nodes": 0, "min_available_nodes": config.required_clients}
    if config.strategy == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)
    return FedAvg(**common)


def _reason(msg: Message) -> str:
    text = str(msg.error.reason)
    # Ray wraps the client's exception in its traceback; its last non-empty line says what happened.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("^~ ")]
    return (lines[-1] if lines else text)[:300]


def save_server_checkpoint(folder: Path, arrays: ArrayRecord, completed: int, history: dict, config) -> None:
    with atomic_dir(folder, force=True) as tmp:
        save_file(dict(arrays.to_torch_state_dict()), tmp / CKPT_TENSORS)
        (tmp / CKPT_STATE).write_text(json.dumps({"round": completed, "history": history,
                                                   "fingerprint": config.fingerprint()}))


def load_server_checkpoint(folder: Path, config: FederatedConfig) -> tuple[ArrayRecord, int, dict]:
    if not (folder / CKPT_STATE).is_file():
        raise UserError(f"--resume: no federated checkpoint at {folder}; start without --resume")
    state = json.loads((folder / CKPT_STATE).read_text())
    saved, now = state["fingerprint"], config.fingerprint()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise UserError(f"--resume: the checkpoint at {folder} was made with other {', '.join(changed)}; "
                        "rerun with the original options, or start over with --force")
    return ArrayRecord(load_file(folder / CKPT_TENSORS)), state["round"], state["history"]


class FederatedServer:
    """One run of the server side; ``serve(grid)`` is the ServerApp's main."""

    def __init__(self, config: FederatedConfig, out, *, resume: bool = False, force: bool = False,
                 save_rounds: bool = False, on_round: Callable[[int, dict], None] | None = None):
        self.config, self.out, self.resume, self.force = config, Path(out), resume, force
        self.save_rounds, self.on_round = save_rounds, on_round
        self.checkpoint_dir = checkpoint_dir_for(out)
        self.history: dict | None = None

    # -------------------------------------------------------------- pieces
    def _message_config(self, base_hash: str) -> ConfigRecord:
        return ConfigRecord({CONFIG_KEY: self.config.to_json(), "base-hash": base_hash})

    def _evaluate(self, lm, arrays: ArrayRecord, records, max_len) -> dict:
        load_trainable(lm.mixture, dict(arrays.to_torch_state_dict()))
        return response_perplexity(lm.eval(), self.tokenizer, records, max_len, progress=False,
                                   lower=process_lower_states())

    def _hello(self, grid: Grid, base_hash: str) -> dict[int, int]:
        """Ask every connected node for its partition id (and so load every client's base up front)."""
        c = self.config
        deadline = time.time() + c.round_timeout
        while len(nodes := list(grid.get_node_ids())) < c.n_clients and time.time() < deadline:
            time.sleep(1)
        if len(nodes) < c.required_clients:
            raise UserError(f"only {len(nodes)} of {c.n_clients} clients connected within {c.round_timeout:.0f} s")
        record = RecordDict({"config": self._message_config(base_hash)})
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

    # -------------------------------------------------------------- the run
    def serve(self, grid: Grid) -> dict:
        c = self.config
        model, self.tokenizer, base_hash = cached_base(c.base, c.device)
        tc = c.train_config()
        splits = load_splits(c)
        val = stratified_subset(splits["validation"], tc.eval_examples, c.seed)
        # The global experts start from real activations of the server's own (validation) inputs.
        init_examples = [encode_example(self.tokenizer, r, tc.max_len) for r in val]
        lm = build_mixture(model, self.tokenizer, init_examples, c.mixture_config(), c.seed)
        strategy = make_strategy(c)
        self.node_partition = self._hello(grid, base_hash)
        if self.resume:
            arrays, done, history = load_server_checkpoint(self.checkpoint_dir, c)
            log.info("resumed the federated run after round %d of %d", done, c.rounds)
        else:
            arrays, done = ArrayRecord(trainable_state(lm.mixture)), 0
            history = {"validation": [{"round": 0, **self._evaluate(lm, arrays, val, tc.max_len)}], "rounds": [],
                       "partition_counts": category_counts(client_partitions(c))}
            save_server_checkpoint(self.checkpoint_dir, arrays, 0, history, c)
        rounds_dir = self.out.parent / f".{self.out.name}.rounds"
        if not self.resume:
            shutil.rmtree(rounds_dir, ignore_errors=True)
        for rnd in range(done + 1, c.rounds + 1):
            started = time.perf_counter()
            messages = list(strategy.configure_train(rnd, arrays, self._message_config(base_hash), grid))
            sent = {m.metadata.dst_node_id for m in messages}
            replies = list(grid.send_and_receive(messages, timeout=c.round_timeout))
            good = [r for r in replies if not r.has_error()]
            missing = [{"client": self._name(n), "node_id": n, "reason": "no reply within the round timeout"}
                       for n in sorted(sent - {r.metadata.src_node_id for r in replies})]
            missing += [{"client": self._name(r.metadata.src_node_id), "node_id": r.metadata.src_node_id,
                         "reason": _reason(r)} for r in replies if r.has_error()]
            for m in missing:
                log.warning("round %d: %s missing: %s", rnd, m["client"], m["reason"])
            if len(good) < c.required_clients:
                raise UserError(f"round {rnd}: {len(good)} of {len(sent)} clients replied, fewer than the "
                                f"{c.required_clients} required (missing: {', '.join(m['client'] for m in missing)}); "
                                f"rounds 1..{rnd - 1} are checkpointed, rerun with --resume")
            for r in good:  # names learnt from replies too (a node that missed the hello)
                reply = r.content["metrics"]
                self.node_partition.setdefault(r.metadata.src_node_id, int(reply["partition-id"]))
                # how many times each client process has loaded the frozen base (1: cached, never sent)
                history.setdefault("base_loads", {})[str(int(reply["pid"]))] = int(reply["base-loads"])
            new_arrays, metrics = strategy.aggregate_train(rnd, good)
            if self.save_rounds:  # what each client returned and the aggregate, for checking FedAvg
                folder = rounds_dir / f"round_{rnd}"
                folder.mkdir(parents=True, exist_ok=True)
                for r in good:
                    pid = int(r.content["metrics"]["partition-id"])
                    save_file(dict(r.content["arrays"].to_torch_state_dict()), folder / f"client_{pid}.safetensors")
                save_file(dict(new_arrays.to_torch_state_dict()), folder / "global.safetensors")
            arrays = new_arrays
            entry = {"round": rnd,
                     "clients": sorted(int(r.content["metrics"]["partition-id"]) for r in good),
                     "examples": {str(int(r.content["metrics"]["partition-id"])): int(r.content["metrics"]["num-examples"])
                                  for r in good},
                     "missing": missing,
                     "train_loss": float(metrics["train-loss"]) if metrics and "train-loss" in metrics else None,
                     "client_seconds": {str(int(r.content["metrics"]["partition-id"])): float(r.content["metrics"]["seconds"])
                                        for r in good}}
            history["validation"].append({"round": rnd, **self._evaluate(lm, arrays, val, tc.max_len)})
            entry["seconds"] = time.perf_counter() - started
            history["rounds"].append(entry)
            save_server_checkpoint(self.checkpoint_dir, arrays, rnd, history, c)
            log.info("round %d/%d: %d clients (%s), validation ppl %.3f, %.1f s", rnd, c.rounds, len(good),
                     "missing " + ", ".join(m["client"] for m in missing) if missing else "none missing",
                     history["validation"][-1]["ppl"], entry["seconds"])
            if self.on_round:
                self.on_round(rnd, history)
        load_trainable(lm.mixture, dict(arrays.to_torch_state_dict()))
        if c.test_examples:
            test = stratified_subset(splits["test"], c.test_examples, c.seed)
            history["test"] = {"examples": len(test), "max_len": RESPONSE_MAX_LEN,
                               "base": response_perplexity(model, self.tokenizer, test, progress=False),
                               "adapter": response_perplexity(lm.eval(), self.tokenizer, test, progress=False)}
        extra = {"federated": asdict(c), "data": c.data, "split_sizes": {k: len(v) for k, v in splits.items()}}
        with atomic_dir(self.out, force=self.force or self.resume) as tmp:
            write_adapter_files(lm, tmp, base_name=c.base, base_hash=base_hash, extra=extra)
            (tmp / "history.json").write_text(json.dumps(history, indent=2) + "\n")
            (tmp / "partition.md").write_text(counts_markdown(history["partition_counts"]) + "\n")
            if self.save_rounds and rounds_dir.exists():
                rounds_dir.rename(tmp / "rounds")
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
    "strategy": ("strategy", str), "proximal-mu": ("proximal_mu", float), "min-clients": ("min_clients", int),
    "round-timeout": ("round_timeout", float), "test-examples": ("test_examples", int),
    "limit-per-source": ("limit_per_source", int),
}
MIXTURE_KEYS = {"experts": "n_experts", "prompt-len": "prompt_len", "gate": "gate", "combine": "combine"}
TRAIN_KEYS = ("lr", "gate-lr", "batch-size", "max-len", "gate-pretrain-steps", "eval-examples", "seed")


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
