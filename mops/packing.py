"""Several examples (and their prompts) as one sequence, attended block by block.

Packing replaces padding: B examples of lengths n_i become one sequence of
sum(n_i) (+ prompt) positions, so no position is spent on padding. A prompt shared by
every input (``attention`` mode, a uniform gate) sits once at the start and every example
sees all of it; a per-input prompt (``interpolate``) sits right before its example.
Positions restart at every example, as in a padded row: prompt 0..M-1, input M, M+1, ...

Attention runs block by block (:func:`packed_attention`, registered with transformers'
attention interface): each example's queries attend to its own causal prefix and to the
shared prompt, so the cost is that of B separate rows, not of one N x N matrix. Each
block calls transformers' own SDPA attention, so grouped-query heads, scaling and masks
are handled exactly as in the unpacked model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mops.models import attending_with

NAME = "mops_packed"


@dataclass
class Block:
    rows: slice  # the queries, a contiguous range of the sequence
    keys: list[slice]  # what they attend to (the shared prompt, then their own range)
    prompt_len: int  # leading key positions that are the shared prompt (0: plain causal)
    example: int  # the example the block serves (-1: the shared prompt)


@dataclass
class Packing:
    positions: torch.Tensor  # N position ids
    inputs: torch.Tensor  # indices of the input positions, example by example
    blocks: list[Block]

    @staticmethod
    def build(lengths: list[int], prompt_len: int, shared: bool, device=None) -> "Packing":
        M, positions, inputs, blocks, at = prompt_len, [], [], [], 0
        if shared and M:
            blocks.append(Block(slice(0, M), [slice(0, M)], 0, -1))
            positions.append(torch.arange(M))
            at = M
        for i, n in enumerate(lengths):
            own = 0 if shared else M  # a per-input prompt leads its own causal block
            rows = slice(at, at + own + n)
            keys = [slice(0, M), rows] if shared and M else [rows]
            blocks.append(Block(rows, keys, M if shared else 0, i))
            positions.append(torch.arange(own + n) + (M if shared else 0))
            inputs.append(torch.arange(at + own, at + own + n))
            at += own + n
        return Packing(torch.cat(positions).to(device), torch.cat(inputs).to(device), blocks)

    def masks(self, bias: torch.Tensor | None, dtype: torch.dtype, device) -> list[torch.Tensor | None]:
        """One mask per block: None where plain causal attention is right (SDPA's causal
        kernel), else the shared prompt's columns open to every query (plus ``bias[i]``,
        B x M, for example i) beside a causal block."""
        out = []
        for b in self.blocks:
            if not b.prompt_len:
                out.append(None)
                continue
            n = b.rows.stop - b.rows.start
            allowed = torch.cat([torch.ones(n, b.prompt_len, dtype=torch.bool, device=device),
                                 torch.ones(n, n, dtype=torch.bool, device=device).tril()], dim=1)
            if bias is None:
                out.append(allowed[None, None])
                continue
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
            mask[:, : b.prompt_len] += bias[b.example].to(dtype)
            out.append(mask[None, None])
        return out


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     packing: Packing | None = None, block_masks=None, **kwargs):
    """transformers' attention signature; ``packing`` (and its ``block_masks``) arrive through
    the decoder layers' keyword arguments. Query, key and value are 1 x heads x N x d."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    outputs = []
    for block, mask in zip(packing.blocks, block_masks):
        k = torch.cat([key[:, :, s] for s in block.keys], dim=2) if len(block.keys) > 1 else key[:, :, block.keys[0]]
        v = torch.cat([value[:, :, s] for s in block.keys], dim=2) if len(block.keys) > 1 else value[:, :, block.keys[0]]
        out, _ = sdpa_attention_forward(module, query[:, :, block.rows], k, v, mask, dropout=dropout, scaling=scaling,
                                        is_causal=True)
        outputs.append(out)  # 1 x rows x heads x d
    return torch.cat(outputs, dim=1), None


@contextlib.contextmanager
def packed(config):
    """The model attends with :func:`packed_attention` inside the block (the attention
    modules read ``config._attn_implementation`` at every call). Registered here, at first
    use, so that importing the toolkit stays light (transformers' integrations import Triton)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    with attending_with(config, NAME):
        yield
