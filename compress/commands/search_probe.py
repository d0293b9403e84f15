"""Latency probes for ``compress search``: a candidate is exported as the export stage exports it
(uint8 NHWC in, normalization in the graph), quantized as the quantize stage quantizes it (QDQ,
per-channel, the host's exact scheme), and timed on the target runtime at the target batch size and
thread count. Latency does not depend on the weights' values, so the probe skips the parity check
and calibrates on two batches.

Two exporters: the probe uses torch.onnx's TorchScript exporter (0.2 s for a ResNet-20 against the
dynamo exporter's 2-5 s here, which would make 100 candidates take 5-8 minutes to export alone);
:meth:`Prober.confirm` re-measures a finalist on the file the export stage writes (dynamo, graph
rules, checker, parity), so the chosen model's latency is always the deployable file's.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress import metadata
from compress.bench import runtimes
from compress.bench.size import file_bytes, onnx_macs
from compress.data import ImageData
from compress.onnx_api import export_onnx, quantize_onnx
from compress.onnx_utils import quiet_stdout
from compress.quantization import ptq
from compress.quantization.calibration import ArrayReader
from compress.search.config import SearchConfig, TargetConfig
from compress.stages.export import InGraphPreprocess


class Prober:
    """Exports, quantizes and times candidate models; files live in a scratch folder."""

    def __init__(self, data: ImageData, target: TargetConfig, cfg: SearchConfig, opset: int = 18) -> None:
        self.data, self.target, self.cfg, self.opset = data, target, cfg, opset
        self.info = metadata.model_info(data, preprocess_in_graph=True, layout="nhwc")
        self._dir = tempfile.TemporaryDirectory(prefix="compress-search-")
        self.dir = Path(self._dir.name)
        raw = data.raw("test", torch.arange(max(target.batch_size, 32)) % data.test_size)
        images = self.info.prepare(raw.numpy(), layout="nchw")
        self.feed = np.ascontiguousarray(images[: target.batch_size])
        self.calibration = [images[:16], images[16:32]]
        self.example = torch.from_numpy(np.ascontiguousarray(images[:2]))

    def close(self) -> None:
        self._dir.cleanup()

    def _export_fast(self, model: nn.Module, path: Path) -> None:
        wrapped = InGraphPreprocess(model.eval().cpu(), self.info).eval()
        with warnings.catch_warnings(), quiet_stdout():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                wrapped,
                (self.example,),
                str(path),
                dynamo=False,
                opset_version=self.opset,
                input_names=[self.info.input_name],
                output_names=["logits"],
                dynamic_axes={self.info.input_name: {0: "batch"}, "logits": {0: "batch"}},
            )

    def int8(self, src: Path, dst: Path) -> None:
        """QDQ INT8 as the quantize stage writes it (scheme auto: exact on this CPU); minmax ranges,
        since only the graph's shape matters for latency."""
        pre = dst.with_name(f"{dst.stem}.pre.onnx")
        ptq.preprocess(src, pre)
        reader = ArrayReader(self.calibration, self.info.input_name)
        ptq.static(pre, dst, reader, method="minmax", per_channel=True, scheme="auto")
        pre.unlink(missing_ok=True)

    def time(self, path: Path, iters: int | None = None) -> dict[str, float]:
        samples = runtimes.time_onnx(
            path, self.feed, self.target.runtime, self.target.threads, self.cfg.warmup, iters or self.cfg.iters
        )
        a = np.asarray(samples)
        p50, p90 = np.percentile(a, [50, 90])
        return {"latency_ms": float(p50), "p90_ms": float(p90)}

    def probe(self, model: nn.Module, key: str, precisions: list[str]) -> dict[str, dict[str, Any]]:
        """{precision: {latency_ms, p90_ms, size_bytes, macs}} for the candidate ``model``."""
        fp32 = self.dir / f"{key}.onnx"
        self._export_fast(model, fp32)
        return self._measure(fp32, precisions)

    def _measure(self, fp32: Path, precisions: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        macs = onnx_macs(fp32)
        for precision in precisions:
            path = fp32 if precision == "fp32" else fp32.with_name(f"{fp32.stem}.int8.onnx")
            if precision == "int8":
                self.int8(fp32, path)
            out[precision] = {**self.time(path), "size_bytes": file_bytes(path), "macs": macs}
        for path in fp32.parent.glob(f"{fp32.stem}*"):
            path.unlink(missing_ok=True)
        return out

    def confirm(self, model: nn.Module, key: str, precision: str) -> dict[str, Any]:
        """The deployable file's own measurements: written as the export and quantize stages write it
        (dynamo exporter, parity-checked, debug info stripped, metadata; percentile calibration)."""
        fp32 = self.dir / f"{key}.final.onnx"
        export_onnx(model.eval().cpu(), fp32, data=self.data, parity_batch=8, opset=self.opset)
        path = fp32
        if precision == "int8":
            path = quantize_onnx(fp32, self.data, batches=2, batch_size=16).path
        out = {**self.time(path), "size_bytes": file_bytes(path), "macs": onnx_macs(fp32)}
        for f in self.dir.glob(f"{key}.final*"):
            f.unlink(missing_ok=True)
        return out
