"""The recovery methods: each trains what it should, LoRA leaves the sparse base untouched,
and the benchmark grid saves every cell and skips finished ones on a rerun."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mops.baselines import (METHODS, Budget, lora_equal_layout, lora_param_count, mixture_for, mixture_params,
                            parse_method, prepare, trainable_count)
from mops.data import load_records, split_records
from mops.errors import UserError
from mops.mixture import MixtureConfig
from mops.eval.perplexity import response_perplexity
from mops.models import load_model
from mops.injection import PromptedLM
from mops.train import TrainConfig, recover, trainable_groups

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def splits():
    return split_records(load_records(["dolly", "natural-instructions"], limit_per_source=40))


def small(**kw):
    return TrainConfig(**{"steps": 3, "batch_size": 2, "eval_every": 3, "eval_examples": 4, "gate_pretrain_steps": 3,
                          "max_len": 96, **kw})


def test_same_budget_baselines_have_the_mixtures_parameter_count(embedded_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(embedded_dir)  # the embedded model's shapes, no weights needed
    d, L = config.hidden_size, config.num_hidden_layers
    for mops in (MixtureConfig(4, 10, "mops", "attention", 9, 9, 128), MixtureConfig(4, 10, "mops", "interpolate", 9, 9, 0),
                 MixtureConfig(8, 5, "mops", "attention", 9, 9, 16, top_k=1)):
        b = Budget(mops)
        budget = mixture_params(mops, d, L)
        equal = mixture_for("prompt-equal", b, d, L)
        assert equal.n_experts == 1 and (equal.gate_layer, equal.inject_layer) == (9, 9)
        assert budget <= mixture_params(equal, d, L) < budget + d  # the whole mixture's size, gate included
        layout = lora_equal_layout(config, budget)
        assert abs(layout.params - budget) <= 0.10 * budget
        assert layout.params == lora_param_count(config, layout.rank, layout.targets, len(layout.layers))
    assert mixture_for("prompt", Budget(), d, L).inject_layer == 0 and mixture_for("prompt", Budget(), d, L).prompt_len == 10
    with pytest.raises(UserError, match="method 'adapter'"):
        parse_method("adapter")


def test_a_lora_equal_model_trains_as_many_parameters_as_its_layout_says(tiny_dir, splits):
    model, tok = load_model(tiny_dir)
    b = Budget(MixtureConfig(2, 3, "mops", gate_layer=1, gate_hidden=4))
    mixture, extra, about = prepare("lora-equal", model, b)
    layout = lora_equal_layout(model.config, mixture_params(b.mops, 64, 2))
    assert sum(p.numel() for p in extra) == layout.params
    assert abs(layout.params - mixture_params(b.mops, 64, 2)) <= 0.10 * mixture_params(b.mops, 64, 2)
    lora_layers = {int(n.split(".")[2]) for n, _ in model.named_parameters() if "lora_" in n}
    assert lora_layers == set(about["lora"]["layers"])
    lm, history = recover(model, tok, splits, mixture, small(lr=1e-2), progress=False, extra_params=extra)
    assert trainable_count(lm, extra) == layout.params


def test_method_overrides_reach_the_mixture_and_the_training_and_bad_ones_are_refused():
    spec = parse_method("mops:top_k=1,combine=interpolate,gate_hidden=0,lr=1.0,warm_steps=5,mixed_precision=bf16")
    assert spec.mixture == {"top_k": 1, "combine": "interpolate", "gate_hidden": 0}
    assert spec.training == {"lr": 1.0, "warm_steps": 5, "mixed_precision": "bf16"}
    for bad, message in [("mops:top_k", "not key=value"), ("mops:colour=red", "not key=value"),
                         ("mops:top_k=one", "top_k='one' is not a whole number"), ("lora:top_k=1", "lora has no mixture"),
                         ("mops:mixed_precision=fp8", "mixed-precision 'fp8': expected one of no, bf16, fp16, auto"),
                         ("prompt:lr_schedule=linear", "lr-schedule 'linear': expected one of constant, cosine")]:
        with pytest.raises(UserError, match=message):
            parse_method(bad)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("none", "lora", "lora-equal")])
def test_every_prompt_method_trains_in_the_one_trainer(tiny_dir, splits, method):
    model, tok = load_model(tiny_dir)
    mixture, extra, _ = prepare(method, model, Budget(MixtureConfig(2, 3, gate_layer=1)))
    lm, history = recover(model, tok, splits, mixture, small(), progress=False, extra_params=extra)
    assert len(history["train_loss"]) == 3 and all(torch.isfinite(torch.tensor(history["train_loss"])))
    assert extra == [] and trainable_count(lm) == sum(p.numel() for p in lm.mixture.parameters())


def test_lora_trains_its_tensors_only_and_the_sparse_base_stays_as_it_was(tiny_dir, splits):
    model, tok = load_model(tiny_dir)
    with torch.no_grad():  # make the base visibly sparse: half of every projection zero
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_((torch.arange(p.numel()).reshape(p.shape) % 2).to(p.dtype))
    base = {n: p.clone() for n, p in model.named_parameters()}
    before = response_perplexity(model, tok, splits["test"][:8], max_len=96, progress=False)["ppl"]
    mixture, extra, _ = prepare("lora", model, Budget(lora_rank=4))
    # LoRA's B starts at zero: the wrapped model scores exactly like the base
    assert response_perplexity(model, tok, splits["test"][:8], max_len=96, progress=False)["ppl"] == pytest.approx(before)
    lora_before = [p.clone() for p in extra]
    groups = trainable_groups(PromptedLM.bare(model), small(lr=0.3, lora_lr=1e-2), extra)
    assert [(g["name"], g["lr"]) for g in groups] == [("experts", 0.3), ("lora", 1e-2)]  # LoRA at its own rate
    assert sum(p.numel() for p in groups[1]["params"]) == sum(p.numel() for p in extra)
    lm, _ = recover(model, tok, splits, mixture, small(lora_lr=1e-2), progress=False, extra_params=extra)
    after = {n.replace("base_layer.", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    assert set(after) == set(base) and all(torch.equal(after[n], base[n]) for n in base)  # unmerged, untouched
    assert any(not torch.equal(a, b) for a, b in zip(extra, lora_before))
    # r * (in + out) per projection: q, o 64x64; k, v 64->32; gate, up 64->128; down 128->64; 2 layers
    assert trainable_count(lm, extra) == 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)


def test_a_file_made_before_the_warmup_existed_grows_only_without_one(load_benchmark):
    recovery = load_benchmark("recovery")
    made = {"lr": 0.3, "steps": 200, "mops": {"top_k": None}, "training": {"balance": 0.0}}
    now = lambda warmup: {"lr": 0.3, "steps": 200, "lr_warmup": warmup, "mops": {"top_k": None},  # noqa: E731
                           "training": {"balance": 0.0, "distill": 0.0}}
    assert recovery.same_protocol(made, now(0)) and not recovery.same_protocol(made, now(50))
    assert recovery.same_protocol(now(50), now(50)) and not recovery.same_protocol(now(50), now(0))


def test_the_grid_saves_each_cell_and_a_rerun_skips_finished_ones(tmp_path, tiny_dir):
    argv = [sys.executable, str(REPO / "benchmarks" / "recovery.py"), "--model", tiny_dir, "--name", "t",
            "--settings", "2:4", "--methods", "none", "prompt", "mops", "--seeds", "0", "1", "--limit-per-source", "40",
            "--steps", "2",
            "--batch-size", "2", "--max-len", "96", "--test-examples", "16", "--gate-pretrain-examples", "16",
            "--gate-pretrain-steps", "3", "--prune-method", "magnitude", "--work-dir", str(tmp_path / "work"),
            "--out-dir", str(tmp_path / "out")]
    first = subprocess.run(argv, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    results = json.loads((tmp_path / "out" / "recovery_t.json").read_text())
    assert set(results["cells"]) == {"dense", "2:4/none", "2:4/prompt/seed0", "2:4/prompt/seed1", "2:4/mops/seed0",
                                     "2:4/mops/seed1"}
    mops = results["cells"]["2:4/mops/seed0"]
    assert [s["label"] for s in mops["gate_snapshots"]][-1] == "end of training"
    assert mops["train_loss"] != results["cells"]["2:4/mops/seed1"]["train_loss"]  # the seeds train differently
    assert mops["per_example"]["tokens"] == results["cells"]["2:4/none"]["per_example"]["tokens"]  # same test set
    assert (tmp_path / "out" / "recovery_t_gates" / "2of4_mops_seed0.png").is_file()
    table = (tmp_path / "out" / "recovery_t.md").read_text()
    assert "| 2:4 |" in table and re.search(r"\| 2:4 \| mops \| prompt \| 0, 1 \| [+-]\d+\.\d% \[", table)
    # with two seeds, the comparison is also given at each seed alone
    assert re.search(r"\| 2:4 \| mops \| prompt \| .* \| seed 0: [+-]\d+\.\d% \[[^]]*\] \w+; seed 1: [+-]\d+\.\d% \[", table)
    assert len(results["test_sources"]) == mops["test_examples"]  # each example's source, in per_example's order
    assert re.search(r"\| 2:4 \| mops \| prompt \| dolly \| \d+ \| [\d,]+ \| [+-]\d+\.\d% \[", table)
    again = subprocess.run(argv, capture_output=True, text=True)
    assert again.returncode == 0 and "ppl" not in again.stdout  # nothing left to do
    other = subprocess.run(argv + ["--steps", "3"], capture_output=True, text=True)
    assert other.returncode == 2 and "was made with other settings" in other.stderr


def test_the_study_can_score_on_sources_no_method_trained_on(tmp_path, tiny_dir):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "recovery.py"), "--model", tiny_dir, "--name", "t",
                          "--settings", "2:4", "--methods", "none", "prompt", "--seeds", "0", "--data", "dolly",
                          "--limit-per-source", "40", "--score-data", "alpaca-eval", "gsm8k", "--score-per-source", "6",
                          "--steps", "2", "--batch-size", "2", "--max-len", "96", "--prune-method", "magnitude",
                          "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "recovery_t.json").read_text())
    assert results["test_sources"] == ["alpaca-eval"] * 6 + ["gsm8k"] * 6  # 6 of each, none from the training data
    assert results["cells"]["2:4/prompt/seed0"]["test_examples"] == 12
    assert results["protocol"]["score_data"] == {"sources": ["alpaca-eval", "gsm8k"], "per_source": 6}
    table = (tmp_path / "out" / "recovery_t.md").read_text()
    assert "12 held-out alpaca-eval + gsm8k (never trained on; 6 of each) examples" in table


def test_a_checkpoint_pruned_again_differently_is_refused_and_the_file_is_kept(tmp_path, tiny_dir, reprune):
    def study(*methods):
        return subprocess.run([sys.executable, str(REPO / "benchmarks" / "recovery.py"), "--model", tiny_dir,
                               "--name", "t", "--settings", "2:4", "--methods", *methods, "--seeds", "0",
                               "--limit-per-source", "40", "--steps", "2", "--batch-size", "2", "--max-len", "96",
                               "--test-examples", "12", "--gate-pretrain-examples", "8", "--gate-pretrain-steps", "2",
                               "--prune-method", "magnitude", "--work-dir", str(tmp_path / "work"),
                               "--out-dir", str(tmp_path / "out")], capture_output=True, text=True)

    assert study("none").returncode == 0
    same = study("none", "prompt")  # the same checkpoint: checked, and the study goes on
    assert same.returncode == 0, same.stderr[-2000:]
    saved = (tmp_path / "out" / "recovery_t.json").read_bytes()
    reprune(tmp_path / "work")
    other = study("none", "prompt", "uniform")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr[-2000:]
    assert "away from the model" in other.stderr and "--name" in other.stderr
    assert (tmp_path / "out" / "recovery_t.json").read_bytes() == saved


def test_the_by_source_comparison_resamples_each_sources_examples_alone(load_benchmark):
    recovery = load_benchmark("recovery")
    tokens = [5, 7, 3, 4]
    cell = lambda method, nll: {"setting": "2:4", "method": method, "seed": 0, "trainable_params": 1,  # noqa: E731
                                "per_example": {"nll": nll, "tokens": tokens}}
    results = {"test_sources": ["a", "b", "a", "b"], "cells": {
        "2:4/prompt-equal/seed0": cell("prompt-equal", [5.0, 7.0, 3.0, 4.0]),
        "2:4/mops/seed0": cell("mops", [5.0, 3.5, 3.0, 2.0])}}  # the same on source a, half the NLL on b
    compared = recovery.comparisons(results["cells"], "2:4", ["prompt-equal", "mops"])
    rows = {r["source"]: r for r in recovery.by_source(results, "2:4", compared)}
    assert rows["a"]["examples"] == 2 and rows["a"]["tokens"] == 8
    assert rows["a"]["delta"] == rows["a"]["low"] == rows["a"]["high"] == 0 and rows["a"]["verdict"] == "tie"
    assert abs(rows["b"]["delta"] - (math.exp(-5.5 / 11) - 1)) < 1e-12 and rows["b"]["verdict"] == "lower"
    assert recovery.by_source({**results, "test_sources": None}, "2:4", compared) == []


def test_mops_is_compared_with_the_best_of_each_baseline_kind_and_with_lora_for_reference(load_benchmark):
    recovery = load_benchmark("recovery")
    tokens = [5, 7, 3, 4]
    cell = lambda method, nll: {"setting": "2:4", "method": method, "seed": 0, "trainable_params": 1,  # noqa: E731
                                "per_example": {"nll": nll, "tokens": tokens}}
    cells = {"2:4/prompt-equal/seed0": cell("prompt-equal", [5.0, 7.0, 3.0, 4.0]),
             "2:4/prompt-equal:lr=1.0/seed0": cell("prompt-equal", [4.0, 7.0, 3.0, 4.0]),
             "2:4/lora/seed0": cell("lora", [2.5, 3.5, 1.5, 2.0]),
             "2:4/mops/seed0": cell("mops", [5.0, 7.0, 3.0, 4.0])}
    methods = ["prompt-equal", "prompt-equal:lr=1.0", "lora", "mops"]
    rows = {r["kind"]: r for r in recovery.comparisons(cells, "2:4", methods)}
    assert set(rows) == {"prompt-equal", "lora"}
    assert rows["prompt-equal"]["baseline"] == "prompt-equal:lr=1.0"  # the lower of the two
    assert abs(rows["lora"]["delta"] - (math.exp(9.5 / 19) - 1)) < 1e-12 and rows["lora"]["verdict"] == "higher"


def test_two_runs_on_other_settings_share_one_results_file(tmp_path, tiny_dir):
    def argv(setting):
        return [sys.executable, str(REPO / "benchmarks" / "recovery.py"), "--model", tiny_dir, "--name", "t",
                "--settings", setting, "--methods", "none", "prompt", "--seeds", "0", "--limit-per-source", "40",
                "--steps", "2",
                "--batch-size", "2", "--max-len", "96", "--test-examples", "16", "--prune-method", "magnitude",
                "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]

    runs = [subprocess.Popen(argv(s), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in ("2:4", "4:8")]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    results = json.loads((tmp_path / "out" / "recovery_t.json").read_text())
    assert set(results["cells"]) == {"dense", "2:4/none", "2:4/prompt/seed0", "4:8/none", "4:8/prompt/seed0"}
    table = (tmp_path / "out" / "recovery_t.md").read_text()
    assert "| 2:4 |" in table and "| 4:8 |" in table  # the last run redrew the outputs with both runs' cells


@pytest.mark.parametrize("flag", [["--threads", "0"], ["--methods", "mops", "magic"], ["--methods", "mops:top_k=x"],
                                  ["--methods", "mops:mixed_precision=fp8"],
                                  ["--test-examples", "0"], ["--lr-warmup", "-1"], ["--steps", "0"],
                                  ["--lr", "-1.0"], ["--batch-size", "0"], ["--score-data", "dolly"],
                                  ["--score-data", "nowhere"], ["--score-per-source", "0"]])
def test_the_grid_refuses_bad_options_in_one_line(tmp_path, flag):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "recovery.py"), "--out-dir", str(tmp_path), *flag],
                         capture_output=True, text=True)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert flag[-1] in run.stderr and not any(tmp_path.iterdir())


def test_scored_data_that_is_training_data_under_another_name_is_refused(tmp_path):
    """Dolly's own records in a file of another name are training data all the same: one line,
    exit 2, nothing written."""
    copied = tmp_path / "renamed.jsonl"
    copied.write_text("".join(json.dumps({"instruction": r.instruction, "context": r.context, "response": r.response,
                                          "category": r.category}) + "\n" for r in load_records("dolly", 3, 0)))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "recovery.py"), "--out-dir", str(out),
                          "--score-data", str(copied), "--methods", "none"], capture_output=True, text=True)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "3 of its 3 examples are also in --data" in run.stderr and not out.exists()


def test_a_recovery_variant_is_compared_with_each_variant_whose_overrides_it_keeps(load_benchmark):
    recovery = load_benchmark("recovery")
    methods = ["prompt-equal", "mops:combine=attention", "mops:combine=attention,top_k=1",
               "mops:combine=attention,top_k=1,steps=600", "mops:combine=interpolate,top_k=1", "mops"]
    assert recovery.extends("mops:combine=attention,top_k=1,steps=600", methods) == [
        "mops:combine=attention", "mops:combine=attention,top_k=1", "mops"]  # training overrides count too
    assert recovery.extends("mops:combine=interpolate,top_k=1", methods) == ["mops"]  # another value: not a subset
    assert recovery.extends("mops", methods) == [] and recovery.extends("prompt-equal", methods) == []

    tokens = [5, 7]
    cell = lambda method, nll: {"setting": "3:4", "method": method, "seed": 0, "trainable_params": 1,  # noqa: E731
                                "per_example": {"nll": nll, "tokens": tokens}}
    cells = {"3:4/mops/seed0": cell("mops", [5.0, 7.0]),
             "3:4/mops:combine=attention/seed0": cell("mops:combine=attention", [2.5, 3.5])}  # half the NLL
    rows = recovery.variant_comparisons(cells, "3:4", ["mops", "mops:combine=attention"])
    assert [(r["variant"], r["extends"]) for r in rows] == [("mops:combine=attention", "mops")]
    assert abs(rows[0]["delta"] - (math.exp(-0.5) - 1)) < 1e-12 and rows[0]["verdict"] == "lower"


def test_two_methods_are_compared_over_the_seeds_both_ran(load_benchmark):
    """A variant run at seed 0 only, against a method run at seeds 0 and 1, is compared with
    seed 0 alone (averaging in seed 1 would credit the method with that seed's luck); the
    unseeded ``none`` pairs with any seeds."""
    recovery = load_benchmark("recovery")
    tokens = [5, 7]
    cell = lambda method, seed, nll: {"setting": "3:4", "method": method, "seed": seed,  # noqa: E731
                                      "trainable_params": 1, "per_example": {"nll": nll, "tokens": tokens}}
    cells = {"3:4/none": cell("none", None, [9.0, 9.0]),
             "3:4/mops/seed0": cell("mops", 0, [5.0, 7.0]),
             "3:4/mops/seed1": cell("mops", 1, [1.0, 1.0]),  # a lucky seed the variant never ran
             "3:4/mops:warm_steps=5/seed0": cell("mops:warm_steps=5", 0, [5.0, 7.0])}
    rows = recovery.variant_comparisons(cells, "3:4", ["mops", "mops:warm_steps=5"])
    assert [(r["seeds"], r["delta"], r["verdict"]) for r in rows] == [([0], 0.0, "tie")]
    ours, base = recovery.paired(cells, "3:4", "mops", "none")
    assert ours["seeds"] == [0, 1] and base["seeds"] == [None]
    assert recovery.paired(cells, "3:4", "mops:warm_steps=5", "mops:warm_steps=9") is None  # nothing to pair
    # against a baseline kind: its best variant over the seeds it shares with ours
    cells |= {"3:4/prompt-equal/seed0": cell("prompt-equal", 0, [6.0, 8.0]),
              "3:4/prompt-equal/seed1": cell("prompt-equal", 1, [6.0, 8.0]),
              "3:4/prompt-equal:lr=1.0/seed1": cell("prompt-equal", 1, [0.5, 0.5])}  # seed 1 only
    methods = ["none", "prompt-equal", "prompt-equal:lr=1.0", "mops", "mops:warm_steps=5"]
    rows = {r["mops"]: r for r in recovery.comparisons(cells, "3:4", methods)}
    assert (rows["mops:warm_steps=5"]["baseline"], rows["mops:warm_steps=5"]["seeds"]) == ("prompt-equal", [0])
    assert (rows["mops"]["baseline"], rows["mops"]["seeds"]) == ("prompt-equal:lr=1.0", [1])
