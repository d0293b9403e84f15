"""Saving and loading models safely: ``torch.load(weights_only=True)`` only, never a pickled module.

A checkpoint is a plain dict of plain data and tensors (format ``compress/2``)::

    {"format": "compress/2", "model": NAME, "kwargs": {...}, "num_classes": int, "in_channels": int,
     "structure": [ENTRY, ...], "state_dict": {name: tensor}}

``structure`` is the model's module tree as data, one ENTRY per module in pre-order::

    {"path": "features.1", "type": "torch.nn.modules.linear.Identity",
     "attrs": {...},             # the module's own plain attributes (numbers, strings, tuples, tensors)
     "opaque": [...],            # names of attributes that are not plain data (functions, objects)
     "params": [{"name": "weight", "shape": [...], "dtype": "float32", "grad": True}, ...],
     "buffers": [{"name": "running_mean", "shape": [...], "dtype": "float32", "persistent": True}, ...],
     "children": ["0", "1"]}
    # shared modules and tied tensors: {"path": ..., "same_as": PATH}; a None child: {"path": ..., "type": None}

Rebuilding (``Checkpoint.load_into``) starts from the model as its factory builds it (NAME, kwargs)
and reconciles it with the record: a module whose class matches the factory's at the same path is
reused (so code-level attributes such as activation functions survive), any other is created from
its class without running ``__init__`` and given the recorded attributes, parameters, buffers and
children; then the state_dict is loaded strictly. Classes come only from an allow-list: torch.nn's
own, those of the model's own modules (the classes in the factory-built model and their modules),
and any registered with :func:`allow_module_type`. Nothing in a file is ever imported or executed.

The contract for a stage that changes a model's structure (shrinks widths, folds BatchNorm, removes
a block, swaps a layer): nothing to declare. Every snapshot records the live module tree, so reload,
``--resume``, ``compress bench`` and the memory measurement rebuild exactly what the stage left,
provided that (1) every module is of an allowed class and (2) a module the factory would not build
at that path keeps its settings in plain attributes. ``Context.snapshot`` checks both when it saves
(see :func:`rebuild_problem`), so a stage that breaks them fails at its own checkpoint, not later.

Older files still load: ``compress/1`` (widths only, with a ``pruned`` flag) and plain state_dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.errors import CompressError, first_line
from compress.files import atomic_save, safe_load
from compress.models import ModelSpec, build_model
from compress.models.attention import SelfAttention, decouple_attention
from compress.structure import StructureError, describe, rebuild

if TYPE_CHECKING:
    from compress.data import DataBundle

FORMAT = "compress/2"
LEGACY = "compress/1"  # no structure record; ``pruned: true`` meant "tensors may be narrower"
FORMATS = (FORMAT, LEGACY)


def save_model(
    model: nn.Module,
    path: Path,
    *,
    name: str,
    kwargs: dict,
    num_classes: int,
    in_channels: int,
    structure: list[dict[str, Any]] | None = None,
) -> None:
    """Save ``model`` as a compress/2 checkpoint (its structure recorded, see the module docstring)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "model": name,
        "kwargs": kwargs,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "structure": structure if structure is not None else describe(model),
        "state_dict": state,
    }
    atomic_save(payload, path)


