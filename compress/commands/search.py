"""``compress search RECIPE``: the most accurate student that meets the recipe's ``target:``.

From the recipe's student (give it its trained weights: ``student.checkpoint``) and teacher:
1. rank the residual blocks (prune_depth's importance) and sweep each channel group's sensitivity;
2. build up to ``search.candidates`` architectures (depth × per-group ratios × width rounding) and
   measure each one's latency on the target runtime, per precision (``search_probe``), and a proxy
   top-1 (BatchNorm re-estimated, no training);
3. fine-tune the ``search.trials`` most promising candidates inside the budget briefly with KD from
   the teacher, re-measure the winner's latency on the deployable file, write ``search.json``,
   ``pareto.png`` and ``recipe.best.yaml`` (an ordinary recipe: ``--run`` runs it).

Every measurement lands in search.json as soon as it is made: rerunning the same command on the
same folder resumes (cached latencies, proxies and trials are reused; a half-done fine-tune resumes
from its last epoch).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from compress.context import Context
from compress.deploy import isa_label
from compress.errors import CompressError
from compress.files import atomic_write_text
from compress.pipeline import build_role, load_data, resolve_device, seed_everything
from compress.pruning.depth import block_importance, residual_blocks
from compress.pruning.sensitivity import sweep
from compress.pruning.structured import StructuredOptions
from compress.recipe import apply_override, load_recipe, read_recipe, validate_recipe
from compress.search import frontier, space
from compress.search.config import SearchConfig, TargetConfig
from compress.training import evaluate, reestimate_bn

from .search_probe import Prober

COMPRESSION = frozenset({"prune", "prune_depth", "sparsify", "recalibrate_bn", "qat"})


def _progress(quiet: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))  # fmt: skip
    return Progress(*columns, console=Console(stderr=True, quiet=quiet), disable=quiet)


def target_of(recipe: Any, budget: list[str]) -> TargetConfig:
    """The recipe's ``target:`` with ``--budget key=value`` applied (one line naming a bad one)."""
    raw = recipe.target.model_dump() if recipe.target is not None else {}
    for item in budget:
        key, sep, value = item.partition("=")
        if not sep or key not in TargetConfig.model_fields:
            raise CompressError(
                f"--budget {item!r}: expected key=value, key one of {', '.join(TargetConfig.model_fields)}"
            )
        raw[key] = yaml.safe_load(value)
    if not raw:
        raise CompressError("target: the recipe has no target: block; add one or pass --budget latency_ms=0.3")
    try:
        return TargetConfig.model_validate(raw)
    except ValueError as exc:
        raise CompressError(f"target: {str(exc).splitlines()[-1].strip()}") from None


class State:
    """search.json: every measurement so far, written atomically after each one."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"key": key, "latency": {}, "proxy": {}, "trials": {}}
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise CompressError(f"{path}: cannot read it to resume ({exc}); move it away") from None
            if not isinstance(old, dict) or old.get("key") != key:
                raise CompressError(
                    f"{path}: holds a search of another recipe, target or search: block; use another --out"
                )
            self.data.update(old)

    def save(self) -> None:
        atomic_write_text(json.dumps(self.data, indent=1) + "\n", self.path)


def _key(recipe: Any, target: TargetConfig) -> str:
    raw = {
        "recipe": recipe.model_dump(mode="json", exclude={"stages", "benchmark", "target"}),
        "target": target.model_dump(),
    }
    raw["host"] = isa_label()
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def _spent(d: dict[str, Any], phase: str, since: float) -> None:
    """Seconds of work per phase, summed over resumed invocations (cached work costs nothing)."""
    seconds = d.setdefault("seconds", {})
    seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - since


def _floor(target: TargetConfig, student_acc: float, teacher_acc: float | None) -> float | None:
    if target.max_accuracy_drop is None:
        return None
    ref = teacher_acc if target.accuracy_from == "teacher" and teacher_acc is not None else student_acc
    return ref - target.max_accuracy_drop / 100


def _context(recipe: Any, device: torch.device, run_dir: Path, data: Any, models: dict, quiet: bool) -> Context:
    return Context(recipe=recipe, device=device, run_dir=run_dir, data=data, models=models,
                   specs={r: getattr(recipe, r) for r in models}, quiet=quiet,
                   console=Console(stderr=True, quiet=quiet))  # fmt: skip


def best_recipe(raw: dict[str, Any], cand: space.Candidate, precision: str, cfg: SearchConfig, method: str) -> dict:
    """The chosen candidate as an ordinary recipe: the user's with its stages replaced by prune_depth /
    prune (then the full fine-tune), the user's export and quantize settings, INT8 when chosen."""
    stages = [s for s in raw["stages"] if s["kind"] not in COMPRESSION and s["kind"] not in ("train", "distill")]
    export = next((s for s in stages if s["kind"] == "export"), {"kind": "export"})
    quant = next((s for s in stages if s["kind"] == "quantize"), {"kind": "quantize"})
    finetune = cfg.finetune.model_dump(mode="json", exclude_defaults=True) | {"epochs": cfg.finetune.epochs}
    if cfg.finetune.kd is not None and not finetune.get("kd"):
        finetune["kd"] = True
    out: list[dict[str, Any]] = []
    if cand.removed:
        out.append({"kind": "prune_depth", "remove": list(cand.removed)})
    if cand.prunes_channels:
        prune = {"kind": "prune", "method": method, "ratio": max(cand.ratios.values()), "ratios": cand.ratios}
        if cand.round_to is not None:
            prune["round_to"] = cand.round_to
        out.append(prune)
    if out:
        out[-1]["finetune"] = finetune
    out.append(export)
    if precision == "int8":
        out.append(quant)
    best = {k: v for k, v in raw.items() if k != "search"}
    best["stages"] = out
    best["name"] = f"{raw['name']}-best"[:64]
    return best


