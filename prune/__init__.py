"""The pruning stage: SparseGPT, Wanda (through llm-compressor) or magnitude pruning of
every ``nn.Linear`` in the decoder layers, to unstructured or N:M sparsity, with a
sparsity report measured from the saved weights."""

from mops.prune.config import METHODS, PruneConfig, parse_pattern
from mops.prune.core import prunable_linears, prune
from mops.prune.report import sparsity_report

__all__ = ["METHODS", "PruneConfig", "parse_pattern", "prunable_linears", "prune", "sparsity_report"]
