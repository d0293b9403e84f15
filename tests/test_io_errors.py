"""Bad input and failed writes at every entry point, on real files: one line naming the file, exit 2,
nothing half-written, and no code run because a file named it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from compress import metadata
from compress.checkpoint import save_model
from compress.cli import main
from compress.data import DATASETS
from compress.data.images import cache_dir, load_cached
from compress.errors import CompressError
from compress.models import build_model
from compress.stages.export import export_onnx

ROOT = Path(__file__).resolve().parent.parent
BENCH = ["--batch-sizes", "1", "--iters", "1", "--warmup", "0", "--devices", "cpu", "--quiet"]


def one_line(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- damaged ONNX files
@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> Path:
    """An (untrained) digits student exported with the metadata bench and predict read."""
    data = DATASETS.get("digits").model_validate({"name": "digits"}).load()
    root = tmp_path_factory.mktemp("onnx")
    info = metadata.model_info(data, preprocess_in_graph=False, layout="nchw")
    model = build_model("digits_student", data.num_classes, data.channels).eval()
    export_onnx(model, data.normalize(data.test_x[:2]), root / "raw.onnx", 18)
    props = {"dataset": "digits", "role": "student", "precision": "fp32"}
    metadata.update(root / "raw.onnx", info.to_metadata() | props, dest=root / "model.onnx")
    (root / "raw.onnx").unlink()
    Image.fromarray(data.test_x[0, 0].numpy()).save(root / "digit.png")
    return root / "model.onnx"


def damaged(src: Path, dest: Path, how: str) -> Path:
    blob = src.read_bytes()
    dest.write_bytes(blob[: len(blob) // 2] if how == "truncated" else b"\x08\x07garbage\xff\xfe" * 50)
    return dest


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_onnx_file_is_one_line_in_bench_and_predict(how, digits_onnx, tmp_path, capsys):
    bad = damaged(digits_onnx, tmp_path / f"{how}.onnx", how)
    code = main(["bench", str(bad), "--data", "digits", *BENCH, "--out", str(tmp_path / "b")])
    one_line(code, capsys.readouterr().err, str(bad))
    assert not (tmp_path / "b").exists()
    code = main(["predict", str(bad), str(digits_onnx.parent / "digit.png")])
    captured = capsys.readouterr()
    one_line(code, captured.err, str(bad))
    assert captured.out == ""


def test_metadata_read_and_update_name_a_damaged_file(digits_onnx, tmp_path):
    bad = damaged(digits_onnx, tmp_path / "t.onnx", "truncated")
    before = bad.read_bytes()
    for call in (lambda: metadata.read(bad), lambda: metadata.update(bad, {"top1": "0.5"})):
        with pytest.raises(CompressError, match=f"^{bad}: not a readable ONNX file") as info:
            call()
        assert "\n" not in str(info.value)
    assert bad.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx"]


def with_props(src: Path, dest: Path, **props: str) -> Path:
    model = onnx.load(str(src))
    merged = {p.key: p.value for p in model.metadata_props} | props
    helper.set_model_props(model, merged)
    onnx.save(model, str(dest))
    return dest


@pytest.mark.parametrize(
    ("key", "value"), [("image_size", "[28"), ("image_size", '["8", 8]'), ("channels", "one"), ("num_classes", "ten")]
)
def test_malformed_metadata_is_one_line_naming_the_file_and_key(key, value, digits_onnx, tmp_path, capsys):
    bad = with_props(digits_onnx, tmp_path / "m.onnx", **{key: value})
    code = main(["bench", str(bad), "--data", "digits", *BENCH, "--out", str(tmp_path / "b")])
    one_line(code, capsys.readouterr().err, str(bad), repr(key), "malformed")
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- the image cache
def _tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("how", ["truncated", "garbage", "a foreign tensor file"])
def test_a_damaged_image_cache_is_decoded_again(how, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    source = _tree(tmp_path / "tree")
    first = load_cached(source, ("train", "val"), None, "data.root")
    (cache,) = cache_dir().iterdir()
    good = cache.read_bytes()
    if how == "truncated":
        cache.write_bytes(good[: len(good) // 3])
    elif how == "garbage":
        cache.write_bytes(b"not a cache\n" * 10)
    else:
        torch.save({"classes": ["a", "b"], "train": torch.zeros(3)}, cache)
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append  # type: ignore[method-assign]
    logging.getLogger("compress.data").addHandler(handler)
    try:
        again = load_cached(source, ("train", "val"), None, "data.root")
    finally:
        logging.getLogger("compress.data").removeHandler(handler)
    assert again["classes"] == first["classes"]
    for split in ("train", "val"):
        assert all(torch.equal(a, b) for a, b in zip(again[split], first[split], strict=True))
    assert len(warnings) == 1 and str(cache) in warnings[0].getMessage() and "damaged" in warnings[0].getMessage()
    assert torch.equal(torch.load(cache, weights_only=True)["val"][0], first["val"][0])  # rewritten whole
    assert list(cache.parent.iterdir()) == [cache]  # no temp file beside it


# --------------------------------------------------------------------------- failed writes (a full disk)
_LIMITED = """
import resource, signal, sys
from pathlib import Path
from compress.errors import CompressError
{imports}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
{call}
except CompressError as exc:
    print(exc)
