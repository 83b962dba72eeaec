"""Evaluation: the perplexity protocols of the pruning papers and of instruction data."""

from mops.eval.perplexity import perplexity_suite, response_perplexity, wikitext_perplexity

__all__ = ["perplexity_suite", "response_perplexity", "wikitext_perplexity"]
