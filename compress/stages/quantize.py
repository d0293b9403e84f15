"""Quantize the exported ONNX student with onnxruntime.quantization: static INT8 from calibration
data (the default), dynamic INT8, or FP16.

Static defaults: QDQ, per-channel weights, and ``scheme: auto`` — the fastest INT8 scheme ONNX
Runtime computes exactly on this CPU (``quantization.schemes``): uint8 activations with int8
weights (U8S8) where the CPU has VNNI, 7-bit weights (``reduce_range``) where U8S8's int16 sums
would saturate (x86 without VNNI). ORT's own defaults (S8S8, per-tensor) made ResNet-20 2x *slower*
than FP32 on an AVX512-VNNI CPU. Calibration streams training batches (no augmentation),
``calibration_chunk`` at a time, fed exactly as the FP32 model's metadata says (raw uint8 pixels
when preprocessing is in the graph).

With ``max_accuracy_drop`` the stage measures the INT8 top-1 against FP32's and, while over budget,
keeps the nodes quantization hurts most in float (``nodes_to_exclude``), a few at a time, calibrating
once. It always times the result against FP32 at batch 1 and warns, with the float ops left between
Q/DQ pairs, when INT8 is slower. The file inherits the FP32 file's metadata with its precision.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from compress import metadata
from compress.bench.measure import onnx_accuracy, percentiles, raw_batch, time_ort
from compress.context import Artifact, Context
from compress.onnx_utils import session
from compress.quantization import ptq
from compress.quantization.calibration import BatchReader
from compress.quantization.mixed import float_islands, node_errors
from compress.quantization.schemes import SCHEMES, Scheme, choose
from compress.stages.base import STAGES, Stage


@STAGES.register("quantize")
class Quantize(Stage):
    """ONNX Runtime quantization of the student: static INT8 (calibrated), dynamic INT8 or FP16."""

    kind: Literal["quantize"] = "quantize"
    mode: Literal["static", "dynamic", "fp16"] = Field("static", description="INT8 static/dynamic, or FP16")
    calibration: Literal["minmax", "entropy", "percentile", "distribution"] = Field(
        "percentile", description="activation ranges (percentile 99.999 measured best on the CIFAR ResNets)"
    )
    percentile: float = Field(99.999, gt=90, lt=100, description="for calibration: percentile")
    calibration_batches: int = Field(16, ge=1, le=100_000)
    calibration_batch_size: int = Field(32, ge=1, le=4096)
    calibration_chunk: int = Field(8, ge=1, le=100_000, description="batches whose activations are held at once")
    per_channel: bool = True
    scheme: Literal["auto", *SCHEMES.names()] = Field(  # type: ignore[valid-type]
        "auto", description="INT8 activation x weight types; auto = the fastest exact on this CPU (probed)"
    )
    symmetric_activations: bool = False
    format: Literal["qdq", "qoperator"] = "qdq"
    op_types: list[str] = Field(default_factory=list, description="ONNX op types to quantize (default: all ORT can)")
    exclude: list[str] = Field(default_factory=list, description="ONNX node names kept in float")
    keep_io_types: bool = Field(True, description="fp16: graph inputs/outputs keep their types")
    max_accuracy_drop: float | None = Field(
        None, gt=0, lt=1, description="static: absolute top-1 drop allowed; keep nodes in float until it holds"
    )
    accuracy_images: int = Field(2000, ge=10, le=1_000_000, description="test images for the accuracy checks")
    max_excluded: int = Field(16, ge=1, le=10_000, description="most nodes kept in float by the accuracy loop")
    exclude_per_step: int = Field(1, ge=1, le=1000, description="nodes moved to float per step of the loop")

    needs = frozenset({"onnx"})
    provides = frozenset({"int8"})
    example: ClassVar[dict[str, Any]] = {"kind": "quantize", "calibration_batches": 2}
    renamed: ClassVar[dict[str, str]] = dict.fromkeys(
        ("activation_type", "weight_type"), "replaced by scheme: u8s8, u8s8_reduce_range, s8s8, u8u8, ... or auto"
    )

    @model_validator(mode="after")
    def _mode_fields(self) -> Quantize:
        if self.calibration == "distribution" and not self.symmetric_activations:
            # measured: asymmetric uint8 from ORT's distribution ranges (meant for FP8) drops digits to 13% top-1
            raise ValueError("calibration: distribution gives symmetric ranges; set symmetric_activations: true")
        if self.mode != "static":
            if self.max_accuracy_drop is not None:
                raise ValueError(f"max_accuracy_drop needs mode: static (got mode: {self.mode})")
            if self.format != "qdq" and self.mode == "fp16":
                raise ValueError("format applies to INT8 modes only")
        if self.mode == "dynamic" and self.scheme != "auto" and SCHEMES.get(self.scheme).activation != "uint8":
            raise ValueError(f"mode: dynamic quantizes activations to uint8; scheme {self.scheme} has int8 ones")
        if self.mode == "fp16" and self.scheme != "auto":
            raise ValueError("scheme applies to INT8 modes only")
        return self

    def apply(self, ctx: Context) -> dict[str, Any]:
        fp32 = ctx.latest("student", "onnx")
        assert fp32 is not None  # guaranteed by the recipe's stage-order check
        precision = "fp16" if self.mode == "fp16" else "int8"
        out = fp32.path.with_name(f"{fp32.path.stem}.{precision}.onnx")
        metrics: dict[str, Any] = {"mode": self.mode, "fp32_bytes": fp32.path.stat().st_size}
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # calibrator sessions log to fd 2; we report failures ourselves
        sess = session(fp32.path)
        feed = metadata.feeder(sess, ctx.data)  # candidate files carry no metadata: fed as the FP32 file
        one = feed(raw_batch(ctx.data, 1))  # one test image, as the FP32 file takes it: for timing
        with tempfile.TemporaryDirectory(prefix="compress-quant-") as tmp_name:
            tmp = Path(tmp_name)
            raw = tmp / "result.onnx"
            scheme: Scheme | None = None  # FP16 has none
            if self.mode == "fp16":
                ptq.fp16(fp32.path, raw, keep_io_types=self.keep_io_types)
            else:
                choice = choose(self.scheme, dynamic=self.mode == "dynamic")
                (ctx.log.info if choice.probe.exact else ctx.log.warning)("quantize: scheme %s", choice.reason)
                metrics |= choice.metrics()
                scheme = choice.scheme
                pre = tmp / "pre.onnx"
                ptq.preprocess(fp32.path, pre)
                if self.mode == "dynamic":
                    ptq.dynamic(pre, raw, per_channel=self.per_channel, scheme=scheme, op_types=self.op_types)
                else:
                    metrics |= self._static(ctx, scheme, fp32.path, pre, raw, tmp, sess.get_inputs()[0].name, feed, one)
            metrics |= self._speed(ctx, fp32.path, raw, tmp, one)
            # The result appears in the run directory only complete, with its metadata.
            props = {"precision": precision, "source": fp32.name, "quantization": self._describe(scheme)}
            metadata.update(raw, metadata.read(fp32.path) | props | (scheme.metadata() if scheme else {}), dest=out)
        ctx.add_artifact(Artifact(out.name, "student", "onnx", precision, out, self.kind, source=fp32.source))
        metrics[f"{precision}_bytes"] = out.stat().st_size
        metrics["ops"] = ptq.quantized_ops(out)
        return metrics

    def _static(
        self, ctx: Context, scheme: Scheme, fp32: Path, pre: Path, raw: Path, tmp: Path, input_name: str, feed, one
    ) -> dict[str, Any]:
        reader = BatchReader(ctx.data, input_name, self.calibration_batches, self.calibration_batch_size, feed)

        def top1(path: Path) -> float:
            return onnx_accuracy(path, ctx.data, feed=feed, images=self.accuracy_images)  # type: ignore[return-value]

        cache = tmp / "calibration.json"  # ranges computed once, reused for every exclusion list

        def quantize(exclude: list[str], dst: Path) -> None:
            ptq.static(
                pre, dst, reader, method=self.calibration, percentile=self.percentile, fmt=self.format,
                per_channel=self.per_channel, scheme=scheme, symmetric_activations=self.symmetric_activations,
                op_types=self.op_types, exclude=exclude, chunk=self.calibration_chunk, cache=cache,
            )  # fmt: skip

        metrics: dict[str, Any] = {
            "calibration": self.calibration,
            "calibration_images": reader.images,
            "calibration_input": reader.input_name,
        }
        quantize(self.exclude, raw)
        if self.max_accuracy_drop is None:
            return metrics
        budget = self.max_accuracy_drop
        base = top1(fp32)
        excluded, files = list(self.exclude), [raw]
        steps = [self._step(excluded, top1(raw), base, raw, one)]
        ctx.log.info("quantize: fp32 top-1 %.4f, int8 %.4f (drop %.4f)", base, steps[0]["top1"], steps[0]["drop"])
        if steps[0]["drop"] > budget:
            errors = node_errors(pre, raw, reader, min(4, len(reader)), tmp)
            ranked = [n for n, _ in sorted(errors.items(), key=lambda kv: kv[1]) if n not in excluded]
            metrics["node_sqnr_db"] = {n: round(errors[n], 2) for n in ranked[: self.max_excluded]}
            limit = len(self.exclude) + self.max_excluded
            while steps[-1]["drop"] > budget and ranked and len(excluded) < limit:
                take = min(self.exclude_per_step, limit - len(excluded))
                excluded, ranked = excluded + ranked[:take], ranked[take:]
                files.append(tmp / f"step{len(files)}.onnx")
                quantize(excluded, files[-1])
                steps.append(self._step(excluded, top1(files[-1]), base, files[-1], one))
                ctx.log.info("quantize: %d nodes in float -> top-1 %.4f (drop %.4f)", len(excluded),
                             steps[-1]["top1"], steps[-1]["drop"])  # fmt: skip
        within = [i for i, st in enumerate(steps) if st["drop"] <= budget]
        best = within[0] if within else max(range(len(steps)), key=lambda i: steps[i]["top1"])
        if best:
            files[best].replace(raw)
        if not within:
            ctx.log.warning(
                "quantize: top-1 drop %.4f is over max_accuracy_drop %.4f even with %d nodes in float "
                "(raise max_excluded, calibrate differently, or try a qat stage)",
                steps[best]["drop"], budget, len(steps[best]["excluded"]),
            )  # fmt: skip
        return metrics | {
            "fp32_top1": base,
            "int8_top1": steps[best]["top1"],
            "accuracy_budget_met": bool(within),
            "excluded_nodes": steps[best]["excluded"],
            "accuracy_steps": steps,
        }

    def _step(self, excluded: list[str], acc: float, base: float, path: Path, one) -> dict[str, Any]:
        return {"excluded": list(excluded), "top1": acc, "drop": base - acc, "p50_ms_bs1": _p50(path, one)}

    def _speed(self, ctx: Context, fp32: Path, result: Path, tmp: Path, one) -> dict[str, Any]:
        """Batch-1 p50 of FP32 and the result on ``one``, timed alternately; a slower INT8 file is a
        warning naming the float ops ONNX Runtime left between Q/DQ pairs."""
        a, b = _p50(fp32, one), _p50(result, one)
        a, b = (a + _p50(fp32, one)) / 2, (b + _p50(result, one)) / 2
        speed: dict[str, Any] = {"fp32_p50_ms_bs1": a, "p50_ms_bs1": b, "speedup_bs1": a / b}
        out = {"speed": speed}  # clock-dependent: kept apart from the deterministic metrics
        if self.mode != "fp16" and b > a:
            islands = float_islands(result, tmp)
            speed["float_ops_between_qdq"] = dict(islands)
            ctx.log.warning(
                "quantize: the INT8 model is %.2f× SLOWER than FP32 at batch 1 (%.3f vs %.3f ms). Likely: %s",
                b / a, b, a, "; ".join(self._why_slow(islands, a)),
            )  # fmt: skip
        elif self.mode == "fp16" and b > a:
            ctx.log.warning("quantize: FP16 is %.2f× slower than FP32 on this CPU; FP16 is meant for GPUs", b / a)
        return out

    def _why_slow(self, islands: Counter, fp32_ms: float) -> list[str]:
        causes = []
        if islands:
            ops = ", ".join(f"{op} ×{n}" for op, n in islands.most_common(6))
            causes.append(
                f"ops ONNX Runtime runs in float between DequantizeLinear and QuantizeLinear ({ops}): "
                "each pays a dequantize and a requantize; try op_types: [Conv, Gemm, MatMul]"
            )
        if self.mode == "dynamic":
            causes.append("dynamic INT8 computes activation ranges at run time and suits Linear/attention-heavy models")
        elif not self.per_channel or self.scheme not in ("auto", "u8s8", "u8s8_reduce_range"):
            causes.append("per-tensor weights, int8 activations or uint8 weights (U8S8 per-channel measured fastest)")
        if fp32_ms < 0.5:
            causes.append(f"at {fp32_ms:.3f} ms per call, per-op overhead dominates: INT8 pays off on larger models")
        return causes or ["this CPU lacks fast INT8 instructions (AVX512-VNNI / AVX-VNNI)"]

    def memory_hint(self, field: str) -> str:
        return (
            f"lower {field}.calibration_batch_size (now {self.calibration_batch_size}) or "
            f"{field}.calibration_chunk (now {self.calibration_chunk})"
        )

    def _describe(self, scheme: Scheme | None) -> str:
        return ptq.describe(
            scheme,
            mode=self.mode,
            fmt=self.format,
            per_channel=self.per_channel,
            calibration=self.calibration,
            symmetric_activations=self.symmetric_activations,
            keep_io_types=self.keep_io_types,
        )


def _p50(path: Path, x, iters: int = 20) -> float:
    """Batch-1 p50 (ms) of an ONNX file on ``x``, one test image as the file takes it."""
    timed = time_ort(path, x, "cpu", 0, 3, iters)
    assert not isinstance(timed, str)  # only the CUDA/TensorRT providers can fall back
    return percentiles(timed[0], 1)["p50_ms"]
