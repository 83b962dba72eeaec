"""What a federated run trains, for each method of :mod:`mops.baselines`, and the tensors
that travel.

- Prompt methods (``mops``, ``prompt``, ``prompt-equal``, ``uniform``, ``attempt``) train a
  mixture on the frozen base; the base is loaded once per process and shared.
- LoRA methods (``lora``, ``lora-equal``) train PEFT LoRA adapters inside their own copy of
  the base (unmerged, so the base stays sparse), beside an empty mixture. The copy gets its
  adapters once per process; every round only their values are replaced by the global ones.

What travels is named like the model's own tensors: the mixture's (``experts.weight``,
``gate.*``) and LoRA's with a ``base.`` prefix (``base.model.layers.0.self_attn.q_proj.lora_A.
default.weight``). Both sides keep them sorted by name, since Flower's FedAvgM pairs the
tensors it receives with those it sent by position.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from mops.baselines import Budget, prepare
from mops.federated.common import cached_base, load_frozen_base
from mops.federated.config import FederatedConfig
from mops.injection import PromptedLM
from mops.mixture import MixtureConfig
from mops.train import build_mixture

LORA_PREFIX = "base."
LORA_FILE = "lora.safetensors"


@dataclass
class Setup:
    """One process's base for a run's method, with what is built on it once."""

    model: torch.nn.Module
    tokenizer: object
    base_hash: str  # of the base without adapters: what clients, server and the adapter check
    mixture: MixtureConfig  # the mixture the method trains (an empty one for LoRA)
    lora: dict[str, torch.nn.Parameter]  # LoRA's tensors inside ``model``, by travelling name
    about: dict  # the LoRA layout, for the adapter's config


def budget(config: FederatedConfig) -> Budget:
    return Budget(config.mixture_config(), config.lora_rank)


def setup_for(config: FederatedConfig) -> Setup:
    """The process's base for ``config``'s method (loaded once; LoRA injected once)."""
    if config.is_lora:
        return _lora_setup(config.base, config.device, config.method, json.dumps(asdict(budget(config).mops)),
                           config.lora_rank, config.seed)
    model, tokenizer, base_hash = cached_base(config.base, config.device)
    mixture, _, about = prepare(config.method_spec(), model, budget(config))  # builds nothing into the base
    return Setup(model, tokenizer, base_hash, mixture, {}, about)


@lru_cache(maxsize=1)
def _lora_setup(base: str, device: str, method: str, mops_json: str, rank: int, seed: int) -> Setup:
    from mops.baselines import parse_method

    model, tokenizer, base_hash = load_frozen_base(base, device)  # its own copy: adapters go inside it
    torch.manual_seed(seed)  # LoRA's A starts random: from the seed (the server's start is the global one)
    mixture, extra, about = prepare(parse_method(method), model, Budget(MixtureConfig(**json.loads(mops_json)), rank))
    lora = {LORA_PREFIX + n: p for n, p in model.named_parameters() if "lora_" in n}
    if len(lora) != len(extra):
        raise RuntimeError("LoRA's tensors could not be told apart from the base's by name")
    return Setup(model, tokenizer, base_hash, mixture, lora, about)


def method_mixture(config: FederatedConfig, width: int, n_layers: int) -> MixtureConfig:
    """The (resolved) mixture ``config``'s method trains on a model of this size: for
    checking the options before any process starts."""
    from mops.baselines import mixture_for

    spec = config.method_spec()
    mixture = replace(mixture_for(spec.name, budget(config), width, n_layers), **spec.mixture)
    return mixture.resolved(n_layers)


class Trainee:
    """This round's model: a fresh mixture on the process's base, holding the global tensors."""

    def __init__(self, setup: Setup, examples, seed: int, initialise: bool = False):
        self.setup = setup
        self.lm: PromptedLM = build_mixture(setup.model, setup.tokenizer, examples, setup.mixture, seed,
                                            initialise=initialise, empty_ok=bool(setup.lora))
        for p in setup.lora.values():
            p.requires_grad_(True)  # PromptedLM froze the whole base, LoRA included

    def tensors(self) -> dict[str, torch.nn.Parameter]:
        """Every tensor of the global state, by name, sorted (an empty mixture's are left out)."""
        found = {n: p for n, p in self.lm.mixture.named_parameters() if p.requires_grad and p.numel()}
        found.update(self.setup.lora)
        return dict(sorted(found.items()))

    @property
    def extra_params(self) -> list[torch.nn.Parameter]:
        return list(self.setup.lora.values())

    def state(self, names=None) -> dict[str, torch.Tensor]:
        """Copies of the tensors (all, or ``names``), on the CPU, sorted by name."""
        tensors = self.tensors()
        return {n: tensors[n].detach().cpu().contiguous().clone() for n in (names or tensors)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        tensors = self.tensors()
        if set(state) != set(tensors):
            raise ValueError(f"federated tensors {sorted(state)} do not match this method's {sorted(tensors)}")
        with torch.no_grad():
            for name, value in state.items():
                tensors[name].copy_(value.to(tensors[name]))


def uploaded_names(config: FederatedConfig, trainee: Trainee) -> list[str]:
    """The tensors clients change and send back; a gate the server pretrained and
    ``gate_lr`` 0 keeps frozen travels down only."""
    names = list(trainee.tensors())
    if not config.gate_trains_on_clients():
        names = [n for n in names if not n.startswith("gate.")]
    return names


@contextlib.contextmanager
def adapters_off(model):
    """The base as it was, inside a LoRA copy (PEFT's own switch): for scoring the base alone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def lora_state(setup: Setup) -> dict[str, torch.Tensor]:
    """LoRA's tensors under the base's own names (as ``mops.lora.lora_state`` keeps them)."""
    return {n[len(LORA_PREFIX):]: p.detach().cpu().contiguous() for n, p in setup.lora.items()}


def load_federated(base, adapter_dir, device: str = "cpu") -> PromptedLM:
    """A federated run's output on its base: the mixture, and for LoRA methods the adapters
    of ``lora.safetensors`` injected (unmerged) with the layout in ``mops_config.json``."""
    from safetensors.torch import load_file

    from mops.adapter import load, read_adapter_config
    from mops.lora import add_lora

    lm = load(base, adapter_dir, device=device)  # checks the base's weights hash before anything goes inside it
    lora_file = Path(adapter_dir) / LORA_FILE
    if lora_file.is_file():
        layout = read_adapter_config(adapter_dir)["lora"]
        add_lora(lm.base, layout["rank"], targets=layout["targets"],
                 layers=None if layout["layers"] == "all" else layout["layers"])
        missing, unexpected = lm.base.load_state_dict(load_file(lora_file), strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise RuntimeError(f"{lora_file}: LoRA tensors do not match the layout {layout}")
        lm.eval()
    return lm
