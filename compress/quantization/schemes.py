"""INT8 schemes (activation × weight types, full or 7-bit weights) and which of them ONNX Runtime
computes exactly on this CPU — measured, not looked up.

On x86 without VNNI, ORT's uint8 × int8 kernels (QLinearConv, QGemm, MatMulInteger) multiply-add
adjacent pairs with ``vpmaddubsw`` into *saturating* int16 sums: 2 · 255 · 127 = 64,770 > 32,767,
so full-range int8 weights clip wherever activations are large. Signed activations are shifted
to uint8 first and clip the same way. 7-bit weights (ORT's ``reduce_range``: [-64, 64]) keep every
pair within int16 (2 · 255 · 64 = 32,640), and uint8 weights take a widening kernel that never
clips. With AVX512-VNNI / AVX-VNNI / AMX the products accumulate in int32 directly and every scheme
is exact.

``probe`` runs ORT on a tiny QDQ graph (3×3 and 1×1 convolutions, a Gemm and, for dynamic
quantization, a MatMulInteger) at each scheme's extreme values and compares every output with
integer arithmetic: the host's real kernels say whether a scheme is exact, whatever its flags
claim. ``choose`` gives ``auto``'s answer: the first scheme of ``AUTO`` (fastest first) that is exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from compress.deploy import PRECISION_MODE, cpu_isa, isa_label
from compress.registry import Registry

#: x86 instructions that accumulate uint8 × int8 products in int32 (no int16 saturation)
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Scheme:
    """One INT8 scheme: what ORT's quantizer is asked for, and where its kernels are exact."""

    name: str
    activation: str  # "uint8" | "int8"
    weight: str  # "int8" | "uint8"
    reduce_range: bool  # 7-bit weights, [-64, 64]
    summary: str  # one line for `compress list`

    @property
    def exact_with(self) -> str:
        """``"any"``, or the x86 instructions (``|``-separated) the scheme needs to be exact."""
        return "any" if self.reduce_range or self.weight == "uint8" else "|".join(INT8_DOT)

    @property
    def weight_range(self) -> tuple[int, int]:
        if self.weight == "uint8":
            return 0, 255
        return (-64, 64) if self.reduce_range else (-128, 127)

    def metadata(self) -> dict[str, str]:
        """ONNX metadata of a file quantized with this scheme on this CPU (read back by
        ``deploy.int8_portability`` wherever the file is loaded)."""
        return {"int8_scheme": self.name, "int8_isa": isa_label(cpu_isa()), "int8_exact_with": self.exact_with}


SCHEMES: Registry[Scheme] = Registry("INT8 scheme")
for _s in (
    Scheme("u8s8", "uint8", "int8", False, "uint8 activations, int8 weights: fastest; exact only with VNNI/AMX"),
    Scheme("u8s8_reduce_range", "uint8", "int8", True, "uint8 activations, 7-bit int8 weights: exact on any CPU"),
    Scheme("s8s8", "int8", "int8", False, "int8 activations and weights; exact only with VNNI/AMX"),
    Scheme("s8s8_reduce_range", "int8", "int8", True, "int8 activations, 7-bit int8 weights: exact on any CPU"),
    Scheme("u8u8", "uint8", "uint8", False, "uint8 activations and weights: exact on any CPU (widening kernel)"),
):
    SCHEMES.register(_s.name)(_s)

#: ``auto``'s preference, fastest first; the first one exact on this CPU is chosen
AUTO = ("u8s8", "u8s8_reduce_range")


@dataclass(frozen=True)
class Probe:
    """ORT's INT8 kernels on this CPU against integer arithmetic, for one scheme."""

    scheme: str
    exact: bool
    worst_error: float  # per output, max |ORT - exact| / max |exact|; the largest over the outputs
    failing: tuple[str, ...]  # probe ops off by more than one output step (1% of their range), or why it failed


