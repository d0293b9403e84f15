"""``data: {name: "pkg.module:function"}``: a user's own Datasets of (image, label), from a module
beside the recipe, decoded into the pipeline's DataBundle; every bad return is one line, exit 2."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import TensorDataset

from compress.cli import main
from compress.data.base import channel_stats
from compress.data.user import UserDataset, to_bundle
from compress.errors import CompressError
from compress.recipe import validate_recipe


def tiny_digits(n: int = 120) -> tuple[TensorDataset, TensorDataset, list[str]]:
    """A small real dataset function (sklearn digits as uint8 tensors): also what test_data's
    every-dataset test can name as ``tests.test_user_data:tiny_digits``."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.from_numpy(ds.images * 16).clamp(0, 255).to(torch.uint8)[:, None]
    y = torch.from_numpy(ds.target).long()
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n : n + n // 2], y[n : n + n // 2]), [str(i) for i in range(10)]


DATA_MODULE = '''
import torch
from PIL import Image
from torch.utils.data import Dataset


class Shapes(Dataset):
    """Bright squares (class 0) or crosses (class 1) at varying sizes, as PIL images."""

    classes = ["square", "cross"]

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.items = [(int(torch.randint(12, 20, (1,), generator=g)), i % 2) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        size, label = self.items[i]
        img = torch.zeros(size, size, dtype=torch.uint8)
        if label == 0:
            img[size // 4 : -size // 4, size // 4 : -size // 4] = 255
        else:
            img[size // 2 - 1 : size // 2 + 1, :] = 255
            img[:, size // 2 - 1 : size // 2 + 1] = 255
        return Image.fromarray(img.numpy()).convert("RGB"), label


def load(n=64):
    return Shapes(n, 0), Shapes(n // 2, 1)  # class names from .classes


def _truncated_png():
    import io

    buf = io.BytesIO()
    Image.fromarray((torch.rand(8, 8, 3) * 255).byte().numpy()).save(buf, "PNG")
    return Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))  # the header reads; decoding fails


class Bad(Dataset):
    def __init__(self, sample):
        self.sample = sample

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if self.sample == "raise" and i == 2:
            raise IndexError("disk on fire")
        x = torch.rand(3, 8, 8)
        samples = {
            "tensor": (x, 0), "three": (x, 0, 1), "label": (x, 7), "float": (x * 4, 0), "flabel": (x, 0.5),
            "sizes": (torch.rand(3, 8 + i, 8), 0), "raise": (x, 0), "string": ("img.png", 0),
            "nan": (x * float("nan"), 0), "truncated": (_truncated_png(), 0),
        }
        return samples[self.sample]


def bad(kind):
    if kind == "int":
        return 42
    if kind == "one":
        return (Bad("tensor"),)
    if kind == "nonames":
        return Bad("tensor"), Bad("tensor")
    if kind == "dict":
        return {"train": Bad("tensor")}
    if kind == "raises":
        raise RuntimeError("no data today")
    return Bad(kind), Bad("tensor"), ["a", "b"]


NOT_A_FUNCTION = 3
'''

MODEL_MODULE = """
from torch import nn


def tiny(num_classes, in_channels=3, width=8):
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A recipe folder with its own data and model modules (unique names: sys.modules is shared),
    run from another working directory."""
    token = uuid.uuid4().hex[:8]
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / f"mydata_{token}.py").write_text(DATA_MODULE)
    (folder / f"mymodels_{token}.py").write_text(textwrap.dedent(MODEL_MODULE))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def recipe(data: dict, stages: list | None = None) -> Path:
        raw = {
            "name": "user-data",
            "device": "cpu",
            "data": {"name": f"mydata_{token}:load", "image_size": 16, "batch_size": 16} | data,
            "student": {"model": f"mymodels_{token}:tiny"},
            "stages": stages or [{"kind": "train", "epochs": 1, "optim": {"lr": 0.05, "precision": "fp32"}}],
            "benchmark": {"batch_sizes": [1], "iters": 2, "warmup": 0, "devices": ["cpu"], "torch_snapshots": False},
        }
        path = folder / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    recipe.token = token
    return recipe


