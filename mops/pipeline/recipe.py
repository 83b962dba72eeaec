"""The recipe: one YAML file naming the model, the pruning settings, the recovery methods, the
evaluation and the output folder; validated (pydantic) before anything runs.

The keys of a pruning entry, of a recovery method and of the shared training settings are
the fields of the stages' own dataclasses (:class:`~mops.prune.config.PruneConfig`,
:class:`~mops.mixture.MixtureConfig`, :class:`~mops.train.TrainConfig`), read from them at
import time, so a field added there is a recipe key here. A key the recipe leaves out takes
the dataclass's default *when the run starts* (the defaults are not copied into this file):
the resolved values are what the stage keys hash, so a changed default reruns what it
changes. Value rules (ranges, accepted words) live in the tables below.

A recovery method is an entry of the recovery study (:mod:`mops.baselines`): its ``name``
is one of ``METHODS`` and its other keys are that study's overrides (``mops:top_k=1`` is
``{name: mops, top_k: 1}``). A ``mops`` entry takes every mixture key, ``gate`` included
(it is what ``mops-recover`` trains); the other prompt methods take the mixture keys but
``gate`` (their gate is what makes them that method); ``none``, ``lora`` and ``lora-equal``
have no mixture.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mops.baselines import METHODS, TRAIN_KEYS, Budget
from mops.errors import UserError
from mops.eval.bootstrap import RESAMPLES
from mops.mixture import COMBINES, GATES, MixtureConfig
from mops.models import DTYPES
from mops.prune.config import METHODS as PRUNE_METHODS
from mops.prune.config import PruneConfig, parse_pattern
from mops.train import LR_SCHEDULES, MIXED_PRECISION, TrainConfig

LABEL = r"^[A-Za-z0-9._-]+$"
Label = Annotated[str, Field(pattern=LABEL, description="a name of letters, digits, '.', '_' and '-'")]

# What each dataclass field accepts, beyond its type. Fields missing here take their type alone.
PRUNE_RULES = {
    "method": Literal[PRUNE_METHODS],
    "sparsity": Annotated[float, Field(gt=0, lt=1)],
    "pattern": str,  # N:M, checked by parse_pattern below (the stage's own parser)
    "calib_samples": Annotated[int, Field(ge=1)],
    "seq_len": Annotated[int, Field(ge=1)],
    "dampening": Annotated[float, Field(gt=0)],
    "calib_batch_size": Annotated[int, Field(ge=1)],
}
MIXTURE_RULES = {
    "n_experts": Annotated[int, Field(ge=1)],
    "prompt_len": Annotated[int, Field(ge=0)],
    "gate": Literal[GATES],
    "combine": Literal[COMBINES],
    "gate_layer": Annotated[int, Field(ge=0)],
    "inject_layer": Annotated[int, Field(ge=0)],
    "gate_hidden": Annotated[int, Field(ge=0)],
    "temperature": Annotated[float, Field(gt=0)],
    "top_k": Annotated[int, Field(ge=1)],
    "router_noise": Annotated[float, Field(ge=0)],
    "shared_len": Annotated[int, Field(ge=0)],
}
TRAIN_RULES = {
    "steps": Annotated[int, Field(ge=1)],
    "batch_size": Annotated[int, Field(ge=1)],
    "grad_accum": Annotated[int, Field(ge=1)],
    "lr": Annotated[float, Field(gt=0)],
    "gate_lr": Annotated[float, Field(ge=0)],
    "lora_lr": Annotated[float, Field(gt=0)],
    "gate_pretrain_steps": Annotated[int, Field(ge=0)],
    "gate_pretrain_lr": Annotated[float, Field(gt=0)],
    "gate_pretrain_examples": Annotated[int, Field(ge=1)],
    "max_len": Annotated[int, Field(ge=2)],
    "eval_every": Annotated[int, Field(ge=1)],
    "eval_examples": Annotated[int, Field(ge=1)],
    "checkpoint_every": Annotated[int, Field(ge=1)],
    "mixed_precision": Literal[MIXED_PRECISION],
    "lr_schedule": Literal[LR_SCHEDULES],
    "lr_warmup": Annotated[int, Field(ge=0)],
    "warm_steps": Annotated[int, Field(ge=0)],
    "balance": Annotated[float, Field(ge=0)],
    "distill": Annotated[float, Field(ge=0, le=1)],
}
#: TrainConfig fields a recipe does not set per stage: the seed is the recipe's own ``seed``.
NOT_RECIPE_KEYS = {"seed"}
MIXTURE_ONLY = tuple(f.name for f in dataclasses.fields(MixtureConfig))
NO_MIXTURE = ("none", "lora", "lora-equal")


class Strict(BaseModel):
    """Unknown keys are errors, values are taken as written (``"40"`` is not 40), and no
    setting is infinite or not a number."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _plain_type(hint):
    """``int | None`` -> ``int``: a recipe leaves a key out rather than writing null."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def nullable(cls, name: str) -> bool:
    """Whether the dataclass field itself accepts None (``top_k: null`` means soft routing)."""
    hint = typing.get_type_hints(cls)[name]
    return type(None) in typing.get_args(hint)


def dataclass_fields(cls, rules: dict, skip=()) -> dict:
    """pydantic field definitions mirroring ``cls``'s fields; each optional (left out: the
    dataclass's default at run time)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (Optional[rules.get(f.name, _plain_type(hints[f.name]))], None)
            for f in dataclasses.fields(cls) if f.name not in skip}


