"""Depth pruning: find the residual blocks a network can lose whole, rank them, replace them by identity.

At batch 1 on a CPU the latency of a small convolutional network follows the number of layers more
than their width (each ONNX Runtime node has a fixed cost), so removing a whole block is the lever
channel pruning lacks. A block can go when its output is its input plus a residual branch with an
*identity* shortcut: replacing it by ``nn.Identity`` is then the same as zeroing the branch (exactly
so where the block ends in a ReLU of a non-negative input, as in ResNets).

Blocks are found from the code, not from a list of architectures: each module's own ``forward`` is
traced with torch.fx (its children kept as opaque calls) and counts when its output is an ``add`` of
its input (directly or through ``nn.Identity`` children, optionally followed by a ReLU); a forward
pass with hooks then keeps those whose output has their input's shape. CIFAR ResNets, torchvision's
BasicBlock/Bottleneck (``downsample is None``) and InvertedResidual (``use_res_connect``) and timm's
ResNet/EfficientNet blocks all match; a gated branch (layer scale, DropPath) still counts.
Removal edits the module tree only, so compress.structure's checkpoints rebuild it as they are.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from compress.errors import CompressError

__all__ = ["METHODS", "block_importance", "bypassed", "is_residual", "remove_blocks", "residual_blocks"]

METHODS = ("loss", "bn_scale", "output")

_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {F.relu, torch.relu, torch.relu_}


class _OneLevel(fx.Tracer):
    """Traces only the module's own forward: every child is a leaf (an opaque call_module)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _trace(module: nn.Module) -> fx.Graph | None:
    """The module's forward as an fx graph, or None where it cannot be traced symbolically
    (data-dependent control flow, several inputs, ...): such a module is not a removable block.
    Optional arguments (``attn_mask=None``) are traced at their defaults, as the model calls them."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if not params or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    if any(p.default is p.empty for p in params[1:]):
        return None  # a second input without a default: not a one-input block
    fixed = {p.name: p.default for p in params[1:]}  # traced at their defaults (attn_mask=None, ...)
    try:
        return _OneLevel().trace(module, concrete_args=fixed or None)
    except Exception:  # noqa: BLE001 - any tracing failure means "not something we can prove is residual"
        return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target in ("add", "add_")


def _is_relu(node: fx.Node, module: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(module.get_submodule(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELUS or node.target is F.relu
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_identity(child: nn.Module) -> bool:
    """nn.Identity, or an empty nn.Sequential (the CIFAR-ResNet idiom for "no projection")."""
    return isinstance(child, nn.Identity) or (type(child) is nn.Sequential and len(child) == 0)


def _depends_on(node: fx.Node, inp: fx.Node) -> bool:
    """``node`` is computed from the module's input (not only from parameters, buffers or constants)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is inp:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(a for a in n.all_input_nodes)
    return False


def _passes_input(node: Any, inp: fx.Node, module: nn.Module) -> bool:
    """``node`` is the module's input, itself or through nn.Identity children."""
    while isinstance(node, fx.Node) and node is not inp:
        if node.op != "call_module" or not _is_identity(module.get_submodule(str(node.target))):
            return False
        if len(node.args) != 1 or node.kwargs:
            return False
        node = node.args[0]
    return node is inp


def _input_plus(node: Any, inp: fx.Node, module: nn.Module) -> bool:
    """``node`` = input + branch(es): an add with the input (or such an add) as one operand, the
    other a computed tensor. Chains count (``x = x + a(x); x = x + m(x)``: the whole is x + f(x))."""
    if not isinstance(node, fx.Node) or not _is_add(node):
        return False
    operands = list(node.args[:2])
    if len(operands) != 2 or any(k != "alpha" for k in node.kwargs):
        return False
    for this, other in (operands, operands[::-1]):
        if not isinstance(other, fx.Node) or _passes_input(other, inp, module) or not _depends_on(other, inp):
            continue  # x + x, x + a constant, x + self.pos_embed: not a residual branch
        if _passes_input(this, inp, module) or _input_plus(this, inp, module):
            return True
    return False


def is_residual(module: nn.Module) -> bool:
    """Whether ``module``'s own forward returns input + f(input) through an identity shortcut
    (optionally followed by a ReLU), by its code alone; the shape check needs an input (see
    :func:`residual_blocks`). torch.nn's own classes (Sequential, Conv2d, ...) never are."""
    if type(module).__module__.startswith("torch.nn."):
        return False
    graph = _trace(module)
    if graph is None:
        return False
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]  # the input, then any defaults
    outputs = [n for n in graph.nodes if n.op == "output"]
    if not placeholders or len(outputs) != 1:
        return False
    inp, result = placeholders[0], outputs[0].args[0]
    while isinstance(result, fx.Node) and _is_relu(result, module) and len(result.args) == 1:
        result = result.args[0]
    return _input_plus(result, inp, module)


