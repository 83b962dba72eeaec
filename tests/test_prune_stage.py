"""Every method x setting on a tiny random Llama, through the same path the CLI takes:
prune, save, re-read the saved weights."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mops.errors import UserError
from mops.models import load_model
from mops.prune import PruneConfig, prunable_linears
from mops.prune.core import prune_to_folder
from mops.prune.report import nm_compliance, sparsity_report

SETTINGS = ["0.75", "0.85", "0.90", "2:4", "4:8", "3:4", "7:8"]


def config_for(method, setting, **kw):
    kw.setdefault("calib_samples", 8)
    kw.setdefault("seq_len", 64)
    if ":" in setting:
        return PruneConfig(method=method, pattern=setting, **kw)
    return PruneConfig(method=method, sparsity=float(setting), **kw)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_every_method_and_setting_gives_a_provably_sparse_checkpoint(tmp_path, tiny_untied_dir, method, setting):
    model, tok = load_model(tiny_untied_dir)
    config = config_for(method, setting)
    out = tmp_path / "pruned"
    report = prune_to_folder(model, tok, config, out, quiet=True)

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    dense = load_file(f"{tiny_untied_dir}/model.safetensors")
    linears = prunable_linears(reloaded)
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    zeros = total = 0
    for name, module in linears.items():
        w = module.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
        if config.pattern:
            n, m = config.pattern
            assert ((w.reshape(w.shape[0], -1, m) == 0).sum(-1) >= n).all(), name
    assert zeros / total == pytest.approx(config.target_sparsity, abs=0.01)
    # Embeddings and lm_head are never pruned: bitwise equal to the dense model's.
    assert torch.equal(reloaded.model.embed_tokens.weight, dense["model.embed_tokens.weight"])
    assert torch.equal(reloaded.lm_head.weight, dense["lm_head.weight"])
    # The report re-read the saved weights and says the same.
    saved = json.loads((out / "sparsity_report.json").read_text())
    assert saved["overall_sparsity"] == pytest.approx(zeros / total)
    assert saved["nm_compliance"] == (1.0 if config.pattern else None)
    assert set(saved["dense_modules"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert saved["setting"] == setting and saved["method"] == method
    assert saved["calibration"] == (None if method == "magnitude" else {"source": "dolly", "samples": 8, "seq_len": 64})
    assert {"torch", "transformers", "llmcompressor"} <= set(saved["versions"]) and saved["prune_seconds"] >= 0
    assert report == saved


def test_calibrated_methods_beat_magnitude_at_2of4_on_the_calibration_task(tmp_path, tiny_dir):
    """SparseGPT and Wanda use the data; on the data's own distribution they keep the
    layer outputs closer to the dense model than magnitude pruning does."""
    from mops.prune.calibration import calibration_ids

    dense_model, tok = load_model(tiny_dir)
    ids = calibration_ids(tok, "dolly", 8, 64, seed=0)
    with torch.no_grad():
        dense_logits = dense_model(ids).logits
    errors = {}
    for method in ["sparsegpt", "wanda", "magnitude"]:
        model, tok = load_model(tiny_dir)
        prune_to_folder(model, tok, config_for(method, "2:4"), tmp_path / method, quiet=True)
        with torch.no_grad():
            errors[method] = (model(ids).logits - dense_logits).pow(2).mean().item()
    assert errors["sparsegpt"] < errors["magnitude"]
    assert errors["wanda"] < errors["magnitude"]


def test_pattern_m_must_divide_every_pruned_input_width(tmp_path, tiny_dir):
    model, tok = load_model(tiny_dir)
    with pytest.raises(UserError, match=r"M=5 does not divide the input width 64"):
        prune_to_folder(model, tok, config_for("magnitude", "2:5"), tmp_path / "x", quiet=True)
    assert not (tmp_path / "x").exists()


def test_nm_compliance_counts_groups_with_enough_zeros():
    w = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]])
    assert nm_compliance(w, (2, 4)) == 0.5
    assert nm_compliance(w, (1, 4)) == 1.0


def test_report_lists_what_was_left_dense(tmp_path, tiny_dir):
    model, tok = load_model(tiny_dir)
    prune_to_folder(model, tok, config_for("magnitude", "0.75"), tmp_path / "m", quiet=True)
    report = sparsity_report(tmp_path / "m", sorted(prunable_linears(model)), None)
    assert list(report["dense_modules"]) == ["model.embed_tokens.weight"]
    assert report["lm_head_tied_to_embeddings"] is True
    assert all(abs(m["sparsity"] - 0.75) < 1e-3 for m in report["modules"].values())
