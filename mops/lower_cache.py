"""The frozen layers below the injection layer, run once per example and kept.

Below layer l nothing depends on a trainable tensor (the base is frozen and the prompt
enters at l), so an example's states entering layer l, and the gate's input at layer g,
are the same at every step, every epoch and for every method trained on the same base.
:class:`LowerStates` computes them once per example and hands them out again: exact,
not an approximation (tests/test_packing.py compares loss and gradients with the
uncached forward).

The store is keyed by the base's weights hash and the layers, so one ``LowerStates``
can serve every method of a study on one pruned checkpoint (the study shares it across
cells), and is cleared when a different base, or other layers, ask. It lives in memory,
up to ``max_bytes`` (4 GiB: the whole train split of the embedded model takes about
0.75 GiB in float32); past that, examples are computed each time they are asked for.

The gate's pooled input has its one home here too (:func:`pooled_gate_inputs`): gate
pretraining, gate snapshots and training all read it from the same states.
"""

from __future__ import annotations

import weakref

import torch

from mops.data import EncodedExample
from mops.models import weights_hash


def pool_gate_states(lm, examples: list[EncodedExample], gate_states: list[torch.Tensor | None]) -> torch.Tensor | None:
    """B x d: each example's gate-layer states pooled over its instruction tokens (the
    gate's own pooling: mean for MoPs, max for ATTEMPT); None for a gate-free mixture."""
    if not lm.mixture.needs_gate_states:
        return None
    pooled = []
    for e, states in zip(examples, gate_states):
        instruction = torch.zeros(len(states), dtype=torch.bool, device=states.device)
        instruction[: e.prompt_len] = True
        pooled.append(lm.mixture.gate.pool(states[None], instruction[None]))
    return torch.cat(pooled)


class LowerStates:
    """Per example: the states entering layer l and those entering layer g, computed once."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = max_bytes
        self._owner: tuple | None = None  # (weights hash, l, g) of what the store holds
        # every base asked so far -> its weights hash: a run that alternates between bases (a
        # compiled copy beside the original, as benchmarks/step_cost.py does) hashes each once
        self._hashes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._store: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.bytes = 0
        self.computed = 0  # examples run through the lower layers (what the store did not save)
        self.hashed = 0  # bases whose weights were hashed (0.4 s each for the embedded model)

    def _check(self, lm) -> None:
        """Empty the store when another base or other layers ask. The weights are hashed
        once per base object (the base is frozen while it is asked; a new object is hashed
        anew, so a base pruned again or reloaded is never mistaken for the last one)."""
        # a gate reading layer l needs nothing more than the states entering l: such a mixture
        # and a gate-free one (prompt-equal, uniform) share the store
        g = lm.gate_layer if lm.mixture.needs_gate_states and lm.gate_layer != lm.inject_layer else None
        if lm.base not in self._hashes:
            self._hashes[lm.base] = weights_hash(lm.base)
            self.hashed += 1
        owner = (self._hashes[lm.base], lm.inject_layer, g)
        if owner != self._owner:
            self._owner, self._store, self.bytes = owner, {}, 0

    def states(self, lm, examples: list[EncodedExample]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each example's (states entering l, states entering g or None without a gate)."""
        if lm.inject_layer == 0 and not (lm.mixture.needs_gate_states and lm.gate_layer > 0):
            return lm.lower_states([e.input_ids for e in examples])  # embeddings only: nothing worth keeping
        self._check(lm)
        keys = [tuple(e.input_ids) for e in examples]
        missing = list(dict.fromkeys(k for k in keys if k not in self._store))
        found = {}
        for key, (inject, gate) in zip(missing, lm.lower_states([list(k) for k in missing])):
            found[key] = (inject, None if gate is inject else gate)  # g = l keeps one tensor
            size = sum(t.nbytes for t in found[key] if t is not None)
            if self.bytes + size <= self.max_bytes:
                self._store[key] = found[key]
                self.bytes += size
        self.computed += len(missing)
        pairs = [self._store[k] if k in self._store else found[k] for k in keys]
        if lm.mixture.needs_gate_states and lm.gate_layer == lm.inject_layer:
            return [(h, h) for h, _ in pairs]
        return pairs

    def get(self, lm, examples: list[EncodedExample]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(states entering l, one per example; pooled gate input B x d or None)."""
        pairs = self.states(lm, examples)
        return [h for h, _ in pairs], pool_gate_states(lm, examples, [g for _, g in pairs])


@torch.no_grad()
def pooled_gate_inputs(lm, examples: list[EncodedExample], lower: LowerStates | None = None) -> torch.Tensor:
    """N x d: each example's pooled instruction states at the gate layer."""
    lower = lower or LowerStates()
    return lower.get(lm, examples)[1]
