"""``compress quantize MODEL.onnx --data DATA``: an ONNX file exported by anyone -> INT8, both measured.

The file needs nothing of ours: a plain ``torch.onnx.export`` of a classifier with one float NCHW
input. Its input size comes from the graph's static dimensions (or ``--image-size``); it carries no
normalization, so the images are normalized with the dataset's mean/std unless ``--mean/--std`` say
what the model was trained with, and the report says which. The INT8 file (``onnx_api.quantize_onnx``:
the quantize stage's pre-processing, QDQ and host-exact scheme) keeps the source's contract, float in
and logits out, and its metadata records what it was calibrated on. Top-1, size and latency of both
files go side by side into a report directory ``compress report`` reads. The directory appears only
complete: everything is written into a hidden sibling first and renamed at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from compress import onnx_api
from compress.bench import report as report_mod
from compress.data import DATASETS, DatasetConfig, ImageData
from compress.deploy import ModelInfo
from compress.env import environment
from compress.errors import CompressError, first_line
from compress.recipe import format_validation_error, recipe_model

FLOAT_INPUTS = ("tensor(float)", "tensor(double)", "tensor(float16)")


# --------------------------------------------------------------------------- data (shared with export)
def data_config(
    spec: str,
    *,
    root: str | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    num_classes: int | None = None,
    field: str = "--data",
    resize_shorter: int | None | bool = True,
) -> DatasetConfig:
    """DATA as the command line gives it -> the recipe's data config, validated by the recipe's own
        data union: a registered dataset name (with ``--root`` where it takes one), an ImageFolder root
        directory, or ``package.module:function`` (a user dataset). Fields the dataset has are filled from
        what the model takes (image size, channels, classes); augmentation is off (nothing trains). An image
    folder is viewed as the model's metadata says (``resize_shorter``: the side to resize to before the
    center crop; None: resized straight to the size); True: the folder's default view."""
    path = Path(spec)
    if path.is_dir():
        if root is not None:
            raise CompressError(f"{field}: {spec} is a folder already; drop --root")
        split = "val" if (path / "val").is_dir() else "test"
        raw: dict[str, Any] = {"name": "imagefolder", "root": str(path), "val_split": split}
        if resize_shorter is not True and image_size is not None:
            # floor(size / ratio) == resize_shorter exactly (the +0.5 keeps float rounding off the floor)
            raw["crop_ratio"] = None if resize_shorter in (None, False) else image_size[0] / (resize_shorter + 0.5)
    else:
        raw = {"name": spec, **({"root": root} if root is not None else {})}
    known = DATASETS.entries.get(raw["name"])
    fields = known.model_fields if known is not None else {}
    if image_size is not None and "image_size" in fields:
        if image_size[0] != image_size[1]:
            raise CompressError(
                f"{field}: {raw['name']} resizes to square images, the model takes {image_size[0]}x{image_size[1]}"
            )
        raw["image_size"] = image_size[0]
    for key, value in (("channels", channels), ("num_classes", num_classes), ("augment", False)):
        if value is not None and key in fields:
            raw[key] = value
    adapter = TypeAdapter(recipe_model().model_fields["data"].annotation)
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        raise CompressError(format_validation_error(exc, raw, field).replace("recipe.", "")) from None


def load_data(cfg: DatasetConfig, field: str = "--data") -> ImageData:
    try:
        return cfg.open()
    except (OSError, ValueError) as exc:
        raise CompressError(f"{field} ({cfg.name}): {first_line(exc)}") from None


# --------------------------------------------------------------------------- the model's input
def _input(sess: Any, path: Path, image_size: int | None) -> tuple[str, int | None, tuple[int, int] | None, bool]:
    """(input name, channels if static, (H, W) if known, has compress metadata); one line for an
    input this command cannot feed."""
    from compress.deploy import read_metadata

    inp = sess.get_inputs()[0]
    described = "compress.metadata_version" in read_metadata(sess)
    if not described and inp.type not in FLOAT_INPUTS:
        raise CompressError(
            f"{path}: input {inp.name!r} is {inp.type}; compress quantize takes float (N, C, H, W) images"
        )
    if len(inp.shape) != 4:
        raise CompressError(
            f"{path}: input {inp.name!r} has rank {len(inp.shape)} ({inp.shape}); compress quantize takes "
            "(N, C, H, W) images"
        )
    # A fixed batch axis (plain torch.onnx.export's default): calibrated, evaluated and timed at that size.
    _, c, h, w = (d if isinstance(d, int) and d > 0 else None for d in inp.shape)
    if described:
        return inp.name, None, None, True
    if image_size is not None:
        if (h, w) not in ((None, None), (image_size, image_size)):
            raise CompressError(f"--image-size: the model takes {h}x{w} images, not {image_size}x{image_size}")
        h = w = image_size
    if h is None or w is None:
        raise CompressError(
            f"{path}: the input's height/width are not fixed in the graph ({inp.shape}); pass --image-size"
        )
    return inp.name, c, (h, w), False


