"""What a valid recipe refers to, checked against this machine before anything runs.

The schema (:mod:`mops.pipeline.recipe`) checks each value alone; this checks the values
against what they name: the model exists and is a Llama-family causal LM, every N:M
pattern fits its layer widths, every mixture fits its depth, the data sources and the
lm-eval tasks exist. Each failure is one line that starts with the recipe's key path.
It also loads and fingerprints the data once, for the stage keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from mops.errors import UserError
from mops.pipeline.fingerprints import file_digest, folder_fingerprint, records_sha256
from mops.pipeline.recipe import Recipe

# mops-recover's flags, as the stages' own messages name them -> the recipe's keys
FLAG_KEYS = {"experts": "n_experts", "prompt-len": "prompt_len", "gate-layer": "gate_layer",
             "inject-layer": "inject_layer", "gate-hidden": "gate_hidden", "top-k": "top_k",
             "router-noise": "router_noise"}


def rekey(error: UserError, path: str, value=None, prefix: str | None = None) -> UserError:
    """A stage's one-line error, re-addressed to the recipe key that caused it."""
    text = str(error)
    if prefix and text.startswith(prefix):
        text = text[len(prefix):].lstrip(": ")
        text = f"{value!r}: {text}" if value is not None else text
    text = re.sub(r"--([a-z][a-z-]*)", lambda m: FLAG_KEYS.get(m[1], m[1].replace("-", "_")), text)
    return UserError(f"{path}: {text}")


@dataclass
class World:
    recipe: Recipe
    checkpoint: str  # the dense model's folder
    model_config: object  # its transformers config
    records: list  # the instruction records (data.sources, limit_per_source, seed)

    @cached_property
    def model_fingerprint(self) -> dict:
        """The dense model's files, not its name: the same checkpoint by another path is the same input."""
        return {"files": folder_fingerprint(self.checkpoint)}

    @cached_property
    def records_sha256(self) -> str:
        return records_sha256(self.records)

    @cached_property
    def splits(self) -> dict:
        from mops.data import split_records

        return split_records(self.records, self.recipe.seed)

    def test_records(self, n: int | None) -> list:
        """The held-out test examples every model is scored on (the split recovery never trains on)."""
        from mops.data import stratified_subset

        test = self.splits["test"]
        return stratified_subset(test, n, self.recipe.seed) if n else list(test)

    @property
    def width(self) -> int:
        return self.model_config.hidden_size

    @property
    def n_layers(self) -> int:
        return self.model_config.num_hidden_layers


def check_world(recipe: Recipe) -> World:
    from mops.data import load_source
    from mops.models import check_causal_lm, check_device, resolve_checkpoint

    try:
        check_device(recipe.device)
    except UserError as e:
        raise rekey(e, "device", recipe.device, prefix=f"--device {recipe.device!r}") from None
    try:
        checkpoint = resolve_checkpoint(recipe.model)
        config = check_causal_lm(checkpoint)
    except UserError as e:
        raise rekey(e, "model", recipe.model, prefix=f"model {recipe.model!r}") from None
    if not Path(checkpoint).is_dir():
        raise UserError(f"model: {recipe.model!r} is a hub id, and mops-run reads local files only; expected a "
                        "checkpoint folder, a .gguf file or smollm2-135m")
    records = []
    for i, source in enumerate(recipe.data.sources):
        try:
            records += load_source(source, recipe.data.limit_per_source, recipe.seed)
        except UserError as e:
            raise rekey(e, f"data.sources[{i}]") from None
    world = World(recipe, checkpoint, config, records)
    for i, entry in enumerate(recipe.prune):
        check_pattern(world, i)
        check_calibration(entry.config(recipe.seed).calib, f"prune[{i}].calib", recipe.seed)
    if recipe.recover:
        check_mixtures(world)
    check_evaluation(world)
    return world


