"""The README's "Compress your own model" section, run as written: its recipe, its three commands and
its Python example, in a folder holding what the text says the user has (a 5-class image tree, a
fine-tuned ResNet-18 state_dict, an ONNX file from a plain ``torch.onnx.export``). Only the schedule
is shortened (epochs, benchmark iterations) and the student starts from random weights instead of
timm's ImageNet ones (no test may download); everything else is the README's text."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from compress.cli import main
from tests.test_data import make_tree

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ["daisy", "dandelion", "rose", "sunflower", "tulip"]


def section_blocks(kind: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Compress your own model") : text.index("## Documentation")]
    return re.findall(rf"```{kind}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    here = tmp_path_factory.mktemp("readme")
    make_tree(here / "data" / "flowers", ("train", "val"), FLOWERS, 4, 64)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(FLOWERS)).eval()
    torch.save(model.state_dict(), here / "r18_flowers.pt")
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(here / "resnet18.onnx"))  # plain: batch 1, .data
    (recipe,) = section_blocks("yaml")
    raw = yaml.safe_load(recipe)
    assert raw["student"].pop("pretrained") is True  # (timm's ImageNet weights: not downloaded in a test)
    for stage in raw["stages"]:
        if "epochs" in stage:
            stage["epochs"] = 1
        if "finetune" in stage:
            stage["finetune"]["epochs"] = 1
    raw["benchmark"] = {"batch_sizes": [1], "warmup": 0, "iters": 2, "devices": ["cpu"], "torch_snapshots": False}
    (here / "flowers.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return here


def test_readme_commands(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    (commands,) = section_blocks("bash")
    lines = [shlex.split(line.split("#")[0]) for line in commands.strip().splitlines()]
    assert [line[:2] for line in lines] == [["compress", "run"], ["compress", "quantize"], ["compress", "export"]]
    fast = {"quantize": ["--iters", "5", "--warmup", "1", "--calibration-batches", "2", "--quiet"], "run": ["--quiet"]}
    for line in lines:
        assert main(line[1:] + fast.get(line[1], [])) == 0, line
    report = json.loads((folder / "runs" / "flowers" / "report.json").read_text())
    names = {a["name"] for a in report["artifacts"]}
    assert {"teacher.onnx", "model.onnx", "model.int8.onnx"} <= names
    assert report["recipe"]["student"]["model"] == "timm:mobilenetv3_small_050"
    stages = {s["kind"]: s["metrics"] for s in report["stages"]}
    assert stages["prune"]["params_after"] < stages["prune"]["params_before"]
    quantized = json.loads((folder / "runs" / "q" / "report.json").read_text())
    assert [a["precision"] for a in quantized["artifacts"]] == ["fp32", "int8"]
    assert (folder / "runs" / "q" / "resnet18.int8.onnx").is_file() and (folder / "student.onnx").is_file()


def test_readme_python(folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(folder)
    (code,) = section_blocks("python")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("model.int8.onnx") and Path(out[0]).is_file()
    assert 0.0 <= float(out[1]) <= 1.0
    result, model = namespace["result"], namespace["model"]
    assert result.best(format="onnx", precision="int8").metrics["precision"] == "int8"
    assert model.conv1.out_channels == 32  # pruned by compress.prune: 64 → 32 channels
    assert (folder / "small.onnx").is_file() and namespace["int8"].path.is_file()
