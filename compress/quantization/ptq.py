"""Post-training quantization of an ONNX file with onnxruntime.quantization: static INT8 (QDQ or
QOperator) from calibration data, dynamic INT8 (weights ahead of time, activations' ranges at run
time), and FP16 conversion. Every entry point writes ``dst`` only when it succeeded.

``quant_pre_process`` (shape inference + ORT graph optimization, so Conv+BN(+ReLU) are one node
before Q/DQ pairs are placed) always runs first.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from compress import metadata
from compress.errors import CompressError
from compress.files import WRITE_HINT, write_failure
from compress.onnx_utils import quiet_stdout
from compress.quantization.calibration import METHODS, ArrayReader, BatchReader
from compress.quantization.schemes import Scheme, choose

QTYPES = {"uint8": "QUInt8", "int8": "QInt8"}


@contextlib.contextmanager
def written(dst: Path) -> Iterator[Path]:
    """A temp path beside ``dst`` for a writer that takes a path (ONNX Runtime's quantizers); on
    success it is fsynced and renamed to ``dst``, on failure removed, so ``dst`` is never half-written.
    A failed write (full disk) is one CompressError line naming ``dst``."""
    tmp = dst.with_name(f".{dst.stem}.tmp{os.getpid()}{dst.suffix}")  # the suffix kept: ORT reads it
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = write_failure(exc) if isinstance(exc, OSError) else None
        if reason is None:
            raise  # the quantizer's own failure (or Ctrl-C): the stage reports it
        raise CompressError(f"cannot write {dst}: {reason}; {WRITE_HINT}") from None


def preprocess(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with quiet_stdout(), written(dst) as tmp:
        quant_pre_process(str(src), str(tmp))


def stride(batches: int, chunk: int) -> int:
    """The largest divisor of ``batches`` not above ``chunk`` (ORT's strided calibration needs one)."""
    return max(d for d in range(1, min(chunk, batches) + 1) if batches % d == 0)


def static(
    src: Path,
    dst: Path,
    reader: BatchReader | ArrayReader | None,
    *,
    method: str = "minmax",
    percentile: float = 99.999,
    fmt: str = "qdq",
    per_channel: bool = True,
    scheme: Scheme | str = "auto",
    symmetric_activations: bool = False,
    op_types: list[str] | None = None,
    exclude: list[str] | None = None,
    chunk: int = 8,
    cache: Path | None = None,
) -> None:
    """Static INT8 of a pre-processed ``src``. Activation ranges come from ``reader`` streamed
    ``chunk`` batches at a time, or from ``cache`` (ORT's calibration cache: written on the first
    call, reused by later ones with other ``exclude`` lists — calibrating once). ``scheme`` names the
    activation and weight types and whether weights are 7-bit (``reduce_range``); ``"auto"`` takes
    the fastest scheme exact on this CPU (``schemes.choose``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if isinstance(scheme, str):
        scheme = choose(scheme).scheme

    extra: dict[str, Any] = {"ActivationSymmetric": symmetric_activations}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    if reader is not None:
        reader.rewind()
        extra["CalibStridedMinMax"] = stride(len(reader), chunk)
    with quiet_stdout(), written(dst) as tmp:
        quantize_static(
            str(src),
            str(tmp),
            reader,
            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=op_types or None,
            per_channel=per_channel,
            reduce_range=scheme.reduce_range,
            activation_type=getattr(QuantType, QTYPES[scheme.activation]),
            weight_type=getattr(QuantType, QTYPES[scheme.weight]),
            nodes_to_exclude=exclude or None,
            calibrate_method=getattr(CalibrationMethod, METHODS[method]),
            extra_options=extra,
            calibration_cache_path=cache,
        )


def dynamic(
    src: Path,
    dst: Path,
    *,
    per_channel: bool = True,
    scheme: Scheme | str = "auto",
    op_types: list[str] | None = None,
) -> None:
    """Dynamic INT8: weights quantized now, activations per batch at run time (MatMulInteger /
    DynamicQuantizeLinear). Pays off for Linear/attention-heavy models; convolutions stay float
    unless ``op_types`` asks for them (ConvInteger is slow on CPU). Activations are always uint8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if isinstance(scheme, str):
        scheme = choose(scheme, dynamic=True).scheme

    with quiet_stdout(), written(dst) as tmp:
        quantize_dynamic(
            str(src),
            str(tmp),
            op_types_to_quantize=op_types or ["MatMul", "Gemm", "Attention", "LSTM"],
            per_channel=per_channel,
            reduce_range=scheme.reduce_range,
            weight_type=getattr(QuantType, QTYPES[scheme.weight]),
        )


def fp16(src: Path, dst: Path, *, keep_io_types: bool = True) -> None:
    """FP16 weights and compute (for GPUs); graph inputs/outputs stay as they were with
    ``keep_io_types`` (uint8 pixels in, float32 logits out)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(metadata.load(src), keep_io_types=keep_io_types)
    metadata.save(model, dst)


def quantized_ops(path: Path) -> dict[str, int]:
    """How many nodes of each op type the file holds (what was quantized, what stayed float)."""
    return dict(Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node))


def describe(
    scheme: Scheme | None,
    *,
    mode: str = "static",
    fmt: str = "qdq",
    per_channel: bool = True,
    calibration: str = "percentile",
    symmetric_activations: bool = False,
    keep_io_types: bool = True,
) -> str:
    """The ``quantization`` metadata line of a file quantized so (``scheme`` None: FP16); one wording
    for the quantize stage and ``compress.onnx_api.quantize_onnx``."""
    if scheme is None:
        return "onnxruntime float16 conversion" + (", float32 inputs/outputs kept" if keep_io_types else "")
    weights = f"weights {scheme.weight}{' 7-bit' * scheme.reduce_range}"
    if mode == "dynamic":
        return f"onnxruntime quantize_dynamic ({scheme.name}), {weights}{' per-channel' * per_channel}"
    return (
        f"onnxruntime quantize_static {fmt.upper()} ({scheme.name}), activations {scheme.activation}"
        f"{' symmetric' * symmetric_activations}, {weights}"
        f"{' per-channel' if per_channel else ' per-tensor'}, {calibration} calibration"
    )