@dataclass
class Checkpoint:
    """A loaded checkpoint file: its tensors and whatever it says about its model."""

    path: Path
    state: dict[str, torch.Tensor]
    model: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    in_channels: int | None = None
    structure: list[dict[str, Any]] | None = None  # compress/2
    pruned: bool = False  # compress/1's flag: tensors may be narrower than the factory's

    def build(
        self, field: str, *, model: str | None = None, num_classes: int | None = None, in_channels: int | None = None
    ) -> nn.Module:
        """The model this file holds, in eval mode (``model`` etc. name it for a plain state_dict)."""

        name = model or self.model
        classes = num_classes if num_classes is not None else self.num_classes
        if name is None or classes is None:
            raise CompressError(f"{field}: {self.path} is a plain state_dict and does not name its model")
        channels = in_channels if in_channels is not None else (self.in_channels or 3)
        net = build_model(name, classes, channels, **self.kwargs)
        self.load_into(net, field)
        return net.eval()

    def load_into(self, model: nn.Module, field: str) -> None:
        """Give ``model`` (as its factory built it) this file's structure and weights."""
        if self.structure is not None:
            try:
                rebuild(model, self.structure)
            except StructureError as exc:
                raise CompressError(f"{field}: cannot rebuild the model {self.path} records: {exc}") from None
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                raise CompressError(
                    f"{field}: {self.path} has a malformed structure record ({type(exc).__name__}: {first_line(exc)})"
                ) from None
            _check_keys(model, self.state, field, exact=True)
            _load_state(model, self.state, field)
            return
        load_weights(model, self.state, pruned=self.pruned, field=field)


def open_checkpoint(path: Path, field: str) -> Checkpoint:
    """Read a compress checkpoint (compress/2 or compress/1), a plain state_dict or {"state_dict": ...}."""
    obj = safe_load(path, field)
    if isinstance(obj, dict) and obj.get("format") in FORMATS:
        state = obj.get("state_dict")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CompressError(f"{field}: {path} is a damaged compress checkpoint (no state_dict of tensors)")
        structure = obj.get("structure") if obj["format"] == FORMAT else None
        if obj["format"] == FORMAT and not isinstance(structure, list):
            raise CompressError(f"{field}: {path} is a damaged compress checkpoint (no structure record)")
        kwargs = obj.get("kwargs") or {}
        if not isinstance(kwargs, dict) or not isinstance(obj.get("model"), str):
            raise CompressError(f"{field}: {path} is a damaged compress checkpoint (model name or kwargs)")
        return Checkpoint(
            path=Path(path),
            state=state,
            model=obj["model"],
            kwargs=kwargs,
            num_classes=obj.get("num_classes"),
            in_channels=obj.get("in_channels"),
            structure=structure,
            pruned=bool(obj.get("pruned")),
        )
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CompressError(f"{field}: {path} is not a state_dict (a mapping of names to tensors)")
    # Strip DataParallel/DDP and torch.compile prefixes, which users hit all the time.
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return Checkpoint(path=Path(path), state=obj)


def load_model(path: Path, field: str, **names: Any) -> nn.Module:
    """Open ``path`` and rebuild its model (see :meth:`Checkpoint.build`)."""
    return open_checkpoint(path, field).build(field, **names)


# --------------------------------------------------------------------------- the two-step API (older callers)
def checkpoint_info(path: Path) -> dict[str, Any] | None:
    """A compress checkpoint's architecture (model, kwargs, num_classes, in_channels); None for a plain state_dict."""
    ck = open_checkpoint(path, str(path))
    if ck.model is None:
        return None
    return {"model": ck.model, "kwargs": ck.kwargs, "num_classes": ck.num_classes, "in_channels": ck.in_channels}


def read_checkpoint(path: Path, role: str, field: str) -> tuple[dict[str, torch.Tensor], Any]:
    """(state_dict, layout) for :func:`load_weights`: the structure record (compress/2), compress/1's
    pruned flag, or False for a plain state_dict. Prefer :func:`open_checkpoint`."""
    del role
    ck = open_checkpoint(path, field)
    return ck.state, (_Layout(ck.structure) if ck.structure is not None else ck.pruned)


@dataclass(frozen=True)
class _Layout:
    """read_checkpoint's second value for a compress/2 file (truthy, like compress/1's pruned flag)."""

    structure: list[dict[str, Any]]


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, pruned: Any, field: str) -> None:
    """Load ``state`` into ``model``: ``pruned`` is read_checkpoint's layout (a structure record, or
    True for tensors that may be narrower than the model's: compress/1 files), False for exact shapes."""
    if isinstance(pruned, _Layout):
        Checkpoint(path=Path(field), state=state, structure=pruned.structure).load_into(model, field)
        return
    if pruned:  # attention that lost whole heads was saved as SelfAttention (….qkv.weight): convert to match
        decouple_attention(model, {k.removesuffix(".qkv.weight") for k in state if k.endswith(".qkv.weight")})
    _check_keys(model, state, field, exact=not pruned)
    if pruned:
        _resize_to(model, state)
    _load_state(model, state, field)


