"""Instruction data and plain text, from local files (or a hub id where a network exists).

An instruction record is ``{instruction, context, response, category, source}``. Named
sources read the real data sets of ``shared/data`` (see its README):

============================  =========================================  ==================
name                          files                                       category
============================  =========================================  ==================
``dolly``                     ``dolly-15k-subset.jsonl``                  its 8 categories
``natural-instructions``      ``natural-instructions/*.jsonl`` (8 tasks)  the task
``gsm8k``                     ``gsm8k/train.jsonl``                       ``math``
``alpaca-eval``               ``alpaca_eval/alpaca_eval.jsonl``           its 5 sources
``mmlu``                      ``mmlu/{dev,val}/*.csv`` (test is for eval) the subject
============================  =========================================  ==================

Any other JSONL file works too: ``path.jsonl`` (fields recognised from the named
sources' layouts) or ``path.jsonl#instruction=question,response=answer,category=topic``
to map fields by hand; a missing ``category`` mapping makes the file's name the
category. ``hf:org/name[#mapping]`` reads a hub data set's train split (network only).

Every stage formats examples with the one template of :func:`format_prompt`.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from mops.errors import UserError

FIELDS = ("instruction", "context", "response", "category")
REQUIRED = ("instruction", "response")


@dataclass(frozen=True)
class InstructionRecord:
    instruction: str
    context: str
    response: str
    category: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class JsonlLayout:
    """Which JSON field holds each record field; ``category`` may be a constant instead."""

    fields: dict[str, str]
    category: str | None = None  # constant category when no field holds one

    def matches(self, keys) -> bool:
        return all(v in keys for v in self.fields.values())


@dataclass(frozen=True)
class NamedSource:
    files: tuple[str, ...]  # globs relative to the data folder
    layout: JsonlLayout | None = None  # None: MMLU's CSV layout
    doc: str = ""


SOURCES: dict[str, NamedSource] = {
    "dolly": NamedSource(
        ("dolly-15k-subset.jsonl",),
        JsonlLayout(dict(instruction="instruction", context="context", response="response", category="category")),
        "Databricks Dolly-15k subset, 8 categories",
    ),
    "natural-instructions": NamedSource(
        ("natural-instructions/*.jsonl",),
        JsonlLayout(dict(instruction="definition", context="input", response="output", category="task")),
        "8 Super-NaturalInstructions tasks, category = task",
    ),
    "gsm8k": NamedSource(
        ("gsm8k/train.jsonl",),
        JsonlLayout(dict(instruction="question", response="answer"), category="math"),
        "GSM8K train, category = math",
    ),
    "alpaca-eval": NamedSource(
        ("alpaca_eval/alpaca_eval.jsonl",),
        JsonlLayout(dict(instruction="instruction", response="output", category="dataset")),
        "AlpacaEval's 805 instructions, category = its 5 sources",
    ),
    "mmlu": NamedSource(("mmlu/dev/*.csv", "mmlu/val/*.csv"), None, "MMLU dev+val, category = subject"),
}
TEXT_SOURCES = {"wikitext2": "wikitext-2-raw/wiki.{split}.raw"}


def data_dir() -> Path:
    """The shared data folder: ``$MOPS_DATA_DIR``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("MOPS_DATA_DIR")
    if env:
        return Path(env)
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    raise UserError(f"no data folder found at {' or '.join(map(str, candidates))}; set MOPS_DATA_DIR to the folder of shared/data")


def _accepted() -> str:
    return f"a named source ({', '.join(SOURCES)}), a .jsonl path [#field=name,...], or hf:org/name"


# ----------------------------------------------------------------------------- records


def _record(obj: dict, layout: JsonlLayout, where: str, source: str, default_category: str) -> InstructionRecord:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    values = {}
    for name, key in layout.fields.items():
        if key not in obj:
            raise UserError(f"{where}: missing field {key!r} (the record's {name}); fields present: {', '.join(obj) or 'none'}")
        if not isinstance(obj[key], str):
            raise UserError(f"{where}: field {key!r} (the record's {name}) is {type(obj[key]).__name__}, expected a string")
        values[name] = obj[key]
    category = values.get("category") or layout.category or default_category
    return InstructionRecord(values["instruction"], values.get("context", ""), values["response"], category, source)


def parse_mapping(text: str) -> JsonlLayout:
    fields = {}
    for part in filter(None, text.split(",")):
        name, sep, key = part.partition("=")
        if not sep or name not in FIELDS or not key:
            raise UserError(f"field mapping {part!r}: expected FIELD=json_key with FIELD in {', '.join(FIELDS)}")
        fields[name] = key
    missing = [f for f in REQUIRED if f not in fields]
    if missing:
        raise UserError(f"field mapping {text!r}: also map {', '.join(missing)}")
    return JsonlLayout(fields)