def linear_input_widths(config) -> dict[int, str]:
    """Input width -> which decoder Linear modules have it (what an N:M pattern's M must divide)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    widths = {}
    for width, names in ((config.hidden_size, "q/k/v/gate/up_proj"), (config.num_attention_heads * head_dim, "o_proj"),
                         (config.intermediate_size, "down_proj")):
        widths.setdefault(width, names)
    return widths


def check_pattern(world: World, i: int) -> None:
    entry = world.recipe.prune[i]
    if entry.pattern is None:
        return
    m = int(entry.pattern.split(":")[1])
    for width, names in linear_input_widths(world.model_config).items():
        if width % m:
            raise UserError(f"prune[{i}].pattern: {entry.pattern!r} does not fit this model: M = {m} does not divide "
                            f"the input width {width} of {names}; choose an M that divides "
                            f"{', '.join(map(str, sorted(linear_input_widths(world.model_config))))}")


def check_calibration(calib: str, path: str, seed: int) -> None:
    from mops.data import load_source, wikitext_text

    try:
        if calib == "wikitext2":
            wikitext_text("valid")
        else:
            for source in calib.split("+"):
                load_source(source, seed=seed)
    except UserError as e:
        raise rekey(e, path) from None


def resolved_mixtures(world: World) -> dict[str, object]:
    """Method title -> the MixtureConfig it trains (None for ``none``), as ``mops.baselines`` builds it."""
    from mops.baselines import mixture_for

    budget = world.recipe.recover.budget.budget()
    out = {}
    for entry in world.recipe.recover.methods:
        mixture = mixture_for(entry.name, budget, world.width, world.n_layers)
        if mixture is not None and entry.mixture_overrides():
            mixture = replace(mixture, **entry.mixture_overrides())
        out[entry.title] = mixture
    return out


def check_mixtures(world: World) -> None:
    recover, L = world.recipe.recover, world.n_layers
    for where, entry in [("recover.budget", recover.budget)] + [(f"recover.methods[{i}]", m)
                                                                 for i, m in enumerate(recover.methods)]:
        for key, top in (("gate_layer", L), ("inject_layer", L - 1)):
            value = getattr(entry, key, None)
            if value is not None and value > top:
                raise UserError(f"{where}.{key}: {value} is not a layer in [0, {top}] of this {L}-layer model")
    try:
        budget = recover.budget.budget()
        budget.mops.resolved(L)
    except UserError as e:
        raise rekey(e, "recover.budget") from None
    for i, entry in enumerate(recover.methods):
        try:
            mixture = resolved_mixtures(world)[entry.title]
            if mixture is not None:
                mixture.resolved(L)
            recover.training_config(world.recipe.seed, entry.training_overrides()).validate()
        except UserError as e:
            raise rekey(e, f"recover.methods[{i}]") from None


def check_evaluation(world: World) -> None:
    evaluate = world.recipe.evaluate
    positions = getattr(world.model_config, "max_position_embeddings", None)
    if positions and evaluate.wikitext.seq_len > positions:
        raise UserError(f"evaluate.wikitext.seq_len: {evaluate.wikitext.seq_len} is more than the model's "
                        f"{positions} positions")
    if evaluate.tasks:
        from mops.pipeline.harness import known_tasks

        known = known_tasks()
        for i, task in enumerate(evaluate.tasks):
            if task.name not in known:
                ours = sorted(n for n in known
                              if n.startswith("mops_") and not n.startswith(("mops_mmlu_", "mops_response_")))
                raise UserError(f"evaluate.tasks[{i}].name: {task.name!r} is not a task; ours: {', '.join(ours)} "
                                "(and every mops_mmlu_<subject>, mops_response_<category>)")


def wikitext_sha256() -> str:
    from mops.data import TEXT_SOURCES, data_dir

    return file_digest(data_dir() / TEXT_SOURCES["wikitext2"].format(split="test"))


def calibration_sha256(calib: str, seed: int) -> str:
    from mops.data import TEXT_SOURCES, data_dir, load_source

    if calib == "wikitext2":
        return file_digest(data_dir() / TEXT_SOURCES["wikitext2"].format(split="valid"))
    return records_sha256([r for s in calib.split("+") for r in load_source(s, seed=seed)])
