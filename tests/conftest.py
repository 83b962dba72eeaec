"""Shared fixtures: tiny random Llama checkpoints that use the embedded model's real
tokenizer (so data, templates and calibration run exactly as on a real model)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

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


@pytest.fixture(scope="session")
def federated_config():
    """Makes the federated tests' small runs: ``make(base, **fields)`` is a FederatedConfig of
    3 clients sharing 90 Dolly + Natural-Instructions examples, 2 rounds x 2 local steps, a
    mixture of K = 2 experts of 2 vectors with an MLP gate at layer 1; fields override."""
    from dataclasses import asdict

    from mops.federated.config import FederatedConfig
    from mops.mixture import MixtureConfig
    from mops.train import TrainConfig

    mixture = MixtureConfig(n_experts=2, prompt_len=2, gate="mops", gate_layer=1, gate_hidden=8)
    train = TrainConfig(batch_size=2, lr=3e-2, gate_lr=3e-3, gate_pretrain_steps=3, gate_pretrain_examples=16,
                        max_len=48, eval_examples=8, seed=0)

    def make(base: str, **over) -> FederatedConfig:
        fields = {"base": base, "data": ["dolly", "natural-instructions"], "n_clients": 3, "rounds": 2,
                  "local_steps": 2, "limit_per_source": 60, "total_examples": 90, "min_clients": 2,
                  "mixture": asdict(mixture), "train": asdict(train), "test_examples": 12}
        return FederatedConfig(**(fields | over))

    return make


@pytest.fixture(scope="session")
def load_benchmark():
    """A script of benchmarks/ as a module, loaded by path (they are scripts, not a package)."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def reprune():
    """Change the one pruned checkpoint under a benchmark's work folder in place, as if it had
    been pruned again elsewhere: another model under the same name."""
    def change(work_dir: Path) -> None:
        weights = next(Path(work_dir).glob("*/model.safetensors"))
        tensors = load_file(weights)
        name = next(k for k in tensors if k.endswith("layers.0.mlp.down_proj.weight"))
        save_file(tensors | {name: tensors[name] * 3}, weights, metadata={"format": "pt"})

    return change
