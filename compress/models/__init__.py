"""Model registry and factory.

A model name is one of:
  * a registered name (``compress list`` shows them): CIFAR ResNets, the digits CNN pair;
  * ``torchvision:<name>`` — any torchvision classifier, ``num_classes`` adapted;
  * ``timm:<name>`` — any timm model, ``num_classes`` and ``in_chans`` through timm's own arguments;
  * ``package.module:function`` — a user factory called as ``function(num_classes=..., in_channels=...,
    **kwargs)`` (``in_channels`` only if the function accepts it), imported from the recipe's folder,
    then the working directory (:mod:`compress.userpath`).
Random init by default; weights come from ``checkpoint:`` (a file), ``weights:`` (torchvision's
published weights) or ``pretrained: true`` (timm's), loaded by :func:`compress.checkpoint.build_from_spec`
with ``head:`` deciding what happens to the classifier (see :mod:`compress.models.heads`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn

from compress import userpath
from compress.errors import CompressError, first_line
from compress.models.timm_models import PREFIX as TIMM
from compress.models.timm_models import build_timm, check_timm_name
from compress.registry import Registry

ModelFactory = Callable[..., nn.Module]
#: discovered: every module of this package, plus installed plugins of the group ``compress.models``
MODELS: Registry[ModelFactory] = Registry("model", package=__name__, group="compress.models")
TORCHVISION = "torchvision:"


def check_model_name(name: str) -> str:
    """Validate a model name without building it (used at recipe-load time)."""
    if name.startswith(TORCHVISION):
        import torchvision

        tv_name = name.split(":", 1)[1]
        known = torchvision.models.list_models(module=torchvision.models)
        if tv_name not in known:
            import difflib

            close = difflib.get_close_matches(tv_name, known, n=3)
            hint = f"; did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
            raise ValueError(f"unknown torchvision classifier {tv_name!r}{hint}")
        return name
    if name.startswith(TIMM):
        return check_timm_name(name)
    if ":" in name:
        userpath.split(name)
        return name
    if name not in MODELS:
        raise ValueError(MODELS.unknown_message(name))
    return name


class ModelSpec(BaseModel):
    """A model in a recipe: a name, optional weights, optional factory arguments."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="registered name, 'torchvision:<name>', 'timm:<name>' or 'package.module:function'")
    checkpoint: Path | None = Field(
        None,
        description="weights file: .pt/.pth (read weights-only) or .safetensors; a state_dict, {state_dict: ...}, "
        "{model: ...} or a compress checkpoint",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments for the model factory")
    head: Literal["keep", "reset"] | None = Field(
        None,
        description="the loaded weights' classifier: keep (its class count must match the data's) or reset "
        "(re-initialized); default: reset when the class counts differ, with a notice",
    )
    weights: str | None = Field(
        None, description="torchvision: models only: published weights to start from (DEFAULT, IMAGENET1K_V1, ...)"
    )
    pretrained: bool = Field(False, description="timm: models only: start from timm's pretrained weights")

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

    @field_validator("kwargs")
    @classmethod
    def _not_weights(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from compress.files import to_json

        try:  # every checkpoint records the kwargs (the .safetensors twin as JSON): they must be plain data
            to_json(v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"factory arguments must be plain data (string keys, numbers, strings): {exc}") from None
        name = str(info.data.get("model", ""))
        if "weights" in v and name.startswith(TORCHVISION):
            raise ValueError(f"weights are not a factory argument: use the model's own field, weights: {v['weights']}")
        if "pretrained" in v and name.startswith(TIMM):
            raise ValueError("pretrained is not a factory argument: use the model's own field, pretrained: true")
        return v

    @field_validator("weights")
    @classmethod
    def _published(cls, v: str | None, info: ValidationInfo) -> str | None:
        name = info.data.get("model")
        if v is None or name is None:
            return v
        if not name.startswith(TORCHVISION):
            how = "pretrained: true" if name.startswith(TIMM) else "checkpoint: FILE"
            raise ValueError(f"weights: names torchvision's published weights, not {name!r}'s; use {how}")
        from compress.models.pretrained import torchvision_weights

        torchvision_weights(name.removeprefix(TORCHVISION), v)
        return v

    @field_validator("pretrained")
    @classmethod
    def _timm_only(cls, v: bool, info: ValidationInfo) -> bool:
        name = info.data.get("model")
        if v and name is not None and not name.startswith(TIMM):
            how = "weights: DEFAULT" if name.startswith(TORCHVISION) else "checkpoint: FILE"
            raise ValueError(f"pretrained: true loads timm's weights, not {name!r}'s; use {how}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        sources = [s for s, on in (("checkpoint", self.checkpoint), ("weights", self.weights)) if on]
        sources += ["pretrained"] if self.pretrained else []
        if len(sources) > 1:
            raise ValueError(f"{' and '.join(sources)} both give the model's weights: keep one")
        if self.head is not None and not sources:
            raise ValueError("head: applies to loaded weights; add checkpoint:, weights: or pretrained:")
        return self


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a model by name, randomly initialized; raises CompressError for anything the user can fix."""
    if name.startswith(TORCHVISION):
        return _torchvision(name.split(":", 1)[1], num_classes, in_channels, **kwargs)
    if name.startswith(TIMM):
        return build_timm(name, num_classes, in_channels, **kwargs)
    if ":" in name:
        factory = userpath.import_object(name, f"model {name!r}")
        if not callable(factory):
            kind = type(factory).__name__
            raise CompressError(f"model {name!r}: {name.partition(':')[2]!r} is a {kind}, not a function")
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
    except CompressError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's (or library's) factory raised: one line naming it
        raise CompressError(f"model {name!r}: the factory raised {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise CompressError(f"model {name!r}: factory returned {type(model).__name__}, not nn.Module")
    return model


def size_argument(model: nn.Module, name: str, kwargs: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """For a model that failed on the data's images: ``{argument: the data's size}`` when its class takes
    the input size as an argument (torchvision's ViT ``image_size``, MaxViT ``input_size``, timm's
    ``img_size``, read from the class's signature) that ``kwargs`` does not set yet; else ``{}``."""
    if not name.startswith((TORCHVISION, TIMM)):
        return {}
    try:
        params = inspect.signature(type(model).__init__).parameters
    except (TypeError, ValueError):
        return {}
    order = ("img_size",) if name.startswith(TIMM) else ("image_size", "input_size")
    arg = next((p for p in order if p in params), None)
    if arg is None or arg in kwargs:
        return {}
    h, w = size
    return {arg: [h, w] if arg == "input_size" or h != w else h}


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
