"""Compression-aware tuning for large language models.

Stages: ``mops.prune`` (SparseGPT / Wanda / magnitude to unstructured or N:M sparsity),
``mops.train`` (a Mixture of Prompts on the frozen pruned model; ``mops.load`` puts a
saved adapter on its base) and ``mops.eval`` (perplexity protocols). Shared pieces live here: model loading
(``mops.models``), instruction data (``mops.data``) and atomic outputs (``mops.outputs``).
"""

from mops.adapter import load
from mops.errors import UserError
from mops.models import load_model

__version__ = "0.1.0"
__all__ = ["UserError", "load", "load_model", "__version__"]
