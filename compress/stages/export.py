"""Export to ONNX (torch.onnx dynamo exporter + onnxscript) with a dynamic batch axis, then prove it.

After writing, the file passes ``onnx.checker`` (full check) and ONNX Runtime must reproduce
PyTorch's logits on a real test batch within ``atol``; otherwise the stage fails rather than leave
a broken model in the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from pydantic import Field
from torch import nn

from compress.context import Artifact, Context
from compress.errors import StageFailed
from compress.onnx_utils import quiet_stdout, run, session
from compress.stages.base import STAGES, Stage


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    model = model.eval().to("cpu")
    batch = torch.export.Dim("batch", min=1, max=65536)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_stdout():
        program = torch.onnx.export(
            model,
            (example.cpu(),),
            dynamo=True,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)


def parity(model: nn.Module, path: Path, x: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        ref = model.eval().to("cpu")(x.cpu()).numpy()
    got = run(session(path), x.cpu().numpy())
    return {
        "max_abs_diff": float(np.abs(ref - got).max()),
        "max_abs_logit": float(np.abs(ref).max()),
        "argmax_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
        "batch": int(x.shape[0]),
    }


@STAGES.register("export")
class Export(Stage):
    """ONNX export with a dynamic batch axis, checked by onnx.checker and ORT parity."""

    kind: Literal["export"] = "export"
    opset: int = Field(18, ge=17, le=23)
    teacher: bool = Field(True, description="also export the teacher (for a like-for-like ONNX comparison)")
    atol: float = Field(1e-4, gt=0, le=1, description="max |Δlogit| allowed between ORT and PyTorch")
    rtol: float = Field(1e-5, ge=0, le=1, description="plus this fraction of the largest |logit|")
    parity_batch: int = Field(64, ge=1, le=4096, description="test images used for the parity check")

    provides = frozenset({"onnx"})

    def apply(self, ctx: Context) -> dict[str, Any]:
        roles = ["student"] + (["teacher"] if self.teacher and ctx.teacher is not None else [])
        x = ctx.data.example_input(min(self.parity_batch, len(ctx.data.test_x))).cpu()
        metrics: dict[str, Any] = {}
        for role in roles:
            model = ctx.models[role]
            path = ctx.run_dir / ("model.onnx" if role == "student" else "teacher.onnx")
            try:
                export_onnx(model, x[:2] if len(x) > 1 else x, path, self.opset)
            except Exception as exc:  # noqa: BLE001 - exporter errors are long; keep the first line
                path.unlink(missing_ok=True)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise StageFailed(f"export: {role} ({type(model).__name__}) could not be exported: {first}") from exc
            check = parity(model, path, x)
            metrics[role] = check
            ctx.log.info(
                "export %s -> %s: max|Δ| %.2e, argmax agreement %.4f",
                role,
                path.name,
                check["max_abs_diff"],
                check["argmax_agreement"],
            )
            # fp32 rounding grows with the logits' scale (a random-init ResNet-56 emits |z| ~ 2000, where
            # torch's own fp32 result is 1e-3 away from fp64), so the bound is atol + rtol * max|z|.
            bound = self.atol + self.rtol * check["max_abs_logit"]
            if not check["max_abs_diff"] <= bound:
                raise StageFailed(
                    f"export: ONNX Runtime disagrees with PyTorch for the {role}: max |Δlogit| "
                    f"{check['max_abs_diff']:.3g} > {bound:.3g} (atol {self.atol:g} + rtol "
                    f"{self.rtol:g} × max|logit| {check['max_abs_logit']:.3g})"
                )
            source = ctx.latest(role, "torch")
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
            model.to(ctx.device)
        return metrics
