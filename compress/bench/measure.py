"""Measure every artifact the same way: top-1, bytes, params, nonzero params, MACs, latency.

Latency follows the usual discipline: fixed thread count (recorded), warm-up runs, then ``iters``
timed runs of one batch each under ``inference_mode`` (torch) or a plain ``session.run`` (ORT),
device-synchronized on CUDA; we report p50/p90/p99/mean/std and throughput (images/s at p50).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from compress.bench.env import resolved_threads
from compress.context import Artifact
from compress.data import DataBundle
from compress.metadata import feeder
from compress.onnx_utils import cuda_available, run, session
from compress.stages.prune import count


def percentiles(samples_ms: list[float], batch_size: int) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(a.mean()),
        "std_ms": float(a.std()),
        "throughput": float(batch_size / (p50 / 1000.0)) if p50 > 0 else float("inf"),
    }


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        sync()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def raw_batch(data: DataBundle, batch_size: int) -> torch.Tensor:
    """A real uint8 NCHW test batch of exactly ``batch_size`` images (repeated if the split is small)."""
    idx = torch.arange(batch_size) % len(data.test_x)
    return data.test_x.cpu()[idx]


def batch_of(data: DataBundle, batch_size: int) -> torch.Tensor:
    """The same batch, normalized as the torch model takes it."""
    return data.normalize(raw_batch(data, batch_size))


# --------------------------------------------------------------------------- accuracy
@torch.inference_mode()
def torch_accuracy(model: nn.Module, data: DataBundle, device: torch.device) -> float:
    model = model.eval().to(device)
    correct = 0
    for x, y in data.eval_loader("test"):
        correct += (model(x.to(device)).argmax(1).cpu() == y.cpu()).sum().item()
    return correct / len(data.test_y)


def onnx_accuracy(path, data: DataBundle) -> float:
    """Top-1 of an ONNX file fed the raw test images the way its metadata says (as a deployer would)."""
    sess = session(path)
    feed = feeder(sess, data)
    correct = 0
    for start in range(0, len(data.test_x), data.eval_batch_size):
        x = data.test_x[start : start + data.eval_batch_size]
        y = data.test_y[start : start + data.eval_batch_size]
        correct += int((run(sess, feed(x)).argmax(1) == y.cpu().numpy()).sum())
    return correct / len(data.test_y)


# --------------------------------------------------------------------------- size
def onnx_weight_counts(path) -> tuple[int, int]:
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


# --------------------------------------------------------------------------- latency
def latency_rows(
    art: Artifact,
    data: DataBundle,
    batch_sizes: list[int],
    warmup: int,
    iters: int,
    threads: int | None,
    devices: list[str],
) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    n_threads = resolved_threads(threads)
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            notes.append("cuda: no CUDA device on this machine; GPU latency not measured")
            continue
        runtime = "torch" if art.format == "torch" else "onnxruntime"
        if art.format == "onnx" and device == "cuda" and not cuda_available():
            notes.append(
                "cuda: onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu); "
                "ONNX GPU latency not measured"
            )
            continue
        for bs in batch_sizes:
            if art.format == "torch":
                samples = _time_torch(art.model, batch_of(data, bs), device, warmup, iters, n_threads)
            else:
                sess = session(art.path, threads=n_threads, device=device)
                feed = feeder(sess, data)(raw_batch(data, bs))
                samples = time_calls(lambda s=sess, f=feed: run(s, f), warmup, iters)
            rows.append(
                {
                    "device": device,
                    "runtime": runtime,
                    "batch_size": bs,
                    "threads": n_threads,
                    "iters": iters,
                    **percentiles(samples, bs),
                }
            )
    return rows, notes


def _time_torch(model: nn.Module, x: torch.Tensor, device: str, warmup: int, iters: int, threads: int) -> list[float]:
    dev = torch.device(device)
    model = model.eval().to(dev)
    x = x.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch_threads(threads), torch.inference_mode():
        samples = time_calls(lambda: model(x), warmup, iters, sync)
    model.to("cpu")
    return samples


def measure(
    art: Artifact,
    data: DataBundle,
    bench,
    device: torch.device,
    macs_cache: dict[str, tuple[int, int]],
) -> tuple[dict[str, Any], list[str]]:
    """One row of report.json's ``artifacts``."""
    example = batch_of(data, 1)
    if art.format == "torch":
        assert art.model is not None
        acc = torch_accuracy(art.model, data, device)
        art.model.to("cpu")
        macs, params = count(art.model, example)
        macs_cache[art.name] = (macs, params)
        nonzero = sum(int(torch.count_nonzero(p)) for p in art.model.parameters())
    else:
        acc = onnx_accuracy(art.path, data)
        macs, params = macs_cache.get(art.source or "", (None, None))
        params_onnx, nonzero = onnx_weight_counts(art.path)
        params = params if params is not None else params_onnx
    latency, notes = [], []
    if art.format == "onnx" or bench.torch_snapshots or art.role == "teacher":
        latency, notes = latency_rows(
            art, data, bench.batch_sizes, bench.warmup, bench.iters, bench.threads, bench.devices
        )
    row = {
        "name": art.name,
        "role": art.role,
        "stage": art.stage,
        "path": str(art.path),
        "format": art.format,
        "precision": art.precision,
        "accuracy": acc,
        "size_bytes": art.path.stat().st_size,
        "params": params,
        "nonzero_params": nonzero,
        "macs": macs,
        "latency": latency,
    }
    return row, notes
