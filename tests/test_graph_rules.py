"""The export's rewrite rules on real exports: the graph changes where it should, nowhere else, and
ONNX Runtime computes what PyTorch does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress.data import DataBundle
from compress.models import build_model
from compress.onnx_utils import run, session
from compress.quantization.calibration import BatchReader
from compress.stages.export import export_onnx


class Means(nn.Module):
    """Every mean the rule must handle or leave alone."""

    def __init__(self, keepdim: bool, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.conv, self.keepdim, self.dims = nn.Conv2d(3, 8, 3, padding=1), keepdim, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu().mean(self.dims, keepdim=self.keepdim).flatten(1)


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize(
    ("dims", "keepdim", "pooled"),
    [((2, 3), True, True), ((2, 3), False, True), ((-1, -2), False, True), ((1,), True, False), ((1, 2), True, False)],
)
def test_spatial_mean_becomes_global_average_pool(tmp_path, opset, dims, keepdim, pooled):
    model = Means(keepdim, dims).eval()
    x = torch.randn(4, 3, 8, 8)
    path = tmp_path / "m.onnx"
    export_onnx(model, x[:2], path, opset)
    ops = _ops(path)
    assert ("GlobalAveragePool" in ops) is pooled and ("ReduceMean" in ops) is not pooled, ops
    with torch.inference_mode():
        np.testing.assert_allclose(run(session(path), x.numpy()), model(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "digits_student"])
def test_registered_models_pool_with_global_average_pool_and_int8_pools_in_uint8(name, tmp_path):
    """The INT8 file ORT runs pools with QLinearGlobalAveragePool: no float op between Q/DQ pairs
    (before the rule: Transpose → DequantizeLinear → ReduceMean → QuantizeLinear)."""
    from compress.quantization import ptq
    from compress.quantization.mixed import float_islands

    channels = 1 if name.startswith("digits") else 3
    model = build_model(name, 10, channels).eval()
    pixels = torch.randint(0, 256, (16, channels, 16, 16), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    data = DataBundle(
        pixels, labels, pixels, labels, [str(i) for i in range(10)], (0.5,) * channels, (0.25,) * channels
    )
    path = tmp_path / "m.onnx"
    export_onnx(model, data.normalize(pixels[:2]), path, 18)
    assert "GlobalAveragePool" in _ops(path) and "ReduceMean" not in _ops(path)
    reader = BatchReader(data, "input", 4, 4)  # the calibration data: these 16 images, 4 at a time

    ptq.preprocess(path, tmp_path / "pre.onnx")
    ptq.static(tmp_path / "pre.onnx", tmp_path / "q.onnx", reader, chunk=4)
    optimized = tmp_path / "q.optimized.onnx"
    session(tmp_path / "q.onnx", optimized_to=optimized)
    assert "QLinearGlobalAveragePool" in _ops(optimized)
    assert not float_islands(tmp_path / "q.onnx", tmp_path)
