"""The recovery methods of METHOD.md section 2, each a configuration of the one trainer.

Every method gets the same data, steps, batch and seed; they differ only in what trains:

==============  ==============================================================
none            the pruned model as is (nothing trains)
prompt          one prompt of m vectors at the input (l = 0): "Compress, then Prompt"
prompt-equal    one prompt of K*m vectors (as many parameters as the K experts), at l
uniform         K experts of m vectors at l, fixed equal weights (no gate)
mops            K experts at l, the MoPs gate on layer g, ``interpolate`` (m positions)
mops-attention  the same, ``attention`` mode (K*m positions, log-weights on attention)
attempt         K experts at l with ATTEMPT's attention gate and target prompt
lora            PEFT LoRA of rank r on every attention and MLP projection, unmerged
==============  ==============================================================

``prompt-equal``, ``uniform`` and ``attempt`` have the budget of ``mops`` (parameters or
positions); they are the baselines the study's target is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

from mops.errors import UserError
from mops.lora import add_lora
from mops.mixture import MixtureConfig

METHODS = ("none", "prompt", "prompt-equal", "uniform", "mops", "mops-attention", "attempt", "lora")
SAME_BUDGET = ("prompt-equal", "uniform", "attempt")


@dataclass(frozen=True)
class Budget:
    """The sizes every method is built from."""

    n_experts: int = 4  # K
    prompt_len: int = 10  # m
    gate_layer: int | None = None  # g (None: round(0.3 L))
    inject_layer: int | None = None  # l (None: g)
    gate_hidden: int = 128
    lora_rank: int = 8


def mixture_for(method: str, b: Budget) -> MixtureConfig | None:
    """The mixture a method trains (``lora``: an empty one at l = 0, the LoRA tensors train)."""
    K, m, g, l = b.n_experts, b.prompt_len, b.gate_layer, b.inject_layer
    table = {
        "none": None,
        "prompt": MixtureConfig(1, m, "single", gate_layer=0, inject_layer=0),
        "prompt-equal": MixtureConfig(1, K * m, "single", gate_layer=g, inject_layer=l),
        "uniform": MixtureConfig(K, m, "uniform", gate_layer=g, inject_layer=l),
        "mops": MixtureConfig(K, m, "mops", "interpolate", g, l, b.gate_hidden),
        "mops-attention": MixtureConfig(K, m, "mops", "attention", g, l, b.gate_hidden),
        "attempt": MixtureConfig(K, m, "attempt", "interpolate", g, l, b.gate_hidden),
        "lora": MixtureConfig(1, 0, "uniform", gate_layer=0, inject_layer=0),
    }
    if method not in table:
        raise UserError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    return table[method]


def prepare(method: str, model, b: Budget) -> tuple[MixtureConfig | None, list]:
    """The mixture to train and the tensors inside ``model`` that train beside it (LoRA's)."""
    mixture = mixture_for(method, b)
    extra = add_lora(model, b.lora_rank) if method == "lora" else []
    return mixture, extra


def trainable_count(lm, extra_params=()) -> int:
    """Parameters the method trains: the mixture's (experts, gate, target) plus LoRA's."""
    mixture = sum(p.numel() for p in lm.mixture.parameters() if p.requires_grad)
    return mixture + sum(p.numel() for p in extra_params)
