"""The fused MoPs gate + interpolation in plain PyTorch: the semantics the Triton kernels reproduce.

    h   = x W1 + b1                         B x r   (x: the pooled gate input, B x d)
    w   = softmax((SiLU(h) W2 + b2) / tau)  B x K   (mops.gates.MoPsGate)
    out = sum_k w[:, k] P[k]                B x m x d  (mops.mixture.Mixture, ``interpolate``)

The gate runs with float32 accumulation (float64 when any input is float64), as
``MoPsGate`` does on its float32 pooled input; the weights are cast to the experts'
dtype before the mix, as ``Mixture.forward`` does, so ``out`` has P's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (bfloat16 and float16 inputs included)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gate_weights_reference(x, W1, b1, W2, b2, temperature: float) -> torch.Tensor:
    """The MoPs gate: B x d -> B x K probabilities, in the accumulation dtype."""
    acc = accumulation_dtype(x, W1, b1, W2, b2)
    h = x.to(acc) @ W1.to(acc) + b1.to(acc)
    logits = F.silu(h) @ W2.to(acc) + b2.to(acc)
    return torch.softmax(logits / temperature, dim=-1)


def interpolate_reference(w: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """B x K weights, K x m x d experts -> B x m x d mixed prompts (P's dtype)."""
    return torch.einsum("bk,kmd->bmd", w.to(P.dtype), P)


def gate_interpolate_reference(x, W1, b1, W2, b2, P, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, out) of the fused op; differentiable by autograd in every input."""
    w = gate_weights_reference(x, W1, b1, W2, b2, temperature)
    return w, interpolate_reference(w, P)


def mops_gate_params(gate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(W1 d x r, b1, W2 r x K, b2, temperature) of a ``mops.gates.MoPsGate``, as views of its
    ``nn.Linear`` weights (transposed, so not contiguous), gradients flowing back to them."""
    return gate.down.weight.t(), gate.down.bias, gate.up.weight.t(), gate.up.bias, float(gate.temperature)
