"""``compress bench MODEL...``: measure ONNX files, checkpoints or whole runs the way a run measures them.

A MODEL is an ``.onnx`` file (its metadata names the dataset and how to feed it), a checkpoint
(``student.pt``; compress checkpoints carry their model name, a plain state_dict takes
``file.pt:MODEL_NAME``) or a run directory (all its ONNX files and checkpoints). The result is a
report directory like a run's: report.json, report.md, report.html and the Pareto plots, so
``compress report`` can put benches and runs side by side.

A checkpoint is rebuilt by the model factory it names. Registered names, ``torchvision:`` and ``timm:``
ones are code of this install; a user factory (``package.module:function``) is code that importing would run,
so one named only by a file is refused: the user names it on the command line, ``FILE.pt:pkg.mod:fn``
for a checkpoint, ``RUN_DIR:pkg.mod:fn[,other.mod:fn]`` for the checkpoints of a run that name it.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError

from compress import metadata
from compress.bench import report as report_mod
from compress.bench import runtimes
from compress.bench.measure import measure
from compress.checkpoint import open_checkpoint
from compress.context import Artifact
from compress.data import ImageData
from compress.env import environment
from compress.errors import CompressError, first_line
from compress.onnx_utils import session
from compress.recipe import BenchmarkConfig, format_validation_error, load_recipe, recipe_model

STAGE_DIR = re.compile(r"^\d+-(?P<stage>.+)$")


#: what compress.api names a model or dataset passed to compress.run as a Python object: nothing in another
#: process can rebuild it (the run's ONNX files still measure)
PYTHON_OBJECT = "compress.api:python_"


def is_user_factory(name: str) -> bool:
    """A ``package.module:function`` model name: building it imports that module and calls the function."""
    return ":" in name and not name.startswith(("torchvision:", "timm:"))


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}#{i}", i + 1
    taken.add(out)
    return out


class Plan:
    """What to measure: artifacts (torch models still to be built once the data is known) and data hints."""

    def __init__(self) -> None:
        self.onnx: list[tuple[str, Path, dict[str, str]]] = []
        # (name, checkpoint, model name override, user factories the user named for it)
        self.torch: list[tuple[str, Path, str | None, frozenset[str]]] = []
        self.data_hints: list[tuple[str, Any]] = []  # (where it came from, data config dict)
        self.names: set[str] = set()
        self.notes: list[str] = []

    def add(self, spec: str) -> None:
        path = Path(spec)
        model_name = None
        if not path.exists() and ":" in spec:
            head, _, tail = spec.partition(":")
            if Path(head).is_file() or Path(head).is_dir():
                path, model_name = Path(head), tail
        if path.is_dir():
            trusted = frozenset(n.strip() for n in (model_name or "").split(",") if n.strip())
            self._add_run(path, trusted)
        elif not path.is_file():
            raise CompressError(f"{spec}: no such file or run directory")
        elif path.suffix == ".onnx":
            self._add_onnx(path, path.name)
        else:
            trusted = frozenset([model_name]) if model_name else frozenset()
            self.torch.append((_unique(path.stem, self.names), path, model_name, trusted))
            # A checkpoint inside a run (run/checkpoints/NN-stage/x.pt): that run's data.
            self._hint_from_recipe(path.parent.parent.parent / "recipe.resolved.yaml")

    def _hint_from_recipe(self, recipe_file: Path) -> None:
        if recipe_file.is_file():
            recipe = load_recipe(recipe_file, user_code=False)
            self.data_hints.append((str(recipe_file), recipe.data.model_dump(mode="json")))

    def _add_onnx(self, path: Path, name: str) -> None:
        props = metadata.read(path)  # a damaged file: one line naming it
        try:  # before any measuring: onnxruntime also refuses external data outside the model's folder
            session(path)
        except Exception as exc:  # noqa: BLE001 - ORT raises several types; the first line says enough
            raise CompressError(f"{path}: onnxruntime cannot load it: {first_line(exc)}") from None
        self.onnx.append((_unique(name, self.names), path, props))
        if props.get("dataset"):
            self.data_hints.append((f"{path} metadata", {"name": props["dataset"]}))

    def _add_run(self, run_dir: Path, trusted: frozenset[str] = frozenset()) -> None:
        recipe_file = run_dir / "recipe.resolved.yaml"
        onnx_files = sorted(run_dir.glob("*.onnx"))
        ckpts = sorted(run_dir.glob("checkpoints/*/*.pt"))
        if not onnx_files and not ckpts:
            raise CompressError(f"{run_dir}: no .onnx files or checkpoints/ in this folder (not a compress run?)")
        self._hint_from_recipe(recipe_file)
        for ckpt in ckpts:
            m = STAGE_DIR.match(ckpt.parent.name)
            label = f"{ckpt.stem}@{m['stage'] if m else ckpt.parent.name}"
            self.torch.append((_unique(label, self.names), ckpt, None, trusted))
        for path in onnx_files:
            self._add_onnx(path, path.name)


def _data_config(plan: Plan, name: str | None, root: str | None) -> tuple[Any, str]:
    adapter = TypeAdapter(recipe_model().model_fields["data"].annotation)
    hinted = [(s, raw) for s, raw in plan.data_hints if raw.get("name") == name]
    if name is not None and hinted and ":" in name:  # the user names the run's own dataset: its settings too
        source, raw = hinted[0][0] + " (named by --data)", dict(hinted[0][1]) | ({"root": root} if root else {})
    elif name is not None:
        raw, source = {"name": name, **({"root": root} if root else {})}, "--data"
    elif plan.data_hints:
        source, raw = plan.data_hints[0]
        raw = dict(raw) | ({"root": root} if root else {})
        check_recorded_data(source, raw, "compress bench")
    else:
        raise CompressError("--data: name the dataset to measure on (e.g. --data cifar10 --root PATH)")
    try:
        return adapter.validate_python(raw), source
    except ValidationError as exc:
        msg = format_validation_error(exc, raw, source)
        hint = "" if name else " (pass --data NAME [--root PATH])"
        raise CompressError(msg.replace("recipe.", "") + hint) from None


def check_recorded_data(source: str, raw: dict[str, Any], command: str) -> None:
    """Refuse data a file chooses that would run code: a user dataset function a run's recipe names
    (the user names it on the command line instead), or data passed to compress.run from Python."""
    user = str(raw.get("name", ""))
    if user.startswith(PYTHON_OBJECT):
        raise CompressError(
            f"{source}: the run's data was passed to compress.run from Python; nothing else can rebuild it: "
            "pass --data NAME [--root PATH]"
        )
    if ":" in user:  # a user dataset function: code that importing would run
        raise CompressError(
            f"{source}: the run's data is the user dataset {user!r} (code that importing would run); "
            f"{command} does not run code a file chooses: if you trust it, name it yourself: --data {user}"
        )


def _load_torch(
    name: str, ckpt: Path, override: str | None, trusted: frozenset[str], data: ImageData, notes: list[str]
) -> Artifact | None:
    """A checkpoint's model, rebuilt as the file records it (structure included), checked against the data;
    None (and a note) for one of a model passed to compress.run as a Python object."""
    ck = open_checkpoint(ckpt, str(ckpt))
    if override is None and ck.model is not None and ck.model.startswith(PYTHON_OBJECT):
        notes.append(
            f"{ckpt} is a checkpoint of a model passed to compress.run as a Python object: not measured (only "
            f"that process could rebuild it; load its weights into your model: {ckpt.with_suffix('.safetensors').name})"
        )
        return None
    check_factory(ckpt, ck.model, override, trusted)
    model_name = override or ck.model
    if model_name is None:
        raise CompressError(f"{ckpt}: a plain state_dict does not name its model; pass {ckpt}:MODEL_NAME")
    if ck.num_classes is not None and ck.num_classes != data.num_classes:
        raise CompressError(f"{ckpt}: the model has {ck.num_classes} classes but the data has {data.num_classes}")
    if ck.in_channels is not None and ck.in_channels != data.channels:
        raise CompressError(f"{ckpt}: the model takes {ck.in_channels}-channel images but the data has {data.channels}")
    model = ck.build(str(ckpt), model=model_name, num_classes=data.num_classes, in_channels=data.channels)
    role = ckpt.stem if ckpt.stem in ("teacher", "student") else "model"
    return Artifact(name, role, "torch", "fp32", ckpt, "checkpoint", model=model, factory=model_name)


def check_factory(
    ckpt: Path,
    recorded: str | None,
    override: str | None,
    trusted: frozenset[str],
    *,
    command: str = "compress bench",
    how: str | None = None,
) -> None:
    """Refuse a user factory (code) that only the file names: the user names it, or it is not built.
    ``command`` and ``how`` (the way that command lets the user name it) word the refusal.

    Also refused: a file that names a user factory measured as another model (``FILE.pt:OTHER``): the
    memory measurement's fresh process rebuilds the model the file names."""
    if recorded is None or not is_user_factory(recorded) or recorded in trusted:
        return
    if how is None:
        how = f"{ckpt}:{recorded}"
        if ckpt.parent.parent.name == "checkpoints":  # in a run: one name covers all its checkpoints
            how += f" (or {ckpt.parent.parent.parent}:{recorded} for the whole run)"
    how = f"if you trust it, name it yourself: {how}"
    if override is not None:
        raise CompressError(
            f"{ckpt}: the file records the user model factory {recorded!r}, not {override!r}; {command} "
            f"measures a file as the model it records, and does not run code a file chooses: {how}"
        )
    raise CompressError(
        f"{ckpt}: the file names the user model factory {recorded!r} (code that importing would run); "
        f"{command} does not run code a file chooses: {how}"
    )


