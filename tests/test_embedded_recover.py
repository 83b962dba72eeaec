"""End to end on the embedded SmolLM2-135M: prune it 2:4, then a short MoPs run lowers the
held-out response perplexity below the pruned model's."""

import pytest

from mops.data import load_records, split_records, stratified_subset
from mops.eval.perplexity import response_perplexity
from mops.mixture import MixtureConfig
from mops.models import load_model
from mops.prune import PruneConfig
from mops.prune.core import prune_to_folder
from mops.train import TrainConfig, recover

pytestmark = pytest.mark.embedded


def test_a_short_mops_run_recovers_part_of_the_2of4_damage(tmp_path):
    model, tok = load_model("smollm2-135m")
    prune_to_folder(model, tok, PruneConfig(method="wanda", pattern="2:4", calib_samples=16, seq_len=128),
                    tmp_path / "pruned", quiet=True)
    pruned, tok = load_model(tmp_path / "pruned")
    splits = split_records(load_records(["dolly", "natural-instructions"], limit_per_source=200))
    test = stratified_subset(splits["test"], 32)
    before = response_perplexity(pruned, tok, test, max_len=192, progress=False)["ppl"]
    lm, history = recover(pruned, tok, splits, MixtureConfig(n_experts=2, prompt_len=8, gate="mops"),
                          TrainConfig(steps=16, batch_size=4, max_len=192, eval_every=16, eval_examples=16,
                                      gate_pretrain_steps=20, gate_pretrain_examples=128), progress=False)
    after = response_perplexity(lm, tok, test, max_len=192, progress=False)["ppl"]
    assert after < before, (before, after)