def given(entry: BaseModel, cls, keys=None) -> dict:
    """The keys the recipe set on ``entry`` (of ``cls``'s fields), as the stage takes them."""
    out = {}
    for k in entry.model_fields_set:
        if k in {f.name for f in dataclasses.fields(cls)} and (keys is None or k in keys):
            value = getattr(entry, k)
            if value is not None or nullable(cls, k):
                out[k] = value
    return out


# ----------------------------------------------------------------------------- sections


class Data(Strict):
    sources: list[str] = Field(default=["dolly", "natural-instructions"], min_length=1,
                               description="instruction sources: dolly, natural-instructions, gsm8k, alpaca-eval, mmlu, "
                                           "or a .jsonl path [#field=key,...]")
    limit_per_source: Optional[Annotated[int, Field(ge=1)]] = None


_PruneFields = create_model("_PruneFields", __base__=Strict, **dataclass_fields(PruneConfig, PRUNE_RULES, skip={"seed"}))


class PruneEntry(_PruneFields):
    label: Optional[Label] = None

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value):
        try:
            n, m = parse_pattern(value)
        except UserError:
            raise PydanticCustomError(
                "pattern", f"{value!r} is not N:M with 0 < N < M (N zeros in every M weights), e.g. 2:4, 4:8, 3:4 or 7:8"
            ) from None
        return f"{n}:{m}"

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.sparsity is None) == (self.pattern is None):
            found = ("neither sparsity nor pattern" if self.sparsity is None else
                     f"both sparsity {self.sparsity} and pattern {self.pattern!r}")
            raise PydanticCustomError("one_of", f"{found}; give exactly one of sparsity (unstructured, 0 < S < 1) "
                                      "or pattern (N:M)")
        return self

    def config(self, seed: int) -> PruneConfig:
        return PruneConfig(**given(self, PruneConfig), seed=seed)

    @property
    def name(self) -> str:
        setting = self.pattern.replace(":", "of") if self.pattern else f"{self.sparsity:g}"
        return self.label or f"{self.method or PruneConfig.method}-{setting}"


_MethodFields = create_model(
    "_MethodFields", __base__=Strict,
    **dataclass_fields(MixtureConfig, MIXTURE_RULES),
    **{k: v for k, v in dataclass_fields(TrainConfig, TRAIN_RULES).items() if k in TRAIN_KEYS},
)


class MethodEntry(_MethodFields):
    name: Literal[METHODS]
    label: Optional[Label] = None

    @model_validator(mode="after")
    def _keys_fit_the_method(self):
        for key in sorted(self.model_fields_set & set(MIXTURE_ONLY)):
            if self.name in NO_MIXTURE:
                raise PydanticCustomError("method_key", f"{key}: {getattr(self, key)!r} cannot be set: a {self.name} "
                                          "method has no mixture; its keys: " + ", ".join(("label",) + TRAIN_KEYS),
                                          {"key": key})
            if key == "gate" and self.name != "mops":
                raise PydanticCustomError("method_key", f"gate: {self.gate!r} cannot be set: the gate of {self.name!r} "
                                          "is what makes it that method; set gate on a method named mops", {"key": key})
        return self

    @property
    def title(self) -> str:
        return self.label or self.name

    def mixture_overrides(self) -> dict:
        return given(self, MixtureConfig)

    def training_overrides(self) -> dict:
        return given(self, TrainConfig, TRAIN_KEYS)