def read_jsonl(path: Path, layout: JsonlLayout | None = None, source: str | None = None) -> list[InstructionRecord]:
    """Read a JSONL file; with no layout, recognise one of the named sources' layouts."""
    source = source or path.stem
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} does not exist; expected {_accepted()}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from e
            if layout is None:
                layout = _detect_layout(obj, where)
            records.append(_record(obj, layout, where, source, default_category=path.stem))
    if not records:
        raise UserError(f"data file {str(path)!r} holds no records")
    return records


def _detect_layout(obj, where: str) -> JsonlLayout:
    keys = obj.keys() if isinstance(obj, dict) else ()
    for named in SOURCES.values():
        if named.layout and named.layout.matches(keys):
            return named.layout
    # Fall back to the plainest layout, so the error names what is missing.
    return JsonlLayout(dict(instruction="instruction", response="response"))


def read_mmlu_csv(path: Path, source: str = "mmlu") -> list[InstructionRecord]:
    """One MMLU CSV (question, A, B, C, D, answer letter; no header); category = subject."""
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} does not exist; expected {_accepted()}")
    subject = path.stem.rsplit("_", 1)[0]
    readable = subject.replace("_", " ")
    records = []
    with path.open(encoding="utf-8", newline="") as f:
        for rowno, row in enumerate(csv.reader(f), 1):
            if len(row) != 6:
                raise UserError(f"{path}: row {rowno}: expected question, A, B, C, D, answer letter; got {len(row)} fields")
            if row[5].strip() not in ("A", "B", "C", "D"):
                raise UserError(f"{path}: row {rowno}: answer {row[5]!r}, expected one of A, B, C, D")
            question, *choices, answer = row
            context = question + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices))
            instruction = f"The following is a multiple choice question about {readable}. Answer with the letter of the correct choice."
            records.append(InstructionRecord(instruction, context, answer.strip(), subject, source))
    return records


def load_source(spec: str, limit: int | None = None, seed: int = 0) -> list[InstructionRecord]:
    """Records of one source spec; ``limit`` keeps a seeded, category-stratified subset."""
    if spec in SOURCES:
        named = SOURCES[spec]
        root = data_dir()
        paths = sorted(p for pattern in named.files for p in root.glob(pattern))
        if not paths:
            raise UserError(f"source {spec!r}: no files {', '.join(named.files)} under {root}; set MOPS_DATA_DIR")
        records = []
        for p in paths:
            records += read_mmlu_csv(p, spec) if named.layout is None else read_jsonl(p, named.layout, spec)
    elif spec.startswith("hf:"):
        records = _load_hub(spec[3:])
    else:
        path_text, _, mapping = spec.partition("#")
        layout = parse_mapping(mapping) if mapping else None
        path = Path(path_text).expanduser()
        if path.suffix == ".csv":
            records = read_mmlu_csv(path, path.stem)
        elif path.suffix in (".jsonl", ".json") or path.exists():
            records = read_jsonl(path, layout)
        else:
            raise UserError(f"data source {spec!r}: unknown; expected {_accepted()}")
    if limit is not None and len(records) > limit:
        records = stratified_subset(records, limit, seed)
    return records


def _load_hub(spec: str) -> list[InstructionRecord]:
    import datasets

    name, _, mapping = spec.partition("#")
    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's spec or network
        raise UserError(f"hub data set {name!r} could not be loaded ({type(e).__name__}); without a network use a local .jsonl") from e
    layout = parse_mapping(mapping) if mapping else None
    records = []
    for i, row in enumerate(rows):
        layout = layout or _detect_layout(row, f"hf:{name}")
        records.append(_record(row, layout, f"hf:{name} row {i}", name.split("/")[-1], default_category=name))
    return records


