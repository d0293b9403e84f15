"""Models and weights users bring (issue 21): ImageNet-style state_dicts and safetensors files for
torchvision, timm and user models, the classifier re-initialized for the data's classes, torchvision's
published weights from a local torch hub cache, and one line for everything that cannot work.
Every "pretrained" file is made here; nothing is downloaded (COMPRESS_OFFLINE=1)."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from compress import userpath
from compress.checkpoint import build_from_spec, load_model, open_checkpoint, save_model
from compress.cli import main
from compress.data import DATASETS
from compress.errors import CompressError
from compress.models import ModelSpec, build_model
from compress.models.heads import find_classifier
from compress.recipe import load_recipe, validate_recipe

NOTICE = "classifier {!r} re-initialized (head: keep to refuse)"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("COMPRESS_OFFLINE", "1")


@pytest.fixture(scope="module")
def rgb32():
    """10 classes of 3×32×32 images."""
    return DATASETS.get("synthetic").model_validate({"name": "synthetic", "image_size": 32, "train_size": 4}).load()


@pytest.fixture(scope="module")
def digits():
    return DATASETS.get("digits").model_validate({"name": "digits"}).load()


@pytest.fixture(scope="module")
def imagenet_r18():
    """A torchvision ResNet-18 state_dict with ImageNet's 1000 classes (random values, made here)."""
    torch.manual_seed(0)
    return build_model("torchvision:resnet18", 1000).state_dict()


def _non_head_equal(model: nn.Module, state: dict[str, torch.Tensor], head: str) -> None:
    own = model.state_dict()
    rest = [k for k in state if not k.startswith(head + ".")]
    assert rest and set(rest) == {k for k in own if not k.startswith(head + ".")}
    for key in rest:
        assert torch.equal(own[key], state[key]), key


def _spec(**fields) -> ModelSpec:
    return ModelSpec.model_validate(fields)


