"""Deployable ONNX: self-describing metadata, in-graph preprocessing, `compress predict`, torch-free use.

Everything runs on real files: a digits run exported by the pipeline, the digits test split written
out as PNGs, and real CIFAR-10 JPEGs from ../shared/data (skipped where that file is absent).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from compress import metadata
from compress.bench.size import onnx_weight_counts
from compress.cli import main
from compress.context import Artifact, Context
from compress.data import DataBundle
from compress.deploy import ModelInfo, Predictor, load_image
from compress.models import build_model
from compress.onnx_utils import session
from compress.pipeline import load_data
from compress.quantization import ptq
from compress.quantization.calibration import BatchReader
from compress.stages import STAGES
from compress.stages.export import InGraphPreprocess, export_onnx

ROOT = Path(__file__).resolve().parent.parent
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
ONNX_FILES = ["model.onnx", "model.int8.onnx", "teacher.onnx"]


@pytest.fixture(scope="module")
def digits_pngs(tmp_path_factory, digits_run):
    """The digits test split as an ImageFolder of PNGs: what a user would point `predict` at."""
    root = tmp_path_factory.mktemp("pngs") / "test"
    data = load_data(digits_run[2])
    for i, (x, y) in enumerate(zip(data.test_x, data.test_y, strict=True)):
        path = root / data.class_names[int(y)] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[0].numpy(), mode="L").save(path)
    return root, data


def predict_json(capsys, *argv: str) -> dict:
    assert main(["predict", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("name", ONNX_FILES)
def test_metadata_describes_the_model(name, digits_run, digits_pngs):
    out, report, _ = digits_run
    _, data = digits_pngs
    props = metadata.read(out / name)
    info = ModelInfo.from_metadata(props)
    assert info.class_names == tuple(data.class_names)
    assert (info.channels, info.height, info.width) == data.input_shape
    assert info.mean == pytest.approx(data.mean, abs=0) and info.std == pytest.approx(data.std, abs=0)
    assert (info.layout, info.input_dtype, info.preprocess_in_graph) == ("nhwc", "uint8", True)
    # onnxruntime reads back exactly what onnx wrote.
    assert Predictor(out / name).metadata == props
    sha = hashlib.sha256((out / "recipe.resolved.yaml").read_bytes()).hexdigest()
    assert props["recipe_sha256"] == sha == report["recipe_sha256"]
    assert props["recipe_name"] == "deploy" and props["dataset"] == "digits"
    art = next(a for a in report["artifacts"] if a["name"] == name)
    assert float(props["top1"]) == art["accuracy"] and props["test_images"] == str(len(data.test_y))
    assert art["size_bytes"] == (out / name).stat().st_size  # measured after the metadata was stamped
    assert props["precision"] == art["precision"] and props["role"] == art["role"]
    versions = json.loads(props["versions"])
    for lib in ("compress", "torch", "torchvision", "torch_pruning", "onnx", "onnxruntime", "onnxscript", "python"):
        assert versions[lib] == report["environment"][lib]
    doc = onnx.load(str(out / name)).doc_string
    assert "uint8 NHWC" in doc and props["model"] in doc
    # Deployable files carry no exporter debug annotations (stack traces with local paths).
    assert not any(n.metadata_props for n in onnx.load(str(out / name)).graph.node)


def test_model_info_round_trips_through_metadata():
    info = ModelInfo(("cat", "dög", "a, b"), 3, 32, 24, "nchw", "float32", False, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    assert ModelInfo.from_metadata(info.to_metadata()) == info
    assert info.to_metadata()["input_shape"] == '["N", 3, 32, 24]'


def test_exporting_twice_gives_the_same_file(digits_run, tmp_path):
    """No timestamps or paths in the metadata: the same model and recipe export to the same bytes."""
    out, _, recipe = digits_run
    _export_variant(out, recipe, tmp_path / "a")
    _export_variant(out, recipe, tmp_path / "b")
    a, b = (tmp_path / "a" / "model.onnx"), (tmp_path / "b" / "model.onnx")
    assert metadata.read(a) == metadata.read(b)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.onnx"]  # no temporary left behind


def test_int8_names_its_fp32_source(digits_run):
    out, _, _ = digits_run
    props = metadata.read(out / "model.int8.onnx")
    assert props["source"] == "model.onnx" and "QDQ" in props["quantization"]
    assert metadata.read(out / "model.onnx")["source"] == "student@distill"


# --------------------------------------------------------------------------- predict
@pytest.mark.parametrize("name", ONNX_FILES)
def test_predict_on_a_folder_gives_the_reports_top1(name, digits_run, digits_pngs, capsys):
    out, report, _ = digits_run
    root, data = digits_pngs
    doc = predict_json(capsys, str(out / name), str(root), "--top-k", "3")
    art = next(a for a in report["artifacts"] if a["name"] == name)
    assert doc["labelled_images"] == len(data.test_y) == len(doc["predictions"])
    assert doc["top1"] == art["accuracy"]
    assert all(len(p["top_k"]) == 3 for p in doc["predictions"])


def test_predict_probabilities_are_softmax_of_the_logits(digits_run, digits_pngs, capsys):
    out, _, _ = digits_run
    root, data = digits_pngs
    image = sorted(root.rglob("*.png"))[7]
    doc = predict_json(capsys, str(out / "model.onnx"), str(image), "--top-k", "50")
    top = doc["predictions"][0]["top_k"]
    assert len(top) == data.num_classes  # clipped to the number of classes
    probs = [t["probability"] for t in top]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)
    # Independently: the torch student on the training pipeline's normalization of the same pixels.
    x = torch.from_numpy(np.array(Image.open(image)))[None, None]
    model = _student(out, data)
    with torch.no_grad():
        ref = torch.softmax(model(data.normalize(x)).double(), 1)[0].numpy()
    assert [t["index"] for t in top[:3]] == list(np.argsort(-ref)[:3])
    assert probs[:3] == pytest.approx(np.sort(ref)[::-1][:3].tolist(), abs=1e-5)
    assert top[0]["class"] == data.class_names[top[0]["index"]]


def test_predict_text_output(digits_run, digits_pngs, capsys):
    out, report, _ = digits_run
    root, _ = digits_pngs
    assert main(["predict", str(out / "model.int8.onnx"), str(root / "3"), str(root / "5"), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    n = len(list((root / "3").iterdir())) + len(list((root / "5").iterdir()))
    assert len(lines) == n + 1
    assert lines[0].startswith(str(root / "3")) and lines[0].count(", ") == 1
    assert lines[-1].startswith("top-1 ") and f"/{n} images" in lines[-1]


def test_predict_resizes_like_training_and_can_refuse(digits_run, digits_pngs, tmp_path, capsys):
    out, _, _ = digits_run
    root, _ = digits_pngs
    src = sorted((root / "4").glob("*.png"))[0]
    big = tmp_path / "big.png"
    Image.open(src).convert("RGB").resize((32, 32), Image.NEAREST).save(big)  # colour, 4x larger
    doc = predict_json(capsys, str(out / "model.onnx"), str(big), "--top-k", "1")
    assert doc["predictions"][0]["label"] is None and doc["top1"] is None
    info = Predictor(out / "model.onnx").info
    assert load_image(big, info).shape == (8, 8, 1)
    assert main(["predict", str(out / "model.onnx"), str(big), "--no-resize"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "32x32" in err and "8x8" in err


def _edit_metadata(src: Path, dst: Path, changes: dict[str, str] | None) -> Path:
    """A copy of ``src`` with some metadata values changed (``None``: all metadata removed)."""
    model = onnx.load(str(src))
    props = {} if changes is None else {p.key: p.value for p in model.metadata_props} | changes
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst))
    return dst


def _png_with_header_size(src: Path, dst: Path, width: int, height: int) -> Path:
    """A real PNG whose IHDR claims another size (CRC fixed): what a decompression bomb looks like."""
    import struct
    import zlib

    blob = bytearray(src.read_bytes())
    assert blob[12:16] == b"IHDR"
    blob[16:24] = struct.pack(">II", width, height)
    blob[29:33] = struct.pack(">I", zlib.crc32(bytes(blob[12:29])))
    dst.write_bytes(bytes(blob))
    return dst


def _error_argv(case: str, run: Path, pngs: Path, tmp: Path) -> list[str | Path]:
    """[model, images..., flags...] for one kind of bad input."""
    model, one = run / "model.onnx", sorted((pngs / "0").iterdir())[0]
    if case == "missing image":
        return [model, tmp / "nope.png"]
    if case == "not an image":
        (tmp / "notes.png").write_text("hello")
        return [model, pngs / "0", tmp / "notes.png"]
    if case == "truncated image":
        (tmp / "cut.png").write_bytes(one.read_bytes()[:60])
        return [model, tmp / "cut.png"]
    if case == "decompression bomb":
        return [model, _png_with_header_size(one, tmp / "bomb.png", 30000, 30000)]
    if case == "16-bit image":
        Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp / "deep.png")
        return [model, tmp / "deep.png"]
    if case == "empty folder":
        (tmp / "empty").mkdir()
        return [model, tmp / "empty"]
    if case == "missing model":
        return [tmp / "nope.onnx", pngs]
    if case == "model is a folder":
        return [run, pngs]
    if case == "not onnx":
        (tmp / "x.onnx").write_text("not a model")
        return [tmp / "x.onnx", pngs]
    if case == "no metadata":
        return [_edit_metadata(model, tmp / "bare.onnx", None), pngs]
    if case == "shape mismatch":
        return [_edit_metadata(model, tmp / "liar.onnx", {"image_size": "[16, 16]"}), pngs]
    if case == "class count mismatch":
        return [_edit_metadata(model, tmp / "few.onnx", {"class_names": '["a", "b", "c"]'}), pngs]
    assert case == "bad threads"
    return [model, pngs, "--threads", "0"]


PREDICT_ERRORS = {
    "missing image": "no such file or folder",
    "not an image": "not an image Pillow can read",
    "truncated image": "cannot decode the image",
    "decompression bomb": "decompression bomb",
    "16-bit image": "the model takes 8-bit images",
    "empty folder": "no images",
    "missing model": "no such model file",
    "model is a folder": "is a folder, not an ONNX model file",
    "not onnx": "onnxruntime cannot load it",
    "no metadata": "no compress metadata",
    "shape mismatch": "the model and its metadata do not match",
    "class count mismatch": "the graph outputs 10 logits but the metadata names 3 classes",
    "bad threads": "--threads must be at least 1, got 0",
}


@pytest.mark.parametrize("case", PREDICT_ERRORS)
def test_predict_errors_are_one_line(case, digits_run, digits_pngs, tmp_path, capsys):
    out, _, _ = digits_run
    root, _ = digits_pngs
    code = main(["predict", *map(str, _error_argv(case, out, root, tmp_path))])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err and lines[0].startswith("compress: error: ")
    assert PREDICT_ERRORS[case] in lines[0], lines[0]
    assert captured.out == ""  # nothing half-printed: errors surface before the first prediction


# --------------------------------------------------------------------------- in-graph preprocessing
def _student(out: Path, data) -> torch.nn.Module:
    from compress.checkpoint import load_weights, read_checkpoint

    model = build_model("digits_student", data.num_classes, data.channels)
    state, pruned = read_checkpoint(out / "checkpoints" / "02-distill" / "student.pt", "student", "test")
    load_weights(model, state, pruned=pruned, field="test")
    return model.eval()


def _export_variant(out: Path, recipe, tmp: Path, **fields) -> Context:
    data = load_data(recipe)
    model = _student(out, data)
    ctx = Context(
        recipe=recipe,
        device=torch.device("cpu"),
        run_dir=tmp,
        data=data,
        models={"student": model},
        specs={"student": recipe.student},
    )
    STAGES.get("export").model_validate({"kind": "export", **fields}).apply(ctx)
    return ctx


@pytest.mark.parametrize(
    "fields",
    [
        {"input_layout": "nhwc"},
        {"input_layout": "nchw"},
        {"preprocess_in_graph": False, "input_layout": "nchw"},
        {"preprocess_in_graph": False, "input_layout": "nhwc"},
    ],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_every_input_variant_predicts_like_torch_on_real_pngs(fields, digits_run, digits_pngs, tmp_path, capsys):
    out, _, recipe = digits_run
    root, data = digits_pngs
    ctx = _export_variant(out, recipe, tmp_path, **fields)
    info = Predictor(tmp_path / "model.onnx").info
    assert info.layout == fields["input_layout"]
    assert info.input_dtype == ("uint8" if fields.get("preprocess_in_graph", True) else "float32")
    files = sorted(root.rglob("*.png"))
    pixels = np.stack([load_image(f, info) for f in files])  # decoded the deployer's way
    with torch.no_grad():
        # ... and the same images through the training pipeline's tensors and normalization.
        index = [int(f.stem) for f in files]
        ref = ctx.student(data.normalize(data.test_x[index])).numpy()
    got = Predictor(tmp_path / "model.onnx").logits(pixels)
    assert np.abs(got - ref).max() <= 1e-4 + 1e-5 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()
    doc = predict_json(capsys, str(tmp_path / "model.onnx"), str(root))
    labels = np.array([data.class_names.index(p["label"]) for p in doc["predictions"]])
    assert doc["top1"] == pytest.approx(float((ref.argmax(1) == labels).mean()), abs=0)


def _cifar_jpegs(dest: Path, per_class: int) -> Path:
    """The first ``per_class`` test JPEGs of each class, extracted from the real archive."""
    taken: dict[str, int] = {}
    with tarfile.open(CIFAR, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if len(parts) != 4 or parts[1] != "test" or not member.isfile():
                if taken and parts[1:2] == ("train",):
                    break
                continue
            if taken.get(parts[2], 0) < per_class:
                taken[parts[2]] = taken.get(parts[2], 0) + 1
                target = dest / "test" / parts[2] / parts[3]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    return dest


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """120 real CIFAR-10 test JPEGs, decoded the training way, and a ResNet-20 briefly fitted to them."""
    if not CIFAR.is_file():
        pytest.skip(f"{CIFAR} not present")
    from compress.data.cifar10 import MEAN, STD
    from compress.data.images import decode_tree

    root = _cifar_jpegs(tmp_path_factory.mktemp("cifar"), per_class=12)
    decoded = decode_tree(root, ("test",), 32, "test")  # exactly how training decodes the archive
    pixels, labels = decoded["test"]
    data = DataBundle(pixels, labels, pixels, labels, list(decoded["classes"]), MEAN, STD)
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = data.normalize(pixels)
    for _ in range(15):  # fit these images a little, so the logits depend on what is in each one
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.train()(x), labels).backward()
        opt.step()
    return root, data, model.eval()


def _export(model, info: ModelInfo, data, path: Path) -> Path:
    example = torch.from_numpy(info.prepare(data.test_x[:2].numpy(), layout="nchw"))
    export_onnx(InGraphPreprocess(model, info), example, path, 18, info.input_name)
    metadata.update(path, info.to_metadata())
    return path


def test_cifar_jpegs_in_graph_preprocessing_matches_training_pipeline(cifar, tmp_path):
    root, data, model = cifar
    files = [p for c in data.class_names for p in sorted((root / "test" / c).iterdir())]
    info = ModelInfo(tuple(data.class_names), 3, 32, 32, "nhwc", "uint8", True, data.mean, data.std)
    pixels = np.stack([load_image(f, info) for f in files])
    assert np.array_equal(pixels, data.test_x.permute(0, 2, 3, 1).numpy())  # same bytes: deployer vs trainer
    with torch.no_grad():
        ref = model(data.normalize(data.test_x)).numpy()
    assert len(set(ref.argmax(1))) > 1  # a model whose answers depend on the image
    got = {}
    for layout in ("nhwc", "nchw"):
        variant = ModelInfo(info.class_names, 3, 32, 32, layout, "uint8", True, data.mean, data.std)
        got[layout] = Predictor(_export(model, variant, data, tmp_path / f"{layout}.onnx")).logits(pixels)
        assert np.abs(got[layout] - ref).max() <= 1e-4 + 1e-5 * np.abs(ref).max(), layout
        assert (got[layout].argmax(1) == ref.argmax(1)).all()
    assert np.abs(got["nhwc"] - got["nchw"]).max() < 1e-5


def test_cifar_int8_with_preprocessing_in_graph_matches_float_input_int8(cifar, tmp_path):
    """Quantizing the uint8-input graph gives the INT8 model that quantizing the float-input graph gives."""
    _, data, model = cifar
    int8, feeds = {}, {}
    for in_graph in (True, False):
        info = ModelInfo(
            tuple(data.class_names), 3, 32, 32, "nchw", "uint8" if in_graph else "float32", in_graph,
            data.mean, data.std, input_name="images" if in_graph else "input",
        )  # fmt: skip
        run_dir = tmp_path / str(in_graph)
        fp32 = _export(model, info, data, run_dir / "model.onnx")
        ctx = Context(recipe=None, device=torch.device("cpu"), run_dir=run_dir, data=data, models={}, specs={})
        ctx.add_artifact(Artifact("model.onnx", "student", "onnx", "fp32", fp32, "export"))
        STAGES.get("quantize").model_validate({"kind": "quantize", "calibration_batches": 4}).apply(ctx)
        int8[in_graph] = Predictor(run_dir / "model.int8.onnx")
        assert int8[in_graph].info == info  # the INT8 file inherits the FP32 contract
        feeds[in_graph] = data.test_x.numpy()
    a = int8[True].logits(feeds[True], layout="nchw")
    b = int8[False].logits(feeds[False], layout="nchw")
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.98
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()


# --------------------------------------------------------------------------- torch-free deployment
BLOCK = (
    "import runpy, sys\nfor name in {blocked!r}:\n    sys.modules[name] = None  # importing it now raises ImportError\n"
)


def _python(code: str, *, blocked: tuple[str, ...], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK.format(blocked=blocked) + code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_deploy_module_imports_without_torch():
    proc = _python(
        "import compress.deploy\n"
        "loaded = sorted(m.split('.')[0] for m, mod in sys.modules.items() if mod is not None)\n"
        "print(' '.join(sorted(set(loaded))))",
        blocked=("torch", "torchvision", "torch_pruning", "onnx", "pydantic", "yaml"),
    )
    loaded = set(proc.stdout.split())
    assert "numpy" in loaded and not loaded & {"torch", "onnx", "pydantic", "yaml", "rich"}


def test_compress_predict_runs_without_torch(digits_run, digits_pngs):
    out, report, _ = digits_run
    root, _ = digits_pngs
    argv = ["predict", str(out / "model.int8.onnx"), str(root), "--json"]
    proc = _python(f"from compress.cli import main\nsys.exit(main({argv!r}))", blocked=("torch", "onnx"))
    art = next(a for a in report["artifacts"] if a["name"] == "model.int8.onnx")
    assert json.loads(proc.stdout)["top1"] == art["accuracy"]


def test_deploy_py_works_copied_alone(digits_run, digits_pngs, tmp_path):
    """A deployer copies compress/deploy.py next to the model; compress itself need not be installed."""
    out, report, _ = digits_run
    root, _ = digits_pngs
    (tmp_path / "deploy.py").write_bytes((ROOT / "compress" / "deploy.py").read_bytes())
    argv = ["deploy.py", str(out / "model.onnx"), str(root), "--json"]
    proc = _python(
        f"sys.argv = {argv!r}\nrunpy.run_path('deploy.py', run_name='__main__')",
        blocked=("torch", "onnx", "compress"),
        cwd=tmp_path,
    )
    art = next(a for a in report["artifacts"] if a["name"] == "model.onnx")
    assert json.loads(proc.stdout)["top1"] == art["accuracy"]


def test_example_script_agrees_with_predict(digits_run, digits_pngs, capsys):
    out, _, _ = digits_run
    root, _ = digits_pngs
    files = [str(p) for p in sorted(root.rglob("*.png"))[::12]]
    argv = ["deploy_onnxruntime.py", str(out / "model.int8.onnx"), *files]
    script = str(ROOT / "examples" / "deploy_onnxruntime.py")
    proc = _python(
        f"sys.argv = {argv!r}\nrunpy.run_path({script!r}, run_name='__main__')", blocked=("torch", "onnx", "compress")
    )
    got = [line.rsplit(": ", 1)[1].split(" (")[0] for line in proc.stdout.strip().splitlines()]
    doc = predict_json(capsys, str(out / "model.int8.onnx"), *files, "--top-k", "1")
    assert got == [p["top_k"][0]["class"] for p in doc["predictions"]]
    assert len(got) == len(files) > 20


@pytest.mark.parametrize("model_name", ["resnet20", "digits_student"])
def test_nhwc_uint8_export_has_no_stride_arithmetic(tmp_path, model_name):
    """NHWC pixels are permuted in the graph; a permuted view's strides must not reach the model's
    flatten (it then exports as as_strided: Shape/Range/Gather nodes run on every call)."""
    channels = 1 if model_name == "digits_student" else 3
    model = build_model(model_name, 10, channels).eval()
    info = ModelInfo(
        tuple("abcdefghij"), channels, 32, 32, "nhwc", "uint8", True, (0.5,) * channels, (0.25,) * channels
    )
    example = torch.randint(0, 255, (2, 32, 32, channels), dtype=torch.uint8)
    path = tmp_path / "m.onnx"
    export_onnx(InGraphPreprocess(model, info), example, path, 18, info.input_name)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Shape", "Range", "Gather"}, ops


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_int8_graph_normalizes_in_long_spans(tmp_path, layout):
    """ONNX Runtime broadcasts per contiguous span, so normalizing channels-last pixels against a
    (C,)-long mean runs H·W spans of C values. In the INT8 graph ORT actually runs, the mean and
    std the normalization uses must not end in a C-long axis. (Before the row layout, ORT's
    transpose optimizer pushed QLinearConv's NHWC Transpose up to the input and the NHWC graph
    normalized per pixel; benchmarks/preprocess_in_graph.py measures it.) The rows change no value:
    ORT's FP32 logits equal PyTorch's on the training pipeline's normalized pixels."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3).eval()
    pixels = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(32) % 10
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    data = DataBundle(pixels, labels, pixels, labels, list("abcdefghij"), mean, std)
    info = ModelInfo(tuple("abcdefghij"), 3, 32, 32, layout, "uint8", True, mean, std)
    path = _export(model, info, data, tmp_path / "m.onnx")
    with torch.inference_mode():
        ref = model(data.normalize(pixels)).numpy()
    got = Predictor(path).logits(pixels.numpy(), layout="nchw")
    assert np.abs(got - ref).max() <= 1e-4 + 1e-5 * np.abs(ref).max()

    feed = lambda x: info.prepare(x.numpy(), layout="nchw")  # noqa: E731
    ptq.preprocess(path, tmp_path / "pre.onnx")
    ptq.static(tmp_path / "pre.onnx", tmp_path / "q.onnx", BatchReader(data, "images", 4, 8, feed=feed), chunk=4)
    optimized = tmp_path / "q.optimized.onnx"
    session(tmp_path / "q.onnx", optimized_to=optimized)
    graph = onnx.load(str(optimized)).graph
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    vectors = {name for name, value in consts.items() if value.size > 1}
    norm = [n for n in graph.node if n.op_type in ("Sub", "Div") and n.input[1] in vectors]
    assert len(norm) == 2, [n.op_type for n in graph.node][:12]  # - mean, / std
    for node in norm:
        assert consts[node.input[1]].shape[-1] != 3, (node.op_type, consts[node.input[1]].shape)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_in_graph_normalization_is_not_counted_as_weights(tmp_path, layout):
    """The report's ONNX parameter count is the model's: the same as for the float-input export."""
    model = build_model("digits_student", 10, 1).eval()
    info = ModelInfo(tuple("abcdefghij"), 1, 8, 8, layout, "uint8", True, (0.3,), (0.4,))
    pixels = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    export_onnx(
        InGraphPreprocess(model, info), torch.from_numpy(info.prepare(pixels.numpy(), "nchw")), tmp_path / "u8.onnx", 18
    )
    export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "f32.onnx", 18)
    in_graph, plain = onnx_weight_counts(tmp_path / "u8.onnx"), onnx_weight_counts(tmp_path / "f32.onnx")
    assert in_graph == plain and plain[0] > 5000, (in_graph, plain)
