"""The report's figures (PNG, drawn from the same numbers the tables print)."""

from __future__ import annotations


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def recovery_chart(rows: list[dict], path) -> None:
    """Held-out response perplexity with its 95% interval: per pruning setting, the pruned model
    and every recovery method; the dense model as a line."""
    plt = _plt()
    dense = next(r for r in rows if r["kind"] == "dense")
    settings = [r["setting"] for r in rows if r["kind"] == "pruned"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kind"] == "recovered"))
    series = ["pruned"] + methods
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(settings) + 0.3 * len(series), 4))
    for i, name in enumerate(series):
        xs, ys, errs = [], [], [[], []]
        for j, setting in enumerate(settings):
            row = next((r for r in rows if r["setting"] == setting and
                        (r["kind"] == "pruned" if name == "pruned" else r.get("method") == name)), None)
            if row:
                resp = row["response"]
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(resp["ppl"])
                errs[0].append(resp["ppl"] - resp["low"])
                errs[1].append(resp["high"] - resp["ppl"])
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=name)
    ax.axhline(dense["response"]["ppl"], color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_yscale("log")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_xlabel("pruning setting")
    ax.set_ylabel("held-out response perplexity (log scale)")
    ax.set_title("Recovery: held-out response perplexity, 95% bootstrap intervals", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def category_chart(rows: list[dict], path) -> None:
    """Held-out response perplexity per task category, one group of bars per category."""
    plt = _plt()
    categories = sorted(rows[0]["response"]["per_category"])
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(2 + 0.35 * len(categories) * max(1, len(rows) / 3), 4.2))
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, [row["response"]["per_category"].get(c, float("nan")) for c in categories], width, label=row["label"])
    ax.set_yscale("log")
    ax.set_xticks(range(len(categories)), categories, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("response perplexity (log scale)")
    ax.set_title("Held-out response perplexity per category", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def curves_chart(histories: dict[str, dict], path) -> None:
    """Training loss per step and validation perplexity per measurement, per recovery stage."""
    plt = _plt()
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, history in histories.items():
        losses = history.get("train_loss") or []
        loss_ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1)
        val = history.get("validation") or []
        val_ax.plot([v["step"] for v in val], [v["ppl"] for v in val], marker="o", label=label, linewidth=1)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss (response NLL)")
    val_ax.set_xlabel("step")
    val_ax.set_ylabel("validation response perplexity")
    for ax in (loss_ax, val_ax):
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
