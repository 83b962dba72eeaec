"""``benchmarks/federated.py`` on a tiny random Llama: a small grid (2 clients, 1 round, MoPs,
the single prompt and centralized MoPs) writes its tables, a rerun starts nothing, and bad
options are one-line errors before anything runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = str(REPO / "benchmarks" / "federated.py")


def test_a_small_grid_writes_its_tables_and_a_rerun_starts_nothing(tmp_path, tiny_dir, reprune):
    argv = [sys.executable, BENCH, "--model", tiny_dir, "--name", "t", "--settings", "2:4", "--methods", "mops",
            "mops:mixed_precision=bf16", "single", "--seeds", "0", "--partitions", "skew", "--clients", "2", "--rounds", "1", "--local-steps", "1",
            "--batch-size", "2", "--max-len", "48", "--limit-per-source", "40", "--gate-pretrain-examples", "8",
            "--eval-examples", "4", "--test-examples", "12", "--prune-method", "magnitude",
            "--work-dir", str(tmp_path / "work"), "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out")]
    first = subprocess.run(argv, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "federated_t.json").read_text())
    bf16 = "mops:mixed_precision=bf16"
    assert set(results["runs"]) == {"2:4/none/pruned", "2:4/skew/mops/seed0", "2:4/skew/single/seed0",
                                    "2:4/centralized/mops/seed0", f"2:4/skew/{bf16}/seed0",
                                    f"2:4/centralized/{bf16}/seed0"}
    runs = results["runs"]
    assert (runs["2:4/skew/mops/seed0"]["precision"], runs[f"2:4/skew/{bf16}/seed0"]["precision"]) == ("no", "bf16")
    assert [runs[f"2:4/centralized/{m}/seed0"]["mixed_precision"] for m in ("mops", bf16)] == ["no", "bf16"]
    mops = results["runs"]["2:4/skew/mops/seed0"]
    assert mops["per_example"]["tokens"] == results["runs"]["2:4/centralized/mops/seed0"]["per_example"]["tokens"]
    assert mops["communication"]["up_per_client_round"] > results["runs"]["2:4/skew/single/seed0"][
        "communication"]["up_per_client_round"]  # experts and gate against one prompt
    assert mops["cost"]["client_steps"] == 2 and mops["cost"]["cpu_per_client_step"] > 0
    table = (tmp_path / "out" / "federated_t.md").read_text()
    assert re.search(r"\| 2:4 \| skew \| mops \| single \| seed 0: [+-]\d+\.\d% \[", table)
    assert re.search(r"\| 2:4 \| skew \| mops \| centralized \| seed 0: ", table)
    assert re.search(rf"\| 2:4 \| skew \| {bf16} \| centralized {bf16} \| seed 0: ", table)  # its own precision
    assert "## Communication" in table and "## Each client on its own held-out share" in table
    assert re.search(r"\| 2:4 \| skew \| mops \| 0 \| 2 \| \d+\.\d\d \|", table)  # the step-cost row
    for label in ("mops", bf16):  # each against the centralized step of its own precision
        step = runs[f"2:4/centralized/{label}/seed0"]["cost"]["step_cpu"]
        assert re.search(rf"\| 2:4 \| skew \| {label} \| 0 \| 2 \| [\d.]+ \| [\d.]+ \| {step:.2f} \| [\d.]+x \|", table)
    assert (tmp_path / "out" / "federated_t.png").is_file()
    again = subprocess.run(argv, capture_output=True, text=True)
    assert again.returncode == 0
    started = [ln for ln in again.stdout.splitlines() if ln.startswith("$ ") or re.match(r"\s*\S+/seed\d+ +ppl ", ln)]
    assert not started  # nothing left to do: no run started, no run saved
    other = subprocess.run(argv + ["--rounds", "2"], capture_output=True, text=True)
    assert other.returncode == 2 and "was made with other settings" in other.stderr
    saved = (tmp_path / "out" / "federated_t.json").read_bytes()
    reprune(tmp_path / "work")
    moved = subprocess.run(argv + ["--seeds", "1"], capture_output=True, text=True)
    assert moved.returncode == 2 and "away from the model" in moved.stderr, moved.stderr[-2000:]
    assert (tmp_path / "out" / "federated_t.json").read_bytes() == saved and not (tmp_path / "runs" / "t" / "2of4" / \
        "skew" / "mops" / "seed1").exists()


@pytest.mark.parametrize("flag, message", [(["--methods", "mops", "magic"], "method 'magic'"),
                                           (["--methods", "mops@rounds=x"], "rounds='x' is not a whole number"),
                                           (["--methods", "mops@strategy=fedavgm,server_tau=0.1"], "--server-tau"),
                                           (["--partitions", "zipf"], "--partitions 'zipf'"),
                                           (["--test-examples", "0"], "--test-examples 0"),
                                           (["--lr-warmup", "-1"], "--lr-warmup -1: expected 0 or more")])
def test_the_grid_refuses_bad_options_in_one_line(tmp_path, flag, message):
    run = subprocess.run([sys.executable, BENCH, "--out-dir", str(tmp_path), "--runs-dir", str(tmp_path / "r"),
                          *flag], capture_output=True, text=True)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert message in run.stderr and not any(tmp_path.iterdir())


def test_mops_is_compared_with_the_baselines_run_under_the_same_federated_options(load_benchmark):
    bench = load_benchmark("federated")
    labels = ["mops", "mops@rounds=20,local_steps=5", "single", "single@rounds=20,local_steps=5", "prompt-equal",
              "single:lr=0.1", "single:lr=0.3", "lora", "lora:lora_lr=0.01"]
    assert bench.like_for_like("mops", labels) == ["single", "prompt-equal", "single:lr=0.3", "lora",
                                                   "lora:lora_lr=0.01"]  # 0.3: the default rate, written out
    assert bench.like_for_like("mops@rounds=20,local_steps=5", labels) == ["single@rounds=20,local_steps=5"]
    assert bench.like_for_like("mops@strategy=fedavgm", labels) == []


def test_mops_is_compared_with_baselines_trained_alike_in_what_both_read(load_benchmark):
    bench = load_benchmark("federated")
    labels = ["single", "single:lr=1.0", "prompt-equal:lr=1.0", "lora", "single:lr=1.0,steps=50"]
    # a rate raised for the mixture is raised for the prompts too; LoRA reads no prompt rate
    assert bench.like_for_like("mops:lr=1.0", labels) == ["single:lr=1.0", "prompt-equal:lr=1.0", "lora"]
    # the gate's own settings leave the baselines as they are
    assert bench.like_for_like("mops:gate_lr=0,warm_steps=5", labels) == ["single", "lora"]
    assert bench.like_for_like("mops:lr=1.0,steps=50", labels) == ["single:lr=1.0,steps=50"]


def test_a_variant_is_also_compared_with_the_variants_it_adds_options_to(load_benchmark):
    bench = load_benchmark("federated")
    labels = ["mops", "mops@rounds=20,local_steps=5", "mops@strategy=fedavgm", "mops:lr=0.1@rounds=20,local_steps=5",
              "mops@rounds=20,local_steps=5,strategy=fedavgm", "single@rounds=20,local_steps=5"]
    assert bench.extends("mops@rounds=20,local_steps=5,strategy=fedavgm", labels) == [
        "mops@rounds=20,local_steps=5", "mops@strategy=fedavgm"]
    assert bench.extends("mops@rounds=20,local_steps=5", labels) == []  # the plain method has its own column
    assert bench.extends("mops:lr=0.1@rounds=20,local_steps=5", labels) == []  # other overrides: another method


def test_each_client_table_pairs_every_mops_run_with_the_single_prompt_of_its_schedule(load_benchmark):
    bench = load_benchmark("federated")
    counts = {"client 0": {"a": 15, "b": 1}, "client 1": {"a": 1, "b": 15}}
    shares = {"0": {"examples": 2, "indices": [0, 1]}, "1": {"examples": 2, "indices": [2, 3]}}

    def run(label, nll):
        return {"setting": "2:4", "partition": "skew", "label": label, "seed": 0, "partition_counts": counts,
                "per_client": shares, "per_example": {"nll": [nll * 5] * 4, "tokens": [5] * 4}}

    labels = ["mops", "mops@rounds=20,local_steps=5", "single", "single@rounds=20,local_steps=5"]
    nll = {"mops": 1.0, "single": 1.2, "mops@rounds=20,local_steps=5": 0.9, "single@rounds=20,local_steps=5": 1.1}
    runs = {f"2:4/skew/{m}/seed0": run(m, nll[m]) for m in labels}
    rows = [r for r in bench._per_client({"runs": runs}, ["2:4"], labels) if r.startswith("| 2:4 |")]
    assert [r.split(" | ")[1:4] for r in rows] == [
        ["mops", "single", "0"], ["mops", "single", "1"],
        ["mops@rounds=20,local_steps=5", "single@rounds=20,local_steps=5", "0"],
        ["mops@rounds=20,local_steps=5", "single@rounds=20,local_steps=5", "1"]]
    assert rows[0].split(" | ")[4:7] == ["a", "50%", "2"]  # client 0's large category, its share of training
    assert all(r.split(" | ")[7] == "2.72" for r in rows[:2])  # exp(1.0): the share's own perplexity
    assert all(r.split(" | ")[8] == "3.32" for r in rows[:2])  # exp(1.2), the 10 x 10 single prompt's
    assert all(r.split(" | ")[8] == "3.00" for r in rows[2:])  # exp(1.1), the 20 x 5 one's


def test_a_run_s_precision_is_what_every_client_said_and_picks_its_centralized_reference(load_benchmark):
    federated = load_benchmark("federated")
    rounds = lambda *bf16: {"rounds": [{"clients": [0, 1], "bf16_clients": b} for b in bf16]}  # noqa: E731
    assert federated.client_precision(rounds([0, 1], [0, 1])) == "bf16"
    assert federated.client_precision(rounds([], [])) == "no"
    assert federated.client_precision(rounds([0, 1], [1])) == "mixed"  # auto on unlike machines
    assert federated.client_precision({"rounds": [{"clients": [0, 1]}]}) == "no"  # a run from before the option
    methods = [federated.parse_label(m) for m in ("mops", "single", "lora:mixed_precision=bf16@rounds=2")]
    assert federated.centralized_labels(methods) == ["mops", "mops:mixed_precision=bf16"]
    assert federated.centralized_label("single:mixed_precision=bf16@strategy=fedavgm") == "mops:mixed_precision=bf16"


def test_a_file_made_before_a_default_rate_changed_grows_only_at_the_rates_it_was_made_at(load_benchmark):
    bench = load_benchmark("federated")
    # a file of before --lr-warmup existed: the rates left to mops-recover's defaults of the day
    made = {"lr": None, "gate_lr": None, "rounds": 10, "training": {"lr": 0.3, "gate_lr": 3e-3, "balance": 0.0}}

    def now(lr=None, warmup=None, default_lr=0.3, default_warmup=0):
        return {"lr": lr, "gate_lr": None, "lr_warmup": warmup, "rounds": 10,
                "training": {"lr": default_lr, "gate_lr": 3e-3, "lr_warmup": default_warmup, "balance": 0.0}}
    assert bench.same_protocol(made, now()) and bench.same_protocol(made, now(lr=0.3, default_lr=1.0))
    assert not bench.same_protocol(made, now(default_lr=1.0)) and not bench.same_protocol(made, now(lr=1.0))
    assert not bench.same_protocol(made, now(default_warmup=50))  # it trained without a warmup
    assert bench.same_protocol(made, now(lr=0.3, warmup=0, default_lr=1.0, default_warmup=50))
    assert made == {"lr": None, "gate_lr": None, "rounds": 10,
                    "training": {"lr": 0.3, "gate_lr": 3e-3, "balance": 0.0}}  # compared, not changed
