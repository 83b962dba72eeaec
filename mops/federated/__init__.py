"""Federated Mixture of Prompts on Flower: skewed clients, FedAvg of the experts and the gate.

- :mod:`mops.federated.partition`: appendix A skew, i.i.d. and Dirichlet client partitions;
- :mod:`mops.federated.client_app` / :mod:`mops.federated.server_app`: the Flower apps
  (``app`` in each, for ``flwr run`` against a SuperLink);
- :func:`run_federated`: both in Flower's simulation engine on one machine;
- :func:`load_federated`: a run's output on its base (the mixture, or LoRA's adapters).
"""

from mops.federated.config import FederatedConfig
from mops.federated.methods import load_federated
from mops.federated.partition import category_counts, counts_markdown, partition
from mops.federated.simulation import run_federated

__all__ = ["FederatedConfig", "category_counts", "counts_markdown", "load_federated", "partition", "run_federated"]
