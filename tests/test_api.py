"""The Python API on real models and real data (sklearn digits): ``compress.run`` with the caller's
own modules and Datasets, and the building blocks ``compress.prune`` / ``compress.distill``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compress
from compress.errors import CompressError

CLASSES = [str(i) for i in range(10)]


class Net(nn.Module):
    """A user's own class (not registered anywhere): conv-BN-ReLU ×2, pooled, linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    """sklearn's 1,797 real 8×8 digits as float [0, 1] tensors (ToTensor's range), 1,400 / 397."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.from_numpy(ds.images).float().div(16).unsqueeze(1)
    y = torch.from_numpy(ds.target).long()
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


def _accuracy(model: nn.Module, ds: TensorDataset) -> float:
    x, y = ds.tensors
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


RECIPE = {
    "name": "api",
    "device": "cpu",
    "data": {"batch_size": 64},  # no name: options for the Datasets passed as data=
    "stages": [
        {"kind": "train", "target": "teacher", "epochs": 1, "optim": {"lr": 0.05, "precision": "fp32"}},
        {"kind": "distill", "epochs": 1, "optim": {"lr": 0.05, "precision": "fp32"}},
        {"kind": "prune", "ratio": 0.3},
        {"kind": "export"},
        {"kind": "quantize", "calibration_batches": 2},
    ],
    "benchmark": {"batch_sizes": [1], "iters": 2, "warmup": 0, "devices": ["cpu"], "torch_snapshots": False},
}


def test_run_on_python_modules_and_datasets(digits, tmp_path):
    torch.manual_seed(0)
    student, teacher = Net(8), Net(32)
    before = copy.deepcopy(student.state_dict())
    train, test = digits
    small = (torch.utils.data.Subset(train, range(600)), torch.utils.data.Subset(test, range(200)))
    result = compress.run(
        RECIPE, student=student, teacher=teacher, data=(*small, CLASSES), out=tmp_path / "run", quiet=True
    )
    assert isinstance(result, compress.RunResult) and result.run_dir == tmp_path / "run"
    report = json.loads((result.run_dir / "report.json").read_text())
    assert result.report == report
    int8 = result.best(format="onnx", precision="int8")
    assert int8.name == "model.int8.onnx" and int8.path.is_file() and int8.path.suffix == ".onnx"
    row = next(r for r in report["artifacts"] if r["name"] == int8.name)
    assert int8.metrics == row and 0 <= int8.accuracy <= 1 and row["size_bytes"] == int8.path.stat().st_size
    assert {a.name for a in result.artifacts} == {r["name"] for r in report["artifacts"]}
    assert result.artifact("model.onnx").precision == "fp32"
    with pytest.raises(KeyError, match="no artifact 'nope'"):
        result.artifact("nope")
    # the data went through the pipeline: 600 / 200 images, channels and classes as given
    assert report["data"]["train_images"] == 600 and report["data"]["test_images"] == 200
    assert report["data"]["input_shape"] == [1, 8, 8] and report["data"]["num_classes"] == 10
    assert report["recipe"]["student"]["model"].startswith("compress.api:python_Net_")
    # pruning shrank the run's copy; the caller's module is untouched
    pruned = report["stages"][2]["metrics"]
    assert pruned["params_after"] < pruned["params_before"]
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert student.features[0].out_channels == 8
    # a fresh process (the memory measurement) cannot rebuild a module passed from Python: one clear line
    notes = [n for n in report["notes"] if "student.pt: peak memory not measured" in n]
    assert notes and "was a Python object passed to compress.run, which a fresh process cannot" in notes[0]
    assert "\n" not in notes[0]
    # compress bench on the run: its data came from Python (one line, exit 2); named, the ONNX files
    # measure and each checkpoint of the Python module is a note, not a traceback
    from compress.cli import main

    bench = ["bench", str(result.run_dir), "--batch-sizes", "1", "--iters", "2", "--warmup", "0", "--quiet"]
    assert main([*bench, "--out", str(tmp_path / "b1")]) == 2
    assert main([*bench, "--data", "digits", "--out", str(tmp_path / "b2")]) == 0
    benched = json.loads((tmp_path / "b2" / "report.json").read_text())
    assert {r["name"] for r in benched["artifacts"]} == {"teacher.onnx", "model.onnx", "model.int8.onnx"}
    assert any("student.pt is a checkpoint of a model passed to compress.run" in n for n in benched["notes"])


def test_run_refuses_bad_arguments_in_one_line(digits, tmp_path):
    no_student = {k: v for k, v in RECIPE.items() if k != "stages"} | {"stages": [{"kind": "export"}]}
    cases = [
        (dict(student="not a module"), "student: expected an nn.Module, got str"),
        (dict(), "student: Field required"),
        (dict(student=Net(), data=(digits[0],)), "data: compress.run got a 1-tuple; expected (train, test)"),
        (dict(student=Net(), data=digits), "no class names"),
        (dict(student=Net(classes=3), data=(*digits, CLASSES)), "returns (2, 3), expected logits (2, 10)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CompressError) as err:
            compress.run(no_student, out=tmp_path / "run", quiet=True, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert not (tmp_path / "run").exists()


def test_prune_shrinks_a_module_and_keeps_its_output_shape():
    torch.manual_seed(0)
    model = Net(16)
    x = torch.rand(4, 1, 8, 8)
    params = sum(p.numel() for p in model.parameters())
    out = compress.prune(model, x, ratio=0.5, round_to=4)
    assert out is model
    assert model.features[0].out_channels == 8 and model.features[3].out_channels == 16
    assert model.features[1].running_mean.shape == (8,)  # the coupled BatchNorm shrank with its conv
    assert sum(p.numel() for p in model.parameters()) < params / 2
    assert model(x).shape == (4, 10) and model.head.out_features == 10  # the classifier is never pruned
    # a layer named to ignore (as a module or a pattern) keeps its width
    kept = Net(16)
    compress.prune(kept, x, ratio=0.5, ignore=[kept.features[3]])
    assert kept.features[3].out_channels == 32 and kept.features[0].out_channels == 8
    budget = Net(16)
    compress.prune(budget, x, target_params=0.5)
    assert sum(p.numel() for p in budget.parameters()) <= params * 0.5
    with pytest.raises(CompressError, match="ratio must be between 0 and 1"):
        compress.prune(Net(), x, ratio=1.5)
    with pytest.raises(CompressError, match="pattern 'nope' matches no module"):
        compress.prune(Net(), x, ignore=["nope"])
    with pytest.raises(CompressError, match="example_inputs must be a tensor"):
        compress.prune(Net(), [x])


def test_distill_teaches_an_untrained_student(digits):
    train, test = digits
    torch.manual_seed(0)
    teacher = Net(16)
    opt = torch.optim.Adam(teacher.parameters(), lr=0.01)
    for _ in range(3):  # a real teacher: a few seconds of plain training
        for xb, yb in DataLoader(train, batch_size=64, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(teacher.train()(xb), yb).backward()
            opt.step()
    assert _accuracy(teacher, test) > 0.75
    student = Net(8)
    untrained = _accuracy(student, test)
    loader = DataLoader(train, batch_size=32, shuffle=True)
    out, history = compress.distill(
        student, teacher, loader, epochs=2, lr=0.3, eval_loader=DataLoader(test, batch_size=200), quiet=True
    )
    assert out is student and [row["epoch"] for row in history] == [1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # the KD objective went down
    assert history[-1]["test_acc"] == pytest.approx(_accuracy(student, test))
    assert _accuracy(student, test) > untrained + 0.3, (untrained, history)
    # trained under bf16 autocast (native or emulated), each epoch still reports the fp32 model's top-1
    bf16, rows = compress.distill(Net(8), teacher, loader, lr=0.3, eval_loader=DataLoader(test, batch_size=200),
                                  optim={"precision": "bf16"}, quiet=True)  # fmt: skip
    assert rows[-1]["test_acc"] == pytest.approx(_accuracy(bf16, test))
    with pytest.raises(CompressError, match="an iterator is used up after one epoch"):
        compress.distill(Net(8), teacher, iter(loader))
    with pytest.raises(CompressError, match="unknown distillation loss .hintn.; did you mean hinton"):
        compress.distill(Net(8), teacher, loader, loss="hintn")
