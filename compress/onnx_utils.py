"""Small helpers over onnx / onnxruntime shared by export, quantize and the benchmark."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compress.deploy import int8_exact_session


def session(
    path: Path,
    threads: int | None = None,
    device: str = "cpu",
    spin: bool = True,
    optimized_to: Path | None = None,
    exact_int8: bool = True,
) -> ort.InferenceSession:
    """An ORT session at full graph optimization. ``spin=False`` stops idle worker threads spinning
    (needed when several sessions are timed in turn: a spinning pool steals the next one's cores);
    ``optimized_to`` saves the graph ORT actually runs, after its fusions. ``exact_int8``: an INT8
    file whose scheme saturates on this CPU runs in ORT's precision mode (``deploy.int8_exact_session``),
    so every accuracy and latency measured is of what computes correctly here."""
    opts = ort.SessionOptions()
    if optimized_to is not None:
        opts.optimized_model_filepath = str(optimized_to)
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    providers = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    }[device]

    def open_session(o: ort.SessionOptions) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), sess_options=o, providers=providers)

    return int8_exact_session(open_session, opts, str(path), exact_int8 and device == "cpu")[0]


def run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@contextlib.contextmanager
def quiet_stdout():
    """The exporters print progress to stdout; keep the user's terminal for our own progress bar."""
    if os.environ.get("COMPRESS_VERBOSE_EXPORT"):
        yield
        return
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield
