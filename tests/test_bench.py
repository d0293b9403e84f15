"""`compress bench` on real files: ONNX models, checkpoints and whole runs; MACs; threads; errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from compress.bench.measure import latency_rows
from compress.bench.size import onnx_macs
from compress.cli import main
from compress.context import Artifact
from compress.onnx_utils import session
from compress.pipeline import load_data
from compress.recipe import BenchmarkConfig
from compress.stages.export import export_onnx
from compress.stages.prune import count

RESNET18_GMACS = 1.82  # torchvision's published cost of resnet18 at 224x224 (conv + fc)


@pytest.fixture(scope="module")
def benched(digits_run, tmp_path_factory):
    out, _, _ = digits_run
    dest = tmp_path_factory.mktemp("bench") / "b"
    argv = ["bench", str(out), "--threads", "1,2", "--batch-sizes", "1,4", "--iters", "5", "--warmup", "1"]
    assert main([*argv, "--devices", "cpu", "--out", str(dest), "--quiet"]) == 0
    return json.loads((dest / "report.json").read_text()), dest


def test_bench_measures_every_artifact_of_a_run(benched, digits_run):
    report, dest = benched
    _, run_report, _ = digits_run
    names = [a["name"] for a in report["artifacts"]]
    assert names == ["teacher@train", "teacher.onnx", "student@distill", "model.onnx", "model.int8.onnx"]
    assert report["data"]["name"] == "digits" and report["data"]["source"].endswith("recipe.resolved.yaml")
    from_run = {a["name"]: a for a in run_report["artifacts"]}
    for art in report["artifacts"]:
        assert 0 < art["accuracy"] <= art["top5"] <= 1
        assert 0 < art["gzip_bytes"] and art["size_bytes"] > 0 and art["macs"] > 0 and art["params"] > 0
        assert art["peak_rss_bytes"] > 1_000_000  # a fresh process loading and running it (Linux /proc)
        if art["name"] in from_run:  # the same files, measured the same way, give the same top-1
            assert art["accuracy"] == from_run[art["name"]]["accuracy"]
        lat = art["latency"]
        assert sorted((r["threads"], r["batch_size"]) for r in lat) == [(1, 1), (1, 4), (2, 1), (2, 4)]
        for r in lat:
            assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput"] > 0 and r["iters"] == 5
    mem = {a["name"]: a["peak_rss_bytes"] for a in report["artifacts"]}
    assert mem["teacher.onnx"] > mem["model.onnx"]  # 370k vs 24k parameters
    assert (dest / "report.html").is_file() and (dest / "accuracy_vs_latency.png").is_file()


def test_onnx_macs_match_torch_and_published_counts(tmp_path):
    model = torchvision.models.resnet18(num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    torch_macs, _ = count(model, x)
    export_onnx(model, x, tmp_path / "r18.onnx", 18)
    ours = onnx_macs(tmp_path / "r18.onnx")
    assert torch_macs == pytest.approx(RESNET18_GMACS * 1e9, rel=0.01)
    assert ours == pytest.approx(RESNET18_GMACS * 1e9, rel=0.01)
    # ONNX counts conv + fc only (BatchNorm is folded into the convs), so it is the smaller by a hair.
    assert ours <= torch_macs


def test_onnx_macs_of_quantized_and_pruned_files_match_their_fp32_source(digits_run):
    out, report, _ = digits_run
    fp32, int8 = onnx_macs(out / "model.onnx"), onnx_macs(out / "model.int8.onnx")
    assert fp32 == int8 > 0
    torch_macs = next(a["macs"] for a in report["artifacts"] if a["name"] == "student@distill")
    assert fp32 == pytest.approx(torch_macs, rel=0.1)


def test_io_binding_runner_gives_the_same_logits(digits_run):
    """The GPU timing path (IO binding) exercised on the CPU device: same outputs as a plain run."""
    import numpy as np

    from compress.bench.measure import bound_runner
    from compress.deploy import Predictor

    out, _, recipe = digits_run
    pixels = load_data(recipe).test_x[:8].permute(0, 2, 3, 1).numpy().copy()
    sess = session(out / "model.int8.onnx")
    binding = bound_runner(sess, pixels, "cpu")()
    got = binding.copy_outputs_to_cpu()[0]
    assert np.array_equal(got, Predictor(out / "model.int8.onnx").logits(pixels))


def test_peak_memory_does_not_depend_on_what_was_measured_before(benched, digits_run, tmp_path):
    report, _ = benched
    out, _, _ = digits_run
    argv = ["bench", str(out / "model.onnx"), "--iters", "2", "--batch-sizes", "1,4", "--devices", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "alone"), "--quiet"]) == 0
    alone = json.loads((tmp_path / "alone" / "report.json").read_text())["artifacts"][0]["peak_rss_bytes"]
    after_teacher = next(a["peak_rss_bytes"] for a in report["artifacts"] if a["name"] == "model.onnx")
    assert alone == pytest.approx(after_teacher, rel=0.15)


class Ops(nn.Module):
    """Each op kind the ONNX MAC counter knows, with MACs computable by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)  # out 16x8x8, 2*3*3 MACs each
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)  # each of 16x8x8 inputs scatters 4*2*2
        self.fc = nn.Linear(4 * 16 * 16, 10)  # Gemm, transB
        self.register_buffer("vec", torch.randn(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.up(self.grouped(x)).flatten(1))
        return y @ torch.randn(10, 10) + (y @ self.vec)[:, None]  # MatMul (2-D and vector weights)


def test_onnx_macs_by_hand_for_grouped_transposed_gemm_and_matmul(tmp_path):
    export_onnx(Ops().eval(), torch.randn(1, 8, 8, 8), tmp_path / "ops.onnx", 18)
    expected = 16 * 8 * 8 * 2 * 3 * 3 + 16 * 8 * 8 * 4 * 2 * 2 + 10 * 1024 + 10 * 10 + 10
    assert onnx_macs(tmp_path / "ops.onnx") == expected


class ThreadSpy(nn.Module):
    """A real (tiny) model that records the torch thread count it runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.seen: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add(torch.get_num_threads())
        return self.fc(x.flatten(1))


def test_thread_settings_are_honoured(digits_run):
    out, _, recipe = digits_run
    data = load_data(recipe)
    cfg = BenchmarkConfig(batch_sizes=[2], warmup=0, iters=3, threads=[1, 2], devices=["cpu"])
    spy = ThreadSpy()
    rows, _ = latency_rows(Artifact("spy", "student", "torch", "fp32", out, "test", model=spy), data, cfg)
    assert spy.seen == {1, 2} and [r["threads"] for r in rows] == [1, 2]
    rows, _ = latency_rows(Artifact("m", "student", "onnx", "fp32", out / "model.onnx", "test"), data, cfg)
    assert [r["threads"] for r in rows] == [1, 2]
    # ...and ORT really starts that many: its intra-op pool adds (threads - 1) OS threads to the process.
    tasks = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    before = tasks()
    one = session(out / "model.onnx", threads=1)
    after_one = tasks()
    three = session(out / "model.onnx", threads=3)
    assert (after_one - before, tasks() - after_one) == (0, 2)
    del one, three


def test_bench_single_files(digits_run, tmp_path, capsys):
    out, run_report, recipe = digits_run
    # An ONNX file alone: its metadata names the dataset.
    assert main(["bench", str(out / "model.int8.onnx"), "--iters", "3", "--devices", "cpu", "--out",
                 str(tmp_path / "a"), "--quiet", "--batch-sizes", "1"]) == 0  # fmt: skip
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    assert a["data"]["source"].endswith("metadata") and a["artifacts"][0]["precision"] == "int8"
    # A plain state_dict names its architecture after a colon.
    model = torch.load(out / "checkpoints" / "02-distill" / "student.pt", weights_only=True)["state_dict"]
    torch.save(model, tmp_path / "plain.pt")
    argv = ["bench", f"{tmp_path / 'plain.pt'}:digits_student", "--data", "digits", "--iters", "3"]
    assert main([*argv, "--devices", "cpu", "--runtime", "torch", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    distill = next(x for x in run_report["artifacts"] if x["name"] == "student@distill")
    assert b["artifacts"][0]["accuracy"] == distill["accuracy"] and b["artifacts"][0]["macs"] == distill["macs"]
    # A bench and a run side by side.
    assert main(["report", str(out), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    assert "| b | plain |" in (tmp_path / "cmp" / "report.md").read_text()
    capsys.readouterr()


BENCH_ERRORS = {
    "missing": (["{tmp}/nope.onnx"], "no such file or run directory"),
    "plain state_dict": (["{tmp}/plain.pt", "--data", "digits"], "does not name its model"),
    "cifar without root": (["{run}/model.onnx", "--data", "cifar10"], "root"),
    "class mismatch": (["{run}/model.onnx", "--data", "synthetic"], "but the data has"),
    "not onnx": (["{tmp}/junk.onnx"], "not a readable ONNX file"),
    "unknown runtime": (["{run}/model.onnx", "--runtime", "tensorflow"], "--runtime"),
    "bad batch sizes": (["{run}/model.onnx", "--batch-sizes", "0"], "batch_sizes"),
    "empty folder": (["{tmp}"], "no .onnx files or checkpoints/"),
    "out holds a report": (["{run}/model.onnx"], "already holds a report; pass --overwrite"),
}


@pytest.mark.parametrize("case", BENCH_ERRORS)
def test_bench_errors_are_one_line(case, digits_run, tmp_path, capsys):
    out, _, _ = digits_run
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    (tmp_path / "junk.onnx").write_text("not onnx")
    args, needle = BENCH_ERRORS[case]
    target = tmp_path / "out"
    if case == "empty folder":
        (tmp_path / "plain.pt").unlink()
        (tmp_path / "junk.onnx").unlink()
    if case == "out holds a report":
        target.mkdir()
        (target / "report.json").write_text("{}")
    argv = ["bench", *(a.format(tmp=tmp_path, run=out) for a in args), "--out", str(target), "--quiet"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and needle in err, err
    if case == "out holds a report":
        assert (target / "report.json").read_text() == "{}"
    else:
        assert not Path(target).exists()


def test_a_checkpoint_in_a_run_benches_with_that_runs_data_and_torch_compile(digits_run, tmp_path):
    out, run_report, _ = digits_run
    ckpt = out / "checkpoints" / "02-distill" / "student.pt"
    argv = ["bench", str(ckpt), "--runtime", "torch,torch-compile", "--devices", "cpu", "--batch-sizes", "2"]
    assert main([*argv, "--iters", "3", "--warmup", "1", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["data"]["source"] == str(out / "recipe.resolved.yaml")
    (art,) = report["artifacts"]
    assert {r["runtime"] for r in art["latency"]} == {"torch", "torch-compile"}
    assert all(r["p50_ms"] > 0 for r in art["latency"])
    distill = next(a for a in run_report["artifacts"] if a["name"] == "student@distill")
    assert art["accuracy"] == distill["accuracy"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_requested_without_a_gpu_is_a_note_not_a_failure(digits_run, tmp_path):
    out, _, _ = digits_run
    argv = ["bench", str(out / "model.onnx"), "--devices", "cuda", "--iters", "2", "--batch-sizes", "1"]
    assert main([*argv, "--out", str(tmp_path / "g"), "--quiet"]) == 0
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert report["artifacts"][0]["latency"] == [] and report["artifacts"][0]["accuracy"] > 0
    assert any("no CUDA device" in n for n in report["notes"])
    assert "no CUDA device" in (tmp_path / "g" / "report.md").read_text()


def test_external_data_outside_the_model_folder_is_refused(digits_run, tmp_path, capsys):
    """A model whose weights point at ../secret.bin is never read: one line from bench and predict."""
    import shutil

    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    out, _, _ = digits_run
    inner = tmp_path / "inner"
    inner.mkdir()
    model = onnx.load(str(out / "model.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.bin", size_threshold=1024)
    onnx.save(model, str(inner / "model.onnx"))
    model = onnx.load(str(inner / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"  # onnx itself refuses to write this; a hostile file has it
    shutil.move(inner / "w.bin", tmp_path / "secret.bin")
    (inner / "model.onnx").write_bytes(model.SerializeToString())
    for argv in (
        ["bench", str(inner / "model.onnx"), "--out", str(tmp_path / "b"), "--quiet"],
        ["predict", str(inner / "model.onnx"), str(tmp_path / "secret.bin")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "escapes model directory" in err, err
    assert not (tmp_path / "b").exists()


def test_a_memory_measurement_that_fails_says_why(digits_run, tmp_path):
    """The fresh process that measures peak memory fails on a plain state_dict (no model name): the
    empty memory column comes with a note (its last stderr line), which the report lists."""
    from compress.bench.measure import batch_of
    from compress.bench.size import peak_rss

    out, _, recipe = digits_run
    state = torch.load(out / "checkpoints" / "02-distill" / "student.pt", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "plain.pt")
    batch = batch_of(load_data(recipe), 2).numpy()
    peak, note = peak_rss("torch", tmp_path / "plain.pt", batch)
    assert peak is None and note.startswith("plain.pt: peak memory not measured: the measuring process failed: ")
    assert "CompressError" in note and "does not name its model" in note and "\n" not in note
    names = {"model": "digits_student", "num_classes": 10, "in_channels": 1}
    named, none = peak_rss("torch", tmp_path / "plain.pt", batch, **names)  # named, it is measured
    assert named > 1_000_000 and none is None
