"""compress.onnx_api on a user's own module and ONNX files: export_onnx, quantize_onnx (calibration data
given three ways), measure (a path and a module). Real models, real ONNX files, real ORT sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compress import onnx_api
from compress.data import DATASETS, DataBundle
from compress.deploy import ModelInfo
from compress.errors import CompressError
from compress.onnx_utils import run, session


class SmallCNN(nn.Module):
    """A user's own classifier, nothing of compress in it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.fc = nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def trained_digits_cnn(data: DataBundle, epochs: int = 15) -> nn.Module:
    """A few seconds of Adam on sklearn digits: a real classifier (~95% top-1)."""
    from compress.bench.measure import torch_threads

    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    with torch_threads(1):  # tiny batches: one thread is fastest, and robust on a busy machine
        for epoch in range(epochs):
            for x, y in data.train_loader(seed=epoch):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    return model.eval()


def plain_export(model: nn.Module, data: DataBundle, path: Path) -> Path:
    """What anyone's ``torch.onnx.export`` writes: float NCHW input, logits out, no metadata of ours."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model, (data.example_input(2),), str(path), input_names=["x"], output_names=["y"],
        dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return DATASETS.get("digits")().load()


@pytest.fixture(scope="module")
def cnn(digits) -> nn.Module:
    return trained_digits_cnn(digits)


@pytest.fixture(scope="module")
def plain(cnn, digits, tmp_path_factory) -> Path:
    return plain_export(cnn, digits, tmp_path_factory.mktemp("plain") / "cnn.onnx")


def test_export_onnx_on_a_module_checks_parity_and_writes_a_working_file(cnn, tmp_path):
    x = torch.randn(3, 1, 8, 8)
    result = onnx_api.export_onnx(cnn, tmp_path / "cnn.onnx", x)
    assert result.path == tmp_path / "cnn.onnx" and list(tmp_path.iterdir()) == [result.path]  # no temp left
    onnx.checker.check_model(str(result.path), full_check=True)
    assert result.parity["batch"] == 3 and result.parity["max_abs_diff"] < 1e-4
    with torch.inference_mode():
        ref = cnn(x).numpy()
    got = run(session(result.path), x.numpy())  # ORT on the file: PyTorch's logits
    assert np.abs(got - ref).max() < 1e-4
    assert run(session(result.path), torch.randn(7, 1, 8, 8).numpy()).shape == (7, 10)  # dynamic batch


def test_export_onnx_with_data_is_self_describing(cnn, digits, tmp_path):
    result = onnx_api.export_onnx(cnn, tmp_path / "cnn.onnx", data=digits, properties={"model": "SmallCNN"})
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    info = ModelInfo.from_metadata(props)
    assert info.input_dtype == "uint8" and info.preprocess_in_graph and info.class_names == tuple(digits.class_names)
    assert props["model"] == "SmallCNN" and props["precision"] == "fp32"
    pixels = digits.test_x[:16]
    with torch.inference_mode():
        ref = cnn(digits.normalize(pixels)).numpy()
    got = run(session(result.path), info.prepare(pixels.numpy(), layout="nchw"))  # raw uint8 in
    assert np.abs(got - ref).max() < 1e-4 and result.parity["batch"] == 64


def test_export_onnx_refuses_a_missing_example_and_a_broken_model(cnn, tmp_path):
    with pytest.raises(CompressError, match="example_inputs"):
        onnx_api.export_onnx(cnn, tmp_path / "a.onnx")

    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("this model cannot be traced")

    from compress.errors import StageFailed

    with pytest.raises(StageFailed, match=r"model \(Broken\) could not be exported: Failed to export"):
        onnx_api.export_onnx(Broken(), tmp_path / "b.onnx", torch.randn(2, 1, 8, 8))
    assert list(tmp_path.iterdir()) == []


def _top1(path: Path, data: DataBundle) -> float:
    return onnx_api.measure(path, data, iters=2, warmup=0)["top1"]


def test_quantize_onnx_takes_calibration_data_three_ways(plain, digits, tmp_path):
    fp32_top1 = _top1(plain, digits)
    assert fp32_top1 > 0.85
    normalized = digits.normalize(digits.train_x[:256])
    ways = {
        "arrays": [normalized[i : i + 32].numpy() for i in range(0, 256, 32)],
        "loader": DataLoader(TensorDataset(normalized, digits.train_y[:256]), batch_size=32),
        "bundle": digits,
    }
    ranges = {}
    for how, calibration in ways.items():
        result = onnx_api.quantize_onnx(plain, calibration, out=tmp_path / f"{how}.onnx", batches=8)
        assert result.path.is_file() and result.path.stat().st_size < plain.stat().st_size
        assert result.scheme in ("u8s8", "u8s8_reduce_range") and result.reason.startswith("auto:")
        assert result.calibration_images == 256
        model = onnx.load(str(result.path))
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        # the source's contract: float input of the same name, logits out
        assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["y"]
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        props = {p.key: p.value for p in model.metadata_props}
        assert props["precision"] == "int8" and props["source"] == "cnn.onnx" and props["int8_scheme"] == result.scheme
        assert abs(_top1(result.path, digits) - fp32_top1) < 0.03
        ranges[how] = {
            t.name: onnx.numpy_helper.to_array(t).tolist() for t in model.graph.initializer if "scale" in t.name
        }
    # arrays and the DataLoader are the same 256 images: the same activation ranges
    assert ranges["arrays"] == ranges["loader"]


def test_quantize_onnx_one_line_errors(plain, digits, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(CompressError, match="not a readable ONNX file"):
        onnx_api.quantize_onnx(tmp_path / "junk.onnx", digits)
    with pytest.raises(CompressError, match="no such file"):
        onnx_api.quantize_onnx(tmp_path / "missing.onnx", digits)
    with pytest.raises(CompressError, match=r"batch 0 has shape \[4, 3, 8, 8\]"):
        onnx_api.quantize_onnx(plain, [np.zeros((4, 3, 8, 8), np.float32)], out=tmp_path / "q.onnx")
    with pytest.raises(CompressError, match="batch 0 is uint8"):
        onnx_api.quantize_onnx(plain, [digits.train_x[:4].numpy()], out=tmp_path / "q.onnx")
    with pytest.raises(CompressError, match="scheme"):
        onnx_api.quantize_onnx(plain, digits, out=tmp_path / "q.onnx", scheme="s4s4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx"]  # nothing half-written


def test_measure_an_onnx_path_and_a_module(plain, cnn, digits):
    on_file = onnx_api.measure(plain, digits, batch_sizes=(1, 4), iters=3, warmup=1)
    on_module = onnx_api.measure(cnn, digits, batch_sizes=(1, 4), iters=3, warmup=1)
    assert on_file["top1"] == pytest.approx(on_module["top1"], abs=1 / len(digits.test_y))  # the same network
    assert on_file["top1"] > 0.85 and on_file["size_bytes"] == plain.stat().st_size
    # a module's size: its saved state_dict; its MACs counted by torch, the file's by ONNX shapes
    assert on_module["size_bytes"] > 4 * on_module["params"] > 0
    assert on_file["macs"] == pytest.approx(on_module["macs"], rel=0.05)
    for numbers in (on_file, on_module):
        assert sorted(numbers["latency"]) == [1, 4]
        for lat in numbers["latency"].values():
            assert 0 < lat["p50_ms"] <= lat["p90_ms"]
    with_memory = onnx_api.measure(plain, digits, iters=1, warmup=0, memory=True)
    assert with_memory["peak_rss_bytes"] > 100_000
