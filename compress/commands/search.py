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
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from rich.console import Console

from compress.bench import runtimes
from compress.config import format_validation_error
from compress.context import Context
from compress.deploy import isa_label
from compress.env import cpu_model
from compress.errors import CompressError, first_line
from compress.files import atomic_write_text
from compress.onnx_utils import session
from compress.pipeline import build_role, load_data, resolve_device, seed_everything
from compress.pruning.depth import block_importance, residual_blocks
from compress.pruning.sensitivity import sweep
from compress.pruning.structured import StructuredOptions, group_roots
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
        target = TargetConfig.model_validate(raw)
    except ValidationError as exc:
        raise CompressError(format_validation_error(exc, raw, "--budget/target", TargetConfig)) from None
    runtimes.check([target.runtime], "target.runtime")  # installed, before anything is measured
    if target.latency_of is not None:
        try:
            session(target.latency_of)
        except Exception as exc:  # noqa: BLE001 - ORT's loader raises many kinds; its first line says which
            why = first_line(exc)
            raise CompressError(f"target.latency_of: {target.latency_of}: not an ONNX file ({why})") from None
    return target


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
            if (
                not isinstance(old, dict)
                or old.get("key") != key
                or not all(isinstance(old.get(k, {}), dict) for k in ("latency", "proxy", "trials"))
            ):
                raise CompressError(
                    f"{path}: holds a search of other models, data, search: settings or another CPU; use another --out"
                )
            self.data.update(old)

    def save(self) -> None:
        atomic_write_text(json.dumps(self.data, indent=1) + "\n", self.path)


def _key(recipe: Any, cfg: SearchConfig, export: Any, quant: Any, data: Any) -> str:
    """What every cached measurement depends on: the models (and their weight files' bytes), the data
    (its settings and split sizes: the held-out images are picked by position), the search settings
    except how many candidates/trials, the export/quantize settings, the CPU and the runtimes'
    versions. The budget is not in it: loosening it reuses everything measured."""
    files = {}
    for role in ("teacher", "student"):
        spec = getattr(recipe, role)
        if spec is not None and spec.checkpoint is not None and Path(spec.checkpoint).is_file():
            files[role] = hashlib.sha256(Path(spec.checkpoint).read_bytes()).hexdigest()
    raw = {
        "recipe": recipe.model_dump(mode="json", exclude={"stages", "benchmark", "target", "search", "name"}),
        "files": files,
        "schema": 2,  # 2: choices scored on held-out training images
        "splits": [data.train_size, data.test_size, list(data.class_names)],
        "search": cfg.model_dump(mode="json", exclude={"trials", "candidates"}),
        "export": export.model_dump(mode="json"),
        "quantize": quant.model_dump(mode="json"),
        "host": [cpu_model(), isa_label(), os.cpu_count()],
        "runtimes": runtimes.versions(),
    }
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _spent(d: dict[str, Any], phase: str, since: float) -> None:
    """Seconds of work per phase, summed over resumed invocations (cached work costs nothing)."""
    seconds = d.setdefault("seconds", {})
    seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - since


def _floor(target: TargetConfig, student_acc: float, teacher_acc: float | None) -> float | None:
    if target.max_accuracy_drop is None:
        return None
    ref = teacher_acc if target.accuracy_from == "teacher" else student_acc
    assert ref is not None  # accuracy_from: teacher without a teacher is refused up front
    return ref - target.max_accuracy_drop / 100


#: quantize-stage settings that change the graph the search times (it decides the precision itself)
UNSEARCHABLE = {"mode": "static", "format": "qdq", "op_types": [], "exclude": [], "max_accuracy_drop": None}


def _stages(recipe: Any) -> tuple[Any, Any]:
    """The recipe's export and quantize settings (the stages' defaults if absent); any other stage,
    or a quantize setting the search cannot time, is one line naming it."""
    from compress.stages.export import Export
    from compress.stages.quantize import Quantize

    export, quant = Export(), Quantize()
    for i, stage in enumerate(recipe.stages):
        if stage.kind == "export":
            export = stage
        elif stage.kind == "quantize":
            quant = stage
            for name, default in UNSEARCHABLE.items():
                if getattr(stage, name) != default:
                    raise CompressError(
                        f"stages.{i}.{name}: compress search decides the precision and times static QDQ INT8 "
                        f"as the quantize stage writes it by default; drop {name} here"
                    )
        else:
            raise CompressError(
                f"stages.{i} ({stage.kind}): compress search starts from trained models and decides the "
                "compression itself; run this stage first (compress run) and point student.checkpoint / "
                "teacher.checkpoint at its checkpoints, keeping only export/quantize stages here"
            )
    return export, quant


