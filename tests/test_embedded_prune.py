"""End to end on the embedded SmolLM2-135M, through the installed ``prune`` command."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mops.prune import prunable_linears

pytestmark = pytest.mark.embedded


def test_prune_embedded_model_2of4_with_sparsegpt(tmp_path, embedded_dir):
    out = tmp_path / "sgpt-2of4"
    # the console script installed beside this interpreter (the venv need not be on PATH)
    command = Path(sys.executable).parent / "prune"
    assert command.is_file(), "the console script `prune` is not installed"
    done = subprocess.run([str(command), "--model", "smollm2-135m", "--method", "sparsegpt", "--pattern", "2:4",
                           "--calib-samples", "16", "--seq-len", "128", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2:4 compliance: 1.0000" in done.stdout

    pruned = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(embedded_dir)
    linears = prunable_linears(pruned)
    assert len(linears) == 30 * 7
    for name, module in linears.items():
        groups = (module.weight.reshape(module.weight.shape[0], -1, 4) == 0).sum(-1)
        assert (groups >= 2).all(), name
    assert torch.equal(pruned.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert torch.equal(pruned.lm_head.weight, dense.lm_head.weight)
    for (n1, p1), (_, p2) in zip(pruned.named_parameters(), dense.named_parameters()):
        if "norm" in n1:
            assert torch.equal(p1, p2), n1  # only decoder Linear weights change
