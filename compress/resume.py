"""Picking up an interrupted run where it stopped.

Two kinds of state, both written atomically (temp file, fsync, rename), so a ``kill -9`` at any
moment leaves either the old file or the new one:
- after every stage, ``resume/progress.pt``: which stages are done, their metrics, every artifact
  recorded so far (torch snapshots by checkpoint path), pruning flags and the RNG states;
- after every training epoch, ``resume/NN-K.pt`` (training.fit): model, optimizer, scheduler,
  history and RNG, so a long stage resumes at its last finished epoch.

``compress run RECIPE --resume RUN_DIR`` refuses a different recipe, skips finished stages,
restores the models from their stage checkpoints and continues; the ``resume/`` folder is removed
once the run is complete.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from compress.checkpoint import atomic_save, load_weights, read_checkpoint
from compress.context import Artifact, Context
from compress.errors import CompressError
from compress.models import build_model

PROGRESS = Path("resume") / "progress.pt"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    if isinstance(node, list):
        out = {}
        for i, v in enumerate(node):
            out |= _flatten(v, f"{prefix}{i}.")
        return out or {prefix.rstrip("."): []}
    return {prefix.rstrip("."): node}


def check_resumable(run_dir: Path, recipe_dump: str) -> None:
    """One-line errors for a folder that cannot be resumed with this recipe."""
    resolved = run_dir / "recipe.resolved.yaml"
    if not run_dir.is_dir() or not resolved.is_file():
        raise CompressError(f"--resume: {run_dir} is not a compress run directory (no recipe.resolved.yaml)")
    status = read_status(run_dir)
    state = status.get("state")
    if state == "complete":
        raise CompressError(f"--resume: {run_dir} already finished; nothing to resume")
    if state == "running" and _alive(status.get("pid"), status.get("host")):
        raise CompressError(
            f"--resume: {run_dir} is still being written by process {status['pid']}; stop it first "
            "(after kill -9 of torchrun, also kill its workers)"
        )
    old, new = _flatten(yaml.safe_load(resolved.read_text())), _flatten(yaml.safe_load(recipe_dump))
    diffs = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
    ]
    if diffs:
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CompressError(
            f"--resume: the recipe differs from the one {run_dir} was started with: {'; '.join(diffs[:3])}{more}"
        )


def read_status(run_dir: Path) -> dict[str, Any]:
    """status.json as a dict; empty when missing or unreadable."""
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def _alive(pid: Any, host: Any) -> bool:
    """Is the process that marked the run 'running' still a live compress process on this machine?"""
    if not isinstance(pid, int) or host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"compress" in cmdline


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": json.dumps(random.getstate()),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss_next))


def save_progress(ctx: Context, completed: int, stages_out: list[dict[str, Any]]) -> None:
    arts = [
        {
            k: str(getattr(a, k)) if k == "path" else getattr(a, k)
            for k in ("name", "role", "format", "precision", "path", "stage", "source")
        }
        for a in ctx.artifacts
    ]
    state = {
        "completed": completed,
        "stages_out": json.dumps(stages_out),
        "artifacts": json.dumps(arts),
        "pruned": json.dumps(ctx.pruned),
        "rng": _rng_state(),
    }
    atomic_save(state, ctx.run_dir / PROGRESS)
    for stale in (ctx.run_dir / "resume").glob(f"{completed:02d}-*.pt"):
        stale.unlink()  # the stage's checkpoint now holds what its epoch files held


def restore(ctx: Context) -> tuple[int, list[dict[str, Any]]]:
    """Bring ``ctx`` to the state after the last finished stage; return (stages done, their outputs)."""
    path = ctx.run_dir / PROGRESS
    if not path.is_file():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=True)
    ctx.pruned = json.loads(state["pruned"])
    ctx.artifacts = []
    for a in json.loads(state["artifacts"]):
        model = _load_snapshot(ctx, a["role"], Path(a["path"])) if a["format"] == "torch" else None
        ctx.artifacts.append(Artifact(**{**a, "path": Path(a["path"])}, model=model))
    for role in ctx.models:
        latest = ctx.latest(role, "torch")
        if latest is not None and latest.model is not None:
            ctx.models[role] = copy.deepcopy(latest.model).to(ctx.device)
    _set_rng_state(state["rng"])
    ctx.log.info("resumed after stage %d", state["completed"])
    return int(state["completed"]), json.loads(state["stages_out"])


def _load_snapshot(ctx: Context, role: str, path: Path) -> torch.nn.Module:
    spec = ctx.specs[role]
    model = build_model(spec.model, ctx.data.num_classes, ctx.data.channels, **spec.kwargs)
    state, pruned = read_checkpoint(path, role, f"--resume ({path})")
    load_weights(model, state, pruned=pruned, field=f"--resume ({path})")
    return model.eval()


def finish(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "resume", ignore_errors=True)
