"""Structural checkpoints: whatever a stage does to a model's module graph, its checkpoint rebuilds
exactly that model (reload, --resume, compress bench, the report's memory column), from data only."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from compress.checkpoint import FORMAT, load_model, open_checkpoint, save_model
from compress.cli import main
from compress.errors import CompressError
from compress.models import build_model
from compress.models.attention import SelfAttention, decouple_attention
from compress.pipeline import run
from compress.recipe import validate_recipe
from compress.stages.base import STAGES
from compress.structure import allow_module_type, describe, rebuild_problem
from tests.conftest import digits_recipe
from tests.test_resume import ROOT, _stable, kill_during

DIGITS_X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fold_bn():
    """The test-only fold_bn stage, registered while this module's tests run."""
    from tests.plugins import fold_bn as plugin

    STAGES.register("fold_bn")(plugin.FoldBN)  # (again, if an earlier module's teardown removed it)
    yield plugin
    STAGES.entries.pop("fold_bn", None)


def _trained_like(model: nn.Module) -> nn.Module:
    """BatchNorm statistics that are not the identity, so folding really changes the weights."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _save(model: nn.Module, path: Path, name: str, in_channels: int = 1) -> Path:
    save_model(model, path, name=name, kwargs={}, num_classes=10, in_channels=in_channels)
    return path


# --------------------------------------------------------------------------- unit: reload is exact
def test_folded_model_reloads_exactly(fold_bn, tmp_path):
    model = _trained_like(build_model("digits_student", 10, 1))
    before = model(DIGITS_X)
    assert fold_bn.fold_batchnorm(model) == 3
    folded = model(DIGITS_X)
    torch.testing.assert_close(folded, before, rtol=1e-5, atol=1e-5)  # same function, new graph
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    path = _save(model, tmp_path / "folded.pt", "digits_student")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and "pruned" not in raw
    assert {e["type"] for e in raw["structure"] if e["path"] in ("1", "4")} == {"torch.nn.modules.linear.Identity"}
    again = load_model(path, "t")
    assert torch.equal(again(DIGITS_X), folded)
    assert repr(again) == repr(model)
    assert again[0].bias is not None and isinstance(again[1], nn.Identity)
    # the same file as a recipe's student checkpoint: build_from_spec rebuilds it too
    from compress.checkpoint import build_from_spec
    from compress.data import DATASETS
    from compress.models import ModelSpec

    data = DATASETS.get("digits").model_validate({"name": "digits"}).load()
    spec = ModelSpec(model="digits_student", checkpoint=path)
    assert torch.equal(build_from_spec(spec, data, "student", "student")(DIGITS_X), folded)


def test_removed_block_resnet_reloads_exactly(fold_bn, tmp_path):
    model = _trained_like(build_model("resnet20", 10, 3))
    fold_bn.fold_batchnorm(model)
    del model.layer2[1]  # a whole residual block gone: a Sequential renumbered, a module graph no factory builds
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    again = load_model(_save(model, tmp_path / "r.pt", "resnet20", 3), "t")
    assert torch.equal(again(x), out) and repr(again) == repr(model)


def tiny_attention(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A user factory (tests.test_checkpoint:tiny_attention) with attention, tied weights, a shared module."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.act = nn.GELU(approximate="tanh")
            self.mix = nn.Linear(16, 16)
            self.back = nn.Linear(16, 16)
            self.back.weight = self.mix.weight  # tied
            self.head = nn.Linear(16, num_classes)
            self.register_buffer("scale", torch.tensor(0.5), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.act(self.embed(x.flatten(1, 2)))  # (B, 8, 8) -> tokens of width 8
            t = self.attn(t, t, t)[0] * self.scale
            return self.head(self.act(self.back(self.act(self.mix(t))))).mean(1)

    return Net()


def test_swapped_attention_tied_weights_and_shared_modules_survive(tmp_path):
    name = "tests.test_checkpoint:tiny_attention"
    model = tiny_attention().eval()
    decouple_attention(model)  # a module class the factory never builds there (allow-listed)
    model.extra_act = model.act  # one module at two paths
    x = torch.randn(2, 1, 8, 8)
    out = model(x)
    again = load_model(_save(model, tmp_path / "a.pt", name), "t")
    assert isinstance(again.attn, SelfAttention) and again.attn.num_heads == 4
    assert again.back.weight is again.mix.weight and again.extra_act is again.act
    assert again.act.approximate == "tanh" and float(again.scale) == 0.5  # non-persistent buffer kept
    assert torch.equal(again(x), out)


def test_legacy_pruned_files_still_load(tmp_path):
    """A compress/1 file (widths shrunk, ``pruned: true``, no structure record) as older versions wrote it."""
    from compress.pruning.structured import StructuredOptions, prune_step

    model = build_model("digits_student", 10, 1).eval()
    prune_step(model, DIGITS_X, StructuredOptions(), 0.5, 10)
    out = model(DIGITS_X)
    legacy = {
        "format": "compress/1",
        "model": "digits_student",
        "kwargs": {},
        "num_classes": 10,
        "in_channels": 1,
        "pruned": True,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    torch.save(legacy, tmp_path / "old.pt")
    again = load_model(tmp_path / "old.pt", "t")
    assert torch.equal(again(DIGITS_X), out)
    assert again[0].out_channels == model[0].out_channels < 16


# --------------------------------------------------------------------------- unit: safety
def _record(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _one_line_error(path: Path, *needles: str) -> str:
    with pytest.raises(CompressError) as info:
        load_model(path, "student.checkpoint")
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and str(path) in msg, msg
    assert "weights_only=False" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_a_record_naming_any_other_class_is_refused(tmp_path):
    model = build_model("digits_student", 10, 1).eval()
    path = _save(model, tmp_path / "m.pt", "digits_student")
    assert torch.equal(load_model(path, "control")(DIGITS_X), model(DIGITS_X))  # the unedited record loads exactly
    cases = {
        "evil.pt": (lambda s: s[2].update(type="subprocess.Popen"), ["subprocess.Popen", "neither a torch.nn class"]),
        "broken.pt": (lambda s: s[1].update(params="garbage"), ["malformed structure record"]),
        "short.pt": (lambda s: s.pop(3), ["children do not match"]),  # a child without its entry
    }
    for name, (edit, needles) in cases.items():
        obj = _record(path)
        edit(obj["structure"])
        torch.save(obj, tmp_path / name)
        msg = _one_line_error(tmp_path / name)
        assert all(n in msg for n in needles), msg


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fn = torch.sigmoid  # not plain data: a module like this cannot be created from a record

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fn(x)


class Swish(nn.Module):
    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


def test_what_cannot_be_rebuilt_is_named_when_saving_and_loading(tmp_path):
    reference = build_model("digits_student", 10, 1)
    model = build_model("digits_student", 10, 1).eval()
    model[2] = Swish(2.0)
    problem = rebuild_problem(describe(model), reference)
    assert problem is not None and "'2'" in problem and "Swish" in problem and "allow_module_type" in problem
    path = _save(model, tmp_path / "swish.pt", "digits_student")
    _one_line_error(path, "Swish")
    allow_module_type(Swish)  # a stage that brings its own module class registers it
    assert rebuild_problem(describe(model), reference) is None
    again = load_model(path, "t")
    assert isinstance(again[2], Swish) and again[2].beta == 2.0 and torch.equal(again(DIGITS_X), model(DIGITS_X))
    model[2] = allow_module_type(Gate)()
    problem = rebuild_problem(describe(model), reference)
    assert problem is not None and "fn" in problem and "not plain data" in problem


def test_non_tensor_pickles_and_damaged_files_are_one_line(tmp_path, capfd):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "pickle.pt", "wb") as fh:
        pickle.dump({"format": FORMAT, "state_dict": Payload()}, fh)
    torch.save({"model": Payload()}, tmp_path / "torch.pt")
    good = _save(build_model("digits_student", 10, 1), tmp_path / "good.pt", "digits_student")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:2000])
    (tmp_path / "text.pt").write_text("hello\n")
    capfd.readouterr()
    expected = {
        "pickle.pt": ["plain pickle"],
        "torch.pt": ["holds a print object", "only tensors and plain data"],
        "cut.pt": ["truncated or damaged"],
        "text.pt": ["not a PyTorch checkpoint"],
    }
    for name, needles in expected.items():
        msg = _one_line_error(tmp_path / name)
        assert all(n in msg for n in needles), msg
        assert (tmp_path / name).is_file()  # reported, never deleted or rewritten
    assert "this must never run" not in capfd.readouterr().out  # the pickled call was never made
    assert isinstance(load_model(good, "control"), nn.Module)  # the intact file of the same kind loads


def test_a_failed_write_is_one_line_and_leaves_no_temp_file(tmp_path):
    """RLIMIT_FSIZE makes the write fail as a full disk does (SIGXFSZ ignored: write raises OSError)."""
    script = f"""
