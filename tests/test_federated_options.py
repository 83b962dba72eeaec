"""Federated options beyond FedAvg of a mixture: the server optimisers (Flower's FedAvgM and
FedAdam) against float64 references written from their published update rules, a gate
pretrained on the server and kept frozen, federated LoRA, the bytes that travel, each
client's own held-out share, and one-line errors for bad values.

Two real Flower simulations on a tiny random Llama: FedAvgM on the mixture with the
server-pretrained frozen gate; and FedAdam on LoRA, stopped after round 1 and resumed,
so that round 2 matches the reference only if the server's Adam moments were saved and
restored.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mops.data import InstructionRecord
from mops.errors import UserError
from mops.federated.partition import held_out_shares, partition

ROUNDS = 2


def round_tensors(out, rnd: int) -> tuple[dict, dict[int, dict], dict]:
    """(global before the round, each client's upload, global after), in float64."""
    folder = out / "rounds"
    before = {k: v.double() for k, v in load_file(folder / f"round_{rnd - 1}" / "global.safetensors").items()}
    after = {k: v.double() for k, v in load_file(folder / f"round_{rnd}" / "global.safetensors").items()}
    clients = {int(p.stem.split("_")[1]): {k: v.double() for k, v in load_file(p).items()}
               for p in (folder / f"round_{rnd}").glob("client_*.safetensors")}
    return before, clients, after


def weighted_mean(clients: dict[int, dict], examples: dict[str, int], name: str) -> torch.Tensor:
    total = sum(examples[str(p)] for p in clients)
    return sum(clients[p][name] * examples[str(p)] for p in clients) / total


# ----------------------------------------------------------------------------- pure pieces


def fake_records(sizes: dict[str, int], tag: str = "") -> list[InstructionRecord]:
    return [InstructionRecord(f"q{tag} {c} {i}", "", f"a {i}", c, "test") for c, n in sizes.items() for i in range(n)]


def test_each_client_held_out_share_has_its_own_skewed_mix():
    sizes = {f"cat{i}": 18 * 4 for i in range(4)}
    train = partition(fake_records(sizes), 4, "skew", total=18 * 16, seed=0)
    held = fake_records({c: 18 for c in sizes}, tag="held")
    shares = held_out_shares(held, train, seed=0)
    assert sorted(i for s in shares for i in s) == list(range(len(held)))  # a partition of the held-out records
    for client, share in enumerate(shares):
        mine = Counter(held[i].category for i in share)
        trained = Counter(r.category for r in train[client])
        big = max(trained, key=trained.get)
        assert mine[big] == 15 and sum(mine.values()) == 18  # 15:1:1:1, as its training share
    assert held_out_shares(held, train, seed=0) == shares


def test_server_defaults_and_one_line_errors_of_the_config(federated_config):
    c = federated_config("unused", strategy="fedadam")
    assert c.server_settings() == {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert federated_config("unused", strategy="fedavgm", server_lr=0.5).server_settings() == \
        {"server_lr": 0.5, "server_momentum": 0.9}
    bad = [({"strategy": "fedavg", "server_lr": 0.5}, "--server-lr: --strategy fedavg has no such setting"),
           ({"strategy": "fedadam", "server_momentum": 0.5}, "--server-momentum: --strategy fedadam"),
           ({"strategy": "fedavgm", "tau": 0.1}, "--server-tau: --strategy fedavgm"),
           ({"strategy": "fedavgm", "server_lr": 0.0}, "--server-lr 0.0"),
           ({"strategy": "fedavgm", "server_momentum": 1.0}, "--server-momentum 1.0"),
           ({"strategy": "fedadam", "beta2": 1.5}, "--server-betas 0.9 1.5"),
           ({"strategy": "fedadam", "tau": 0.0}, "--server-tau 0.0"),
           ({"method": "none"}, "--method none trains nothing"),
           ({"method": "lora:steps=3"}, "drop steps="),
           ({"method": "prompt:top_k=x"}, "top_k='x' is not a whole number"),
           ({"gate_init": "global"}, "--gate-init 'global'"),
           ({"gate_init": "server", "method": "prompt"}, "--method prompt has no gate"),
           ({"score_split": "train"}, "--score-split 'train'"),
           ({"eval_every_rounds": 0}, "--eval-every-rounds 0"),
           ({"lora_rank": 0}, "--lora-rank 0"),
           ({"method": "mops:mixed_precision=fp16"}, "--mixed-precision fp16: federated clients train in float32 or bf16"),
           ({"method": "mops:distill=0.5"}, "--distill 0.5: federated clients do not distill"),
           ({"strategy": "fedprox", "proximal": "l2"}, "--proximal 'l2': expected one of loss, decoupled"),
           ({"proximal": "decoupled"}, "--proximal decoupled: only FedProx pulls"),
           ({"strategy": "fedprox", "proximal": "decoupled", "proximal_mu": 40.0}, "expected mu <= 33.3333"),
           ({"method": "lora", "strategy": "fedprox", "proximal": "decoupled", "proximal_mu": 600.0}, "expected mu <= 500")]
    for over, message in bad:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
            federated_config("unused", **over).validate()
    # LoRA trains at lora_lr only: the prompts' rate does not bound its pull
    federated_config("unused", method="lora", strategy="fedprox", proximal="decoupled", proximal_mu=40.0).validate()


def test_federated_cli_refuses_bad_new_options(tiny_dir, tmp_path, capsys):
    from mops.recover_cli import entry

    base = ["--base", tiny_dir, "--data", "dolly", "--out", str(tmp_path / "x")]
    cases = [(["--federated", "2", "--method", "dora"], "method 'dora'"),
             (["--federated", "2", "--strategy", "fedadam", "--server-betas", "0.9", "2"], "--server-betas 0.9 2.0"),
             (["--federated", "2", "--server-lr", "0.5"], "--server-lr: --strategy fedavg"),
             (["--federated", "2", "--gate-init", "everywhere"], "--gate-init 'everywhere'"),
             (["--federated", "2", "--score-split", "dev"], "--score-split 'dev'"),
             (["--federated", "2", "--method", "uniform:experts=2"], "'experts=2' is not key=value"),
             (["--method", "lora"], "--method: only with --federated N"),
             (["--federated", "2", "--method", "mops:top_k=5"], "--top-k 5"),
             (["--federated", "2", "--mixed-precision", "fp16"], "--mixed-precision fp16"),
             (["--federated", "2", "--distill", "0.5"], "--distill 0.5: federated clients do not distill"),
             (["--federated", "2", "--distill", "0.5", "--teacher", tiny_dir], "--teacher is not supported"),
             (["--federated", "2", "--strategy", "fedprox", "--proximal", "both"], "--proximal 'both'")]
    for args, message in cases:
        assert entry(base + args) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- FedAvgM, server gate


@pytest.fixture(scope="module")
def fedavgm_run(tiny_dir, tmp_path_factory, federated_config):
    from mops.federated import run_federated

    # the gate is pretrained on the server, then frozen (gate lr 0): the clients train the experts only
    train = federated_config(tiny_dir).train | {"gate_lr": 0.0, "gate_pretrain_steps": 5, "gate_pretrain_examples": 24}
    config = federated_config(tiny_dir, rounds=ROUNDS, strategy="fedavgm", server_lr=0.7, server_momentum=0.9,
                              gate_init="server", train=train)
    out = tmp_path_factory.mktemp("fedavgm") / "adapter"
    return config, out, run_federated(config, out, save_rounds=True, quiet=True)


def test_fedavgm_aggregates_as_hsu_et_al_say(fedavgm_run):
    # Hsu et al. 2019: v <- beta v + (x - mean_k x_k); x <- x - lr v (momentum from round 1, v_0 = 0)
    config, out, history = fedavgm_run
    lr, beta = 0.7, 0.9
    momentum = {}
    for entry in history["rounds"]:
        before, clients, after = round_tensors(out, entry["round"])
        assert set(clients) == set(map(int, entry["examples"]))
        for name in history["uploaded"]:
            pseudo_gradient = before[name] - weighted_mean(clients, entry["examples"], name)
            momentum[name] = beta * momentum[name] + pseudo_gradient if name in momentum else pseudo_gradient
            expected = before[name] - lr * momentum[name]
            torch.testing.assert_close(after[name], expected, rtol=0, atol=2e-6)
            assert not torch.equal(after[name], before[name])


def test_a_server_pretrained_frozen_gate_travels_down_only(fedavgm_run):
    config, out, history = fedavgm_run
    gate = [n for n in load_file(out / "rounds" / "round_0" / "global.safetensors") if n.startswith("gate.")]
    assert gate and not set(gate) & set(history["uploaded"])
    g = history["gate_round"]
    assert sorted(g["clients"]) == [0, 1, 2] and g["loss"] < g["loss_first"]
    assert sum(g["examples"].values()) == 24  # gate_pretrain_examples in all, each client its share
    width = 64  # the tiny model's d: a pooled float32 vector and an int64 label per example
    assert g["bytes_up"] == {p: n * (4 * width + 8) for p, n in g["examples"].items()}
    start = load_file(out / "rounds" / "round_0" / "global.safetensors")
    for rnd in range(1, ROUNDS + 1):
        now = load_file(out / "rounds" / f"round_{rnd}" / "global.safetensors")
        for name in gate:
            assert torch.equal(now[name], start[name])  # the pretrained gate, bitwise, every round
        for upload in (out / "rounds" / f"round_{rnd}").glob("client_*.safetensors"):
            assert set(load_file(upload)) == set(history["uploaded"])


def test_bytes_per_round_are_the_tensors_in_the_messages(fedavgm_run):
    config, out, history = fedavgm_run
    for entry in history["rounds"]:
        before, clients, _ = round_tensors(out, entry["round"])
        down = sum(t.numel() * 4 for t in before.values())  # every global tensor, float32, frozen gate included
        assert entry["bytes_down"] == {str(p): down for p in range(3)}
        assert entry["bytes_up"] == {str(p): sum(t.numel() * 4 for t in clients[p].values()) for p in clients}
        assert down > next(iter(entry["bytes_up"].values()))  # the frozen gate never goes back up


def test_each_client_is_scored_on_its_own_share(fedavgm_run):
    config, out, history = fedavgm_run
    t = history["test"]
    assert t["split"] == "test" and t["examples"] == 12
    indices = sorted(i for c in t["per_client"].values() for i in c["indices"])
    assert indices == list(range(12))
    for c in t["per_client"].values():
        nll = sum(t["adapter"]["per_example"]["nll"][i] for i in c["indices"])
        tokens = sum(t["adapter"]["per_example"]["tokens"][i] for i in c["indices"])
        if tokens:
            assert math.isclose(c["adapter_ppl"], math.exp(nll / tokens), rel_tol=1e-12)


# ----------------------------------------------------------------------------- FedAdam, LoRA, resume


class StopAfterRound1(Exception):
    pass


def stop_after_round_1(rnd, history):
    if rnd == 1:
        raise StopAfterRound1("the server stops after round 1 (a test)")


@pytest.fixture(scope="module")
def fedadam_lora_run(tiny_dir, tmp_path_factory, federated_config):
    """FedAdam on LoRA, its clients under bf16 autocast: the server stops after round 1, then
    resumes from its checkpoint."""
    from mops.federated import run_federated
    from mops.federated.server_app import CKPT_STATE, checkpoint_dir_for

    config = federated_config(tiny_dir, rounds=ROUNDS, strategy="fedadam", server_lr=0.05, beta1=0.9, beta2=0.99,
                              tau=1e-3, method="lora:lora_lr=0.01,mixed_precision=bf16", lora_rank=2)
    out = tmp_path_factory.mktemp("fedadam") / "adapter"
    with pytest.raises(StopAfterRound1):  # Flower re-raises what stopped the ServerApp
        run_federated(config, out, save_rounds=True, quiet=True, on_round=stop_after_round_1)
    state = json.loads((checkpoint_dir_for(out) / CKPT_STATE).read_text())
    assert state["round"] == 1 and not out.exists()
    return config, out, run_federated(config, out, resume=True, save_rounds=True, quiet=True)


def test_fedadam_aggregates_as_reddi_et_al_say_across_a_resume(fedadam_lora_run):
    # Reddi et al. 2021, Algorithm 2 (FedAdam): d = mean_k x_k - x; m <- b1 m + (1 - b1) d;
    # v <- b2 v + (1 - b2) d^2; x <- x + eta_t m / (sqrt(v) + tau), with Flower's bias-corrected
    # step (flwr PR #4362, after Kingma & Ba): eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)),
    # t the server round (Flower's exponent is one ahead of Kingma & Ba's t).
    config, out, history = fedadam_lora_run
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    m, v = {}, {}
    for entry in history["rounds"]:
        t = entry["round"]
        before, clients, after = round_tensors(out, t)
        eta_t = eta * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        for name in history["uploaded"]:
            d = weighted_mean(clients, entry["examples"], name) - before[name]
            m[name] = b1 * m.get(name, 0) + (1 - b1) * d
            v[name] = b2 * v.get(name, 0) + (1 - b2) * d**2
            expected = before[name] + eta_t * m[name] / (v[name].sqrt() + tau)
            torch.testing.assert_close(after[name], expected, rtol=0, atol=2e-6)


def test_federated_lora_sends_its_matrices_and_leaves_the_base_sparse(fedadam_lora_run, tiny_dir):
    from mops.eval.perplexity import response_perplexity
    from mops.federated.common import load_splits
    from mops.federated.methods import load_federated
    from mops.data import stratified_subset
    from mops.models import load_model

    config, out, history = fedadam_lora_run
    names = history["uploaded"]
    assert names and all(n.startswith("base.") and ".lora_" in n for n in names)
    assert any("q_proj" in n for n in names) and any("down_proj" in n for n in names)  # attention and MLP
    layout = json.loads((out / "mops_config.json").read_text())["lora"]
    assert layout["rank"] == 2 and layout["layers"] == "all"
    assert history["rounds"][-1]["bytes_up"]["0"] == sum(t.numel() * 4 for t in load_file(out / "lora.safetensors")
                                                         .values())
    # The output loads back onto the untouched base and scores exactly what the server scored.
    lm = load_federated(tiny_dir, out)
    plain, tok = load_model(tiny_dir)
    wrapped = {n.replace(".base_layer", ""): p for n, p in lm.base.named_parameters() if "lora_" not in n}
    assert set(wrapped) == {n for n, _ in plain.named_parameters()}
    for name, p in plain.named_parameters():  # every base weight as it was: the adapters are beside them, unmerged
        assert torch.equal(wrapped[name], p), name
    test = stratified_subset(load_splits(config)["test"], config.test_examples, config.data_seed)
    again = response_perplexity(lm, tok, test, progress=False)
    assert np.allclose(again["per_example"]["nll"], history["test"]["adapter"]["per_example"]["nll"], rtol=1e-5)
    assert history["test"]["adapter"]["ppl"] != history["test"]["base"]["ppl"]
    assert all(r["bf16_clients"] == r["clients"] for r in history["rounds"])  # each client said it trained in bf16


def test_a_client_trains_under_bf16_autocast_and_sends_float32(tiny_dir, federated_config):
    """``mixed_precision=bf16`` on a client: the upper layers' products in bfloat16 (the loss
    moves a little); the tensors it sends stay float32 (the store of lower states does too:
    tests/test_packing.py)."""
    from mops.federated.client_app import local_train
    from mops.federated.methods import Trainee, setup_for

    plain = federated_config(tiny_dir)
    mixed = federated_config(tiny_dir, train=plain.train | {"mixed_precision": "bf16"})
    start = Trainee(setup_for(plain), [], plain.seed).state()
    sent32, report32 = local_train(plain, 0, 2, start)  # round 2: no gate pretraining, the first loss is the start's
    sent16, report16 = local_train(mixed, 0, 2, start)
    assert (report32["bf16"], report16["bf16"]) == (0, 1)
    assert report16["train-loss-first"] != report32["train-loss-first"]
    assert report16["train-loss-first"] == pytest.approx(report32["train-loss-first"], rel=2e-2)
    assert sent16.keys() == sent32.keys() and all(t.dtype == torch.float32 for t in sent16.values())
    assert not torch.equal(sent16["experts.weight"], start["experts.weight"])


def test_the_decoupled_proximal_pull_moves_each_tensor_lr_mu_of_the_way_back():
    """Against a float64 reference: w <- w_global + (1 - lr mu)(w - w_global), each tensor at its
    own group's learning rate; a tensor no group trains stays put."""
    from mops.federated.client_app import pull_toward

    torch.manual_seed(0)
    fast, slow, frozen = (torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3))
    anchor = {n: torch.randn(3, 4) for n in ("fast", "slow", "frozen")}
    tensors = {"fast": fast, "slow": slow, "frozen": frozen}
    before = {n: p.detach().double().clone() for n, p in tensors.items()}
    optimizer = torch.optim.AdamW([{"params": [fast], "lr": 0.5}, {"params": [slow], "lr": 0.01}])
    pull_toward(optimizer, tensors, anchor, mu=0.4)
    for name, lr in (("fast", 0.5), ("slow", 0.01)):
        a = anchor[name].double()
        assert torch.allclose(tensors[name].double(), a + (1 - lr * 0.4) * (before[name] - a), rtol=0, atol=1e-6), name
    assert torch.equal(frozen.double(), before["frozen"])


def test_a_decoupled_fedprox_client_takes_fedavg_s_step_then_pulls_back(tiny_dir, federated_config, monkeypatch):
    """One local step: every tensor lands 1 - lr mu of FedAvg's way from the global one, at its
    own group's rate (the experts at lr, the gate at gate_lr). Two steps with the pull switched
    off: exactly FedAvg's, so nothing went into the loss; the proximal term in the loss does move them."""
    from mops.federated import client_app
    from mops.federated.methods import Trainee, setup_for

    plain = federated_config(tiny_dir, local_steps=1)
    decoupled = federated_config(tiny_dir, local_steps=1, strategy="fedprox", proximal="decoupled", proximal_mu=5.0)
    start = Trainee(setup_for(plain), [], plain.seed).state()
    sent, _ = client_app.local_train(plain, 0, 2, start)
    pulled, _ = client_app.local_train(decoupled, 0, 2, start, proximal_mu=5.0)
    tc = plain.train_config()
    assert {n.split(".")[0] for n in sent} == {"experts", "gate"}
    for name in sent:
        lr = tc.lr if name.startswith("experts") else tc.gate_lr
        expected = start[name].double() + (1 - lr * 5.0) * (sent[name].double() - start[name].double())
        assert not torch.equal(sent[name], start[name]), name
        assert torch.allclose(pulled[name].double(), expected, rtol=0, atol=1e-7), name

    two = {"local_steps": 2}
    fedavg, _ = client_app.local_train(replace(plain, **two), 0, 2, start)
    in_loss, _ = client_app.local_train(replace(decoupled, proximal="loss", **two), 0, 2, start, proximal_mu=5.0)
    monkeypatch.setattr(client_app, "pull_toward", lambda *args: None)
    unpulled, _ = client_app.local_train(replace(decoupled, **two), 0, 2, start, proximal_mu=5.0)
    for name in fedavg:
        assert torch.equal(unpulled[name], fedavg[name]), name
    assert not torch.allclose(in_loss["experts.weight"], fedavg["experts.weight"])


def test_a_client_follows_the_run_s_learning_rate_schedule_across_rounds(tiny_dir, federated_config):
    from dataclasses import asdict, replace

    from mops.federated.client_app import local_train
    from mops.federated.methods import Trainee, setup_for
    from mops.train import TrainConfig

    train = asdict(replace(TrainConfig(**federated_config(tiny_dir).train), lr_schedule="cosine"))
    config = federated_config(tiny_dir, train=train)  # 2 rounds x 2 local steps: 4 steps in the run
    start = Trainee(setup_for(config), [], config.seed).state()
    _, report = local_train(config, 0, 2, start)
    # round 2's last step is the run's fourth (index 3 of 4), not its local loop's second
    assert report["lr-last"] == pytest.approx(3e-2 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


def test_ray_counts_only_the_cores_this_process_may_run_on(monkeypatch):
    """A run pinned to one core (taskset) must train one client at a time: Ray's pool is its
    cores over each client's share, and Ray counts the machine's cores unless told."""
    import os

    from mops.federated import simulation

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1}, raising=False)
    backend = simulation.ray_backend(1.0, 0.0, quiet=True)
    assert backend["init_args"]["num_cpus"] == 1 and backend["client_resources"]["num_cpus"] == 1.0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert simulation.ray_backend(0.5, 0.0, quiet=False)["init_args"] == {
        "num_cpus": 2, "logging_level": "WARNING", "log_to_driver": True, "include_dashboard": False}


def test_a_checkpoint_from_before_a_setting_existed_resumes_under_its_old_behaviour(tmp_path, federated_config):
    """A server checkpoint written before ``proximal`` existed resumes under ``loss`` (what the
    older code did), not under another form; a missing setting that is not known to be harmless
    still refuses."""
    from mops.federated.server_app import CKPT_STATE, load_server_checkpoint, save_server_checkpoint

    config = federated_config("unused", strategy="fedprox")
    folder = tmp_path / "ckpt"
    save_server_checkpoint(folder, {"w": torch.zeros(2)}, {"m": torch.zeros(1)}, 3, {"rounds": []}, config)
    state = json.loads((folder / CKPT_STATE).read_text())
    del state["fingerprint"]["proximal"]  # as an older version wrote it
    (folder / CKPT_STATE).write_text(json.dumps(state))
    tensors, _, completed, _ = load_server_checkpoint(folder, config)
    assert completed == 3 and torch.equal(tensors["w"], torch.zeros(2))
    with pytest.raises(UserError, match="was made with other proximal;"):
        load_server_checkpoint(folder, replace(config, proximal="decoupled"))
    del state["fingerprint"]["train"]["lora_lr"]  # federated LoRA trained at lr before lora_lr existed
    (folder / CKPT_STATE).write_text(json.dumps(state))
    with pytest.raises(UserError, match="was made with other train;"):
        load_server_checkpoint(folder, config)
    state["fingerprint"]["train"]["lora_lr"] = config.train["lora_lr"]
    state["fingerprint"]["proximal_mu"] = 0.5
    (folder / CKPT_STATE).write_text(json.dumps(state))
    with pytest.raises(UserError, match="was made with other proximal_mu;"):
        load_server_checkpoint(folder, config)


def test_a_superlink_run_config_chooses_the_proximal_form():
    """`flwr run` reads the form from ``[tool.flwr.app.config]`` too (key ``proximal``)."""
    from mops.federated.server_app import config_from_run_config

    config, _ = config_from_run_config({"base": "unused", "data": "dolly", "strategy": "fedprox",
                                        "proximal-mu": 0.1, "proximal": "decoupled"})
    assert (config.strategy, config.proximal_mu, config.proximal) == ("fedprox", 0.1, "decoupled")
    with pytest.raises(UserError, match="--proximal 'sgd'"):
        config_from_run_config({"base": "unused", "data": "dolly", "strategy": "fedprox", "proximal": "sgd"})
