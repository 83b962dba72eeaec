"""Federated MoPs: partitions (pure), and real Flower simulations on a tiny random Llama.

One shared simulation (3 clients x 3 rounds, client 1's process killed in round 3) checks
FedAvg against an independent weighted average, what travels and its bytes, the base loaded
once per client process, and the missing-client log; a second run's server process is
SIGKILLed after a round and resumed, and must continue exactly where it stopped. The other
strategies, methods and options: tests/test_federated_options.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from mops.data import InstructionRecord
from mops.errors import UserError
from mops.federated.partition import (
    apportion,
    category_counts,
    counts_markdown,
    partition,
    skew_counts,
)

# ----------------------------------------------------------------------------- partitions


def fake_records(sizes: dict[str, int]) -> list[InstructionRecord]:
    return [InstructionRecord(f"q {c} {i}", "", f"a {i}", c, "test") for c, n in sizes.items() for i in range(n)]


def counts_of(parts) -> list[Counter]:
    return [Counter(r.category for r in p) for p in parts]


def test_skew_is_fifteen_to_one_and_every_client_gets_every_category():
    # 18 = N - 1 + 15 per unit: with 4 clients, each category splits exactly 15:1:1:1.
    sizes = {f"cat{i}": 18 * (i + 1) for i in range(6)}
    records = fake_records(sizes)
    parts = partition(records, 4, "skew", total=len(records), seed=3)
    counts = counts_of(parts)
    big_clients = []
    for c, n in sizes.items():
        per_client = [counts[k][c] for k in range(4)]
        assert sum(per_client) == n
        big = max(per_client)
        small = [x for x in per_client if x != big]
        assert len(small) == 3 and all(big == 15 * x for x in small), per_client
        big_clients.append(per_client.index(big))
    # The large partition rotates: consecutive categories, consecutive clients.
    assert all((b - a) % 4 == 1 for a, b in itertools.pairwise(big_clients))
    assert sorted(r.instruction for p in parts for r in p) == sorted(r.instruction for r in records)  # a partition


def test_skew_draws_five_thousand_examples_by_default_from_a_larger_pool():
    records = fake_records({f"cat{i}": 1000 + 37 * i for i in range(8)})
    parts = partition(records, 5, "skew", seed=0)
    assert sum(len(p) for p in parts) == 5000
    for c in {r.category for r in records}:
        per_client = sorted(Counter(r.category for r in p)[c] for p in parts)
        assert per_client[0] > 0
        # one partition 15x each of the others, up to whole-example rounding
        assert abs(per_client[-1] - 15 * per_client[0]) <= 15 and max(per_client[:-1]) - per_client[0] <= 1


def test_skew_counts_are_exact_when_divisible_and_sum_otherwise():
    assert skew_counts(36, 4, 2) == [2, 2, 30, 2]
    assert sum(skew_counts(101, 3, 0)) == 101
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]


def test_partitions_are_seeded():
    records = fake_records({"a": 300, "b": 200, "c": 100})
    for scheme in ("skew", "iid", "dirichlet"):
        one = partition(records, 3, scheme, total=600, seed=1)
        again = partition(records, 3, scheme, total=600, seed=1)
        other = partition(records, 3, scheme, total=600, seed=2)
        assert one == again
        assert one != other


def test_iid_is_balanced_in_size_and_mix():
    records = fake_records({"a": 600, "b": 300, "c": 300})
    parts = partition(records, 4, "iid", total=1200, seed=0)
    assert [len(p) for p in parts] == [300] * 4
    for counts in counts_of(parts):
        assert abs(counts["a"] - 150) < 40 and abs(counts["b"] - 75) < 30


def test_dirichlet_keeps_every_example_and_small_alpha_is_more_skewed():
    records = fake_records({f"c{i}": 200 for i in range(10)})

    def mean_top_share(alpha):
        parts = partition(records, 4, "dirichlet", total=2000, alpha=alpha, seed=0)
        assert sum(len(p) for p in parts) == 2000
        counts = counts_of(parts)
        return sum(max(k[c] for k in counts) / 200 for c in {r.category for r in records}) / 10

    assert mean_top_share(0.1) > mean_top_share(100.0) + 0.3
    assert mean_top_share(100.0) < 0.4


def test_bad_partition_settings_are_one_line_errors():
    records = fake_records({"a": 10})
    with pytest.raises(UserError, match="--partition 'zipf'"):
        partition(records, 2, "zipf")
    with pytest.raises(UserError, match="--alpha"):
        partition(records, 2, "dirichlet", alpha=0)
    with pytest.raises(UserError, match="no training examples"):
        partition(fake_records({"a": 20}), 20, "skew", total=20)
    with pytest.raises(UserError, match="--fed-examples 10"):
        partition(records, 20, "iid", total=10)


def test_count_table_lists_every_client_and_category():
    parts = [fake_records({"a": 2, "b": 1}), fake_records({"b": 3})]
    table = category_counts(parts)
    assert table == {"client 0": {"a": 2, "b": 1}, "client 1": {"a": 0, "b": 3}}
    md = counts_markdown(table)
    assert "| client 1 | 0 | 3 | 3 |" in md and "| all | 2 | 4 | 6 |" in md


# ----------------------------------------------------------------------------- simulations

ROUNDS, CRASH_ROUND, CRASHED = 3, 3, 1
CRASH_RUN = {"rounds": ROUNDS, "test_examples": 8}  # the conftest's small run, for 3 rounds


@pytest.fixture(scope="module")
def trainable(federated_config) -> set[str]:
    """What a client trains: the experts and the gate's MLP, nothing of the base."""
    from mops.mixture import Mixture

    mixture = Mixture(federated_config("unused").mixture_config().resolved(2), 64)
    return {n for n, p in mixture.named_parameters() if p.requires_grad}


