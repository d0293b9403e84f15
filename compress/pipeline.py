"""Run a recipe: prepare (every user error surfaces here) -> stages in order -> measure -> report.

Nothing is written until the data is loaded, the models are built, their checkpoints fit and a
forward pass works, so a bad recipe leaves no run directory behind. The pipeline never looks at a
stage's kind: it asks the stage which models it changed and checkpoints those.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from compress import distributed, metadata
from compress import resume as resume_mod
from compress.bench import measure as bench
from compress.bench import report as report_mod
from compress.bench.size import file_bytes, gzip_bytes
from compress.checkpoint import build_from_spec
from compress.context import Context
from compress.data import ImageData
from compress.data.stream import loader_failure
from compress.env import environment
from compress.errors import CompressError, StageFailed, out_of_memory
from compress.files import atomic_write_text
from compress.recipe import RecipeBase, dump_recipe
from compress.stages import Stage

RUN_MARKERS = ("status.json", "recipe.resolved.yaml")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise CompressError("device: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(recipe: RecipeBase) -> ImageData:
    try:
        data = recipe.data.open()
    except CompressError:
        raise
    except (OSError, ValueError) as exc:
        raise CompressError(f"data ({recipe.data.name}): {exc}") from None
    return data


def build_role(recipe: RecipeBase, role: str, data: ImageData) -> torch.nn.Module:
    return build_from_spec(getattr(recipe, role), data, role, role)


def make_run_dir(recipe: RecipeBase, out: Path | None, overwrite: bool) -> Path:
    if out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{recipe.name}-{stamp}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            state = resume_mod.read_status(out).get("state")
            if state in ("running", "failed"):
                raise CompressError(
                    f"--out: {out} holds an unfinished run ({state}); continue it with --resume {out}, "
                    "or pass --overwrite to start over"
                )
            raise CompressError(f"--out: {out} already exists; pass --overwrite or choose another directory")
        if not out.is_dir() or not any((out / m).exists() for m in RUN_MARKERS):
            raise CompressError(f"--out: {out} exists and is not a compress run directory; refusing to overwrite it")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CompressError(f"--out: cannot write to {out}: {exc.strerror or exc}") from None
    return out


def _status(run_dir: Path, state: str, **extra: Any) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname()} if state == "running" else {}
    atomic_write_text(json.dumps({"state": state, **extra, **owner}, indent=2) + "\n", run_dir / "status.json")


class _QuietFileHandler(logging.FileHandler):
    """train.log on a full disk: drop the line, never print logging's own traceback to the console."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


