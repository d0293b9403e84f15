"""The CLI: every user error is one line on stderr, exit 2, no traceback, no run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compress.cli import main
from compress.data import DATASETS
from compress.models import MODELS
from compress.stages import STAGES


def check_fails_cleanly(capsys, argv: list[str], out: Path, *needles: str) -> str:
    code = main(argv + (["--out", str(out)] if argv[0] == "run" else []))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists(), "a user error must not leave a run directory"
    return lines[0]


def _bad(tiny: dict, path: str, value) -> dict:
    node = tiny
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return tiny


CASES = {
    "unknown stage kind": ("stages.1", {"kind": "distil", "epochs": 1}, ["stages.1", "distil", "'distill'"]),
    "typo'd field": (
        "stages.1",
        {"kind": "distill", "epochs": 1, "optim": {"lrr": 2}},
        ["stages.1.optim.lrr", "unknown field", "did you mean 'lr'"],
    ),
    "out of range ratio": ("stages.2.ratio", 1.5, ["stages.2.ratio", "less than 1", "1.5"]),
    "negative epochs": ("stages.0.epochs", -3, ["stages.0.epochs", "greater than or equal to 1"]),
    "zero temperature": ("stages.1.kd", {"temperature": 0}, ["stages.1.kd.temperature", "greater than 0"]),
    "old flat spelling": ("stages.1.lr", 0.1, ["stages.1.lr", "unknown field", "moved to optim.lr"]),
    "old prune fine-tune spelling": (
        "stages.2",
        {"kind": "prune", "finetune_epochs": 2, "distill": True},
        ["stages.2.finetune_epochs", "moved to finetune.epochs", "stages.2.distill", "replaced by finetune.kd"],
    ),
    "KD setting without KD": (
        "stages.2",
        {"kind": "prune", "finetune": {"epochs": 1, "temperature": 2}},
        ["stages.2.finetune.temperature", "unknown field"],
    ),
    "shorthand setting a loss lacks": (
        "stages.1.kd",
        {"loss": "ce", "alpha": 0.5},
        ["stages.1.kd", "alpha has no effect"],
    ),
    "wrong type": ("stages.0.epochs", "many", ["stages.0.epochs", "valid integer"]),
    "unknown model": ("student.model", "resnet21", ["student.model", "unknown model 'resnet21'"]),
    "unknown dataset": ("data", {"name": "cifar100"}, ["data", "cifar100"]),
    "missing data root": ("data", {"name": "cifar10", "root": "/nonexistent/cifar"}, ["data", "does not exist"]),
    "missing checkpoint": ("teacher.checkpoint", "/nonexistent/t.pt", ["teacher.checkpoint", "does not exist"]),
    "unknown top-level key": ("benchmarks", {}, ["benchmarks", "unknown field", "did you mean 'benchmark'"]),
    "unknown loss": ("stages.1.kd", {"loss": "hintn"}, ["stages.1.kd", "did you mean hinton"]),
    "unknown loss term": (
        "stages.1",
        {"kind": "distill", "epochs": 1, "kd": {"losses": [{"name": "dkdd"}]}},
        ["stages.1.kd.losses.0", "'dkdd'", "'dkd'"],
    ),
    "typo'd loss term field": (
        "stages.1",
        {"kind": "distill", "epochs": 1, "kd": {"losses": [{"name": "dkd", "betta": 8}]}},
        ["stages.1.kd.losses.0.betta", "unknown field", "did you mean 'beta'"],
    ),
    "loss and losses": (
        "stages.1",
        {"kind": "distill", "epochs": 1, "kd": {"temperature": 2, "losses": [{"name": "ce"}]}},
        ["stages.1.kd", "give losses: or the shorthand temperature, not both"],
    ),
    "feature loss as shorthand": ("stages.1.kd", {"loss": "attention"}, ["stages.1.kd", "names layers", "losses:"]),
    "layer pairs missing": (
        "stages.1",
        {"kind": "distill", "epochs": 1, "kd": {"losses": [{"name": "fitnets"}]}},
        ["stages.1.kd.losses.0.pairs", "required"],
    ),
    "cached teacher features": (
        "stages.1",
        {
            "kind": "distill",
            "epochs": 1,
            "kd": {
                "cache_teacher": True,
                "losses": [{"name": "attention", "pairs": [{"student": "layer1", "teacher": "layer1"}]}],
            },
        },
        ["stages.1.kd", "cache_teacher", "attention needs teacher features"],
    ),
    "extra teacher without weights": (
        "stages.1",
        {"kind": "distill", "epochs": 1, "kd": {"teachers": [{"model": "teacher"}, {"model": "resnet20"}]}},
        ["stages.1.kd.teachers.1", "needs weights (checkpoint:"],
    ),
    "zero teacher weight": ("stages.1.kd", {"teachers": [{"weight": 0}]}, ["stages.1.kd.teachers.0.weight"]),
    "quantize before export": ("stages", [{"kind": "quantize"}], ["stages.0 (quantize) needs onnx"]),
    "two pruning targets": ("stages.2.target_macs", 0.5, ["stages.2", "give one of ratio, target_macs"]),
    "typo'd pruning target": ("stages.2.target_mac", 0.5, ["stages.2.target_mac", "did you mean 'target_macs'"]),
    "unknown importance": ("stages.2.method", "taylr", ["stages.2.method", "did you mean taylor"]),
    "per-layer ratio out of range": ("stages.2.ratios", {"layer1.*": 1.0}, ["stages.2.ratios", "must be in [0, 1)"]),
    "agp without fine-tuning": (
        "stages.2",
        {"kind": "sparsify", "sparsity_schedule": "agp"},
        ["stages.2", "add finetune: {epochs: N}"],
    ),
    "agp setting without agp": (
        "stages.2",
        {"kind": "sparsify", "begin_epoch": 1, "finetune": {"epochs": 2}},
        ["stages.2", "begin_epoch has no effect without sparsity_schedule: agp"],
    ),
    "sparsity out of range": ("stages.2", {"kind": "sparsify", "sparsity": 1}, ["stages.2.sparsity", "less than 1"]),
    "distribution calibration, asymmetric": (
        "stages.4.calibration",
        "distribution",
        ["stages.4", "set symmetric_activations: true"],
    ),
    "accuracy budget without static INT8": (
        "stages.4",
        {"kind": "quantize", "mode": "dynamic", "max_accuracy_drop": 0.01},
        ["stages.4", "max_accuracy_drop needs mode: static"],
    ),
    "qat with a feature loss": (
        "stages.4",
        {
            "kind": "qat",
            "kd": {"losses": [{"name": "fitnets", "pairs": [{"student": "layer1", "teacher": "layer1"}]}]},
        },
        ["stages.4", "qat distills from logits only; fitnets"],
    ),
    "unknown quantize mode": ("stages.4.mode", "int4", ["stages.4.mode", "'static', 'dynamic' or 'fp16'"]),
    "unknown INT8 scheme": ("stages.4.scheme", "u8s9", ["stages.4.scheme", "'auto'", "'u8s8_reduce_range'"]),
    "replaced quantize field": ("stages.4.activation_type", "int8", ["stages.4.activation_type", "replaced by scheme"]),
    "dynamic with int8 activations": (
        "stages.4",
        {"kind": "quantize", "mode": "dynamic", "scheme": "s8s8"},
        ["stages.4", "dynamic quantizes activations to uint8"],
    ),
    "qat with a scheme it cannot train": ("stages.4", {"kind": "qat", "scheme": "u8u8"}, ["stages.4.scheme", "'auto'"]),
    "head ratio out of range": ("stages.2.head_ratio", 1.0, ["stages.2.head_ratio", "less than 1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_errors(case, tiny, write_recipe, tmp_path, capsys):
    path, value, needles = CASES[case]
    recipe = write_recipe(_bad(tiny, path, value))
    line = check_fails_cleanly(capsys, ["run", str(recipe)], tmp_path / "out", *needles)
    assert line.startswith(f"compress: error: {recipe}")


def test_distill_without_teacher(tiny, write_recipe, tmp_path, capsys):
    tiny["teacher"] = None
    tiny["stages"] = tiny["stages"][1:]
    check_fails_cleanly(capsys, ["run", str(write_recipe(tiny))], tmp_path / "out", "stages.0 (distill) needs teacher")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("name: [unclosed", "invalid YAML"),
        ("", "the recipe is empty"),
        ("- just\n- a list\n", "a recipe must be a mapping"),
        ("name: !!python/object/apply:os.system ['echo owned']\n", "invalid YAML"),
    ],
)
def test_malformed_yaml(text, needle, write_recipe, tmp_path, capsys):
    check_fails_cleanly(capsys, ["run", str(write_recipe(text))], tmp_path / "out", needle)


def test_missing_recipe_file(tmp_path, capsys):
    check_fails_cleanly(capsys, ["run", str(tmp_path / "nope.yaml")], tmp_path / "out", "no such file")


def test_bad_set_override(tiny, write_recipe, tmp_path, capsys):
    recipe = str(write_recipe(tiny))
    check_fails_cleanly(capsys, ["run", recipe, "--set", "stages.7.epochs=1"], tmp_path / "out", "index 7 out of range")
    check_fails_cleanly(
        capsys,
        ["run", recipe, "--set", "stages.0.optim.lr=-1"],
        tmp_path / "out",
        "stages.0.optim.lr",
        "greater than 0",
    )


def test_unknown_cli_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "x.yaml", "--bogus"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_mismatched_checkpoint(tiny, write_recipe, tmp_path, capsys):
    wrong = tmp_path / "resnet32.pt"
    from compress.models import build_model

    torch.save(build_model("resnet32", 10).state_dict(), wrong)
    tiny["teacher"]["checkpoint"] = str(wrong)
    check_fails_cleanly(
        capsys,
        ["run", str(write_recipe(tiny))],
        tmp_path / "out",
        "teacher.checkpoint",
        "does not match the model",
        "unexpected",
    )
    torch.save(build_model("resnet8x4", 3).state_dict(), wrong)  # right architecture, wrong class count
    tiny["teacher"]["head"] = "keep"  # (by default a head for other classes is re-initialized, with a notice)
    check_fails_cleanly(
        capsys,
        ["run", str(write_recipe(tiny))],
        tmp_path / "out",
        "teacher.checkpoint",
        "fc.weight",
        "(3, 256)",
        "(10, 256)",
    )


def test_checkpoint_with_pickled_code_is_refused(tiny, write_recipe, tmp_path, capsys):
    evil = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"w": Evil()}, evil)
    tiny["teacher"]["checkpoint"] = str(evil)
    check_fails_cleanly(
        capsys, ["run", str(write_recipe(tiny))], tmp_path / "out", "teacher.checkpoint", "weights-only"
    )


def test_model_that_cannot_take_the_input(tiny, write_recipe, tmp_path, capsys):
    tiny["student"] = {"model": "torchvision:vit_b_16", "kwargs": {"image_size": 224}}  # data is 16x16
    check_fails_cleanly(capsys, ["run", str(write_recipe(tiny))], tmp_path / "out", "student.model", "cannot run on")


def test_prune_ignore_pattern_matching_nothing(tiny, write_recipe, tmp_path, capsys):
    tiny["stages"][2]["ignore"] = ["layer4.*"]
    check_fails_cleanly(
        capsys, ["run", str(write_recipe(tiny))], tmp_path / "out", "stages.2.ignore", "'layer4.*'", "matches no module"
    )


def test_head_ratio_without_attention(tiny, write_recipe, tmp_path, capsys):
    tiny["stages"][2]["head_ratio"] = 0.5
    check_fails_cleanly(
        capsys, ["run", str(write_recipe(tiny))], tmp_path / "out", "stages.2.head_ratio", "no attention layer"
    )


def test_data_root_that_is_not_an_archive(tiny, write_recipe, tmp_path, capsys):
    junk = tmp_path / "cifar.tar.gz"
    junk.write_text("not an archive")
    tiny["data"] = {"name": "cifar10", "root": str(junk)}
    check_fails_cleanly(capsys, ["run", str(write_recipe(tiny))], tmp_path / "out", "data.root", "neither a folder nor")


def test_existing_out_dir_is_not_overwritten(tiny, write_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    code = main(["run", str(write_recipe(tiny)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and (out / "precious.txt").read_text() == "keep"
    code = main(["run", str(write_recipe(tiny)), "--out", str(out), "--overwrite"])
    assert code == 2 and "not a compress run directory" in capsys.readouterr().err
    assert (out / "precious.txt").exists()


def test_validate_prints_the_resolved_recipe(tiny, write_recipe, capsys):
    assert main(["validate", str(write_recipe(tiny)), "--set", "stages.1.kd.temperature=2.5"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    kd = resolved["stages"][1]["kd"]
    assert not {"loss", "temperature", "alpha"} & set(kd)  # one spelling in the resolved recipe
    (term,) = kd["losses"]  # the shorthand, spelled out
    assert term == {"name": "hinton", "weight": 1.0, "temperature": 2.5, "alpha": 0.9}  # defaults filled in


def test_list_shows_every_registry_entry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in STAGES.names() + MODELS.names() + DATASETS.names():
        assert name in out


def test_schema_is_json(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "stages" in schema["properties"]


def test_console_script_and_module_entry_points(tiny, write_recipe, tmp_path):
    recipe = write_recipe(_bad(tiny, "stages.2.ratio", 2))
    for cmd in ([sys.executable, "-m", "compress"], [str(Path(sys.executable).parent / "compress")]):
        proc = subprocess.run(
            cmd + ["run", str(recipe), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "stages.2.ratio" in proc.stderr and not (tmp_path / "o").exists()


def test_more_hostile_inputs_through_the_cli(tiny, write_recipe, tmp_path, capsys):
    """Non-file paths, huge numbers, an unwritable --out, a dataset with no images: one line each."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    bad = _bad(json.loads(json.dumps(tiny)), "teacher.checkpoint", str(folder))
    check_fails_cleanly(capsys, ["run", str(write_recipe(bad))], tmp_path / "out", "teacher.checkpoint", "not a file")
    (tmp_path / "empty.pt").write_bytes(b"")
    bad = _bad(json.loads(json.dumps(tiny)), "teacher.checkpoint", str(tmp_path / "empty.pt"))
    check_fails_cleanly(capsys, ["run", str(write_recipe(bad))], tmp_path / "out", "not a PyTorch checkpoint file")
    bad = _bad(json.loads(json.dumps(tiny)), "stages.0.epochs", 10**30)
    check_fails_cleanly(capsys, ["run", str(write_recipe(bad))], tmp_path / "out", "stages.0.epochs", "less than")
    code = main(["run", str(write_recipe(tiny)), "--out", "/dev/null/run"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--out: cannot write" in err
    for split in ("train/cat", "val/cat"):
        (tmp_path / "imgs" / split).mkdir(parents=True)
    bad = _bad(json.loads(json.dumps(tiny)), "data", {"name": "imagefolder", "root": str(tmp_path / "imgs")})
    check_fails_cleanly(capsys, ["run", str(write_recipe(bad))], tmp_path / "out", "data.root", "no images")


def test_version_prints_it_and_exits_0(capsys):
    from compress import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"compress {__version__}"
    for cmd in ([sys.executable, "-m", "compress"], [str(Path(sys.executable).parent / "compress")]):
        proc = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == f"compress {__version__}", proc.stderr
