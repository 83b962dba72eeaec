"""Attention for one decode step of many rows, whose result for a row never depends on the others.

Why not transformers' own SDPA or eager attention: the keys of a batch are padded to the
longest row, and on CPU both kernels pick their blocking from the key length, so one row's
output changes in the last bits with the lengths of the rows beside it (measured here with
PyTorch 2.13 on CPU: padding a row's keys by 1 to 200 masked positions changed 59 of 64 SDPA
results and 40 of 64 eager ones). A near-tie can then flip a greedy token, and a request
would answer differently alone and in a batch.

Here the keys are cut into blocks of a fixed ``KEY_BLOCK`` positions and every matrix
product has the same shape whatever the batch holds:

- scores: per block, ``q @ K_block^T`` ([groups x d] @ [d x KEY_BLOCK] per row and kv head);
- the softmax's max over all blocks (a max is exact in any order);
- the softmax's sum and ``p @ V``: per block, then added block after block in a fixed order.

A block past a row's length holds only masked positions: its probabilities are exactly 0,
so it adds exactly 0 to the sum and to the output. A row therefore gets the same bits in a
batch of any size and mix of lengths as alone, as long as batched matrix products give each
batch item the bits it gets alone (checked at start-up, :mod:`mops.serve.batch_shapes`).

The function has transformers' attention signature and is registered with its
``AttentionInterface`` (as :mod:`mops.packing` does for packed training), so the decoder
layers run unchanged: the step's masks arrive through the layers' keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mops.models import attending_with

NAME = "mops_serve_decode"
KEY_BLOCK = 128  # keys per block: fewer blocks cost fewer kernel calls, larger ones waste more padding


@dataclass
class DecodeMasks:
    """The additive masks of one decode step: rows x padded keys for the layers below the
    injection layer (no prompt) and for those from it on (prompt columns first, with each
    row's gate bias on them). Padded key lengths are multiples of ``KEY_BLOCK``."""

    lower: torch.Tensor
    upper: torch.Tensor
    inject_layer: int

    def for_layer(self, layer_idx: int) -> torch.Tensor:
        return self.lower if layer_idx < self.inject_layer else self.upper


def blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """One query per row. ``query`` B x H x 1 x d; ``key``/``value`` B' x kv x C x d with
    B' >= B (slot storage; rows past B are ignored) and C >= the mask's width; ``mask`` B x S
    additive (S a multiple of KEY_BLOCK). Returns B x 1 x H x d, as transformers expects."""
    B, H, _, d = query.shape
    kv = key.shape[1]
    S = mask.shape[1]
    q = query.reshape(B, kv, H // kv, d)  # heads grouped by their kv head, as repeat_kv orders them
    scores = []
    for start in range(0, S, KEY_BLOCK):
        k = key[:B, :, start : start + KEY_BLOCK]
        s = torch.matmul(q, k.transpose(-1, -2)) * scaling
        scores.append(s + mask[:, None, None, start : start + KEY_BLOCK])
    top = torch.stack([s.amax(-1) for s in scores]).amax(0, keepdim=False)[..., None]
    total = out = None
    for j, s in enumerate(scores):
        p = torch.exp(s - top)
        part_sum = p.sum(-1)
        part_out = torch.matmul(p, value[:B, :, j * KEY_BLOCK : (j + 1) * KEY_BLOCK])
        total = part_sum if total is None else total + part_sum
        out = part_out if out is None else out + part_out
    out = out / total[..., None]
    return out.reshape(B, 1, H, d)


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     decode_masks: DecodeMasks | None = None, **kwargs):
    """transformers' attention signature; outside a decode step it is plain SDPA."""
    if decode_masks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    mask = decode_masks.for_layer(module.layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return blocked_attention(query, key, value, mask, scale), None


AttentionInterface.register(NAME, decode_attention)


def decoding(config):
    """The model attends with :func:`decode_attention` inside the block; only the engine
    thread runs it."""
    return attending_with(config, NAME)
