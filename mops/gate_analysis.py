"""Where the gate sends each category: the MoPs appendix figures (METHOD.md section 4).

A *snapshot* is the average gate weight per (category, expert) over a fixed set of
held-out examples, taken at one moment of training (before it, after gate pretraining,
midway, at the end). Snapshots are plain JSON; :func:`draw_heatmaps` draws them as one
categories x experts panel each, from those same numbers.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from mops.data import EncodedExample
from mops.injection import PromptedLM
from mops.lower_cache import LowerStates, pooled_gate_inputs

SNAPSHOTS_JSON = "gate_snapshots.json"
HEATMAP_PNG = "gate_heatmap.png"


@torch.no_grad()
def gate_weights(lm: PromptedLM, examples: list[EncodedExample], lower: LowerStates | None = None) -> torch.Tensor:
    """N x K routed gate weights, each computed from the example's instruction tokens only."""
    return lm.mixture.weights_from_pooled(pooled_gate_inputs(lm, examples, lower), len(examples)).float().cpu()


def gate_snapshot(examples: list[EncodedExample], weights: torch.Tensor, label: str, step: int) -> dict:
    """The average gate weight of each category's examples on each expert, from their
    N x K ``weights`` (:func:`gate_weights`)."""
    rows = defaultdict(list)
    for e, w in zip(examples, weights):
        rows[e.category].append(w)
    categories = sorted(rows)
    return {
        "label": label,
        "step": step,
        "categories": categories,
        "counts": [len(rows[c]) for c in categories],
        # categories x experts; each row sums to 1
        "weights": [torch.stack(rows[c]).mean(0).tolist() for c in categories],
    }


def save_gate_analysis(folder, snapshots: list[dict], title: str = "") -> None:
    """``gate_snapshots.json`` and the heatmap drawn from it, into ``folder``."""
    folder = Path(folder)
    (folder / SNAPSHOTS_JSON).write_text(json.dumps(snapshots, indent=2) + "\n")
    draw_heatmaps(snapshots, folder / HEATMAP_PNG, title)


def draw_heatmaps(snapshots: list[dict], path, title: str = "") -> None:
    """One categories x experts heatmap per snapshot, side by side, weights printed in the cells."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    n_cat = len(snapshots[0]["categories"])
    n_exp = len(snapshots[0]["weights"][0])
    fig, axes = plt.subplots(1, len(snapshots), squeeze=False,
                             figsize=(1.2 + (0.55 * n_exp + 0.6) * len(snapshots) + 2.2, 0.9 + 0.32 * n_cat))
    image = None
    for i, (ax, snap) in enumerate(zip(axes[0], snapshots)):
        data = snap["weights"]
        image = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for r, row in enumerate(data):
            for k, w in enumerate(row):
                ax.text(k, r, f"{w:.2f}", ha="center", va="center", fontsize=6, color="white" if w < 0.6 else "black")
        ax.set_xticks(range(n_exp), [f"E{k}" for k in range(n_exp)], fontsize=7)
        ax.set_yticks(range(n_cat), snap["categories"] if i == 0 else [""] * n_cat, fontsize=7)
        ax.set_title(f"{snap['label']}\n(step {snap['step']})", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="mean gate weight")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
