"""Accuracy-aware mixed precision: which nodes to keep in float, and why INT8 may be slow.

``node_errors`` ranks the float model's nodes by how much quantizing them hurts, each in isolation.
The float model runs on calibration batches with every intermediate tensor exposed (ONNX Runtime's
QDQ debugging tools, ``onnxruntime.quantization.qdq_loss_debug``); each activation the INT8 model
quantizes is quantized alone, from the float model's own values, with the scale and zero point the
INT8 model gives it, and scored by its signal-to-quantization-noise ratio (SQNR, dB) per channel,
averaged over the channels that carry signal. Two choices matter:

* Isolation: in the INT8 model an upstream error reaches every later tensor, so comparing the INT8
  model's tensors before and after their Q/DQ pairs blames the layers after a bad one.
* Per channel: one channel with a far larger range than the others (an outlier) squashes the others
  to zero in a per-tensor uint8 scale, yet the whole tensor's SQNR stays high (the outlier carries
  almost all the energy). Averaged per-channel SQNR drops to ~0 dB on such a tensor and matches the
  whole-tensor figure on well-behaved ones.

A node scores the worst of the activations it reads or writes and of its weights (ORT's weight SQNR);
an output consumed only by a Relu/Clip that the quantizer folds into the node counts as that
activation's output. Low score = keep in float first.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compress.onnx_utils import quiet_stdout, session
from compress.quantization.calibration import BatchReader

FOLDED = {"Relu", "Clip"}  # activations ORT's QDQ quantizer folds into the node before them
CAP_DB = 60.0  # an exactly representable channel counts as this, not infinity


def channel_sqnr_db(x: np.ndarray, scale: float, zero_point: np.ndarray) -> float | None:
    """Mean over channels (axis 1) carrying signal of the SQNR (dB) of ``x`` quantized alone."""
    info = np.iinfo(zero_point.dtype)
    zp = int(zero_point.ravel()[0])
    x = x.astype(np.float64)
    noise = x - (np.clip(np.round(x / scale) + zp, info.min, info.max) - zp) * scale
    per_channel = (lambda a: np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)) if x.ndim > 1 else (lambda a: a[None])
    signal, err = ((per_channel(a) ** 2).sum(1) for a in (x, noise))
    live = signal > 0
    if not live.any():
        return None
    db = 10 * np.log10(signal[live] / np.maximum(err[live], signal[live] * 10 ** (-CAP_DB / 10)))
    return float(db.mean())


def activation_errors(pre: Path, qdq: Path, reader: BatchReader, batches: int, workdir: Path) -> dict[str, float]:
    """Per-channel SQNR (dB) of every activation ``qdq`` quantizes, each quantized alone (float model's values)."""
    from onnxruntime.quantization import qdq_loss_debug as dbg

    augmented = workdir / "float.aug.onnx"
    with quiet_stdout():
        dbg.modify_model_output_intermediate_tensors(str(pre), str(augmented))
        reader.set_range(0, min(batches, len(reader)))
        acts = dbg.collect_activations(str(augmented), reader)  # flattened per batch: shapes from `pre`
    graph = onnx.load(str(pre), load_external_data=False).graph
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        for v in [*graph.value_info, *graph.output]
    }
    q = onnx.load(str(qdq), load_external_data=False).graph
    consts = {i.name: numpy_helper.to_array(i) for i in q.initializer}
    errors: dict[str, float] = {}
    for node in q.node:
        name = node.input[0]
        if node.op_type != "QuantizeLinear" or name not in acts or node.input[1] not in consts:
            continue
        scale, zp = consts[node.input[1]], consts[node.input[2]]
        if scale.size != 1:
            continue  # per-channel activation scales: not made by our settings
        dims = shapes.get(name, [])[1:]  # ORT hands the tensors over flattened; no channels if a dim is unknown
        known = bool(dims) and min(dims) > 0
        x = np.concatenate([a.reshape(-1, *dims) if known else a for a in acts[name]])
        db = channel_sqnr_db(x, float(scale.ravel()[0]), zp)
        if db is not None:
            errors[name] = db
    return errors


def node_errors(pre: Path, qdq: Path, reader: BatchReader, batches: int, workdir: Path) -> dict[str, float]:
    """A score (dB, lower = worse) per node of the (pre-processed) float model ``pre`` that ``qdq`` quantized."""
    from onnxruntime.quantization import qdq_loss_debug as dbg

    acts = activation_errors(pre, qdq, reader, batches, workdir)
    with quiet_stdout():
        weights = dbg.compute_weight_error(dbg.create_weight_matching(str(pre), str(qdq)))
    graph = onnx.load(str(pre), load_external_data=False).graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    for node in graph.node:  # a tensor the quantizer folds into a Relu/Clip after it scores as that one's output
        for out in node.output:
            after = consumers.get(out, [])
            if out not in acts and len(after) == 1 and after[0].op_type in FOLDED and after[0].output[0] in acts:
                acts[out] = acts[after[0].output[0]]
    scores: dict[str, float] = {}
    for node in graph.node:
        found = [acts[t] for t in [*node.input, *node.output] if t in acts]
        found += [float(weights[t]) for t in node.input if t in weights]
        found = [s for s in found if not math.isnan(s)]
        if node.name and found:
            scores[node.name] = min(found)
    return scores


def float_islands(path: Path, workdir: Path) -> Counter:
    """Op types that ONNX Runtime still runs in float between DequantizeLinear and QuantizeLinear
    after its own fusions (each such op costs a dequantize and a requantize): the usual reason an
    INT8 file is not faster."""
    optimized = workdir / f"{path.stem}.optimized.onnx"
    session(path, optimized_to=optimized)
    graph = onnx.load(str(optimized), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return Counter(
        n.op_type
        for n in graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dequantized for i in n.input)
    )
