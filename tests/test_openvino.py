"""OpenVINO as a second CPU runtime: it computes what ONNX Runtime computes on our real exported files
(FP32 logits, INT8 classes), `compress bench --runtime` times ONNX files on both and says which served the
deployable student fastest, and an unknown or uninstalled runtime is one line. Tests that run OpenVINO skip
where it is not installed (pip install 'compress[openvino]')."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compress.bench import runtimes
from compress.bench.measure import latency_rows
from compress.cli import main
from compress.context import Artifact
from compress.deploy import Predictor
from compress.errors import CompressError
from compress.pipeline import load_data
from compress.quantization.schemes import probe
from compress.recipe import BenchmarkConfig

# FP32 on two runtimes differs only by summation order (their kernels block and vectorize each conv's
# K-term dot products differently): ~sqrt(K) ulps per layer, a few 1e-7 of the logits' scale here (measured:
# 2.4e-7 on both digits models). 1e-4 leaves room for other CPUs' kernels and stays 40x below bf16's
# rounding (2^-8 = 3.9e-3 per op): a plugin silently running FP32 layers in bf16, which
# INFERENCE_PRECISION_HINT f32 forbids, fails this.
FP32_RTOL = 1e-4
# Our INT8 file is QDQ; both runtimes run its convolutions in integer arithmetic on a scheme exact on this
# CPU (`scheme: auto`), so they differ only where requantization's float rounding (scale folding, ties) moves
# an activation by 1 LSB. Measured here: bit-identical logits, 360/360 classes. 99% (at most 3 of the 360
# test images) leaves room for such flips on near-ties (the student's smallest top-2 margin is ~0.07 logit)
# with another CPU's kernels; a file run with wrong scales or zero points lands near chance (10%).
INT8_MIN_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def openvino():
    return pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def digits_split(digits_run):
    """Every raw test image of the digits run, as the ONNX files take them, and the labels."""
    _, _, recipe = digits_run
    data = load_data(recipe)
    return data.test_x.permute(0, 2, 3, 1).numpy().copy(), data.test_y.numpy(), data


def _logits(path, runtime: str, x: np.ndarray) -> np.ndarray:
    return runtimes.get(runtime).runner(path, 1)(x)


@pytest.mark.parametrize("name", ["teacher.onnx", "model.onnx"])
def test_openvino_fp32_logits_match_onnxruntime(openvino, digits_run, digits_split, name):
    out, _, _ = digits_run
    x, _, _ = digits_split
    assert x.dtype == np.uint8 and "uint8" in Predictor(out / name).session.get_inputs()[0].type  # as shipped
    ort, ov = _logits(out / name, "onnxruntime", x), _logits(out / name, "openvino", x)
    assert ov.shape == ort.shape == (len(x), 10) and ov.dtype == np.float32
    err = np.abs(ov - ort).max() / np.abs(ort).max()
    assert err <= FP32_RTOL, f"{name}: max |OpenVINO - ORT| is {err:.1e} of the logits' scale"


def test_openvino_int8_classes_agree_with_onnxruntime(openvino, digits_run, digits_split):
    out, _, _ = digits_run
    x, y, _ = digits_split
    path = out / "model.int8.onnx"
    scheme = Predictor(path).metadata["int8_scheme"]
    assert probe(scheme).exact  # `scheme: auto`: ORT's kernels compute this file exactly on this CPU
    ort, ov = _logits(path, "onnxruntime", x), _logits(path, "openvino", x)
    agree = float((ov.argmax(1) == ort.argmax(1)).mean())
    assert agree >= INT8_MIN_AGREEMENT, f"OpenVINO and ORT agree on {agree:.1%} of {len(x)} INT8 predictions"
    assert abs((ov.argmax(1) == y).mean() - (ort.argmax(1) == y).mean()) <= 1 - INT8_MIN_AGREEMENT
    # ...and OpenVINO ran it in INT8, as it is (no float fallback), the FP32 file in FP32 (no bf16)
    plugin = runtimes.RUNTIMES.get("openvino")
    assert plugin.layer_precisions(path)["Convolution"] == ["u8"]
    assert plugin.layer_precisions(out / "model.onnx")["Convolution"] == ["f32"]


def test_time_onnx_on_openvino_reports_its_threads(openvino, digits_run, digits_split):
    out, _, _ = digits_run
    x = digits_split[0][:4]
    for threads in (1, 2):
        samples, used = runtimes.timed(out / "model.int8.onnx", x, "openvino", threads, warmup=1, iters=5)
        assert used == threads and len(samples) == 5 and all(s > 0 for s in samples)
    assert len(runtimes.time_onnx(out / "model.onnx", x, "openvino", iters=3)) == 3
    assert "openvino" in runtimes.RUNTIMES.names() and openvino.__version__.startswith(runtimes.versions()["openvino"])


def test_bench_times_onnx_files_on_both_runtimes_and_names_the_fastest(openvino, digits_run, tmp_path, capsys):
    out, _, _ = digits_run
    argv = ["bench", str(out), "--runtime", "onnxruntime,openvino", "--threads", "1", "--batch-sizes", "1,4"]
    assert main([*argv, "--iters", "3", "--warmup", "0", "--devices", "cpu", "--out", str(tmp_path / "b")]) == 0
    console = capsys.readouterr().err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    arts = {a["name"]: a for a in report["artifacts"]}
    assert set(arts) == {"teacher.onnx", "model.onnx", "model.int8.onnx"}  # --runtime names no torch runtime
    for art in arts.values():
        got = sorted((r["runtime"], r["batch_size"], r["threads"]) for r in art["latency"])
        assert got == [("onnxruntime", 1, 1), ("onnxruntime", 4, 1), ("openvino", 1, 1), ("openvino", 4, 1)]
    assert report["environment"]["openvino"] == runtimes.RUNTIMES.get("openvino").version()
    md = (tmp_path / "b" / "report.md").read_text()
    assert "| openvino p50 ms (bs=1) |" in md and f"openvino {report['environment']['openvino']}" in md
    assert "timed on onnxruntime, openvino; the summary's CPU p50 columns are onnxruntime" in md
    int8 = {(r["runtime"], r["batch_size"]): r["p50_ms"] for r in arts["model.int8.onnx"]["latency"]}
    assert "Fastest runtime for `model.int8.onnx` (the deployable student)" in md
    for bs in (1, 4):
        first, second = sorted(("onnxruntime", "openvino"), key=lambda rt: int8[rt, bs])
        line = f"batch {bs}: {first} {int8[first, bs]:.3f} ms < {second} {int8[second, bs]:.3f} ms"
        assert f"- {line}\n" in md and line in console
    assert "| model.int8.onnx | cpu | openvino | 4 | 1 |" in md
    # One runtime alone: only its rows, and no "fastest" line to draw.
    argv = ["bench", str(out / "model.int8.onnx"), "--runtime", "openvino", "--batch-sizes", "1", "--iters", "2"]
    assert main([*argv, "--devices", "cpu", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    alone = json.loads((tmp_path / "c" / "report.json").read_text())["artifacts"][0]["latency"]
    assert {r["runtime"] for r in alone} == {"openvino"}
    assert "Fastest runtime" not in (tmp_path / "c" / "report.md").read_text()


def test_compress_env_shows_the_openvino_version(openvino, capsys):
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["openvino"] == runtimes.RUNTIMES.get("openvino").version() and openvino.__version__.startswith(
        env["openvino"]
    )


class NotInstalled:
    """A real runtime entry for a package this machine lacks: what `available()` says is all it does."""

    name = "notinstalled"

    def available(self) -> str | None:
        return "notinstalled is not installed: pip install notinstalled"

    def version(self) -> str | None:
        return None

    def runner(self, path, threads):  # pragma: no cover - never reached: available() refuses first
        raise AssertionError("a runtime that is not installed was run")


@pytest.fixture
def missing_runtime():
    runtimes.RUNTIMES.register(NotInstalled.name)(entry := NotInstalled())
    yield entry
    del runtimes.RUNTIMES.entries[NotInstalled.name]


BAD_RUNTIME = {
    "typo": ("openvin", "--runtime: unknown runtime 'openvin'; did you mean 'openvino'?"),
    "unknown": ("tensorflow", "(choose from onnxruntime, openvino, torch, torch-compile)"),
    "not installed": ("onnxruntime,notinstalled", "--runtime: notinstalled is not installed: pip install notinstalled"),
}


@pytest.mark.parametrize("case", BAD_RUNTIME)
def test_bad_runtime_is_one_line(case, digits_run, tmp_path, capsys, request):
    out, _, _ = digits_run
    if case == "not installed":
        request.getfixturevalue("missing_runtime")
    value, needle = BAD_RUNTIME[case]
    code = main(["bench", str(out / "model.onnx"), "--runtime", value, "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "b").exists()


def test_a_runtime_that_is_not_installed_is_refused_or_skipped_with_a_note(missing_runtime, digits_run):
    out, _, recipe = digits_run
    feed = np.zeros((1, 8, 8, 1), np.uint8)
    with pytest.raises(CompressError, match="^notinstalled is not installed: pip install notinstalled$"):
        runtimes.time_onnx(out / "model.onnx", feed, "notinstalled")
    with pytest.raises(CompressError, match="^benchmark.runtimes: unknown runtime 'nope'"):
        runtimes.check(["onnxruntime", "nope"], "benchmark.runtimes")
    # A run's benchmark (validated before training) still measures what it can if the package went away.
    cfg = BenchmarkConfig(batch_sizes=[1], warmup=0, iters=2, threads=1, devices=["cpu"])
    cfg = cfg.model_copy(update={"runtimes": ["onnxruntime", "notinstalled"]})
    art = Artifact("m", "student", "onnx", "fp32", out / "model.onnx", "test")
    rows, notes = latency_rows(art, load_data(recipe), cfg)
    assert [r["runtime"] for r in rows] == ["onnxruntime"]
    assert "cpu: notinstalled is not installed: pip install notinstalled; not measured" in notes


def test_benchmark_runtimes_default_to_onnxruntime_and_are_listed_once():
    assert BenchmarkConfig().runtimes == ["onnxruntime"]
    assert BenchmarkConfig(runtimes=["openvino", "onnxruntime", "openvino"]).runtimes == ["openvino", "onnxruntime"]
    for bad in ([], ["Open VINO"]):
        with pytest.raises(ValueError, match="runtimes"):
            BenchmarkConfig(runtimes=bad)
