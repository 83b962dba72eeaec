"""Split training records across N federated clients, from a seed (METHOD.md section 3).

- ``skew``: the MoPs appendix A skew. ``total`` examples (5,000 by default) are drawn across
  all categories; each category is split into N partitions, one of them ``ratio`` (15) times
  larger than each of the others, and every client gets one partition of every category.
  The client holding category c's large partition rotates with c, so each client's task
  mix differs.
- ``iid``: the same examples shuffled and dealt into N near-equal parts.
- ``dirichlet``: per category, client shares drawn from Dirichlet(alpha); small alpha is
  more skewed.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import numpy as np

from mops.data import InstructionRecord, stratified_subset
from mops.errors import UserError

SCHEMES = ("skew", "iid", "dirichlet")


def apportion(n: int, weights: list[float]) -> list[int]:
    """Split ``n`` into whole counts proportional to ``weights`` (largest remainder)."""
    total = float(sum(weights))
    quota = [n * w / total for w in weights]
    counts = [int(q) for q in quota]
    by_remainder = sorted(range(len(weights)), key=lambda i: (quota[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _by_category(records: list[InstructionRecord], seed: int) -> dict[str, list[InstructionRecord]]:
    groups = defaultdict(list)
    for r in records:
        groups[r.category].append(r)
    for category, items in groups.items():
        random.Random(f"{seed}/partition/{category}").shuffle(items)
    return {c: groups[c] for c in sorted(groups)}


def _deal(groups: dict[str, list[InstructionRecord]], counts: dict[str, list[int]], n_clients: int):
    parts = [[] for _ in range(n_clients)]
    for category, items in groups.items():
        start = 0
        for client, k in enumerate(counts[category]):
            parts[client] += items[start : start + k]
            start += k
    return parts


def skew_counts(n: int, n_clients: int, big_client: int, ratio: float = 15.0) -> list[int]:
    """One category's ``n`` examples over the clients: ``big_client`` gets ``ratio`` times
    each other client's share (exactly when n is a multiple of N - 1 + ratio)."""
    return apportion(n, [ratio if c == big_client else 1.0 for c in range(n_clients)])


def partition(records: list[InstructionRecord], n_clients: int, scheme: str = "skew", total: int = 5000,
              ratio: float = 15.0, alpha: float = 0.5, seed: int = 0) -> list[list[InstructionRecord]]:
    """``n_clients`` lists of records (one per client), a pure function of the arguments."""
    if n_clients < 1:
        raise UserError(f"--federated {n_clients}: expected at least 1 client")
    if scheme not in SCHEMES:
        raise UserError(f"--partition {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if total < n_clients:
        raise UserError(f"--fed-examples {total}: expected at least one example per client ({n_clients})")
    if ratio < 1:
        raise UserError(f"--skew-ratio {ratio}: expected 1 or more (the large partition over each small one)")
    if not alpha > 0:
        raise UserError(f"--alpha {alpha}: expected a positive Dirichlet concentration")
    chosen = stratified_subset(records, total, seed)
    groups = _by_category(chosen, seed)
    if scheme == "iid":
        pool = [r for items in groups.values() for r in items]
        random.Random(f"{seed}/partition/iid").shuffle(pool)
        sizes = apportion(len(pool), [1.0] * n_clients)
        starts = np.cumsum([0] + sizes)
        parts = [pool[starts[i] : starts[i + 1]] for i in range(n_clients)]
    elif scheme == "skew":
        offset = random.Random(f"{seed}/partition/skew").randrange(n_clients)
        counts = {c: skew_counts(len(items), n_clients, (j + offset) % n_clients, ratio)
                  for j, (c, items) in enumerate(groups.items())}
        parts = _deal(groups, counts, n_clients)
    else:
        rng = np.random.default_rng(seed)
        counts = {c: apportion(len(items), rng.dirichlet([alpha] * n_clients).tolist()) for c, items in groups.items()}
        parts = _deal(groups, counts, n_clients)
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise UserError(f"clients {empty} got no training examples with --partition {scheme}; use fewer clients, "
                        "more --fed-examples, or (dirichlet) a larger --alpha")
    return parts


def category_counts(parts: list[list[InstructionRecord]]) -> dict[str, dict[str, int]]:
    """``{"client 0": {category: count, ...}, ...}``, every category listed for every client."""
    categories = sorted({r.category for p in parts for r in p})
    table = {}
    for i, p in enumerate(parts):
        counted = Counter(r.category for r in p)
        table[f"client {i}"] = {c: counted.get(c, 0) for c in categories}
    return table


def counts_markdown(table: dict[str, dict[str, int]]) -> str:
    """The category-count table as Markdown: a row per client, a column per category, totals."""
    clients = list(table)
    categories = list(next(iter(table.values()))) if table else []
    lines = ["| client | " + " | ".join(categories) + " | total |",
             "| --- | " + " | ".join("---:" for _ in categories) + " | ---: |"]
    for client in clients:
        row = table[client]
        lines.append(f"| {client} | " + " | ".join(str(row[c]) for c in categories) + f" | {sum(row.values())} |")
    totals = [sum(table[k][c] for k in clients) for c in categories]
    lines.append("| all | " + " | ".join(map(str, totals)) + f" | {sum(totals)} |")
    return "\n".join(lines)


def held_out_shares(records: list[InstructionRecord], train_parts: list[list[InstructionRecord]],
                    seed: int = 0) -> list[list[int]]:
    """Each client's share of held-out ``records`` (indices into them), a partition of them:
    every category's examples split over the clients in proportion to the clients' training
    examples of that category. So a client's share has its own skewed mix: under the skew,
    15 of every 18 examples of a category go to the client that holds its large partition."""
    weights = [Counter(r.category for r in part) for part in train_parts]
    by_category = defaultdict(list)
    for i, r in enumerate(records):
        by_category[r.category].append(i)
    shares = [[] for _ in train_parts]
    for category in sorted(by_category):
        items = by_category[category]
        random.Random(f"{seed}/held-out/{category}").shuffle(items)
        counts = [w[category] for w in weights]
        sizes = apportion(len(items), counts if sum(counts) else [1] * len(train_parts))
        start = 0
        for client, k in enumerate(sizes):
            shares[client] += items[start : start + k]
            start += k
    return [sorted(s) for s in shares]
