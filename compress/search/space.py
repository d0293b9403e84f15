"""The candidates ``compress search`` considers, built from the student: which residual blocks go
(depth, least important first), which share of each coupled channel group goes (from the per-group
sensitivity sweep: every group takes the largest swept ratio whose own top-1 drop is at most δ, for
a ladder of δ), and the width rounding. A candidate is plain data (JSON), so search.json records it
and recipe.best.yaml reproduces it with ordinary ``prune_depth`` and ``prune`` stages.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from compress.pruning.depth import remove_blocks
from compress.pruning.structured import StructuredOptions, count, groups, prune_step


@dataclass(frozen=True)
class Candidate:
    """One architecture: blocks removed, then per-group channel ratios (keyed by the group's root
    layer in the depth-pruned model), widths rounded to ``round_to``."""

    removed: tuple[str, ...] = ()
    ratios: dict[str, float] = field(default_factory=dict)
    round_to: int | None = None
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["removed"] = list(self.removed)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Candidate:
        return cls(tuple(raw["removed"]), dict(raw["ratios"]), raw["round_to"], raw.get("label", ""))

    @property
    def prunes_channels(self) -> bool:
        return any(r > 0 for r in self.ratios.values())


def build(
    student: nn.Module, example: torch.Tensor, opts: StructuredOptions, cand: Candidate, num_classes: int
) -> nn.Module:
    """The candidate as a model: a pruned deep copy of ``student`` (its weights kept: a short
    fine-tune starts from them), exactly what ``prune_depth(remove=...)`` then ``prune(ratios=...)`` build."""
    model = copy.deepcopy(student).eval()
    if cand.removed:
        remove_blocks(model, list(cand.removed))
    if cand.prunes_channels:
        chosen = opts.model_copy(
            update={"ratios": dict(cand.ratios), "round_to": cand.round_to, "global_pruning": False}
        )
        prune_step(model, example, chosen, 0.0, num_classes)
    return model


def signature(model: nn.Module) -> str:
    """A short hash of the architecture (every parameter's name and shape): latency is cached by it."""
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters()]
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def member_roots(model: nn.Module, example: torch.Tensor, opts: StructuredOptions, num_classes: int) -> dict[str, str]:
    """Every layer of a prunable group -> the name of the group's root layer."""
    names = {m: n for n, m in model.named_modules() if n}
    out: dict[str, str] = {}
    for group in groups(model, example, opts, num_classes):
        root = names.get(group[0].dep.target.module)
        if root is None:
            continue
        for dep, _ in group:
            name = names.get(dep.target.module)
            if name is not None:
                out.setdefault(name, root)
    return out


def ratios_at(sensitivity: dict[str, Any], delta: float) -> dict[str, float]:
    """Per root layer of the sweep: the largest swept ratio whose top-1 drop (that group alone) is ≤ δ."""
    base = sensitivity["base_acc"]
    out = {}
    for name, layer in sensitivity["layers"].items():
        ok = [r for r, a in zip(sensitivity["ratios"], layer["acc"], strict=True) if base - a <= delta + 1e-12]
        out[name] = max(ok, default=0.0)
    return out


def deltas(sensitivity: dict[str, Any], levels: int) -> list[float]:
    """``levels`` thresholds spread over the measured drops (distinct configurations first)."""
    base = sensitivity["base_acc"]
    drops = sorted({max(0.0, base - a) for layer in sensitivity["layers"].values() for a in layer["acc"]})
    if levels >= len(drops):
        return drops
    picks = torch.linspace(0, len(drops) - 1, levels).round().long().tolist()
    return [drops[i] for i in dict.fromkeys(picks)]


def transfer(ratios: dict[str, float], old_roots: dict[str, str], new_roots: dict[str, str]) -> dict[str, float]:
    """Ratios keyed by the full student's group roots -> keyed by a depth-pruned model's roots: a group
    takes the ratio of the full model's group that any of its layers belonged to (removing blocks only
    takes layers out of groups)."""
    out: dict[str, float] = {}
    for member, root in new_roots.items():
        if root in out:
            continue
        old = old_roots.get(member)
        if old is not None and old in ratios:
            out[root] = ratios[old]
    return {root: out.get(root, 0.0) for root in dict.fromkeys(new_roots.values())}


def plan(
    student: nn.Module,
    example: torch.Tensor,
    opts: StructuredOptions,
    num_classes: int,
    sensitivity: dict[str, Any],
    depth_order: list[str],
    depth: int | None,
    round_to: list[int | None],
    limit: int,
) -> list[Candidate]:
    """Up to ``limit`` distinct candidates: the unpruned student, the uniform 50% reference (the hand
    recipe), and for every depth level (0..``depth`` blocks, least important first) the blocks alone
    plus every rounding × a ladder of sensitivity thresholds. When ``limit`` cuts, it cuts evenly
    across depth levels (taken round-robin), not the deepest (fastest) ones."""
    old_roots = member_roots(student, example, opts, num_classes)
    most = len(depth_order) if depth is None else min(depth, len(depth_order))
    per_level = max(1, (limit - 2) // (most + 1))
    ladder = deltas(sensitivity, max(1, (per_level - 1) // len(round_to))) if sensitivity["layers"] else []
    full = {root: 0.5 for root in dict.fromkeys(old_roots.values())}
    fixed = [Candidate(label="unpruned")] + ([Candidate(ratios=full, label="uniform 0.5 (reference)")] if full else [])
    levels: list[list[Candidate]] = []
    for k in range(most + 1):
        removed = tuple(depth_order[:k])
        level = [Candidate(removed, {}, None, f"{k} blocks removed")] if k else []
        if ladder:
            shallow = copy.deepcopy(student)
            remove_blocks(shallow, list(removed))
            new_roots = member_roots(shallow, example, opts, num_classes)
            for rnd in round_to:
                for delta in ladder:
                    ratios = transfer(ratios_at(sensitivity, delta), old_roots, new_roots)
                    label = f"{k} blocks removed, δ={100 * delta:.2f} pt" + (f", round_to {rnd}" if rnd else "")
                    level.append(Candidate(removed, ratios, rnd, label))
        levels.append(level)
    out, seen = [], set()
    for cand in fixed + [c for group in _round_robin(levels) for c in group]:
        key = json.dumps({**cand.to_json(), "label": ""}, sort_keys=True)
        if key not in seen and len(out) < limit:
            seen.add(key)
            out.append(cand)
    return out


def _round_robin(levels: list[list[Candidate]]) -> list[list[Candidate]]:
    """The i-th candidate of every level, for i = 0, 1, ...: a cut at the end spreads across levels."""
    return [[lvl[i] for lvl in levels if i < len(lvl)] for i in range(max((len(lv) for lv in levels), default=0))]


def describe(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    macs, params = count(model, example)
    return {"macs": macs, "params": params}
