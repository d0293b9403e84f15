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

The same record can be a ``.safetensors`` file (``save_model`` to a path with that suffix; every
snapshot writes one beside its ``.pt``): the state_dict as its tensors, and ``format``, ``model``,
``kwargs``, ``num_classes``, ``in_channels`` and ``structure`` as metadata, each value JSON
(:func:`compress.files.to_json`). Reading one runs no code at all.

Older files still load: ``compress/1`` (widths only, with a ``pruned`` flag) and plain state_dicts
(``.pt``/``.pth``/``.safetensors``, bare or as ``{"state_dict": ...}`` / ``{"model": ...}``, with
DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes dropped). A plain state_dict whose
classifier has another class count than the data's gets a fresh classifier (``head:``, see
:func:`build_from_spec`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.errors import CompressError, first_line
from compress.files import (
    atomic_save,
    from_json,
    is_safetensors,
    load_safetensors,
    safe_load,
    save_safetensors,
    to_json,
)
from compress.models import TORCHVISION, ModelSpec, build_model, size_argument
from compress.models.attention import SelfAttention, decouple_attention
from compress.models.heads import aux_heads, find_classifier, module_keys, notice, out_count, replace_head
from compress.structure import StructureError, describe, rebuild

if TYPE_CHECKING:
    from compress.data import ImageData

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
    """Save ``model`` as a compress/2 checkpoint (its structure recorded, see the module docstring):
    a torch file, or a safetensors file when ``path`` ends in ``.safetensors``."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    record = {
        "format": FORMAT,
        "model": name,
        "kwargs": kwargs,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "structure": structure if structure is not None else describe(model),
    }
    if Path(path).suffix == ".safetensors":
        save_safetensors(state, {k: to_json(v) for k, v in record.items()}, path)
    else:
        atomic_save({**record, "state_dict": state}, path)


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


def _read_safetensors(path: Path, field: str) -> Any:
    """A safetensors file as :func:`safe_load` would return its torch twin: the record with its state_dict,
    or the bare tensors of a file compress did not write."""
    tensors, metadata = load_safetensors(path, field)
    if not metadata.get("format", "").startswith('"compress/'):
        return tensors
    try:
        record = {k: from_json(v) for k, v in metadata.items() if k != "state_dict"}
    except Exception as exc:  # noqa: BLE001 - a crafted record (nested past the recursion limit, bad tensors)
        raise CompressError(f"{field}: {path} is a damaged compress checkpoint (metadata: {first_line(exc)})") from None
    return {**record, "state_dict": tensors}


def open_checkpoint(path: Path, field: str) -> Checkpoint:
    """Read a compress checkpoint (compress/2 or compress/1; torch or safetensors) or a plain state_dict
    (bare, {"state_dict": ...} or {"model": ...})."""
    obj = _read_safetensors(path, field) if is_safetensors(path) else safe_load(path, field)
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
    for wrapper in ("state_dict", "model"):  # training scripts' {"model": ..., "optimizer": ...} too
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
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


def _check_keys(
    model: nn.Module, state: dict[str, torch.Tensor], field: str, *, exact: bool, skip: frozenset[str] = frozenset()
) -> None:
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    state = {k: v for k, v in state.items() if k not in skip}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        bits = []
        if missing:
            bits.append(f"missing {len(missing)} keys (e.g. {missing[0]!r})")
        if unexpected:
            bits.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]!r})")
        raise CompressError(f"{field}: checkpoint does not match the model: {', '.join(bits)}")
    wrong = []
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            shrinks = (
                not exact
                and tensor.ndim == own[key].ndim
                and all(a <= b for a, b in zip(tensor.shape, own[key].shape, strict=True))
            )
            if not shrinks:
                wrong.append(f"{key} has shape {tuple(tensor.shape)} in the file but {tuple(own[key].shape)}")
    if wrong:
        more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise CompressError(f"{field}: checkpoint does not match the model: {'; '.join(wrong[:3])}{more}")


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], field: str, *, strict: bool = True) -> None:
    if getattr(state, "_metadata", None) is None:
        # A file without state_dict's per-module versions (ours store tensors only; so do safetensors):
        # it is read as the version the model's own code writes. Modules that check it (MNASNet refuses
        # None) load, and none takes the old-format path of a version it was not written in.
        from collections import OrderedDict

        state = OrderedDict(state)
        state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=strict)
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


def build_from_spec(spec: ModelSpec, data: ImageData, field: str, role: str = "") -> nn.Module:
    """Build ``spec``'s model for ``data``, load its weights (``checkpoint:``, ``weights:`` or
    ``pretrained:``, the classifier as ``head:`` says) and check one forward pass; every user error is
    a CompressError naming ``field`` (``teacher``, ``stages.1.teachers.0``)."""
    from compress.models import pretrained as published

    n, channels = data.num_classes, data.channels
    if spec.pretrained:  # timm's own loading (cache, in_chans, classifier) with our head rules
        model = published.build_timm_pretrained(
            spec.model, n, channels, head=spec.head, field=f"{field}.pretrained", **spec.kwargs
        )
    elif spec.weights is not None:
        tv_name = spec.model.removeprefix(TORCHVISION)
        model = build_model(spec.model, n, channels, **{**published.implied_kwargs(tv_name), **spec.kwargs})
        state, label = published.torchvision_state(tv_name, spec.weights, f"{field}.weights")
        ck = Checkpoint(path=Path(label), state=published.adapt_input(model, state))
        load_pretrained(model, ck, f"{field}.weights", head=spec.head, num_classes=n, source=label, notice_as=field)
    else:
        model = build_model(spec.model, n, channels, **spec.kwargs)
        if spec.checkpoint is not None:  # its recorded structure (pruned, folded, ...) included
            ck = open_checkpoint(spec.checkpoint, f"{field}.checkpoint")
            if ck.model is None:
                ck.state = published.adapt_input(model, ck.state)
            source = f"checkpoint {spec.checkpoint.name}"
            load_pretrained(
                model, ck, f"{field}.checkpoint", head=spec.head, num_classes=n, source=source, notice_as=field
            )
    x = data.example_input(2)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # noqa: BLE001 - a model that cannot take the data is a recipe error
        why = first_line(exc)
        hint = _size_hint(spec, data, x, model)
        raise CompressError(
            f"{field}.model: {spec.model!r} cannot run on inputs of shape {tuple(x.shape)}: "
            f"{why.rstrip('.') if hint else why}{hint}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, data.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CompressError(f"{field}.model: {spec.model!r} returns {shape}, expected logits (2, {data.num_classes})")
    return model


def _size_hint(spec: ModelSpec, data: ImageData, x: torch.Tensor, model: nn.Module) -> str:
    """ "; ... kwargs: {image_size: 32}" for a native-image-size model whose input-size argument makes it
    run on the data (tried: a fresh build and one forward pass); what still fails if it does not."""
    extra = size_argument(model, spec.model, spec.kwargs, (int(x.shape[-2]), int(x.shape[-1])))
    if not extra:
        return ""
    ((arg, value),) = extra.items()
    shown = f"kwargs: {{{arg}: {value}}}".replace("'", "")
    try:
        with torch.no_grad():
            build_model(spec.model, data.num_classes, data.channels, **spec.kwargs, **extra).eval()(x)
    except Exception as exc:  # noqa: BLE001 - the model cannot take this size at all
        why = first_line(exc).removeprefix(f"model {spec.model!r}: ")
        return f"; its input-size argument does not make it fit either ({shown}: {why})"
    return f"; this model takes its input size as an argument: {shown}"


def load_pretrained(
    model: nn.Module, ck: Checkpoint, field: str, *, head: str | None, num_classes: int, source: str, notice_as: str
) -> None:
    """Load ``ck`` into ``model`` (built for the data's ``num_classes``), the classifier as ``head`` says:
    None = re-initialize it when the file's class count differs (with a notice), ``reset`` = always,
    ``keep`` = load it (a different count is an error). Any other mismatch is one line."""
    path = find_classifier(model, num_classes)
    if path is None and head == "reset":
        raise CompressError(
            f"{field}: head: reset needs the model's classifier, but no layer producing the {num_classes} "
            "logits was found (timm's get_classifier(), fc/classifier/heads, or a Linear with that many outputs)"
        )
    if ck.structure is not None or ck.model is not None:  # a compress checkpoint: its own classifier record
        theirs = ck.num_classes
    else:
        weight = ck.state.get(f"{path}.weight") if path is not None else None
        theirs = int(weight.shape[0]) if weight is not None and weight.ndim else None
    if path is None or theirs is None or (theirs == num_classes and head != "reset"):
        ck.load_into(model, field)
        return
    if head == "keep":
        shapes = ""
        if f"{path}.weight" in ck.state:
            mine = tuple(model.get_submodule(path).weight.shape)  # type: ignore[union-attr]
            shapes = f" ({path}.weight is {tuple(ck.state[path + '.weight'].shape)} in the file, {mine} in the model)"
        raise CompressError(
            f"{field}: head: keep loads the classifier {path!r} from {source}, which has {theirs} classes, but "
            f"the data has {num_classes}{shapes}; leave head unset (or head: reset) to re-initialize it"
        )
    donor = copy.deepcopy(model.get_submodule(path))
    if ck.structure is not None:  # rebuild as recorded, then give the rebuilt model a fresh classifier
        ck.load_into(model, field)
        layer = model.get_submodule(path) if path in dict(model.named_modules()) else None
        if layer is None or out_count(layer) is None:
            raise CompressError(f"{field}: {source} has no classifier at {path!r} to re-initialize")
        replace_head(model, path, num_classes, donor)
    else:
        skip = set(module_keys(model, path)) | aux_heads(model, ck.state, theirs, num_classes)
        if ck.model is not None and ck.pruned:
            raise CompressError(f"{field}: {source} is an old pruned checkpoint; its classifier cannot be reset")
        _check_keys(model, ck.state, field, exact=True, skip=frozenset(skip))
        _load_state(model, {k: v for k, v in ck.state.items() if k not in skip}, field, strict=False)
    if theirs != num_classes:
        notice(notice_as, source, theirs, num_classes, path)
