"""K soft-prompt experts, each m vectors of the model width d."""

from __future__ import annotations

import torch
from torch import nn


class PromptExperts(nn.Module):
    """``weight``: K x m x d. Experts loaded from earlier single-prompt adapters can be
    frozen one by one (ATTEMPT's pre-trained source prompts) while the rest train."""

    def __init__(self, n_experts: int, prompt_len: int, width: int, init: torch.Tensor | None = None):
        super().__init__()
        weight = torch.zeros(n_experts, prompt_len, width) if init is None else init.detach().clone().float()
        if weight.shape != (n_experts, prompt_len, width):
            raise ValueError(f"expert init has shape {tuple(weight.shape)}, expected {(n_experts, prompt_len, width)}")
        self.weight = nn.Parameter(weight)
        self.register_buffer("frozen", torch.zeros(n_experts, dtype=torch.bool))

    @property
    def n_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.weight.shape[1]

    def freeze(self, index: int, vectors: torch.Tensor) -> None:
        """Set expert ``index`` to ``vectors`` (m x d) and keep it fixed during training."""
        with torch.no_grad():
            self.weight[index] = vectors.to(self.weight)
        self.frozen[index] = True

    def forward(self) -> torch.Tensor:
        if not self.frozen.any():
            return self.weight
        # Frozen experts pass no gradient: detach them, keep the trainable ones live.
        keep = self.frozen.view(-1, 1, 1)
        return torch.where(keep, self.weight.detach(), self.weight)
