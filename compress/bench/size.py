"""How big a model is: file and gzip bytes, ONNX weights and MACs, and peak memory while it runs."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import gzip
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def gzip_bytes(path: Path) -> int:
    """Bytes after gzip -9: what a download of the file costs (pruned zeros and INT8 compress well)."""
    return len(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))


def onnx_weight_counts(path: Path) -> tuple[int, int]:
    """(weights, nonzero weights) over the ONNX initializers, excluding QDQ scales/zero points."""
    model = onnx.load(str(path))
    qparams = {
        name
        for node in model.graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear")
        for name in node.input[1:]
    }
    total = nonzero = 0
    for init in model.graph.initializer:
        if init.name in qparams:
            continue
        arr = numpy_helper.to_array(init)
        if arr.ndim == 0 or not (np.issubdtype(arr.dtype, np.floating) or arr.dtype in (np.int8, np.uint8)):
            continue  # shape constants and scalars are not weights
        total += arr.size
        nonzero += int(np.count_nonzero(arr))
    return total, nonzero


# Where the weight sits among a node's inputs, for the ops that carry (nearly) all the MACs.
_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "Gemm": 1, "MatMul": 1, "MatMulInteger": 1,
                 "QLinearMatMul": 3}  # fmt: skip


def onnx_macs(path: Path) -> int | None:
    """Multiply-accumulates of one image (batch 1) through Conv/Gemm/MatMul, from ONNX shape inference.

    Counts what the file computes (BatchNorm is already folded into the convolutions), for FP32 and
    quantized graphs alike. None when the shapes cannot be inferred.
    """
    model = onnx.load(str(path), load_external_data=False)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1  # the dynamic batch axis
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference raises many types on exotic graphs
        return None
    shapes: dict[str, list[int]] = {i.name: list(i.dims) for i in inferred.graph.initializer}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    total = 0
    for node in inferred.graph.node:
        if node.op_type not in _WEIGHT_INPUT:
            continue
        w = shapes.get(node.input[_WEIGHT_INPUT[node.op_type]])
        out = shapes.get(node.output[0])
        if not w or not out or min(w) < 0 or min(out) < 0:
            return None
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            total += math.prod(out) * math.prod(w[1:])  # each output element: C_in/groups * kh * kw MACs
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            total += math.prod(out) * (w[1] if trans_b else w[0])
        else:  # MatMul: out (..., M, N), weight (..., K, N)
            total += math.prod(out) * w[-2]
    return int(total)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _return_free_memory() -> None:
    """Hand freed heap back to the OS, so a model's allocations show up as RSS growth instead of
    silently reusing what the previous model freed (glibc keeps freed memory otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, int | None]]:
    """Measure the process's peak resident memory increase over the block, in bytes (Linux).

    Resets the kernel's high-water mark first (/proc/self/clear_refs), so each model's peak is its
    own; where that is not possible the result is None rather than a number from an earlier model.
    """
    result: dict[str, int | None] = {"bytes": None}
    _return_free_memory()
    before = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    except OSError:
        reset = False
    try:
        yield result
    finally:
        peak = _status_kb("VmHWM")
        if reset and before is not None and peak is not None:
            result["bytes"] = max(0, peak - before) * 1024