def crash_client_mod(msg, context, call_next):
    """A Flower client mod: client 1's process dies (no reply, no exception) in round 3."""
    if (msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == CRASHED
            and int(msg.content["config"]["server-round"]) == CRASH_ROUND):
        os._exit(1)
    return call_next(msg, context)


@pytest.fixture(scope="module")
def crashed_run(tiny_dir, tmp_path_factory, caplog_module, federated_config):
    import cloudpickle

    from mops.federated import run_federated
    from mops.federated.client_app import make_client_app

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the mod travels to Ray's workers by value
    out = tmp_path_factory.mktemp("fed") / "adapter"
    # A quarter core per client: every client its own process, even in a run pinned to one core
    # (Ray gets the process's cores). Clients that share a process die with it, so with fewer
    # processes than clients the crash would take a co-tenant along and the round would miss two.
    history = run_federated(federated_config(tiny_dir, **CRASH_RUN), out, client_app=make_client_app(mods=[crash_client_mod]),
                            save_rounds=True, quiet=True, client_cpus=0.25)
    return out, history, caplog_module


@pytest.fixture(scope="module")
def caplog_module():
    """The server's log records for the whole module-scoped run."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mops.federated")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_fedavg_is_the_example_weighted_mean_of_what_the_clients_returned(crashed_run, trainable):
    out, history, _ = crashed_run
    for entry in history["rounds"]:
        folder = out / "rounds" / f"round_{entry['round']}"
        clients = {int(p): load_file(folder / f"client_{p}.safetensors") for p in entry["examples"]}
        weights = {p: entry["examples"][str(p)] for p in clients}
        total = sum(weights.values())
        aggregate = load_file(folder / "global.safetensors")
        # Only the mixture's trainable tensors travel: experts and the gate, nothing of the base.
        assert set(aggregate) == trainable
        for name, value in aggregate.items():
            expected = sum(clients[p][name].double() * weights[p] for p in clients) / total
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
            # and it moved: the clients did train, differently
            assert not torch.equal(clients[min(clients)][name], clients[max(clients)][name])
    final = load_file(out / "mops_model.safetensors")
    last = load_file(out / "rounds" / f"round_{ROUNDS}" / "global.safetensors")
    for name, value in last.items():
        assert torch.equal(final[name], value)


def test_a_client_killed_mid_round_is_named_and_the_run_finishes(crashed_run):
    out, history, log_records = crashed_run
    rounds = {e["round"]: e for e in history["rounds"]}
    assert sorted(rounds) == [1, 2, 3]
    assert rounds[1]["clients"] == rounds[2]["clients"] == [0, 1, 2]
    assert rounds[3]["clients"] == [0, 2]
    assert [m["client"] for m in rounds[3]["missing"]] == [f"client {CRASHED}"]
    assert "died" in rounds[3]["missing"][0]["reason"].lower() or "actor" in rounds[3]["missing"][0]["reason"].lower()
    warnings = [r.getMessage() for r in log_records if r.levelno == logging.WARNING]
    assert any(f"round {CRASH_ROUND}: client {CRASHED} missing" in w for w in warnings), warnings
    assert len(history["validation"]) == ROUNDS + 1 and "test" in history
    assert (out / "partition.md").read_text().startswith("| client |")
    config = json.loads((out / "mops_config.json").read_text())
    assert config["federated"]["n_clients"] == 3 and config["mixture"]["n_experts"] == 2


def test_the_base_is_loaded_once_per_client_process(crashed_run, tiny_dir):
    import mops

    out, history, _ = crashed_run
    # Each reply reports its process id and how many times that process loaded the base.
    # The saved adapter loads back onto the base, which is unchanged.
    lm = mops.load(tiny_dir, out)
    assert lm.mixture.config.n_experts == 2
    seconds = [e["client_seconds"] for e in history["rounds"]]
    assert all(seconds)
    loads = history["base_loads"]
    assert loads and set(loads.values()) == {1}, loads


def test_bytes_per_round_are_the_tensors_sent_and_received_and_the_tables(crashed_run, trainable):
    """Each round's bytes, as the history recorded them from the messages, equal the tensors
    the client got (the previous global) and sent back (its saved reply); the benchmark's
    communication table is made of those numbers."""
    import importlib.util
    from pathlib import Path

    out, history, _ = crashed_run
    for entry in history["rounds"]:
        previous = load_file(out / "rounds" / f"round_{entry['round'] - 1}" / "global.safetensors")
        down = sum(t.numel() * t.element_size() for t in previous.values())
        assert entry["bytes_down"] == {str(p): down for p in range(3)}  # a client that then died got it too
        for p in entry["clients"]:
            sent = load_file(out / "rounds" / f"round_{entry['round']}" / f"client_{p}.safetensors")
            assert entry["bytes_up"][str(p)] == sum(t.numel() * t.element_size() for t in sent.values())
        assert str(CRASHED) not in entry["bytes_up"] or entry["round"] != CRASH_ROUND
    spec = importlib.util.spec_from_file_location("federated_benchmark",
                                                  Path(__file__).parents[1] / "benchmarks" / "federated.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    table = bench.communication(history)
    assert table["per_round"] == [{"round": e["round"], "down": e["bytes_down"], "up": e["bytes_up"]}
                                  for e in history["rounds"]]
    ups = [n for e in history["rounds"] for n in e["bytes_up"].values()]
    assert table["up_per_client_round"] == sum(ups) / len(ups) == down  # FedAvg sends back what it got
    assert table["tensors_up"] == len(trainable)


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from mops.federated import run_federated
    from mops.federated.client_app import make_client_app
    from mops.federated.config import FederatedConfig

    DELAY = float(sys.argv[3])  # travels with the mod (cloudpickle takes __main__ globals by value)

    def slow_mod(msg, context, call_next):  # leaves time to kill the server between rounds
        if msg.metadata.message_type == "train":
            time.sleep(DELAY)
        return call_next(msg, context)

    config = FederatedConfig.from_json(open(sys.argv[1]).read())
    run_federated(config, sys.argv[2], resume=len(sys.argv) > 4, client_app=make_client_app(mods=[slow_mod]),
                  save_rounds=True, quiet=True)
""")


