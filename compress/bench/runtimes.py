"""The runtimes an ONNX file is timed on, on CPU: ONNX Runtime, and OpenVINO where it is installed.

The deployable artifact stays ONNX; which runtime serves it fastest depends on the host, the batch size
and the precision (issue 23: OpenVINO ran our INT8 ResNet-20 faster than ORT at batch 64 but slower at
batch 1 on an AVX2 host). So every runtime is one registry entry with the same four calls, and
:func:`time_onnx` (``compress bench``, the benchmark, ``compress search``) times each one the same way:
a ``runner(path, threads)`` built outside the timing, then ``feed -> logits`` calls.

OpenVINO is optional and imported only when a runner is built: ``available()`` asks the installed
package metadata, so validating a recipe or a ``--runtime`` never pays its import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compress.errors import CompressError, first_line
from compress.onnx_utils import run, session
from compress.registry import Registry


@dataclass(frozen=True)
class Runner:
    """``feed -> logits`` for one file at one thread count, plus the thread count the runtime reports."""

    call: Callable[[np.ndarray], np.ndarray]
    threads: int

    def __call__(self, feed: np.ndarray) -> np.ndarray:
        return self.call(feed)


class Runtime(Protocol):
    name: str

    def available(self) -> str | None:
        """None, or why it cannot run here (one line saying how to install it)."""

    def version(self) -> str | None: ...

    def runner(self, path: Path, threads: int | None) -> Runner: ...


RUNTIMES: Registry[Runtime] = Registry("runtime")


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """``iters`` wall-clock samples (ms) of ``fn`` after ``warmup`` untimed calls."""
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


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class OnnxRuntime:
    """ONNX Runtime on CPU, opened as compress opens every session (``onnx_utils.session``): full graph
    optimization, and an INT8 file whose scheme saturates on this CPU in ORT's precision mode, so what
    is timed computes correctly here. A fresh session per runner (no idle pool left spinning)."""

    name = "onnxruntime"

    def available(self) -> str | None:
        return None  # a dependency of compress

    def version(self) -> str | None:
        return _installed("onnxruntime")

    def runner(self, path: Path, threads: int | None) -> Runner:
        sess = session(Path(path), threads=threads)
        return Runner(lambda x: run(sess, x), sess.get_session_options().intra_op_num_threads)


class OpenVino:
    """OpenVINO's CPU plugin reading the ONNX file itself (no conversion step, nothing written).

    Compiled with ``INFERENCE_NUM_THREADS`` = threads, the latency hint (one stream: one request at a
    time, as a batch-1 server runs) and ``INFERENCE_PRECISION_HINT f32``: on a bf16-capable CPU the
    plugin otherwise runs FP32 layers in bf16, and an FP32 file must be timed (and agree) as FP32. Our
    INT8 files are QDQ ONNX, which the plugin runs as INT8 as they are.

    A model is compiled for the shape it is fed (reshaped to a static batch, as OpenVINO's deployment
    guide advises: dynamic batch measured 3-15% slower here at batch 1 and 64) and kept, per
    (file, threads, shape), so repeated timings of one file do not recompile it.
    """

    name = "openvino"
    CACHED = 32  # compiled models kept, per (file, threads, shape): a CIFAR ResNet is a few MB

    def __init__(self) -> None:
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self._core: Any = None

    def available(self) -> str | None:
        if importlib.util.find_spec("openvino") is None:
            return "openvino is not installed: pip install openvino (or pip install 'compress[openvino]')"
        return None

    def version(self) -> str | None:
        return _installed("openvino")

    def runner(self, path: Path, threads: int | None) -> Runner:
        path = Path(path)
        requests: dict[tuple[int, ...], list[Any]] = {}  # shape -> [infer request, array bound to it]

        def call(x: np.ndarray) -> np.ndarray:
            x = np.ascontiguousarray(x)
            slot = requests.get(x.shape)
            if slot is None:
                slot = requests[x.shape] = [self.compiled(path, threads, x.shape).create_infer_request(), None]
            req = slot[0]
            if slot[1] is not x:  # bind the caller's buffer (no copy); kept, so a timed loop binds it once
                import openvino as ov

                req.set_input_tensor(ov.Tensor(x, shared_memory=True))
                slot[1] = x
            # The plain request API: infer({...}) wraps inputs and outputs in Python dicts, which cost
            # 0.06-0.09 ms per call here, as much as a small model's whole run.
            req.infer()
            return req.get_output_tensor(0).data.copy()

        # Thread count as the plugin reports it, read from a model compiled at the file's own shape
        # (batch 1 where the batch axis is dynamic); the same setting serves every shape.
        first = self.compiled(path, threads)
        return Runner(call, int(first.get_property("INFERENCE_NUM_THREADS")))

    def layer_precisions(self, path: Path, threads: int | None = 1) -> dict[str, list[str]]:
        """Each layer type of the compiled graph and the precisions the plugin runs it in (an INT8 file's
        convolutions run in ``u8``; a float fallback would say ``f32``)."""
        out: dict[str, set[str]] = {}
        for op in self.compiled(Path(path), threads).get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            out.setdefault(info["layerType"].astype(str), set()).add(info["runtimePrecision"].astype(str))
        return {k: sorted(v) for k, v in sorted(out.items())}

    def compiled(self, path: Path, threads: int | None, shape: tuple[int, ...] | None = None) -> Any:
        """The ``openvino.CompiledModel`` of ``path`` at ``threads`` for input ``shape`` (default: the
        file's own, batch 1 where it is dynamic), compiled once per (file as it is now, threads, shape)."""
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, threads)
        if (key, shape) in self._compiled:
            self._compiled.move_to_end((key, shape))
            return self._compiled[key, shape]
        why = self.available()
        if why is not None:
            raise CompressError(why)
        import openvino as ov

        if self._core is None:
            self._core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        asked = shape
        try:
            model = self._core.read_model(str(path))
            if shape is None:
                dims = model.inputs[0].get_partial_shape()
                shape = tuple(1 if d.is_dynamic else d.get_length() for d in dims)
            if (key, shape) in self._compiled:  # the file's own shape, already compiled for a feed of it
                self._compiled[key, asked] = self._compiled[key, shape]
                return self._compiled[key, shape]
            model.reshape({model.inputs[0]: list(shape)})
            compiled = self._core.compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError and friends; the first line says it
            raise CompressError(f"{path}: openvino cannot run it: {first_line(exc)}") from None
        self._compiled[key, shape] = self._compiled[key, asked] = compiled
        while len(self._compiled) > self.CACHED:
            self._compiled.popitem(last=False)
        return compiled


