"""Accuracy-vs-latency and accuracy-vs-size scatter plots with the Pareto front, across runs.

One point per artifact; colour = run, marker = format/precision. The Pareto front is the set of
artifacts that no other artifact beats on both axes (at least as accurate *and* at most as costly,
strictly better on one): the models worth choosing between.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

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
    """One dict per artifact that has the axis value: run, name, format, precision, x, accuracy."""
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


def scatter_png(reports: Sequence[dict[str, Any]], axis: str) -> bytes | None:
    """A PNG (bytes) of accuracy against CPU p50 latency or file size; None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    pts = points(reports, axis)
    if not pts:
        return None
    runs = list(dict.fromkeys(p["run"] for p in pts))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    labels: dict[tuple[float, float], list[str]] = {}
    for p in pts:
        ax.scatter(
            p["x"],
            100 * p["accuracy"],
            s=55,
            marker=MARKERS.get((p["format"], p["precision"]), "v"),
            color=colours(runs.index(p["run"]) % 10),
            edgecolors="black",
            linewidths=0.5,
            zorder=3,
        )
        # Points that sit on top of each other (a torch model and its ONNX file) share one label.
        here = (math.log10(p["x"]), 100 * p["accuracy"])
        key = next((k for k in labels if abs(k[0] - here[0]) < 0.04 and abs(k[1] - here[1]) < 0.05), here)
        if p["name"] not in labels.setdefault(key, []):  # the colour says which run
            labels[key].append(p["name"])
    for i, ((logx, acc), names) in enumerate(sorted(labels.items())):
        # Alternate above/below so neighbouring labels do not print over each other.
        offset = (4, 4) if i % 2 == 0 else (4, -11)
        ax.annotate(" / ".join(names), (10**logx, acc), fontsize=7, xytext=offset, textcoords="offset points")
    front = pareto_front([(p["x"], p["accuracy"]) for p in pts])
    ax.step(
        [pts[i]["x"] for i in front],
        [100 * pts[i]["accuracy"] for i in front],
        where="post",
        color="crimson",
        linewidth=1.2,
        linestyle="--",
        zorder=2,
        label="Pareto front",
    )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    fmt = (lambda v, _: f"{v:g}") if axis == "latency" else (lambda v, _: _decimal_bytes(v))
    ax.xaxis.set_major_formatter(FuncFormatter(fmt))
    if axis == "latency":
        ax.set_xlabel(f"CPU p50 latency, ms (batch {common_batch_size(reports)}, log scale)")
        title = "accuracy vs latency"
    else:
        ax.set_xlabel("file size (log scale)")
        title = "accuracy vs size"
    ax.set_ylabel("top-1, %")
    ax.set_title(title + (f" — {runs[0]}" if len(runs) == 1 else f" — {len(runs)} runs"))
    ax.grid(True, which="both", alpha=0.3)
    handles = [
        plt.Line2D([], [], marker=m, linestyle="", color="grey", markeredgecolor="black", label=f"{f} {pr}")
        for (f, pr), m in MARKERS.items()
        if any((p["format"], p["precision"]) == (f, pr) for p in pts)
    ]
    handles += [
        plt.Line2D([], [], marker="o", linestyle="", color=colours(i % 10), label=r) for i, r in enumerate(runs)
    ] if len(runs) > 1 else []  # fmt: skip
    handles.append(plt.Line2D([], [], color="crimson", linestyle="--", label="Pareto front"))
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
