"""``compress analyze sensitivity``: load the recipe's student and data, sweep each prunable group
with :mod:`compress.pruning.sensitivity` (a library on any ``nn.Module``), write JSON + plot."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from compress.errors import CompressError
from compress.importance import needs_gradients
from compress.pipeline import build_role, load_data, resolve_device, seed_everything
from compress.pruning.sensitivity import derive, sweep, write
from compress.pruning.structured import StructuredOptions, accumulate_gradients
from compress.recipe import load_recipe


def _measure(args: Any, recipe: Any, data: Any, model: nn.Module, device: torch.device, opts, example) -> dict:
    num_classes = data.num_classes
    if needs_gradients(opts.method):
        train = data.train_loader(seed=recipe.seed, augment=False)
        accumulate_gradients(model, train, device, opts.taylor_batches)
    ratios = sorted(set(args.ratios))
    if args.quiet:
        result = sweep(model, example, data.eval_loader("test"), device, opts, ratios, num_classes)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"))  # fmt: skip
        with Progress(*columns) as prog:
            result = sweep(model, example, data.eval_loader("test"), device, opts, ratios, num_classes, prog)
    result.update(recipe=str(args.recipe), student=recipe.student.model, images=data.test_size,
                  method=opts.method, date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))  # fmt: skip
    if args.target_macs is not None:
        result["derived"] = derive(model, example, opts, result, args.target_macs, num_classes)
    return result


def analyze(args: Any) -> None:
    """``compress analyze sensitivity``: the recipe's student (its checkpoint; ``--set
    student.checkpoint=RUN/checkpoints/..`` for a run's), the prune stage's options if it has one."""
    if not all(0 < r < 1 for r in args.ratios) or not args.ratios:
        raise CompressError(f"--ratios: every ratio must be in (0, 1), got {args.ratios}")
    if args.images < 1:
        raise CompressError(f"--images: must be at least 1, got {args.images}")
    if args.target_macs is not None and not 0 < args.target_macs < 1:
        raise CompressError(f"--target-macs: must be in (0, 1), got {args.target_macs}")
    recipe = load_recipe(args.recipe, args.overrides)
    seed_everything(recipe.seed)
    data = load_data(recipe)
    data = data.limit("test", args.images)
    model = build_role(recipe, "student", data).eval()
    device = resolve_device(recipe.device)
    model.to(device)
    stage = next((s for s in recipe.stages if isinstance(s, StructuredOptions)), None)
    opts = StructuredOptions(**{k: getattr(stage, k) for k in StructuredOptions.model_fields}) if stage else None
    opts = (opts or StructuredOptions()).model_copy(update={"head_ratio": 0.0})  # sweeps channel groups only
    opts.check_patterns(model, "prune stage")
    example = data.example_input(2).to(device)
    out = args.out or Path("runs") / f"sensitivity-{recipe.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if (out / "sensitivity.json").exists():
        raise CompressError(f"--out: {out} already holds a sensitivity.json; choose another folder")
    created = not out.exists()
    try:  # fail now, not after the sweep
        out.mkdir(parents=True, exist_ok=True)
        (out / ".probe").write_text("")
        (out / ".probe").unlink()
    except OSError as exc:
        raise CompressError(f"--out: cannot write to {out}: {exc.strerror or exc}") from None
    try:
        result = _measure(args, recipe, data, model, device, opts, example)
        for path in write(result, out):
            print(path)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # nothing half-written: not even an empty folder
        raise
    if "derived" in result:
        d = result["derived"]
        state = "reaches" if d["reached"] else "CANNOT reach (the sweep's largest ratios stop at)"
        print(f"# {state} {100 * d['macs_kept']:.1f}% of the MACs, every group's own drop <= "
              f"{100 * d['max_layer_drop']:.2f} pt; paste into the prune stage:")  # fmt: skip
        print(yaml.safe_dump({"ratios": d["ratios"]}, sort_keys=False), end="")
