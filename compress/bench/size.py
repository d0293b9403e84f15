"""How big a model is: file and gzip bytes, ONNX weights and MACs, and peak memory while it runs."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compress import userpath


def parts(path: Path) -> list[Path]:
    """The files a model is: an ONNX file and the external data files it names (``torch.onnx.export``
    writes weights to ``model.onnx.data`` by default), any other file alone."""
    if path.suffix != ".onnx":
        return [path]
    model = onnx.load(str(path), load_external_data=False)
    names = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    folder = path.parent.resolve()
    inside = [folder / n for n in sorted(names) if (folder / n).resolve().is_relative_to(folder)]
    return [path, *(p for p in inside if p.is_file())]  # (ONNX Runtime refuses data outside the folder too)


def file_bytes(path: Path) -> int:
    """Bytes on disk of the model at ``path``, its external data included."""
    return sum(p.stat().st_size for p in parts(path))


def gzip_bytes(path: Path) -> int:
    """Bytes after gzip -9: what a download of the file (and its external data) costs (pruned zeros
    and INT8 compress well)."""
    return sum(len(gzip.compress(p.read_bytes(), compresslevel=9, mtime=0)) for p in parts(path))


def onnx_weight_counts(path: Path) -> tuple[int, int]:
    """(weights, nonzero weights) over the ONNX initializers, excluding QDQ scales/zero points and
    the in-graph normalization's constants (x − mean, x / std: tensors only ever subtracted or
    divided by; the export repeats them along a row, W·C values each, so they would count)."""
    model = onnx.load(str(path))
    qparams = {
        name
        for node in model.graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear")
        for name in node.input[1:]
    }
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, i))
    constants = {name for name, used in uses.items() if used <= {("Sub", 1), ("Div", 1)}}
    total = nonzero = 0
    for init in model.graph.initializer:
        if init.name in qparams or init.name in constants:
            continue
        arr = numpy_helper.to_array(init)
        if arr.ndim == 0 or not (np.issubdtype(arr.dtype, np.floating) or arr.dtype in (np.int8, np.uint8, np.int32)):
            continue  # shape constants (int64) and scalars are not weights; int32 are quantized biases
        total += arr.size
        nonzero += int(np.count_nonzero(arr))
    return total, nonzero


# Where the weight sits among a node's inputs, for the ops that carry (nearly) all the MACs.
_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1,
                 "MatMulInteger": 1, "QLinearMatMul": 3}  # fmt: skip


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
        if out and out[0] < 0:  # a batch axis that shape inference lost behind Shape/Reshape: one image
            out = [1, *out[1:]]
        if not w or not out or min(w) < 0 or min(out) < 0:
            return None
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            total += math.prod(out) * math.prod(w[1:])  # each output element: C_in/groups * kh * kw MACs
        elif node.op_type == "ConvTranspose":  # weight (C_in, C_out/groups, k...): each input element scatters
            x = shapes.get(node.input[0])
            x = [1, *x[1:]] if x and x[0] < 0 else x
            if not x or min(x) < 0:
                return None
            total += math.prod(x) * math.prod(w[1:])
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            total += math.prod(out) * (w[1] if trans_b else w[0])
        else:  # MatMul: out (..., M, N), weight (..., K, N), or a vector weight (K,)
            total += math.prod(out) * (w[-2] if len(w) >= 2 else w[0])
    return int(total)


# Run in a fresh interpreter: the memory a model needs, not what earlier models left in this process.
# A failure ends with one line on stderr (the parent turns it into the report's note).
_CHILD = r"""
import json, sys
import numpy as np

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

try:
    kind, path, batch = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
    names = json.loads(sys.argv[4])  # model, num_classes, in_channels: what the caller named
    if kind == "onnx":
        import onnxruntime as ort
    else:
        import torch
        from compress.checkpoint import load_model
    base = kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    if kind == "onnx":
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: batch})
    else:
        model = load_model(path, path, **names)
        with torch.inference_mode():
            model(torch.from_numpy(batch))
except Exception as exc:
    text = str(exc).strip()
    sys.stderr.write(f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}\n")
    sys.exit(1)
print(json.dumps({"bytes": (kb("VmHWM") - base) * 1024}))
"""


def peak_rss(
    kind: str,
    path: Path,
    batch: np.ndarray,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
) -> tuple[int | None, str | None]:
    """Peak resident memory to load ``path`` and run it once on ``batch``, measured in a child process:
    (bytes, None), or (None, a note for the report saying why it was not measured).

    The baseline is the child's memory after importing the runtime, so the number is the model's own
    (weights, runtime arenas, activations), independent of what else was measured before. A torch
    checkpoint is rebuilt with :func:`compress.checkpoint.load_model`; ``model``, ``num_classes`` and
    ``in_channels`` name what a plain state_dict does not (as ``Checkpoint.build`` takes them). Without
    ``model`` it is the model the file names: callers vouch for that name (``compress bench`` refuses a
    file naming a user factory the user did not name; a run's own checkpoints name its recipe's models).
    """
    what = f"{path.name}: peak memory not measured"
    if not Path("/proc/self/clear_refs").exists():
        return None, f"{what}: needs Linux /proc"
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "batch.npy", batch)
        names = {"model": model, "num_classes": num_classes, "in_channels": in_channels}
        named = json.dumps({k: v for k, v in names.items() if v is not None})
        argv = [sys.executable, "-c", _CHILD, kind, str(path), str(Path(tmp) / "batch.npy"), named]
        try:
            # the user modules a recipe names are found as in this process (its folder, then the cwd)
            paths = [str(r) for r in userpath.roots()] + [p for p in [os.environ.get("PYTHONPATH")] if p]
            env = os.environ | {"PYTHONPATH": os.pathsep.join(paths)}
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
        except subprocess.TimeoutExpired:
            return None, f"{what}: the measuring process took over 600 s"
        except OSError as exc:
            return None, f"{what}: cannot start the measuring process ({exc.strerror or exc})"
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        if lines:
            why = lines[-1]
        elif proc.returncode < 0:
            why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
        else:
            why = f"exit status {proc.returncode}"
        return None, f"{what}: the measuring process failed: {why[:300]}"
    try:
        return int(json.loads(proc.stdout.strip().splitlines()[-1])["bytes"]), None
    except (IndexError, KeyError, TypeError, ValueError):
        return None, f"{what}: the measuring process printed no result"
