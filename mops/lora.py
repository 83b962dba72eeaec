"""The ``lora`` baseline: PEFT LoRA adapters on a frozen (pruned) model's projections.

The adapters stay unmerged: each projection computes W x + (alpha / r) B A x with W
untouched, so the base keeps its sparsity (a merged B A would fill every pruned zero).
"""

from __future__ import annotations

from torch import nn

#: Every Llama attention and MLP projection.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, rank: int = 8, alpha: float = 16.0, targets=LORA_TARGETS) -> list[nn.Parameter]:
    """Insert LoRA adapters into ``model`` in place; return their (trainable) parameters.

    B starts at zero (PEFT's default), so the model's outputs are unchanged until trained.
    """
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets)), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state(model) -> dict:
    """The LoRA tensors of ``model`` by name (what a checkpoint or adapter needs to keep)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}