def _logger(run_dir: Path, console: Console) -> logging.Logger:
    """Everything to the run's train.log; warnings also to the terminal (through rich)."""
    from rich.logging import RichHandler

    log = logging.getLogger(f"compress.run.{run_dir}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = _QuietFileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    loud = RichHandler(console=console, level=logging.WARNING, show_time=False, show_path=False)
    log.handlers = [handler, loud]
    return log


def run(
    recipe: RecipeBase,
    out: Path | None = None,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    console: Console | None = None,
    resume: Path | None = None,
    data: ImageData | None = None,
) -> Path:
    """Run every stage, measure every artifact, write the run directory; return its path.

    With ``resume``, continue that interrupted run directory instead (same recipe required). With
    ``data``, train on that bundle instead of loading the recipe's ``data:`` (``compress.run``
    passes what the caller gave it; the recipe's ``data:`` still names it in the report).
    """
    rank, world = distributed.init()
    quiet = quiet or rank != 0
    console = console or Console(stderr=True, quiet=quiet)
    device, data, models = _prepare(recipe, world, data)
    run_dir = _open_run_dir(recipe, out, overwrite, resume, rank)
    if not quiet:  # now, not only at the end: a long run's files can be watched while it runs
        console.print(f"run directory: {run_dir}" + (" (resuming)" if resume is not None else ""), soft_wrap=True)
    data.to(device)
    started = dt.datetime.now(dt.UTC)
    if rank == 0:
        if resume is None:
            atomic_write_text(dump_recipe(recipe), run_dir / "recipe.resolved.yaml")
        _status(run_dir, "running", started=started.isoformat(), resumed=resume is not None, processes=world)
    ctx = _context(recipe, device, run_dir, data, models, quiet, console, rank, world)
    completed, stages_out = resume_mod.restore(ctx) if resume is not None else (0, [])
    if rank == 0 and completed == 0:
        _snapshot_inputs(ctx)
    _run_stages(ctx, completed, stages_out, started)
    if rank != 0:
        distributed.shutdown()  # rank 0 alone measures and writes the report
        return run_dir
    _finish(ctx, stages_out, started)
    return run_dir


def _prepare(
    recipe: RecipeBase, world: int, data: ImageData | None = None
) -> tuple[torch.device, ImageData, dict[str, torch.nn.Module]]:
    """Everything a bad recipe fails on, before anything is written: device, data, models, preflight."""
    device = resolve_device(recipe.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    seed_everything(recipe.seed)
    data = data if data is not None else load_data(recipe)
    roles = ["teacher", "student"] if recipe.teacher is not None else ["student"]
    models = {role: build_role(recipe, role, data) for role in roles}
    for i, stage in enumerate(recipe.stages):
        stage.preflight(models, data, f"stages.{i}")
    return device, data, models


def _open_run_dir(recipe: RecipeBase, out: Path | None, overwrite: bool, resume: Path | None, rank: int) -> Path:
    """Create the run directory (or check ``resume`` can continue); every rank gets it, or the error."""
    run_dir, error = None, None
    if rank == 0:  # one writer; the other ranks learn the directory (or the error) from it
        try:
            if resume is not None:
                resume_mod.check_resumable(resume, dump_recipe(recipe))
                run_dir = resume
            else:
                run_dir = make_run_dir(recipe, out, overwrite)
        except CompressError as exc:
            error = str(exc)
    run_dir, error = distributed.broadcast((run_dir, error))
    if error is not None:
        raise CompressError(error)
    return run_dir


def _context(
    recipe: RecipeBase,
    device: torch.device,
    run_dir: Path,
    data: ImageData,
    models: dict[str, torch.nn.Module],
    quiet: bool,
    console: Console,
    rank: int,
    world: int,
) -> Context:
    """The Context every stage works on, with the run's first lines in train.log."""
    ctx = Context(
        recipe=recipe,
        device=device,
        run_dir=run_dir,
        data=data,
        models={r: m.to(device) for r, m in models.items()},
        specs={r: getattr(recipe, r) for r in models},
        quiet=quiet,
        console=console,
        log=_logger(run_dir, console) if rank == 0 else logging.getLogger("compress.rank"),
        world=world,
        rank=rank,
    )
    if world > 1:
        ctx.log.info("distributed: %d processes (%s)", world, "nccl" if device.type == "cuda" else "gloo")
    ctx.log.info(
        "run %s on %s: %d train / %d test images, %d classes",
        recipe.name,
        device,
        data.train_size,
        data.test_size,
        data.num_classes,
    )
    if data.streaming:
        ctx.log.info("data: %s", data.describe)
    return ctx


def _snapshot_inputs(ctx: Context) -> None:
    """Checkpoint the models as they come in: loaded ones, and any no stage will change."""
    changed_later = {role for stage in ctx.recipe.stages for role in stage.changes()}
    for role in ctx.models:
        if ctx.specs[role].checkpoint is not None or role not in changed_later:
            ctx.stage_label = "input"
            ctx.snapshot(role, "input")


def _run_stages(ctx: Context, completed: int, stages_out: list[dict[str, Any]], started: dt.datetime) -> None:
    """Every stage after the first ``completed`` (restored by a resume), checkpointing what each changed."""
    stages: list[Stage] = ctx.recipe.stages
    for i, stage in enumerate(stages, start=1):
        if i <= completed:
            continue  # finished before the interruption; its models and artifacts were restored
        ctx.stage_index, ctx.stage_label, ctx.fit_calls = i, stage.kind, 0
        if ctx.rank != 0 and not stage.changes():
            continue  # export/quantize read the models: rank 0's job
        ctx.console.print(f"[bold cyan]stage {i}/{len(stages)}: {stage.kind}[/]")
        t0 = time.perf_counter()
        metrics = _apply(ctx, stage, i, started)
        seconds = time.perf_counter() - t0
        if ctx.rank != 0:
            continue
        for role in stage.changes():
            ctx.snapshot(role, stage.kind)
        ctx.log.info("stage %d %s done in %.1fs", i, stage.kind, seconds)
        stages_out.append({"index": i, "kind": stage.kind, "seconds": seconds, "metrics": metrics})
        resume_mod.save_progress(ctx, i, stages_out)


def _apply(ctx: Context, stage: Any, i: int, started: dt.datetime) -> dict[str, Any]:
    """Stage ``i``'s metrics; a failure is recorded in status.json, running out of memory is one line."""
    if ctx.rank == 0:
        _status(ctx.run_dir, "running", started=started.isoformat(), stage=i, kind=stage.kind)
    try:
        return stage.apply(ctx)
    except BaseException as exc:
        if ctx.rank == 0:
            with contextlib.suppress(CompressError):  # a full disk: the original error is the one to show
                _status(ctx.run_dir, "failed", stage=i, kind=stage.kind, error=f"{type(exc).__name__}: {exc}")
        what = out_of_memory(exc)
        if what is not None:  # a setting to lower, not a bug: one line (the last epoch stays resumable)
            field = f"stages.{i - 1}"
            raise StageFailed(f"{field} ({stage.kind}): {what}; {stage.memory_hint(field)}") from exc
        what = loader_failure(exc)
        if what is not None:  # a data loader worker died mid-step (killed, crashed decoder): one line
            raise CompressError(what) from None
        raise


def _finish(ctx: Context, stages_out: list[dict[str, Any]], started: dt.datetime) -> None:
    """Measure every artifact, write the report, mark the run complete; the table when not quiet."""
    ctx.console.print("[bold cyan]measuring artifacts[/]")
    report = _measure(ctx, stages_out, started)
    report_mod.write(ctx.run_dir, report)
    _status(ctx.run_dir, "complete", started=started.isoformat(), finished=report["finished"])
    resume_mod.finish(ctx.run_dir)
    distributed.shutdown()
    if not ctx.quiet:
        report_mod.print_table(report, ctx.console)
        ctx.console.print(f"run directory: {ctx.run_dir}", soft_wrap=True)


def _order(ctx: Context) -> list:
    idx = {a.name: i for i, a in enumerate(ctx.artifacts)}
    return sorted(
        ctx.artifacts, key=lambda a: (a.role != "teacher", a.format == "onnx", a.precision == "int8", idx[a.name])
    )


def _measure(ctx: Context, stages_out: list[dict[str, Any]], started: dt.datetime) -> dict[str, Any]:
    bench_cfg = ctx.recipe.benchmark
    rows, notes = [], []
    arts = _order(ctx)
    with ctx.progress() as prog:
        task = prog.add_task("benchmark", total=len(arts), info="")
        for art in arts:
            prog.update(task, info=art.name)
            row, art_notes = bench.measure(art, ctx.data, bench_cfg, ctx.device)
            if art.format == "onnx":
                # The file states its own measured accuracy, so it carries it wherever it is shipped.
                props = metadata.update(
                    art.path,
                    {
                        "top1": json.dumps(row["accuracy"]),
                        "top1_split": "test",
                        "test_images": str(ctx.data.test_size),
                    },
                )
                row["size_bytes"], row["gzip_bytes"] = file_bytes(art.path), gzip_bytes(art.path)
                row["input"] = metadata.describe_input(props)
            rows.append(row)
            notes.extend(art_notes)
            ctx.log.info("measured %s: top-1 %.4f, %d bytes", art.name, row["accuracy"], row["size_bytes"])
            prog.advance(task)
    data = ctx.data
    return {
        "recipe": ctx.recipe.model_dump(mode="json"),
        "recipe_sha256": metadata.recipe_sha256(ctx.recipe),
        "environment": environment(bench_cfg.threads),
        "data": {
            "name": ctx.recipe.data.name,
            "train_images": data.train_size,
            "test_images": data.test_size,
            "num_classes": data.num_classes,
            "input_shape": list(data.input_shape),
        },
        "stages": stages_out,
        "artifacts": rows,
        "notes": sorted(set(notes)),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_dir": str(ctx.run_dir),
        "label": ctx.run_dir.name,  # how plots and comparisons name this run
    }
