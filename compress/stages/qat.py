"""Quantization-aware training: fine-tune the student with INT8 fake quantization in the loop (KD from
the teacher when ``distill: true``), then export a QDQ ONNX model that ONNX Runtime runs in INT8.

torch 2.14 moved PT2E quantization to torchao: the student is captured with ``torch.export``,
``prepare_qat_pt2e`` with torchao's X86 quantizer inserts fake quantization (uint8 activations,
int8 per-channel symmetric weights: U8S8; Conv+BN folded in the loop; ``scheme: auto`` makes the
weights 7-bit, [-64, 64], where ONNX Runtime's full-range U8S8 kernels saturate on this CPU, so the
fake quantization trains exactly the ranges ORT will run), training learns weights that survive
the rounding, and ``convert_pt2e`` turns the observers into quantize/dequantize ops that the ONNX
exporter writes as QuantizeLinear / DequantizeLinear around int8 weights. The student's float
weights are left as they were; the stage adds ``model.qat.onnx`` (metadata and input as the FP32
export's), checked against the converted PyTorch graph on test images.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from compress import metadata
from compress.config import moved
from compress.context import Artifact, Context
from compress.deploy import ModelInfo
from compress.distill.kd import KD, SHORTHAND, OptionalKD, tune
from compress.errors import StageFailed, first_line
from compress.quantization.ptq import quantized_ops
from compress.quantization.schemes import Scheme, choose
from compress.stages.base import STAGES, Stage
from compress.stages.export import InGraphPreprocess, export_onnx, parity
from compress.training import OptimConfig


class _PerCall(torch.nn.Module):
    """A stateless module a forward calls ``n`` times (ResNet's one ``self.relu``), as ``n`` copies
    used in turn: torchao's quantizer matches patterns per module and cannot take one module at
    several places of the graph."""

    def __init__(self, module: torch.nn.Module, n: int) -> None:
        super().__init__()
        self.calls = torch.nn.ModuleList(copy.deepcopy(module) for _ in range(n))
        self.next = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self.calls[self.next]
        self.next = (self.next + 1) % len(self.calls)
        return module(*args, **kwargs)


def one_module_per_call(model: torch.nn.Module, example: torch.Tensor) -> None:
    """Give every parameter-free module that one forward calls several times a copy per call."""
    calls: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        for name, m in model.named_modules()
        if name and not list(m.parameters()) and not list(m.buffers()) and not list(m.children())
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    for name, n in calls.items():
        if n > 1:
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, attr, _PerCall(getattr(owner, attr), n))


def fake_quantized(
    model: torch.nn.Module, example: torch.Tensor, weight_range: tuple[int, int] = (-128, 127)
) -> torch.nn.Module:
    """``model`` captured by torch.export (dynamic batch) with torchao's QAT fake quantization
    inserted, weights fake-quantized to ``weight_range`` (int8 per channel, symmetric); .train()/.eval()
    work on the result. torchao's own ``reduce_range`` narrows the *activations* (FBGEMM's
    convention), which an ONNX QuantizeLinear cannot express; ORT's narrows the weights."""
    import dataclasses
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's import-time deprecation notice
    import torchao.quantization.pt2e as pt2e
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    one_module_per_call(model, example)
    batch = torch.export.Dim("batch", min=1, max=65536)
    graph = torch.export.export(model.train(), (example,), dynamic_shapes=({0: batch},)).module()

    class OnnxRuntimeQuantizer(X86InductorQuantizer):
        """X86InductorQuantizer without its conv/linear + add fusions: Inductor fuses an add into
        the convolution before it, ONNX Runtime does not — it needs the convolution's output
        quantized (DQ → Conv → Q becomes QLinearConv) or runs that convolution in float. Measured
        on ResNet-20: with the fusions, 9 of 21 convolutions stayed float and the file ran 1.4×
        slower than FP32."""

        def _annotate_qat_conv2d_bn_binary_unary(self, *args: Any, **kwargs: Any) -> None:
            pass

        def _annotate_qat_conv2d_bn_binary(self, *args: Any, **kwargs: Any) -> None:
            pass

        def _annotate_conv2d_binary_unary(self, *args: Any, **kwargs: Any) -> None:
            pass

        def _annotate_conv2d_binary(self, *args: Any, **kwargs: Any) -> None:
            pass

        def _annotate_linear_binary_unary(self, *args: Any, **kwargs: Any) -> None:
            pass

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            """Also quantize both inputs of every residual add, so ORT sees DQ, DQ → Add → Q and
            runs QLinearAdd (a float shortcut input leaves the add, and its dequantize, in float)."""
            model = super().annotate(model)
            act = get_default_x86_inductor_quantization_config(is_qat=True).input_activation
            adds = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
            for node in model.graph.nodes:
                if node.target not in adds or "quantization_annotation" in node.meta:
                    continue
                inputs = node.args[:2]
                if all(isinstance(i, torch.fx.Node) and i.meta.get("val") is not None for i in inputs) and (
                    inputs[0].meta["val"].shape == inputs[1].meta["val"].shape
                ):
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map=dict.fromkeys(inputs, act), _annotated=True
                    )
            return model

    config = get_default_x86_inductor_quantization_config(is_qat=True)
    weight = dataclasses.replace(config.weight, quant_min=weight_range[0], quant_max=weight_range[1])
    quantizer = OnnxRuntimeQuantizer().set_global(dataclasses.replace(config, weight=weight))
    prepared = prepare_qat_pt2e(graph, quantizer)
    pt2e.allow_exported_model_train_eval(prepared)
    return prepared


