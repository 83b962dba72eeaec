"""The documents behind our lm-eval tasks (``eval/tasks/*.yaml``), read from local files.

Every YAML task names one of these functions as its ``custom_dataset``; lm-eval calls it
with the task's ``dataset_kwargs`` (and its metadata, ignored here) when the task is built,
so the data folder is resolved then, by :func:`mops.data.data_dir` (``$MOPS_DATA_DIR``, else
``../shared/data``), and nothing is fetched from a hub.

- WikiText-2 raw test, one document per article, as lm-eval's ``wikitext`` task sees
  ``EleutherAI/wikitext_document_level`` (its detokenizer and word/byte counts are reused).
- MMLU, one subject: lm-eval's ``cais/mmlu`` fields (question, subject, choices, answer).
- Held-out instruction data: the test split that ``mops-recover`` holds out
  (:func:`mops.data.heldout_records`, seed 0), formatted with the toolkit's one prompt
  template, for response perplexity per category and for multiple choice on the
  classification-type Natural-Instructions tasks.
"""

from __future__ import annotations

import csv
import re
from functools import lru_cache

import datasets

from mops.data import (
    data_dir,
    format_prompt,
    heldout_records,
    load_source,
    read_mmlu_csv,
    split_records,
)
from mops.errors import UserError

HELDOUT_SOURCES = "dolly+natural-instructions"  # what mops-recover trains on by default
SEED = 0


# ----------------------------------------------------------------------------- WikiText-2

def _is_article_title(line: str) -> bool:
    flat = line.replace("= = =", "===").replace("= =", "==").strip()
    return flat.startswith("= ") and flat.endswith(" =")


def wikitext_pages(split: str = "test") -> list[str]:
    """The raw file cut into articles before each top-level ``= Title =`` line, lines joined
    by newlines, blank-only pages dropped: how ``EleutherAI/wikitext_document_level`` builds
    the pages of lm-eval's ``wikitext`` task (62 in the test split)."""
    path = data_dir() / "wikitext-2-raw" / f"wiki.{split}.raw"
    if not path.is_file():
        raise UserError(f"{path} does not exist; set MOPS_DATA_DIR to the folder of shared/data")
    pages, lines = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if _is_article_title(line):
            if "\n".join(lines).strip():
                pages.append("\n".join(lines))
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def wikitext2(**_) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": wikitext_pages("test")})})


# ----------------------------------------------------------------------------- MMLU

MMLU_SPLITS = {"test": "test", "validation": "val", "dev": "dev"}


def mmlu_rows(subject: str, split: str) -> list[dict]:
    path = data_dir() / "mmlu" / split / f"{subject}_{split}.csv"
    read_mmlu_csv(path)  # validates every row, with file and row in its errors
    with path.open(encoding="utf-8", newline="") as f:
        return [{"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(answer.strip())}
                for q, a, b, c, d, answer in csv.reader(f)]


def mmlu(subject: str, **_) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(mmlu_rows(subject, folder))
                                 for name, folder in MMLU_SPLITS.items()})


def mmlu_subjects() -> list[str]:
    return sorted(p.name[: -len("_test.csv")] for p in (data_dir() / "mmlu" / "test").glob("*_test.csv"))


# ----------------------------------------------------------------------------- instruction data


@lru_cache(maxsize=4)
def _splits(sources: str, seed: int) -> dict:
    return split_records([r for s in sources.split("+") for r in load_source(s)], seed=seed)


def _rows(records) -> list[dict]:
    return [{"prompt": format_prompt(r), "response": r.response, "category": r.category} for r in records]


def instruction_split(category: str, split: str, sources: str = HELDOUT_SOURCES, seed: int = SEED) -> list:
    records = [r for r in _splits(sources, seed)[split] if r.category == category]
    if not records:
        known = sorted({r.category for r in _splits(sources, seed)[split]})
        raise UserError(f"category {category!r}: not in the {split} split of {sources}; categories: {', '.join(known)}")
    return records


def response(category: str, sources: str = HELDOUT_SOURCES, seed: int = SEED, **_) -> datasets.DatasetDict:
    """Held-out test records of one category: the response is scored given the prompt."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows(instruction_split(category, "test", sources, seed)))})


def classification(category: str, labels: list[str], sources: str = HELDOUT_SOURCES, seed: int = SEED,
                   **_) -> datasets.DatasetDict:
    """A classification task as multiple choice over its label set; ``gold`` indexes ``labels``."""
    out = {}
    for split in ("train", "test"):
        records = instruction_split(category, split, sources, seed)
        rows = []
        for r, row in zip(records, _rows(records)):
            if r.response not in labels:
                raise UserError(f"{category}: label {r.response!r} is not in the task's label set {labels}")
            rows.append({**row, "gold": labels.index(r.response)})
        out[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)


# ----------------------------------------------------------------------------- metrics


def response_results(doc: dict, results) -> dict:
    """Word and byte perplexity of the response given its prompt (lm-eval's weighted form)."""
    (loglikelihood, _), = results
    text = doc["response"]
    words, n_bytes = len(re.split(r"\s+", text.strip())), len(text.encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}


def heldout_categories(sources: str = HELDOUT_SOURCES, seed: int = SEED) -> list[str]:
    return sorted({r.category for r in heldout_records(sources, "test", seed=seed)})
