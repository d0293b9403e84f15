"""Measure every artifact the same way: top-1/top-5, bytes, params, nonzero params, MACs, memory, latency.

Latency follows the usual discipline: fixed thread counts (recorded as the runtime reports them),
warm-up runs, then ``iters`` timed runs of one batch each under ``inference_mode`` (torch) or of one
runner call (ONNX on CPU, on every runtime ``benchmark.runtimes`` lists: compress.bench.runtimes). On
CUDA the input already sits on the GPU (ORT through IO binding) and every call is synchronized, so
host<->device copies are excluded, and the row says so. We report p50/p90/p99/mean/std and throughput
(images/s at p50), and flag rows whose spread says the machine was busy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from compress.bench import runtimes
from compress.bench.runtimes import time_calls
from compress.bench.size import file_bytes, gzip_bytes, onnx_macs, onnx_weight_counts, peak_rss
from compress.context import Artifact
from compress.data import ImageData
from compress.deploy import int8_portability, read_metadata
from compress.errors import CompressError, first_line
from compress.metadata import feeder
from compress.onnx_utils import run, session
from compress.pruning.structured import count

UNSTABLE_P90_OVER_P50 = 1.5  # a model's own spread is far tighter; beyond this other work interfered


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


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def thread_counts(threads: int | list[int] | None) -> list[int]:
    """The CPU thread counts to time at: as configured, or torch's default."""
    if threads is None:
        return [torch.get_num_threads()]
    return [threads] if isinstance(threads, int) else list(dict.fromkeys(threads))


def raw_batch(data: ImageData, batch_size: int) -> torch.Tensor:
    """A real uint8 NCHW test batch of exactly ``batch_size`` images (repeated if the split is small)."""
    return data.raw("test", torch.arange(batch_size) % data.test_size)


def batch_of(data: ImageData, batch_size: int) -> torch.Tensor:
    """The same batch, normalized as the torch model takes it."""
    return data.normalize(raw_batch(data, batch_size))


# --------------------------------------------------------------------------- accuracy
def _correct(logits: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) in a batch."""
    k = min(5, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((logits.argmax(1) == y).sum()), int((top == y[:, None]).any(1).sum())


@torch.inference_mode()
def torch_accuracy(model: nn.Module, data: ImageData, device: torch.device) -> tuple[float, float]:
    """(top-1, top-5) on the test split."""
    model = model.eval().to(device)
    hits = np.zeros(2, dtype=np.int64)
    for x, y in data.eval_loader("test"):
        hits += _correct(model(x.to(device)).float().cpu().numpy(), y.cpu().numpy())
    return hits[0] / data.test_size, hits[1] / data.test_size


def onnx_accuracy(
    path, data: ImageData, top5: bool = False, feed: Callable | None = None, images: int | None = None
) -> float | tuple[float, float]:
    """Top-1 (and top-5) of an ONNX file on the first ``images`` raw test images (all by default),
    fed the way its metadata says — or by ``feed``, for a file without our metadata."""
    sess = session(path)
    top1, top5_acc = _onnx_topk(sess, feed or feeder(sess, data), data, images)
    return (top1, top5_acc) if top5 else top1


def fixed_batch(sess: ort.InferenceSession) -> int | None:
    """The batch size a graph exported for one batch size only takes (plain ``torch.onnx.export``
    bakes it into its reshapes), or None when the batch axis is dynamic."""
    dims = sess.get_inputs()[0].shape
    return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None


def _onnx_topk(sess: ort.InferenceSession, feed: Callable, data: ImageData, images: int | None = None):
    n = min(images or data.test_size, data.test_size)
    fixed = fixed_batch(sess)
    step = fixed or data.eval_batch_size
    hits = np.zeros(2, dtype=np.int64)
    for x, y in data.raw_batches("test", n, step):
        y = y.numpy()
        if fixed is not None and len(x) < fixed:  # the last batch of a fixed-batch graph: pad, score the real ones
            x = x[torch.arange(fixed) % len(x)]
        hits += _correct(run(sess, feed(x))[: len(y)], y)
    return hits[0] / n, hits[1] / n


# --------------------------------------------------------------------------- latency
def _onnx_targets(device: str, names: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """[(runtime label, session device)] for an ONNX file on ``device``, and notes for what is unavailable:
    on CPU each runtime ``names`` lists (``benchmark.runtimes``); on CUDA ORT's GPU providers."""
    if device == "cpu":
        missing = {n: why for n in names if n in runtimes.RUNTIMES and (why := runtimes.RUNTIMES.get(n).available())}
        unknown = [n for n in names if n not in runtimes.RUNTIMES]
        notes = [f"cpu: {why}; not measured" for why in missing.values()]
        notes += [f"cpu: {runtimes.RUNTIMES.unknown_message(n)}; not measured" for n in unknown]
        return [(n, "cpu") for n in names if n not in missing and n not in unknown], notes
    providers = ort.get_available_providers()
    targets, notes = [], []
    if "CUDAExecutionProvider" in providers:
        targets.append(("onnxruntime-cuda", "cuda"))
    else:
        notes.append("cuda: onnxruntime CUDAExecutionProvider unavailable (install onnxruntime-gpu); not measured")
    if "TensorrtExecutionProvider" in providers:
        targets.append(("onnxruntime-tensorrt", "tensorrt"))
    else:
        notes.append("cuda: onnxruntime TensorrtExecutionProvider unavailable; not measured")
    return targets, notes


