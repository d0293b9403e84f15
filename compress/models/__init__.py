"""Model registry and factory.

A model name is one of:
  * a registered name (``compress list`` shows them): CIFAR ResNets, the digits CNN pair;
  * ``torchvision:<name>`` — any torchvision classifier, random init, ``num_classes`` adapted;
  * ``package.module:function`` — a user factory called as ``function(num_classes=..., in_channels=...,
    **kwargs)`` (``in_channels`` only if the function accepts it).
Nothing is ever downloaded: torchvision models are built with ``weights=None``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from compress.errors import CompressError
from compress.registry import Registry

ModelFactory = Callable[..., nn.Module]
#: discovered: every module of this package, plus installed plugins of the group ``compress.models``
MODELS: Registry[ModelFactory] = Registry("model", package=__name__, group="compress.models")


def check_model_name(name: str) -> str:
    """Validate a model name without building it (used at recipe-load time)."""
    if name.startswith("torchvision:"):
        import torchvision

        tv_name = name.split(":", 1)[1]
        known = torchvision.models.list_models(module=torchvision.models)
        if tv_name not in known:
            import difflib

            close = difflib.get_close_matches(tv_name, known, n=3)
            hint = f"; did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
            raise ValueError(f"unknown torchvision classifier {tv_name!r}{hint}")
        return name
    if ":" in name:
        module, _, func = name.partition(":")
        if not module or not func:
            raise ValueError(f"user model {name!r} must look like 'package.module:function'")
        return name
    if name not in MODELS:
        raise ValueError(MODELS.unknown_message(name))
    return name


class ModelSpec(BaseModel):
    """A model in a recipe: a name, optional weights, optional factory arguments."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="registered name, 'torchvision:<name>' or 'package.module:function'")
    checkpoint: Path | None = Field(None, description="state_dict file (or a compress checkpoint), loaded weights_only")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments for the model factory")

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_model_name(v)

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"{str(v)!r} is not a file" if v.exists() else f"{str(v)!r} does not exist")
        return v


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a model by name; raises CompressError for anything the user can fix."""
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], num_classes, in_channels, **kwargs)
    if ":" in name:
        factory = _user_factory(name)
    else:
        factory = MODELS.get(name)
    try:
        params = inspect.signature(factory).parameters
        call = dict(kwargs, num_classes=num_classes)
        if "in_channels" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            call["in_channels"] = in_channels
        model = factory(**call)
    except TypeError as exc:
        raise CompressError(f"model {name!r}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise CompressError(f"model {name!r}: factory returned {type(model).__name__}, not nn.Module")
    return model


def _user_factory(name: str) -> ModelFactory:
    module_name, _, func_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CompressError(f"model {name!r}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise CompressError(f"model {name!r}: {module_name!r} has no callable {func_name!r}")
    return factory


def _torchvision(tv_name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    except (ValueError, TypeError) as exc:
        raise CompressError(f"model 'torchvision:{tv_name}': {exc}") from None
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first 3-channel conv for one taking ``in_channels`` (e.g. grayscale digits)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                setattr(
                    parent,
                    child_name,
                    nn.Conv2d(
                        in_channels,
                        child.out_channels,
                        child.kernel_size,
                        child.stride,
                        child.padding,
                        child.dilation,
                        1,
                        child.bias is not None,
                    ),
                )
                return
    raise CompressError(f"cannot adapt {type(model).__name__} to {in_channels} input channels")