def search(args: Any) -> Path:
    recipe = load_recipe(args.recipe, args.overrides)
    target = target_of(recipe, args.budget)
    cfg: SearchConfig = recipe.search or SearchConfig()
    cfg = cfg.model_copy(update={k: v for k, v in (("trials", args.trials), ("candidates", args.candidates)) if v})
    if target.device != "cpu":
        raise CompressError("target.device: only cpu latency can be searched so far")
    if cfg.requirements() and recipe.teacher is None:
        raise CompressError("search.estimate.kd: the short fine-tunes distill from a teacher; add a teacher: model")
    out = args.out or Path("runs") / f"search-{recipe.name}"
    out.mkdir(parents=True, exist_ok=True)
    state = State(
        out / "search.json", _key(recipe, target) + hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:8]
    )
    quiet = args.quiet
    say = Console(stderr=True, quiet=quiet).print
    seed_everything(recipe.seed)
    data = load_data(recipe)
    device = resolve_device(recipe.device)
    student = build_role(recipe, "student", data).to(device).eval()
    teacher = build_role(recipe, "teacher", data).to(device).eval() if recipe.teacher is not None else None
    num_classes = data.num_classes
    example = data.example_input(2).to(device)
    opts = StructuredOptions(method=cfg.method)
    few = data.limit("test", min(cfg.sensitivity_images, data.test_size))
    probe_loader = data.limit("train", min(cfg.probe_images, data.train_size))
    say(f"search: {target.describe()} on {isa_label()}; results in {out}")
    d = state.data
    d.update(target=target.model_dump(), search=cfg.model_dump(mode="json"), host=isa_label(),
             recipe=str(args.recipe), date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))  # fmt: skip
    if "base" not in d:
        test = data.eval_loader("test")
        d["base"] = {"student_acc": evaluate(student, test, device),
                     "teacher_acc": evaluate(teacher, test, device) if teacher else None}  # fmt: skip
        state.save()
    floor = _floor(target, d["base"]["student_acc"], d["base"]["teacher_acc"])
    with _progress(quiet) as prog:
        if "depth" not in d:
            t0 = time.perf_counter()
            names = residual_blocks(student, example)
            train = data.train_loader(seed=recipe.seed, augment=False)
            scores = block_importance(student, names, train, device, cfg.depth_method) if names else {}
            d["depth"] = {"order": sorted(names, key=lambda n: scores[n]), "scores": scores}
            _spent(d, "depth", t0)
            state.save()
        if "sensitivity" not in d:
            t0 = time.perf_counter()
            d["sensitivity"] = sweep(
                student, example, few.eval_loader("test"), device, opts, cfg.ratios, num_classes, prog
            )
            _spent(d, "sensitivity", t0)
            state.save()
        cands = space.plan(student, example, opts, num_classes, d["sensitivity"], d["depth"]["order"], cfg.depth,
                           cfg.round_to, cfg.candidates)  # fmt: skip
        prober = Prober(data, target, cfg)
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()  # two plans can build one architecture (a rounding that changes nothing)
        task = prog.add_task("latency + proxy", total=len(cands), info="")
        try:
            for cand in cands:
                t0 = time.perf_counter()
                model = space.build(student, example, opts, cand, num_classes)
                sig = space.signature(model)
                if sig not in d["proxy"]:
                    reestimate_bn(model, probe_loader.train_loader(seed=recipe.seed, augment=False), device, 10_000)
                    d["proxy"][sig] = {"proxy_acc": evaluate(model, few.eval_loader("test"), device),
                                       **space.describe(model, example)}  # fmt: skip
                key = f"{sig}/{target.runtime}/{target.threads}/{target.batch_size}"
                if key not in d["latency"]:
                    d["latency"][key] = prober.probe(model, sig, list(cfg.precisions))
                    _spent(d, "candidates", t0)
                    d["latency"][key]["seconds"] = time.perf_counter() - t0
                    state.save()
                for precision in cfg.precisions if sig not in seen else ():
                    lat = d["latency"][key][precision]
                    rows.append({"sig": sig, "precision": precision, "label": cand.label, "candidate": cand.to_json(),
                                 **d["proxy"][sig], **lat, "macs": d["proxy"][sig]["macs"]})  # fmt: skip
                seen.add(sig)
                prog.advance(task)
                prog.update(task, info=f"{cand.label}: {d['latency'][key][cfg.precisions[0]]['latency_ms']:.3f} ms")
            state.save()
            budget = target.budget()
            picks = frontier.to_train(rows, budget, floor, cfg.trials)
            if not picks:
                raise CompressError(
                    f"target: no candidate meets {target.describe()} (fastest measured: "
                    f"{min(r['latency_ms'] for r in rows):.3f} ms); loosen the budget; results in {out / 'search.json'}"
                )
            sigs = list(dict.fromkeys(r["sig"] for r in picks))
            task = prog.add_task("short KD fine-tunes", total=len(sigs), info="")
            for sig in sigs:
                if sig not in d["trials"]:
                    t0 = time.perf_counter()
                    cand = space.Candidate.from_json(next(r["candidate"] for r in picks if r["sig"] == sig))
                    model = space.build(student, example, opts, cand, num_classes).to(device)
                    short = data.limit("train", cfg.estimate_images) if cfg.estimate_images else data
                    models = {"student": model} | ({"teacher": teacher} if teacher is not None else {})
                    ctx = _context(recipe, device, out / "trials" / sig, short, models, True)
                    ctx.run_dir.mkdir(parents=True, exist_ok=True)
                    ctx.stage_index, ctx.stage_label = 1, "search"
                    metrics = cfg.estimate.run(ctx, model, f"trial {sig}", "search.estimate")
                    d["trials"][sig] = {"estimated_acc": metrics["test_acc"], "seconds": metrics["seconds"]}
                    _spent(d, "trials", t0)
                    state.save()
                prog.advance(task)
                prog.update(task, info=f"{sig}: {100 * d['trials'][sig]['estimated_acc']:.2f}%")
            for r in rows:
                r["estimated_acc"] = d["trials"].get(r["sig"], {}).get("estimated_acc")
            trained = [r for r in rows if r["estimated_acc"] is not None]
            missed: list[dict[str, Any]] = []
            d["missed"] = []
            t0 = time.perf_counter()
            while True:  # the winner's own file decides; a probe that was optimistic hands over to the next
                chosen, why = frontier.choose([r for r in trained if r not in missed], budget, floor)
                if chosen is None:
                    break
                cand = space.Candidate.from_json(chosen["candidate"])
                model = space.build(student, example, opts, cand, num_classes)
                chosen = {**chosen, "confirmed": prober.confirm(model, chosen["sig"], chosen["precision"])}
                if frontier.fits(chosen["confirmed"], budget):
                    break
                missed.append(
                    next(r for r in trained if r["sig"] == chosen["sig"] and r["precision"] == chosen["precision"])
                )
                d.setdefault("missed", []).append({k: chosen[k] for k in ("sig", "precision", "confirmed")})
            _spent(d, "confirm", t0)
        finally:
            prober.close()
    if chosen is None:
        d["rows"] = rows
        state.save()
        last = d["missed"][-1]["confirmed"] if d.get("missed") else {}
        raise CompressError(
            f"target: no trained candidate meets {target.describe()} on its deployable file (the last tried "
            f"measured {last.get('latency_ms', float('nan')):.3f} ms, {last.get('size_bytes', 0):,} bytes); "
            f"loosen the budget or raise search.trials; results in {out / 'search.json'}"
        )
    chosen["why"], chosen["meets_budget"] = why, True
    confirmed = chosen["confirmed"]
    raw = read_recipe(args.recipe)  # as the user wrote it (their paths, their defaults), --set applied
    for assignment in args.overrides:
        apply_override(raw, assignment)
    raw["target"] = target.model_dump(exclude_defaults=True) | {"latency_ms": target.latency_ms}
    raw["target"] = {k: v for k, v in raw["target"].items() if v is not None}
    best = best_recipe(raw, cand, chosen["precision"], cfg, cfg.method)
    validate_recipe(best, "recipe.best.yaml")  # an ordinary recipe, or a bug here
    note = f"# compress search {args.recipe}: {why}\n# {target.describe()}; host {isa_label()}\n"
    atomic_write_text(note + yaml.safe_dump(best, sort_keys=False), out / "recipe.best.yaml")
    d["rows"], d["chosen"] = rows, chosen
    state.save()
    frontier.plot(rows, chosen, target, out / "pareto.png", f"compress search: {recipe.name} ({isa_label()})")
    say(
        f"chosen: {chosen['label']} ({chosen['precision']}): {confirmed['latency_ms']:.3f} ms measured on the "
        f"deployable file, {confirmed['size_bytes']:,} bytes, estimated top-1 {100 * chosen['estimated_acc']:.2f}% "
        f"({why}); {'meets' if chosen['meets_budget'] else 'MISSES'} the budget"
    )
    say(f"wrote {out / 'search.json'}, {out / 'pareto.png'}, {out / 'recipe.best.yaml'}")
    return out / "recipe.best.yaml"