def _context(recipe: Any, device: torch.device, run_dir: Path, data: Any, models: dict, quiet: bool) -> Context:
    return Context(recipe=recipe, device=device, run_dir=run_dir, data=data, models=models,
                   specs={r: getattr(recipe, r) for r in models}, quiet=quiet,
                   console=Console(stderr=True, quiet=quiet))  # fmt: skip


def best_recipe(raw: dict[str, Any], chosen: dict[str, Any], cfg: SearchConfig) -> dict:
    """The chosen candidate as an ordinary recipe: the user's with its stages replaced by prune_depth /
    prune (then the full fine-tune), the user's export and quantize settings (INT8, or FP16 when
    chosen), its benchmark timing the chosen runtime and thread count at the target's batch size."""
    cand, precision, method = space.Candidate.from_json(chosen["candidate"]), chosen["precision"], cfg.method
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
        # every group root is listed; ``ratio`` would only reach a group that is not: the mildest one
        smallest = min(r for r in cand.ratios.values() if r > 0)
        prune = {"kind": "prune", "method": method, "ratio": smallest, "ratios": cand.ratios}
        if cand.round_to is not None:
            prune["round_to"] = cand.round_to
        out.append(prune)
    if out:
        out[-1]["finetune"] = finetune
    out.append(export)
    if precision == "int8":
        out.append({**quant, "mode": "static"} if quant.get("mode") == "fp16" else quant)
    elif precision == "fp16":
        out.append({"kind": "quantize", "mode": "fp16"})
    best = {k: v for k, v in raw.items() if k != "search"}
    best["stages"] = out
    best["name"] = f"{raw['name']}-best"[:64]
    bench = dict(best.get("benchmark") or {})
    listed = bench.get("threads")
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    bench["threads"] = list(dict.fromkeys([chosen["threads"], *listed]))
    sizes = bench.get("batch_sizes", [1, 64])
    bench["batch_sizes"] = list(dict.fromkeys([best["target"].get("batch_size", 1), *sizes]))
    bench["runtimes"] = list(dict.fromkeys([chosen["runtime"], *bench.get("runtimes", [])]))
    best["benchmark"] = bench
    best["target"] = {**best["target"], "runtime": chosen["runtime"], "threads": chosen["threads"]}
    return best


