"""Latency probes for ``compress search``: a candidate is exported as the export stage exports it
(uint8 NHWC in, normalization in the graph), quantized as the quantize stage quantizes it (QDQ,
per-channel, the host's exact scheme), and timed on the target runtime at the target batch size and
thread count. Latency does not depend on the weights' values, so the probe skips the parity check
and calibrates on two batches.

Two exporters: the probe uses torch.onnx's TorchScript exporter at the target's fixed batch size
(0.2 s for a ResNet-20 against the dynamo exporter's 2-5 s here, which would make 100 candidates
take 5-8 minutes to export alone);
:meth:`Prober.confirm` re-measures a finalist on the file the export stage writes (dynamo, graph
rules, checker, parity), so the chosen model's latency is always the deployable file's.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress import metadata
from compress.bench import runtimes
from compress.bench.measure import onnx_accuracy
from compress.bench.size import file_bytes, onnx_macs
from compress.data import ImageData
from compress.metadata import feeder
from compress.onnx_api import export_onnx, quantize_onnx
from compress.onnx_utils import quiet_stdout, session
from compress.quantization import ptq
from compress.quantization.calibration import ArrayReader
from compress.search.config import SearchConfig, TargetConfig
from compress.stages.export import InGraphPreprocess

#: a decision stops early only when every paired ratio is this far from 1, on one side
CLOSE = 0.05
#: most file/reference pairs one decision times (each pair: two sessions of ``search.iters`` runs)
MAX_PAIRS = 16


def clear(ratios: list[float]) -> bool:
    """Every paired latency ratio on the same side of 1, by more than ``CLOSE``: the budget's answer
    does not hang on the machine's noise."""
    return max(ratios) < 1 - CLOSE or min(ratios) > 1 + CLOSE