_BudgetFields = create_model("_BudgetFields", __base__=Strict, **dataclass_fields(MixtureConfig, MIXTURE_RULES))


class BudgetSpec(_BudgetFields):
    """The MoPs mixture every baseline is sized against (``mops.baselines.Budget``)."""

    lora_rank: Optional[Annotated[int, Field(ge=1)]] = None

    def budget(self) -> Budget:
        rank = {"lora_rank": self.lora_rank} if self.lora_rank is not None else {}
        return Budget(MixtureConfig(**given(self, MixtureConfig)), **rank)


Training = create_model("Training", __base__=Strict,
                        **dataclass_fields(TrainConfig, TRAIN_RULES, skip=NOT_RECIPE_KEYS))


class Recover(Strict):
    budget: BudgetSpec = BudgetSpec()
    training: Training = Training()
    methods: list[MethodEntry] = Field(min_length=1, description="a list of methods: mops, prompt, lora, ...")
    snapshot_examples: Annotated[int, Field(ge=0)] = Field(
        default=160, description="held-out test examples the gate heatmaps are drawn on (0: none)")

    def training_config(self, seed: int, overrides: dict) -> TrainConfig:
        return TrainConfig(**{**given(self.training, TrainConfig), **overrides, "seed": seed})


class Wikitext(Strict):
    seq_len: Annotated[int, Field(ge=2)] = 2048
    windows: Optional[Annotated[int, Field(ge=1)]] = Field(default=None, description="the first W windows (default: all)")


class Response(Strict):
    examples: Optional[Annotated[int, Field(ge=1)]] = Field(
        default=None, description="held-out test examples, stratified (default: the whole test split)")


class Task(Strict):
    name: str = Field(description="an lm-eval task or group: mops_ni_mc, mops_mmlu, mops_response, mops_wikitext2, ...")
    limit: Optional[Annotated[float, Field(gt=0)]] = Field(
        default=None, description="examples per (sub)task; below 1 a fraction (lm-eval's limit)")

    @property
    def lm_eval_limit(self):
        """lm-eval's convention: 1 or more counts examples, below 1 is a fraction."""
        return None if self.limit is None else int(self.limit) if self.limit >= 1 else self.limit


class Evaluate(Strict):
    wikitext: Wikitext = Wikitext()
    response: Response = Response()
    tasks: list[Task] = []
    num_fewshot: Optional[Annotated[int, Field(ge=0)]] = None
    batch_size: Annotated[int, Field(ge=1)] = 4
    resamples: Annotated[int, Field(ge=100)] = Field(default=RESAMPLES, description="bootstrap resamples per interval")


class Recipe(Strict):
    model: str = Field(description="a checkpoint folder, a .gguf file, or smollm2-135m (the embedded default)")
    out: str = Field(description="the output folder (stages, report)")
    seed: int = 0
    device: str = "cpu"
    dtype: Literal[tuple(DTYPES)] = "float32"
    data: Data = Data()
    prune: list[PruneEntry] = Field(min_length=1, description="a list of pruning settings")
    recover: Optional[Recover] = None
    evaluate: Evaluate = Evaluate()

    @model_validator(mode="after")
    def _names_differ(self):
        for where, names in (("prune", [p.name for p in self.prune]),
                             ("recover.methods", [m.title for m in (self.recover.methods if self.recover else [])])):
            for i, name in enumerate(names):
                if name in names[:i]:
                    labelled = (self.prune[i] if where == "prune" else self.recover.methods[i]).label
                    key = ".label" if labelled else "" if where == "prune" else ".name"
                    raise PydanticCustomError("duplicate", f"{name!r} names two entries; give each its own label",
                                              {"at": f"{where}[{i}]{key}"})
        return self


def parse_recipe(data, source: str = "recipe") -> Recipe:
    """Validate a loaded recipe; a bad one raises one :class:`UserError` line."""
    from pydantic import ValidationError

    from mops.pipeline.recipe_errors import one_line

    if not isinstance(data, dict):
        raise UserError(f"{source}: {type(data).__name__} is not a mapping of recipe keys (model, out, prune, ...)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(one_line(e, Recipe)) from None


def load_recipe(path) -> tuple[Recipe, str]:
    """Read and validate a recipe file; return it with its text (the report quotes it)."""
    from pathlib import Path

    from mops.pipeline.yaml12 import load_yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {str(path)!r}: no such file; expected a YAML file such as examples/demo.yaml")
    text = path.read_text(encoding="utf-8")
    return parse_recipe(load_yaml(text, str(path)), str(path)), text
