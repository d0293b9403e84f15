"""The classifier of a model: which layer produces the logits, so pretrained weights can be used for
another class count (ImageNet's 1000 → the data's 10) by re-initializing just that layer.

Found without configuration: timm's ``get_classifier()``; torchvision's ``fc`` / ``classifier`` /
``heads`` (the last Linear or Conv inside, which produces the logits: squeezenet's is a 1×1 Conv);
otherwise the model's last Linear.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
_HEAD_NAMES = ("fc", "classifier", "heads", "head")


def _last_layer(module: nn.Module) -> nn.Module | None:
    layers = [m for m in module.modules() if isinstance(m, _LAYERS)]
    return layers[-1] if layers else None


def find_classifier(model: nn.Module, num_classes: int | None = None) -> str | None:
    """The module path of the layer producing ``model``'s logits, or None when there is none. With
    ``num_classes`` (the count the model was built for) a candidate must produce that many outputs:
    a hidden layer that happens to be called ``fc`` is never taken for the classifier."""

    def fits(layer: nn.Module) -> bool:
        return num_classes is None or out_count(layer) == num_classes

    paths = {id(m): p for p, m in model.named_modules()}
    candidates: list[nn.Module] = []
    get = getattr(model, "get_classifier", None)
    if callable(get):  # timm
        try:
            found = get()
        except Exception:  # noqa: BLE001 - a user model's method of that name: fall back to the rules below
            found = None
        for item in found if isinstance(found, (tuple, list)) else [found]:
            if isinstance(item, nn.Module):
                candidates.append(item)
    candidates += [getattr(model, n) for n in _HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    for cand in candidates:
        layer = _last_layer(cand)
        if layer is not None and id(layer) in paths and fits(layer):
            return paths[id(layer)]
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and fits(m)]
    return linears[-1] if linears else None


def out_count(layer: nn.Module) -> int | None:
    """How many outputs a Linear/Conv layer produces (its weight's first dimension)."""
    weight = getattr(layer, "weight", None)
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def module_keys(model: nn.Module, path: str) -> list[str]:
    """The state_dict keys of the module at ``path`` (its own parameters and buffers)."""
    module = model.get_submodule(path)
    prefix = f"{path}." if path else ""
    return [prefix + k for k in module.state_dict(keep_vars=True)]


def fresh_head(current: nn.Module, num_classes: int, donor: nn.Module | None) -> nn.Module:
    """A re-initialized layer like ``current`` producing ``num_classes`` outputs: a copy of ``donor``
    (the layer as the model's factory built it, with its own initialization) when it fits, else a new
    layer of the same kind with PyTorch's default initialization."""
    if donor is not None and type(donor) is type(current) and out_count(donor) == num_classes:
        same_input = donor.weight.shape[1:] == current.weight.shape[1:]  # type: ignore[union-attr]
        if same_input:
            return copy.deepcopy(donor)
    layer = copy.deepcopy(current)
    weight = layer.weight
    assert isinstance(weight, nn.Parameter)
    layer.weight = nn.Parameter(weight.new_empty((num_classes, *weight.shape[1:])))
    if getattr(layer, "bias", None) is not None:
        layer.bias = nn.Parameter(weight.new_empty((num_classes,)))
    if isinstance(layer, nn.Linear):
        layer.out_features = num_classes
    else:
        layer.out_channels = num_classes  # type: ignore[assignment]
    layer.reset_parameters()  # type: ignore[operator]
    return layer


def replace_head(model: nn.Module, path: str, num_classes: int, donor: nn.Module | None) -> None:
    """Swap the layer at ``path`` for :func:`fresh_head`'s (the model's ``num_classes`` follows)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, name, fresh_head(parent.get_submodule(name), num_classes, donor))
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes  # timm models read it


def notice(field: str, source: str, theirs: int, ours: int, path: str) -> None:
    """The one-line notice that a pretrained classifier was re-initialized for the data's classes."""
    logging.getLogger("compress.models").warning(
        "%s: %s has %d classes, the data %d: classifier %r re-initialized (head: keep to refuse)",
        field,
        source,
        theirs,
        ours,
        path,
    )


def aux_heads(model: nn.Module, state: dict[str, torch.Tensor], theirs: int, ours: int) -> set[str]:
    """Keys of other layers that produce class scores (Inception's and GoogLeNet's auxiliary heads):
    ``ours`` outputs in the model, ``theirs`` in the file, the rest of their shape the same."""
    keys: set[str] = set()
    own = model.state_dict()
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if theirs == ours or out_count(module) != ours or key not in state or key not in own:
            continue
        if state[key].shape[0] == theirs and state[key].shape[1:] == own[key].shape[1:]:
            keys |= set(module_keys(model, name))
    return keys
