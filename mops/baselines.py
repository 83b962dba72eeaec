"""The recovery methods of METHOD.md section 2, each a configuration of the one trainer.

Every method gets the same data, steps, batch and seed; they differ only in what trains:

==============  ==============================================================
none            the pruned model as is (nothing trains)
prompt          one prompt of m vectors at the input (l = 0): "Compress, then Prompt"
prompt-equal    one prompt at l with as many parameters as the whole mixture (experts
                and gate: ceil(P / d) vectors, at least K*m)
uniform         K experts of m vectors at l, fixed equal weights (no gate)
attempt         K experts at l with ATTEMPT's attention gate and target prompt
lora            PEFT LoRA of rank 8 on every attention and MLP projection, unmerged
lora-equal      PEFT LoRA with as many parameters as the mixture (within 10%): rank,
                projections and layers chosen by :func:`lora_equal_layout`
mops            the Mixture of Prompts as ``mops-recover`` trains it by default
==============  ==============================================================

A method may carry overrides, ``NAME:key=value,...`` (``mops:top_k=1,combine=interpolate``,
``prompt-equal:lr=1.0``): keys of :class:`~mops.mixture.MixtureConfig` change the mixture,
keys of :class:`~mops.train.TrainConfig` the training. The study keys its cells by the
whole spec, so variants tried on the validation split sit beside each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from mops.errors import UserError
from mops.lora import LORA_TARGETS, add_lora
from mops.mixture import Mixture, MixtureConfig
from mops.train import TrainConfig

METHODS = ("none", "prompt", "prompt-equal", "uniform", "attempt", "lora", "lora-equal", "mops")
#: the baselines with the mixture's budget: the study's target is measured against each of them
SAME_BUDGET = ("prompt-equal", "uniform", "attempt", "lora-equal")
TRAIN_KEYS = ("lr", "gate_lr", "lora_lr", "warm_steps", "balance", "gate_pretrain_steps", "gate_pretrain_lr",
              "gate_pretrain_examples", "steps", "lr_schedule", "lr_warmup", "mixed_precision", "distill")
MIXTURE_KEYS = tuple(f.name for f in fields(MixtureConfig) if f.name != "gate")


@dataclass(frozen=True)
class Budget:
    """The sizes every method is built from: those of the MoPs mixture (``mops-recover``'s
    defaults unless the study says otherwise)."""

    mops: MixtureConfig = field(default_factory=MixtureConfig)
    lora_rank: int = 8

    @property
    def n_experts(self) -> int:
        return self.mops.n_experts

    @property
    def prompt_len(self) -> int:
        return self.mops.prompt_len


@dataclass(frozen=True)
class MethodSpec:
    name: str
    mixture: dict
    training: dict
    spec: str

    @property
    def key(self) -> str:
        return self.spec


def parse_method(spec: str) -> MethodSpec:
    """``NAME[:key=value,...]`` -> the method and its overrides (one-line errors for bad ones)."""
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise UserError(f"method {name!r}: expected one of {', '.join(METHODS)}")
    mixture, training = {}, {}
    types = {f.name: f.type for f in fields(MixtureConfig)} | {f.name: f.type for f in fields(TrainConfig)}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in MIXTURE_KEYS + TRAIN_KEYS:
            raise UserError(f"method {spec!r}: {item!r} is not key=value with a key among "
                            f"{', '.join(MIXTURE_KEYS + TRAIN_KEYS)}")
        if key in MIXTURE_KEYS and name in ("none", "lora", "lora-equal"):
            raise UserError(f"method {spec!r}: {name} has no mixture to set {key} on")
        kind = types[key]  # the dataclass field's annotation: "int", "float", "str", "int | None", ...
        try:
            parsed = value if "str" in str(kind) else None if value == "none" else (
                float(value) if "float" in str(kind) else int(value))
        except ValueError:
            expected = "a number" if "float" in str(kind) else "a whole number"
            raise UserError(f"method {spec!r}: {key}={value!r} is not {expected}") from None
        (mixture if key in MIXTURE_KEYS else training)[key] = parsed
    try:  # a bad training value (mixed_precision=fp8, steps=0) is refused now, not after pruning and scoring
        TrainConfig(**training).validate()
    except UserError as e:
        raise UserError(f"method {spec!r}: {e}") from None
    return MethodSpec(name, mixture, training, spec)


def mixture_params(config: MixtureConfig, width: int, n_layers: int) -> int:
    """Trainable parameters of a mixture (experts, gate, target prompt)."""
    return sum(p.numel() for p in Mixture(config.resolved(n_layers), width).parameters())


def mixture_for(method: str, b: Budget, width: int, n_layers: int) -> MixtureConfig | None:
    """The mixture a method trains (``lora``: an empty one at l = 0, the LoRA tensors train)."""
    mops = b.mops
    K, m, g, l = mops.n_experts, mops.prompt_len, mops.gate_layer, mops.inject_layer
    if method == "prompt-equal":
        vectors = math.ceil(mixture_params(mops, width, n_layers) / width)
        return MixtureConfig(1, vectors, "single", gate_layer=g, inject_layer=l)
    empty = MixtureConfig(1, 0, "uniform", gate_layer=0, inject_layer=0)
    table = {
        "none": None,
        "prompt": MixtureConfig(1, m, "single", gate_layer=0, inject_layer=0),
        "uniform": MixtureConfig(K, m, "uniform", mops.combine, gate_layer=g, inject_layer=l),
        "attempt": MixtureConfig(K, m, "attempt", "interpolate", g, l, mops.gate_hidden),
        "mops": mops,
        "lora": empty,
        "lora-equal": empty,
    }
    if method not in table:
        raise UserError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    return table[method]


@dataclass(frozen=True)
class LoraLayout:
    rank: int
    targets: tuple[str, ...]
    layers: tuple[int, ...]
    params: int


#: projection sets tried for lora-equal, in order of preference
LORA_EQUAL_TARGETS = (LORA_TARGETS, ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"),
                      ("q_proj", "v_proj"))


def lora_param_count(model_config, rank: int, targets, n_layers: int) -> int:
    d, ff = model_config.hidden_size, model_config.intermediate_size
    kv = model_config.num_key_value_heads * getattr(model_config, "head_dim", d // model_config.num_attention_heads)
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d), "gate_proj": (d, ff),
              "up_proj": (d, ff), "down_proj": (ff, d)}
    return n_layers * rank * sum(i + o for i, o in (shapes[t] for t in targets))


def lora_equal_layout(model_config, target: int, tolerance: float = 0.10) -> LoraLayout:
    """LoRA with about ``target`` parameters: the first projection set (every projection,
    then attention only, MLP only, q and v) whose best rank and number of layers comes
    within ``tolerance`` of it; the layers are spread evenly over the depth."""
    L = model_config.num_hidden_layers
    best = None
    for targets in LORA_EQUAL_TARGETS:
        options = [(abs(lora_param_count(model_config, r, targets, n) - target), -n, r, n)
                   for r in range(1, 65) for n in range(1, L + 1)]
        diff, _, r, n = min(options)
        candidate = (diff, targets, r, n)
        best = min(best or candidate, candidate, key=lambda c: c[0])
        if diff <= tolerance * target:
            best = candidate
            break
    _, targets, r, n = best
    layers = tuple(sorted({round(i * (L - 1) / max(n - 1, 1)) for i in range(n)})) if n < L else tuple(range(L))
    return LoraLayout(r, tuple(targets), layers, lora_param_count(model_config, r, targets, len(layers)))


def prepare(spec: MethodSpec | str, model, b: Budget) -> tuple[MixtureConfig | None, list, dict]:
    """The mixture to train, the tensors inside ``model`` that train beside it (LoRA's), and
    a description of what was built (for the study's table)."""
    spec = parse_method(spec) if isinstance(spec, str) else spec
    width, L = model.config.hidden_size, model.config.num_hidden_layers
    mixture = mixture_for(spec.name, b, width, L)
    if mixture is not None and spec.mixture:
        mixture = replace(mixture, **spec.mixture)
    about = {}
    extra = []
    if spec.name == "lora":
        extra = add_lora(model, b.lora_rank)
        about["lora"] = {"rank": b.lora_rank, "targets": list(LORA_TARGETS), "layers": "all"}
    elif spec.name == "lora-equal":
        layout = lora_equal_layout(model.config, mixture_params(b.mops, width, L))
        extra = add_lora(model, layout.rank, targets=layout.targets, layers=list(layout.layers))
        about["lora"] = {"rank": layout.rank, "targets": list(layout.targets), "layers": list(layout.layers)}
    return mixture, extra, about


def trainable_count(lm, extra_params=()) -> int:
    """Parameters the method trains: the mixture's (experts, gate, target) plus LoRA's."""
    mixture = sum(p.numel() for p in lm.mixture.parameters() if p.requires_grad)
    return mixture + sum(p.numel() for p in extra_params)
