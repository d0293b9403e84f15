"""Published weights through each library's own loading: ``weights: NAME`` for ``torchvision:`` models
(torch hub's cache, ``$TORCH_HOME/hub/checkpoints/<file>``) and ``pretrained: true`` for ``timm:``
models (the Hugging Face cache). A download happens only when the machine can; with
``COMPRESS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` (honoured, and set by the tests) nothing is fetched and
weights that are not cached are one line saying where they were looked for and how to give a file.

torchvision's own loader reads the cached file with ``weights_only=False``; here the same file is read
with :func:`compress.files.safe_load` (weights only), so a file planted in the cache runs no code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from compress.errors import CompressError, first_line
from compress.files import safe_load
from compress.models.heads import find_classifier, notice
from compress.models.timm_models import PREFIX as TIMM
from compress.models.timm_models import build_timm

INSTEAD = "or download them yourself and give the file instead: checkpoint: FILE"
_TRUE = ("1", "true", "yes", "on")


def offline() -> str | None:
    """The variable that turns downloads off (``COMPRESS_OFFLINE`` / ``HF_HUB_OFFLINE``), or None."""
    for var in ("COMPRESS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


# --------------------------------------------------------------------------- torchvision: weights: NAME
def torchvision_weights(tv_name: str, weights: str) -> Any:
    """The torchvision weights enum member ``weights`` names for ``tv_name``; ValueError (a field error) if none."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(tv_name)
    except (ValueError, KeyError):
        raise ValueError(f"torchvision:{tv_name} has no published weights") from None
    members = list(enum.__members__)
    if weights not in members:
        raise ValueError(f"torchvision:{tv_name} has no weights {weights!r} (known: {', '.join(members)})")
    return enum[weights]


def cache_file(weights: Any) -> Path:
    """Where torch hub keeps (and torchvision looks for) the file of ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def torchvision_state(tv_name: str, weights: str, field: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, its label) of torchvision's ``weights`` for ``tv_name``, downloaded only if need be."""
    member = torchvision_weights(tv_name, weights)
    label = f"{type(member).__name__}.{member.name}"
    cached = cache_file(member)
    if not cached.is_file():
        off = offline()
        if off is not None:
            raise CompressError(
                f"{field}: torchvision weights {label} are not in {cached} and downloads are off ({off}=1); "
                f"put {member.url} there, {INSTEAD}"
            )
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            match = torch.hub.HASH_REGEX.search(cached.name)
            torch.hub.download_url_to_file(member.url, str(cached), match.group(1) if match else None, progress=False)
        except Exception as exc:  # noqa: BLE001 - no network, a proxy, a bad hash: all one line
            raise CompressError(
                f"{field}: torchvision weights {label} are not in {cached} and could not be downloaded "
                f"({first_line(exc)}); put {member.url} there, {INSTEAD}"
            ) from None
    state = safe_load(cached, field)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CompressError(f"{field}: {cached} is not a state_dict (a mapping of names to tensors)")
    return state, f"weights {member.name}"


def implied_kwargs(tv_name: str) -> dict[str, Any]:
    """Arguments torchvision's builder sets itself when it loads published weights (inputs normalized
    the way those weights were trained), which a ``weights=None`` build must be given."""
    return {"transform_input": True} if tv_name in ("googlenet", "inception_v3") else {}


def adapt_input(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RGB weights for a model built for other channels (grayscale digits): the first conv's weight
    through timm's ``adapt_input_conv`` (summed over RGB for 1 channel, repeated for more)."""
    first = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return state
    key = f"{first[0]}.weight"
    theirs = state.get(key)
    if theirs is None or theirs.ndim != 4 or theirs.shape[1] != 3 or first[1].in_channels == 3:
        return state
    if theirs.shape[0] != first[1].out_channels or first[1].groups != 1:
        return state  # not the same layer: the shape check reports it
    from timm.models import adapt_input_conv

    return {**state, key: adapt_input_conv(first[1].in_channels, theirs)}


# --------------------------------------------------------------------------- timm: pretrained: true
def _timm_location(arch: str) -> tuple[bool, str]:
    """(cached?, where timm's weights for ``arch`` are looked for)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise CompressError(f"model {TIMM + arch!r}: timm publishes no pretrained weights for it")
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        hit = any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
        where = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        return hit, f"{where} ({' or '.join(names)})"
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        return cached.is_file(), str(cached)
    return False, "timm's pretrained config (it names no file)"


def build_timm_pretrained(
    name: str, num_classes: int, in_channels: int, *, head: str | None, field: str, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(pretrained=True)``: timm loads the cached weights, adapts the input channels
    and drops the classifier when the class count differs; ``head`` decides as for a checkpoint."""
    import timm

    arch = name.removeprefix(TIMM)
    cached, where = _timm_location(arch)
    off = offline()
    if not cached and off is not None:
        raise CompressError(
            f"{field}: timm's pretrained weights for {name} are not in {where} and downloads are off ({off}=1); "
            f"run once where the machine can download them, {INSTEAD}"
        )
    theirs = int(timm.models.get_pretrained_cfg(arch).num_classes or 0)
    if head == "keep" and theirs != num_classes:
        raise CompressError(
            f"{field}: head: keep loads timm's classifier for {name}, which has {theirs} classes, but the data "
            f"has {num_classes}; leave head unset (or head: reset) to re-initialize it"
        )
    try:
        model = build_timm(name, num_classes, in_channels, pretrained=True, **kwargs)
    except CompressError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed download or a damaged cached file: one line
        raise CompressError(
            f"{field}: timm's pretrained weights for {name} could not be loaded from {where} "
            f"({type(exc).__name__}: {first_line(exc)}); {INSTEAD}"
        ) from None
    if theirs != num_classes:
        notice(field, f"timm's pretrained {name}", theirs, num_classes, find_classifier(model) or "?")
    elif head == "reset":
        model.reset_classifier(num_classes)
    return model
