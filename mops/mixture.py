"""The Mixture of Prompts: K experts, a gate, and how their outputs combine.

Given the hidden states of the gate layer and the instruction mask, a ``Mixture``
returns the prompt vectors to prepend at the injection layer, an optional additive
attention bias toward them, and the gate weights (METHOD.md section 2):

- ``interpolate``: one m x d prompt per input, P(x) = sum_k w_k(x) P_k;
- ``attention``: all K*m expert vectors, and log(K w_k(x)) added to every input token's
  attention logits toward expert k's positions. The factor K makes a uniform gate a
  no-op (bias 0: exactly one plain prompt of all K*m vectors), so the gate only shifts
  attention between the groups; with log w_k a uniform gate would cut every prompt's
  attention to 1/K, which a short recovery run could not train back.

Sparse routing (SMoP, Choi et al. 2023): with ``top_k`` < K only the k largest gate weights
are kept, *not* renormalised (as SMoP scales the chosen prompt by its router probability),
so the gate still gets a gradient and ``top_k = K`` is exactly soft routing. In
``interpolate`` mode top-1 is one expert's m vectors per input; in ``attention`` mode the
other experts' positions get a bias of about -69, which masks them.

When every input gets the same prompt (``attention`` mode, whose groups are the experts
themselves, or a uniform gate), ``forward`` returns it once (1 x M x d): packed training
(:meth:`mops.injection.PromptedLM.forward_examples`) then runs it once per batch.

A shared prompt (``shared_len`` S > 0) comes before the routed part in both modes and every
input gets it in full (bias 0): the repair every task needs, beside experts that may
specialise. S vectors more per input, S x d more parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from mops.errors import UserError
from mops.experts import PromptExperts
from mops.gates import AttemptGate, MoPsGate, UniformGate

GATES = ("mops", "attempt", "uniform", "single")
COMBINES = ("interpolate", "attention")
ATTEMPT_HIDDEN = 128  # ATTEMPT's gate width where the configuration says 0 (the MoPs gate's linear router)


@dataclass
class MixtureConfig:
    n_experts: int = 4
    prompt_len: int = 10
    gate: str = "mops"
    combine: str = "attention"  # chosen on the validation split (README, recovery study)
    gate_layer: int | None = None  # None: round(0.3 * L)
    inject_layer: int | None = None  # None: the gate layer
    gate_hidden: int = 0  # r; 0: SMoP's linear router d -> K (chosen on validation; the paper's MLP: 128)
    temperature: float = 3.0  # chosen on validation with gate lr 3e-3 (README, recovery study)
    top_k: int | None = None  # None: soft routing over all K experts
    router_noise: float = 0.0  # sigma of SMoP's relative Gaussian noise on the gate logits (training only)
    shared_len: int = 0  # S vectors every input gets in full, before the routed experts

    def resolved(self, n_layers: int) -> "MixtureConfig":
        """A copy with the layer (and ATTEMPT's width) defaults filled in, validated against the model's depth."""
        c = MixtureConfig(**asdict(self))
        if c.gate_layer is None:
            c.gate_layer = round(0.3 * n_layers)
        if c.inject_layer is None:
            c.inject_layer = c.gate_layer
        if c.n_experts < 1:
            raise UserError(f"--experts {c.n_experts}: expected at least 1")
        if c.prompt_len < 0:
            raise UserError(f"--prompt-len {c.prompt_len}: expected 0 or more prompt vectors per expert")
        if c.gate not in GATES:
            raise UserError(f"--gate {c.gate!r}: expected one of {', '.join(GATES)}")
        if c.combine not in COMBINES:
            raise UserError(f"--combine {c.combine!r}: expected one of {', '.join(COMBINES)}")
        if c.gate == "single" and c.n_experts != 1:
            raise UserError(f"--gate single is one prompt: use --experts 1 (got {c.n_experts})")
        # The gate may read the states after the last layer (g = L); a prompt needs a layer to enter (l < L).
        for flag, value, top in (("--gate-layer", c.gate_layer, n_layers), ("--inject-layer", c.inject_layer, n_layers - 1)):
            if not 0 <= value <= top:
                raise UserError(f"{flag} {value}: expected a layer in [0, {top}] for this {n_layers}-layer model")
        if c.gate_hidden < 0 or c.temperature <= 0:
            raise UserError(f"--gate-hidden {c.gate_hidden} / --temperature {c.temperature}: expected a width of 0 "
                            "or more (0: a linear router) and a positive temperature")
        if c.gate == "attempt" and c.gate_hidden == 0:  # ATTEMPT's gate has no linear form: its paper's width
            c.gate_hidden = ATTEMPT_HIDDEN
        if c.top_k is not None and not 1 <= c.top_k <= c.n_experts:
            raise UserError(f"--top-k {c.top_k}: expected a number of experts in [1, {c.n_experts}]")
        if c.router_noise < 0:
            raise UserError(f"--router-noise {c.router_noise}: expected 0 or more")
        if (c.top_k is not None or c.router_noise) and c.gate != "mops":
            raise UserError(f"--top-k / --router-noise route with the mops gate; --gate {c.gate} has no router")
        if c.shared_len < 0:
            raise UserError(f"--shared-len {c.shared_len}: expected 0 or more shared prompt vectors")
        return c

    @property
    def n_prompts(self) -> int:
        """Prompts of m vectors to initialise: the experts, plus ATTEMPT's target prompt."""
        return self.n_experts + (1 if self.gate == "attempt" else 0)

    @property
    def init_vectors(self) -> int:
        """Vectors to initialise from activations: the prompts of m, then the shared prompt."""
        return self.n_prompts * self.prompt_len + self.shared_len


class Mixture(nn.Module):
    def __init__(self, config: MixtureConfig, width: int, init: torch.Tensor | None = None,
                 shared_init: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        K, m = config.n_experts, config.prompt_len
        self.experts = PromptExperts(K, m, width, None if init is None else init[:K])
        if config.shared_len:  # every input gets it in full: the repair every task needs
            shared = torch.zeros(config.shared_len, width) if shared_init is None else shared_init
            self.shared = nn.Parameter(shared.detach().clone().float())
        if config.gate == "mops":
            self.gate = MoPsGate(width, K, config.gate_hidden, config.temperature, config.router_noise)
        elif config.gate == "attempt":
            self.gate = AttemptGate(width, K, config.gate_hidden)
            target = torch.zeros(m, width) if init is None else init[K]
            self.target = nn.Parameter(target.detach().clone().float())  # ATTEMPT's always-added target prompt
        else:
            self.gate = UniformGate(K)

    @property
    def needs_gate_states(self) -> bool:
        return not isinstance(self.gate, UniformGate)

    @property
    def prompt_is_shared(self) -> bool:
        """Every input gets the same prompt vectors (only its attention bias may differ)."""
        return self.config.combine == "attention" or isinstance(self.gate, UniformGate)

    @property
    def prompt_positions(self) -> int:
        """Positions the prompt occupies in front of every input: m, or K*m (plus ATTEMPT's
        target prompt) in ``attention`` mode, plus the shared prompt; what a request's prefill
        pays for."""
        c = self.config
        return (c.n_prompts if c.combine == "attention" else 1) * c.prompt_len + c.shared_len

    def fused(self, tensor: torch.Tensor) -> bool:
        """MoPs gate + interpolation on CUDA run as the Triton kernels of ``mops.kernels``
        (imported only then, so CPU runs never load Triton); elsewhere the PyTorch path.
        The kernels fuse the MLP gate with soft routing; SMoP's router, top-k and
        router noise take the PyTorch path."""
        c = self.config
        return (tensor.is_cuda and c.gate == "mops" and c.combine == "interpolate" and c.gate_hidden > 0
                and c.top_k is None and not c.router_noise)

    def gate_probs(self, pooled: torch.Tensor | None, batch: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """B x K soft gate weights from the pooled gate input (``gate.pool`` of the gate layer)."""
        if isinstance(self.gate, UniformGate):
            return self.gate.weights(batch, self.experts.weight.device)
        if self.fused(pooled) and noise is None:
            from mops.kernels.gate_interpolate import gate_weights
            from mops.kernels.reference import mops_gate_params

            return gate_weights(pooled, *mops_gate_params(self.gate))
        return self.gate.from_pooled(pooled, self.experts(), noise)

    def route(self, probs: torch.Tensor) -> torch.Tensor:
        """The weights the experts are mixed with: ``probs``, or its top-k entries (the rest 0)."""
        k = self.config.top_k
        if k is None or k == probs.shape[-1]:
            return probs
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, probs.topk(k, dim=-1).indices, True)
        return probs * keep

    def weights_from_pooled(self, pooled: torch.Tensor | None, batch: int) -> torch.Tensor:
        """B x K routed weights (what the experts are mixed with) from the pooled gate input."""
        return self.route(self.gate_probs(pooled, batch))

    def gate_weights(self, hidden: torch.Tensor | None, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
        """B x K routed weights from the gate layer's states and the instruction mask."""
        pooled = None if isinstance(self.gate, UniformGate) else self.gate.pool(hidden, mask)
        return self.weights_from_pooled(pooled, batch)

    def forward(self, weights: torch.Tensor):
        """Gate weights (B x K) -> (prompt B x M x d, or 1 x M x d when shared; attention bias B x M or None)."""
        prompt, bias = self._routed(weights)
        if not self.config.shared_len:
            return prompt, bias
        shared = self.shared[None].expand(prompt.shape[0], -1, -1)
        if bias is not None:
            bias = torch.cat([bias.new_zeros(bias.shape[0], self.config.shared_len), bias], dim=1)
        return torch.cat([shared.to(prompt.dtype), prompt], dim=1), bias

    def _routed(self, weights: torch.Tensor):
        P = self.experts()
        B, (K, m, d) = weights.shape[0], P.shape
        if self.config.combine == "interpolate":
            if isinstance(self.gate, UniformGate):
                return P.mean(0, keepdim=True), None  # sum_k (1/K) P_k, the same for every input
            if self.fused(P):
                from mops.kernels.gate_interpolate import interpolate

                prompt = interpolate(weights, P)
            else:
                prompt = torch.einsum("bk,kmd->bmd", weights.to(P.dtype), P)
            if self.config.gate == "attempt":
                prompt = prompt + self.target
            return prompt, None
        groups = P.reshape(1, K * m, d)
        bias = torch.log(weights.clamp_min(1e-30) * K).repeat_interleave(m, dim=1)  # B x K*m
        if self.config.gate == "attempt":
            groups = torch.cat([self.target[None], groups], dim=1)
            bias = torch.cat([bias.new_zeros(B, m), bias], dim=1)
        return groups, bias