# --------------------------------------------------------------------------- torchvision, a 1000-class file
def test_imagenet_state_dict_for_ten_classes_resets_the_head(imagenet_r18, rgb32, tmp_path, caplog):
    path = tmp_path / "r18.pt"
    torch.save(imagenet_r18, path)
    with caplog.at_level(logging.WARNING, logger="compress.models"):
        model = build_from_spec(_spec(model="torchvision:resnet18", checkpoint=path), rgb32, "student")
    assert [r.getMessage() for r in caplog.records] == [
        "student: checkpoint r18.pt has 1000 classes, the data 10: " + NOTICE.format("fc")
    ]
    _non_head_equal(model, imagenet_r18, "fc")
    assert model.fc.weight.shape == (10, 512)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_head_keep_refuses_another_class_count(imagenet_r18, rgb32, tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(imagenet_r18, path)
    with pytest.raises(CompressError) as exc:
        build_from_spec(_spec(model="torchvision:resnet18", checkpoint=path, head="keep"), rgb32, "student")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("student.checkpoint: head: keep")
    assert "'fc'" in msg and "1000 classes" in msg and "has 10 (fc.weight is (1000, 512) in the file, (10, 512)" in msg


def test_head_reset_reinitializes_even_when_the_counts_match(rgb32, tmp_path):
    torch.manual_seed(1)
    state = build_model("resnet20", 10).state_dict()
    path = tmp_path / "r20.pt"
    torch.save(state, path)
    kept = build_from_spec(_spec(model="resnet20", checkpoint=path), rgb32, "student")
    head = find_classifier(kept)
    assert head == "fc" and torch.equal(kept.state_dict()["fc.weight"], state["fc.weight"])
    reset = build_from_spec(_spec(model="resnet20", checkpoint=path, head="reset"), rgb32, "student")
    assert not torch.equal(reset.state_dict()["fc.weight"], state["fc.weight"])
    _non_head_equal(reset, state, "fc")


def test_other_mismatches_name_the_keys_and_shapes(rgb32, tmp_path):
    state = build_model("torchvision:resnet34", 1000).state_dict()  # layer3 has 6 blocks, not 2
    torch.save({k: v for k, v in state.items() if k.startswith(("conv1", "fc"))}, tmp_path / "part.pt")
    with pytest.raises(
        CompressError, match=r"student.checkpoint: checkpoint does not match the model: missing \d+ keys"
    ):
        build_from_spec(_spec(model="torchvision:resnet18", checkpoint=tmp_path / "part.pt"), rgb32, "student")
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    torch.save(state, tmp_path / "wide.pt")
    spec = _spec(model="torchvision:resnet34", checkpoint=tmp_path / "wide.pt")
    with pytest.raises(CompressError, match=r"conv1.weight has shape \(32, 3, 7, 7\) in the file but \(64, 3, 7, 7\)"):
        build_from_spec(spec, rgb32, "student")


# --------------------------------------------------------------------------- weights: NAME from the torch hub cache
def test_torchvision_weights_come_from_the_torch_hub_cache(imagenet_r18, rgb32, tmp_path, monkeypatch, caplog):
    from torchvision.models import ResNet18_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert ResNet18_Weights.DEFAULT.url.endswith("/" + cached.name)  # the file name torchvision expects
    spec = _spec(model="torchvision:resnet18", weights="DEFAULT")
    with pytest.raises(CompressError) as exc:  # not there, and downloads are off: where it looked, and what to do
        build_from_spec(spec, rgb32, "student")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("student.weights: torchvision weights ResNet18_Weights.IMAGENET1K_V1")
    assert f"are not in {cached} and downloads are off (COMPRESS_OFFLINE=1)" in msg and "checkpoint: FILE" in msg
    cached.parent.mkdir(parents=True)
    torch.save(imagenet_r18, cached)
    with caplog.at_level(logging.WARNING, logger="compress.models"):
        model = build_from_spec(spec, rgb32, "student")
    assert "student: weights IMAGENET1K_V1 has 1000 classes, the data 10" in caplog.text
    _non_head_equal(model, imagenet_r18, "fc")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_rgb_weights_for_grayscale_data_adapt_the_first_conv(imagenet_r18, digits, tmp_path):
    torch.save(imagenet_r18, tmp_path / "r18.pt")
    model = build_from_spec(_spec(model="torchvision:resnet18", checkpoint=tmp_path / "r18.pt"), digits, "student")
    assert torch.allclose(model.conv1.weight, imagenet_r18["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.layer1[0].conv1.weight, imagenet_r18["layer1.0.conv1.weight"])


# --------------------------------------------------------------------------- timm, safetensors, wrappers
def test_timm_model_from_a_1000_class_safetensors_file(rgb32, tmp_path, caplog):
    import timm

    torch.manual_seed(2)
    state = timm.create_model("mobilenetv3_small_050", num_classes=1000).state_dict()
    save_file(state, tmp_path / "mnv3.safetensors")
    spec = _spec(model="timm:mobilenetv3_small_050", checkpoint=tmp_path / "mnv3.safetensors")
    with caplog.at_level(logging.WARNING, logger="compress.models"):
        model = build_from_spec(spec, rgb32, "teacher")
    assert "teacher: checkpoint mnv3.safetensors has 1000 classes, the data 10: " + NOTICE.format("classifier") in (
        caplog.text
    )
    _non_head_equal(model, state, "classifier")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wrapped_and_ddp_prefixed_state_dicts_load(digits, tmp_path):
    torch.manual_seed(3)
    state = build_model("digits_student", 10, 1).state_dict()
    torch.save({"model": state, "optimizer": {"lr": 0.1}, "epoch": 7}, tmp_path / "wrapped.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    save_file({f"_orig_mod.{k}": v for k, v in state.items()}, tmp_path / "compiled.safetensors")
    for name in ("wrapped.pt", "ddp.pth", "compiled.safetensors"):
        model = build_from_spec(_spec(model="digits_student", checkpoint=tmp_path / name), digits, "student")
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()), name


def _pruned_digits() -> nn.Module:
    torch.manual_seed(4)
    model = build_model("digits_student", 10, 1).eval()
    x = torch.randn(1, 1, 8, 8)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    imp = tp.importance.MagnitudeImportance()
    tp.pruner.MagnitudePruner(model, x, importance=imp, pruning_ratio=0.5, ignored_layers=[last]).step()
    return model


def test_a_pruned_model_reloads_from_its_safetensors_file(digits, tmp_path):
    model = _pruned_digits()
    full = build_model("digits_student", 10, 1)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters()) / 2
    path = tmp_path / "student.safetensors"
    save_model(model, path, name="digits_student", kwargs={}, num_classes=10, in_channels=1)
    tensors = load_file(path)
    assert tensors.keys() == model.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert {k: json.loads(meta[k]) for k in ("format", "model", "num_classes", "in_channels")} == {
        "format": "compress/2",
        "model": "digits_student",
        "num_classes": 10,
        "in_channels": 1,
    }
    x = torch.randn(3, 1, 8, 8)
    again = load_model(path, "t")
    assert repr(again) == repr(model)
    assert torch.equal(again(x), model(x))
    built = build_from_spec(_spec(model="digits_student", checkpoint=path), digits, "student")
    assert torch.equal(built(x), model(x))


def test_a_snapshot_writes_safetensors_beside_the_pt(digits, tmp_path):
    from compress.context import Context

    model = _pruned_digits()
    ctx = Context(
        recipe=None,  # type: ignore[arg-type] - snapshot reads the specs and the data only
        device=torch.device("cpu"),
        run_dir=tmp_path,
        data=digits,
        models={"student": model},
        specs={"student": _spec(model="digits_student")},
    )
    art = ctx.snapshot("student", "prune")
    twin = art.path.with_suffix(".safetensors")
    assert art.path.is_file() and twin.is_file() and not list(tmp_path.rglob(".*tmp*"))
    x = torch.randn(2, 1, 8, 8)
    for path in (art.path, twin):
        ck = open_checkpoint(path, "t")
        assert ck.structure is not None and ck.model == "digits_student"
        assert torch.equal(ck.build("t")(x), model(x))


def test_a_compress_checkpoint_for_other_classes_gets_a_new_head(digits, tmp_path, caplog):
    model = build_model("digits_student", 5, 1)
    save_model(model, tmp_path / "five.safetensors", name="digits_student", kwargs={}, num_classes=5, in_channels=1)
    with caplog.at_level(logging.WARNING, logger="compress.models"):
        built = build_from_spec(_spec(model="digits_student", checkpoint=tmp_path / "five.safetensors"), digits, "s")
    assert "s: checkpoint five.safetensors has 5 classes, the data 10" in caplog.text
    assert built(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    head = [n for n, m in built.named_modules() if isinstance(m, nn.Linear)][-1]
    _non_head_equal(built, model.state_dict(), head)


def test_a_damaged_safetensors_file_is_one_line(digits, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CompressError) as exc:
        build_from_spec(_spec(model="digits_student", checkpoint=path), digits, "student")
    assert str(exc.value).startswith(f"student.checkpoint: cannot load {path} as a safetensors file")
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------- recipe-time checks
def _recipe(student: dict) -> dict:
    return {"name": "t", "data": {"name": "digits"}, "student": student, "stages": [{"kind": "export"}]}


@pytest.mark.parametrize(
    "student, message",
    [
        ({"model": "resnet20", "weights": "DEFAULT"}, "student.weights: weights: names torchvision's published"),
        ({"model": "timm:resnet10t", "weights": "DEFAULT"}, "use pretrained: true"),
        ({"model": "torchvision:resnet18", "pretrained": True}, "student.pretrained: pretrained: true loads timm's"),
        ({"model": "torchvision:resnet18", "weights": "IMAGENET2K"}, "known: IMAGENET1K_V1, DEFAULT"),
        ({"model": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}, "use the model's own field, weights"),
        ({"model": "timm:resnet10tt"}, "unknown timm model 'resnet10tt'; did you mean timm:resnet10t"),
        ({"model": "resnet20", "head": "keep"}, "head: applies to loaded weights"),
        ({"model": "timm:resnet18.nosuchtag"}, "has no pretrained tag 'nosuchtag' (known: a1_in1k"),
        ({"model": "resnet20", "kwargs": {"a": {1: 2}}}, "student.kwargs: factory arguments must be plain data"),
    ],
)
def test_weight_fields_are_checked_when_the_recipe_loads(student, message):
    with pytest.raises(CompressError) as exc:
        validate_recipe(_recipe(student))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_timm_pretrained_without_cached_weights_is_one_line(rgb32, monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(CompressError) as exc:
        build_from_spec(_spec(model="timm:resnet10t", pretrained=True), rgb32, "student")
    msg = str(exc.value)
    assert msg.startswith("student.pretrained: timm's pretrained weights for timm:resnet10t are not in ")
    assert str(tmp_path / "hf" / "models--timm--resnet10t.") in msg and "checkpoint: FILE" in msg


def test_native_size_models_say_which_kwargs_fix_them(rgb32):
    spec = _spec(model="timm:vit_tiny_patch16_224", kwargs={"depth": 1})  # one block: fast
    with pytest.raises(CompressError, match=r"its input size as an argument: kwargs: \{img_size: 32\}$"):
        build_from_spec(spec, rgb32, "student")
    model = build_from_spec(_spec(model=spec.model, kwargs={"depth": 1, "img_size": 32}), rgb32, "student")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --------------------------------------------------------------------------- user code beside the recipe
def test_user_model_beside_the_recipe_from_another_cwd(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(userpath, "_roots", [])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "beside_models", raising=False)
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "beside_models.py").write_text(
        textwrap.dedent("""
        import torch.nn as nn
        def tiny(num_classes, in_channels, width=4):
            layers = [nn.Flatten(), nn.Linear(in_channels * 64, width), nn.ReLU(), nn.Linear(width, num_classes)]
            return nn.Sequential(*layers)
        """)
    )
    torch.manual_seed(5)
    theirs = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 1000)).state_dict()
    torch.save(theirs, project / "mine.pt")
    recipe = project / "recipe.yaml"
    student = {"model": "beside_models:tiny", "kwargs": {"width": 6}, "checkpoint": str(project / "mine.pt")}
    recipe.write_text(yaml.safe_dump(_recipe(student)))
    monkeypatch.chdir(elsewhere)
    spec = load_recipe(recipe).student
    model = build_from_spec(spec, digits, "student")
    assert Path(sys.modules["beside_models"].__file__).parent == project
    assert torch.equal(model[1].weight, theirs["1.weight"]) and model[3].weight.shape == (10, 6)


def test_cli_a_bad_checkpoint_is_exit_2_and_one_line(tmp_path, capsys):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"garbage that is not a safetensors file")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe({"model": "digits_student", "checkpoint": str(bad)})))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"student.checkpoint: cannot load {bad} as a safetensors file" in err[0]
    recipe.write_text(yaml.safe_dump(_recipe({"model": "digits_student", "weights": "DEFAULT"})))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "student.weights" in err[0]


