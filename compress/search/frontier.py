"""Which candidates are worth training, which one wins, and the plot that shows why.

A row is one (architecture, precision) pair with its measured latency, size and MACs, a proxy top-1
(after re-estimating BatchNorm, no training: cheap, and ranks candidates well enough to pick which
to train) and, for the few trained briefly, an estimated top-1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

LIMITS = ("latency_ms", "size_bytes", "macs")


def fits(row: dict[str, Any], budget: dict[str, float]) -> bool:
    """Within every limit; a row measured beside a reference file (``latency_of``) carries its own."""
    return all(row[k] is not None and row[k] <= row.get(f"{k}_budget", v) for k, v in budget.items())


def pareto(rows: list[dict[str, Any]], score: str, cost: str = "latency_ms") -> list[dict[str, Any]]:
    """Rows no other row beats on both ``cost`` (lower) and ``score`` (higher), cheapest first."""
    ranked = sorted((r for r in rows if r.get(score) is not None), key=lambda r: (r[cost], -r[score]))
    out, best = [], float("-inf")
    for row in ranked:
        if row[score] > best:
            out.append(row)
            best = row[score]
    return out


def to_train(rows: list[dict[str, Any]], budget: dict[str, float], floor: float | None, n: int) -> list[dict[str, Any]]:
    """The ``n`` candidates to fine-tune briefly: with a hard budget, the proxy frontier inside it,
    most accurate first (the winner is among them); with only an accuracy floor, the proxy frontier
    spread over latency (the fastest that holds the floor is the answer)."""
    inside = [r for r in rows if fits(r, budget)]
    front = pareto(inside, "proxy_acc")
    if budget:
        chosen = sorted(front, key=lambda r: -r["proxy_acc"])[:n]
        if len(chosen) < n:  # fill from the rest of the budget, best proxy first
            rest = sorted((r for r in inside if r not in chosen), key=lambda r: -r["proxy_acc"])
            chosen += rest[: n - len(chosen)]
        return chosen
    if floor is not None:
        front = [r for r in front if r["proxy_acc"] >= floor - 0.05] or front
    if len(front) <= n:
        return front
    step = (len(front) - 1) / max(1, n - 1)
    return [front[round(i * step)] for i in range(n)]


def confirmed(
    pool: list[dict[str, Any]],
    pick: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    confirm: Callable[[dict[str, Any]], dict[str, Any]],
    budget: dict[str, float],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``pick(pool)``'s rows, each with ``confirmed`` (``confirm``: its deployable file's measurements)
    inside the budget, and the rows that missed. A pick the probe timed optimistically (another
    exporter, a moment the machine ran fast) leaves the pool and ``pick`` chooses again from the rest."""
    missed = []
    while True:
        picks = []
        for row in pick(pool):
            measured = confirm(row)
            if not fits(measured, budget):
                missed.append({**row, "confirmed": measured})
                pool = [r for r in pool if r is not row]
                break
            picks.append({**row, "confirmed": measured})
        else:
            return picks, missed