def _meta_int(path: Path, props: dict[str, str], key: str) -> int:
    try:
        value = int(props[key])
    except (TypeError, ValueError):
        value = -1
    if value <= 0:
        raise CompressError(
            f"{path}: metadata key {key!r} is malformed ({props[key][:40]!r}: expected a positive integer)"
        )
    return value


def _meta_size(path: Path, props: dict[str, str]) -> tuple[int, int]:
    try:
        size = json.loads(props["image_size"])
    except (TypeError, ValueError):  # JSONDecodeError is a ValueError
        size = None
    if not (isinstance(size, list) and len(size) == 2 and all(type(d) is int and d > 0 for d in size)):
        raise CompressError(
            f"{path}: metadata key 'image_size' is malformed ({props['image_size'][:40]!r}: expected [height, width])"
        )
    return size[0], size[1]


def _onnx_artifact(name: str, path: Path, props: dict[str, str], data: ImageData) -> Artifact:
    if props.get("num_classes") and _meta_int(path, props, "num_classes") != data.num_classes:
        raise CompressError(f"{path}: the model has {props['num_classes']} classes but the data has {data.num_classes}")
    if props.get("image_size") and props.get("channels"):
        h, w = _meta_size(path, props)
        shape = (_meta_int(path, props, "channels"), h, w)
        if shape != tuple(data.input_shape):
            raise CompressError(
                f"{path}: the model takes {'x'.join(map(str, shape))} images but the data has "
                f"{'x'.join(map(str, data.input_shape))}"
            )
    precision = props.get("precision")
    if precision is None:
        ops = {n.op_type for n in metadata.load(path, external_data=False).graph.node}
        precision = "int8" if ops & {"QuantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger"} else "fp32"
    return Artifact(name, props.get("role", "model"), "onnx", precision, path, "file")