import resource, signal, sys
from pathlib import Path
import torch
from compress.files import atomic_save
from compress.errors import CompressError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    atomic_save({{"w": torch.zeros(1_000_000)}}, Path({str(tmp_path / "big.pt")!r}))
except CompressError as exc:
    print(exc)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert f"cannot write {tmp_path / 'big.pt'}: File too large" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- a real run with fold_bn
def fold_recipe() -> dict:
    """Student only (fast): train -> fold_bn -> train again on the folded graph -> ONNX."""
    raw = digits_recipe("fold", 1, 1)
    raw.pop("teacher")
    train = {**raw["stages"][0], "target": "student"}
    raw["stages"] = [{**train, "epochs": 2}, {"kind": "fold_bn"}, {**train, "epochs": 3}, {"kind": "export"}]
    return raw


@pytest.fixture(scope="module")
def fold_run(fold_bn, tmp_path_factory):
    out = tmp_path_factory.mktemp("fold") / "run"
    run(validate_recipe(fold_recipe()), out, quiet=True)
    return out, json.loads((out / "report.json").read_text())


def test_fold_run_checkpoint_reloads_to_the_same_model(fold_bn, fold_run):
    out, report = fold_run
    assert report["stages"][1]["metrics"]["folded"] == 3
    unfolded = load_model(out / "checkpoints" / "01-train" / "student.pt", "t")
    folded = load_model(out / "checkpoints" / "02-fold_bn" / "student.pt", "t")
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    fold_bn.fold_batchnorm(unfolded)  # what the stage computed, bit for bit
    assert torch.equal(folded(DIGITS_X), unfolded(DIGITS_X))
    arts = {a["name"]: a for a in report["artifacts"]}
    for name in ("student@fold_bn", "student@train", "model.onnx"):
        assert arts[name]["peak_rss_bytes"], name  # the memory column, measured from the checkpoint
    finetuned = open_checkpoint(out / "checkpoints" / "03-train" / "student.pt", "t")
    assert not any(k.startswith("1.") for k in finetuned.state)  # trained on the folded graph


