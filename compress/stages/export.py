"""Export to ONNX (torch.onnx dynamo exporter + onnxscript) with a dynamic batch axis, then prove it.

By default the exported graph takes raw uint8 images (NHWC, as Pillow/OpenCV hand them over) and
does the scaling and normalization itself, so a deployer needs no preprocessing code; the file's
metadata says so (see ``compress.metadata``). The exporter's graph goes through
``compress.graph_rules`` (onnxscript rewrite rules: a spatial ReduceMean becomes GlobalAveragePool,
which INT8 runs in uint8). After writing, the file passes ``onnx.checker`` (full check) and ONNX
Runtime fed the raw test images must reproduce PyTorch's logits on the same images normalized the
training way, within ``atol``; otherwise the stage fails rather than leave a broken model in the run
directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import torch
from pydantic import Field
from torch import nn

from compress import graph_rules, metadata
from compress.context import Artifact, Context
from compress.deploy import ModelInfo
from compress.errors import StageFailed, first_line
from compress.onnx_utils import quiet_stdout, run, session
from compress.stages.base import STAGES, Stage


class InGraphPreprocess(nn.Module):
    """uint8 images in ``layout`` -> (optionally) the model's normalization -> the model.

    The arithmetic is DataBundle.normalize's, op for op (cast, /255, -mean, /std), so the first
    convolution sees the same float32 values in ONNX Runtime as in training.

    NHWC input is normalized as rows (N, H, W·C) against mean/std repeated W times, and only then
    put channel-first. Normalizing after the permute (channel-first, spans of H·W) would be as fast
    in FP32, but in INT8 graphs ONNX Runtime's transpose optimizer pushes QLinearConv's
    channels-last Transpose back up through the elementwise ops to the input, where the broadcast
    over the last axis runs H·W spans of C = 3 values each (ORT loops per span): INT8 ResNet-20 was
    8% slower at batch 1 and 13% at batch 64 for it (benchmarks/results/preprocess_in_graph.md).
    The Reshape back to (N, H, W, C) stops the optimizer there. NCHW input needs nothing of the
    kind: the Transpose stays behind the uint8 QuantizeLinear.
    """

    def __init__(self, model: nn.Module, info: ModelInfo) -> None:
        super().__init__()
        self.model, self.nhwc, self.normalize = model, info.layout == "nhwc", info.preprocess_in_graph
        mean = torch.tensor(info.mean, dtype=torch.float32)
        std = torch.tensor(info.std, dtype=torch.float32)
        if self.nhwc:  # one row of W pixels, channels interleaved: (W·C,)
            mean, std = mean.repeat(info.width), std.repeat(info.width)
        else:
            mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.normalize and self.nhwc:
            h, w, c = x.shape[1:]  # static; only the batch axis is dynamic
            x = self._normalize(x.reshape(-1, h, w * c)).reshape(-1, h, w, c)
        elif self.normalize:
            x = self._normalize(x)
        # A dense copy: a permuted view keeps NHWC strides through the model, and a later flatten/view
        # of it exports as as_strided -> Shape/Range/Gather nodes (8 of them after ResNet's pool).
        # Not .contiguous(): with C = 1 the permuted view already counts as contiguous and is kept.
        return self.model(x.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format) if self.nhwc else x)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) / 255.0 - self.mean) / self.std


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    input_name: str = "input",
    dynamic_batch: bool = True,
) -> None:
    """torch.onnx's dynamo exporter (batch axis dynamic unless ``dynamic_batch=False``), our graph
    rules, then ``onnx.checker``'s full check."""
    model = model.eval().to("cpu")
    batch = torch.export.Dim("batch", min=1, max=65536)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_stdout():
        program = torch.onnx.export(
            model,
            (example.cpu(),),
            dynamo=True,
            opset_version=opset,
            input_names=[input_name],
            output_names=["logits"],
            dynamic_shapes=({0: batch},) if dynamic_batch else None,
            optimize=True,
            verbose=False,
        )
    program.model = graph_rules.apply(program.model)
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)


def parity(model: nn.Module, path: Path, x: torch.Tensor, feed: torch.Tensor | None = None) -> dict[str, float]:
    """PyTorch on ``x`` (normalized) vs ONNX Runtime on ``feed`` (the same images as the graph takes them)."""
    model.eval()  # not chained: a torch.export'ed module's eval() (torchao's) returns None
    with torch.inference_mode():
        ref = model.to("cpu")(x.cpu()).numpy()
    got = run(session(path), (x if feed is None else feed).cpu().numpy())
    centred = ref - ref.mean(1, keepdims=True)
    return {
        "max_abs_diff": float(np.abs(ref - got).max()),
        "max_abs_logit": float(np.abs(ref).max()),
        "argmax_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
        # ‖ORT − PyTorch‖ / ‖centred PyTorch logits‖: the scale-free difference
        "relative_error": float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(centred)), 1e-12)),
        "batch": int(x.shape[0]),
    }


