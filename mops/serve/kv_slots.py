"""Keys and values of the running requests, one slot per row of the decode batch.

Each running request owns a slot: row ``i`` of the decode batch is slot ``i`` of every
layer's tensors, and the running rows always fill slots ``0..n-1`` (a finished row's slot
takes the last row's contents), so a step reads plain slices without gathering.

With a Mixture of Prompts the layers come in two groups with different contents
(``mops.injection``): below the injection layer a slot holds the request's own tokens;
from it on, the request's prompt positions first (its own mixture in ``interpolate`` mode,
all experts in ``attention`` mode), then its tokens. Each group has its own store.

Memory: ``rows x kv_heads x capacity x head_dim`` per layer for keys and values, the rows
growing (by doubling) up to ``max_batch`` as more requests run at once, and the capacity
(by doubling, in whole key blocks) up to the longest context the engine accepts, so a
server never holds more than ``max_batch`` full contexts, and holds about what its busiest
moment needed. (Growing copies every layer into fresh memory: on the 2-core machine here
about a second per 500 MB, so a store sized for 64 rows when 4 run would stall every
growth 16 times longer.) Stores start as
zeros and only ever hold finite values: positions a mask hides get probability exactly 0,
and 0 times a finite value adds nothing (0 times NaN would).
"""

from __future__ import annotations

import torch

from mops.serve.decode_attention import KEY_BLOCK


def round_up(length: int, block: int = KEY_BLOCK) -> int:
    return -(-length // block) * block


class SlotStore:
    """Keys and values of ``n_layers`` consecutive layers for ``rows`` slots."""

    def __init__(self, n_layers: int, rows: int, kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device):
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.max_rows, self.max_capacity = rows, round_up(max_length)
        self.dtype, self.device = dtype, device
        self.keys = [self._zeros(0, 0) for _ in range(n_layers)]
        self.values = [self._zeros(0, 0) for _ in range(n_layers)]

    def _zeros(self, rows: int, capacity: int) -> torch.Tensor:
        return torch.zeros(rows, self.kv_heads, capacity, self.head_dim, dtype=self.dtype, device=self.device)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` slots of ``length`` positions (keeping what is there)."""
        if (rows <= self.rows and length <= self.capacity) or not self.keys:
            return
        if length > self.max_capacity or rows > self.max_rows:
            raise ValueError(f"{rows} rows of {length} positions: more than this store's {self.max_rows} "
                             f"of {self.max_capacity}")
        new_rows = self.rows if rows <= self.rows else min(max(rows, 2 * self.rows), self.max_rows)
        capacity = self.capacity if length <= self.capacity else \
            min(max(round_up(length), 2 * self.capacity), self.max_capacity)
        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                new = self._zeros(new_rows, capacity)
                new[: old.shape[0], :, : old.shape[2]] = old
                tensors[i] = new

    def load(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """A prefilled request's keys and values (per layer 1 x kv_heads x T x head_dim) into ``slot``."""
        self.reserve(slot + 1, keys[0].shape[2] if keys else 0)
        for store, new in zip(self.keys + self.values, keys + values):
            store[slot, :, : new.shape[2]] = new[0]

    def write(self, layer: int, positions: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """One new position per row: row i's key/value (B x kv_heads x 1 x head_dim) at ``positions[i]``."""
        rows = torch.arange(len(positions), device=positions.device)
        self.keys[layer][rows, :, positions] = key[:, :, 0]
        self.values[layer][rows, :, positions] = value[:, :, 0]

    def move(self, source: int, target: int, length: int) -> None:
        for store in self.keys + self.values:
            store[target, :, :length] = store[source, :, :length]


class SlotCache:
    """What the decoder layers get as ``past_key_values`` in a decode step.

    transformers' attention modules call only ``update(key, value, layer_idx)`` and attend
    over what it returns. This writes each row's new key and value at that row's own
    position and returns the whole slot storage; :mod:`mops.serve.decode_attention` reads
    each row's valid length from the step's masks. (transformers' ``Cache`` classes keep one
    length for the whole batch, which is what continuous batching cannot have.)
    """

    def __init__(self, lower: SlotStore, upper: SlotStore, inject_layer: int):
        self.lower, self.upper, self.inject_layer = lower, upper, inject_layer
        self.lower_positions = self.upper_positions = None

    def begin_step(self, lower_positions: torch.Tensor, upper_positions: torch.Tensor) -> None:
        self.lower_positions, self.upper_positions = lower_positions, upper_positions

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        if layer_idx < self.inject_layer:
            store, index, positions = self.lower, layer_idx, self.lower_positions
        else:
            store, index, positions = self.upper, layer_idx - self.inject_layer, self.upper_positions
        store.write(index, positions, key_states, value_states)
        return store.keys[index], store.values[index]
