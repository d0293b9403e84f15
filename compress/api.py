"""The Python API: :func:`run` a recipe on the caller's own models and data, and the building
blocks :func:`prune` and :func:`distill` on any ``nn.Module`` without a recipe, each the same code
the stages run.

A model or dataset passed as a Python object goes through the pipeline's ordinary path: it is kept
(as a private deep copy) in this process under a name such as ``compress.api:python_MyNet_1a2b3c4d5e``,
which the recipe's ``student.model`` / ``data.name`` then name like any user factory, so building,
checkpointing, the meta-device reference and ``--resume`` work unchanged. The name is a hash of the
object's content, so the same module in a later process resumes the same run. Outside the process
that passed it, nothing can rebuild such an object: meeting the name there is one line saying so
(the run's ONNX files are self-contained and measure anywhere).

    result = compress.run("recipe.yaml", student=my_net, data=(train_ds, test_ds, class_names))
    int8 = result.best(format="onnx", precision="int8")
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.data.base import DatasetConfig, ImageData
from compress.errors import CompressError, StageFailed, first_line

if TYPE_CHECKING:  # the rest is imported when used: a process that only resolves a name stays light
    from pydantic import BaseModel

    from compress.config import RecipeBase

__all__ = ["ArtifactResult", "RunResult", "distill", "prune", "run"]

#: objects passed from Python, by attribute name (``compress.api:<name>``): model and data factories
_OBJECTS: dict[str, Callable[..., Any]] = {}
PREFIX = "python_"


def __getattr__(name: str) -> Any:
    """``compress.api:python_…`` resolves to an object passed to :func:`run` in this process."""
    if name in _OBJECTS:
        return _OBJECTS[name]
    if name.startswith(PREFIX):
        raise CompressError(
            f"'compress.api:{name}' was a Python object passed to compress.run in another process; nothing "
            "else can rebuild it (the run's ONNX files measure anywhere; for the torch model, load the "
            "checkpoint's state_dict into your own module)"
        )
    raise AttributeError(f"module 'compress.api' has no attribute {name!r}")


def _digest(*items: bytes | torch.Tensor) -> str:
    """A short content hash of names and tensors (shape, dtype and bytes; a meta tensor by its shape)."""
    h = hashlib.sha1()
    for item in items:
        if isinstance(item, torch.Tensor):
            h.update(repr((tuple(item.shape), str(item.dtype))).encode())
            if item.device.type != "meta":
                h.update(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(item)
    return h.hexdigest()[:10]


def _copy(module: nn.Module, device: str) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on ``device`` ("meta": no data),
    copying each tensor once, straight to its destination (tied weights stay tied)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        if id(p) not in memo:
            data = torch.empty_like(p, device="meta") if device == "meta" else p.detach().to(device, copy=True)
            memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
    for b in module.buffers():
        if id(b) not in memo:
            memo[id(b)] = torch.empty_like(b, device="meta") if device == "meta" else b.detach().to(device, copy=True)
    return copy.deepcopy(module, memo)


def register_module(module: Any, role: str) -> str:
    """The model name under which ``module`` (a private CPU copy of it as it is now) builds."""
    if not isinstance(module, nn.Module):
        raise CompressError(f"{role}: expected an nn.Module, got {type(module).__name__}")
    cls = type(module)
    parts: list[bytes | torch.Tensor] = [f"{cls.__module__}.{cls.__qualname__}".encode(), repr(module).encode()]
    for key, tensor in module.state_dict().items():
        parts += [key.encode(), tensor]
    name = f"{PREFIX}{cls.__name__}_{_digest(*parts)}"
    if name not in _OBJECTS:
        try:
            kept = _copy(module, "cpu")
        except Exception as exc:  # noqa: BLE001 - a module deepcopy cannot copy: one line
            raise CompressError(f"{role}: cannot copy the {cls.__name__}: {first_line(exc)}") from None

        def factory(num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
            """A fresh copy each call; on the meta device (Context.reference) without tensor data."""
            del num_classes, in_channels  # the module is what it is; the pipeline checks its output
            return _copy(kept, "meta" if torch.get_default_device().type == "meta" else "cpu")

        _OBJECTS[name] = factory
    return f"compress.api:{name}"


def register_data(bundle: ImageData) -> str:
    """The data name under which ``bundle`` loads (a user dataset returning it)."""
    name = f"{PREFIX}data_{_digest(bundle.fingerprint())}"
    if name not in _OBJECTS:
        _OBJECTS[name] = lambda: dataclasses.replace(bundle)  # the pipeline moves tensors on its own copy
    return f"compress.api:{name}"


# ----------------------------------------------------------------------------- run
@dataclass
class ArtifactResult:
    """One measured artifact of a run: a torch checkpoint or an ONNX file, with its report row."""

    name: str
    path: Path
    format: str  # "torch" | "onnx"
    precision: str  # "fp32" | "int8"
    metrics: dict[str, Any] = field(repr=False)  # the report's row: accuracy, size_bytes, params, latency, ...

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]


@dataclass
class RunResult:
    """What :func:`run` returns: the run directory, its report and every artifact."""

    run_dir: Path
    report: dict[str, Any] = field(repr=False)
    artifacts: list[ArtifactResult]

    @classmethod
    def read(cls, run_dir: Path) -> RunResult:
        path = run_dir / "report.json"
        report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        arts = [
            ArtifactResult(row["name"], Path(row["path"]), row["format"], row["precision"], row)
            for row in report.get("artifacts", [])
        ]
        return cls(run_dir=run_dir, report=report, artifacts=arts)

    def artifact(self, name: str) -> ArtifactResult:
        for art in self.artifacts:
            if art.name == name:
                return art
        raise KeyError(f"no artifact {name!r} (have: {', '.join(a.name for a in self.artifacts)})")

    def best(self, by: str = "accuracy", *, format: str | None = None, precision: str | None = None) -> ArtifactResult:
        """The best artifact by a report column: highest ``accuracy``/``top5``, else the smallest
        (``size_bytes``, ``gzip_bytes``, ``params``, ``macs``, ``peak_rss_bytes``); ties: the later one."""
        pool = [
            a
            for a in self.artifacts
            if (format is None or a.format == format)
            and (precision is None or a.precision == precision)
            and isinstance(a.metrics.get(by), (int, float))
        ]
        if not pool:
            raise KeyError(f"no artifact with a {by!r} value matches format={format!r}, precision={precision!r}")
        sign = 1 if by in ("accuracy", "top5") else -1
        return max(reversed(pool), key=lambda a: sign * a.metrics[by])


def _raw_recipe(recipe: Any) -> tuple[dict[str, Any], str]:
    from compress.config import RecipeBase
    from compress.recipe import read_recipe

    if isinstance(recipe, (str, Path)):
        return read_recipe(recipe), str(recipe)
    if isinstance(recipe, RecipeBase):
        return recipe.model_dump(mode="json"), "recipe"
    if isinstance(recipe, dict):
        return copy.deepcopy(recipe), "recipe"
    raise CompressError(f"recipe: expected a path, a dict or a recipe object, got {type(recipe).__name__}")


_DECODE_OPTIONS = ("image_size", "mean", "std", "augment", "batch_size", "eval_batch_size", "stream", "workers")


def _data_block(data: Any, given: Any) -> dict[str, Any]:
    """The recipe's ``data:`` for what the caller passed (see :func:`run`)."""
    if isinstance(data, dict):
        return copy.deepcopy(data)
    if isinstance(data, DatasetConfig):
        return data.model_dump(mode="json")
    options = dict(given) if isinstance(given, dict) and "name" not in given else {}
    unknown = sorted(set(options) - set(_DECODE_OPTIONS))
    if unknown:
        raise CompressError(f"data.{unknown[0]}: unknown field (a data: block without name: takes {_DECODE_OPTIONS})")
    from compress.data.user import split_return, to_bundle

    if isinstance(data, ImageData):
        for key in ("stream", "workers", "image_size"):
            if key in options:
                raise CompressError(f"data.{key}: data= is a ready {type(data).__name__}; it is used as it is")
        bundle = dataclasses.replace(data)
        for key in ("batch_size", "eval_batch_size", "augment", "mean", "std"):
            if key in options:
                setattr(bundle, key, tuple(options[key]) if key in ("mean", "std") else options[key])
    else:
        train, test, names = split_return(data, "data: compress.run got")
        size = options.pop("image_size", None)
        bundle = to_bundle(train, test, names, image_size=tuple(size) if isinstance(size, list) else size, **options)
    block = {k: getattr(bundle, k) for k in ("batch_size", "eval_batch_size", "augment", "mean", "std")}
    return {"name": register_data(bundle), **block}