def load_records(specs: list[str] | str, limit_per_source: int | None = None, seed: int = 0) -> list[InstructionRecord]:
    """Mix several sources into one multi-task, multi-source list (source order kept)."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise UserError(f"no data source given; expected {_accepted()}")
    return [r for spec in specs for r in load_source(spec, limit_per_source, seed)]


# ----------------------------------------------------------------------------- splits


def split_records(
    records: list[InstructionRecord], seed: int = 0, fractions: tuple[float, float] = (0.1, 0.1)
) -> dict[str, list[InstructionRecord]]:
    """Deterministic train/validation/test split, stratified by category.

    ``fractions`` are the validation and test shares of every category; a category with
    at least three records gets at least one record in each held-out split.
    """
    by_category = defaultdict(list)
    for r in records:
        by_category[r.category].append(r)
    splits = {"train": [], "validation": [], "test": []}
    for category in sorted(by_category):
        items = by_category[category][:]
        random.Random(f"{seed}/{category}").shuffle(items)
        n = len(items)
        n_val, n_test = (max(1 if n >= 3 else 0, round(n * f)) for f in fractions)
        splits["test"] += items[:n_test]
        splits["validation"] += items[n_test : n_test + n_val]
        splits["train"] += items[n_test + n_val :]
    return splits


def heldout_records(sources: str, split: str = "test", limit: int | None = None, seed: int = 0) -> list[InstructionRecord]:
    """One split of sources joined by ``+`` (e.g. ``dolly+natural-instructions``), optionally
    cut to a stratified subset of ``limit`` records."""
    records = split_records(load_records(sources.split("+"), seed=seed), seed=seed)[split]
    return stratified_subset(records, limit, seed) if limit else records


def stratified_subset(records: list[InstructionRecord], n: int, seed: int = 0) -> list[InstructionRecord]:
    """A seeded subset of ``n`` records with every category represented in proportion."""
    if n >= len(records):
        return list(records)
    by_category = defaultdict(list)
    for r in records:
        by_category[r.category].append(r)
    rng = random.Random(seed)
    for items in by_category.values():
        rng.shuffle(items)
    # Round-robin over categories in proportion: take the share each category is owed.
    order = sorted(by_category)
    quota = {c: len(by_category[c]) * n / len(records) for c in order}
    taken = {c: int(quota[c]) for c in order}
    for c in sorted(order, key=lambda c: quota[c] - taken[c], reverse=True)[: n - sum(taken.values())]:
        taken[c] += 1
    return [r for c in order for r in by_category[c][: taken[c]]]


# ----------------------------------------------------------------------------- template


def format_prompt(record: InstructionRecord) -> str:
    """The one prompt template of the toolkit: everything the model sees before the response."""
    context = f"### Input:\n{record.context}\n\n" if record.context.strip() else ""
    return f"### Instruction:\n{record.instruction}\n\n{context}### Response:\n"


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt: the loss is taken on response tokens only
    prompt_len: int  # how many leading tokens are instruction (what a gate may look at)
    category: str = ""


def encode_example(tokenizer, record: InstructionRecord, max_len: int = 512) -> EncodedExample:
    """Tokenize prompt and response separately, so the boundary between them is exact."""
    prompt = tokenizer(format_prompt(record), add_special_tokens=True)["input_ids"]
    response = tokenizer(record.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if max_len < 2:
        raise ValueError(f"max_len {max_len}: an example needs at least one prompt and one response token")
    if len(prompt) > max_len - 1:  # keep the prompt's end (the "### Response:" cue) and one response token
        prompt = prompt[-(max_len - 1) :]
    response = response[: max_len - len(prompt)]
    return EncodedExample(prompt + response, [-100] * len(prompt) + response, len(prompt), record.category)


def pad_batch(examples: list[EncodedExample], pad_id: int, side: str = "right"):
    """Stack examples into ``input_ids``, ``attention_mask``, ``labels`` and ``gate_mask``
    (the instruction tokens: what a gate may look at; never the response, never padding)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids, mask, labels, gate = [], [], [], []
    for e in examples:
        pad = width - len(e.input_ids)
        n, p = len(e.input_ids), e.prompt_len
        row = (e.input_ids, [1] * n, e.labels, [True] * p + [False] * (n - p))
        fill = ([pad_id] * pad, [0] * pad, [-100] * pad, [False] * pad)
        for out, values, padding in zip((ids, mask, labels, gate), row, fill):
            out.append(values + padding if side == "right" else padding + values)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels),
            "gate_mask": torch.tensor(gate, dtype=torch.bool)}


# ----------------------------------------------------------------------------- plain text


def wikitext_text(split: str = "test") -> str:
    """WikiText-2 raw as the SparseGPT/Wanda protocol sees it: the rows joined with "\\n\\n".

    The raw file holds one Hugging Face row per line; an empty row is written as " \\n".
    Rows keep their trailing newline, as in the Hugging Face data set.
    """
    if split not in ("test", "valid"):
        raise UserError(f"wikitext2 split {split!r}: expected test or valid")
    path = data_dir() / TEXT_SOURCES["wikitext2"].format(split=split)
    if not path.is_file():
        raise UserError(f"{path} does not exist; set MOPS_DATA_DIR to the folder of shared/data")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = ["" if line == " \n" else line for line in lines]
    return "\n\n".join(rows)
