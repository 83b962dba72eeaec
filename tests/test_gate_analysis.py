"""Gate snapshots: the numbers are the gate's real weights, the heatmap is drawn from them,
and a gate pretrained on categories routes held-out examples to their experts."""

import json

import pytest
import torch

from mops.data import encode_example, load_records, split_records
from mops.gate_analysis import HEATMAP_PNG, SNAPSHOTS_JSON, gate_snapshot, gate_weights, save_gate_analysis
from mops.injection import PromptedLM
from mops.mixture import Mixture, MixtureConfig
from mops.models import load_model
from mops.lower_cache import pooled_gate_inputs
from mops.train import TrainConfig, category_targets, recover


@pytest.fixture(scope="module")
def splits():
    return split_records(load_records(["dolly", "natural-instructions"], limit_per_source=80))


def test_a_snapshot_averages_the_gates_own_weights_per_category(tiny_dir, splits):
    model, tok = load_model(tiny_dir)
    torch.manual_seed(0)
    lm = PromptedLM(model, Mixture(MixtureConfig(3, 2, "mops", gate_layer=1, inject_layer=1).resolved(2), 64))
    records = splits["validation"]
    examples = [encode_example(tok, r, 96) for r in records]
    snap = gate_snapshot(examples, gate_weights(lm, examples), "before training", 0)
    # independently: the gate on the pooled instruction states, one example at a time
    expected = {}
    for e in examples:
        pooled = pooled_gate_inputs(lm, [e])
        expected.setdefault(e.category, []).append(lm.mixture.gate.from_pooled(pooled, lm.mixture.experts())[0])
    assert snap["categories"] == sorted(expected)
    assert snap["counts"] == [len(expected[c]) for c in snap["categories"]]
    for c, row in zip(snap["categories"], snap["weights"]):
        assert torch.allclose(torch.tensor(row), torch.stack(expected[c]).mean(0), atol=1e-5)
        assert abs(sum(row) - 1) < 1e-5
    assert gate_weights(lm, examples).shape == (len(examples), 3)


@pytest.mark.parametrize("gate", ["mops", "attempt"])
def test_training_takes_the_four_snapshots_and_the_files_hold_the_same_numbers(tmp_path, tiny_dir, splits, gate):
    model, tok = load_model(tiny_dir)
    config = TrainConfig(steps=4, batch_size=2, eval_every=4, eval_examples=4, gate_pretrain_steps=5,
                         gate_pretrain_examples=32, max_len=96)
    lm, history = recover(model, tok, splits, MixtureConfig(2, 2, gate, gate_layer=1), config, progress=False,
                          snapshot_records=splits["test"])
    snaps = history["gate_snapshots"]
    assert [(s["label"], s["step"]) for s in snaps] == [
        ("before training", 0), ("after gate pretraining", 0), ("midway", 2), ("end of training", 4)]
    assert snaps[0]["weights"] != snaps[1]["weights"]  # pretraining moved the gate
    # the last snapshot is the trained gate's own weights, recomputed from scratch
    examples = [encode_example(tok, r, 96) for r in splits["test"]]
    final = gate_snapshot(examples, gate_weights(lm, examples), "end of training", 4)
    assert torch.allclose(torch.tensor(final["weights"]), torch.tensor(snaps[-1]["weights"]), atol=1e-5)
    save_gate_analysis(tmp_path, snaps)
    assert json.loads((tmp_path / SNAPSHOTS_JSON).read_text()) == snaps
    assert (tmp_path / HEATMAP_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_gate_free_mixture_takes_no_snapshots(tiny_dir, splits):
    model, tok = load_model(tiny_dir)
    _, history = recover(model, tok, splits, MixtureConfig(2, 2, "uniform", gate_layer=1),
                         TrainConfig(steps=1, batch_size=2, eval_examples=4, max_len=96), progress=False,
                         snapshot_records=splits["test"])
    assert "gate_snapshots" not in history


@pytest.mark.embedded
def test_a_category_pretrained_gate_routes_each_held_out_category_to_its_expert():
    """Natural-Instructions' 8 tasks, one expert each: for every task, the held-out examples
    go to that task's expert more often than chance (1/K), and the snapshot agrees."""
    splits = split_records(load_records(["natural-instructions"], limit_per_source=480))
    model, tok = load_model("smollm2-135m")
    K = 8
    held = splits["validation"] + splits["test"]
    config = TrainConfig(steps=1, batch_size=1, eval_examples=1, gate_pretrain_steps=200, gate_pretrain_examples=320,
                         gate_pretrain_lr=1e-2, max_len=64)
    lm, history = recover(model, tok, {"train": splits["train"]}, MixtureConfig(K, 1, "mops", gate_layer=3),
                          config, progress=False, snapshot_records=held)
    targets = torch.tensor(category_targets(held, K))
    weights = gate_weights(lm, [encode_example(tok, r, 64) for r in held])
    snap = next(s for s in history["gate_snapshots"] if s["label"] == "after gate pretraining")
    for i, category in enumerate(snap["categories"]):
        rows = torch.tensor([r.category == category for r in held])
        share = (weights[rows].argmax(1) == targets[rows]).float().mean().item()
        assert share > 1 / K, (category, share)
        assert snap["weights"][i][i % K] > 1 / K, (category, snap["weights"][i])