def export_checked(
    model: nn.Module,
    info: ModelInfo | None,
    path: Path,
    x: torch.Tensor,
    feed: torch.Tensor,
    *,
    opset: int = 18,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    what: str = "model",
    dynamic_batch: bool = True,
) -> dict[str, float]:
    """Export ``model`` to ``path`` (wrapped in :class:`InGraphPreprocess` when ``info`` puts the
    preprocessing or an NHWC layout in the graph), pass onnx.checker, and prove ORT on ``feed``
    reproduces PyTorch on ``x`` within ``atol + rtol * max|logit|``; one StageFailed line otherwise.
    The export stage and ``compress.onnx_api.export_onnx`` both call this. ``model`` ends on the CPU."""
    wrapped = InGraphPreprocess(model, info) if info and (info.preprocess_in_graph or info.layout == "nhwc") else model
    try:
        example = feed[:2] if len(feed) > 1 and dynamic_batch else feed
        export_onnx(wrapped, example, path, opset, info.input_name if info else "input", dynamic_batch)
    except Exception as exc:  # noqa: BLE001 - exporter errors are long; keep the first line
        raise StageFailed(f"export: {what} ({type(model).__name__}) could not be exported: {first_line(exc)}") from exc
    check = parity(model, path, x, feed)
    # fp32 rounding grows with the logits' scale (a random-init ResNet-56 emits |z| ~ 2000, where
    # torch's own fp32 result is 1e-3 away from fp64), so the bound is atol + rtol * max|z|.
    bound = atol + rtol * check["max_abs_logit"]
    if not check["max_abs_diff"] <= bound:
        raise StageFailed(
            f"export: ONNX Runtime disagrees with PyTorch for the {what}: max |Δlogit| "
            f"{check['max_abs_diff']:.3g} > {bound:.3g} (atol {atol:g} + rtol {rtol:g} × max|logit| "
            f"{check['max_abs_logit']:.3g})"
        )
    return check


@STAGES.register("export")
class Export(Stage):
    """ONNX export with a dynamic batch axis, checked by onnx.checker and ORT parity."""

    kind: Literal["export"] = "export"
    opset: int = Field(18, ge=17, le=23)
    teacher: bool = Field(True, description="also export the teacher (for a like-for-like ONNX comparison)")
    atol: float = Field(1e-4, gt=0, le=1, description="max |Δlogit| allowed between ORT and PyTorch")
    rtol: float = Field(1e-5, ge=0, le=1, description="plus this fraction of the largest |logit|")
    parity_batch: int = Field(64, ge=1, le=4096, description="test images used for the parity check")
    preprocess_in_graph: bool = Field(
        True, description="the graph takes uint8 pixels and normalizes them itself (false: normalized float32 input)"
    )
    input_layout: Literal["nhwc", "nchw"] = Field("nhwc", description="image layout of the graph input")
    keep_debug_info: bool = Field(
        False, description="keep the exporter's per-node FX/stack-trace annotations (local paths; larger files)"
    )

    provides = frozenset({"onnx"})
    example: ClassVar[dict[str, Any]] = {"kind": "export"}

    def apply(self, ctx: Context) -> dict[str, Any]:
        roles = ["student"] + (["teacher"] if self.teacher and ctx.teacher is not None else [])
        info = metadata.model_info(ctx.data, preprocess_in_graph=self.preprocess_in_graph, layout=self.input_layout)
        raw = ctx.data.raw("test", range(min(self.parity_batch, ctx.data.test_size)))
        x, feed = ctx.data.normalize(raw), torch.from_numpy(info.prepare(raw.numpy(), layout="nchw"))
        metrics: dict[str, Any] = {"input": info.describe()}
        for role in roles:
            model = ctx.models[role]
            path = ctx.run_dir / ("model.onnx" if role == "student" else "teacher.onnx")
            # Written under a temporary name; only a file that passed every check, with its metadata,
            # ever appears under its real name.
            tmp = path.with_name(f".{path.stem}.unchecked.onnx")
            try:
                try:
                    check = export_checked(
                        model, info, tmp, x, feed, opset=self.opset, atol=self.atol, rtol=self.rtol, what=role
                    )
                finally:
                    model.to(ctx.device)
                ctx.log.info(
                    "export %s: max|Δ| %.2e, argmax agreement %.4f",
                    role,
                    check["max_abs_diff"],
                    check["argmax_agreement"],
                )
                source = ctx.latest(role, "torch")
                props = metadata.provenance(
                    ctx.recipe,
                    role=role,
                    model=ctx.specs[role].model,
                    precision="fp32",
                    source=source.name if source else None,
                )
                metadata.update(tmp, info.to_metadata() | props, strip_node_debug=not self.keep_debug_info, dest=path)
            finally:
                tmp.unlink(missing_ok=True)
            metrics[role] = check
            ctx.add_artifact(
                Artifact(
                    name=path.name,
                    role=role,
                    format="onnx",
                    precision="fp32",
                    path=path,
                    stage=self.kind,
                    source=source.name if source else None,
                )
            )
        return metrics