def residual_blocks(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Qualified names of the modules that can be removed whole, in forward order: an identity
    shortcut (:func:`is_residual`), one tensor input, and on ``example`` every call returns a tensor
    of its input's shape and dtype. Innermost only (a torchvision ResNet's ``layer1.0``, never
    ``layer1``); the model itself never counts."""
    candidates = {name: m for name, m in model.named_modules() if name and is_residual(m)}
    order: list[str] = []
    ok = dict.fromkeys(candidates, True)

    def pre(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in order:
                order.append(name)
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
                ok[name] = False

        return hook

    def post(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple, out: Any) -> None:
            x = args[0] if args else None
            if not (isinstance(out, torch.Tensor) and isinstance(x, torch.Tensor)):
                ok[name] = False
            elif out.shape != x.shape or out.dtype != x.dtype:
                ok[name] = False

        return hook

    handles = []
    for name, m in candidates.items():
        handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(m.register_forward_hook(post(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    found = [n for n in order if ok[n]]
    return [n for n in found if not any(o.startswith(f"{n}.") for o in found)]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, child = name.rpartition(".")
    return model.get_submodule(owner), child


@contextlib.contextmanager
def bypassed(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """``names`` replaced by nn.Identity for the duration (a probe); the blocks come back after."""
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name in names:
            parent, child = _parent(model, name)
            saved.append((parent, child, parent._modules[child]))
            parent._modules[child] = nn.Identity()
        yield
    finally:
        for parent, child, module in reversed(saved):
            parent._modules[child] = module


def remove_blocks(model: nn.Module, names: list[str]) -> None:
    """Replace each named block by nn.Identity in place. Every name is checked first (it must exist
    and be residual by :func:`is_residual`), so a bad one leaves the model untouched."""
    for name in names:
        try:
            block = model.get_submodule(name) if name else model
        except AttributeError:
            raise CompressError(f"{name!r} is not a module of the {type(model).__name__}") from None
        if not name or not is_residual(block):
            raise CompressError(
                f"{name!r} ({type(block).__name__}) is not a removable residual block (one whose output is its "
                "input plus a branch, through an identity shortcut)"
            )
    if len(set(names)) != len(names):
        raise CompressError(f"a block is named twice in {names}")
    for name in names:
        parent, child = _parent(model, name)
        parent._modules[child] = nn.Identity()


def _last_batch_norm(block: nn.Module, name: str) -> nn.modules.batchnorm._BatchNorm:
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    if not norms:
        raise CompressError(f"block {name!r} has no BatchNorm with a scale; rank it with method loss or output")
    return norms[-1]  # the branch's last one: the shortcut is identity, so every BatchNorm is on the branch


def _probe_batches(loader: Any, batches: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if loader is None:
        raise CompressError("this importance method measures the model on data: give it a loader")
    kept = []
    for x, y in loader:
        kept.append((x.to(device), y.to(device)))
        if len(kept) == batches:
            break
    if not kept:
        raise CompressError("the probe loader yielded no batch")
    return kept


def _logits(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    return [model(x).float() for x, _ in data]


def block_importance(
    model: nn.Module,
    names: list[str],
    loader: Any,
    device: torch.device,
    method: str = "loss",
    batches: int = 8,
) -> dict[str, float]:
    """Each block's importance, higher = more important, each measured with that block alone removed.

    ``loss``: increase of the mean cross-entropy over ``batches`` batches of ``loader`` (eval mode,
    no gradients; may be negative where the block hurt). ``bn_scale``: mean |gamma| of the branch's
    last BatchNorm (no data; ``loader`` may be None). ``output``: relative L2 change of the logits,
    ||z' - z|| / ||z|| over the same batches.
    """
    if method not in METHODS:
        raise CompressError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method == "bn_scale":
        return {n: float(_last_batch_norm(model.get_submodule(n), n).weight.detach().abs().mean()) for n in names}
    data = _probe_batches(loader, batches, device)
    was_training = model.training
    model.eval()
    scores: dict[str, float] = {}
    try:
        with torch.no_grad():
            base = _logits(model, data)
            base_loss = sum(F.cross_entropy(z, y, reduction="sum") for z, (_, y) in zip(base, data, strict=True))
            count = sum(len(y) for _, y in data)
            base_norm = torch.sqrt(sum(z.pow(2).sum() for z in base))
            for name in names:
                with bypassed(model, [name]):
                    now = _logits(model, data)
                if method == "loss":
                    loss = sum(F.cross_entropy(z, y, reduction="sum") for z, (_, y) in zip(now, data, strict=True))
                    scores[name] = float((loss - base_loss) / count)
                else:
                    diff = torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(now, base, strict=True)))
                    scores[name] = float(diff / base_norm.clamp_min(1e-12))
    finally:
        model.train(was_training)
    return scores