def test_a_killed_server_resumes_from_its_last_completed_round(crashed_run, tiny_dir, tmp_path, federated_config):
    from mops.federated.server_app import CKPT_STATE, checkpoint_dir_for

    out_a, _, _ = crashed_run
    config = federated_config(tiny_dir, **CRASH_RUN)  # the crashed run's settings: rounds 1 and 2 had every client
    (tmp_path / "config.json").write_text(config.to_json())
    (tmp_path / "run.py").write_text(RESUME_SCRIPT)
    out = tmp_path / "adapter"
    state = checkpoint_dir_for(out) / CKPT_STATE
    cmd = [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "config.json"), str(out)]
    proc = subprocess.Popen(cmd + ["4"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900  # generous: Ray starts slowly on a loaded 2-core machine
        while time.time() < deadline and proc.poll() is None:
            if state.is_file() and json.loads(state.read_text())["round"] >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the server ended before it could be killed"
        assert state.is_file(), "no round completed before the deadline"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server, Ray and its workers: all started in this session
        proc.wait()
    done = json.loads(state.read_text())["round"]
    assert 1 <= done < ROUNDS and not out.exists()
    subprocess.run(cmd + ["0", "resume"], check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = json.loads((out / "history.json").read_text())
    assert [e["round"] for e in history["rounds"]] == [1, 2, 3]
    assert [v["round"] for v in history["validation"]] == [0, 1, 2, 3]
    assert not checkpoint_dir_for(out).exists()
    # Rounds 1..2 had all three clients in both runs: the resumed run reproduces them exactly.
    for rnd in (1, 2):
        mine = load_file(out / "rounds" / f"round_{rnd}" / "global.safetensors")
        reference = load_file(out_a / "rounds" / f"round_{rnd}" / "global.safetensors")
        for name in reference:
            torch.testing.assert_close(mine[name], reference[name], rtol=0, atol=1e-6)


def test_federated_cli_refuses_bad_input(tiny_dir, tmp_path, capsys):
    from mops.recover_cli import entry

    base = ["--base", tiny_dir, "--data", "dolly", "--out", str(tmp_path / "x")]
    assert entry(base + ["--federated", "0"]) == 2
    assert "--federated 0" in capsys.readouterr().err
    assert entry(base + ["--federated", "2", "--strategy", "fedsgd"]) == 2
    assert "--strategy 'fedsgd'" in capsys.readouterr().err
    assert entry(base + ["--federated", "2", "--min-clients", "3"]) == 2
    assert "--min-clients 3" in capsys.readouterr().err
    assert entry(base + ["--federated", "2", "--gate", "single"]) == 2  # K = 4 by default
    assert "--gate single is one prompt" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
