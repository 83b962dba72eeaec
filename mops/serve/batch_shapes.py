"""Which batch sizes give every row the bits it gets alone, on this machine.

A decode step multiplies a (rows x width) matrix by each weight. BLAS libraries choose
their kernel from the matrix sizes, so a row can come out differently in a batch of 1, 2
or 3 than in a batch of 16: measured with PyTorch 2.13's CPU build on 2 threads, one row
computed in a batch of 2, 3, 5, 6, 7, 9, 10 or 11 differs in the last bits from the same
row in a batch of 64, while 4, 8 and every size from 12 on agree (on 1 thread: every size
from 4 on). Greedy decoding turns such a difference into another token at a near-tie.

So the engine pads every step up to a size that agrees with the largest one: it probes,
once at start-up and on the thread that will decode, every size up to ``max_batch`` with
the model's own weight shapes and the decode attention, and keeps the sizes whose rows
equal the reference batch's bit for bit. Any two such sizes agree with each other, so a
request's output does not depend on how many others share its steps. ``max_batch``
itself always qualifies; when nothing smaller does, every step runs at that fixed shape.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from mops.serve.decode_attention import KEY_BLOCK, blocked_attention

log = logging.getLogger(__name__)


class BatchShapes:
    """The batch sizes a decode step may run at (``sizes``, ascending, ending at the max)."""

    def __init__(self, sizes: list[int]):
        self.sizes = sorted(set(sizes))

    def padded(self, rows: int) -> int:
        """The smallest allowed size that holds ``rows`` rows."""
        for size in self.sizes:
            if size >= rows:
                return size
        raise ValueError(f"{rows} rows: more than the largest batch size {self.sizes[-1]}")

    @classmethod
    def probe(cls, model, max_batch: int, seed: int = 0) -> "BatchShapes":
        """Sizes whose rows equal, bit for bit, the same rows computed in a batch of ``max_batch``."""
        if max_batch == 1:
            return cls([1])  # one row at a time: nothing to agree with
        gen = torch.Generator().manual_seed(seed)
        weights = _distinct_linear_weights(model)
        device, dtype = weights[0].device, weights[0].dtype
        agree = set(range(1, max_batch + 1))
        with torch.inference_mode():
            for weight in weights:
                x = torch.randn(max_batch, 1, weight.shape[1], generator=gen).to(device, dtype)
                agree &= _agreeing_sizes(lambda rows: F.linear(x[rows], weight), max_batch)
            query, key, value, mask, scale = _attention_inputs(model, max_batch, gen, device, dtype)
            agree &= _agreeing_sizes(lambda rows: blocked_attention(query[rows], key[rows], value[rows], mask[rows],
                                                                    scale), max_batch)
        if max_batch not in agree:
            log.warning("a row's decode arithmetic on this machine depends on its place in the batch: "
                        "outputs in a batch may differ in the last bits from the same request alone")
        agree.add(max_batch)
        shapes = cls(sorted(agree))
        log.info("decode batch sizes that reproduce a row's bits alone: %s", shapes.sizes)
        return shapes


def _agreeing_sizes(compute, max_batch: int) -> set[int]:
    """Sizes b whose rows equal the reference batch's rows (b rows in place, and the same
    rows moved by one place: a row's slot in the batch changes with its neighbours)."""
    everything = torch.arange(max_batch)
    reference = compute(everything)
    agree = set()
    for b in range(1, max_batch + 1):
        rows = everything[:b]
        moved = rows.roll(1)
        if torch.equal(compute(rows), reference[rows]) and torch.equal(compute(moved), reference[moved]):
            agree.add(b)
    return agree


def _distinct_linear_weights(model) -> list[torch.Tensor]:
    """One weight of every (out, in) shape in the decoder layers, plus the head."""
    by_shape = {}
    for module in model.model.layers[0].modules():
        if isinstance(module, torch.nn.Linear):
            by_shape.setdefault(tuple(module.weight.shape), module.weight)
    by_shape.setdefault(tuple(model.lm_head.weight.shape), model.lm_head.weight)
    return list(by_shape.values())


def _attention_inputs(model, rows: int, gen, device, dtype):
    config = model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    length = 2 * KEY_BLOCK
    query = torch.randn(rows, heads, 1, head_dim, generator=gen)
    key = torch.randn(rows, kv, length, head_dim, generator=gen)
    value = torch.randn(rows, kv, length, head_dim, generator=gen)
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    mask = torch.zeros(rows, length).masked_fill(torch.arange(length)[None] >= lengths[:, None], torch.finfo(dtype).min)
    return (query.to(device, dtype), key.to(device, dtype), value.to(device, dtype), mask.to(device, dtype),
            head_dim**-0.5)