def _classes(sess: Any) -> int | None:
    dim = sess.get_outputs()[0].shape[-1] if sess.get_outputs()[0].shape else None
    return dim if isinstance(dim, int) and dim > 0 else None


# --------------------------------------------------------------------------- the command
def quantize(
    model: Path,
    *,
    data: str,
    root: str | None = None,
    calibration: str = "percentile",
    calibration_batches: int = 16,
    scheme: str = "auto",
    mean: list[float] | None = None,
    std: list[float] | None = None,
    image_size: int | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    batch_sizes: list[int] | None = None,
    threads: int | None = None,
    warmup: int = 5,
    iters: int = 50,
) -> tuple[Path, dict[str, Any]]:
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    sess = onnx_api._open(model)  # missing, not ONNX, not loadable, several inputs: one line
    name, channels, size, described = _input(sess, model, image_size)
    if (mean is None) != (std is None):
        raise CompressError("--mean/--std: give both (one value per channel) or neither")
    if described and mean is not None:
        raise CompressError(f"{model}: its metadata says how it normalizes; drop --mean/--std")
    out = out or Path("runs") / f"quantize-{model.stem}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out = out.resolve()  # ("--out ." has no name to stage a sibling under)
    if out.exists() and not overwrite:
        raise CompressError(f"--out: {out} already exists; pass --overwrite or choose another directory")
    if out.exists() and (not out.is_dir() or not (out / "report.json").is_file()):
        raise CompressError(f"--out: {out} exists and is not a compress report directory; refusing to replace it")
    if model.resolve().is_relative_to(out):
        raise CompressError(f"--out: {out} holds {model.name}, which --overwrite would delete; choose another folder")
    classes = _classes(sess)
    view: dict[str, Any] = {"image_size": size}
    if described:  # a compress model: the folder viewed as its evaluation was (size, resize + crop)
        from compress.deploy import DeployError, ModelInfo, read_metadata

        try:
            info = ModelInfo.from_metadata(read_metadata(sess), str(model))
        except DeployError as exc:
            raise CompressError(str(exc)) from None
        view = {"image_size": (info.height, info.width), "resize_shorter": info.resize_shorter}
    cfg = data_config(data, root=root, channels=channels, num_classes=classes, **view)
    bundle = load_data(cfg)
    if size is not None and (channels or bundle.channels, *size) != tuple(bundle.input_shape):
        shape = "x".join(map(str, (channels or "C", *size)))
        raise CompressError(
            f"{model}: the model takes {shape} images but {cfg.name} has {'x'.join(map(str, bundle.input_shape))}"
        )
    if classes is not None and classes != bundle.num_classes:
        raise CompressError(f"{model}: the model has {classes} outputs but {cfg.name} has {bundle.num_classes} classes")
    if mean is not None and (len(mean) != bundle.channels or len(std or ()) != bundle.channels):
        raise CompressError(f"--mean/--std: one value per channel ({bundle.channels})")
    stats = (tuple(mean), tuple(std or ())) if mean is not None else (tuple(bundle.mean), tuple(bundle.std))
    normalization = _normalization(described, mean is not None, cfg.name, stats)
    console.print(f"quantize: {normalization}")
    # The hidden sibling: the report directory appears only complete.
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir(parents=True)
    except OSError as exc:
        raise CompressError(f"--out: cannot create {out}: {exc.strerror or exc}") from None
    try:
        opts = {"scheme": scheme, "calibration": calibration, "calibration_batches": calibration_batches}
        opts |= {"batch_sizes": batch_sizes, "threads": threads, "warmup": warmup, "iters": iters}
        report = _run(model, stage, out, sess, name, described, bundle, cfg, stats, normalization, console, opts)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if not quiet:
        report_mod.print_table(report, console)
        console.print(f"INT8 model: {out / f'{model.stem}.int8.onnx'}\nreport directory: {out}")
    return out, report