def _check_keys(model: nn.Module, state: dict[str, torch.Tensor], field: str, *, exact: bool) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        bits = []
        if missing:
            bits.append(f"missing {len(missing)} keys (e.g. {missing[0]!r})")
        if unexpected:
            bits.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]!r})")
        raise CompressError(f"{field}: checkpoint does not match the model: {', '.join(bits)}")
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            shrinks = (
                not exact
                and tensor.ndim == own[key].ndim
                and all(a <= b for a, b in zip(tensor.shape, own[key].shape, strict=True))
            )
            if not shrinks:
                raise CompressError(
                    f"{field}: checkpoint does not match the model: {key} has shape {tuple(tensor.shape)} "
                    f"in the file but {tuple(own[key].shape)} in the model"
                )


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], field: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # e.g. a dtype a parameter cannot take; the detail is on the second line
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CompressError(f"{field}: checkpoint does not load into the model: {' '.join(lines[:2])}") from None


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every module the (smaller) tensor shapes recorded by a compress/1 pruned checkpoint."""
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for attr, current in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            saved = state.get(prefix + attr)
            if saved is None or saved.shape == current.shape:
                continue
            fresh = torch.empty(saved.shape, dtype=current.dtype)
            if isinstance(current, nn.Parameter):
                setattr(module, attr, nn.Parameter(fresh, requires_grad=current.requires_grad))
            else:
                module.register_buffer(attr, fresh)
    sync_attributes(model)


def sync_attributes(model: nn.Module) -> None:
    """Keep the hyper-parameters that forward() and repr() read consistent with (pruned) tensors."""
    for module in model.modules():
        _fix_attributes(module)


def _fix_attributes(module: nn.Module) -> None:
    if isinstance(module, SelfAttention):  # whole heads removed; each head keeps its width
        module.num_heads = module.qkv.weight.shape[0] // (3 * module.head_dim)
    elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        module.embed_dim = module.kdim = module.vdim = module.in_proj_weight.shape[1]
        module.head_dim = module.embed_dim // module.num_heads
    elif hasattr(module, "hidden_dim") and isinstance(getattr(module, "conv_proj", None), nn.Conv2d):
        module.hidden_dim = module.conv_proj.weight.shape[0]  # torchvision VisionTransformer reshapes by it
    elif isinstance(module, nn.modules.conv._ConvNd):
        was_depthwise = module.groups > 1 and module.groups == module.in_channels
        module.out_channels = module.weight.shape[0]
        if was_depthwise:
            module.groups = module.out_channels
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (
            module.running_mean.shape[0] if module.running_mean is not None else module.weight.shape[0]
        )
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]


def build_from_spec(spec: ModelSpec, data: DataBundle, field: str, role: str = "") -> nn.Module:
    """Build ``spec``'s model for ``data``, load its checkpoint and check one forward pass; every
    user error is a CompressError naming ``field`` (``teacher``, ``stages.1.teachers.0``)."""
    model = build_model(spec.model, data.num_classes, data.channels, **spec.kwargs)
    if spec.checkpoint is not None:  # its recorded structure (pruned, folded, ...) included
        open_checkpoint(spec.checkpoint, f"{field}.checkpoint").load_into(model, f"{field}.checkpoint")
    x = data.example_input(2)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # noqa: BLE001 - a model that cannot take the data is a recipe error
        raise CompressError(
            f"{field}.model: {spec.model!r} cannot run on inputs of shape {tuple(x.shape)}: {first_line(exc)}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, data.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CompressError(f"{field}.model: {spec.model!r} returns {shape}, expected logits (2, {data.num_classes})")
    return model
