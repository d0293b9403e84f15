"""Depth pruning: which blocks can go (found from the code, checked against each architecture's own
attributes), what removing them does, how they are ranked, and the prune_depth stage in a real run:
ONNX parity, fewer Conv nodes, exact reload, --resume after the stage, compress bench, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
import torchvision
import yaml
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

from compress.checkpoint import load_model, open_checkpoint
from compress.cli import main
from compress.data import DATASETS
from compress.deploy import Predictor
from compress.errors import CompressError
from compress.models import build_model
from compress.models.cifar_resnet import BasicBlock as CifarBlock
from compress.pipeline import run
from compress.pruning.depth import block_importance, bypassed, remove_blocks, residual_blocks
from compress.recipe import validate_recipe
from tests.conftest import TINY
from tests.test_cli import check_fails_cleanly
from tests.test_resume import _stable, kill_during


# --------------------------------------------------------------------------- which blocks
def _identity_shortcut(label: str) -> tuple[nn.Module, torch.Tensor, list[str]]:
    """(model, example, the blocks its own attributes call identity-shortcut residuals)."""
    torch.manual_seed(0)
    small, big = torch.randn(2, 3, 16, 16), torch.randn(1, 3, 32, 32)
    model, test, x = {
        "resnet20": (
            lambda: build_model("resnet20", 10, 3),
            lambda m: isinstance(m, CifarBlock) and type(m.shortcut) is nn.Identity,
            small,
        ),
        "tv resnet18": (
            lambda: torchvision.models.resnet18(weights=None, num_classes=10),
            lambda m: isinstance(m, BasicBlock) and m.downsample is None,
            big,
        ),
        "tv resnet50": (
            lambda: torchvision.models.resnet50(weights=None, num_classes=10),
            lambda m: isinstance(m, Bottleneck) and m.downsample is None,
            big,
        ),
        "tv mobilenet_v2": (
            lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10),
            lambda m: isinstance(m, InvertedResidual) and m.use_res_connect,
            big,
        ),
        "timm resnet18 + DropPath": (
            lambda: timm.create_model(
                "resnet18", pretrained=False, num_classes=10, drop_path_rate=0.1, zero_init_last=False
            ),
            lambda m: type(m).__name__ == "BasicBlock" and m.downsample is None,
            big,
        ),
        "timm efficientnet_b0 + DropPath": (
            lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=10, drop_path_rate=0.1),
            lambda m: getattr(m, "has_skip", False),
            big,
        ),
    }[label]
    built = model()
    return built, x, [n for n, m in built.named_modules() if test(m)]


ARCHS = ["resnet20", "tv resnet18", "tv resnet50", "tv mobilenet_v2", "timm resnet18 + DropPath",
         "timm efficientnet_b0 + DropPath"]  # fmt: skip


@pytest.mark.parametrize("label", ARCHS)
def test_residual_blocks_are_the_identity_shortcut_blocks(label):
    model, x, expected = _identity_shortcut(label)
    model.eval()
    found = residual_blocks(model, x)
    assert found == expected and len(expected) >= 5, (found, expected)
    with torch.no_grad():
        before = model(x)
        remove_blocks(model, found)
        after = model(x)
    assert after.shape == before.shape and not torch.equal(after, before)
    assert all(type(model.get_submodule(n)) is nn.Identity for n in found)
    assert residual_blocks(model, x) == []  # nothing removable is left


class Gated(nn.Module):
    """A residual branch scaled by a learned scalar (ReZero / layer scale): removable."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.gate = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.branch(x)


class Projected(Gated):
    """A 1x1-conv shortcut: not identity."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.branch(x)


class AfterAdd(Gated):
    """x + f(x), then a conv: the module is not input + branch."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x + self.branch(x))


class Broadcast(nn.Module):
    """x (N,1,H,W) + conv(x) (N,c,H,W): residual in its code, but the output has another shape."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Outer(nn.Module):
    """A residual around a residual: the inner block is the one listed."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = Gated(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PlusEmbedding(nn.Module):
    """x + a learned tensor (a position embedding): an add with the input, but no branch computed from it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.embed


class EmptyShortcut(Gated):
    """The CIFAR-ResNet idiom: ``self.shortcut = nn.Sequential()`` where no projection is needed."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


