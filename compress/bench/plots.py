"""Accuracy-vs-latency and accuracy-vs-size scatter plots with the Pareto front, across runs.

One point per artifact; colour = run, marker = format/precision. The Pareto front is the set of
artifacts that no other artifact beats on both axes (at least as accurate *and* at most as costly,
strictly better on one): the models worth choosing between.

Titles name the recipe (a comparison, its recipes). Every point is labelled with its artifact's name
(in a comparison followed by its run's number, [1], [2], ... as the legend lists them); points drawn on
top of each other share one label, and labels are placed in pixels so that none covers another, a
marker or a leader line (tests/test_report.py measures the drawn text to check).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

MARKERS = {("torch", "fp32"): "o", ("onnx", "fp32"): "s", ("onnx", "int8"): "D", ("onnx", "fp16"): "^"}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (cost, accuracy) points, ordered by increasing cost.

    Lower cost and higher accuracy are better. Exact duplicates are all kept (neither dominates).
    """
    front = []
    for i, (cost, acc) in enumerate(points):
        dominated = any((c <= cost and a >= acc) and (c < cost or a > acc) for j, (c, a) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def cpu_p50(art: dict[str, Any], batch_size: int) -> float | None:
    """The same latency the tables show: the first CPU row at this batch size (first thread count/runtime)."""
    return next(
        (r["p50_ms"] for r in art.get("latency", []) if r["device"] == "cpu" and r["batch_size"] == batch_size),
        None,
    )


def common_batch_size(reports: Sequence[dict[str, Any]]) -> int | None:
    """The smallest batch size every run timed on CPU (latencies are only comparable at one batch size)."""
    sets = [
        {r["batch_size"] for a in rep["artifacts"] for r in a.get("latency", []) if r["device"] == "cpu"}
        for rep in reports
    ]
    common = set.intersection(*sets) if sets else set()
    return min(common) if common else None


def points(reports: Sequence[dict[str, Any]], axis: str) -> list[dict[str, Any]]:
    """One dict per artifact that has the axis value: run (label), recipe, name, format, precision, x, accuracy."""
    bs = common_batch_size(reports) if axis == "latency" else None
    out = []
    for rep in reports:
        for art in rep["artifacts"]:
            x = cpu_p50(art, bs) if axis == "latency" and bs is not None else art.get("size_bytes")
            if axis == "latency" and bs is None:
                x = None
            if x is None or art.get("accuracy") is None:
                continue
            out.append(
                {
                    "run": rep.get("label") or rep["recipe"]["name"],
                    "recipe": rep["recipe"]["name"],
                    "name": art["name"],
                    "format": art["format"],
                    "precision": art["precision"],
                    "x": float(x),
                    "accuracy": float(art["accuracy"]),
                }
            )
    return out


def _decimal_bytes(v: float) -> str:
    """Tick labels at 1-2-5 decades read best in decimal units: 20 kB, 50 kB, 1 MB."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= div:
            return f"{v / div:g} {unit}"
    return f"{v:g} B"


def front_names(reports: Sequence[dict[str, Any]], axis: str) -> set[tuple[str, str]]:
    """(run label, artifact name) of the artifacts on the Pareto front of accuracy vs ``axis``."""
    pts = points(reports, axis)
    return {(pts[i]["run"], pts[i]["name"]) for i in pareto_front([(p["x"], p["accuracy"]) for p in pts])}


FIGSIZE, DPI = (9.0, 4.8), 110
MARKER_AREA = 55  # scatter size, points²
LABEL_GID = "point-label"  # the artist gid of each point label (tests find them by it)
LABEL_FONTSIZE = 7
# Candidate label positions, tried in order: around the point, then further out (with a leader line).
ANGLES = (45, -45, 135, -135, 0, 180, 90, -90, 22.5, -22.5, 157.5, -157.5, 67.5, -67.5, 112.5, -112.5)
RADII_PX = (12, 18, 24, 34, 46, 60, 78, 100, 130, 170, 220)
LEADER_FROM_PX = 20  # labels further than this from their point get a thin line to it


def plot_title(reports: Sequence[dict[str, Any]], axis: str) -> str:
    """'accuracy vs latency — quickstart'; a comparison names its recipes (or says all ran one recipe)."""
    what = "accuracy vs latency" if axis == "latency" else "accuracy vs size"
    recipes = list(dict.fromkeys(rep["recipe"]["name"] for rep in reports))
    if len(reports) == 1:
        return f"{what} — {recipes[0]}"
    if len(recipes) == 1:
        return f"{what} — {len(reports)} runs of {recipes[0]}"
    more = f" and {len(recipes) - 3} more" if len(recipes) > 3 else ""
    return f"{what} — {len(reports)} runs: {' vs '.join(recipes[:3])}{more}"


def _run_names(reports: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """The runs in order (by label, as points() names them) and each one's legend entry."""
    runs, legend = [], {}
    for rep in reports:
        label, recipe = rep.get("label") or rep["recipe"]["name"], rep["recipe"]["name"]
        if label not in legend:
            runs.append(label)
            legend[label] = f"[{len(runs)}] {label}" + (f" ({recipe})" if recipe != label else "")
    return runs, legend


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels
XY = tuple[float, float]


class _Spot(NamedTuple):
    radius: float
    offset: XY  # from the point, pixels
    ha: str
    va: str
    box: Box  # the label's extent there (a pixel of air included)


def _overlap(a: Box, b: Box) -> float:
    """Area two boxes share (0 if they only touch or are apart)."""
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box: Box, frame: Box) -> float:
    """How much of the box lies outside the frame, as an area."""
    return (box[2] - box[0]) * (box[3] - box[1]) - _overlap(box, frame)