def test_bench_on_a_folded_checkpoint(fold_bn, fold_run, tmp_path, capsys):
    out, report = fold_run
    ckpt = out / "checkpoints" / "02-fold_bn" / "student.pt"
    argv = ["bench", str(ckpt), "--runtime", "torch", "--batch-sizes", "1", "--iters", "2", "--warmup", "0"]
    assert main([*argv, "--devices", "cpu", "--out", str(tmp_path / "b"), "--quiet"]) == 0, capsys.readouterr().err
    row = json.loads((tmp_path / "b" / "report.json").read_text())["artifacts"][0]
    ran = {a["name"]: a for a in report["artifacts"]}["student@fold_bn"]
    assert row["accuracy"] == ran["accuracy"] and row["params"] == ran["params"] and row["macs"] == ran["macs"]
    assert row["peak_rss_bytes"] and row["peak_rss_bytes"] > 0


def test_resume_after_the_fold_stage(fold_bn, fold_run, tmp_path, capsys):
    """Killed during the training after fold_bn: the resume rebuilds the folded student from its
    checkpoint, loads the epoch file into it, and reaches the uninterrupted run's report. A per-epoch
    file replaced by a non-tensor pickle is one line naming it."""
    ref_dir, ref_report = fold_run
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(fold_recipe(), sort_keys=False))
    out = tmp_path / "run"
    kill_during(recipe_file, out, "train student epoch 2/3", plugins=["tests.plugins.fold_bn"])
    epoch_file = out / "resume" / "03-1.pt"
    assert (out / "checkpoints" / "02-fold_bn" / "student.pt").is_file() and epoch_file.is_file()

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    with open(broken / "resume" / "03-1.pt", "wb") as fh:
        pickle.dump({"epoch": 1, "model": {"0.weight": object()}}, fh)
    assert main(["run", str(recipe_file), "--resume", str(broken), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(broken / "resume" / "03-1.pt") in err and "delete it" in err and "weights_only=False" not in err

    assert main(["run", str(recipe_file), "--resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    log = (out / "train.log").read_text()
    assert "resumed after stage 2" in log and "train student: resumed after epoch" in log
    assert _stable(json.loads((out / "report.json").read_text())) == _stable(ref_report)
    assert (out / "model.onnx").read_bytes() == (ref_dir / "model.onnx").read_bytes()
