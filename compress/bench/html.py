"""A self-contained report.html (tables + plots embedded as base64 PNG), rendered from report.json."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

from compress.bench.plots import front_names

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.front td { background: #fff3f3; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #a00; }
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f"<p>({html.escape(alt)}: nothing to plot)</p>"
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


def render(reports: Sequence[dict[str, Any]], pngs: dict[str, bytes | None]) -> str:
    from compress.bench.report import accuracy_steps, int8_notes, summary_rows, threads_label

    title = (
        f"Compression report: {reports[0]['recipe']['name']}"
        if len(reports) == 1
        else f"Compression comparison: {len(reports)} runs"
    )
    on_lat, on_size = front_names(reports, "latency"), front_names(reports, "size")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    parts.append(
        "<p>One point per artifact; the dashed line is the Pareto front (no other model is both at least "
        "as accurate and at most as slow / as large). Rows on either front are shaded.</p>"
    )
    parts.append(_img(pngs.get("accuracy_vs_latency"), "accuracy vs latency"))
    parts.append(_img(pngs.get("accuracy_vs_size"), "accuracy vs size"))
    for rep in reports:
        label = rep.get("label") or rep["recipe"]["name"]
        env = rep["environment"]
        parts.append(f"<h2>{html.escape(label)}</h2>")
        parts.append(
            f"<p>Recipe <code>{html.escape(rep['recipe']['name'])}</code>, finished {html.escape(rep['finished'])} "
            f"on {html.escape(str(env.get('cpu')))}{', ' + html.escape(env['isa']) if env.get('isa') else ''} "
            f"({threads_label(env.get('threads'))} threads"
            f"{', GPU ' + html.escape(env['gpu']) if env.get('gpu') else ', no GPU'}); torch "
            f"{html.escape(env['torch'])}, onnxruntime {html.escape(env['onnxruntime'])}; top-1 on "
            f"{rep['data']['test_images']} test images.</p>"
        )
        header, rows = summary_rows(rep)
        marks = [
            ("latency" if (label, a["name"]) in on_lat else "") + (" size" if (label, a["name"]) in on_size else "")
            for a in rep["artifacts"]
        ]
        header = [*header, "Pareto front"]
        rows = [[*r, m.strip() or "–"] for r, m in zip(rows, marks, strict=True)]
        parts.append(_table(header, rows, ["front" if m.strip() else "" for m in marks]))
        lat_rows = [
            [a["name"], r["device"], r["runtime"], str(r["batch_size"]), str(r["threads"])]
            + [f"{r[k]:.3f}" for k in ("p50_ms", "p90_ms", "p99_ms")]
            + [f"{r['throughput']:.0f}"]
            for a in rep["artifacts"]
            for r in a["latency"]
        ]
        if lat_rows:
            parts.append("<h3>Latency</h3>")
            lat_header = ["artifact", "device", "runtime", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "img/s"]
            parts.append(_table(lat_header, lat_rows))
        steps_header, steps = accuracy_steps(rep)
        if steps:
            parts.append("<h3>Accuracy-aware quantization</h3>")
            parts.append(_table(steps_header, [[c.replace("`", "") for c in r] for r in steps]))
        notes = int8_notes(rep) + rep.get("notes", [])
        if notes:
            parts.append("<h3>Notes</h3><ul>" + "".join(f"<li class='note'>{html.escape(n)}</li>" for n in notes))
            parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