TORCH_RUNTIMES = ("torch", "torch-compile")
ALIASES = {"ort": "onnxruntime"}  # the name --runtime took before OpenVINO joined


def onnx_runtimes_of(names: list[str]) -> list[str]:
    """The ONNX runtimes among ``--runtime``'s names (``ort`` is onnxruntime), each known and installed;
    one-line errors naming every choice, or how to install a missing one."""
    known = [*runtimes.RUNTIMES.names(), *TORCH_RUNTIMES]
    out = []
    for name in names:
        name = ALIASES.get(name, name)
        if name in TORCH_RUNTIMES:
            continue
        if name not in runtimes.RUNTIMES:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CompressError(f"--runtime: unknown runtime {name!r}{hint} (choose from {', '.join(known)})")
        out.append(name)
    runtimes.check(out, "--runtime")
    return list(dict.fromkeys(out))


def bench(
    models: list[str],
    *,
    data_name: str | None,
    root: str | None,
    options: dict[str, Any],
    runtimes: list[str],
    out: Path | None,
    quiet: bool = False,
    overwrite: bool = False,
) -> tuple[Path, dict[str, Any]]:
    onnx_runtimes = onnx_runtimes_of(runtimes)
    plan = Plan()
    for spec in models:
        plan.add(spec)
    if "torch" not in runtimes and "torch-compile" not in runtimes:
        plan.torch.clear()
    if not onnx_runtimes:
        plan.onnx.clear()
    if not plan.torch and not plan.onnx:
        raise CompressError(f"--runtime {','.join(runtimes)}: none of the models runs in it")
    options = {**options, "runtimes": onnx_runtimes or ["onnxruntime"]}
    try:
        cfg = BenchmarkConfig.model_validate(options)
    except ValidationError as exc:
        raise CompressError(format_validation_error(exc, options, "bench options")) from None
    data_cfg, data_source = _data_config(plan, data_name, root)
    try:
        data = data_cfg.open()
    except (OSError, ValueError) as exc:
        raise CompressError(f"data ({data_cfg.name}): {exc}") from None
    arts = [a for n, c, o, t in plan.torch if (a := _load_torch(n, c, o, t, data, plan.notes)) is not None]
    arts += [_onnx_artifact(n, p, props, data) for n, p, props in plan.onnx]
    # As in a run's report: teacher first, torch before ONNX, FP32 before INT8 (the speed-up reference).
    arts.sort(key=lambda a: (a.role != "teacher", a.format == "onnx", a.precision == "int8"))
    out = out or Path("runs") / f"bench-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if (out / "report.json").exists() and not overwrite:
        raise CompressError(f"--out: {out} already holds a report; pass --overwrite or choose another directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompressError(f"--out: cannot create {out}: {exc.strerror or exc}") from None
    device = torch.device("cuda" if "cuda" in cfg.devices and torch.cuda.is_available() else "cpu")
    started = dt.datetime.now(dt.UTC)
    rows, notes = [], []
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True, quiet=quiet)
    with Progress(console=console, disable=quiet, transient=True) as prog:
        task = prog.add_task("bench", total=len(arts))
        for art in arts:
            prog.update(task, description=f"bench {art.name}")
            row, art_notes = measure(art, data, cfg.model_copy(update={"torch_snapshots": True}), device)
            rows.append(row)
            notes += art_notes
            prog.advance(task)
    report = {
        "recipe": {"name": out.name, "benchmark": cfg.model_dump(mode="json")},
        "environment": environment(cfg.threads),
        "data": {
            "name": data_cfg.name,
            "source": data_source,
            "train_images": data.train_size,
            "test_images": data.test_size,
            "num_classes": data.num_classes,
            "input_shape": list(data.input_shape),
        },
        "models": models,
        "stages": [],
        "artifacts": rows,
        "notes": sorted(set(notes + plan.notes)),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_dir": str(out),
        "label": out.name,
    }
    report_mod.write(out, report)
    if not quiet:
        report_mod.print_table(report, console)
        console.print(f"bench directory: {out}")
    return out, report