def _gap(p: XY, box: Box) -> float:
    """Distance from a point to a box (0 inside it)."""
    return math.hypot(max(box[0] - p[0], 0, p[0] - box[2]), max(box[1] - p[1], 0, p[1] - box[3]))


def _hits(p: XY, q: XY, box: Box) -> bool:
    """Whether the segment p-q passes through the box (Liang-Barsky clipping)."""
    (x, y), dx, dy = p, q[0] - p[0], q[1] - p[1]
    t0, t1 = 0.0, 1.0
    for pk, qk in ((-dx, x - box[0]), (dx, box[2] - x), (-dy, y - box[1]), (dy, box[3] - y)):
        if pk == 0:
            if qk < 0:
                return False
            continue
        t = qk / pk
        t0, t1 = (max(t0, t), t1) if pk < 0 else (t0, min(t1, t))
        if t0 > t1:
            return False
    return True


def _crosses(a: XY, b: XY, c: XY, d: XY) -> bool:
    """Whether segments a-b and c-d cross (properly, not just touch)."""

    def turn(p: XY, q: XY, r: XY) -> float:
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    return turn(c, d, a) * turn(c, d, b) < 0 and turn(a, b, c) * turn(a, b, d) < 0


def _leader(box: Box, point: XY, shrink: float) -> tuple[XY, XY]:
    """The line matplotlib draws from a label to its point: from the corner or edge middle of the text
    nearest the point, stopping `shrink` pixels short of it."""
    start = (
        min((box[0], (box[0] + box[2]) / 2, box[2]), key=lambda v: abs(v - point[0])),
        min((box[1], (box[1] + box[3]) / 2, box[3]), key=lambda v: abs(v - point[1])),
    )
    length = math.dist(start, point) or 1.0
    k = max(0.0, 1 - shrink / length)
    return start, (start[0] + (point[0] - start[0]) * k, start[1] + (point[1] - start[1]) * k)


def _spots(x: float, y: float, w: float, h: float) -> Iterator[_Spot]:
    """Label spots around a point at (x, y) pixels, nearest first."""
    for r in RADII_PX:
        for angle in ANGLES:
            c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            ha = "left" if c > 0.2 else "right" if c < -0.2 else "center"
            va = "bottom" if s > 0.2 else "top" if s < -0.2 else "center"
            tx, ty = x + r * c, y + r * s
            x0 = tx - 1 if ha == "left" else tx - w + 1 if ha == "right" else tx - w / 2
            y0 = ty - 1 if va == "bottom" else ty - h + 1 if va == "top" else ty - h / 2
            yield _Spot(r, (r * c, r * s), ha, va, (x0, y0, x0 + w, y0 + h))


