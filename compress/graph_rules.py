"""onnxscript rewrite rules the export runs on every graph: forms ONNX Runtime runs faster.

``SpatialMean`` turns a ReduceMean over H and W of an (N, C, H, W) tensor (what the dynamo exporter
makes of ``nn.AdaptiveAvgPool2d(1)`` and ``x.mean((2, 3))``) into GlobalAveragePool, plus Flatten
when the mean dropped the axes. ORT's quantizer and QDQ fusions know GlobalAveragePool, so INT8
files pool in uint8 (QLinearGlobalAveragePool, channels-last) instead of running
Transpose → DequantizeLinear → ReduceMean → QuantizeLinear (tests/test_graph_rules.py: no float op
is left between Q/DQ pairs in the INT8 ResNet-20 and digits CNN); FP32 pools in its NCHWc layout.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern, rewrite


def _spatial(x: ir.Value, axes: list[int] | None, keepdims: ir.Attr) -> pattern.MatchResult:
    check = pattern.MatchResult()
    if x.shape is None or x.shape.rank() != 4:
        return check.fail("input is not 4-D")
    if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
        return check.fail("not a mean over H and W")
    if keepdims.is_ref() or keepdims.as_int() not in (0, 1):
        return check.fail("keepdims is not a constant 0/1")
    return check


def _pool(op, x: ir.Value, keepdims: ir.Attr) -> ir.Value:
    pooled = op.GlobalAveragePool(x)
    return pooled if keepdims.as_int() else op.Flatten(pooled, axis=1)


class SpatialMean(pattern.RewriteRuleClassBase):
    """ReduceMean(x, axes=[2, 3] as an input (opset ≥ 18)) → GlobalAveragePool(x)."""

    def pattern(self, op, x, axes, keepdims):
        return op.ReduceMean(x, axes, keepdims=keepdims, _allow_other_attributes=True)

    def check(self, context, x: ir.Value, axes: ir.Value, keepdims: ir.Attr) -> pattern.MatchResult:
        const = axes.const_value
        return _spatial(x, None if const is None else [int(a) for a in const.numpy().ravel()], keepdims)

    def rewrite(self, op, x: ir.Value, axes: ir.Value, keepdims: ir.Attr) -> ir.Value:
        return _pool(op, x, keepdims)


class SpatialMeanAttr(pattern.RewriteRuleClassBase):
    """ReduceMean(x) with axes=[2, 3] as an attribute (opset 17) → GlobalAveragePool(x)."""

    def pattern(self, op, x, axes, keepdims):
        return op.ReduceMean(x, axes=axes, keepdims=keepdims, _allow_other_attributes=True)

    def check(self, context, x: ir.Value, axes: ir.Attr, keepdims: ir.Attr) -> pattern.MatchResult:
        return _spatial(x, None if axes.is_ref() else list(axes.as_ints()), keepdims)

    def rewrite(self, op, x: ir.Value, axes: ir.Attr, keepdims: ir.Attr) -> ir.Value:
        return _pool(op, x, keepdims)


RULES = [SpatialMean.rule(), SpatialMeanAttr.rule()]


def apply(model: ir.Model) -> ir.Model:
    """``model`` with every rule applied (in place, where onnxscript can)."""
    return rewrite(model, pattern_rewrite_rules=RULES)
