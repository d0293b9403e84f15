"""Picking up an interrupted run where it stopped.

Two kinds of state, both written atomically (temp file, fsync, rename), so a ``kill -9`` at any
moment leaves either the old file or the new one:
- after every stage, ``resume/progress.pt``: which stages are done, their metrics, every artifact
  recorded so far (torch snapshots by checkpoint path) and the RNG states;
- after every training epoch, ``resume/NN-K.pt`` (training.fit): model, optimizer, scheduler,
  history and RNG, so a long stage resumes at its last finished epoch.

The models come back from their stage checkpoints, which record their structure (see
compress.checkpoint), so whatever a stage did to a model (pruned widths, folded BatchNorm, a removed
block) is what the resumed run continues with. Every file here is read weights-only, and one that
cannot be read is one CompressError line naming it and what to do, before any stage runs again.

``compress run RECIPE --resume RUN_DIR`` refuses a different recipe, skips finished stages,
restores the models from their stage checkpoints and continues; the ``resume/`` folder is removed
once the run is complete.
"""

from __future__ import annotations

import contextlib
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

from compress.checkpoint import open_checkpoint
from compress.context import Artifact, Context
from compress.errors import CompressError, first_line
from compress.files import atomic_save, safe_load
from compress.training import read_epoch

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
    try:
        started_with = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CompressError(f"--resume: cannot read {resolved}: {first_line(exc)}") from None
    old, new = _flatten(started_with), _flatten(yaml.safe_load(recipe_dump))
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
            for k in ("name", "role", "format", "precision", "path", "stage", "source", "factory")
        }
        for a in ctx.artifacts
    ]
    state = {
        "completed": completed,
        "stages_out": json.dumps(stages_out),
        "artifacts": json.dumps(arts),
        "rng": _rng_state(),
    }
    atomic_save(state, ctx.run_dir / PROGRESS)
    for stale in (ctx.run_dir / "resume").glob(f"{completed:02d}-*.pt"):
        with contextlib.suppress(OSError):  # never read again: the stage is done
            stale.unlink()  # the stage's checkpoint now holds what its epoch files held


RESTART = "start the run over with --overwrite"


def restore(ctx: Context) -> tuple[int, list[dict[str, Any]]]:
    """Bring ``ctx`` to the state after the last finished stage; return (stages done, their outputs).

    Every per-epoch file is checked first, so a bad one stops the resume here, not after the
    finished stages' work has been set up again.
    """
    for epoch_file in sorted((ctx.run_dir / "resume").glob("*-*.pt")):
        read_epoch(epoch_file, "cpu", mmap=True)
    path = ctx.run_dir / PROGRESS
    if not path.is_file():
        return 0, []
    state = safe_load(path, "--resume", hint=RESTART)
    try:
        completed, stages_out = int(state["completed"]), json.loads(state["stages_out"])
        saved = json.loads(state["artifacts"])
        rng = state["rng"]
        keys = ("name", "role", "format", "precision", "stage", "source")
        artifacts = [Artifact(**{k: a[k] for k in keys}, path=Path(a["path"]), factory=a.get("factory")) for a in saved]
    except (KeyError, TypeError, ValueError) as exc:
        raise CompressError(
            f"--resume: {path} is damaged ({type(exc).__name__}: {first_line(exc)}); {RESTART}"
        ) from None
    for art in artifacts:
        if art.format == "torch":
            art.model = _load_snapshot(ctx, art.role, art.path)
    ctx.artifacts = artifacts
    for role in ctx.models:
        latest = ctx.latest(role, "torch")
        if latest is not None and latest.model is not None:
            ctx.models[role] = copy.deepcopy(latest.model).to(ctx.device)
    try:
        _set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CompressError(f"--resume: {path} has damaged RNG states ({first_line(exc)}); {RESTART}") from None
    ctx.log.info("resumed after stage %d", completed)
    return completed, stages_out


def _load_snapshot(ctx: Context, role: str, path: Path) -> torch.nn.Module:
    """A stage checkpoint's model, rebuilt from its file (its structure included). The factory is the
    recipe's (the file's model name is not what chooses code to import)."""
    field = f"--resume ({path})"
    if not path.is_file():
        raise CompressError(f"{field}: the checkpoint is missing; {RESTART}")
    return open_checkpoint(path, field).build(field, model=ctx.specs[role].model)


def finish(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "resume", ignore_errors=True)