def test_user_dataset_and_model_beside_the_recipe_run_from_another_cwd(project, tmp_path, capsys):
    recipe = project(
        {}, [{"kind": "train", "epochs": 1, "optim": {"lr": 0.05, "precision": "fp32"}}, {"kind": "export"}]
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    report = yaml.safe_load((out / "report.json").read_text())
    assert report["data"]["name"] == f"mydata_{project.token}:load"
    assert report["data"]["train_images"] == 64 and report["data"]["test_images"] == 32
    assert report["data"]["input_shape"] == [3, 16, 16] and report["data"]["num_classes"] == 2  # resized, RGB
    assert (out / "model.onnx").is_file()
    # the memory measurement's fresh process finds the user's model module beside the recipe too
    assert not [n for n in report["notes"] if "peak memory not measured" in n], report["notes"]
    assert all(a["peak_rss_bytes"] for a in report["artifacts"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "int"}, "returned a int; expected (train, test)"),
        ({"kind": "one"}, "returned a 1-tuple"),
        ({"kind": "nonames"}, "no class names"),
        ({"kind": "dict"}, "a dict without 'test'"),
        ({"kind": "raises"}, "raised RuntimeError: no data today"),
        ({"kind": "three"}, "data: train[0] is a 3-tuple; expected (image, label)"),
        ({"kind": "label"}, "data: train[0]: label 7 is out of range for 2 class names"),
        ({"kind": "flabel"}, "the label is 0.5 (float); expected a class index"),
        ({"kind": "float"}, "float image values span"),
        ({"kind": "raise"}, "data: train[2]: the dataset raised IndexError: disk on fire"),
        ({"kind": "string"}, "the image is a str; expected a PIL image or a torch tensor"),
        ({"kind": "nan"}, "data: train[0]: the float image holds NaN or infinite values"),
        ({"kind": "truncated"}, "data: train[0]: the image cannot be decoded (OSError"),
        ({"kind": "nope"}, "KeyError"),
        ({"wrong": 1}, "got an unexpected keyword argument 'wrong'"),
    ],
)
def test_bad_returns_are_one_line_exit_2_and_no_run_dir(project, tmp_path, capsys, kwargs, message):
    recipe = project({"name": f"mydata_{project.token}:bad", "kwargs": kwargs, "image_size": None})
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_sizes_must_match_without_image_size_and_memory_is_bounded(project, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    recipe = project({"image_size": None})
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "images differ in sizes" in err and "set data.image_size" in err and len(err.splitlines()) == 1
    monkeypatch.setenv("COMPRESS_DATA_MAX_GB", "0.00001")  # ~10 KB: 96 images of 3x16x16 are 74 KB
    assert main(["run", str(project({"stream": False})), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "64 + 32 images of 3x16x16 would take" in err and "set stream: true" in err and len(err.splitlines()) == 1
    assert not out.exists()
    recipe = project({"name": f"mydata_{project.token}:NOT_A_FUNCTION"})
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    assert "is a int, not a function" in capsys.readouterr().err


def test_recipe_routes_any_name_with_a_colon_to_the_user_dataset(tiny):
    tiny["data"] = {"name": "mypkg.data:load", "kwargs": {"n": 3}, "image_size": [12, 16]}
    data = validate_recipe(tiny).data
    assert isinstance(data, UserDataset) and data.kwargs == {"n": 3} and data.image_size == (12, 16)
    for block, message in [
        ({"name": "cifar1"}, "data: unknown name 'cifar1' (did you mean 'cifar10'?)"),
        ({"name": "mypkg.data:load", "mean": [0.5]}, "data: give both mean and std, or neither"),
        ({"name": "mypkg.data:load", "nope": 1}, "data.nope: unknown field"),
        ({"name": "mypkg.data:load", "mean": ["x"], "std": [1]}, "data.mean.0: Input should be a valid number"),
        ({"name": "my pkg:load"}, "data.name: 'my pkg:load' must look like 'package.module:function'"),
        ({}, "data: give the dataset's name: cifar10, digits"),
    ]:
        tiny["data"] = block
        with pytest.raises(CompressError) as err:
            validate_recipe(tiny)
        assert message in str(err.value), str(err.value)


def test_to_bundle_decodes_tensors_and_pil_images():
    train, test, names = tiny_digits(40)
    bundle = to_bundle(train, test, names, batch_size=8)
    assert bundle.train_x.dtype == torch.uint8 and bundle.train_x.shape == (40, 1, 8, 8)
    assert torch.equal(bundle.train_x, train.tensors[0]) and torch.equal(bundle.test_y, test.tensors[1])
    assert bundle.mean == pytest.approx(channel_stats(bundle.train_x)[0], abs=1e-6)
    assert bundle.std == pytest.approx(channel_stats(bundle.train_x)[1], rel=0.02)
    floats = TensorDataset(train.tensors[0].float() / 255, train.tensors[1])  # ToTensor's range
    assert torch.equal(to_bundle(floats, floats, names).train_x, train.tensors[0])
    pil = [(Image.new("L", (10, 6), color=200), 1), (Image.new("L", (6, 10), color=50), 0)]
    resized = to_bundle(pil, pil, ["a", "b"], image_size=(4, 5), mean=(0.5,), std=(0.25,))
    assert resized.train_x.shape == (2, 1, 4, 5) and int(resized.train_x[0].min()) == 200
    assert resized.mean == (0.5,) and resized.std == (0.25,)
    with pytest.raises(CompressError, match="data.mean: 3 values for 1-channel images"):
        to_bundle(pil, pil, ["a", "b"], image_size=4, mean=(0.5,) * 3, std=(0.2,) * 3)
