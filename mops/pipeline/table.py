"""The report's one table, as cells: the Markdown file, the HTML page and the terminal
all show these same strings."""

from __future__ import annotations

APPROX = "≈"  # marks an lm-eval score within the combined stderr of its reference row


def _ci(d: dict) -> str:
    return f"{d['ppl']:.2f} [{d['low']:.2f}, {d['high']:.2f}]"


def _score(s: dict) -> str:
    if s["value"] is None:
        return "n/a"
    value = f"{s['value']:.4f}" if abs(s["value"]) < 10 else f"{s['value']:.2f}"
    se = "" if s["stderr"] is None else f" ± {s['stderr']:.4f}"
    return value + se + (f" {APPROX}" if s.get("within_stderr") else "")


def table_cells(table: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the one table, shared by the Markdown and HTML renderings."""
    from mops.eval.bootstrap import format_delta

    score_cols = [f"{s['task']} {s['metric']}" + {True: " ↑", False: " ↓"}.get(s["higher_is_better"], "")
                  for s in table[0]["lm_eval"]]
    head = (["model", "sparsity", "WikiText-2 ppl [95%]", "response ppl [95%]", "vs. reference [95%]",
             "damage recovered"] + score_cols + ["trainable params", "train s"])
    body = []
    for r in table:
        vs = f"{format_delta(r['vs_reference'])} vs {r['reference']}" if r.get("vs_reference") else ""
        share = f"{100 * r['recovered_share']:.0f}%" if r.get("recovered_share") is not None else ""
        params = f"{r['trainable_params']:,}" if "trainable_params" in r else ""
        seconds = (f"{r['train_seconds']:.0f}" + (f" (resumed at step {r['resumed_from_step']})"
                                                  if r.get("resumed_from_step") is not None else "")
                   if "train_seconds" in r else "")
        body.append([r["label"], f"{r['sparsity']:.4f}", _ci(r["wikitext2"]), _ci(r["response"]), vs, share]
                    + [_score(s) for s in r["lm_eval"]] + [params, seconds])
    return head, body