def test_pretrained_torchvision_teacher_and_timm_student_run_the_quickstart_stages_to_int8(tmp_path, caplog):
    """The issue's main path: a torchvision ResNet-18 and a timm MobileNetV3 from 1000-class "ImageNet"
    files (a .pt and a .safetensors), heads reset for 10 classes, through train → distill → prune →
    export → INT8 like the quickstart, via the CLI."""
    torch.manual_seed(0)
    torch.save(build_model("torchvision:resnet18", 1000).state_dict(), tmp_path / "r18_imagenet.pt")
    save_file(build_model("timm:mobilenetv3_small_050", 1000).state_dict(), str(tmp_path / "mnv3.safetensors"))
    recipe = {
        "name": "pretrained",
        "device": "cpu",
        "data": {"name": "synthetic", "image_size": 32, "train_size": 64, "test_size": 32, "batch_size": 32},
        "teacher": {"model": "torchvision:resnet18", "checkpoint": str(tmp_path / "r18_imagenet.pt")},
        "student": {"model": "timm:mobilenetv3_small_050", "checkpoint": str(tmp_path / "mnv3.safetensors")},
        "stages": [
            {"kind": "train", "target": "teacher", "epochs": 1, "optim": {"lr": 0.01, "precision": "fp32"}},
            {"kind": "distill", "epochs": 1, "optim": {"lr": 0.01, "precision": "fp32"}},
            {"kind": "prune", "ratio": 0.3, "round_to": 8},
            {"kind": "export"},
            {"kind": "quantize", "calibration_batches": 2},
        ],
        "benchmark": {"batch_sizes": [1], "warmup": 0, "iters": 2, "devices": ["cpu"], "torch_snapshots": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with caplog.at_level(logging.WARNING, logger="compress.models"):
        assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    notices = [r.getMessage() for r in caplog.records if "re-initialized" in r.getMessage()]
    assert len(notices) == 2 and all("1000 classes" in n for n in notices), notices
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    int8 = next(a for a in report["artifacts"] if a["name"] == "model.int8.onnx")
    assert int8["precision"] == "int8" and 0 <= int8["accuracy"] <= 1
    prune = next(s["metrics"] for s in report["stages"] if s["kind"] == "prune")
    assert prune["params_after"] < prune["params_before"]
    # the run's pruned student reloads from its .safetensors twin, pruned shapes and all
    twin = next((tmp_path / "run" / "checkpoints").glob("*-prune/student.safetensors"))
    ck = open_checkpoint(twin, "test")
    assert ck.model == "timm:mobilenetv3_small_050"
    assert sum(v.numel() for v in ck.state.values() if v.is_floating_point()) < sum(
        v.numel() for v in build_model("timm:mobilenetv3_small_050", 10).state_dict().values() if v.is_floating_point()
    )


class HiddenFc(nn.Module):
    """A user model whose hidden layer is called ``fc``; the logits come from ``out``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(in_channels * 64, 64)
        self.out = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.flat(x))))


def hidden_fc(num_classes: int, in_channels: int = 1) -> nn.Module:
    return HiddenFc(num_classes, in_channels)


def test_a_hidden_layer_named_fc_is_not_taken_for_the_classifier(digits, tmp_path, caplog):
    torch.manual_seed(0)
    trained = HiddenFc(10)
    torch.save(trained.state_dict(), tmp_path / "ten.pt")
    with caplog.at_level(logging.WARNING, logger="compress.models"):
        model = build_from_spec(
            _spec(model="tests.test_weights:hidden_fc", checkpoint=tmp_path / "ten.pt"), digits, "s"
        )
    assert not [r for r in caplog.records if "re-initialized" in r.getMessage()]
    for key, value in trained.state_dict().items():  # every layer loaded, the hidden fc included
        torch.testing.assert_close(model.state_dict()[key], value)
    assert find_classifier(model, 10) == "out"
    torch.save(HiddenFc(3).state_dict(), tmp_path / "three.pt")  # another class count: only `out` is reset
    model = build_from_spec(_spec(model="tests.test_weights:hidden_fc", checkpoint=tmp_path / "three.pt"), digits, "s")
    torch.testing.assert_close(model.fc.weight, torch.load(tmp_path / "three.pt", weights_only=True)["fc.weight"])
