"""`compress report` and the rendered report: Pareto fronts, plots, self-contained HTML, comparisons."""

from __future__ import annotations

import ast
import base64
import copy
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from compress.bench import report as report_mod
from compress.bench.plots import LABEL_GID, cpu_p50, pareto_front, points, scatter_figure
from compress.cli import main


def test_pareto_front_on_a_constructed_example():
    pts = [
        (1.0, 0.50),  # 0 front: cheapest
        (2.0, 0.70),  # 1 front
        (3.0, 0.60),  # 2 dominated by 1
        (2.0, 0.70),  # 3 duplicate of 1: neither dominates the other
        (0.5, 0.40),  # 4 front: cheapest of all
        (4.0, 0.90),  # 5 front: most accurate
        (4.0, 0.80),  # 6 dominated by 5 (same cost, less accurate)
        (5.0, 0.90),  # 7 dominated by 5 (same accuracy, costlier)
    ]
    assert pareto_front(pts) == [4, 0, 1, 3, 5]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.1)]) == [0]


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self.h2: list[str] = []
        self._cell: list[str] | None = None
        self._tag = ""

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        self._tag = ""
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        elif self._tag == "h2":
            self.h2.append(data)


def _parse(path: Path) -> _Collect:
    parser = _Collect()
    parser.feed(path.read_text())
    return parser


def _decode_png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")  # embedded: the file works alone
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    return image


def _expected_front(report: dict, axis: str) -> set[str]:
    """The front computed here from report.json by the definition, independently of the renderer."""
    bs = min(r["batch_size"] for a in report["artifacts"] for r in a["latency"])
    pts = {
        a["name"]: (cpu_p50(a, bs) if axis == "latency" else a["size_bytes"], a["accuracy"])
        for a in report["artifacts"]
        if (cpu_p50(a, bs) if axis == "latency" else a["size_bytes"]) is not None
    }
    return {
        n
        for n, (c, acc) in pts.items()
        if not any(c2 <= c and a2 >= acc and (c2 < c or a2 > acc) for m, (c2, a2) in pts.items() if m != n)
    }


def test_a_run_writes_html_and_plots_with_the_pareto_front(digits_run):
    out, report, _ = digits_run
    for name in ("report.html", "accuracy_vs_latency.png", "accuracy_vs_size.png"):
        assert (out / name).is_file(), name
    page = _parse(out / "report.html")
    assert len(page.images) == 2
    for src in page.images:
        image = _decode_png(src)
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 400
        assert len(set(image.convert("L").getdata())) > 20  # a picture, not a blank canvas
    header = next(row for row in page.rows if row and row[0] == "artifact" and "Pareto front" in row)
    col = header.index("Pareto front")
    summary = [row for row in page.rows if len(row) == len(header) and row is not header]
    by_name = {row[0]: row for row in summary}
    assert list(by_name) == [a["name"] for a in report["artifacts"]]
    for axis in ("latency", "size"):
        marked = {name for name, row in by_name.items() if axis in row[col]}
        assert marked == _expected_front(report, axis), axis
    md = (out / "report.md").read_text()
    assert "![accuracy vs latency](accuracy_vs_latency.png)" in md


