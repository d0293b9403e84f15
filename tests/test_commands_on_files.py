"""`compress quantize` and `compress export` on files users already have: a plain torch.onnx.export of
a small CNN trained on digits, a compress checkpoint, a plain state_dict. Real files, real ORT sessions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from compress.cli import main
from compress.data import DATASETS
from compress.deploy import ModelInfo
from compress.onnx_utils import run, session
from tests.test_onnx_api import plain_export, trained_digits_cnn


@pytest.fixture(scope="module")
def digits():
    return DATASETS.get("digits")().load()


@pytest.fixture(scope="module")
def plain(digits, tmp_path_factory):
    return plain_export(trained_digits_cnn(digits), digits, tmp_path_factory.mktemp("plain") / "cnn.onnx")


@pytest.fixture(scope="module")
def quantized(plain, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "report"
    argv = ["quantize", str(plain), "--data", "digits", "--out", str(out), "--iters", "5", "--warmup", "1"]
    assert main([*argv, "--quiet", "--calibration-batches", "4"]) == 0
    return out


def test_quantize_a_plain_onnx_file_reports_both_side_by_side(quantized, plain, digits, capsys):
    report = json.loads((quantized / "report.json").read_text())
    fp32, int8 = report["artifacts"]
    assert (fp32["name"], fp32["precision"], int8["name"], int8["precision"]) == (
        "cnn.onnx", "fp32", "cnn.int8.onnx", "int8"
    )  # fmt: skip
    assert fp32["accuracy"] > 0.85 and abs(fp32["accuracy"] - int8["accuracy"]) < 0.03
    assert int8["size_bytes"] < fp32["size_bytes"] == plain.stat().st_size
    assert fp32["latency"][0]["p50_ms"] > 0 and int8["latency"][0]["p50_ms"] > 0
    assert any("digits's mean/std" in n for n in report["notes"])  # which normalization, said
    assert report["stages"][0]["metrics"]["calibration_images"] == 4 * 32
    # the INT8 file: same contract (float x in, y logits out), metadata says what it was calibrated on
    path = quantized / "cnn.int8.onnx"
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["y"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["dataset"] == "digits" and json.loads(props["calibration_dataset"])["name"] == "digits"
    info = ModelInfo.from_metadata(props)
    assert info.input_dtype == "float32" and info.mean == pytest.approx(digits.mean)
    logits = run(session(path), info.prepare(digits.test_x[:50].numpy(), layout="nchw"))
    assert (logits.argmax(1) == digits.test_y[:50].numpy()).mean() > 0.8
    assert not list(quantized.parent.glob(".report*"))  # no staging directory left
    capsys.readouterr()
    assert main(["report", str(quantized)]) == 0
    assert "cnn.int8.onnx" in (quantized / "report.md").read_text()


def test_quantize_user_errors_are_one_line_and_write_nothing(plain, quantized, tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx")
    x = torch.randn(2, 64)
    torch.onnx.export(torch.nn.Linear(64, 10), (x,), str(tmp_path / "flat.onnx"), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("b")},), external_data=False)  # fmt: skip
    cases = {
        "missing": ([str(tmp_path / "missing.onnx"), "--data", "digits"], "no such file"),
        "not onnx": ([str(tmp_path / "junk.onnx"), "--data", "digits"], "not a readable ONNX file"),
        "out exists": ([str(plain), "--data", "digits", "--out", str(quantized)], "already exists"),
        "rank 2": ([str(tmp_path / "flat.onnx"), "--data", "digits"], "has rank 2"),
        "wrong data": ([str(plain), "--data", "synthetic", "--image-size", "16"], "takes 8x8 images, not 16x16"),
        "unknown data": ([str(plain), "--data", "nosuchdata"], "nosuchdata"),
        "mean only": ([str(plain), "--data", "digits", "--mean", "0.5"], "--mean/--std"),
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for why, (args, text) in cases.items():
        out = ["--out", str(tmp_path / f"out-{why.replace(' ', '-')}")] if "--out" not in args else []
        assert main(["quantize", *args, *out, "--quiet"]) == 2, why
        err = capsys.readouterr().err.strip()
        assert err.startswith("compress: error:") and text in err and "\n" not in err, (why, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no report directory, no INT8 file


def _compress_checkpoint(tmp_path, digits):
    from compress.checkpoint import save_model
    from compress.models import build_model

    torch.manual_seed(0)
    model = build_model("digits_student", digits.num_classes, digits.channels)
    save_model(model, tmp_path / "student.pt", name="digits_student", kwargs={}, num_classes=10, in_channels=1)
    return model.eval(), tmp_path / "student.pt"


def test_export_a_compress_checkpoint_and_a_plain_state_dict(tmp_path, digits, capsys):
    model, ckpt = _compress_checkpoint(tmp_path, digits)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    pixels = digits.test_x[:32]
    with torch.inference_mode():
        ref = model(digits.normalize(pixels)).numpy()
    for args in ([str(ckpt)], [str(tmp_path / "plain.pt"), "--model", "digits_student"]):
        out = tmp_path / f"{len(args)}.onnx"
        assert main(["export", *args, "--data", "digits", "--out", str(out)]) == 0
        assert "argmax agreement 100.0%" in capsys.readouterr().out
        props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert props["model"] == "digits_student" and props["dataset"] == "digits"
        info = ModelInfo.from_metadata(props)
        assert info.input_dtype == "uint8" and info.preprocess_in_graph  # self-describing, as the stage writes
        got = run(session(out), info.prepare(pixels.numpy(), layout="nchw"))
        assert np.abs(got - ref).max() < 1e-4


def test_export_user_errors_are_one_line(tmp_path, digits, capsys):
    model, ckpt = _compress_checkpoint(tmp_path, digits)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    (tmp_path / "taken.onnx").write_bytes(b"")
    cases = {
        "no model": ([str(tmp_path / "plain.pt"), "--data", "digits"], "pass --model"),
        "no data": ([str(ckpt)], "--data"),
        "missing": ([str(tmp_path / "nope.pt"), "--data", "digits"], "no such file"),
        "exists": ([str(ckpt), "--data", "digits", "--out", str(tmp_path / "taken.onnx")], "already exists"),
        "channels": ([str(ckpt), "--data", "synthetic"], "takes 1-channel images but the data has 3"),
    }
    for why, (args, text) in cases.items():
        assert main(["export", *args]) == 2, why
        err = capsys.readouterr().err.strip()
        assert err.startswith("compress: error:") and text in err and "\n" not in err, (why, err)
    assert not list(tmp_path.glob("*.onnx.*")) and not list(tmp_path.glob(".*"))


def test_quantize_the_default_torch_onnx_export(digits, tmp_path):
    """``torch.onnx.export(model, (x,), path)`` with no options: the batch axis fixed at 1 (baked into its
    reshapes) and the weights in ``path.data``. Calibrated, evaluated and timed at batch 1; sized with
    the external data."""
    model = trained_digits_cnn(digits)
    src = tmp_path / "cnn.onnx"
    torch.onnx.export(model, (digits.example_input(1),), str(src))
    assert session(src).get_inputs()[0].shape[0] == 1
    data_file = tmp_path / "cnn.onnx.data"
    out = tmp_path / "report"
    argv = ["quantize", str(src), "--data", "digits", "--out", str(out), "--iters", "5", "--warmup", "1"]
    assert main([*argv, "--quiet", "--calibration-batches", "4", "--batch-sizes", "1,8"]) == 0
    report = json.loads((out / "report.json").read_text())
    fp32, int8 = report["artifacts"]
    on_disk = src.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0)
    assert fp32["size_bytes"] == on_disk and int8["size_bytes"] < on_disk
    assert fp32["accuracy"] > 0.85 and abs(fp32["accuracy"] - int8["accuracy"]) < 0.03  # every test image scored
    assert [r["batch_size"] for r in fp32["latency"]] == [1] == [r["batch_size"] for r in int8["latency"]]
    assert any("exported for batch 1 only" in n for n in report["notes"])
    assert report["stages"][0]["metrics"]["calibration_images"] == 4 * 32  # as many images, one at a time


def test_export_never_runs_a_dataset_function_a_run_names(digits, tmp_path, monkeypatch, capsys):
    """A run directory is data: the user dataset its recorded recipe names (code) is not imported,
    nor is a module planted beside it found by a later import."""
    from compress.checkpoint import save_model
    from compress.models import build_model

    run = tmp_path / "run"
    (run / "checkpoints" / "01-train").mkdir(parents=True)
    ckpt = run / "checkpoints" / "01-train" / "student.pt"
    save_model(build_model("digits_student", 10, 1), ckpt, name="digits_student", kwargs={}, num_classes=10,
               in_channels=1)  # fmt: skip
    recipe = {"name": "r", "data": {"name": "plantedmod:load"}, "student": {"model": "digits_student"},
              "stages": [{"kind": "export"}]}  # fmt: skip
    (run / "recipe.resolved.yaml").write_text(json.dumps(recipe))
    marker = tmp_path / "ran"
    (run / "plantedmod.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef load(): pass\n")
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "s.onnx")]) == 2
    err = capsys.readouterr().err
    assert "user dataset 'plantedmod:load'" in err and "--data plantedmod:load" in err and len(err.splitlines()) == 1
    assert main(["bench", str(run), "--quiet", "--out", str(tmp_path / "b")]) == 2
    assert not marker.exists() and not (tmp_path / "s.onnx").exists()
    assert main(["export", str(ckpt), "--data", "digits", "--out", str(tmp_path / "s.onnx")]) == 0
    assert not marker.exists()  # and nothing of the run's folder became importable


def test_quantize_overwrite_replaces_only_a_report_directory(plain, tmp_path, capsys):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    argv = ["quantize", str(plain), "--data", "digits", "--overwrite", "--quiet"]
    assert main([*argv, "--out", str(precious)]) == 2
    assert "is not a compress report directory" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "mine"
    inside = plain.parent  # the folder holding the model itself, made to look like a report
    (inside / "report.json").write_text("{}")
    assert main([*argv, "--out", str(inside)]) == 2
    assert "which --overwrite would delete" in capsys.readouterr().err and plain.is_file()
    (inside / "report.json").unlink()