def _toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 1, 1), Broadcast(4), Gated(4), Projected(4), AfterAdd(4), Outer(4), PlusEmbedding(4),
        EmptyShortcut(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()  # fmt: skip


def test_gated_blocks_count_and_lookalikes_do_not():
    model, x = _toy(), torch.randn(2, 3, 8, 8)
    assert residual_blocks(model, x) == ["2", "5.body", "7"]
    with torch.no_grad():
        model[2].gate.zero_()  # a closed gate is the identity: removal computes the same function
        closed = model(x)
        with bypassed(model, ["2"]):
            assert torch.equal(model(x), closed)
    assert isinstance(model[2], Gated)  # the probe put it back
    for bad in ("3", "4", "0", "nope", ""):
        with pytest.raises(CompressError, match=repr(bad) if bad else "''"):
            remove_blocks(model, [bad])
    with pytest.raises(CompressError, match="'3'"):
        remove_blocks(model, ["2", "3"])  # all checked before any is removed
    assert isinstance(model[2], Gated)


def test_removing_a_block_equals_zeroing_its_branch():
    """A CIFAR ResNet block is relu(x + bn2(...)) of a non-negative x: with its last BN at zero it is
    the identity, so removal must give bit-identical logits."""
    model, x = build_model("resnet20", 10, 3).eval(), torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        nn.init.zeros_(model.layer2[1].bn2.weight)
        nn.init.zeros_(model.layer2[1].bn2.bias)
        zeroed = model(x)
        remove_blocks(model, ["layer2.1"])
        assert torch.equal(model(x), zeroed)


# --------------------------------------------------------------------------- the stage in a real run
def depth_recipe() -> dict:
    """Student only: train -> prune_depth (3 blocks by the loss probe, 1 fine-tune epoch) -> train -> ONNX."""
    raw = json.loads(json.dumps(TINY))
    raw["teacher"] = None
    train = {"kind": "train", "target": "student", "optim": {"lr": 0.05, "precision": "fp32"}}
    raw["stages"] = [
        {**train, "epochs": 3},
        {"kind": "prune_depth", "blocks": 3, "probe_batches": 2, "finetune": {"epochs": 1}},
        {**train, "epochs": 2},
        {"kind": "export"},
    ]
    raw["benchmark"].update(torch_snapshots=False, iters=1, warmup=0, batch_sizes=[1])
    return raw


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("depth") / "run"
    run(validate_recipe(depth_recipe()), out, quiet=True)
    report = json.loads((out / "report.json").read_text())
    data = DATASETS.get("synthetic").model_validate(report["recipe"]["data"]).load()
    return out, report, data


def _convs(path: Path) -> int:
    return sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)


def test_depth_run_exports_with_parity_and_fewer_convs(depth_run):
    out, report, data = depth_run
    metrics = report["stages"][1]["metrics"]
    assert metrics["blocks_before"] == 7 and metrics["blocks_after"] == 4 and len(metrics["removed"]) == 3
    assert set(metrics["scores"]) == {
        "layer1.0",
        "layer1.1",
        "layer1.2",
        "layer2.1",
        "layer2.2",
        "layer3.1",
        "layer3.2",
    }
    least = sorted(metrics["scores"], key=metrics["scores"].get)[:3]
    assert sorted(metrics["removed"]) == sorted(least)
    assert metrics["macs_after"] < metrics["macs_before"] and metrics["params_after"] < metrics["params_before"]
    assert 0 <= metrics["test_acc_pruned"] <= 1 and metrics["epochs"] == 1 and "test_acc" in metrics
    student = report["stages"][3]["metrics"]["student"]  # the export stage's own ORT-vs-PyTorch check
    assert student["max_abs_diff"] < 1e-4 and student["argmax_agreement"] == 1.0
    full = sum(isinstance(m, nn.Conv2d) for m in build_model("resnet20", 10, 3).modules())
    assert _convs(out / "model.onnx") == full - 2 * 3  # two convolutions per removed BasicBlock


def test_depth_checkpoint_reloads_the_exact_architecture(depth_run):
    out, report, data = depth_run
    removed = report["stages"][1]["metrics"]["removed"]
    ckpt = out / "checkpoints" / "03-train" / "student.pt"  # trained after the removal
    again = load_model(ckpt, "test")
    rebuilt = build_model("resnet20", data.num_classes, data.channels)
    remove_blocks(rebuilt, removed)
    rebuilt.load_state_dict(open_checkpoint(ckpt, "test").state, strict=True)  # no key missing, none extra
    assert repr(again) == repr(rebuilt.eval())
    raw = data.test_x[:16]
    with torch.no_grad():
        logits = again(data.normalize(raw))
        assert torch.equal(logits, rebuilt(data.normalize(raw)))
    served = Predictor(out / "model.onnx").logits(raw.numpy(), layout="nchw")
    assert np.abs(served - logits.numpy()).max() < 1e-4


def test_block_importance_ranks_a_silenced_block_last(depth_run):
    out, _, data = depth_run
    model = load_model(out / "checkpoints" / "01-train" / "student.pt", "test")  # trained, all 7 blocks
    names = residual_blocks(model, data.example_input(2))
    with torch.no_grad():  # layer1.0's branch outputs zero: removing it changes nothing
        nn.init.zeros_(model.layer1[0].bn2.weight)
        nn.init.zeros_(model.layer1[0].bn2.bias)
    for method in ("loss", "output", "bn_scale"):
        loader = data.train_loader(seed=0, augment=False) if method != "bn_scale" else None
        scores = block_importance(model, names, loader, torch.device("cpu"), method, batches=2)
        assert set(scores) == set(names)
        assert scores["layer1.0"] == 0.0, (method, scores)
        assert all(s > 0 for n, s in scores.items() if n != "layer1.0"), (method, scores)
    assert repr(model) == repr(load_model(out / "checkpoints" / "01-train" / "student.pt", "t"))  # probes undone


