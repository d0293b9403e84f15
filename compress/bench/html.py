"""A self-contained report.html (plots embedded as base64 PNG) rendered from the report's document model.

The same `Document` that report.md is rendered from (compress.bench.document), so both carry the same
sections. Wide tables sit in a wrapper that scrolls sideways instead of overflowing the page.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from compress.bench.document import (
    Block,
    BulletList,
    Code,
    Document,
    Emph,
    Image,
    Paragraph,
    Section,
    Table,
    Text,
    nothing_to_plot,
    spans,
)

# The wrapper's overflow is also set inline, so the page scrolls its tables even where the <style> is stripped.
TABLE_WRAP = "overflow-x:auto"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1100px; color: #222; }
.table-wrap { overflow-x: auto; max-width: 100%; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; white-space: nowrap; }
tr.front td { background: #fff3f3; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
code { font-size: 0.95em; }
.note { color: #a00; }
"""


def _inline(text: Text) -> str:
    out = []
    for s in spans(text):
        if isinstance(s, Code):
            out.append(f"<code>{html.escape(s.text)}</code>")
        elif isinstance(s, Emph):
            out.append(f"<em>{html.escape(s.text)}</em>")
        else:
            out.append(html.escape(s))
    return "".join(out)


def _table(t: Table) -> str:
    head = "".join(f"<th>{_inline(h)}</th>" for h in t.header)
    body = []
    for i, row in enumerate(t.rows):
        cls = ' class="front"' if t.highlight and t.highlight[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>")
    return (
        f'<div class="table-wrap" style="{TABLE_WRAP}"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _img(image: Image) -> str:
    if image.png is None:
        return f"<p>{html.escape(nothing_to_plot(image))}</p>"
    data = base64.b64encode(image.png).decode()
    return f'<p><img alt="{html.escape(image.alt)}" src="data:image/png;base64,{data}"></p>'


def _blocks(blocks: Sequence[Block], level: int) -> list[str]:
    parts = []
    for b in blocks:
        if isinstance(b, Section):
            h = min(level, 6)
            parts.append(f"<section><h{h}>{html.escape(b.title)}</h{h}>")
            parts.extend(_blocks(b.blocks, level + 1))
            parts.append("</section>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            parts.append(_table(b))
        elif isinstance(b, BulletList):
            cls = f' class="{html.escape(b.css_class)}"' if b.css_class else ""
            parts.append("<ul>" + "".join(f"<li{cls}>{_inline(item)}</li>" for item in b.items) + "</ul>")
        elif isinstance(b, Image):
            parts.append(_img(b))
        else:  # pragma: no cover - the Block union is closed
            raise TypeError(f"not a document block: {b!r}")
    return parts


def render(doc: Document) -> str:
    """The document as one HTML page with nothing external (styles inline, images as data: URLs)."""
    title = html.escape(doc.title)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{title}</title><style>{STYLE}</style></head><body><h1>{title}</h1>",
        *_blocks(doc.blocks, 2),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
