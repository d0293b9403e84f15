"""``compress export CHECKPOINT [--model NAME] [--data DATA]``: a checkpoint -> self-describing ONNX.

The file is what the export stage writes (``onnx_api.export_onnx`` -> ``stages.export.export_checked``):
uint8 pixels in, the data's normalization in the graph, class names and the input contract in its
metadata, onnx.checker passed and ONNX Runtime's logits equal to PyTorch's on real test images. A
compress checkpoint names its model; a plain state_dict needs ``--model``. A checkpoint naming a user
factory (``package.module:function``, code that importing runs) is rebuilt only when ``--model`` names
it too, as ``compress bench`` does. Without ``--data`` a checkpoint inside a run uses its recipe's data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress import onnx_api
from compress.checkpoint import open_checkpoint
from compress.commands.bench import PYTHON_OBJECT, check_factory, check_recorded_data
from compress.commands.quantize import data_config, load_data
from compress.errors import CompressError


def _run_data(ckpt: Path) -> dict[str, Any] | None:
    """The data config of the run a checkpoint sits in (run/checkpoints/NN-stage/x.pt), if any."""
    recipe_file = ckpt.resolve().parent.parent.parent / "recipe.resolved.yaml"
    if not recipe_file.is_file():
        return None
    from compress.recipe import load_recipe

    raw = load_recipe(recipe_file, user_code=False).data.model_dump(mode="json")
    check_recorded_data(str(recipe_file), raw, "compress export")
    return raw


def export(
    checkpoint: Path,
    *,
    model: str | None = None,
    data: str | None = None,
    root: str | None = None,
    out: Path | None = None,
    opset: int = 18,
    overwrite: bool = False,
    layout: str = "nhwc",
) -> tuple[Path, onnx_api.Exported]:
    if not checkpoint.is_file():
        raise CompressError(f"{checkpoint}: no such file")
    out = out or checkpoint.with_suffix(".onnx")
    if out.suffix != ".onnx":
        raise CompressError(f"--out: {out} must end in .onnx")
    if out.exists() and not overwrite:
        raise CompressError(f"--out: {out} already exists; pass --overwrite or choose another name")
    if not out.parent.is_dir():
        raise CompressError(f"--out: folder {out.parent} does not exist")
    if not 17 <= opset <= 23:
        raise CompressError(f"--opset: {opset} is outside 17..23")
    ck = open_checkpoint(checkpoint, str(checkpoint))  # not a checkpoint, damaged: one line
    if model is None and ck.model is not None and ck.model.startswith(PYTHON_OBJECT):
        raise CompressError(
            f"{checkpoint}: a checkpoint of a model passed to compress.run as a Python object; only that process "
            "could rebuild it: export from Python (compress.export_onnx), or pass --model NAME"
        )
    trusted = frozenset([model]) if model else frozenset()
    check_factory(checkpoint, ck.model, model, trusted, command="compress export", how=f"--model {ck.model}")
    name = model or ck.model
    if name is None:
        raise CompressError(f"{checkpoint}: a plain state_dict does not name its model; pass --model NAME")
    if data is not None:
        cfg = data_config(data, root=root)
    elif (raw := _run_data(checkpoint)) is not None:
        from pydantic import TypeAdapter, ValidationError

        from compress.recipe import format_validation_error, recipe_model

        try:
            cfg = TypeAdapter(recipe_model().model_fields["data"].annotation).validate_python(raw)
        except ValidationError as exc:
            raise CompressError(format_validation_error(exc, raw, "the run's recipe data") + " (pass --data)") from None
    else:
        raise CompressError(
            "--data: name the data to check parity on and to describe the file with (e.g. --data digits)"
        )
    bundle = load_data(cfg)
    if ck.num_classes is not None and ck.num_classes != bundle.num_classes:
        raise CompressError(
            f"{checkpoint}: the model has {ck.num_classes} classes but the data has {bundle.num_classes}"
        )
    if ck.in_channels is not None and ck.in_channels != bundle.channels:
        raise CompressError(
            f"{checkpoint}: the model takes {ck.in_channels}-channel images but the data has {bundle.channels}"
        )
    net = ck.build(str(checkpoint), model=name, num_classes=bundle.num_classes, in_channels=bundle.channels)
    props = {"model": name, "dataset": cfg.name, "source": checkpoint.name}
    role = checkpoint.stem if checkpoint.stem in ("teacher", "student") else "model"
    props["role"] = role
    result = onnx_api.export_onnx(net, out, data=bundle, opset=opset, input_layout=layout, properties=props)
    return out, result