def test_report_rerenders_a_run_identically(digits_run, tmp_path, capsys):
    out, _, _ = digits_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = {n: (copy / n).read_bytes() for n in ("report.md", "report.html", "accuracy_vs_size.png")}
    for name in before:
        (copy / name).unlink()
    assert main(["report", str(copy)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(copy / "report.html") in printed
    for name, blob in before.items():
        if name.endswith(".png"):
            assert Image.open(copy / name).size == Image.open(io.BytesIO(blob)).size
        else:
            assert (copy / name).read_bytes() == blob, name  # the run's own report is this same rendering


def test_report_compares_runs(digits_run, tmp_path, capsys):
    out, report, _ = digits_run
    other = tmp_path / "faster"
    shutil.copytree(out, other)
    # A second run whose INT8 model is (pretend) 10x faster: it must take the latency front.
    edited = json.loads((other / "report.json").read_text())
    for art in edited["artifacts"]:
        if art["name"] == "model.int8.onnx":
            for row in art["latency"]:
                for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms"):
                    row[key] /= 10
            art["accuracy"] = max(a["accuracy"] for a in report["artifacts"]) + 0.001
    (other / "report.json").write_text(json.dumps(edited))
    dest = tmp_path / "cmp"
    assert main(["report", str(out), str(other), "--out", str(dest)]) == 0
    capsys.readouterr()
    page = _parse(dest / "report.html")
    assert page.h2 == ["Plots", "run", "faster"] and len(page.images) == 2  # a section per run
    md = (dest / "report.md").read_text()
    assert md.startswith("# Compression comparison: 2 runs")
    front_rows = [line for line in md.splitlines() if line.startswith("| faster | model.int8.onnx")]
    assert len(front_rows) == 1 and front_rows[0].rstrip(" |").endswith("latency, size")
    # The dominated copy of the same model in the first run is off the latency front.
    first = next(line for line in md.splitlines() if line.startswith("| run | model.int8.onnx"))
    assert "latency" not in first.split("|")[-2]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "no such folder"),
        ("no report", "no report.json (not a finished compress run)"),
        ("corrupt", "not a readable report"),
        ("not a report", "not a compress report (missing"),
        ("nested field missing", "missing recipe.benchmark.batch_sizes"),
    ],
)
def test_report_errors_are_one_line(case, needle, tmp_path, capsys):
    target = tmp_path / "run"
    if case != "missing":
        target.mkdir()
    if case == "corrupt":
        (target / "report.json").write_text("{not json")
    if case == "not a report":
        (target / "report.json").write_text('{"artifacts": []}')
    if case == "nested field missing":
        env = {"cpu": "x", "threads": 1, "torch": "2", "onnxruntime": "1"}
        doc = {"recipe": {"name": "x"}, "environment": env, "data": {"test_images": 1}, "artifacts": [], "finished": ""}
        (target / "report.json").write_text(json.dumps(doc))
    code = main(["report", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert needle in err
    assert not (target / "report.md").exists()
    out = tmp_path / "elsewhere"
    assert main(["report", str(target), str(target), "--out", str(out)]) == 2
    assert not out.exists()  # nothing half-written


# One source, two renderings ------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Headings (level, text), tables (rows of cell text) with their wrapper's style, list items, CSS."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[tuple[int, str]] = []
        self.tables: list[list[list[str]]] = []
        self.wrappers: list[dict[str, str]] = []  # the attributes of the element enclosing each table
        self.items: list[str] = []
        self.css = ""
        self._open: list[tuple[str, dict[str, str]]] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        if tag == "table":
            self.wrappers.append(self._open[-1][1] if self._open and self._open[-1][0] == "div" else {})
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        if tag in ("td", "th", "li", "style") or re.fullmatch(r"h[1-6]", tag):
            self._text = []
        self._open.append((tag, attrs))

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass
        if self._text is None:
            return
        text = "".join(self._text)
        if tag in ("td", "th"):
            self.tables[-1][-1].append(text)
        elif tag == "li":
            self.items.append(text)
        elif tag == "style":
            self.css += text
        elif re.fullmatch(r"h[1-6]", tag):
            self.headings.append((int(tag[1]), text))
        else:
            return
        self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def _page(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _md_words(cell: str) -> str:
    """A Markdown cell or item as the words a reader sees: no code ticks or emphasis stars, '|' unescaped."""
    return re.sub(r"`+|\*", "", cell).replace("\\|", "|").strip()


def _md_structure(md: str) -> tuple[list[tuple[int, str]], list[list[list[str]]], list[str]]:
    headings, tables, items, in_table = [], [], [], False
    for line in md.splitlines():
        if m := re.match(r"(#+) (.*)", line):
            headings.append((len(m[1]), m[2]))
        if line.startswith("|"):
            if not in_table:
                tables.append([])
            in_table = True
            if not re.fullmatch(r"\|(---\|)+", line):
                cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
                tables[-1].append([_md_words(c) for c in cells])
        else:
            in_table = False
        if line.startswith("- "):
            items.append(_md_words(line[2:]))
    return headings, tables, items


def _comparison(digits_run, tmp_path: Path) -> Path:
    out, _, _ = digits_run
    other = tmp_path / "again"
    shutil.copytree(out, other)
    dest = tmp_path / "cmp"
    assert main(["report", str(out), str(other), "--out", str(dest)]) == 0
    return dest


def test_html_has_every_section_table_and_note_of_the_markdown(digits_run, tmp_path, capsys):
    out, _, _ = digits_run
    for folder, expected in (
        (out, {(2, t) for t in ("Plots", "Latency", "Deploy", "Stages", "Notes")}),
        (_comparison(digits_run, tmp_path), {(2, "run"), (2, "again"), (3, "Deploy"), (3, "Stages")}),
    ):
        md_headings, md_tables, md_items = _md_structure((folder / "report.md").read_text())
        page = _page((folder / "report.html").read_text())
        assert expected <= set(md_headings), md_headings  # the sections this run has, so the test means something
        assert page.headings == md_headings  # the same sections, same levels, same order
        assert page.tables == md_tables  # every table, cell for cell
        assert [_md_words(i) for i in page.items] == md_items and md_items  # Deploy's files and the notes
    capsys.readouterr()


def test_html_tables_scroll_sideways_instead_of_overflowing(digits_run):
    out, _, _ = digits_run
    page = _page((out / "report.html").read_text())
    assert len(page.tables) >= 3 and len(page.tables[0][0]) > 12  # the wide summary table is there
    for wrapper in page.wrappers:
        assert "overflow-x:auto" in wrapper.get("style", "").replace(" ", ""), wrapper
        assert "table-wrap" in wrapper.get("class", "").split()
    rule = re.search(r"\.table-wrap\s*\{([^}]*)\}", page.css)
    assert rule and "overflow-x: auto" in rule[1]
    width = re.search(r"body\s*\{[^}]*max-width:\s*(\d+)px", page.css)
    assert width and int(width[1]) <= 1200  # the page itself fits a 1200-px window


def test_the_report_and_html_modules_do_not_import_each_other():
    """document <- html <- report: the renderers import the document model, never the report writer."""
    import compress.bench.document as document
    import compress.bench.html as html_mod

    for module, forbidden in ((html_mod, {"compress.bench.report"}), (document, {"compress"})):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if any(m == f or m.startswith(f + ".") for f in forbidden)}, module


# Plots ------------------------------------------------------------------------------------------------------


def _runs(report: dict, n: int, recipes: list[str], shift: float = 0.0) -> list[dict]:
    """n copies of a real report, labelled a, b, ...; each shifted by `shift` (relative cost, top-1 points)."""
    runs = []
    for k in range(n):
        rep = copy.deepcopy(report)
        rep["label"], rep["recipe"]["name"] = "abcdefgh"[k], recipes[k % len(recipes)]
        for art in rep["artifacts"]:
            art["accuracy"] -= shift * k / 100
            art["size_bytes"] *= (1 + shift) ** k
            for row in art["latency"]:
                row["p50_ms"] *= (1 + shift) ** k
        runs.append(rep)
    return runs


@pytest.mark.parametrize("axis", ["latency", "size"])
def test_plot_titles_name_the_recipe_not_the_folder(digits_run, axis):
    _, report, _ = digits_run
    assert report["label"] == "run" and report["recipe"]["name"] == "deploy"
    title = scatter_figure([report], axis).axes[0].get_title()
    assert title.endswith("— deploy") and "run" not in title.split("—")[1]
    title = scatter_figure(_runs(report, 2, ["deploy", "tuned"]), axis).axes[0].get_title()
    assert "deploy" in title and "tuned" in title and "2 runs" in title
    fig = scatter_figure(_runs(report, 3, ["deploy"]), axis)
    assert fig.axes[0].get_title().endswith("3 runs of deploy")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"[1] a (deploy)", "[2] b (deploy)", "[3] c (deploy)"} <= set(legend)  # which run is which


def _label_boxes(fig):
    """The drawn extent of every point label's text, the axes and every marker, in display pixels."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_gid() == LABEL_GID]
    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text alone, not its leader line
    markers = []
    for coll in ax.collections:
        r = (coll.get_sizes()[0] ** 0.5) / 2 * fig.dpi / 72
        for x, y in coll.get_offset_transform().transform(coll.get_offsets()):
            markers.append((x - r, y - r, x + r, y + r))
    return labels, boxes, ax.get_window_extent(renderer), markers


def _overlap(a, b) -> float:
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


@pytest.mark.parametrize("axis", ["latency", "size"])
@pytest.mark.parametrize(
    "runs, shift",
    [(2, 0.0), (2, 0.03), (4, 0.04)],
    ids=["two runs coincide", "two runs a marker apart", "four runs side by side"],
)
def test_point_labels_never_print_over_each_other(digits_run, axis, runs, shift):
    _, report, _ = digits_run
    reps = _runs(report, runs, ["deploy", "tuned"], shift)
    fig = scatter_figure(reps, axis)
    labels, boxes, frame, markers = _label_boxes(fig)
    extents = [(b.x0, b.y0, b.x1, b.y1) for b in boxes]
    for i, a in enumerate(extents):
        assert frame.x0 <= a[0] and a[2] <= frame.x1 and frame.y0 <= a[1] and a[3] <= frame.y1, labels[i]
        for j, b in enumerate(extents[:i]):
            assert _overlap(a, b) == 0, (labels[i].get_text(), labels[j].get_text())
        for m in markers:
            assert _overlap(a, m) == 0, labels[i].get_text()
    # Every artifact of every run is named, with its run's number (a marker on top hides the one below).
    named = {line for t in labels for line in t.get_text().splitlines()}
    plotted = [p["name"] for p in points([report], axis)]
    for k in range(runs):
        for name in plotted:
            assert any(line.startswith(name + " [") and str(k + 1) in line.split("[")[1] for line in named)
    if shift == 0:  # coinciding points share one label that names both runs
        assert all(line.endswith("[1, 2]") for line in named) and len(labels) < len(plotted) * runs


def test_report_render_uses_the_recipe_titled_plots(digits_run, tmp_path):
    """The PNGs report.render writes are these figures (same size), so the titles above reach the files."""
    _, report, _ = digits_run
    written = report_mod.render(tmp_path, [report])
    png = Image.open(tmp_path / "accuracy_vs_size.png")
    fig = scatter_figure([report], "size")
    assert png.size == tuple(round(v) for v in fig.get_size_inches() * fig.dpi)
    assert tmp_path / "report.html" in written and tmp_path / "report.md" in written