@pytest.fixture(scope="module")
def resumed(depth_run, tmp_path_factory):
    """The same recipe without its export (the comparison is of checkpoints; saves the export and ONNX
    measurements), killed in the training stage after prune_depth and resumed: its run dir."""
    recipe = depth_recipe()
    recipe["stages"] = recipe["stages"][:3]
    recipe_file = tmp_path_factory.mktemp("resume") / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = recipe_file.parent / "run"
    kill_during(recipe_file, out, "train student epoch 1/2")  # stage 3: prune_depth's checkpoint is written
    assert (out / "checkpoints" / "02-prune_depth" / "student.pt").is_file() and not (out / "report.json").exists()
    assert main(["run", str(recipe_file), "--resume", str(out), "--quiet"]) == 0
    return out


def test_resume_after_prune_depth_rebuilds_the_pruned_student(depth_run, resumed):
    ref_dir, ref_report, _ = depth_run
    assert "resumed after stage 2" in (resumed / "train.log").read_text()
    for stage in ("02-prune_depth", "03-train"):  # trained on after the resume: the same model, bit for bit
        got, ref = (torch.load(d / "checkpoints" / stage / "student.pt", weights_only=True) for d in (resumed, ref_dir))
        assert got["structure"] == ref["structure"], stage
        assert got["state_dict"].keys() == ref["state_dict"].keys()
        assert all(torch.equal(got["state_dict"][k], v) for k, v in ref["state_dict"].items()), stage
    report = _stable(json.loads((resumed / "report.json").read_text()))
    ref = _stable(ref_report)
    assert report["stages"] == ref["stages"][:3]
    for name, art in report["artifacts"].items():
        assert art == ref["artifacts"][name], name


def test_a_resumed_checkpoint_has_the_same_bytes(depth_run, resumed):
    ref_dir = depth_run[0]
    path = Path("checkpoints") / "03-train" / "student.pt"
    assert (resumed / path).stat().st_size == (ref_dir / path).stat().st_size


def test_bench_on_a_depth_pruned_checkpoint(depth_run, tmp_path, capsys):
    out, report, _ = depth_run
    ckpt = out / "checkpoints" / "02-prune_depth" / "student.pt"
    argv = ["bench", str(ckpt), "--runtime", "torch", "--batch-sizes", "1", "--iters", "2", "--warmup", "0"]
    assert main([*argv, "--devices", "cpu", "--out", str(tmp_path / "b"), "--quiet"]) == 0, capsys.readouterr().err
    row = json.loads((tmp_path / "b" / "report.json").read_text())["artifacts"][0]
    ran = {a["name"]: a for a in report["artifacts"]}["student@prune_depth"]
    assert row["accuracy"] == ran["accuracy"] and row["params"] == ran["params"] and row["macs"] == ran["macs"]


# --------------------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.parametrize(
    ("sets", "needles"),
    [
        (["stages.1.remove=[layer1.0]"], ("blocks (how many", "or remove", "not both")),
        (["stages.1.blocks=null"], ("give blocks",)),
        (["stages.1.method=taylor"], ("stages.1.method",)),
    ],
)
def test_bad_schema_is_one_line(sets, needles, write_recipe, capsys):
    argv = ["validate", str(write_recipe(depth_recipe()))] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    ("sets", "needles"),
    [
        (
            ["stages.1.blocks=null", "stages.1.remove=[nope]"],
            ("stages.1.remove: 'nope' is not a removable", "layer3.2"),
        ),
        (["stages.1.blocks=null", "stages.1.remove=[layer2.0]"], ("'layer2.0' (a BasicBlock without", "did you mean")),
        (["stages.1.blocks=8"], ("stages.1.blocks: 8 exceeds the 7 removable blocks",)),
        (["stages.1.blocks=6", "stages.1.keep=[layer1.*]"], ("stages.1.blocks: 6 exceeds the 4", "3 kept by keep")),
        (["stages.1.keep=[layer9.*]"], ("stages.1.keep: pattern 'layer9.*' matches no removable block",)),
        (["student.model=digits_student"], ("stages.1: the student (Sequential) has no removable residual block",)),
    ],
)
def test_bad_names_are_one_line_before_anything_is_written(sets, needles, write_recipe, tmp_path, capsys):
    argv = ["run", str(write_recipe(depth_recipe()))] + [a for s in sets for a in ("--set", s)]
    check_fails_cleanly(capsys, argv, tmp_path / "out", *needles)
