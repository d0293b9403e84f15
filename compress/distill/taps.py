"""Capture module outputs by path with forward hooks that are always removed afterwards."""

from __future__ import annotations

import difflib
from types import TracebackType

from torch import Tensor, nn


def find_module(model: nn.Module, path: str, what: str) -> nn.Module:
    """``model``'s submodule at ``path``; a ValueError naming close matches when there is none."""
    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(path, names, n=4, cutoff=0.6)
    if not close:  # a prefix typo ("layer2.conv1"): offer the modules under the longest valid prefix
        head = path
        while head and head not in modules:
            head = head.rpartition(".")[0]
        close = (
            [n for n in names if n.startswith(f"{head}.") and n.count(".") == head.count(".") + 1][:4] if head else []
        )
    hint = f"; close matches: {', '.join(close)}" if close else "; list them with model.named_modules()"
    raise ValueError(f"no module {path!r} in the {what} ({type(model).__name__}){hint}")


class FeatureTaps:
    """``with FeatureTaps(model, paths, what) as taps:`` ... ``taps.outputs[path]`` after a forward.

    Outputs of the last forward pass are kept (tuples and lists: their first tensor). The hooks are
    removed on exit, also when the body raises.
    """

    def __init__(self, model: nn.Module, paths: list[str], what: str) -> None:
        self.modules = {p: find_module(model, p, what) for p in dict.fromkeys(paths)}
        self.outputs: dict[str, Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> FeatureTaps:
        for path, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(path)))
        return self

    def _hook(self, path: str):  # noqa: ANN202
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, (tuple, list)):
                output = next((o for o in output if isinstance(o, Tensor)), None)
            if isinstance(output, Tensor):
                self.outputs[path] = output

        return hook

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()