def run(
    recipe: str | Path | dict[str, Any] | RecipeBase,
    *,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
    data: Any = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    resume: str | Path | None = None,
) -> RunResult:
    """Run a recipe end to end, as ``compress run`` does; return every artifact and the report.

    ``recipe``: a YAML path, a dict (validated exactly like a file) or a recipe object.
    ``teacher``/``student``: ``nn.Module``s you built; each replaces the recipe's whole
    ``teacher:``/``student:`` entry (which may then be left out). They are copied, never modified.
    ``data``: a dataset config dict (replaces the recipe's ``data:``), a :class:`DataBundle`, or
    torch Datasets of (image tensor or PIL image, label) as ``(train, test)`` /
    ``(train, test, class_names)`` / ``{"train", "test", "class_names"}``, decoded like a recipe's
    ``data: {name: pkg.mod:fn}``; the recipe's ``data:`` may then be a block without ``name:``
    holding image_size, mean, std, augment and batch sizes for it.

        result = compress.run("recipe.yaml", student=net, data=(train_ds, test_ds))
        print(result.best(format="onnx", precision="int8").accuracy)
    """
    from compress import pipeline
    from compress.recipe import validate_recipe

    raw, source = _raw_recipe(recipe)
    for role, module in (("student", student), ("teacher", teacher)):
        if module is not None:
            raw[role] = {"model": register_module(module, role)}
    if data is not None:
        raw["data"] = _data_block(data, raw.get("data"))
    rec = validate_recipe(raw, source)
    run_dir = pipeline.run(
        rec,
        Path(out) if out is not None else None,
        overwrite=overwrite,
        quiet=quiet,
        resume=Path(resume) if resume is not None else None,
    )
    return RunResult.read(run_dir)


