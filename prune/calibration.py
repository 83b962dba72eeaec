"""Calibration sequences for SparseGPT and Wanda: ``n`` windows of ``seq_len`` tokens.

From WikiText-2 (the *validation* split: the test split is what perplexity is measured
on) or from the *train* split of instruction data formatted with the toolkit's template.
The token stream is cut into non-overlapping windows and ``n`` of them are drawn with
the seed, so samples are distinct and the same seed gives the same samples.
"""

from __future__ import annotations

import random

import torch

from mops.data import format_prompt, heldout_records, wikitext_text
from mops.errors import UserError


def calibration_stream(tokenizer, source: str, seed: int = 0) -> list[int]:
    if source == "wikitext2":
        return tokenizer(wikitext_text("valid"), add_special_tokens=False)["input_ids"]
    records = heldout_records(source, "train", seed=seed)
    random.Random(seed).shuffle(records)
    ids: list[int] = []
    for r in records:
        ids += tokenizer(format_prompt(r) + r.response, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def calibration_ids(tokenizer, source: str, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """An ``n x seq_len`` tensor of token ids."""
    stream = calibration_stream(tokenizer, source, seed)
    available = len(stream) // seq_len
    if available < n:
        raise UserError(
            f"--calib {source}: {len(stream)} tokens give only {available} windows of {seq_len}, "
            f"fewer than --calib-samples {n}; lower --calib-samples or --seq-len, or add sources (a+b)"
        )
    chosen = sorted(random.Random(seed).sample(range(available), n))
    return torch.tensor([stream[i * seq_len : (i + 1) * seq_len] for i in chosen])
