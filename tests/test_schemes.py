"""INT8 schemes on the CPU the tests run on: instruction-set detection, ONNX Runtime's kernels probed
for exactness, what ``auto`` picks, and the warning a file quantized for another CPU gets."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from compress import deploy
from compress.cli import main
from compress.deploy import Predictor, cpu_isa, int8_portability, isa_label
from compress.quantization.schemes import AUTO, INT8_DOT, SCHEMES, choose, probe

# /proc/cpuinfo as the kinds of hosts this project runs on print it (first processor, trimmed)
ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes vpclmulqdq
"""
ZEN5 = """processor\t: 0
cpu family\t: 26
flags\t\t: sse4_2 avx avx2 avx512f avx512dq avx512bw avx512vl avx_vnni avx512_bf16 avx512vbmi avx512_vnni
"""
SAPPHIRE_RAPIDS = "flags\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics fphp asimdhp asimddp sve i8mm bf16\n"


@pytest.mark.parametrize(
    ("text", "arch", "flags"),
    [
        (ZEN3, "x86_64", ["avx2"]),
        (ZEN5, "x86_64", ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16"]),
        (SAPPHIRE_RAPIDS, "x86_64", ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16"]),
        (NEOVERSE_V1, "arm64", ["dotprod", "i8mm", "bf16"]),
        ("processor\t: 0\nFeatures\t: fp asimd\n", "arm64", []),
    ],
    ids=["zen3", "zen5", "sapphire-rapids", "neoverse-v1", "arm64-baseline"],
)
def test_cpu_isa_reads_the_flags_that_decide_int8_and_bf16(text, arch, flags):
    isa = cpu_isa(text)
    assert isa == {"arch": arch, "flags": flags}
    assert isa_label(isa) == f"{arch} {' '.join(flags) or 'baseline'}"


def test_this_hosts_isa_is_known_and_reported():
    isa = cpu_isa()
    assert isa["arch"] and (isa["flags"] is None or isinstance(isa["flags"], list))
    from compress.env import environment

    assert environment(1)["isa"] == isa_label(isa)


@pytest.mark.parametrize("name", [n for n in SCHEMES.names() if SCHEMES.get(n).exact_with == "any"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_schemes_said_to_be_exact_everywhere_are_exact_here(name, dynamic):
    if dynamic and SCHEMES.get(name).activation != "uint8":
        pytest.skip("dynamic quantization has uint8 activations only")
    p = probe(name, dynamic)
    assert p.exact and not p.failing, p


@pytest.mark.skipif(cpu_isa()["arch"] != "x86_64" or cpu_isa()["flags"] is None, reason="x86 flag rule")
@pytest.mark.parametrize("name", [n for n in SCHEMES.names() if SCHEMES.get(n).exact_with != "any"])
def test_full_range_schemes_are_exact_exactly_where_the_cpu_has_int8_dot_products(name):
    """The rule the metadata's ``int8_exact_with`` states (full-range int8 weights need VNNI/AMX),
    checked against ONNX Runtime's own kernels on whatever CPU runs the tests."""
    has_dot = bool(set(INT8_DOT) & set(cpu_isa()["flags"]))
    p = probe(name)
    assert p.exact == has_dot, p
    if not p.exact:  # int16 saturation is not a rounding error: whole outputs are far off
        assert p.worst_error > 0.25 and {"conv3x3", "conv1x1", "gemm"} <= set(p.failing)


@pytest.mark.parametrize("dynamic", [False, True])
def test_auto_picks_the_first_exact_scheme_in_order(dynamic):
    scheme, why, p = choose("auto", dynamic)
    assert p.exact and scheme.name in AUTO
    first_exact = next(n for n in AUTO if probe(n, dynamic).exact)
    assert scheme.name == first_exact
    assert why.startswith(f"auto: {scheme.name} is exact on this CPU ({isa_label()})")
    if scheme.name != AUTO[0]:
        assert f"{AUTO[0]} is not (ORT's kernels off by up to" in why


def test_an_explicit_scheme_is_used_as_given_and_says_if_it_is_not_exact():
    for name in SCHEMES.names():
        scheme, why, p = choose(name)
        assert scheme.name == name and p.exact == probe(name).exact
        assert ("NOT exact" in why) == (not p.exact)


def test_portability_line_for_a_vnni_file_on_an_avx2_cpu():
    props = SCHEMES.get("u8s8").metadata() | {"int8_isa": isa_label(cpu_isa(ZEN5))}
    line = int8_portability(props, "m.int8.onnx", cpu_isa(ZEN3))
    assert line is not None and "\n" not in line
    assert line.startswith("m.int8.onnx: INT8 scheme u8s8 (quantized on x86_64 avx2 avx512f avx512_vnni")
    assert "exact only with avx512_vnni, avx_vnni, amx_int8, which this CPU (x86_64 avx2) lacks" in line
    assert "accuracy may differ" in line and "re-quantize on this CPU" in line and "x64quantprecision=1" in line
    for host in (ZEN5, SAPPHIRE_RAPIDS, NEOVERSE_V1):  # exact there, or not an x86 rule
        assert int8_portability(props, "m", cpu_isa(host)) is None
    for safe in ("u8s8_reduce_range", "u8u8", "s8s8_reduce_range"):
        assert int8_portability(SCHEMES.get(safe).metadata(), "m", cpu_isa(ZEN3)) is None
    assert int8_portability({"precision": "fp32"}, "m", cpu_isa(ZEN3)) is None  # FP32 and older files


@pytest.fixture(scope="module")
def vnni_file(tmp_path_factory):
    """A real digits run quantized with full-range U8S8 weights, as a VNNI host makes it."""
    from compress.pipeline import run
    from compress.recipe import validate_recipe

    recipe = {
        "name": "vnni",
        "device": "cpu",
        "data": {"name": "digits"},
        "student": {"model": "digits_student"},
        "stages": [
            {"kind": "train", "epochs": 2, "optim": {"lr": 0.05, "precision": "fp32"}},
            {"kind": "export"},
            {"kind": "quantize", "scheme": "u8s8", "calibration_batches": 2},
        ],
        "benchmark": {"batch_sizes": [1], "iters": 1, "warmup": 0, "devices": ["cpu"], "torch_snapshots": False},
    }
    out = run(validate_recipe(recipe), tmp_path_factory.mktemp("vnni") / "run", quiet=True)
    return out / "model.int8.onnx"


@pytest.mark.skipif(cpu_isa()["arch"] != "x86_64", reason="an x86 session option")
@pytest.mark.parametrize("dynamic", [False, True])
def test_onnx_runtimes_precision_mode_makes_every_scheme_exact(dynamic):
    for name in SCHEMES.names():
        if not dynamic or SCHEMES.get(name).activation == "uint8":
            assert probe(name, dynamic, precision_mode=True).exact, name


def test_predict_and_bench_load_a_file_quantized_for_vnni_exactly_on_a_cpu_without_it(
    vnni_file, tmp_path, monkeypatch, capsys, caplog
):
    """Served on a Zen 3, the full-range file is loaded in ORT's precision mode, with one line: its
    logits then match the QDQ graph computed in float (ORT with no fusions: DequantizeLinear ->
    float Conv -> QuantizeLinear), which no saturating kernel takes part in."""
    import onnxruntime as ort

    from compress.pipeline import load_data
    from compress.recipe import validate_recipe

    real = deploy.cpu_isa
    monkeypatch.setattr(deploy, "cpu_isa", lambda cpuinfo=None: real(ZEN3))  # this file, served on a Zen 3
    with caplog.at_level(logging.WARNING, logger="compress.deploy"):
        p = Predictor(vnni_file)
    warned = [r.getMessage() for r in caplog.records if "INT8 scheme u8s8" in r.getMessage()]
    assert len(warned) == 1 and "this CPU (x86_64 avx2) lacks" in warned[0] and "loaded so" in warned[0]
    assert p.session.get_session_options().get_session_config_entry("session.x64quantprecision") == "1"
    recipe = validate_recipe({"name": "d", "data": {"name": "digits"}, "student": {"model": "digits_student"},
                              "stages": [{"kind": "export"}]})  # fmt: skip
    x = load_data(recipe).test_x.numpy()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(vnni_file), opts, providers=["CPUExecutionProvider"])
    ref = plain.run(None, {p.info.input_name: p.info.prepare(x, layout="nchw")})[0]
    got = p.logits(x, layout="nchw")
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()  # requantization rounding, not saturation
    shutil.copy(vnni_file, tmp_path / "model.int8.onnx")
    assert main(["bench", str(tmp_path / "model.int8.onnx"), "--data", "digits", "--batch-sizes", "1",
                 "--iters", "2", "--warmup", "0", "--devices", "cpu", "--runtime", "ort", "--quiet",
                 "--out", str(tmp_path / "bench")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert any("INT8 scheme u8s8" in n for n in report["notes"])
    assert "INT8 scheme u8s8" in (tmp_path / "bench" / "report.md").read_text()


def test_compress_env_says_what_is_exact_here(capsys):
    assert main(["env", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["isa"] == isa_label() and doc["torch_cpu_capability"]
    assert set(doc["int8_schemes"]) == set(SCHEMES.names())
    for name, r in doc["int8_schemes"].items():
        assert r["static"] == probe(name).exact and r["exact_with"] == SCHEMES.get(name).exact_with
    assert doc["int8_auto"] == {"static": choose("auto")[0].name, "dynamic": choose("auto", True)[0].name}
    assert doc["training_precision_auto_cpu"] in ("bf16", "fp32")
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"isa  {isa_label()}".replace("  ", " ") in " ".join(text.split()) and "int8 u8s8" in text
