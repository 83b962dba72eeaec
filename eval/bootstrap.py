"""Measuring a recovery claim (METHOD.md): the share of the pruning damage a method recovers,
and paired bootstrap intervals for "method A against method B" on the same held-out examples.

METHOD.md, "Measuring a recovery claim": resample the test *examples* with replacement,
the same resample for both methods, recompute both token-weighted perplexities
(exp of summed NLL over summed response tokens) and take their ratio. The figure is
``ppl_A / ppl_B - 1`` (negative: A is lower, i.e. better); the interval is the 2.5th and
97.5th percentiles of that figure over the resamples. An interval that contains 0 is a tie.

Several seeds of one method are one figure: each example's NLL is averaged over the
seeds first (the perplexity of the seeds' mean log-likelihood), so the interval reflects
the examples, with the seeds' noise averaged in.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000


def mean_over_seeds(runs: list[dict]) -> dict:
    """``per_example`` records ({nll, tokens}) of several seeds on the same examples -> one."""
    tokens = runs[0]["tokens"]
    if any(r["tokens"] != tokens for r in runs):
        raise ValueError("the runs were scored on different examples or tokens")
    return {"nll": np.mean([r["nll"] for r in runs], axis=0).tolist(), "tokens": tokens}


def perplexity(per_example: dict) -> float:
    return float(np.exp(np.sum(per_example["nll"]) / np.sum(per_example["tokens"])))


def paired_bootstrap(a: dict, b: dict, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """``ppl_A / ppl_B - 1`` with its paired bootstrap interval; ``a`` and ``b`` are
    ``per_example`` records ({nll: [...], tokens: [...]}) over the same examples."""
    nll_a, nll_b = np.asarray(a["nll"], dtype=np.float64), np.asarray(b["nll"], dtype=np.float64)
    tokens = np.asarray(a["tokens"], dtype=np.float64)
    if list(a["tokens"]) != list(b["tokens"]):
        raise ValueError("paired bootstrap: the two methods were scored on different examples or tokens")
    idx = np.random.default_rng(seed).integers(0, len(tokens), size=(resamples, len(tokens)))
    n = tokens[idx].sum(1)
    # log(ppl_A / ppl_B) = (sum nll_A - sum nll_B) / tokens, on each resample
    ratios = np.expm1((nll_a[idx].sum(1) - nll_b[idx].sum(1)) / n)
    tail = (1 - level) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return {"delta": float(np.expm1((nll_a.sum() - nll_b.sum()) / tokens.sum())), "low": float(low),
            "high": float(high), "resamples": resamples, "level": level}


def verdict(result: dict) -> str:
    """"lower" or "higher" when the whole interval is on one side of 0, else "tie"."""
    if result["high"] < 0:
        return "lower"
    if result["low"] > 0:
        return "higher"
    return "tie"


def recovered_share(dense: float, pruned: float, method: float) -> float | None:
    """(log ppl_pruned - log ppl_method) / (log ppl_pruned - log ppl_dense): 0 is the pruned
    model, 1 the dense one; None when pruning did no damage to recover."""
    damage = np.log(pruned) - np.log(dense)
    return None if damage <= 0 else float((np.log(pruned) - np.log(method)) / damage)


def format_delta(result: dict) -> str:
    """-12.3% [-15.1, -9.4] (a tie when the interval holds 0)."""
    return f"{100 * result['delta']:+.1f}% [{100 * result['low']:+.1f}, {100 * result['high']:+.1f}]"
