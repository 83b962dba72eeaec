"""The sparsity report, measured by re-reading the saved checkpoint (never the model in
memory), so it proves what a user will load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from mops.errors import UserError


def iter_saved_tensors(checkpoint: str | Path):
    """``(name, tensor)`` for every tensor in a checkpoint folder's safetensors files."""
    checkpoint = Path(checkpoint)
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(checkpoint.glob("*.safetensors"))]
    if not files:
        raise UserError(f"{checkpoint}: no safetensors weights found")
    for file in files:
        with safe_open(checkpoint / file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def nm_groups(weight: torch.Tensor, pattern: tuple[int, int]) -> tuple[int, int]:
    """(M-groups holding at least N zeros, all M-groups), groups consecutive along the input dim."""
    n, m = pattern
    zeros = (weight.reshape(weight.shape[0], -1, m) == 0).sum(-1)
    return int((zeros >= n).sum()), zeros.numel()


def nm_compliance(weight: torch.Tensor, pattern: tuple[int, int]) -> float:
    """Fraction of M-groups holding at least N zeros."""
    ok, total = nm_groups(weight, pattern)
    return ok / total


def sparsity_report(checkpoint: str | Path, pruned_modules: list[str], pattern: tuple[int, int] | None) -> dict:
    """Per-module sparsity and N:M compliance of the pruned modules, and what stayed dense."""
    pruned = set(pruned_modules)
    modules, dense, seen = {}, {}, set()
    zeros = total = groups_ok = groups = 0
    for name, tensor in iter_saved_tensors(checkpoint):
        module = name.removesuffix(".weight")
        if module in pruned and name.endswith(".weight"):
            seen.add(module)
            z = int((tensor == 0).sum())
            entry = {"shape": list(tensor.shape), "sparsity": z / tensor.numel()}
            if pattern is not None:
                ok, n_groups = nm_groups(tensor, pattern)
                entry["nm_compliance"] = ok / n_groups
                groups_ok += ok
                groups += n_groups
            modules[module] = entry
            zeros += z
            total += tensor.numel()
        elif tensor.dim() >= 2:  # embeddings, lm_head when untied: weights left dense on purpose
            dense[name] = {"shape": list(tensor.shape), "sparsity": int((tensor == 0).sum()) / tensor.numel()}
    missing = sorted(pruned - seen)
    if missing:
        raise UserError(f"{checkpoint}: saved weights lack pruned modules {', '.join(missing[:3])}")
    return {
        "overall_sparsity": zeros / total,
        "nm_compliance": groups_ok / groups if pattern is not None else None,
        "pruned_parameters": total,
        "modules": modules,
        "dense_modules": dense,
        "lm_head_tied_to_embeddings": bool(json.loads((Path(checkpoint) / "config.json").read_text()).get("tie_word_embeddings")),
    }
