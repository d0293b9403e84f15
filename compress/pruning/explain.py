"""One line saying where torch-pruning failed: the layer (or the graph op after it) it was
handling, which its own messages rarely name."""

from __future__ import annotations

import traceback

from torch import nn


def explain(exc: BaseException, model: nn.Module) -> str:
    """``at layer 'features.3.conv' (Conv2d): <error>``: the innermost torch-pruning frame that was
    handling a layer of ``model`` — or a graph node (an op such as a reshape), reported with the
    nearest layer feeding it — names where it failed; torch-pruning's own messages rarely do."""
    names = {id(m): n for n, m in model.named_modules() if n}
    where = ""
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        inside = "torch_pruning" in frame.f_code.co_filename
        if not inside and id(frame.f_locals.get("self")) not in names:  # forward(): the running layer
            continue
        for value in frame.f_locals.values() if inside else [frame.f_locals["self"]]:
            if isinstance(value, nn.Module) and id(value) in names:
                where = f"at layer {names[id(value)]!r} ({type(value).__name__}): "
            elif hasattr(value, "module") and hasattr(value, "inputs"):  # a torch-pruning graph node
                layer = _nearest_layer(value, names)
                op = type(value.module).__name__.strip("_").removesuffix("Op").lower()
                where = f"at the {op} after layer {layer!r}: " if layer else f"at a {op}: "
            if where:
                break
        if where:
            break
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{where}{type(exc).__name__}{': ' + msg if msg else ''}"


def _nearest_layer(node, names: dict[int, str]) -> str | None:
    """Breadth-first up the graph from ``node`` to the first node that is a layer of the model."""
    seen, queue = set(), [node]
    while queue:
        n = queue.pop(0)
        if id(n.module) in names:
            return names[id(n.module)]
        if id(n) not in seen:
            seen.add(id(n))
            queue.extend(n.inputs)
    return None
