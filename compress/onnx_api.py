"""ONNX on the model or file you already have: ``export_onnx``, ``quantize_onnx``, ``measure``.

No recipe, no run directory: each function takes an ``nn.Module`` or an ONNX path and is the code the
export and quantize stages and the report run (``stages.export.export_checked``, ``quantization.ptq``
and ``quantization.schemes``, ``bench.measure``). Compare the peers::

    nncf.quantize(model, nncf.Dataset(loader, transform))          # NNCF
    quantize_static(pre, out, reader, quant_format=..., ...)       # ORT (after quant_pre_process)
    quantize_onnx("model.onnx", loader)                            # here: pre-process, QDQ, host-exact scheme

Every user error is one ``CompressError`` line; a parity failure is one ``StageFailed`` line; no file
is ever left half-written.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress import metadata
from compress.bench import measure as bench_measure
from compress.config import BenchmarkConfig
from compress.context import Artifact
from compress.data import ImageData
from compress.deploy import ModelInfo
from compress.env import library_versions
from compress.errors import CompressError, first_line
from compress.files import atomic_save
from compress.onnx_utils import session
from compress.quantization import ptq
from compress.quantization.calibration import METHODS, ArrayReader, BatchReader
from compress.quantization.schemes import SCHEMES, choose
from compress.stages.export import export_checked

__all__ = ["Exported", "Quantized", "export_onnx", "measure", "quantize_onnx"]

ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class Exported:
    """What :func:`export_onnx` wrote: the file and how closely ONNX Runtime reproduced PyTorch."""

    path: Path
    parity: dict[str, float]  # max_abs_diff, max_abs_logit, argmax_agreement, relative_error, batch
    input: str  # the graph input, described (name, dtype, layout, who normalizes)


@dataclass(frozen=True)
class Quantized:
    """What :func:`quantize_onnx` wrote, with the scheme it chose and why."""

    path: Path
    scheme: str
    reason: str  # e.g. "auto: u8s8_reduce_range is exact on this CPU (avx2); u8s8 is not (...)"
    exact_here: bool  # ORT's INT8 kernels on this CPU compute the scheme exactly
    calibration_images: int
    metadata: dict[str, str] = field(repr=False, default_factory=dict)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    data: ImageData | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    preprocess_in_graph: bool = True,
    input_layout: str = "nhwc",
    parity_batch: int = 64,
    properties: dict[str, str] | None = None,
) -> Exported:
    """Export ``model`` with torch.onnx (dynamo), check it with ``onnx.checker`` and prove ONNX Runtime
    gives PyTorch's logits within ``atol + rtol * max|logit|`` (else one StageFailed line, no file).

    Without ``data`` the graph takes what ``model`` takes (float32, ``example_inputs``'s shape) and
    parity runs on ``example_inputs``. With ``data`` (a DataBundle; ``example_inputs`` unused) the
    file is self-describing, as the export stage writes it: uint8 pixels in (``input_layout``),
    normalization in the graph, class names and input contract in its metadata, parity on
    ``parity_batch`` real test images.
    ``properties``: more metadata (e.g. ``{"model": "resnet20"}``).

        model = torchvision.models.resnet18(num_classes=10)
        result = compress.export_onnx(model, "r18.onnx", torch.randn(1, 3, 64, 64))
        print(result.parity["max_abs_diff"])
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise CompressError(f"{path}: the ONNX file's name must end in .onnx")
    info = None
    if data is None and example_inputs is None:
        raise CompressError("example_inputs: give an example batch (N, C, H, W), or data= to export on real images")
    if data is not None:
        if input_layout not in ("nhwc", "nchw"):
            raise CompressError(f"input_layout: {input_layout!r} is not nhwc or nchw")
        info = metadata.model_info(data, preprocess_in_graph=preprocess_in_graph, layout=input_layout)
        raw = data.raw("test", range(min(parity_batch, data.test_size)))
        x, feed = data.normalize(raw), torch.from_numpy(info.prepare(raw.numpy(), layout="nchw"))
    else:
        x = example_inputs if isinstance(example_inputs, torch.Tensor) else _single(example_inputs)
        x = x.detach().cpu().float()
        # a dynamic batch axis is traced from two images (one specializes the axis to 1)
        feed = x = torch.cat([x, x]) if dynamic_batch and len(x) == 1 else x
    tmp = path.with_name(f".{path.stem}.unchecked.onnx")
    try:
        check = export_checked(
            model, info, tmp, x, feed, opset=opset, atol=atol, rtol=rtol, dynamic_batch=dynamic_batch
        )
        props = _provenance(type(model).__name__) | (properties or {})
        if info is not None:
            props |= info.to_metadata()
        metadata.update(tmp, props, strip_node_debug=True, dest=path)
    except OSError as exc:
        raise CompressError(f"{path}: cannot write it: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return Exported(path, check, info.describe() if info else f"input: float32 NCHW x{list(x.shape[1:])}")


def quantize_onnx(
    path: str | Path,
    calibration_data: Any,
    *,
    out: str | Path | None = None,
    scheme: str = "auto",
    calibration: str = "percentile",
    per_channel: bool = True,
    percentile: float = 99.999,
    batches: int = 16,
    batch_size: int = 32,
    chunk: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    properties: dict[str, str] | None = None,
) -> Quantized:
    """Static INT8 of any float ONNX classifier (QDQ, per-channel weights, ORT's ``quant_pre_process``
    first, ``scheme="auto"``: the fastest INT8 scheme ORT computes exactly on this CPU), written to
    ``out`` (default ``<name>.int8.onnx`` beside it). The file keeps its input/output contract and
    metadata, plus the scheme and what it was calibrated on.

    ``calibration_data``: batches as the model takes them (numpy arrays or tensors, or a DataLoader
    yielding ``(x, y)``; the first ``batches`` are used), or a DataBundle: ``batches`` × ``batch_size``
    training images fed as the file's metadata says, else normalized with the data's (or the given
    ``mean``/``std``) statistics.

        loader = DataLoader(train_set, batch_size=32)
        result = compress.quantize_onnx("model.onnx", loader)
        print(result.path, result.reason)
    """
    src = Path(path)
    sess = _open(src)
    inp = sess.get_inputs()[0]
    dst = Path(out) if out is not None else src.with_name(f"{src.stem}.int8.onnx")
    if dst.resolve() == src.resolve():
        raise CompressError(f"out: {dst} is the file being quantized; choose another name")
    if scheme != "auto" and scheme not in SCHEMES.names():
        raise CompressError(f"scheme: {scheme!r} is not auto or one of {', '.join(SCHEMES.names())}")
    if calibration not in METHODS:
        raise CompressError(f"calibration: {calibration!r} is not one of {', '.join(METHODS)}")
    if calibration == "distribution":
        raise CompressError("calibration: distribution gives symmetric ranges meant for FP8; use percentile")
    if isinstance(calibration_data, ImageData):
        fixed = bench_measure.fixed_batch(sess)  # a graph exported for one batch size takes only that one:
        if fixed is not None:  # as many images, in batches of that size
            batches, batch_size = max(1, batches * batch_size // fixed), fixed
        feed = _feeder(sess, calibration_data, mean, std)
        reader: BatchReader | ArrayReader = BatchReader(calibration_data, inp.name, batches, batch_size, feed)
        seen = {"calibration_data": "DataBundle training split, evenly spaced"}
    else:
        reader = ArrayReader(_batches(calibration_data, inp, batches, src), inp.name)
        seen = {"calibration_data": "batches given by the caller"}
    choice = choose(scheme)
    with tempfile.TemporaryDirectory(prefix="compress-quant-") as tmp_name:
        pre, raw = Path(tmp_name) / "pre.onnx", Path(tmp_name) / "int8.onnx"
        try:
            ptq.preprocess(src, pre)
            ptq.static(
                pre, raw, reader, method=calibration, percentile=percentile, per_channel=per_channel,
                scheme=choice.scheme, chunk=chunk,
            )  # fmt: skip
        except CompressError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT's quantizer raises many types; the first line says enough
            raise CompressError(f"{src}: onnxruntime could not quantize it: {first_line(exc)}") from None
        how = ptq.describe(choice.scheme, per_channel=per_channel, calibration=calibration)
        props = metadata.read(src) | (properties or {}) | choice.scheme.metadata() | seen
        props |= {"precision": "int8", "source": src.name, "quantization": how}
        props["calibration_images"] = str(reader.images)
        written = metadata.update(raw, props, dest=dst)
    return Quantized(dst, choice.scheme.name, choice.reason, choice.probe.exact, reader.images, written)


def measure(
    path_or_model: str | Path | nn.Module,
    data: Any,
    *,
    batch_sizes: Sequence[int] = (1,),
    threads: int | None = None,
    warmup: int = 5,
    iters: int = 50,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    memory: bool = False,
    name: str | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 on ``data``'s test split, size, parameters, MACs and CPU latency of an ONNX file
    or an ``nn.Module``, measured as a run's report measures them (``bench.measure``). ``data``: anything
    :func:`load_data` takes.

    Returns ``{"top1", "top5", "size_bytes", "params", "macs", "latency": {batch: {"p50_ms",
    "p90_ms"}}, "row": report row, "notes": [...]}``. An ONNX file without compress metadata is fed
    the test images normalized with ``mean``/``std`` (default: the data's); a module's size is that
    of its saved state_dict. ``memory=True``: peak RSS of an ONNX file in a fresh process.

        data = DATASETS.get("digits")().open()
        numbers = compress.measure("model.int8.onnx", data, batch_sizes=(1, 32))
        print(numbers["top1"], numbers["latency"][1]["p50_ms"])
    """
    cfg = BenchmarkConfig(batch_sizes=list(batch_sizes), threads=threads, warmup=warmup, iters=iters, devices=["cpu"])
    data = load_data(data)
    with tempfile.TemporaryDirectory(prefix="compress-measure-") as tmp:
        if isinstance(path_or_model, nn.Module):
            model = path_or_model
            saved = Path(tmp) / "state_dict.pt"
            atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, saved)
            art = Artifact(name or type(model).__name__, "model", "torch", "fp32", saved, "api", model=model)
            row, notes = bench_measure.measure(art, data, cfg, torch.device("cpu"), memory=False)
        else:
            src = Path(path_or_model)
            sess = _open(src)
            precision = metadata.read(src).get("precision") or "fp32"
            art = Artifact(name or src.name, "model", "onnx", precision, src, "file")
            feed = _feeder(sess, data, mean, std)
            row, notes = bench_measure.measure(art, data, cfg, torch.device("cpu"), feed=feed, memory=memory)
    latency = {r["batch_size"]: {"p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"]} for r in row["latency"]}
    keys = ("size_bytes", "gzip_bytes", "params", "nonzero_params", "macs", "peak_rss_bytes")
    return {"top1": row["accuracy"], "top5": row["top5"], **{k: row[k] for k in keys}, "latency": latency,
            "row": row, "notes": notes}  # fmt: skip


def load_data(data: Any, *, image_size: int | None = None, field: str = "data") -> ImageData:
    """The DataBundle every function here (and ``compress.run``'s ``data=``) works on, from: a
    DataBundle; a dataset config dict (``{"name": "cifar10", "root": ...}``, ``{"name": "mydata:load"}``),
    validated like a recipe's ``data:``; or torch Datasets of (image, label) as ``(train, test,
    class_names)`` (or ``(train, test)`` with a ``.classes`` attribute), decoded once.

        data = compress.load_data((train_set, test_set, ["cat", "dog"]), image_size=64)
    """
    if isinstance(data, ImageData):
        return data
    if isinstance(data, dict):
        from compress.recipe import validate_data

        cfg = validate_data(data, field)
        try:
            return cfg.open()
        except (OSError, ValueError) as exc:
            raise CompressError(f"{field} ({cfg.name}): {exc}") from None
    from compress.data.user import split_return, to_bundle

    train, test, names = split_return(data, f"{field}: got")
    return to_bundle(train, test, names, image_size=image_size, field=field)


# --------------------------------------------------------------------------- helpers
def _open(path: Path):
    """An ORT session on a one-input ONNX file; every way it can be unusable is one line naming it."""
    if not path.is_file():
        raise CompressError(f"{path}: no such file")
    metadata.load(path, external_data=False)  # not ONNX / truncated: one line
    try:
        sess = session(path)
    except Exception as exc:  # noqa: BLE001 - ORT raises several types
        raise CompressError(f"{path}: onnxruntime cannot load it: {first_line(exc)}") from None
    if len(sess.get_inputs()) != 1:
        names = ", ".join(i.name for i in sess.get_inputs())
        raise CompressError(f"{path}: the model has {len(sess.get_inputs())} inputs ({names}); one image input needed")
    return sess


def _feeder(sess, data: ImageData, mean, std) -> Callable[[torch.Tensor], np.ndarray]:
    """uint8 NCHW images -> this file's input: its compress metadata, else ``mean``/``std`` (default
    the data's) in DataBundle.normalize's arithmetic."""
    if mean is None and std is None:
        return metadata.feeder(sess, data)
    if mean is None or std is None or len(mean) != data.channels or len(std) != data.channels:
        raise CompressError(f"mean/std: give both, one value per channel ({data.channels})")
    info = ModelInfo(
        class_names=tuple(data.class_names), channels=data.channels, height=data.input_shape[1],
        width=data.input_shape[2], layout="nchw", input_dtype="float32", preprocess_in_graph=False,
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
    )  # fmt: skip
    return lambda x: info.prepare(x.cpu().numpy(), layout="nchw")


def _batches(source: Any, inp, limit: int, path: Path) -> list[np.ndarray]:
    """Up to ``limit`` calibration batches as numpy arrays of the input's dtype, checked against its
    rank and static dimensions."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        source = [source]  # one batch
    try:
        items = iter(source)
    except TypeError:
        raise CompressError(
            f"calibration_data: {type(source).__name__} is not batches (arrays, tensors, a DataLoader or a DataBundle)"
        ) from None
    want = ORT_FLOAT.get(inp.type)
    if want is None:
        raise CompressError(f"{path}: input {inp.name!r} is {inp.type}; calibration batches feed float inputs")
    out: list[np.ndarray] = []
    for item in items:
        if len(out) >= limit:
            break
        x = item[0] if isinstance(item, (tuple, list)) else item  # a DataLoader's (x, y)
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise CompressError(f"calibration_data: batch {len(out)} is {x.dtype}; the model takes {inp.type}")
        if x.ndim != len(inp.shape) or any(
            isinstance(d, int) and d != n for d, n in zip(inp.shape[1:], x.shape[1:], strict=False)
        ):
            raise CompressError(
                f"calibration_data: batch {len(out)} has shape {list(x.shape)}; {path} takes {list(inp.shape)}"
            )
        out.append(np.ascontiguousarray(x, dtype=want))
    if not out:
        raise CompressError("calibration_data: no batches")
    return out


def _single(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, (tuple, list)) or len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        raise CompressError("example_inputs: one image tensor (N, C, H, W), or a tuple holding one")
    return inputs[0]


def _provenance(model: str) -> dict[str, str]:
    versions = library_versions()
    return {
        "producer": f"compress {versions['compress']}",
        "model": model,
        "role": "model",
        "precision": "fp32",
        "versions": json.dumps(versions, sort_keys=True),
    }
