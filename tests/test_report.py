"""`compress report` and the rendered report: Pareto fronts, plots, self-contained HTML, comparisons."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from compress.bench.plots import cpu_p50, pareto_front
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
    assert page.h2 == ["run", "faster"] and len(page.images) == 2
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