"""


def limited(imports: str, call: str, limit: int, **env: str) -> str:
    """Run ``call`` with no file allowed past ``limit`` bytes; what it printed (the CompressError)."""
    script = _LIMITED.format(imports=imports, call=textwrap.indent(call, "    "), limit=limit)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return lines[0]


def big_onnx(path: Path, floats: int = 100_000) -> Path:
    """A real ONNX file of ~``4 * floats`` bytes: y = x + w."""
    w = numpy_helper.from_array(np.arange(floats, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [floats])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [floats])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_metadata_update_on_a_full_disk_keeps_the_original_and_no_temp(tmp_path):
    path = big_onnx(tmp_path / "model.onnx")
    before = path.read_bytes()
    line = limited("from compress import metadata", f"metadata.update(Path({str(path)!r}), {{'top1': '0.5'}})", 100_000)
    assert line.startswith(f"cannot write {path}: File too large; nothing was left half-written"), line
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_fp16_conversion_on_a_full_disk_writes_nothing(tmp_path):
    src = big_onnx(tmp_path / "model.onnx")
    dst = tmp_path / "model.fp16.onnx"
    line = limited(
        "from compress.quantization import ptq", f"ptq.fp16(Path({str(src)!r}), Path({str(dst)!r}))", 100_000
    )
    assert line.startswith(f"cannot write {dst}: File too large"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_report_file_on_a_full_disk_keeps_the_old_one(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old\n")
    call = f"_atomic_write(Path({str(path)!r}), 'x' * 200_000)"
    line = limited("from compress.bench.report import _atomic_write", call, 100_000)
    assert line.startswith(f"cannot write {path}: File too large; nothing was left half-written"), line
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_an_image_cache_on_a_full_disk_is_one_line_and_leaves_no_temp(tmp_path):
    source = _tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    call = f"load_cached(Path({str(source)!r}), ('train', 'val'), None, 'data.root')"
    line = limited("from compress.data.images import load_cached", call, 2_000, COMPRESS_CACHE=str(cache))
    assert line.startswith(f"cannot write {cache}/images-") and "File too large" in line, line
    assert list(cache.iterdir()) == []


# --------------------------------------------------------------------------- code named by a file
MARKER_MODULE = """
import os
from pathlib import Path

Path(os.environ["MARKER"]).write_text("imported")  # importing this module is running code

from compress.models import build_model


def fn(num_classes, in_channels=1):
    return build_model("digits_student", num_classes, in_channels)
