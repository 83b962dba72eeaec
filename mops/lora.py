"""The ``lora`` baseline: PEFT LoRA adapters on a frozen (pruned) model's projections.

The adapters stay unmerged: each projection computes W x + (alpha / r) B A x with W
untouched, so the base keeps its sparsity (a merged B A would fill every pruned zero).
"""

from __future__ import annotations

from torch import nn

#: Every Llama attention and MLP projection.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, rank: int = 8, alpha: float | None = None, targets=LORA_TARGETS,
             layers: list[int] | None = None) -> list[nn.Parameter]:
    """Insert LoRA adapters into ``model`` in place (on ``layers`` only, when given); return
    their (trainable) parameters.

    B starts at zero (PEFT's default), so the model's outputs are unchanged until trained.
    alpha defaults to 2 r (16 at rank 8), so the update's scale alpha / r is the same at
    every rank.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=2.0 * rank if alpha is None else alpha, lora_dropout=0.0,
                        target_modules=list(targets), layers_to_transform=layers,
                        layers_pattern="layers" if layers is not None else None)
    inject_adapter_in_model(config, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state(model) -> dict:
    """The LoRA tensors of ``model`` by name (what a checkpoint or adapter needs to keep)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}
