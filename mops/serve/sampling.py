"""How one request picks its next token: greedy, or sampled with its own settings and seed.

Every request samples with its own ``torch.Generator``, so a seeded request draws the same
tokens whether it runs alone or beside others (its logits are the same bits either way,
:mod:`mops.serve.batch_shapes`). Temperature and nucleus filtering are transformers' own
logits warpers, the ones ``generate`` uses.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy (the OpenAI convention)
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # the end-of-sequence token is a token like any other

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RowSampler:
    def __init__(self, params: SamplingParams):
        self.greedy = params.greedy
        self.warpers = []
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(params.top_p))
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed % 2**63)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from one row's logits (V)."""
        if self.greedy:
            return int(logits.argmax())
        scores = logits[None].float()
        for warper in self.warpers:
            scores = warper(None, scores)
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))
