"""Saving and loading model weights safely (``torch.load(weights_only=True)`` only).

Our file format is a plain dict: ``{"format": "compress/1", "model": name, "kwargs": {...},
"num_classes": int, "in_channels": int, "pruned": bool, "state_dict": {...}}``. A pruned model's
tensors are smaller than its architecture's defaults; ``load_weights`` rebuilds those shapes (a
layer may only shrink, and only when the file says it was pruned), so no pickled module is needed.
A user's plain state_dict must match the architecture exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError, first_line
from compress.models.attention import SelfAttention, decouple_attention

FORMAT = "compress/1"


def save_model(
    model: nn.Module, path: Path, *, name: str, kwargs: dict, num_classes: int, in_channels: int, pruned: bool
) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "model": name,
        "kwargs": kwargs,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "pruned": pruned,
        "state_dict": state,
    }
    atomic_save(payload, path)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temp file, fsync, rename: a kill leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load(path: Path, field: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        first = first_line(exc, "")
        if len(first) < 12:  # e.g. "101" from the unpickler on a text file: say what it means instead
            first = f"not a PyTorch checkpoint file ({type(exc).__name__})"
        raise CompressError(f"{field}: cannot load {path} as a weights-only checkpoint: {first}") from None


def checkpoint_info(path: Path) -> dict[str, Any] | None:
    """A compress checkpoint's architecture (model, kwargs, num_classes, in_channels); None for a plain state_dict."""
    obj = _load(path, str(path))
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return {k: obj[k] for k in ("model", "kwargs", "num_classes", "in_channels") if k in obj}
    return None


def read_checkpoint(path: Path, role: str, field: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Return (state_dict, pruned) from a compress file, a plain state_dict or {"state_dict": ...}."""
    obj = _load(path, field)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj["state_dict"], bool(obj.get("pruned"))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CompressError(f"{field}: {path} is not a state_dict (a mapping of names to tensors)")
    # Strip DataParallel/DDP and torch.compile prefixes, which users hit all the time.
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj, False


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, pruned: bool, field: str) -> None:
    if pruned:  # attention that lost whole heads was saved as SelfAttention (….qkv.weight): convert to match
        decouple_attention(model, {k.removesuffix(".qkv.weight") for k in state if k.endswith(".qkv.weight")})
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
                pruned
                and tensor.ndim == own[key].ndim
                and all(a <= b for a, b in zip(tensor.shape, own[key].shape, strict=True))
            )
            if not shrinks:
                raise CompressError(
                    f"{field}: checkpoint does not match the model: {key} has shape {tuple(tensor.shape)} "
                    f"in the file but {tuple(own[key].shape)} in the model"
                )
    if pruned:
        _resize_to(model, state)
    model.load_state_dict(state)


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every module the (smaller) tensor shapes recorded by a pruned checkpoint."""
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