def shortlist(
    rows: list[dict[str, Any]],
    budget: dict[str, float],
    floor: float | None,
    n: int,
    confirm: Callable[[dict[str, Any]], dict[str, Any]] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``to_train``'s picks, each confirmed inside the budget by ``confirm`` before any is trained (no
    trial is spent on a model the budget then refuses), and the rows that missed."""
    if confirm is None:
        return to_train(rows, budget, floor, n), []
    return confirmed(rows, lambda pool: to_train(pool, budget, floor, n), confirm, budget)


def choose(trained: list[dict[str, Any]], budget: dict[str, float], floor: float | None) -> tuple[dict | None, str]:
    """The winner among the trained rows, and one sentence saying why."""
    inside = [r for r in trained if fits(r, budget)]
    if not inside:
        return None, "no trained candidate meets the budget"
    if budget:
        best = max(inside, key=lambda r: (r["estimated_acc"], -r["latency_ms"]))  # a tie goes to the faster
        if floor is not None and best["estimated_acc"] < floor:
            return best, (
                f"the most accurate candidate within the budget estimates {100 * best['estimated_acc']:.2f}% top-1, "
                f"below the floor {100 * floor:.2f}% (max_accuracy_drop): loosen one of them"
            )
        return best, "the most accurate trained candidate within the budget"
    ok = [r for r in inside if floor is None or r["estimated_acc"] >= floor]
    if not ok:
        best = max(inside, key=lambda r: (r["estimated_acc"], -r["latency_ms"]))
        return best, f"no trained candidate holds top-1 ≥ {100 * floor:.2f}%; the most accurate is shown"
    return min(ok, key=lambda r: r["latency_ms"]), "the fastest trained candidate that holds the accuracy floor"


def plot(
    rows: list[dict[str, Any]], chosen: dict[str, Any] | None, target: Any, path: Path, title: str, scored_on: str
) -> None:
    """Every candidate's measured latency against its proxy top-1 (and the trained ones' estimate) on
    ``scored_on``, the budget as a line, the chosen one marked. Against a reference file
    (``latency_of``) each candidate stands at its paired ratio to that file times the file's median
    time: candidates timed minutes apart, while the machine's speed drifted, still compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = getattr(target, "latency_ms", None)
    refs = [r["latency_ms_budget"] for r in rows if r.get("latency_ms_budget") is not None]
    paired = budget is None and bool(refs)
    if paired:  # latency_of: the reference's median time; each row placed by its paired ratio to it
        budget = sorted(refs)[len(refs) // 2]

    def x(r: dict[str, Any]) -> float:
        if paired and r.get("latency_ms_budget"):
            return r["latency_ms"] / r["latency_ms_budget"] * budget
        return r["latency_ms"]

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for precision, marker in (("fp32", "o"), ("int8", "s")):
        mine = [r for r in rows if r["precision"] == precision and r.get("proxy_acc") is not None]
        if mine:
            ax.scatter([x(r) for r in mine], [100 * r["proxy_acc"] for r in mine], s=14, marker=marker,
                       alpha=0.45, label=f"{precision}: proxy top-1 (BN re-estimated, untrained)")  # fmt: skip
    trained = [r for r in rows if r.get("estimated_acc") is not None]
    if trained:
        ax.scatter([x(r) for r in trained], [100 * r["estimated_acc"] for r in trained], s=36,
                   marker="D", color="tab:green", label="short KD fine-tune: top-1 (one per precision)")  # fmt: skip
    reference = [r for r in rows if "reference" in r.get("label", "") and r.get("estimated_acc") is not None]
    for r in reference:
        ax.scatter([x(r)], [100 * r["estimated_acc"]], s=90, facecolors="none", edgecolors="0.2",
                   label=f"reference: {r['label']} ({r['precision']})")  # fmt: skip
    if chosen is not None:
        y = chosen.get("estimated_acc") or chosen.get("proxy_acc") or 0
        at = x(chosen.get("confirmed") or chosen)
        ax.scatter([at], [100 * y], s=220, marker="*", color="tab:red", zorder=5,
                   label=f"chosen: {at:.3f} ms (deployable file), {chosen['precision']}")  # fmt: skip
    if budget is not None:
        ax.axvline(budget, color="tab:red", lw=1, ls="--", label=f"budget {budget:.3g} ms")
    where = f"batch {target.batch_size}, {target.threads} thread(s), {target.runtime}"
    if paired:
        ref = Path(target.latency_of).name
        ax.set_xlabel(f"p50 (ms) = paired ratio to {ref} × its median p50; {where}", fontsize=9)
    else:
        ax.set_xlabel(f"measured p50 latency (ms), {where}")
    ax.set_ylabel(f"top-1 (%) on {scored_on}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
