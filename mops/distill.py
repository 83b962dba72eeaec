"""Distillation from the dense model: its next-token distribution as a second training target.

Pruning moved the model's whole next-token distribution, and the response's one true token
per position says little about where the rest of it went. The dense model (the checkpoint
before pruning) says all of it, so recovery can also train toward it: the loss becomes

    (1 - a) * NLL(response tokens) + a * KL(dense || recovered)

at the response positions, with ``a`` = ``TrainConfig.distill``. What is scored stays the
response NLL on held-out data; the KL term is a denser signal toward the same goal.

The teacher's distribution is kept as its ``top_k`` most likely tokens plus one bucket for
the rest of the vocabulary, and the KL is taken between those (k + 1)-bucket distributions
(exact for them; the dense model's top 64 of 49,152 tokens hold nearly all of its mass at
a response position). :class:`TeacherTargets` runs the teacher once per training example
and keeps the result (a 256-token example's targets take about 60 KB, its states a hundred
times that), one example at a time (so a target does not depend on the batch it first came
in; a padded batch measured slower per example on a CPU), in the training's precision:
under bf16 autocast the teacher's products are bfloat16 too (faster, and the targets are a
training signal, not a score), otherwise float32.
"""

from __future__ import annotations

import torch

from mops.data import EncodedExample
from mops.errors import UserError

TOP_K = 64


def require_teacher(distill: float, has_teacher: bool) -> None:
    """Distillation without a dense model to distill from: one line, before any work."""
    if distill and not has_teacher:
        raise UserError(f"--distill {distill}: distillation needs the dense model: pass --teacher")


class TeacherTargets:
    """Per training example: the teacher's top-k log-probabilities and token ids at each
    response position (the positions whose next token is a response token), computed once."""

    def __init__(self, teacher, top_k: int = TOP_K):
        if top_k < 1:
            raise UserError(f"distillation top-k {top_k}: expected a positive whole number")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.top_k = top_k
        self._store: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # by (precision, tokens)
        self.computed = 0  # examples run through the teacher

    def check_vocabulary(self, student) -> None:
        """The teacher's tokens must be the student's: one line, before any training."""
        t, s = self.teacher.config.vocab_size, student.config.vocab_size
        if t != s:
            raise UserError(f"the distillation teacher has a vocabulary of {t:,} tokens, the model {s:,}: "
                            "the teacher must be the model's own dense checkpoint")

    @torch.no_grad()
    def _one(self, e: EncodedExample, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.teacher.parameters()).device
        where = torch.tensor(e.labels[1:] + [-100]) != -100
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            hidden = self.teacher.model(torch.tensor([e.input_ids], device=device)).last_hidden_state[0]
            logp = torch.log_softmax(self.teacher.lm_head(hidden[where.to(device)]).float(), dim=-1)
        top, ids = logp.topk(min(self.top_k, logp.shape[-1]), dim=-1)
        return top.cpu(), ids.cpu()

    def get(self, examples: list[EncodedExample], device, precision: str = "no") -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs N x k, token ids N x k) over the examples' response positions, in
        the order :meth:`mops.injection.PromptedLM.forward_examples` takes its loss;
        ``precision``: the training's resolved mixed precision (no, bf16 or fp16)."""
        pairs = []
        for e in examples:
            key = (precision, *e.input_ids)
            if key not in self._store:
                self._store[key] = self._one(e, precision)
                self.computed += 1
            pairs.append(self._store[key])
        return (torch.cat([p[0] for p in pairs]).to(device), torch.cat([p[1] for p in pairs]).to(device))


def bucket_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k tokens plus one
    bucket for every other token. ``student_logits`` N x V; the others N x k."""
    s_all = torch.log_softmax(student_logits.float(), dim=-1)
    s_top = s_all.gather(1, teacher_ids)
    kl = (teacher_logp.exp() * (teacher_logp - s_top)).sum(1)
    if teacher_ids.shape[1] < s_all.shape[1]:  # the rest of the vocabulary, as one bucket
        # the student's rest summed in log space (1 - sum would lose it to rounding when the
        # top k hold nearly everything); the teacher's clamped at 0 against the same rounding
        s_rest = s_all.scatter(1, teacher_ids, float("-inf")).logsumexp(1)
        t_rest = (1 - teacher_logp.exp().sum(1)).clamp_min(0)
        kl = kl + torch.where(t_rest > 0, t_rest * (t_rest.clamp_min(1e-30).log() - s_rest), 0.0)
    return kl.mean()