RUNTIMES.register(OnnxRuntime.name)(OnnxRuntime())
RUNTIMES.register(OpenVino.name)(OpenVino())


def get(name: str) -> Runtime:
    """The runtime ``name``, installed: one-line CompressError naming the known ones, or how to install it."""
    rt = RUNTIMES.get(name)
    why = rt.available()
    if why is not None:
        raise CompressError(why)
    return rt


def check(names: Iterable[str], field: str) -> None:
    """Refuse an unknown or missing runtime before anything runs: one line that starts with ``field``."""
    for name in names:
        try:
            get(name)
        except CompressError as exc:
            raise CompressError(f"{field}: {exc}") from None


def timed(
    path: Path,
    feed: np.ndarray,
    runtime: str = "onnxruntime",
    threads: int | None = 1,
    warmup: int = 10,
    iters: int = 100,
) -> tuple[list[float], int]:
    """Samples (ms) of ``runtime`` running ``path`` on ``feed``, and the thread count it reports."""
    fn = get(runtime).runner(Path(path), threads)
    return time_calls(lambda: fn(feed), warmup, iters), fn.threads


def time_onnx(
    path: Path, feed: np.ndarray, runtime: str = "onnxruntime", threads: int = 1, warmup: int = 10, iters: int = 100
) -> list[float]:
    """Latency samples (ms) of one ONNX file on one runtime at ``threads``, one batch (``feed``) per call;
    CompressError (one line) for an unknown or uninstalled runtime or a file the runtime cannot run."""
    return timed(path, feed, runtime, threads, warmup, iters)[0]


def versions() -> dict[str, str | None]:
    """Every registered runtime's installed version (None: not installed)."""
    return {name: rt.version() for name, rt in RUNTIMES.items()}
