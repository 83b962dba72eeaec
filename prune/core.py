"""``prune(model, config, calibration)``: the pure core of the pruning stage.

Every ``nn.Linear`` inside the decoder layers is pruned, in place; embeddings and
``lm_head`` never are. SparseGPT and Wanda run through llm-compressor's ``oneshot`` with
its sequential pipeline (each layer is calibrated on the outputs of the already-pruned
layers below it, as in both papers); magnitude pruning needs no data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from mops.cli_common import stderr_kept_aside
from mops.errors import UserError
from mops.models import decoder_layers
from mops.outputs import atomic_dir, library_versions
from mops.prune.calibration import calibration_ids
from mops.prune.config import PruneConfig
from mops.prune.magnitude import magnitude_prune
from mops.prune.report import sparsity_report

log = logging.getLogger(__name__)


def prunable_linears(model) -> dict[str, torch.nn.Linear]:
    """``{qualified name: module}`` of every ``nn.Linear`` inside the decoder layers."""
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return {
        f"{prefix}.{name}": module
        for name, module in layers.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def check_pattern_fits(linears: dict[str, torch.nn.Linear], pattern: tuple[int, int] | None) -> None:
    if pattern is None:
        return
    m = pattern[1]
    for name, module in linears.items():
        if module.in_features % m:
            raise UserError(
                f"--pattern {pattern[0]}:{m}: M={m} does not divide the input width {module.in_features} of {name}; "
                f"choose an M that divides every layer's input width"
            )


def prune(model, config: PruneConfig, calibration: torch.Tensor | None = None, tokenizer=None,
          quiet: bool = False) -> dict:
    """Prune ``model`` in place; return what was done (the report's run section)."""
    linears = prunable_linears(model)
    check_pattern_fits(linears, config.pattern)
    if config.needs_calibration and (calibration is None or tokenizer is None):
        raise ValueError(f"{config.method} needs calibration ids and the tokenizer")
    start = time.perf_counter()
    if config.method == "magnitude":
        magnitude_prune(linears, config.sparsity, config.pattern)
    else:
        _oneshot(model, config, calibration, tokenizer, quiet)
    return {"prune_seconds": time.perf_counter() - start, "pruned_modules": sorted(linears)}


def _oneshot(model, config: PruneConfig, calibration: torch.Tensor, tokenizer, quiet: bool) -> None:
    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    mask_structure = f"{config.pattern[0]}:{config.pattern[1]}" if config.pattern else "0:0"
    common = dict(
        sparsity=config.target_sparsity,
        mask_structure=mask_structure,
        # Target the decoder layers (the containers whose Linears get pruned); lm_head
        # is also ignored by regex, since ignore=["lm_head"] would match nothing.
        targets=[r"re:.*layers\.\d+$"],
        ignore=[r"re:.*lm_head"],
    )
    if config.method == "sparsegpt":
        modifier = SparseGPTModifier(**common, dampening_frac=config.dampening)
    else:
        modifier = WandaPruningModifier(**common)
    data = datasets.Dataset.from_dict(
        {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()}
    )
    with _quiet_llmcompressor(quiet):
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=data,
            recipe=modifier,
            num_calibration_samples=len(calibration),
            batch_size=min(config.calib_batch_size, len(calibration)),  # equal lengths: no truncation, no padding
            max_seq_length=calibration.shape[1],
            shuffle_calibration_samples=False,  # the samples were drawn with our seed already
            pipeline="sequential",
        )


@contextlib.contextmanager
def _quiet_llmcompressor(quiet: bool):
    """llm-compressor logs every module (loguru) and draws its own progress bars on
    stderr; a quiet run keeps that chatter and shows it only if the run fails."""
    if not quiet:
        yield
        return
    import os

    from loguru import logger

    # llm-compressor re-runs its logger set-up inside oneshot; this variable is what it reads.
    previous = os.environ.get("LLM_COMPRESSOR_LOG_DISABLED")
    os.environ["LLM_COMPRESSOR_LOG_DISABLED"] = "true"
    logger.disable("llmcompressor")
    logger.disable("compressed_tensors")
    try:
        with stderr_kept_aside(quiet=True):  # past the early return: always quiet here
            yield
    finally:
        if previous is None:
            os.environ.pop("LLM_COMPRESSOR_LOG_DISABLED")
        else:
            os.environ["LLM_COMPRESSOR_LOG_DISABLED"] = previous
        logger.enable("llmcompressor")
        logger.enable("compressed_tensors")


def save_checkpoint(model, tokenizer, folder) -> None:
    """Save a plain Hugging Face checkpoint (dense storage, exact zeros).

    llm-compressor replaces ``model.save_pretrained`` with a wrapper that writes a
    compressed-tensors config and fetches files from the hub; the class's own method
    writes the standard checkpoint that any ``from_pretrained`` loads.
    """
    type(model).save_pretrained(model, folder)
    tokenizer.save_pretrained(folder)


def prune_to_folder(model, tokenizer, config: PruneConfig, out, *, model_name: str = "", force: bool = False,
                    evaluate: Callable | None = None, quiet: bool = False) -> dict:
    """Prune, save atomically to ``out`` and write ``sparsity_report.json`` measured from disk.

    ``evaluate(model, tokenizer) -> dict``, when given, runs before and after pruning and
    its results go into the report under ``eval.dense`` and ``eval.pruned``.
    """
    started = time.perf_counter()
    check_pattern_fits(prunable_linears(model), config.pattern)
    calibration = None
    if config.needs_calibration:
        calibration = calibration_ids(tokenizer, config.calib, config.calib_samples, config.seq_len, config.seed)
    dense = evaluate(model, tokenizer) if evaluate else None
    with atomic_dir(out, force) as tmp:
        run = prune(model, config, calibration, tokenizer, quiet=quiet)
        save_checkpoint(model, tokenizer, tmp)
        report = {
            "model": model_name or str(model.config.name_or_path),
            "method": config.method,
            "setting": config.setting,
            "config": config.to_dict(),
            "calibration": None if calibration is None else
            {"source": config.calib, "samples": config.calib_samples, "seq_len": config.seq_len},
            "seed": config.seed,
            "prune_seconds": run["prune_seconds"],
            **sparsity_report(tmp, run["pruned_modules"], config.pattern),
            "versions": library_versions(),
        }
        if evaluate:
            report["eval"] = {"dense": dense, "pruned": evaluate(model, tokenizer)}
        report["wall_seconds"] = time.perf_counter() - started
        (Path(tmp) / "sparsity_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
