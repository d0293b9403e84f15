"""Run a compress ONNX model with nothing but numpy, onnxruntime and Pillow.

Every model ``compress run`` exports describes itself in its ONNX ``metadata_props``: class names,
input name/dtype/layout/size, colour mode, normalization, and whether that normalization is inside
the graph. This module reads that description, turns image files into the exact tensor the model
takes, and prints top-k predictions. It imports nothing from the rest of ``compress`` and never
imports torch, so a deployer can copy this one file next to the model:

    python deploy.py model.onnx photo.jpg images/ --top-k 3
    compress predict model.onnx photo.jpg images/ --top-k 3      # the same, installed

Image loading matches evaluation in training: ``PIL.Image.convert`` to the model's colour mode, then,
when the metadata has ``resize_shorter`` (an image folder with ``crop_ratio``), a bilinear resize of
the shorter side to it and a center crop to the input size (:func:`eval_view`, the very function
``compress``'s data loaders evaluate with); otherwise a bilinear resize only when the size differs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

METADATA_VERSION = "1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
COLOR_MODES = {1: "L", 3: "RGB"}
X86_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")  # /proc/cpuinfo names
ARM_ISA = {"asimddp": "dotprod", "i8mm": "i8mm", "bf16": "bf16"}  # /proc/cpuinfo Features name -> ours
#: ONNX Runtime's session option that converts int8 weights to uint8 at load time on x86 without
#: VNNI, so its exact (widening) U8U8 kernels run instead of the saturating U8S8 ones
PRECISION_MODE = ("session.x64quantprecision", "1")
log = logging.getLogger("compress.deploy")


class DeployError(ValueError):
    """A problem with the user's model or images: reported as one line, exit code 2."""


