"""Shared fixtures: tiny random Llama checkpoints that use the embedded model's real
tokenizer (so data, templates and calibration run exactly as on a real model)."""

from __future__ import annotations

import pytest
import torch
import transformers

from mops.models import resolve_checkpoint


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    """The embedded SmolLM2-135M checkpoint folder (converted once into the cache)."""
    return resolve_checkpoint("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    return transformers.AutoTokenizer.from_pretrained(embedded_dir)


def make_tiny_llama(folder, tokenizer, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                    tie: bool = True, seed: int = 0) -> str:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer, width-64 random Llama checkpoint with tied embeddings."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.fixture(scope="session")
def tiny_untied_dir(tmp_path_factory, tokenizer) -> str:
    """Like ``tiny_dir`` but with a separate lm_head, to prove it is never pruned."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_untied"), tokenizer, tie=False, seed=1)
