"""The metadata every exported ONNX carries, written with onnx and read back with onnxruntime.

Two groups of keys, all plain strings (JSON where structured) in ``metadata_props``:
- the input/output contract a deployer needs, defined in one place: ``compress.deploy.ModelInfo``;
- provenance: recipe name and the sha256 of ``recipe.resolved.yaml``, dataset, model, role,
  precision, the torch artifact it came from, library versions, and (once measured) top-1 on the
  test split. No timestamps, so the same recipe exports the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch

from compress.config import dump_recipe
from compress.data import ImageData
from compress.deploy import ModelInfo, read_metadata
from compress.env import library_versions
from compress.errors import CompressError, first_line
from compress.files import atomic_write

if TYPE_CHECKING:
    import onnxruntime as ort

    from compress.config import RecipeBase


def model_info(data: ImageData, *, preprocess_in_graph: bool, layout: str) -> ModelInfo:
    _, h, w = data.input_shape
    return ModelInfo(
        class_names=tuple(data.class_names),
        channels=data.channels,
        height=h,
        width=w,
        layout=layout,
        input_dtype="uint8" if preprocess_in_graph else "float32",
        preprocess_in_graph=preprocess_in_graph,
        mean=tuple(float(m) for m in data.mean),
        std=tuple(float(s) for s in data.std),
        input_name="images" if preprocess_in_graph else "input",
        resize_shorter=data.eval_resize,
    )


def recipe_sha256(recipe: RecipeBase) -> str:
    """The hash of exactly the text written to ``recipe.resolved.yaml``."""
    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()


def provenance(recipe: RecipeBase, *, role: str, model: str, precision: str, source: str | None) -> dict[str, str]:
    versions = library_versions()
    return {
        "producer": f"compress {versions['compress']}",
        "recipe_name": recipe.name,
        "recipe_sha256": recipe_sha256(recipe),
        "dataset": recipe.data.name,
        "model": model,
        "role": role,
        "precision": precision,
        "source": source or "",
        "versions": json.dumps(versions, sort_keys=True),
    }


def load(path: Path, *, external_data: bool = True) -> onnx.ModelProto:
    """``onnx.load``; a file that cannot be read or parsed (truncated, not ONNX) is one CompressError
    line naming it."""
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except OSError as exc:  # missing, unreadable, or external data that is not there
        name = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise CompressError(f"{path}: cannot read it: {exc.strerror or first_line(exc)}{name}") from None
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends on a damaged file
        raise CompressError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {first_line(exc)})") from None


def save(model: onnx.ModelProto, dest: Path) -> None:
    """``onnx.save`` to a temp file beside ``dest``, fsync, rename: ``dest`` is the old file or the
    complete new one, never half. A failed write (full disk, no permission) removes the temp file and is
    one CompressError line naming ``dest``."""
    atomic_write(dest, lambda fh: onnx.save(model, fh))


def read(path: Path) -> dict[str, str]:
    """The file's ``metadata_props``; a damaged file is one CompressError line naming it."""
    return {p.key: p.value for p in load(path, external_data=False).metadata_props}


def describe_input(props: dict[str, str]) -> str | None:
    return ModelInfo.from_metadata(props).describe() if "compress.metadata_version" in props else None


def update(
    path: Path, props: dict[str, str], strip_node_debug: bool = False, dest: Path | None = None
) -> dict[str, str]:
    """Merge ``props`` into the file's metadata and refresh its doc string; write it atomically to
    ``dest`` (default: in place), so a reader never sees a file without its metadata. Returns it.

    ``strip_node_debug`` drops the exporter's per-node annotations (FX node, Python stack trace with
    local file paths, module hierarchy): a third of a small model's bytes, and nothing a runtime reads.
    """
    model = load(path)
    if strip_node_debug:
        for node in model.graph.node:
            del node.metadata_props[:]
    merged = {p.key: p.value for p in model.metadata_props} | props
    onnx.helper.set_model_props(model, merged)
    if "compress.metadata_version" in merged:
        model.doc_string = doc_string(merged)
    save(model, dest or path)
    return merged


def doc_string(props: dict[str, str]) -> str:
    """One paragraph for tools that show only the doc string (Netron, onnx.helper.printable_graph)."""
    info = ModelInfo.from_metadata(props)
    shown = ", ".join(info.class_names[:10]) + (", ..." if len(info.class_names) > 10 else "")
    what = f"{props.get('model', 'model')} ({props.get('role', '?')}, {props.get('precision', '?')})"
    return (
        f"{what} from compress recipe {props.get('recipe_name', '?')!r}. Input {info.describe()}. "
        f"Output {info.output_name}: float32 N x {len(info.class_names)} logits over [{shown}]. "
        "Full description in metadata_props."
    )


def feeder(sess: ort.InferenceSession, data: ImageData) -> Callable[[torch.Tensor], np.ndarray]:
    """uint8 NCHW test images -> what this session's input takes, read from the model's metadata.

    A model without compress metadata (e.g. exported by hand in a benchmark) gets the normalized
    float tensor the torch model takes.
    """
    props = read_metadata(sess)
    if "compress.metadata_version" not in props:
        return lambda x: data.normalize(x.cpu()).numpy()
    info = ModelInfo.from_metadata(props)
    return lambda x: info.prepare(x.cpu().numpy(), layout="nchw")
