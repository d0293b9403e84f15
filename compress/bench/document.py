"""The report as a small document model, built once and rendered twice: to Markdown (here) and HTML (html.py).

report.py builds a `Document` from report.json; `markdown()` and `compress.bench.html.render()` only walk it,
so report.md and report.html cannot drift apart: the same sections, paragraphs, tables and images, in the
same order. Dependencies go one way: document <- html <- report (this module imports nothing of compress).

Heading levels come from nesting: the document's title is level 1, its sections level 2, a section inside a
section level 3. Text is a plain string or a tuple of spans, so code (`Code`) and emphasis (`Emph`) are
marked up by each renderer rather than parsed out of strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Code:
    """Inline code: `text` in Markdown, <code> in HTML."""

    text: str


@dataclass(frozen=True)
class Emph:
    """Emphasis: *text* in Markdown, <em> in HTML."""

    text: str


Span = str | Code | Emph
Text = Span | tuple[Span, ...]


@dataclass
class Paragraph:
    text: Text


@dataclass
class Table:
    """A header and rows of cells; rows flagged in `highlight` are shaded in HTML (Markdown has no shading)."""

    header: list[str]
    rows: list[list[Text]]
    highlight: list[bool] | None = None


@dataclass
class BulletList:
    items: list[Text]
    css_class: str = ""  # HTML only


@dataclass
class Image:
    """A PNG: linked by file name in Markdown (written next to report.md), embedded in HTML."""

    alt: str
    filename: str
    png: bytes | None  # None: nothing to plot (both renderers say so)


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


Block = Paragraph | Table | BulletList | Image | Section


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)


def spans(text: Text) -> tuple[Span, ...]:
    return text if isinstance(text, tuple) else (text,)


def plain(text: Text) -> str:
    """The text without markup (for alt text, tests, anything that wants the words only)."""
    return "".join(s if isinstance(s, str) else s.text for s in spans(text))


def headings(doc: Document) -> list[tuple[int, str]]:
    """(level, title) of the document and every section, depth first, in order."""
    out = [(1, doc.title)]

    def walk(blocks: Sequence[Block], level: int) -> None:
        for b in blocks:
            if isinstance(b, Section):
                out.append((level, b.title))
                walk(b.blocks, level + 1)

    walk(doc.blocks, 2)
    return out


def nothing_to_plot(image: Image) -> str:
    return f"({image.alt}: nothing to plot)"


# Markdown -------------------------------------------------------------------------------------------------


def _md_inline(text: Text, in_table: bool = False) -> str:
    out = []
    for s in spans(text):
        if isinstance(s, Code):
            out.append(f"``{s.text}``" if "`" in s.text else f"`{s.text}`")
        elif isinstance(s, Emph):
            out.append(f"*{s.text}*")
        else:
            out.append(s)
    joined = "".join(out)
    return joined.replace("|", "\\|").replace("\n", " ") if in_table else joined


def md_table(header: Sequence[str], rows: Sequence[Sequence[Text]]) -> list[str]:
    """A Markdown table's lines."""
    return [
        "| " + " | ".join(_md_inline(h, True) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(_md_inline(c, True) for c in r) + " |" for r in rows),
    ]


def _md_blocks(blocks: Sequence[Block], level: int) -> list[str]:
    """Each block's lines; blocks are separated by one blank line."""
    chunks: list[list[str]] = []
    for b in blocks:
        if isinstance(b, Section):
            chunks.append(["#" * level + " " + b.title])
            inner = _md_blocks(b.blocks, level + 1)
            if inner:
                chunks.append(inner)
        elif isinstance(b, Paragraph):
            chunks.append([_md_inline(b.text)])
        elif isinstance(b, Table):
            chunks.append(md_table(b.header, b.rows))
        elif isinstance(b, BulletList):
            chunks.append([f"- {_md_inline(item)}" for item in b.items])
        elif isinstance(b, Image):
            chunks.append([f"![{b.alt}]({b.filename})" if b.png is not None else nothing_to_plot(b)])
        else:  # pragma: no cover - the Block union is closed
            raise TypeError(f"not a document block: {b!r}")
    lines: list[str] = []
    for chunk in chunks:
        if lines:
            lines.append("")
        lines.extend(chunk)
    return lines


def markdown(doc: Document) -> str:
    """The document as Markdown (GitHub-flavoured tables)."""
    return "\n".join([f"# {doc.title}", "", *_md_blocks(doc.blocks, 2)]) + "\n"
