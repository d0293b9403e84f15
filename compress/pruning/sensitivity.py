"""Per-layer pruning sensitivity: prune one dependency group at a time at each ratio of a sweep,
measure top-1, and (optionally) derive per-layer ratios that meet a MACs target while keeping the
accuracy drop of every layer under one common threshold (the layer-wise heuristic of Distiller
and Han et al., with torch-pruning groups instead of single layers, so residual-coupled convs are
pruned together as they must be).

``compress analyze sensitivity RECIPE`` writes sensitivity.json and sensitivity.png; the derived
``ratios`` can be pasted into a prune stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.data import TensorLoader
from compress.errors import CompressError
from compress.pruning.structured import StructuredOptions, count, group_roots, pruned_copy
from compress.training import evaluate


def _only(opts: StructuredOptions, name: str, ratio: float) -> StructuredOptions:
    """Options that prune exactly the group rooted at ``name`` by ``ratio`` (the rest: 0)."""
    return opts.model_copy(update={"ratios": {name: ratio}, "global_pruning": False})


def sweep(
    model: nn.Module,
    example: torch.Tensor,
    loader: TensorLoader,
    device: torch.device,
    opts: StructuredOptions,
    ratios: list[float],
    num_classes: int,
    progress: Any = None,
) -> dict[str, Any]:
    """{"base_acc", "macs", "ratios", "layers": {name: {"acc": [...], "macs": [...]}}}."""
    model = model.eval()
    base = evaluate(model, loader, device)
    macs0, _ = count(model, example)
    layers: dict[str, dict[str, list[float]]] = {}
    roots = group_roots(model, example, opts, num_classes)
    if not roots:
        raise CompressError("sensitivity: no prunable layer group is left (is everything in ignore?)")
    task = progress.add_task("sensitivity", total=len(roots) * len(ratios), info="") if progress else None
    for name in roots:
        acc, macs = [], []
        for r in ratios:
            twin = pruned_copy(model, example, _only(opts, name, r), 0.0, num_classes)
            acc.append(evaluate(twin, loader, device))
            macs.append(count(twin, example)[0] / macs0)
            if progress:
                progress.advance(task)
                progress.update(task, info=f"{name} @ {r:.2f}: {acc[-1]:.3f}")
        layers[name] = {"acc": acc, "macs_kept": macs}
    return {"base_acc": base, "macs": macs0, "ratios": list(ratios), "layers": layers}


def derive(
    model: nn.Module,
    example: torch.Tensor,
    opts: StructuredOptions,
    result: dict[str, Any],
    target_macs: float,
    num_classes: int,
) -> dict[str, Any]:
    """Per-layer ratios for a MACs target: each group takes the largest swept ratio whose accuracy
    drop is at most a threshold δ; δ is the smallest (bisected over the measured drops) whose
    joint pruning keeps at most ``target_macs`` of the MACs."""
    base, macs0 = result["base_acc"], result["macs"]
    drops = sorted({base - a for layer in result["layers"].values() for a in layer["acc"]})

    def ratios_at(delta: float) -> dict[str, float]:
        out = {}
        for name, layer in result["layers"].items():
            ok = [r for r, a in zip(result["ratios"], layer["acc"], strict=True) if base - a <= delta + 1e-12]
            out[name] = max(ok, default=0.0)
        return out

    def macs_at(delta: float) -> float:
        chosen = opts.model_copy(update={"ratios": ratios_at(delta), "global_pruning": False})
        return count(pruned_copy(model, example, chosen, 0.0, num_classes), example)[0] / macs0

    lo, hi = 0, len(drops) - 1
    if macs_at(drops[hi]) > target_macs:
        return {"target_macs": target_macs, "reached": False, "ratios": ratios_at(drops[hi]),
                "macs_kept": macs_at(drops[hi]), "max_layer_drop": drops[hi]}  # fmt: skip
    while lo < hi:
        mid = (lo + hi) // 2
        if macs_at(drops[mid]) <= target_macs:
            hi = mid
        else:
            lo = mid + 1
    delta = drops[hi]
    return {"target_macs": target_macs, "reached": True, "ratios": ratios_at(delta),
            "macs_kept": macs_at(delta), "max_layer_drop": delta}  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    base = result["base_acc"]
    ordered = sorted(result["layers"].items(), key=lambda kv: -(base - kv[1]["acc"][-1]))
    cmap = plt.get_cmap("viridis", max(len(ordered), 2))
    for i, (name, layer) in enumerate(ordered):
        drops = [100 * (base - a) for a in layer["acc"]]
        ax.plot(result["ratios"], drops, marker="o", ms=3, lw=1.2, color=cmap(i), label=name if i < 12 else None)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("fraction of the group's channels removed (that group alone)")
    ax.set_ylabel("top-1 drop (points)")
    ax.set_title(f"Pruning sensitivity per layer group (base top-1 {100 * base:.2f}%)")
    ax.legend(fontsize=7, ncol=2, title="most sensitive first" if len(ordered) > 12 else None, title_fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> list[Path]:
    """Both files or neither: each is written to a temporary name, then both renamed."""
    final = [out / "sensitivity.json", out / "sensitivity.png"]
    tmp = [p.with_name(f".tmp-{p.name}") for p in final]
    try:
        tmp[0].write_text(json.dumps(result, indent=2) + "\n")
        plot(result, tmp[1])
        for t, f in zip(tmp, final, strict=True):
            t.replace(f)
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)
    return final
