"""A model's module tree as plain data, and the rebuild from it: how a checkpoint carries any
structural change a stage made (narrower tensors, a BatchNorm folded away, a block removed, a layer
swapped) without pickling a module.

:func:`describe` records one entry per module in pre-order (class, plain attributes, the names of
attributes that are not plain data, parameter and buffer shapes/dtypes, children; shared modules and
tied tensors as references). :func:`rebuild` reconciles a factory-built model with such a record: a
module whose class matches at the same path is reused, any other is created from an allowed class
without running ``__init__``. Allowed classes: torch.nn's own, those of the model's own modules, and
any registered with :func:`allow_module_type`; nothing in a record is imported or executed.
See :mod:`compress.checkpoint` for the file format.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from compress.models.attention import SelfAttention

_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _modules, hooks, training, ...
_PLAIN = (type(None), bool, int, float, str)


def _as_data(value: Any) -> tuple[bool, Any]:
    """(True, a copy made of plain data) for what a weights-only load can read back; (False, None) else.

    Exact types only: an IntEnum or a namedtuple would be pickled by class, which a weights-only
    load refuses (and which would not be data).
    """
    kind = type(value)
    if kind in _PLAIN or kind is torch.dtype:
        return True, value
    if kind is torch.Tensor:
        return True, value.detach().cpu().clone()
    if kind in (tuple, list, torch.Size):
        items = [_as_data(v) for v in value]
        if all(ok for ok, _ in items):
            return True, (list if kind is list else tuple)(v for _, v in items)
        return False, None
    if kind is dict and all(type(k) is str for k in value):
        items = {k: _as_data(v) for k, v in value.items()}
        if all(ok for ok, _ in items.values()):
            return True, {k: v for k, (_, v) in items.items()}
    return False, None


def type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """The module tree of ``model`` as plain data (see the module docstring)."""
    entries: list[dict[str, Any]] = []
    modules: dict[int, str] = {}
    tensors: dict[int, str] = {}

    def tensor(name: str, t: torch.Tensor | None, key: str, **extra: Any) -> dict[str, Any]:
        if t is None:
            return {"name": name}
        if id(t) in tensors:  # tied weights stay tied
            return {"name": name, "same_as": tensors[id(t)]}
        tensors[id(t)] = key
        return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), **extra}

    def visit(path: str, module: nn.Module | None) -> None:
        if module is None:
            entries.append({"path": path, "type": None})
            return
        if id(module) in modules:
            entries.append({"path": path, "same_as": modules[id(module)]})
            return
        modules[id(module)] = path
        attrs, opaque = {}, []
        for key, value in vars(module).items():
            if key in _MODULE_INTERNALS:
                continue
            ok, plain = _as_data(value)
            if ok:
                attrs[key] = plain
            else:
                opaque.append(key)
        prefix = f"{path}." if path else ""
        params = [
            tensor(n, p, prefix + n, **({"grad": p.requires_grad} if p is not None else {}))
            for n, p in module._parameters.items()
        ]
        buffers = []
        for n, b in module._buffers.items():
            persistent = n not in module._non_persistent_buffers_set
            extra: dict[str, Any] = {"persistent": persistent}
            if b is not None and not persistent:  # not in the state_dict: its value travels here
                extra["value"] = b.detach().cpu().clone()
            buffers.append(tensor(n, b, prefix + n, **(extra if b is not None else {})))
        entries.append(
            {
                "path": path,
                "type": type_name(type(module)),
                "attrs": attrs,
                "opaque": sorted(opaque),
                "params": params,
                "buffers": buffers,
                "children": list(module._modules),
            }
        )
        for n, child in module._modules.items():
            visit(prefix + n, child)

    visit("", model)
    return _interned(entries)


def _interned(value: Any) -> Any:
    """The record with every string interned: pickle shares a repeated string by object identity, so
    without this a model rebuilt from its record saves to different bytes than the one it came from
    (same content; a resumed run's checkpoint was 748,623 bytes against 748,303 for ResNet-20)."""
    if type(value) is str:
        return sys.intern(value)
    if type(value) is dict:
        return {sys.intern(k): _interned(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_interned(v) for v in value)
    return value


# --------------------------------------------------------------------------- allowed classes
_REGISTERED: dict[str, type[nn.Module]] = {}


def allow_module_type(cls: type[nn.Module]) -> type[nn.Module]:
    """Let checkpoints rebuild modules of ``cls`` (a class decorator) even where the model's factory
    does not build one: for a stage that swaps in a module class of its own."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"allow_module_type takes an nn.Module subclass, got {cls!r}")
    _REGISTERED[type_name(cls)] = cls
    return cls


allow_module_type(SelfAttention)  # prune's head removal swaps it in for nn.MultiheadAttention


@lru_cache(maxsize=1)
def _torch_nn_types() -> dict[str, type[nn.Module]]:
    import torch.nn.modules as pkg

    out: dict[str, type[nn.Module]] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__.startswith(pkg.__name__):
                out[type_name(obj)] = obj
    return out


def allowed_types(reference: nn.Module) -> dict[str, type[nn.Module]]:
    """torch.nn's classes, registered ones, and the model's own: every nn.Module class defined in a
    module that defines one of the classes its factory builds (already imported, already trusted)."""
    out = dict(_torch_nn_types())
    for cls in {type(m) for m in reference.modules()}:
        out[type_name(cls)] = cls
        home = sys.modules.get(cls.__module__)
        for obj in vars(home).values() if home is not None else ():
            if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == cls.__module__:
                out.setdefault(type_name(obj), obj)
    out.update(_REGISTERED)
    return out


class StructureError(Exception):
    """A structure record that cannot be rebuilt (the message says why)."""


def _plan(entries: Any, reference: nn.Module) -> list[tuple[dict[str, Any], type[nn.Module] | None, Any]]:
    """For each entry: (entry, class or None, the reference's module to reuse or None); StructureError if impossible."""
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict) or entries[0].get("path"):
        raise StructureError("the structure record is not a list of modules starting at the root")
    allowed = allowed_types(reference)
    fresh: dict[str, nn.Module] = {}
    for p, m in reference.named_modules(remove_duplicate=False):
        fresh.setdefault(p, m)
    used: set[int] = set()
    plan = []
    for e in entries:
        path = e["path"]
        if not isinstance(path, str):
            raise StructureError(f"module path {path!r} is not a string")
        if "same_as" in e or e.get("type") is None:
            plan.append((e, None, None))
            continue
        where = repr(path) if path else "the model itself"
        cls = allowed.get(e["type"])
        if cls is None:
            raise StructureError(
                f"module {where} is a {e['type']}, which is neither a torch.nn class nor one of the model's "
                "own (a stage that adds its own module class registers it with "
                "compress.checkpoint.allow_module_type)"
            )
        cand = fresh.get(path)
        reuse = cand if cand is not None and type(cand) is cls and id(cand) not in used else None
        if reuse is not None:
            used.add(id(reuse))
        elif not path:
            raise StructureError(f"the file holds a {e['type']}, but the model is a {type_name(type(reference))}")
        elif e.get("opaque"):
            raise StructureError(
                f"module {where} ({e['type']}) is not one its model's factory builds there, and its "
                f"attribute(s) {', '.join(map(str, e['opaque']))} are not plain data (numbers, strings, tuples, "
                "tensors), so it cannot be rebuilt"
            )
        plan.append((e, cls, reuse))
    return plan


def rebuild_problem(structure: list[dict[str, Any]], reference: nn.Module) -> str | None:
    """Why ``structure`` (from :func:`describe`) could not be rebuilt on ``reference`` (the model as its
    factory builds it, e.g. on the meta device), or None when it can."""
    try:
        _plan(structure, reference)
    except StructureError as exc:
        return str(exc)
    return None


def _blank(cls: type[nn.Module]) -> nn.Module:
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    return module


def _new_tensor(t: dict[str, Any], tensors: dict[str, torch.Tensor], key: str, param: bool) -> Any:
    if "same_as" in t:
        return tensors[t["same_as"]]
    if "shape" not in t:
        return None
    dtype = getattr(torch, str(t["dtype"]), None)
    shape = t["shape"]
    if not isinstance(dtype, torch.dtype) or not all(type(d) is int and d >= 0 for d in shape):
        raise StructureError(f"tensor {key!r} has a malformed shape or dtype")
    if param:
        value: torch.Tensor = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=bool(t.get("grad", True)))
    elif "value" in t:
        value = t["value"]
        if not isinstance(value, torch.Tensor) or list(value.shape) != list(shape):
            raise StructureError(f"buffer {key!r}'s recorded value does not have its recorded shape")
    else:
        value = torch.empty(shape, dtype=dtype)
    tensors[key] = value
    return value


def rebuild(model: nn.Module, structure: list[dict[str, Any]]) -> None:
    """Give ``model`` (as its factory built it) the module tree ``structure`` records, in place.
    Tensors are allocated, not filled: load the state_dict afterwards. Raises StructureError."""
    plan = _plan(structure, model)
    built: dict[str, nn.Module | None] = {}
    tensors: dict[str, torch.Tensor] = {}
    for e, cls, reuse in plan:
        path = e["path"]
        module: nn.Module | None
        if "same_as" in e:
            module = built[e["same_as"]]
        elif cls is None:
            module = None
        else:
            module = reuse if reuse is not None else _blank(cls)
            for key, value in e["attrs"].items():
                if (
                    not isinstance(key, str)
                    or not key.isidentifier()
                    or key.startswith("__")
                    or key in _MODULE_INTERNALS
                ):
                    raise StructureError(f"module {path!r} records an attribute named {key!r}")
                module.__dict__[key] = value
            prefix = f"{path}." if path else ""
            module._parameters.clear()
            for t in e["params"]:
                module.register_parameter(t["name"], _new_tensor(t, tensors, prefix + t["name"], param=True))
            module._buffers.clear()
            module._non_persistent_buffers_set.clear()
            for t in e["buffers"]:
                value = _new_tensor(t, tensors, prefix + t["name"], param=False)
                module.register_buffer(t["name"], value, persistent=bool(t.get("persistent", True)))
            module._modules.clear()  # the children's entries follow and attach themselves
        if path:
            parent, _, name = path.rpartition(".")
            owner = built[parent]
            if owner is None or "." in name:
                raise StructureError(f"module {path!r} has no parent in the record")
            owner._modules[name] = module
        built[path] = module
    for e, cls, _ in plan:
        if cls is not None:
            module = built[e["path"]]
            assert module is not None
            if list(module._modules) != list(e["children"]):
                raise StructureError(f"module {e['path']!r}'s children do not match the record")
