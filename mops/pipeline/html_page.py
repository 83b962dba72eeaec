"""``report.html``: one self-contained page (images inline as data URIs, styles inline, no
script and nothing fetched), so it opens the same from a mail attachment or a CI artifact."""

from __future__ import annotations

import base64
import html

from mops.pipeline.table import table_cells

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; }
td { text-align: right; white-space: nowrap; }
td:first-child { text-align: left; font-weight: 600; }
th { background: #f3f3f3; }
tr.dense td { background: #f7fbff; }
tr.pruned td { background: #fff8f0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; border: 1px solid #eee; }
li { margin: 0.3em 0; }
"""


def _img(path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def render_html(job, table, figures: dict, reproduce, versions: dict, notes: list[str]) -> str:
    e = html.escape
    head, body = table_cells(table)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>mops-run report: {e(job.world.recipe.model)}</title><style>{STYLE}</style></head><body>",
             f"<h1>mops-run report: {e(job.world.recipe.model)}</h1>",
             f"<p>Recipe <code>{e(str(job.recipe_path))}</code>, output <code>{e(str(job.store.out))}</code>.</p>",
             "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row, cells in zip(table, body):
        parts.append(f'<tr class="{e(row["kind"])}">' + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    parts.append("</tbody></table><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    for title, path in figures.items():
        parts += [f"<h2>{e(title)}</h2>", _img(path, title)]
    parts += ["<h2>Recipe</h2>", f"<pre>{e(job.recipe_text)}</pre>",
              "<h2>Reproduce</h2>",
              f"<p>Everything: <code>mops-run {e(str(job.recipe_path))}</code> (finished stages are reused). "
              "Each stage alone:</p>",
              "<pre>" + "\n".join(f"# {e(label)}\n{e(command)}" for label, command in reproduce) + "</pre>",
              "<h2>Library versions</h2>",
              "<table>" + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in sorted(versions.items()))
              + "</table>", "</body></html>"]
    return "\n".join(parts) + "\n"
