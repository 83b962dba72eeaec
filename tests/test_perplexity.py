"""Our perplexity protocols against the model's own loss (an independent computation)."""

import math

import pytest
import torch

from mops.data import encode_example, heldout_records, wikitext_text
from mops.eval.perplexity import response_perplexity, wikitext_perplexity
from mops.models import load_model


def test_wikitext_perplexity_equals_mean_of_hf_window_losses(tiny_dir):
    model, tok = load_model(tiny_dir)
    result = wikitext_perplexity(model, tok, seq_len=128, max_windows=3, progress=False)
    ids = tok(wikitext_text("test"), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        losses = [model(ids[:, i * 128 : (i + 1) * 128], labels=ids[:, i * 128 : (i + 1) * 128]).loss for i in range(3)]
    assert result["ppl"] == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    assert result["windows"] == 3 and result["windows_total"] == ids.shape[1] // 128
    assert "first 3 of" in result["protocol"]


def test_response_perplexity_takes_loss_on_responses_only_per_category(tiny_dir):
    model, tok = load_model(tiny_dir)
    records = heldout_records("dolly", "test", limit=8)
    result = response_perplexity(model, tok, records, batch_size=3, progress=False)
    total_nll = total_tokens = 0.0
    per_cat = {}
    for r in records:  # one at a time, no padding, through the model's own loss
        e = encode_example(tok, r)
        with torch.no_grad():
            loss = model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item()
        n = sum(label != -100 for label in e.labels[1:])
        total_nll += loss * n
        total_tokens += n
        s, c = per_cat.get(r.category, (0.0, 0))
        per_cat[r.category] = (s + loss * n, c + n)
    assert result["ppl"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)
    for c, (s, n) in per_cat.items():
        assert result["per_category"][c] == pytest.approx(math.exp(s / n), rel=1e-4)
    assert result["tokens"] == total_tokens and result["examples"] == 8