# ----------------------------------------------------------------------------- building blocks
def _validated(cls: type[BaseModel], raw: dict[str, Any], source: str) -> Any:
    from pydantic import ValidationError

    from compress.config import format_validation_error

    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise CompressError(format_validation_error(exc, raw, source, cls)) from None


def _device(device: str | torch.device) -> torch.device:
    from compress.pipeline import resolve_device

    return device if isinstance(device, torch.device) else resolve_device(device)


def _logits(model: nn.Module, example: Any, what: str) -> torch.Tensor:
    if not isinstance(example, torch.Tensor):
        raise CompressError(f"{what}: example_inputs must be a tensor batch (N, C, H, W), got {type(example).__name__}")
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception as exc:  # noqa: BLE001 - the model cannot take the example: one line
        raise CompressError(
            f"{what}: the model cannot run on inputs of shape {tuple(example.shape)}: {first_line(exc)}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CompressError(f"{what}: the model returns {shape}; expected logits (batch, classes)")
    return out


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    ratio: float | None = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    method: str = "l1",
    round_to: int | None = None,
    ignore: Sequence[str | nn.Module] = (),
    global_pruning: bool = False,
    max_ratio: float = 0.9,
    head_ratio: float = 0.0,
    ratios: dict[str, float] | None = None,
    data: Any = None,
    taylor_batches: int = 4,
) -> nn.Module:
    """Structured channel pruning of ``model`` in place (tensors really shrink); returns it.

    The prune stage's code (torch-pruning's DependencyGraph): coupled layers are pruned together,
    the classifier producing the logits is never pruned, and the output shape is checked to be
    unchanged. ``ratio`` (default 0.5) of the channels go, or as many as meet ``target_macs`` /
    ``target_params`` (the fraction to keep). ``ignore``: layer names (fnmatch patterns) or the
    modules themselves. Criteria that read gradients (``taylor``) take ``data``, batches of
    (images, labels) to accumulate them on.

        pruned = compress.prune(model, torch.randn(1, 3, 32, 32), ratio=0.3)
    """
    from compress.data.user import BatchLoader
    from compress.importance import needs_gradients
    from compress.pruning.structured import StructuredOptions, accumulate_gradients, count, prune_step, search_ratio

    where = "compress.prune"
    names = {id(m): n for n, m in model.named_modules() if n}
    patterns = []
    for item in ignore:
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise CompressError(f"{where}: ignore holds a {type(item).__name__} that is not a layer of the model")
            patterns.append(names[id(item)])
        else:
            patterns.append(str(item))
    targets = (("ratio", ratio), ("target_macs", target_macs), ("target_params", target_params))
    given = [k for k, v in targets if v is not None]
    if len(given) > 1:
        raise CompressError(f"{where}: give one of ratio, target_macs, target_params (got {', '.join(given)})")
    for key, value in targets:
        if value is not None and not 0 < value < 1:
            raise CompressError(f"{where}: {key} must be between 0 and 1 (exclusive), got {value}")
    raw = {
        "method": method,
        "global_pruning": global_pruning,
        "ratios": ratios or {},
        "max_ratio": max_ratio,
        "round_to": round_to,
        "ignore": patterns,
        "taylor_batches": taylor_batches,
        "head_ratio": head_ratio,
    }
    opts = _validated(StructuredOptions, raw, where)
    opts.check_patterns(model, where)
    opts.check_heads(model, where)
    was_training = model.training
    out = _logits(model, example_inputs, where)
    shape, num_classes = out.shape, out.shape[-1]
    opts.check_overrides(model, example_inputs, num_classes, where)
    if needs_gradients(method):
        if data is None:
            raise CompressError(f"{where}: method {method!r} ranks channels by gradients; pass data= (batches)")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        accumulate_gradients(model, BatchLoader(data, f"{where}: data"), device, taylor_batches)
    if not given:
        ratio = 0.5
    if ratio is not None:
        prune_step(model, example_inputs, opts, ratio, num_classes)
    else:
        metric = "macs" if target_macs is not None else "params"
        keep = target_macs if target_macs is not None else target_params
        base = count(model, example_inputs)[0 if metric == "macs" else 1]
        found, _ = search_ratio(model, example_inputs, opts, int(base * keep), metric, num_classes)
        prune_step(model, example_inputs, opts, found, num_classes)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        now = model(example_inputs).shape
    if now != shape:
        raise StageFailed(f"{where}: output shape changed {tuple(shape)} -> {tuple(now)}")
    return model.train(was_training)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_loader: Any,
    *,
    epochs: int = 1,
    loss: str | list[dict[str, Any]] = "hinton",
    temperature: float | None = None,
    alpha: float | None = None,
    lr: float = 0.1,
    device: str | torch.device = "cpu",
    eval_loader: Any = None,
    optim: dict[str, Any] | None = None,
    quiet: bool = False,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Knowledge distillation of ``teacher`` into ``student`` (trained in place, moved to
    ``device``); returns ``(student, history)``, one row per epoch (train_loss, train_acc,
    test_acc on ``eval_loader`` or NaN, lr, seconds).

    The distill stage's code: a registered loss (``compress list``: hinton, dkd, ...; its
    ``temperature``/``alpha`` when it has them, else its defaults) or a list of loss terms as a
    recipe's ``kd.losses:``; SGD with nesterov and a cosine schedule (``optim``: any field of the
    recipe's ``optim:`` block). ``train_loader``/``eval_loader``: re-iterable (images, labels)
    batches with a length, e.g. torch DataLoaders. The teacher is moved to ``device`` too.

        student, history = compress.distill(student, teacher, loader, epochs=5)
    """
    import logging
    import tempfile

    from rich.console import Console

    from compress.context import Context
    from compress.data.user import BatchLoader
    from compress.distill.kd import KD
    from compress.training import OptimConfig, fit

    where = "compress.distill"
    if isinstance(loss, str):
        kd_raw: dict[str, Any] = {"loss": loss}
        kd_raw |= {k: v for k, v in (("temperature", temperature), ("alpha", alpha)) if v is not None}
    else:
        kd_raw = {"losses": loss}
    kd = _validated(KD, kd_raw, where)
    cfg = _validated(OptimConfig, {"lr": lr, **(optim or {})}, where)
    if not 1 <= epochs <= 10_000:
        raise CompressError(f"{where}: epochs must be between 1 and 10000, got {epochs}")
    dev = _device(device)
    train = BatchLoader(train_loader, f"{where}: train_loader")
    test = BatchLoader(eval_loader, f"{where}: eval_loader") if eval_loader is not None else None
    x0, _, _ = next(iter(train.batches()))
    example = x0[:2].to(dev)
    student.to(dev)
    teacher.to(dev)
    _logits(student, example, f"{where}: student")
    _logits(teacher, example, f"{where}: teacher")
    with tempfile.TemporaryDirectory(prefix="compress-distill-") as tmp:  # fit's per-epoch state file
        ctx = Context(
            recipe=None,  # type: ignore[arg-type] - fit reads no recipe when given its loaders
            device=dev,
            run_dir=Path(tmp),
            data=None,  # type: ignore[arg-type]
            models={"student": student, "teacher": teacher},
            specs={},
            quiet=quiet,
            console=Console(stderr=True, quiet=quiet),
            log=logging.getLogger("compress.api"),
        )
        objective = kd.objective(student, teacher, example, f"{where}: loss", cfg.precision, cfg.label_smoothing)
        with objective:
            label = f"distill ({kd.label()})"
            metrics = fit(ctx, student, objective, epochs, cfg, label, aux=objective.aux, loaders=(train, test))
    return student, metrics["history"]