class _Search:
    """One search: the recipe's models and data, search.json, and one method per phase."""

    def __init__(self, args: Any) -> None:
        recipe = load_recipe(args.recipe, args.overrides)
        self.export, self.quant = _stages(recipe)
        self.args, self.recipe, self.target = args, recipe, target_of(recipe, args.budget)
        cfg: SearchConfig = recipe.search or SearchConfig()
        given = (("trials", args.trials), ("candidates", args.candidates))
        self.cfg = cfg.model_copy(update={k: v for k, v in given if v})
        if self.cfg.requirements() and recipe.teacher is None:
            raise CompressError("search.estimate.kd: the short fine-tunes distill from a teacher; add a teacher: model")
        runtimes.check(self.cfg.runtimes or [], "search.runtimes")
        if self.target.accuracy_from == "teacher" and self.target.max_accuracy_drop is not None and not recipe.teacher:
            raise CompressError("target.accuracy_from: teacher, but the recipe has no teacher: model")
        self.out = args.out or Path("runs") / f"search-{recipe.name}"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CompressError(f"--out: cannot create {self.out}: {exc.strerror or exc}") from None
        self.say = Console(stderr=True, quiet=args.quiet).print
        spec = recipe.student
        if spec.checkpoint is None and spec.weights is None and not spec.pretrained:
            self.say("search: the student has no checkpoint:, weights: or pretrained: it ranks an untrained network")
        seed_everything(recipe.seed)
        data = load_data(recipe)
        self.key = _key(recipe, self.cfg, self.export, self.quant, data)
        self.state = State(self.out / "search.json", self.key)
        self.d = self.state.data
        self.sel, self.data, self.split = self._holdout(data)
        self.device = resolve_device(recipe.device)
        self.student = build_role(recipe, "student", self.sel).to(self.device).eval()
        has_teacher = recipe.teacher is not None
        self.teacher = build_role(recipe, "teacher", self.sel).to(self.device).eval() if has_teacher else None
        self.example = self.sel.example_input(2).to(self.device)
        self.opts = StructuredOptions(method=self.cfg.method)
        self.few = self.sel.limit("test", min(self.cfg.sensitivity_images, self.sel.test_size))

    def _holdout(self, data: Any) -> tuple[Any, Any, str]:
        """(what choices use, what reports use, which images choose). Every choice is scored on training
        images the short fine-tunes do not train on (NetAdapt's and AMC's practice); the test split
        only reports. The reporting view keeps no training images (the held-out view has its own copy)."""
        held = min(self.cfg.holdout_images, data.train_size // 5)
        if not held:
            why = "search.holdout_images: 0" if not self.cfg.holdout_images else f"{data.train_size} training images"
            return data, data, f"the test split ({why})"
        if held < max(1000, 10 * data.num_classes):
            self.say(f"search: only {held:,} held-out images ({held / data.num_classes:.0f} per class) to choose on: "
                     "close candidates may be told apart by chance")  # fmt: skip
        return data.holdout(held), data.limit("train", 1), f"{held:,} held-out training images"

    def build(self, cand: space.Candidate) -> torch.nn.Module:
        return space.build(self.student, self.example, self.opts, cand, self.data.num_classes)

    def baseline(self) -> None:
        """The unpruned student's and the teacher's top-1 on the test split (reported) and on the images
        choices are scored on."""
        d = self.d
        if "base" not in d:
            acc: dict[str, float | None] = {}
            for split, data in (("", self.data), ("select_", self.sel)):
                loader = data.eval_loader("test")
                acc[f"{split}student_acc"] = evaluate(self.student, loader, self.device)
                has = self.teacher is not None
                acc[f"{split}teacher_acc"] = evaluate(self.teacher, loader, self.device) if has else None
            d["base"] = acc
            self.state.save()

    def floor(self, rows: list[dict[str, Any]], prober: Prober, prog: Any) -> float | None:
        """The accuracy floor, like for like. An estimate is a short fine-tune on the other training
        images scored on the held-out ones, which the student and teacher trained on and a fine-tune
        partly forgets; so the student's reference is the unpruned student given that same short
        fine-tune (a control trial), and the teacher's is shifted by what that control forgot."""
        if self.target.max_accuracy_drop is None:
            return None
        base = self.d["base"]
        student, forgot = base["select_student_acc"], 0.0
        control = [r for r in rows if r["label"] == "unpruned"]
        if self.sel is not self.data and control:
            self.train(control[:1], prober, prog)
            student = self.d["trials"][control[0]["sig"]]["select_acc"]
            forgot = base["select_student_acc"] - student
        teacher = None if base["select_teacher_acc"] is None else base["select_teacher_acc"] - forgot
        floor = _floor(self.target, student, teacher)
        self.d["floor"] = {"floor": floor, "student": student, "teacher": teacher, "forgotten": forgot}
        return floor

    def rank(self, prog: Any) -> None:
        """Residual blocks, least important first, and each channel group's sensitivity."""
        d = self.d
        if "depth" not in d:
            t0 = time.perf_counter()
            names = residual_blocks(self.student, self.example)
            train = self.sel.train_loader(seed=self.recipe.seed, augment=False)
            scores = block_importance(self.student, names, train, self.device, self.cfg.depth_method) if names else {}
            d["depth"] = {"order": sorted(names, key=lambda n: scores[n]), "scores": scores}
            _spent(d, "depth", t0)
            self.state.save()
        if "sensitivity" not in d:
            t0 = time.perf_counter()
            loader, n = self.few.eval_loader("test"), self.data.num_classes
            if group_roots(self.student, self.example, self.opts, n):
                d["sensitivity"] = sweep(self.student, self.example, loader, self.device, self.opts,
                                         self.cfg.ratios, n, prog)  # fmt: skip
            else:  # nothing to narrow: depth is the only lever
                base = d["base"]["select_student_acc"]
                d["sensitivity"] = {"base_acc": base, "ratios": self.cfg.ratios, "layers": {}}
            _spent(d, "sensitivity", t0)
            self.state.save()

    def measure(self, prober: Prober, prog: Any) -> list[dict[str, Any]]:
        """Every candidate's proxy top-1 and latency/size per (precision, runtime, threads): one row each."""
        d, cfg = self.d, self.cfg
        cands = space.plan(self.student, self.example, self.opts, self.data.num_classes, d["sensitivity"],
                           d["depth"]["order"], cfg.depth, cfg.round_to, cfg.candidates)  # fmt: skip
        probe = self.sel.limit("train", min(cfg.probe_images, self.sel.train_size))
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()  # two plans can build one architecture (a rounding that changes nothing)
        task = prog.add_task("latency + proxy", total=len(cands), info="")
        for cand in cands:
            t0 = time.perf_counter()
            model = self.build(cand)
            sig = space.signature(model)
            if sig not in d["proxy"]:
                reestimate_bn(model, probe.train_loader(seed=self.recipe.seed, augment=False), self.device, 10_000)
                acc = evaluate(model, self.few.eval_loader("test"), self.device)
                d["proxy"][sig] = {"proxy_acc": acc, **space.describe(model, self.example)}
            key = f"{sig}/{self.target.batch_size}"
            have = d["latency"].setdefault(key, {})
            if any(w not in have for w in prober.combos()):  # a search of other runtimes/threads timed it before
                have.update(prober.probe(model, sig))
                _spent(d, "candidates", t0)
                self.state.save()
            for where in prober.combos() if sig not in seen else ():
                precision, runtime, threads = where.split("/")[:3]
                row = {"sig": sig, "precision": precision, "runtime": runtime, "threads": int(threads)}
                rows.append({**row, "label": cand.label, "candidate": cand.to_json(), **d["proxy"][sig], **have[where]})
            seen.add(sig)
            fastest = min(have[w]["latency_ms"] for w in prober.combos())
            prog.update(task, advance=1, info=f"{cand.label}: {fastest:.3f} ms")
        self.state.save()
        return rows

    def train(self, picks: list[dict[str, Any]], prober: Prober, prog: Any) -> None:
        """A short KD fine-tune of each picked architecture (not on the held-out images); its held-out
        top-1 in each precision (run by ONNX Runtime, INT8 calibrated as the quantize stage does) is the
        estimate."""
        d, cfg = self.d, self.cfg
        sigs = list(dict.fromkeys(r["sig"] for r in picks))
        task = prog.add_task("short KD fine-tunes", total=len(sigs), info="")
        for sig in sigs:
            if sig not in d["trials"]:
                t0 = time.perf_counter()
                cand = space.Candidate.from_json(next(r["candidate"] for r in picks if r["sig"] == sig))
                model = self.build(cand).to(self.device)
                short = self.sel.limit("train", cfg.estimate_images) if cfg.estimate_images else self.sel
                models = {"student": model} | ({"teacher": self.teacher} if self.teacher is not None else {})
                trial_dir = self.out / "trials" / f"{self.key[:8]}-{sig}"  # a resumed fine-tune is this one's
                ctx = _context(self.recipe, self.device, trial_dir, short, models, True)
                ctx.run_dir.mkdir(parents=True, exist_ok=True)
                ctx.stage_index, ctx.stage_label = 1, "search"
                metrics = cfg.estimate.run(ctx, model, f"trial {sig}", "search.estimate")
                d["trials"][sig] = {"select_acc": metrics["test_acc"], "estimated": prober.accuracy(model, sig),
                                    "seconds": metrics["seconds"]}  # fmt: skip
                _spent(d, "trials", t0)
                self.state.save()
            prog.update(task, advance=1, info=f"{sig}: {100 * d['trials'][sig]['select_acc']:.2f}%")

    def confirmed(self, row: dict[str, Any], prober: Prober) -> dict[str, Any]:
        """``row``'s deployable file, measured once (search.json keeps it: a rerun decides alike)."""
        done = self.d.setdefault("confirmed", {})
        key = f"{row['sig']}/{prober.where(row['precision'], row['runtime'], row['threads'])}"
        if key not in done:
            t0 = time.perf_counter()
            model = self.build(space.Candidate.from_json(row["candidate"]))
            done[key] = prober.confirm(model, row["sig"], row["precision"], row["runtime"], row["threads"])
            _spent(self.d, "confirm", t0)
            self.state.save()
        return done[key]

    def _miss(self, row: dict[str, Any]) -> None:
        keep = ("sig", "label", "precision", "runtime", "threads", "latency_ms", "latency_ms_budget", "confirmed")
        self.d["missed"].append({k: row[k] for k in keep if k in row})

    def shortlist(self, rows: list[dict[str, Any]], floor: float | None, prober: Prober, prog: Any) -> list[dict]:
        """frontier.shortlist: each pick confirmed on its deployable file before any is trained."""
        budget = self.target.budget()
        task = prog.add_task("confirm on deployable files", total=None, info="")

        def confirm(row: dict[str, Any]) -> dict[str, Any]:
            prog.update(task, advance=1, info=row["label"])
            return self.confirmed(row, prober)

        picks, missed = frontier.shortlist(rows, budget, floor, self.cfg.trials, confirm if budget else None)
        for row in missed:
            self._miss(row)
        prog.update(task, total=len(picks) + len(missed), completed=len(picks) + len(missed))
        return picks

    def decide(self, rows: list[dict[str, Any]], floor: float | None, prober: Prober) -> tuple[dict | None, str]:
        """The winner, confirmed on its deployable file; a probe that was optimistic hands over to the next."""
        budget, d = self.target.budget(), self.d
        for r in rows:
            r["estimated_acc"] = d["trials"].get(r["sig"], {}).get("estimated", {}).get(r["precision"])
        left = [r for r in rows if r["estimated_acc"] is not None]
        why = ""

        def best(pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
            nonlocal why
            chosen, why = frontier.choose(pool, budget, floor)
            return [] if chosen is None else [chosen]

        chosen, missed = frontier.confirmed(left, best, lambda r: self.confirmed(r, prober), budget)
        for row in missed:
            self._miss(row)
        return (chosen[0] if chosen else None), why

    def run(self) -> Path:
        target, cfg, d, out = self.target, self.cfg, self.d, self.out
        self.say(f"search: {target.describe()} on {isa_label()}; choosing on {self.split}; results in {out}")
        d.update(target=target.model_dump(mode="json"), search=cfg.model_dump(mode="json"), host=isa_label(),
                 recipe=str(self.args.recipe), date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))  # fmt: skip
        d["selection"] = self.split
        self.baseline()
        prober = Prober(self.sel, target, cfg, self.export, self.quant)
        try:
            with _progress(self.args.quiet) as prog:
                self.rank(prog)
                rows = self.measure(prober, prog)
                d["rows"] = rows  # the same list: estimates land in it as they are made
                floor = self.floor(rows, prober, prog)
                d["missed"] = []
                picks = self.shortlist(rows, floor, prober, prog)
                if not picks and d["missed"]:
                    raise self._refused()
                if not picks:
                    raise CompressError(
                        f"target: no candidate meets {target.describe()} (fastest measured: "
                        f"{min(r['latency_ms'] for r in rows):.3f} ms); loosen the budget; results in "
                        f"{out / 'search.json'}"
                    )
                self.train(picks, prober, prog)
                chosen, why = self.decide(rows, floor, prober)
        finally:
            prober.close()
        if chosen is None:
            raise self._refused()
        holds = floor is None or chosen["estimated_acc"] >= floor
        d["chosen"] = chosen = {**chosen, "why": why, "meets_budget": True, "meets_accuracy": holds}
        self.state.save()
        best = self.write(rows, chosen)
        if not holds:
            raise CompressError(f"target: {why} (top-1 on {self.split}); results in {out}")
        return best

    def _refused(self) -> CompressError:
        """No candidate's deployable file meets the budget: search.json keeps what was measured."""
        self.state.save()
        last = self.d["missed"][-1]["confirmed"] if self.d["missed"] else {}
        return CompressError(
            f"target: no candidate meets {self.target.describe()} on its deployable file (the last tried "
            f"measured {last.get('latency_ms', float('nan')):.3f} ms, {last.get('size_bytes', 0):,} bytes); "
            f"loosen the budget or raise search.trials; results in {self.out / 'search.json'}"
        )

    def write(self, rows: list[dict[str, Any]], chosen: dict[str, Any]) -> Path:
        """recipe.best.yaml (validated: an ordinary recipe) and pareto.png; one line saying what won."""
        raw = read_recipe(self.args.recipe)  # as the user wrote it (their paths, their defaults), --set applied
        for assignment in self.args.overrides:
            apply_override(raw, assignment)
        given = self.target.model_dump(mode="json", exclude_defaults=True)
        raw["target"] = {k: v for k, v in given.items() if v is not None}
        best = best_recipe(raw, chosen, self.cfg)
        validate_recipe(best, "recipe.best.yaml")  # an ordinary recipe, or a bug here
        note = f"# compress search {self.args.recipe}: {chosen['why']}\n"
        note += f"# {self.target.describe()}; host {isa_label()}\n"
        atomic_write_text(note + yaml.safe_dump(best, sort_keys=False), self.out / "recipe.best.yaml")
        tmp = self.out / ".pareto.tmp.png"
        title = f"compress search: {self.recipe.name} ({isa_label()})"
        frontier.plot(rows, chosen, self.target, tmp, title, self.split.split(" (")[0])
        tmp.replace(self.out / "pareto.png")
        c = chosen["confirmed"]
        self.say(
            f"chosen: {chosen['label']} ({chosen['precision']}, {chosen['runtime']}, {chosen['threads']} threads): "
            f"{c['latency_ms']:.3f} ms measured on the deployable file, {c['size_bytes']:,} bytes, estimated top-1 "
            f"{100 * chosen['estimated_acc']:.2f}% on {self.split} ({chosen['why']})"
        )
        self.say(f"wrote {self.out / 'search.json'}, {self.out / 'pareto.png'}, {self.out / 'recipe.best.yaml'}")
        return self.out / "recipe.best.yaml"


def search(args: Any) -> Path:
    """``compress search``: returns the path of recipe.best.yaml."""
    if getattr(args, "budget", None) is None:
        args.budget = []
    return _Search(args).run()


def record_final(best: Path) -> dict[str, Any]:
    """After ``--run``: the fully fine-tuned deployable file's measured latency (the report's, at the
    target's batch size, threads and runtime), size and top-1 into search.json as ``final``."""
    out = best.parent
    state = json.loads((out / "search.json").read_text())
    report = json.loads((out / "run" / "report.json").read_text())
    chosen, target = state["chosen"], TargetConfig.model_validate(state["target"])
    onnx = [a for a in report["artifacts"] if a["role"] == "student" and a["format"] == "onnx"]
    art = next((a for a in reversed(onnx) if a["precision"] == chosen["precision"]), onnx[-1])
    rows = [r for r in art["latency"] if r["device"] == "cpu" and r["runtime"] == chosen["runtime"]
            and r["batch_size"] == target.batch_size and r["threads"] == chosen["threads"]]  # fmt: skip
    final = {"path": art["path"], "precision": art["precision"], "top1": art["accuracy"],
             "size_bytes": art["size_bytes"], "macs": art["macs"],
             "latency_ms": rows[0]["p50_ms"] if rows else None}  # fmt: skip
    if target.latency_of is not None:  # timed in turn with the reference, as every candidate was
        final |= _side_by_side(Path(art["path"]), target.latency_of, chosen["runtime"], chosen["threads"], target)
    final["meets_budget"] = final["latency_ms"] is not None and frontier.fits(final, target.budget())
    state["final"] = final
    atomic_write_text(json.dumps(state, indent=1) + "\n", out / "search.json")
    return final


def _side_by_side(path: Path, ref: Path, runtime: str, threads: int, target: TargetConfig) -> dict[str, float]:
    """p50 of ``path`` and of ``ref`` (as ``latency_ms_budget``), timed in turn over 3 rounds on random
    pixels (latency does not depend on them)."""
    import numpy as np

    rng = np.random.default_rng(0)
    p50s: dict[Path, list[float]] = {path: [], ref: []}
    feeds = {}
    for file in p50s:
        inp = session(file).get_inputs()[0]
        shape = [target.batch_size] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
        feeds[file] = rng.integers(0, 255, size=shape).astype(np.uint8 if "uint8" in inp.type else np.float32)
    for _ in range(3):
        for file in p50s:
            p50s[file].append(float(np.median(runtimes.time_onnx(file, feeds[file], runtime, threads, 20, 200))))
    return {"latency_ms": float(np.median(p50s[path])), "latency_ms_budget": float(np.median(p50s[ref]))}