def bound_runner(sess: ort.InferenceSession, feed: np.ndarray, device: str) -> Callable[[], Any]:
    """A call that runs ``sess`` on ``feed`` already placed on ``device`` (IO binding): no copies timed."""
    binding = sess.io_binding()
    binding.bind_ortvalue_input(sess.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(feed, device, 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, device)
    return lambda: (sess.run_with_iobinding(binding), binding)[1]


PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def time_ort(
    path, feed: np.ndarray, device: str, threads: int, warmup: int, iters: int, exact_int8: bool = True
) -> tuple[list[float], int] | str:
    """Samples and the thread count ORT reports, or why the requested provider is not the one running."""
    sess = session(path, threads=threads, device=device, exact_int8=exact_int8)
    active = sess.get_providers()[0]
    if active != PROVIDER[device]:
        # onnxruntime-gpu lists providers whose libraries are missing and silently falls back.
        return f"{PROVIDER[device]} requested but onnxruntime fell back to {active}; not measured as {device}"
    if device == "tensorrt":
        warmup = max(warmup, 3)  # the first runs build the TensorRT engine; never time that
    if device == "cpu":
        name = sess.get_inputs()[0].name
        fn = lambda: sess.run(None, {name: feed})  # noqa: E731
    else:  # input bound on the GPU once; outputs stay there: copies excluded
        fn = bound_runner(sess, feed, "cuda")
    return time_calls(fn, warmup, iters), sess.get_session_options().intra_op_num_threads


def _time_torch(model: nn.Module, x: torch.Tensor, device: str, warmup: int, iters: int, threads: int):
    dev = torch.device(device)
    model = model.eval().to(dev) if isinstance(model, nn.Module) else model
    x = x.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch_threads(threads), torch.inference_mode():
        used = torch.get_num_threads()
        samples = time_calls(lambda: model(x), warmup, iters, sync)
    if isinstance(model, nn.Module):
        model.to("cpu")
    return samples, used


def _compiled(model: nn.Module, device: str, x: torch.Tensor) -> tuple[Any, str | None]:
    """torch.compile'd ``model`` on ``device`` (compiled now, outside the timing), or (None, why not)."""
    try:
        compiled = torch.compile(model.eval().to(device), dynamic=False)  # kernels specialized per batch size
        with torch.inference_mode():
            compiled(x.to(device))
        return compiled, None
    except Exception as exc:  # noqa: BLE001 - inductor failures are many and long; keep the first line
        return None, f"torch.compile unavailable for {device}: {first_line(exc)}"


def latency_rows(
    art: Artifact, data: ImageData, bench: Any, feed_of: Callable | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (device, runtime, threads, batch size); notes for what could not be measured.

    ``feed_of`` turns uint8 test images into an ONNX file's input (built from its metadata if not given).
    """
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for device in bench.devices:
        if device == "cuda" and not torch.cuda.is_available():
            notes.append("cuda: no CUDA device on this machine; GPU latency not measured")
            continue
        if art.format == "torch":
            targets = [("torch", device)] + ([("torch-compile", device)] if bench.torch_compile else [])
        else:
            targets, missing = _onnx_targets(device, list(getattr(bench, "runtimes", ["onnxruntime"])))
            notes += missing
        # Thread counts matter on CPU; a GPU run uses one host thread setting (the first).
        counts = thread_counts(bench.threads)
        sizes = list(bench.batch_sizes)
        if art.format == "onnx":
            sess = session(art.path)
            feed_of = feed_of or feeder(sess, data)
            fixed = fixed_batch(sess)
            if fixed is not None and sizes != [fixed]:  # the graph runs at its one batch size only
                notes.append(
                    f"{art.name}: the graph is exported for batch {fixed} only; timed at batch {fixed}, "
                    f"not {', '.join(map(str, sizes))} (export with a dynamic batch axis for others)"
                )
                sizes = [fixed]
        for runtime, target in targets:
            for threads in counts if device == "cpu" else counts[:1]:
                for bs in sizes:
                    if art.format == "torch":
                        x = batch_of(data, bs)
                        model: Any = art.model
                        if runtime == "torch-compile":
                            model, why = _compiled(art.model, device, x)
                            if model is None:
                                notes.append(f"{art.name}: {why}")
                                continue
                        samples, used = _time_torch(model, x, device, bench.warmup, bench.iters, threads)
                    elif device == "cpu":  # every CPU runtime timed the same way (runtimes.timed)
                        feed = feed_of(raw_batch(data, bs))
                        try:
                            samples, used = runtimes.timed(art.path, feed, runtime, threads, bench.warmup, bench.iters)
                        except CompressError as exc:  # e.g. a graph OpenVINO cannot compile: the others still run
                            notes.append(f"{art.name} ({runtime}): {exc}; not measured")
                            break
                    else:
                        feed = feed_of(raw_batch(data, bs))
                        timed = time_ort(art.path, feed, target, threads, bench.warmup, bench.iters)
                        if isinstance(timed, str):
                            notes.append(f"{art.name}: {timed}")
                            break
                        samples, used = timed
                    row = {
                        "device": device,
                        "runtime": runtime,
                        "batch_size": bs,
                        "threads": used,
                        "iters": bench.iters,
                        "copies": "excluded (input on the GPU, synchronized)" if device == "cuda" else "n/a",
                        **percentiles(samples, bs),
                    }
                    # p90, not p99: with ~100 iterations p99 is one sample, and one hiccup is not a trend.
                    row["unstable"] = row["p90_ms"] > UNSTABLE_P90_OVER_P50 * row["p50_ms"]
                    if row["unstable"]:
                        notes.append(
                            f"{art.name} ({runtime}, {device}, batch {bs}, {used} threads): unstable, p90 is "
                            f"{row['p90_ms'] / row['p50_ms']:.1f}× p50 — other work on the machine; rerun alone"
                        )
                    rows.append(row)
    return rows, notes


def measure(
    art: Artifact,
    data: ImageData,
    bench,
    device: torch.device,
    *,
    feed: Callable | None = None,
    memory: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """One row of report.json's ``artifacts``. ``feed`` turns uint8 test images into an ONNX file's
    input (default: from its metadata, else the data's normalization); ``memory=False`` skips the
    peak-memory child process (``peak_rss_bytes`` None)."""
    cuda_peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if art.format == "torch":
        assert art.model is not None
        top1, top5 = torch_accuracy(art.model, data, device)
        art.model.to("cpu")
        macs, params = count(art.model, batch_of(data, 1))
        nonzero = sum(int(torch.count_nonzero(p)) for p in art.model.parameters())
    else:
        sess = session(art.path)
        feed = feed or feeder(sess, data)
        top1, top5 = _onnx_topk(sess, feed, data)
        # What the file itself holds and computes (BatchNorm folded, biases included), so one file
        # reads the same in a run's report and in `compress bench`.
        params, nonzero = onnx_weight_counts(art.path)
        macs = onnx_macs(art.path)
    latency, notes = [], []
    if art.format == "onnx" or bench.torch_snapshots or art.role == "teacher":
        latency, notes = latency_rows(art, data, bench, feed)
    if art.format == "onnx" and (moved := int8_portability(read_metadata(sess), art.name)):
        # quantized for another CPU: measured in ORT's precision mode (onnx_utils.session), and said so
        notes.append(f"{moved}; measured so (exact, slower)")
    if device.type == "cuda" and art.format == "torch":
        cuda_peak = int(torch.cuda.max_memory_allocated(device))
    biggest = max(bench.batch_sizes)
    peak, why = None, None
    if memory and art.format == "onnx":
        assert feed is not None
        peak, why = peak_rss("onnx", art.path, feed(raw_batch(data, biggest)))
    elif memory and (art.factory or "").startswith("compress.api:python_"):  # (compress.api's private names)
        why = (
            f"{art.path.name}: peak memory not measured: the model was a Python object passed to compress.run, "
            "which a fresh process cannot rebuild"
        )
    elif memory:  # rebuilt with the factory the recipe (or the command line) names, never one the file names
        names = {"model": art.factory, "num_classes": data.num_classes, "in_channels": data.channels}
        peak, why = peak_rss("torch", art.path, batch_of(data, biggest).numpy(), **names)
    if why:
        notes.append(why)
    row = {
        "name": art.name,
        "role": art.role,
        "stage": art.stage,
        "path": str(art.path),
        "source": art.source,
        "format": art.format,
        "precision": art.precision,
        "accuracy": top1,
        "top5": top5,
        "size_bytes": file_bytes(art.path),
        "gzip_bytes": gzip_bytes(art.path),
        "params": params,
        "nonzero_params": nonzero,
        "macs": macs,
        "peak_rss_bytes": peak,  # load + one run at the largest batch size, in a fresh process
        "peak_cuda_bytes": cuda_peak,  # torch on CUDA: max allocated (ORT does not report it)
        "latency": latency,
    }
    return row, notes