class _Layout:
    """What a new label must keep clear of, in display pixels: the axes frame, every marker, the labels
    and leader lines placed so far; and the dashed Pareto line, which a label near its point avoids."""

    def __init__(self, frame: Box, anchors: list[XY], marker_r: float, front_line: list[tuple[XY, XY]]) -> None:
        self.frame, self.anchors, self.marker_r, self.front_line = frame, anchors, marker_r, front_line
        self.markers = [(x - marker_r, y - marker_r, x + marker_r, y + marker_r) for x, y in anchors]
        self.boxes: list[Box] = []
        self.leaders: list[tuple[XY, XY]] = []

    def _free(self, spot: _Spot, own: XY, others: list[int]) -> bool:
        """Inside the axes, over no marker, label or leader; a far spot's leader crosses none of them either."""
        box = spot.box
        if _outside(box, self.frame) > 0 or any(_overlap(box, o) for o in self.boxes + self.markers):
            return False
        if any(_hits(*seg, box) for seg in self.leaders):
            return False
        if spot.radius < LEADER_FROM_PX:
            return True
        seg = _leader(box, own, self.marker_r)
        obstacles = self.boxes + [self.markers[j] for j in others]
        return not any(_hits(*seg, o) for o in obstacles) and not any(_crosses(*seg, *o) for o in self.leaders)

    def _clear(self, spot: _Spot, own: XY, others: list[int]) -> bool:
        """Every other point is clearly further from the label than its own, by half a marker (unless a
        leader line says whose it is)."""
        mine = _gap(own, spot.box) + self.marker_r / 2
        return spot.radius >= LEADER_FROM_PX or all(_gap(self.anchors[j], spot.box) > mine for j in others)

    def _clash(self, spot: _Spot) -> float:
        return sum(_overlap(spot.box, o) for o in self.boxes + self.markers) + 10 * _outside(spot.box, self.frame)

    def place(self, group: list[int], w: float, h: float) -> _Spot:
        """The spot for a w x h label of the points in `group` (drawn at its first point), now taken."""
        own = self.anchors[group[0]]
        others = [j for j in range(len(self.anchors)) if j not in group]
        spots = list(_spots(*own, w, h))
        ok = [spot for spot in spots if self._free(spot, own, others)]
        near = [
            spot
            for spot in ok
            if spot.radius <= 24
            and self._clear(spot, own, others)
            and not any(_hits(*seg, spot.box) for seg in self.front_line)
        ]
        spot = (near or [sp for sp in ok if self._clear(sp, own, others)] or ok or [min(spots, key=self._clash)])[0]
        if spot.radius >= LEADER_FROM_PX:
            self.leaders.append(_leader(spot.box, own, self.marker_r))
        self.boxes.append(spot.box)
        return spot


def _place_labels(fig: Any, ax: Any, pts: list[dict[str, Any]], runs: list[str], front: list[int]) -> list[Any]:
    """One label per group of points drawn on top of each other, each where it overlaps no other label,
    no marker and no leader line, inside the axes: the first free spot among candidates around its point,
    moving outwards; a label further out gets a thin leader line to its point (one that crosses no label,
    marker or other leader). Near its point, a spot closer to its own point than to any other and off the
    dashed Pareto line is preferred. Layout and axis limits must be final before this is called.

    A group's label names each of its artifacts; in a comparison each name carries the numbers of the runs
    it comes from (the legend says which run is which), as a marker on top hides the ones below it."""
    renderer = fig.canvas.get_renderer()
    xy = ax.transData.transform([(p["x"], 100 * p["accuracy"]) for p in pts])
    anchors: list[XY] = [(float(x), float(y)) for x, y in xy]
    marker_r = math.sqrt(MARKER_AREA) / 2 * fig.dpi / 72 + 1.5  # radius in pixels, edge line included
    groups: list[list[int]] = []
    for i, here in enumerate(anchors):
        near = next((g for g in groups if math.dist(anchors[g[0]], here) < marker_r * 1.6), None)
        if near is None:
            groups.append([i])
        else:
            near.append(i)
    corners = [anchors[i] for i in front]  # the dashed front, drawn as steps 'post'
    front_line = [(a, (b[0], a[1])) for a, b in zip(corners, corners[1:], strict=False)]
    front_line += [((b[0], a[1]), b) for a, b in zip(corners, corners[1:], strict=False)]
    ex = ax.get_window_extent(renderer)
    layout = _Layout((ex.x0 + 2, ex.y0 + 2, ex.x1 - 2, ex.y1 - 2), anchors, marker_r, front_line)
    to_points = 72 / fig.dpi
    leader = {"arrowstyle": "-", "color": "0.45", "linewidth": 0.6, "shrinkA": 0, "shrinkB": marker_r * to_points}
    labels = []
    for group in sorted(groups, key=lambda g: anchors[g[0]]):
        names: dict[str, list[int]] = {}
        for i in group:
            names.setdefault(pts[i]["name"], []).append(runs.index(pts[i]["run"]) + 1)
        text = "\n".join(
            name + (f" [{', '.join(map(str, sorted(set(nums))))}]" if len(runs) > 1 else "")
            for name, nums in names.items()
        )
        probe = ax.text(0, 0, text, fontsize=LABEL_FONTSIZE, transform=None)
        size = probe.get_window_extent(renderer)
        probe.remove()
        spot = layout.place(group, size.width + 2, size.height + 2)  # a pixel of air around the text
        p = pts[group[0]]
        labels.append(
            ax.annotate(
                text,
                (p["x"], 100 * p["accuracy"]),
                xytext=(spot.offset[0] * to_points, spot.offset[1] * to_points),
                textcoords="offset points",
                ha=spot.ha,
                va=spot.va,
                fontsize=LABEL_FONTSIZE,
                zorder=4,
                arrowprops=leader if spot.radius >= LEADER_FROM_PX else None,
                annotation_clip=False,
                gid=LABEL_GID,
            )
        )
    return labels


def scatter_figure(reports: Sequence[dict[str, Any]], axis: str) -> Any:
    """The matplotlib Figure of accuracy against CPU p50 latency or file size; None if nothing to plot.

    Drawn without pyplot (no global state, any backend): colour = run, marker = format/precision, the
    Pareto front dashed, every point labelled without labels printing over each other, the legend
    outside the axes so that it covers no point or label."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    pts = points(reports, axis)
    if not pts:
        return None
    runs, run_legend = _run_names(reports)
    colours = colormaps["tab10"]
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for p in pts:
        ax.scatter(
            p["x"],
            100 * p["accuracy"],
            s=MARKER_AREA,
            marker=MARKERS.get((p["format"], p["precision"]), "v"),
            color=colours(runs.index(p["run"]) % 10),
            edgecolors="black",
            linewidths=0.5,
            zorder=3,
        )
    front = pareto_front([(p["x"], p["accuracy"]) for p in pts])
    ax.step(
        [pts[i]["x"] for i in front],
        [100 * pts[i]["accuracy"] for i in front],
        where="post",
        color="crimson",
        linewidth=1.2,
        linestyle="--",
        zorder=2,
    )
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.1)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    fmt = (lambda v, _: f"{v:g}") if axis == "latency" else (lambda v, _: _decimal_bytes(v))
    ax.xaxis.set_major_formatter(FuncFormatter(fmt))
    if axis == "latency":
        ax.set_xlabel(f"CPU p50 latency, ms (batch {common_batch_size(reports)}, log scale)")
    else:
        ax.set_xlabel("file size (log scale)")
    ax.set_ylabel("top-1, %")
    ax.set_title(plot_title(reports, axis))
    ax.grid(True, which="both", alpha=0.3)
    handles = [
        Line2D([], [], marker=m, linestyle="", color="grey", markeredgecolor="black", label=f"{f} {pr}")
        for (f, pr), m in MARKERS.items()
        if any((p["format"], p["precision"]) == (f, pr) for p in pts)
    ]
    if len(runs) > 1:
        handles += [
            Line2D([], [], marker="o", linestyle="", color=colours(i % 10), label=run_legend[r])
            for i, r in enumerate(runs)
        ]
    handles.append(Line2D([], [], color="crimson", linestyle="--", label="Pareto front"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_xlim(ax.get_xlim())  # freeze the limits: label placement works in pixels
    ax.set_ylim(ax.get_ylim())
    fig.tight_layout()
    _place_labels(fig, ax, pts, runs, front)
    return fig


def scatter_png(reports: Sequence[dict[str, Any]], axis: str) -> bytes | None:
    """A PNG (bytes) of accuracy against CPU p50 latency or file size; None if nothing to plot."""
    fig = scatter_figure(reports, axis)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()