@dataclass(frozen=True)
class ModelInfo:
    """What a deployer must know about the model's input and output; stored as ONNX metadata."""

    class_names: tuple[str, ...]
    channels: int
    height: int
    width: int
    layout: str  # "nhwc" | "nchw"
    input_dtype: str  # "uint8" (raw pixels) | "float32" (already normalized)
    preprocess_in_graph: bool  # True: the graph scales and normalizes uint8 pixels itself
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units: x = (pixels / 255 - mean) / std
    std: tuple[float, ...]
    input_name: str = "images"
    output_name: str = "logits"
    resize: str = "bilinear"
    resize_shorter: int | None = None  # resize the shorter side to this, then center-crop height x width

    @property
    def color_mode(self) -> str | None:
        return COLOR_MODES.get(self.channels)

    @property
    def input_shape(self) -> tuple[str | int, ...]:
        c, h, w = self.channels, self.height, self.width
        return ("N", h, w, c) if self.layout == "nhwc" else ("N", c, h, w)

    def describe(self) -> str:
        dims = "x".join(str(d) for d in self.input_shape)
        how = "normalized in the graph" if self.preprocess_in_graph else "normalize (x/255 - mean)/std first"
        return f"{self.input_name}: {self.input_dtype} {self.layout.upper()} {dims} ({how})"

    # ------------------------------------------------------------------ metadata
    def to_metadata(self) -> dict[str, str]:
        """Plain string keys; structured values are JSON, so any tool can read them."""
        return {
            "compress.metadata_version": METADATA_VERSION,
            "task": "image-classification",
            "class_names": json.dumps(list(self.class_names)),
            "num_classes": str(len(self.class_names)),
            "input_name": self.input_name,
            "input_dtype": self.input_dtype,
            "input_layout": self.layout,
            "input_shape": json.dumps(list(self.input_shape)),
            "image_size": json.dumps([self.height, self.width]),
            "channels": str(self.channels),
            "color_mode": self.color_mode or "",
            "preprocess_in_graph": json.dumps(self.preprocess_in_graph),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "resize": self.resize,
            **({"resize_shorter": str(self.resize_shorter)} if self.resize_shorter else {}),
            "output_name": self.output_name,
            "output": "logits (apply softmax for probabilities)",
        }

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str = "model") -> ModelInfo:
        if "compress.metadata_version" not in props:
            raise DeployError(
                f"{source}: the model has no compress metadata (class names, input layout, normalization); "
                "export it with 'compress run' (export stage)"
            )
        version = props["compress.metadata_version"]
        if version != METADATA_VERSION:
            raise DeployError(
                f"{source}: metadata version {version!r} is not supported (this reader knows {METADATA_VERSION!r})"
            )
        try:
            height, width = json.loads(props["image_size"])
            info = cls(
                class_names=tuple(str(c) for c in json.loads(props["class_names"])),
                channels=int(props["channels"]),
                height=int(height),
                width=int(width),
                layout=props["input_layout"],
                input_dtype=props["input_dtype"],
                preprocess_in_graph=bool(json.loads(props["preprocess_in_graph"])),
                mean=tuple(float(v) for v in json.loads(props["mean"])),
                std=tuple(float(v) for v in json.loads(props["std"])),
                input_name=props["input_name"],
                output_name=props.get("output_name", "logits"),
                resize=props.get("resize", "bilinear"),
                resize_shorter=int(props["resize_shorter"]) if props.get("resize_shorter") else None,
            )
        except KeyError as exc:
            raise DeployError(f"{source}: metadata key {exc.args[0]!r} is missing") from None
        except (ValueError, TypeError) as exc:
            raise DeployError(f"{source}: malformed metadata ({exc})") from None
        if info.layout not in ("nhwc", "nchw") or info.input_dtype not in ("uint8", "float32"):
            raise DeployError(
                f"{source}: metadata input_layout/input_dtype {info.layout!r}/{info.input_dtype!r} unknown"
            )
        if len(info.mean) != info.channels or len(info.std) != info.channels:
            raise DeployError(f"{source}: metadata mean/std do not have one value per channel ({info.channels})")
        return info

    # ------------------------------------------------------------------ tensors
    def prepare(self, images: np.ndarray, layout: str = "nhwc") -> np.ndarray:
        """uint8 images (N, H, W, C) or (N, C, H, W) -> exactly what the graph input takes."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DeployError(f"images must be a uint8 array of rank 4, got {images.dtype} {images.shape}")
        if layout != self.layout:
            images = images.transpose(0, 3, 1, 2) if layout == "nhwc" else images.transpose(0, 2, 3, 1)
        images = np.ascontiguousarray(images)
        if self.preprocess_in_graph:
            return images
        axis = (1, -1, 1, 1) if self.layout == "nchw" else (1, 1, 1, -1)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(axis)
        std = np.asarray(self.std, dtype=np.float32).reshape(axis)
        # The same float32 operations, in the same order, as training's normalization.
        return (images.astype(np.float32) / np.float32(255.0) - mean) / std


# ---------------------------------------------------------------------- images
def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for image suffixes (sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise DeployError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise DeployError(f"{path}: no such file or folder")
    return found


def eval_view(im: Any, height: int, width: int, resize_shorter: int | None) -> Any:
    """A PIL image as evaluation sees it: with ``resize_shorter``, its shorter side resized to that
    (bilinear, the longer side in proportion, truncated) and the center ``height`` x ``width`` cropped
    (offsets rounded, as torchvision's CenterCrop); without, a bilinear resize to the size when it differs."""
    from PIL import Image

    if resize_shorter is None:
        return im if im.size == (width, height) else im.resize((width, height), Image.BILINEAR)
    w, h = im.size
    short = min(w, h)
    size = (resize_shorter, int(resize_shorter * h / w)) if w <= h else (int(resize_shorter * w / h), resize_shorter)
    if short != resize_shorter:
        im = im.resize(size, Image.BILINEAR)
    w, h = im.size
    if w < width or h < height:
        raise DeployError(f"image of {w}x{h} after resizing is smaller than the {width}x{height} crop")
    left, top = int(round((w - width) / 2.0)), int(round((h - height) / 2.0))
    return im.crop((left, top, left + width, top + height))


def load_image(path: str | Path, info: ModelInfo, resize: bool = True) -> np.ndarray:
    """One image file -> uint8 (H, W, C) in the model's colour mode and size.

    As in evaluation: ``convert`` to the colour mode (alpha dropped, EXIF orientation not applied),
    then :func:`eval_view` (resize and center crop as the metadata says).
    """
    from PIL import Image, UnidentifiedImageError

    if info.color_mode is None:
        raise DeployError(
            f"the model takes {info.channels}-channel input; only 1 (L) or 3 (RGB) channels load from images"
        )
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise DeployError(f"{path}: {im.mode} (16-bit or float) pixels; the model takes 8-bit images")
            im = im.convert(info.color_mode)
            if not resize:  # the pixels as they are, or refused
                if im.size != (info.width, info.height):
                    raise DeployError(
                        f"{path}: image is {im.size[0]}x{im.size[1]}, the model takes {info.width}x{info.height} "
                        "(resizing is off)"
                    )
            else:
                im = eval_view(im, info.height, info.width, info.resize_shorter)
            arr = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DeployError(f"{path}: not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise DeployError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated/corrupt files raise all of these
        if isinstance(exc, DeployError):
            raise
        raise DeployError(f"{path}: cannot decode the image ({exc})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


# ---------------------------------------------------------------------- CPU
def cpu_isa(cpuinfo: str | None = None) -> dict[str, Any]:
    """The instruction sets that decide INT8 and bf16 speed and exactness on this CPU:
    ``{"arch": "x86_64" | "arm64" | ..., "flags": [...] | None}`` (None: not readable here).

    From /proc/cpuinfo (or the ``cpuinfo`` text given): x86 ``flags`` (avx2, avx512f, avx512_vnni,
    avx_vnni, amx_int8, avx512_bf16) or arm64 ``Features`` (asimddp as dotprod, i8mm, bf16)."""
    if cpuinfo is None:
        cpuinfo = _host_cpuinfo()
    fields: dict[str, set[str]] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            fields.setdefault(key.strip(), set(value.split()))
    if "flags" in fields:
        return {"arch": "x86_64", "flags": [f for f in X86_ISA if f in fields["flags"]]}
    if "Features" in fields:
        return {"arch": "arm64", "flags": [ours for theirs, ours in ARM_ISA.items() if theirs in fields["Features"]]}
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    return {"arch": arch, "flags": None}


@functools.cache
def _host_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def isa_label(isa: dict[str, Any] | None = None) -> str:
    """``"x86_64 avx2 avx512f avx512_vnni"``: the architecture and the flags ``cpu_isa`` found."""
    isa = isa or cpu_isa()
    flags = isa["flags"]
    return f"{isa['arch']} {' '.join(flags) if flags else 'baseline' if flags is not None else '(flags unknown)'}"


def int8_portability(props: dict[str, str], source: str = "model", isa: dict[str, Any] | None = None) -> str | None:
    """One line when an INT8 file's metadata says its scheme is exact only with instructions this
    CPU lacks (full-range U8S8 weights without VNNI: ONNX Runtime's kernels saturate int16 sums),
    else None. Files without the keys (FP32, older files) pass."""
    needs = props.get("int8_exact_with", "any")
    isa = isa or cpu_isa()
    if needs == "any" or isa["arch"] != "x86_64" or isa["flags"] is None or set(needs.split("|")) & set(isa["flags"]):
        return None
    return (
        f"{source}: INT8 scheme {props.get('int8_scheme', '?')} (quantized on {props.get('int8_isa', 'another CPU')}) "
        f"is exact only with {needs.replace('|', ', ')}, which this CPU ({isa_label(isa)}) lacks: ONNX Runtime's "
        "INT8 kernels saturate here, so accuracy may differ from its report; re-quantize on this CPU "
        "(quantize stage, scheme: auto), or load it with the session option "
        f"{'='.join(PRECISION_MODE)} (exact, slower)"
    )


def int8_exact_session(open_session: Any, opts: Any, source: str, exact: bool = True) -> tuple[Any, str | None]:
    """``open_session(opts)`` and ``int8_portability``'s line for it (or None); with ``exact``, such
    a file is reopened in ORT's precision mode, which computes its scheme exactly on this CPU."""
    sess = open_session(opts)
    line = int8_portability(read_metadata(sess), source)
    if line is None or not exact:
        return sess, line
    opts.add_session_config_entry(*PRECISION_MODE)
    return open_session(opts), f"{line}; loaded so (exact, slower)"


# ---------------------------------------------------------------------- model
def read_metadata(session: Any) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


class Predictor:
    """An onnxruntime session plus the model's own description of its input."""

    def __init__(
        self,
        model: str | Path,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        exact_int8: bool = True,
    ) -> None:
        """``exact_int8``: load an INT8 file whose scheme saturates on this CPU in ORT's precision
        mode (exact, slower) instead of as it is, with a one-line warning either way."""
        import onnxruntime as ort

        path = Path(model)
        if path.is_dir():
            raise DeployError(f"{path}: is a folder, not an ONNX model file")
        if not path.is_file():
            raise DeployError(f"{path}: no such model file")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads

        def open_session(o: Any) -> Any:
            return ort.InferenceSession(
                str(path), sess_options=o, providers=list(providers or ["CPUExecutionProvider"])
            )

        try:
            self.session, self.portability = int8_exact_session(open_session, opts, str(path), exact_int8)
        except Exception as exc:  # noqa: BLE001 - ORT raises several types; the first line says enough
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DeployError(f"{path}: onnxruntime cannot load it: {first}") from None
        self.path = path
        self.metadata = read_metadata(self.session)
        self.info = ModelInfo.from_metadata(self.metadata, str(path))
        self._check_graph()
        if self.portability:
            log.warning("warning: %s", self.portability)

    def _check_graph(self) -> None:
        """The graph's real input must be what the metadata promises, or every answer would be wrong."""
        info = self.info
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != info.input_name:
            names = [i.name for i in inputs]
            raise DeployError(f"{self.path}: graph inputs {names} do not match metadata input_name {info.input_name!r}")
        got = inputs[0]
        want_type = f"tensor({'uint8' if info.input_dtype == 'uint8' else 'float'})"
        dims = list(got.shape)
        expected = list(info.input_shape)
        fixed_ok = len(dims) == 4 and all(
            not isinstance(d, int) or not isinstance(e, int) or d == e
            for d, e in zip(dims[1:], expected[1:], strict=True)
        )
        if got.type != want_type or not fixed_ok:
            raise DeployError(
                f"{self.path}: graph input {got.name!r} is {got.type} {dims}, but the metadata says "
                f"{want_type} {expected}; the model and its metadata do not match"
            )
        outputs = {o.name: o for o in self.session.get_outputs()}
        if info.output_name not in outputs:
            raise DeployError(
                f"{self.path}: graph outputs {list(outputs)} lack metadata output_name {info.output_name!r}"
            )
        width = outputs[info.output_name].shape[-1]
        if isinstance(width, int) and width != len(info.class_names):
            raise DeployError(
                f"{self.path}: the graph outputs {width} logits but the metadata names {len(info.class_names)} classes"
            )

    def logits(self, images: np.ndarray, layout: str = "nhwc") -> np.ndarray:
        feed = {self.info.input_name: self.info.prepare(images, layout)}
        return self.session.run([self.info.output_name], feed)[0]

    def predict(self, images: np.ndarray, top_k: int = 5, layout: str = "nhwc") -> list[list[dict[str, Any]]]:
        """Per image: the top-k classes as {class, index, probability}, most probable first."""
        probs = softmax(self.logits(images, layout))
        k = max(1, min(top_k, probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [
            [{"class": self.info.class_names[i], "index": int(i), "probability": float(p[i])} for i in row]
            for p, row in zip(probs, order, strict=True)
        ]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------- command line
def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="an ONNX model exported by compress (FP32 or INT8)")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--no-resize", action="store_true", help="refuse images whose size differs from the model's")
    p.add_argument("--batch-size", type=int, default=64, help="images per onnxruntime call (default 64)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")


def predict_files(predictor: Predictor, files: Sequence[Path], top_k: int, resize: bool, batch_size: int) -> list[dict]:
    """Predictions per file; ``label`` is the parent folder's name when it is one of the classes."""
    classes = set(predictor.info.class_names)
    out: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        batch = np.stack([load_image(f, predictor.info, resize) for f in chunk])
        for f, top in zip(chunk, predictor.predict(batch, top_k), strict=True):
            label = f.parent.name if f.parent.name in classes else None
            out.append({"image": str(f), "label": label, "top_k": top})
    return out


def run_predict(args: argparse.Namespace, stdout: Any = None) -> int:
    stdout = stdout or sys.stdout
    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise DeployError(f"{flag} must be at least 1, got {value}")
    predictor = Predictor(args.model, threads=args.threads)
    files = find_images(args.images)
    rows = predict_files(predictor, files, args.top_k, not args.no_resize, args.batch_size)
    labelled = [r for r in rows if r["label"] is not None]
    correct = sum(r["top_k"][0]["class"] == r["label"] for r in labelled)
    top1 = correct / len(labelled) if labelled else None
    if args.json:
        doc = {
            "model": str(args.model),
            "input": predictor.info.describe(),
            "predictions": rows,
            "labelled_images": len(labelled),
            "top1": top1,
        }
        print(json.dumps(doc, indent=2), file=stdout)
        return 0
    for r in rows:
        tops = ", ".join(f"{t['class']} {t['probability']:.4f}" for t in r["top_k"])
        name = r["image"] if r["image"].isprintable() else repr(r["image"])  # one line per image, always
        print(f"{name}: {tops}", file=stdout)
    if labelled:
        print(
            f"top-1 {top1:.4f} ({correct}/{len(labelled)} images whose folder is named after a class)",
            file=stdout,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy.py", description="Top-k predictions from a compress ONNX model.")
    add_predict_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_predict(args)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
