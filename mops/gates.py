"""Gates: from the hidden states of the instruction tokens to weights over K experts.

Pooling sees the instruction tokens only (``gate_mask``), never the response and never
padding: at generation time only the instruction exists, so training must see the same.
Every gate works in two steps, ``pool`` then ``from_pooled``, so that the pooled input,
which depends on the frozen layers below the gate layer only, can be computed once per
example (:mod:`mops.lower_cache`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is true: B x T x d -> B x d."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the positions where ``mask`` is true (padding never wins)."""
    return hidden.masked_fill(~mask.unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(1)


class PooledGate(nn.Module):
    """A gate in two steps: ``pool`` the instruction states, then weigh the experts
    ``from_pooled`` (so gate pretraining can pool each example once)."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return self.from_pooled(self.pool(hidden, mask), experts)


class MoPsGate(PooledGate):
    """MoPs "smart gating": mean-pooled states -> d -> r -> K MLP with SiLU -> softmax(logits / tau).

    ``hidden=0`` is SMoP's router instead: one linear map d -> K. ``noise`` (B x K standard
    normal draws, training only) perturbs the logits as SMoP does, relative to their own
    size: logits * (1 + sigma * noise), so that every expert keeps being tried.
    """

    def __init__(self, width: int, n_experts: int, hidden: int = 128, temperature: float = 1.0,
                 noise_scale: float = 0.0):
        super().__init__()
        if hidden:
            self.down = nn.Linear(width, hidden)
            self.up = nn.Linear(hidden, n_experts)
        else:
            self.router = nn.Linear(width, n_experts)
        self.temperature = temperature
        self.noise_scale = noise_scale

    @property
    def is_mlp(self) -> bool:
        return hasattr(self, "down")

    @staticmethod
    def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(hidden, mask).float()

    def from_pooled(self, pooled: torch.Tensor, experts: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.up(nn.functional.silu(self.down(pooled))) if self.is_mlp else self.router(pooled)
        if noise is not None and self.noise_scale > 0:
            logits = logits * (1 + self.noise_scale * noise.to(logits))
        return torch.softmax(logits / self.temperature, dim=-1)


class AttemptGate(PooledGate):
    """ATTEMPT's attention over prompts: h = LayerNorm(W_up SiLU(W_down maxpool(x)));
    keys = max-pool of each expert over its m vectors; softmax(keys . h / T), T = d * e."""

    def __init__(self, width: int, n_experts: int, hidden: int = 128, temperature_scale: float = math.e):
        super().__init__()
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)
        self.temperature = width * temperature_scale

    @staticmethod
    def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return max_pool(hidden, mask).float()

    def from_pooled(self, pooled: torch.Tensor, experts: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.up(nn.functional.silu(self.down(pooled))))
        # K x d: each prompt max-pooled over its m vectors (no vectors, m = 0: equal keys)
        keys = experts.float().amax(1) if experts.shape[1] else experts.new_zeros(experts.shape[0], experts.shape[2])
        return torch.softmax(h @ keys.t() / self.temperature, dim=-1)


class UniformGate(nn.Module):
    """Fixed equal weights: the ``uniform`` baseline, and K = 1 (a single prompt)."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts

    def weights(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch, self.n_experts), 1.0 / self.n_experts, device=device)