def converted(prepared: torch.nn.Module) -> torch.nn.Module:
    """Observers -> quantize/dequantize ops with int8 weights folded in (what the exporter writes)."""
    import torchao.quantization.pt2e as pt2e
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    pt2e.move_exported_model_to_eval(prepared)
    out = convert_pt2e(prepared)
    pt2e.allow_exported_model_train_eval(out)
    return out


class QATOptim(OptimConfig):
    """``optim:`` of QAT: a small learning rate on a trained student, in fp32 (fake quantization)."""

    lr: float = Field(0.001, gt=0, le=10)
    precision: Literal["fp32"] = Field("fp32", description="fake quantization trains in fp32")
    channels_last: bool = False


@STAGES.register("qat")
class QAT(Stage):
    """INT8 quantization-aware fine-tuning (torchao PT2E), exported as a QDQ ONNX model."""

    kind: Literal["qat"] = "qat"
    epochs: int = Field(1, ge=1, le=10_000, description="fake-quantized fine-tuning epochs")
    optim: QATOptim = Field(default_factory=QATOptim)
    kd: OptionalKD = Field(None, description="distill from the teacher's logits while fine-tuning; kd: true = defaults")
    opset: int = Field(18, ge=17, le=23)
    max_relative_error: float = Field(
        0.1, gt=0, le=10, description="max ‖ORT − PyTorch‖ / ‖PyTorch‖ of the (centred) test logits"
    )
    scheme: Literal["auto", "u8s8", "u8s8_reduce_range"] = Field(
        "auto", description="uint8 activations x int8 weights, full or 7-bit; auto = the fastest exact on this CPU"
    )

    needs = frozenset({"onnx"})
    provides = frozenset({"int8"})
    renamed: ClassVar[dict[str, str]] = (
        moved("optim", QATOptim)
        | moved("kd", KD, extra=SHORTHAND)
        | {"finetune_epochs": "renamed to epochs", "distill": "replaced by kd (kd: true = KD with defaults)"}
    )
    example: ClassVar[dict[str, Any]] = {"kind": "qat", "epochs": 1}

    @model_validator(mode="after")
    def _logit_losses(self) -> QAT:
        features = [t.name for t in self.kd.losses if not t.logits_only] if self.kd is not None else []
        if features:  # the captured graph has no module paths to hook
            raise ValueError(f"qat distills from logits only; {', '.join(features)} needs student features")
        return self

    def changes(self) -> tuple[str, ...]:
        return ()  # the student's float weights are not changed; the result is the ONNX file

    def apply(self, ctx: Context) -> dict[str, Any]:
        fp32 = ctx.latest("student", "onnx")
        assert fp32 is not None  # guaranteed by the recipe's stage-order check
        info = ModelInfo.from_metadata(metadata.read(fp32.path))
        student = copy.deepcopy(ctx.student).to("cpu")  # captured in train mode: BN folds in the loop
        example = ctx.data.normalize(ctx.data.raw("train", range(min(2, ctx.data.train_size)))).cpu()
        choice = choose(self.scheme)
        (ctx.log.info if choice.probe.exact else ctx.log.warning)("qat: scheme %s", choice.reason)
        scheme = choice.scheme
        try:
            prepared = fake_quantized(student, example, scheme.weight_range)
        except Exception as exc:  # noqa: BLE001 - torch.export / torchao raise many types
            raise StageFailed(f"qat: cannot insert fake quantization into the student: {first_line(exc)}") from exc
        prepared.to(ctx.device)
        field = f"stages.{ctx.stage_index - 1}"
        fit = tune(ctx, prepared, self.epochs, self.optim, self.kd, "qat fine-tune", field)
        model = converted(prepared.to("cpu"))
        out = fp32.path.with_name(f"{fp32.path.stem}.qat.onnx")
        tmp = out.with_name(f".{out.stem}.unchecked.onnx")
        raw = ctx.data.raw("test", range(min(256, ctx.data.test_size)))
        feed = torch.from_numpy(info.prepare(raw.numpy(), layout="nchw"))
        try:
            wrapped = InGraphPreprocess(model, info) if info.preprocess_in_graph or info.layout == "nhwc" else model
            try:
                export_onnx(wrapped, feed[:2], tmp, self.opset, info.input_name)
            except Exception as exc:  # noqa: BLE001
                raise StageFailed(f"qat: the fake-quantized student could not be exported: {first_line(exc)}") from exc
            # ORT's integer kernels round where the converted graph simulates in float: logits differ a
            # little everywhere (argmax flips on near-ties), a broken export differs a lot.
            check = parity(model, tmp, ctx.data.normalize(raw), feed)
            if check["relative_error"] > self.max_relative_error:
                raise StageFailed(
                    f"qat: ONNX Runtime's INT8 logits differ from the fake-quantized PyTorch model's by "
                    f"{check['relative_error']:.3f} (relative; max_relative_error {self.max_relative_error}), "
                    f"argmax agreement {check['argmax_agreement']:.1%}"
                )
            props = {"precision": "int8", "source": fp32.name, "quantization": self._describe(scheme)}
            props |= scheme.metadata()
            metadata.update(tmp, metadata.read(fp32.path) | props, strip_node_debug=True, dest=out)
        finally:
            tmp.unlink(missing_ok=True)
        ctx.add_artifact(Artifact(out.name, "student", "onnx", "int8", out, self.kind, source=fp32.source))
        ops = quantized_ops(out)
        return fit | {
            **choice.metrics(),
            "argmax_agreement": check["argmax_agreement"],
            "relative_error": check["relative_error"],
            "max_abs_diff": check["max_abs_diff"],
            "fp32_bytes": fp32.path.stat().st_size,
            "int8_bytes": out.stat().st_size,
            "ops": ops,
        }

    def _describe(self, scheme: Scheme) -> str:
        kd = " + KD" if self.kd is not None else ""
        return (
            f"QAT{kd}, {self.epochs} epochs (torchao PT2E, X86 quantizer, {scheme.name}: uint8 "
            f"activations, int8{' 7-bit' * scheme.reduce_range} per-channel weights), QDQ"
        )