"""


@pytest.fixture
def marked(tmp_path) -> tuple[Path, Path, dict[str, str]]:
    """A checkpoint naming the user factory ``markermod:fn`` (a module on PYTHONPATH that leaves a
    marker file when imported), inside a run's checkpoints/ folder; (checkpoint, marker, env)."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "markermod.py").write_text(MARKER_MODULE)
    ckpt = tmp_path / "run" / "checkpoints" / "01-train" / "student.pt"
    model = build_model("digits_student", 10, 1)
    save_model(model, ckpt, name="markermod:fn", kwargs={}, num_classes=10, in_channels=1)
    marker = tmp_path / "imported.txt"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path / 'lib'}", MARKER=str(marker))
    return ckpt, marker, env


_BENCH_ALL = """
import json, sys
from compress.cli import main
codes = [main(json.loads(argv)) for argv in sys.argv[1:]]
print(json.dumps({"codes": codes, "imported": "markermod" in sys.modules}))
"""


def test_bench_refuses_a_user_factory_only_the_file_names(marked, tmp_path):
    ckpt, marker, env = marked
    run_dir = ckpt.parent.parent.parent
    argvs = [
        ["bench", str(ckpt), "--data", "digits", "--runtime", "torch", *BENCH, "--out", str(tmp_path / "a")],
        [
            "bench",
            f"{ckpt}:digits_student",
            "--data",
            "digits",
            "--runtime",
            "torch",
            *BENCH,
            "--out",
            str(tmp_path / "b"),
        ],
        ["bench", str(run_dir), "--data", "digits", "--runtime", "torch", *BENCH, "--out", str(tmp_path / "c")],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _BENCH_ALL, *map(json.dumps, argvs)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2, 2, 2], "imported": False}, proc.stderr
    assert not marker.exists()  # nothing of markermod ran, here or in a child process
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in proc.stderr, proc.stderr
    for line in lines:
        assert line.startswith(f"compress: error: {ckpt}: the file ") and "'markermod:fn'" in line, line
        assert f"name it yourself: {ckpt}:markermod:fn" in line, line
    assert "not 'digits_student'" in lines[1] and f"(or {run_dir}:markermod:fn for the whole run)" in lines[2]
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_user_factory_named_on_the_command_line_is_built(marked, tmp_path):
    """The control: named by the user (``RUN_DIR:NAME``), the factory is imported (the marker appears)
    and measured, the memory column included (the fresh process builds the same factory)."""
    ckpt, marker, env = marked
    run_dir = ckpt.parent.parent.parent
    argv = ["bench", f"{run_dir}:markermod:fn", "--data", "digits", "--runtime", "torch", *BENCH]
    proc = subprocess.run(
        [sys.executable, "-m", "compress", *argv, "--out", str(tmp_path / "ok")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "imported"
    (row,) = json.loads((tmp_path / "ok" / "report.json").read_text())["artifacts"]
    assert row["name"] == "student@train" and row["accuracy"] > 0 and row["peak_rss_bytes"] > 0


def test_os_system_named_by_a_checkpoint_is_never_called(tmp_path, capsys):
    flag = tmp_path / "ran"
    ckpt = tmp_path / "evil.pt"
    model = build_model("digits_student", 10, 1)
    save_model(model, ckpt, name="os:system", kwargs={"command": f"touch {flag}"}, num_classes=10, in_channels=1)
    code = main(["bench", str(ckpt), "--data", "digits", "--runtime", "torch", *BENCH, "--out", str(tmp_path / "b")])
    one_line(code, capsys.readouterr().err, str(ckpt), "'os:system'", "does not run code a file chooses")
    assert not flag.exists() and not (tmp_path / "b").exists()


def test_registered_and_torchvision_names_from_a_file_stay_fine(tmp_path, capsys):
    ckpt = tmp_path / "tv.pt"
    model = build_model("torchvision:resnet18", 10, 1)
    save_model(model, ckpt, name="torchvision:resnet18", kwargs={}, num_classes=10, in_channels=1)
    code = main(["bench", str(ckpt), "--data", "digits", "--runtime", "torch", *BENCH, "--out", str(tmp_path / "b")])
    assert code == 0, capsys.readouterr().err
    (row,) = json.loads((tmp_path / "b" / "report.json").read_text())["artifacts"]
    assert row["params"] > 10_000_000