def _probe_model(scheme: Scheme, dynamic: bool) -> tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A QDQ graph of the ops ORT fuses into QLinearConv / QGemm (and MatMulInteger), with every
    weight at its extreme, fed activations at their extremes; returns the model, its feed and the
    exact integer results per output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    adt = np.uint8 if scheme.activation == "uint8" else np.int8
    wdt = np.uint8 if scheme.weight == "uint8" else np.int8
    wzp = 128 if scheme.weight == "uint8" else 0
    lo, hi = np.iinfo(adt).min, np.iinfo(adt).max
    wlo, whi = (w - wzp for w in scheme.weight_range)
    nodes, inits, outputs, exact = [], [], [], {}
    feed: dict[str, np.ndarray] = {}

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def weights(shape: tuple[int, ...]) -> np.ndarray:
        """Each filter all at the top of the weight range or all at the bottom: the pair sums that
        saturate an int16 accumulator first."""
        w = np.empty(shape, np.int64)
        w[: shape[0] // 2], w[shape[0] // 2 :] = whi, wlo
        return w

    def qdq_out(name: str, y: np.ndarray) -> None:
        """y's Q -> DQ with one output step ≈ 1/100 of the largest |y|: ORT then fuses the op."""
        step = np.float32(max(1.0, float(np.abs(y).max())) / 100)
        zp = np.array(0 if adt is np.int8 else 128, adt)
        q = [const(f"{name}_s", np.array(step, np.float32)), const(f"{name}_z", zp)]
        nodes.append(helper.make_node("QuantizeLinear", [f"{name}_f", *q], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", *q], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, y.shape))
        exact[name] = y

    ones = const("one", np.array(1.0, np.float32))
    levels = np.array([hi, lo], np.int64)  # batch of two: every activation at the top, then the bottom
    # MLAS runs a convolution with >= 16 output channels (a multiple of 8) and input channels a
    # multiple of 4 in its ConvSym kernels, others through im2col + QGEMM: both paths, and QGemm.
    for name, cin, cout, k in (
        ("conv3x3", 16, 16, 3),
        ("conv1x1", 64, 32, 1),
        ("conv3x3_gemm", 16, 8, 3),
        ("gemm", 64, 8, 0),
    ):
        spatial = (k + 5,) * 2 if k else ()  # 6x6 outputs: the kernels' usual, not a degenerate, shape
        x = levels.reshape(2, *[1] * (1 + len(spatial))) * np.ones((1, cin, *spatial), np.int64)
        feed[f"{name}_x"] = x.astype(np.float32)
        w = weights((cout, cin, k, k) if k else (cout, cin))
        q_in = [ones, const(f"{name}_xz", np.array(0, adt))]
        nodes.append(helper.make_node("QuantizeLinear", [f"{name}_x", *q_in], [f"{name}_xq"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_xq", *q_in], [f"{name}_xd"]))
        wq = [const(f"{name}_w", (w + wzp).astype(wdt)), const(f"{name}_ws", np.ones(cout, np.float32))]
        wq.append(const(f"{name}_wz", np.full(cout, wzp, wdt)))
        nodes.append(helper.make_node("DequantizeLinear", wq, [f"{name}_wd"], axis=0))
        if k:
            nodes.append(helper.make_node("Conv", [f"{name}_xd", f"{name}_wd"], [f"{name}_f"], kernel_shape=[k, k]))
        else:
            nodes.append(helper.make_node("Gemm", [f"{name}_xd", f"{name}_wd"], [f"{name}_f"], transB=1))
        y = levels[:, None] * w.reshape(cout, -1).sum(1)[None, :]  # constant inputs: level x sum of a filter
        qdq_out(name, y.reshape(2, cout, *[1] * len(spatial)) * np.ones((1, 1, 6, 6) if k else (1, 1), np.int64))
    if dynamic:  # quantize_dynamic's MatMulInteger on uint8 activations
        x = np.stack([np.full(64, v, np.uint8) for v in (255, 0)])
        w = weights((8, 64))
        feed["mmi_x"] = x
        args = ["mmi_x", const("mmi_w", (w.T + wzp).astype(wdt)), const("mmi_xz", np.array(0, np.uint8))]
        args.append(const("mmi_wz", np.full(8, wzp, wdt)))  # per column, as quantize_dynamic writes it
        nodes.append(helper.make_node("MatMulInteger", args, ["mmi"]))
        exact["mmi"] = x.astype(np.int64) @ w.T
        outputs.append(helper.make_tensor_value_info("mmi", TensorProto.INT32, exact["mmi"].shape))
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.UINT8 if v.dtype == np.uint8 else TensorProto.FLOAT, v.shape)
        for n, v in feed.items()
    ]
    graph = helper.make_graph(nodes, "int8_probe", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString(), feed, exact


@functools.cache
def probe(name: str, dynamic: bool = False, precision_mode: bool = False) -> Probe:
    """Run scheme ``name``'s probe graph on this CPU's ONNX Runtime (one thread, default
    optimizations: the kernels a deployed file gets) and compare with integer arithmetic;
    ``precision_mode``: in a session with ORT's ``session.x64quantprecision=1``."""
    import onnxruntime as ort

    scheme = SCHEMES.get(name)
    model, feed, exact = _probe_model(scheme, dynamic)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    if precision_mode:
        opts.add_session_config_entry(*PRECISION_MODE)
    try:
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
    except Exception as exc:  # noqa: BLE001 - a build without some INT8 kernel: not usable, so not exact
        return Probe(name, False, float("inf"), (f"error: {str(exc).strip().splitlines()[0][:200]}",))
    worst, failing = 0.0, []
    for out, ref in exact.items():
        step = 1 if out == "mmi" else max(1.0, float(np.abs(ref).max())) / 100
        err = np.abs(got[out].astype(np.float64) - ref)
        worst = max(worst, float(err.max() / np.abs(ref).max()))
        if err.max() > step * 1.01:
            failing.append(out)
    return Probe(name, not failing, worst, tuple(failing))


class Choice(NamedTuple):
    """``choose``'s answer: the scheme, why it was taken, and its probe on this CPU."""

    scheme: Scheme
    reason: str
    probe: Probe

    def metrics(self) -> dict[str, Any]:
        """What a stage reports about it (report.json; the report's Stages line shows the reason)."""
        return {"scheme": self.scheme.name, "scheme_reason": self.reason, "scheme_exact_here": self.probe.exact}


def choose(requested: str, dynamic: bool = False) -> Choice:
    """The scheme to quantize with, why, and its probe. ``auto``: the first of ``AUTO`` exact on
    this CPU (the last one if none is, which the reason says); an explicit name is used as given."""
    host = isa_label(cpu_isa())
    if requested != "auto":
        p = probe(requested, dynamic)
        how = "exact" if p.exact else f"NOT exact (off by up to {p.worst_error:.0%} in ORT's probe{_failed(p)})"
        return Choice(SCHEMES.get(requested), f"{requested} as configured; {how} on this CPU ({host})", p)
    tried = []
    for name in AUTO:
        p = probe(name, dynamic)
        if p.exact:
            why = f"auto: {name} is exact on this CPU ({host})"
            if tried:
                why += f"; {', '.join(tried)}"
            return Choice(SCHEMES.get(name), why, p)
        tried.append(f"{name} is not (ORT's kernels off by up to {p.worst_error:.0%}{_failed(p)})")
    return Choice(SCHEMES.get(AUTO[-1]), f"auto: no scheme is exact on this CPU ({host}); {'; '.join(tried)}", p)


def _failed(p: Probe) -> str:
    return f": {p.failing[0]}" if p.failing and p.failing[0].startswith("error") else ""