def _normalization(described: bool, given: bool, dataset: str, stats: tuple[tuple[float, ...], ...]) -> str:
    if described:
        return "input fed as the file's compress metadata says"
    values = f"mean [{', '.join(f'{v:.4g}' for v in stats[0])}], std [{', '.join(f'{v:.4g}' for v in stats[1])}]"
    if given:
        return f"input normalized with --mean/--std ({values})"
    return (
        f"input normalized with {dataset}'s mean/std ({values}): the file does not say what it was trained with; "
        "pass --mean/--std if it expects others"
    )


def _run(model, stage, out, sess, name, described, bundle, cfg, stats, normalization, console, opts) -> dict:
    """Quantize into ``stage``, measure both files, write the report there; returns the report."""
    started = dt.datetime.now(dt.UTC)
    mean, std = (None, None) if described else stats
    props: dict[str, str] = {
        "dataset": cfg.name,
        "calibration_dataset": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
        "calibration_normalization": normalization,
    }
    if not described:  # the source's contract (float NCHW in, logits out), written down for a deployer
        info = ModelInfo(
            class_names=tuple(bundle.class_names), channels=bundle.channels, height=bundle.input_shape[1],
            width=bundle.input_shape[2], layout="nchw", input_dtype="float32", preprocess_in_graph=False,
            mean=stats[0], std=stats[1], input_name=name, output_name=sess.get_outputs()[0].name,
        )  # fmt: skip
        props |= info.to_metadata()
    t0 = time.perf_counter()
    int8 = stage / f"{model.stem}.int8.onnx"
    result = onnx_api.quantize_onnx(
        model, bundle, out=int8, scheme=opts["scheme"], calibration=opts["calibration"],
        batches=opts["calibration_batches"], mean=mean, std=std, properties=props,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    console.print(f"quantize: scheme {result.reason}")
    timing = {"batch_sizes": opts["batch_sizes"] or [1], "threads": opts["threads"]}
    timing |= {"warmup": opts["warmup"], "iters": opts["iters"]}
    rows, notes = [], []
    for path, final in ((model, model), (int8, out / int8.name)):
        console.print(f"measure {final.name}")
        m = onnx_api.measure(path, bundle, mean=mean, std=std, memory=True, name=final.name, **timing)
        row = m["row"] | {"path": str(final), "role": "model", "stage": "input" if path == model else "quantize"}
        row["input"] = f"{name}: float32 NCHW (normalize (x/255 - mean)/std first)" if not described else None
        rows.append(row)
        notes += [n.replace(str(stage), str(out)) for n in m["notes"]]
    fp32_row, int8_row = rows
    notes.append(normalization)
    for a, b in zip(fp32_row["latency"], int8_row["latency"], strict=True):
        ratio = a["p50_ms"] / b["p50_ms"]
        verdict = f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× SLOWER"
        notes.append(
            f"{int8_row['name']} is {verdict} than {fp32_row['name']} (cpu, batch {a['batch_size']}, "
            f"{a['threads']} threads: {b['p50_ms']:.3f} vs {a['p50_ms']:.3f} ms p50)"
        )
    drop = fp32_row["accuracy"] - int8_row["accuracy"]
    change = f"{100 * abs(drop):.2f} pt {'lower' if drop > 0 else 'higher'}" if drop else "unchanged"
    fp32_top1, int8_top1 = 100 * fp32_row["accuracy"], 100 * int8_row["accuracy"]
    notes.append(f"top-1 {fp32_top1:.2f}% (FP32) → {int8_top1:.2f}% (INT8): {change}")
    metrics = {
        "mode": "static",
        "scheme": result.scheme,
        "scheme_reason": result.reason,
        "scheme_exact_here": result.exact_here,
        "calibration": opts["calibration"],
        "calibration_images": result.calibration_images,
        "fp32_bytes": fp32_row["size_bytes"],
        "int8_bytes": int8_row["size_bytes"],
        "normalization": normalization,
    }
    report = {
        "recipe": {"name": out.name, "benchmark": {**timing, "devices": ["cpu"]}},
        "environment": environment(opts["threads"]),
        "data": {
            "name": cfg.name,
            "source": "--data",
            "train_images": bundle.train_size,
            "test_images": bundle.test_size,
            "num_classes": bundle.num_classes,
            "input_shape": list(bundle.input_shape),
        },
        "models": [str(model)],
        "stages": [{"index": 1, "kind": "quantize", "seconds": seconds, "metrics": metrics}],
        "artifacts": rows,
        "notes": notes,
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_dir": str(out),
        "label": out.name,
    }
    report_mod.write(stage, report)
    return report
