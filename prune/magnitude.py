"""Magnitude pruning: ours, because llm-compressor's MagnitudePruningModifier does
nothing in one-shot mode. Zeroes the smallest |w| of each layer (unstructured, the
layer-wise baseline of the Wanda paper) or of each group of M input weights (N:M)."""

from __future__ import annotations

import torch


def magnitude_mask(weight: torch.Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean mask of the weights to zero (True = pruned)."""
    scores = weight.detach().abs().float()
    if pattern is not None:
        n, m = pattern
        groups = scores.reshape(scores.shape[0], -1, m)  # M consecutive weights along the input dim
        smallest = groups.topk(n, dim=-1, largest=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, smallest, True)
        return mask.reshape(weight.shape)
    k = int(weight.numel() * sparsity)
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    if k:
        mask[scores.flatten().topk(k, largest=False).indices] = True
    return mask.reshape(weight.shape)


@torch.no_grad()
def magnitude_prune(linears: dict[str, torch.nn.Linear], sparsity: float | None, pattern: tuple[int, int] | None) -> None:
    for module in linears.values():
        module.weight[magnitude_mask(module.weight, sparsity, pattern)] = 0
