"""Accuracy-aware mixed precision: which nodes to keep in float, and why INT8 may be slow.

``node_errors`` ranks the float model's nodes by how much quantization hurts them, with ONNX
Runtime's QDQ debugging tools (``onnxruntime.quantization.qdq_loss_debug``): both models are
re-saved with every intermediate tensor as an output, run on the same calibration batches, and each
node scores the signal-to-quantization-noise ratio (SQNR, dB) of its weight and of its output right
after its Q/DQ pair — the lower of the two. Low SQNR = the node to keep in float first.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import onnx

from compress.onnx_utils import quiet_stdout, session
from compress.quantization.calibration import BatchReader


def node_errors(pre: Path, qdq: Path, reader: BatchReader, batches: int, workdir: Path) -> dict[str, float]:
    """SQNR in dB per node of the (pre-processed) float model ``pre`` that ``qdq`` quantized."""
    from onnxruntime.quantization import qdq_loss_debug as dbg

    float_aug, qdq_aug = workdir / "float.aug.onnx", workdir / "qdq.aug.onnx"
    with quiet_stdout():
        dbg.modify_model_output_intermediate_tensors(str(pre), str(float_aug))
        dbg.modify_model_output_intermediate_tensors(str(qdq), str(qdq_aug))
        acts = []
        for path in (float_aug, qdq_aug):
            reader.set_range(0, min(batches, len(reader)))
            acts.append(dbg.collect_activations(str(path), reader))
        act_err = dbg.compute_activation_error(dbg.create_activation_matching(acts[1], acts[0]))
        weight_err = dbg.compute_weight_error(dbg.create_weight_matching(str(pre), str(qdq)))
    scores: dict[str, float] = {}
    for node in onnx.load(str(pre), load_external_data=False).graph.node:
        found = [act_err[t]["qdq_err"] for t in node.output if "qdq_err" in act_err.get(t, {})]
        found += [weight_err[t] for t in node.input if t in weight_err]
        found = [float(s) for s in found if not math.isnan(s)]
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
