"""The paired bootstrap of METHOD.md against what it must say in the cases that can be known."""

import math

import numpy as np
import pytest

from mops.eval.bootstrap import format_delta, mean_over_seeds, paired_bootstrap, perplexity, verdict


def records(seed=0, n=300, shift=0.0, noise=0.5):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 60, n)
    nll = tokens * (2.0 + shift + noise * rng.standard_normal(n))
    return {"nll": nll.tolist(), "tokens": tokens.tolist()}


def test_a_method_against_itself_is_exactly_zero_with_a_zero_interval():
    a = records()
    result = paired_bootstrap(a, a)
    assert (result["delta"], result["low"], result["high"]) == (0.0, 0.0, 0.0)
    assert verdict(result) == "tie"


def test_the_figure_is_the_ratio_of_token_weighted_perplexities():
    a, b = records(shift=-0.1), records()
    result = paired_bootstrap(a, b)
    assert result["delta"] == pytest.approx(perplexity(a) / perplexity(b) - 1, rel=1e-12)
    assert result["delta"] == pytest.approx(math.exp(-0.1) - 1, rel=1e-9)  # every example 0.1 nats lower per token
    assert result["low"] <= result["delta"] <= result["high"] < 0 and verdict(result) == "lower"


def test_pairing_sees_a_small_consistent_gain_that_unpaired_noise_would_hide():
    base = records(seed=1, noise=2.0)  # examples differ a lot from one another
    better = {"nll": [v - 0.02 * t for v, t in zip(base["nll"], base["tokens"])], "tokens": base["tokens"]}
    result = paired_bootstrap(better, base)
    assert result["high"] < 0  # the same resample for both: the example-to-example spread cancels


def test_noise_alone_is_a_tie_and_the_interval_is_deterministic():
    a, b = records(seed=2), records(seed=2, noise=0.5)
    b = {"nll": (np.array(b["nll"]) + np.random.default_rng(3).normal(0, 1, 300)).tolist(), "tokens": b["tokens"]}
    result = paired_bootstrap(a, b)
    assert verdict(result) == "tie" and result == paired_bootstrap(a, b)
    assert format_delta(result).endswith("]") and "[" in format_delta(result)


def test_seeds_average_per_example_and_other_examples_are_refused():
    a, b = records(seed=4), records(seed=5)
    b["tokens"] = a["tokens"]
    both = mean_over_seeds([a, b])
    assert both["nll"][7] == pytest.approx((a["nll"][7] + b["nll"][7]) / 2)
    with pytest.raises(ValueError, match="different examples"):
        paired_bootstrap(a, records(seed=6))
    with pytest.raises(ValueError, match="different examples"):
        mean_over_seeds([a, records(seed=6)])