class Prober:
    """Exports, converts and times candidate models as the recipe's export and quantize stages would
    write them; files live in a scratch folder."""

    def __init__(self, data: ImageData, target: TargetConfig, cfg: SearchConfig, export: Any, quant: Any) -> None:
        self.data, self.target, self.cfg, self.export, self.quant = data, target, cfg, export, quant
        layout = export.input_layout
        self.info = metadata.model_info(data, preprocess_in_graph=export.preprocess_in_graph, layout=layout)
        self._dir = tempfile.TemporaryDirectory(prefix="compress-search-")
        self.dir = Path(self._dir.name)
        raw = data.raw("test", torch.arange(max(target.batch_size, 32)) % data.test_size)
        images = self.info.prepare(raw.numpy(), layout="nchw")
        self.feed = np.ascontiguousarray(images[: target.batch_size])
        self.calibration = [images[:16], images[16:32]]
        self.example = torch.from_numpy(self.feed)  # the probe's graph takes exactly this batch (below)
        self.ref_feed, self._vs = None, ""  # _vs: timed beside which reference file (its bytes' hash)
        if target.latency_of is not None:
            self._vs = "/vs-" + hashlib.sha256(Path(target.latency_of).read_bytes()).hexdigest()[:12]
            ref = session(target.latency_of)  # fed as its own metadata says
            self.ref_feed = np.ascontiguousarray(feeder(ref, data)(raw[: target.batch_size]))

    def close(self) -> None:
        self._dir.cleanup()

    def _export_fast(self, model: nn.Module, path: Path, dynamic: bool = False) -> None:
        model = model.eval().cpu()
        info = self.info
        wrapped = InGraphPreprocess(model, info).eval() if info.preprocess_in_graph or info.layout == "nhwc" else model
        with warnings.catch_warnings(), quiet_stdout():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                wrapped,
                (torch.cat([self.example, self.example]) if dynamic else self.example,),
                str(path),
                dynamo=False,
                opset_version=self.export.opset,
                input_names=[info.input_name],
                output_names=["logits"],
                dynamic_axes={info.input_name: {0: "batch"}, "logits": {0: "batch"}} if dynamic else None,
            )  # a fixed batch, so every shape computation folds away: a dynamic axis leaves Shape/Gather/Concat
            # chains in this exporter's graph that the deployable (dynamo) file does not have, and at ~0.2 ms
            # their per-node cost made the probe slower than the file it stands for
        metadata.update(path, info.to_metadata())  # read back by onnx_accuracy's feeder

    def time(self, path: Path, runtime: str, threads: int, rounds: int = 1, decide: bool = False) -> dict[str, float]:
        """p50/p90 of ``iters`` runs after ``warmup`` (median over ``rounds`` fresh sessions).

        With ``target.latency_of`` the reference file is timed in pairs with ``path`` (at least 2 pairs,
        the order alternating so a steady drift favours neither) and each pair gives a ratio: on this
        kind of shared VM the machine's speed drifts 2x within minutes, so only files timed seconds
        apart compare. ``latency_ratio`` is the median ratio and ``latency_ms_budget`` the reference's
        time at that ratio (``latency_ms / latency_ratio``: ``fits`` then reads the ratio). With
        ``decide``, pairs are added (up to ``MAX_PAIRS``) until every pair agrees on the side of 1 by
        more than ``CLOSE`` (:func:`clear`): one file timed against itself reads 0.90-1.12 in four pairs
        here while training runs beside it, so a few pairs' median alone would decide a close call by
        chance."""
        ref = self.target.latency_of
        rounds = max(rounds, 2) if ref is not None else rounds
        p50s: dict[str, list[float]] = {"file": [], "ref": []}
        p90s: list[float] = []
        ratios: list[float] = []

        def turn(name: str, file: Path, feed: np.ndarray) -> None:
            samples = runtimes.time_onnx(file, feed, runtime, threads, self.cfg.warmup, self.cfg.iters)
            p50, p90 = np.percentile(np.asarray(samples), [50, 90])
            p50s[name].append(float(p50))
            if name == "file":
                p90s.append(float(p90))

        while True:
            turns = [("file", path, self.feed)] + ([("ref", ref, self.ref_feed)] if ref is not None else [])
            for name, file, feed in turns if len(p90s) % 2 == 0 else turns[::-1]:
                turn(name, file, feed)
            if ref is not None:
                ratios.append(p50s["file"][-1] / p50s["ref"][-1])
            if len(p90s) < rounds:
                continue
            if not decide or not ratios or clear(ratios) or len(ratios) >= MAX_PAIRS:
                break
        out = {"latency_ms": float(np.median(p50s["file"])), "p90_ms": float(np.median(p90s))}
        if ref is not None:
            ratio = float(np.median(ratios))
            out |= {"latency_ratio": ratio, "latency_ms_budget": out["latency_ms"] / ratio, "ratios": ratios}
        return out

    def probe(self, model: nn.Module, key: str) -> dict[str, dict[str, Any]]:
        """{"precision/runtime/threads": {latency_ms, p90_ms, size_bytes, macs}} for the candidate ``model``,
        over the search's precisions × runtimes × thread counts (MACs of the file: BatchNorm folded)."""
        fp32 = self.dir / f"{key}.onnx"
        self._export_fast(model, fp32)
        out: dict[str, dict[str, Any]] = {}
        macs = onnx_macs(fp32)
        for precision in self.cfg.precisions:
            path = self._convert(fp32, precision, calibrated=False)
            for runtime in self.cfg.runtimes or [self.target.runtime]:
                for threads in self.cfg.threads or [self.target.threads]:
                    lat = self.time(path, runtime, threads)
                    where = self.where(precision, runtime, threads)
                    out[where] = {**lat, "size_bytes": file_bytes(path), "macs": macs}
        self._clean(key)
        return out

    def combos(self) -> list[str]:
        """Every "precision/runtime/threads" the search times a candidate at."""
        runtimes_ = self.cfg.runtimes or [self.target.runtime]
        threads = self.cfg.threads or [self.target.threads]
        return [self.where(p, r, t) for p in self.cfg.precisions for r in runtimes_ for t in threads]

    def where(self, precision: str, runtime: str, threads: int) -> str:
        """The key of one measurement's conditions (and the reference file it was timed beside)."""
        return f"{precision}/{runtime}/{threads}{self._vs}"

    def accuracy(self, model: nn.Module, key: str) -> dict[str, float]:
        """Top-1 of the trained candidate on the data's test split (the search's held-out images) in each
        precision, run by ONNX Runtime (INT8 calibrated as the quantize stage calibrates): the estimate
        the choice compares."""
        fp32 = self.dir / f"{key}.acc.onnx"
        self._export_fast(model, fp32, dynamic=True)  # scored in batches; the graph's speed is not the question
        out = {p: float(onnx_accuracy(self._convert(fp32, p, calibrated=True), self.data)) for p in self.cfg.precisions}
        self._clean(f"{key}.acc")
        return out

    def _clean(self, key: str) -> None:
        for f in self.dir.glob(f"{key}*"):
            f.unlink(missing_ok=True)

    def _convert(self, fp32: Path, precision: str, calibrated: bool) -> Path:
        """``fp32`` as ``precision``: INT8 QDQ with the quantize stage's scheme and per-channel setting
        (calibrated as that stage calibrates, or on two batches of minmax where only the graph's shape
        matters), FP16 as its ``mode: fp16`` writes it."""
        if precision == "fp32":
            return fp32
        dst = fp32.with_name(f"{fp32.stem}.{precision}.onnx")
        q = self.quant
        if precision == "fp16":
            ptq.fp16(fp32, dst, keep_io_types=q.keep_io_types)
        elif calibrated:
            return quantize_onnx(
                fp32, self.data, out=dst, scheme=q.scheme, calibration=q.calibration, per_channel=q.per_channel,
                percentile=q.percentile, batches=q.calibration_batches, batch_size=q.calibration_batch_size,
            ).path  # fmt: skip
        else:
            pre = dst.with_name(f"{dst.stem}.pre.onnx")
            ptq.preprocess(fp32, pre)
            reader = ArrayReader(self.calibration, self.info.input_name, batch_size=self.target.batch_size)
            ptq.static(pre, dst, reader, method="minmax", per_channel=q.per_channel, scheme=q.scheme)
            pre.unlink(missing_ok=True)
        return dst

    def confirm(self, model: nn.Module, key: str, precision: str, runtime: str, threads: int) -> dict[str, Any]:
        """The deployable file's own measurements (median of at least 4 sessions, paired with the
        reference file until the budget is clear): written as the export and
        quantize stages write it (dynamo exporter, parity-checked, debug info stripped, metadata)."""
        fp32 = self.dir / f"{key}.final.onnx"
        e = self.export
        export_onnx(model.eval().cpu(), fp32, data=self.data, parity_batch=8, opset=e.opset,
                    preprocess_in_graph=e.preprocess_in_graph, input_layout=e.input_layout)  # fmt: skip
        path = self._convert(fp32, precision, calibrated=True)
        timed = self.time(path, runtime, threads, rounds=4, decide=True)
        out = {**timed, "size_bytes": file_bytes(path), "macs": onnx_macs(fp32)}
        self._clean(f"{key}.final")
        return out
