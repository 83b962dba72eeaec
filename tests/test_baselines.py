"""The recovery methods: each trains what it should, LoRA leaves the sparse base untouched,
and the benchmark grid saves every cell and skips finished ones on a rerun."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mops.baselines import METHODS, Budget, mixture_for, prepare, trainable_count
from mops.data import load_records, split_records
from mops.errors import UserError
from mops.eval.perplexity import response_perplexity
from mops.models import load_model
from mops.train import TrainConfig, recover

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def splits():
    return split_records(load_records(["dolly", "natural-instructions"], limit_per_source=40))


def small(**kw):
    return TrainConfig(**{"steps": 3, "batch_size": 2, "eval_every": 3, "eval_examples": 4, "gate_pretrain_steps": 3,
                          "max_len": 96, **kw})


def test_same_budget_baselines_have_the_experts_parameter_count():
    b = Budget(n_experts=4, prompt_len=10, gate_layer=9, inject_layer=9)
    equal, mops = mixture_for("prompt-equal", b), mixture_for("mops", b)
    assert equal.n_experts * equal.prompt_len == mops.n_experts * mops.prompt_len == 40
    assert (equal.inject_layer, mops.inject_layer) == (9, 9)
    assert mixture_for("prompt", b).inject_layer == 0 and mixture_for("prompt", b).prompt_len == 10
    assert mixture_for("mops-attention", b).combine == "attention"
    with pytest.raises(UserError, match="method 'adapter'"):
        mixture_for("adapter", b)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("none", "lora")])
def test_every_prompt_method_trains_in_the_one_trainer(tiny_dir, splits, method):
    model, tok = load_model(tiny_dir)
    mixture, extra = prepare(method, model, Budget(2, 3))
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
    mixture, extra = prepare("lora", model, Budget(lora_rank=4))
    # LoRA's B starts at zero: the wrapped model scores exactly like the base
    assert response_perplexity(model, tok, splits["test"][:8], max_len=96, progress=False)["ppl"] == pytest.approx(before)
    lora_before = [p.clone() for p in extra]
    lm, _ = recover(model, tok, splits, mixture, small(lr=1e-2), progress=False, extra_params=extra)
    after = {n.replace("base_layer.", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    assert set(after) == set(base) and all(torch.equal(after[n], base[n]) for n in base)  # unmerged, untouched
    assert any(not torch.equal(a, b) for a, b in zip(extra, lora_before))
    # r * (in + out) per projection: q, o 64x64; k, v 64->32; gate, up 64->128; down 128->64; 2 layers
    assert trainable_count(lm, extra) == 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)


def test_the_grid_saves_each_cell_and_a_rerun_skips_finished_ones(tmp_path, tiny_dir):
    argv = [sys.executable, str(REPO / "benchmarks" / "recovery.py"), "--model", tiny_dir, "--name", "t",
            "--settings", "2:4", "--methods", "none", "prompt", "mops", "--limit-per-source", "40", "--steps", "2",
            "--batch-size", "2", "--max-len", "96", "--test-examples", "16", "--gate-pretrain-examples", "16",
            "--gate-pretrain-steps", "3", "--prune-method", "magnitude", "--work-dir", str(tmp_path / "work"),
            "--out-dir", str(tmp_path / "out")]
    first = subprocess.run(argv, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    results = json.loads((tmp_path / "out" / "recovery_t.json").read_text())
    assert set(results["cells"]) == {"dense", "2:4/none", "2:4/prompt", "2:4/mops"}
    mops = results["cells"]["2:4/mops"]
    assert [s["label"] for s in mops["gate_snapshots"]][-1] == "end of training"
    assert (tmp_path / "out" / "recovery_t_gates" / "2of4_mops.png").is_file()
    assert "| 2:4 |" in (tmp_path / "out" / "recovery_t.md").read_text()
    again = subprocess.run(argv, capture_output=True, text=True)
    assert again.returncode == 0 and "ppl" not in again.stdout  # nothing left to do
    other = subprocess.run(argv + ["--steps", "3"], capture_output=True, text=True)
    assert other.returncode == 2 and "was made with other settings" in other.stderr


def test_two_runs_on_other_settings_share_one_results_file(tmp_path, tiny_dir):
    def argv(setting):
        return [sys.executable, str(REPO / "benchmarks" / "recovery.py"), "--model", tiny_dir, "--name", "t",
                "--settings", setting, "--methods", "none", "prompt", "--limit-per-source", "40", "--steps", "2",
                "--batch-size", "2", "--max-len", "96", "--test-examples", "16", "--prune-method", "magnitude",
                "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]

    runs = [subprocess.Popen(argv(s), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in ("2:4", "4:8")]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    results = json.loads((tmp_path / "out" / "recovery_t.json").read_text())
    assert set(results["cells"]) == {"dense", "2:4/none", "2:4/prompt", "4:8/none", "4:8/prompt"}
    table = (tmp_path / "out" / "recovery_t.md").read_text()
    assert "| 2:4 |" in table and "| 4:8 |" in table  # the last run redrew the outputs with both runs' cells


@pytest.mark.parametrize("flag", [["--threads", "0"], ["--methods", "mops", "magic"]])
def test_the_grid_refuses_bad_options_in_one_line(tmp_path, flag):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "recovery.py"), "--out-dir", str(tmp_path), *flag],
                         capture_output=True, text=True)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert flag[-1] in run.stderr and not any(tmp_path.iterdir())
