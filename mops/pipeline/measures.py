"""The report's numbers that no stage returns as such: bootstrap intervals of one model's
perplexity, measured sparsity, and whether two lm-eval scores differ beyond their stderr."""

from __future__ import annotations

import math

import torch


def ppl_interval(per_example: dict, resamples: int, seed: int = 0, level: float = 0.95) -> dict:
    """Token-weighted perplexity of ``per_example`` ({nll, tokens}) with a bootstrap interval
    over its examples (or windows). It is :func:`mops.eval.bootstrap.paired_bootstrap`
    against a model whose NLL is 0 everywhere (perplexity 1): ppl_A / 1 - 1, the same
    resampling every paired figure in the report uses."""
    from mops.eval.bootstrap import paired_bootstrap

    zero = {"nll": [0.0] * len(per_example["nll"]), "tokens": per_example["tokens"]}
    r = paired_bootstrap(per_example, zero, resamples=resamples, seed=seed, level=level)
    return {"ppl": 1 + r["delta"], "low": 1 + r["low"], "high": 1 + r["high"], "level": level, "resamples": resamples}


@torch.no_grad()
def measured_sparsity(model) -> dict:
    """Share of exact zeros over every decoder ``nn.Linear`` weight (what pruning prunes)."""
    from mops.prune.core import prunable_linears

    linears = prunable_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    total = sum(m.weight.numel() for m in linears.values())
    return {"overall": zeros / total, "modules": len(linears)}


def within_stderr(a: float, se_a: float | None, b: float, se_b: float | None) -> bool | None:
    """Whether two lm-eval scores differ by no more than their combined standard error
    (sqrt(se_a^2 + se_b^2)); None when lm-eval gave no stderr."""
    if se_a is None or se_b is None or a is None or b is None:
        return None
    return abs(a - b) <= math.hypot(se_a, se_b)
