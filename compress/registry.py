"""One generic registry per concept (models, datasets, stages, losses, ...).

Modelled on timm's ``register_model``: a decorator adds an entry under a name, ``get`` looks it up
and, on a miss, names the closest registered entries so a typo is a one-line fix.

Entries are *discovered*, not listed: a registry made with ``package=`` imports every module of that
package the first time it is asked for its entries (so a new stage is one new file), and with
``group=`` also loads every installed plugin advertising that entry-point group (so a third party
adds a stage with ``pip install``; its entry point names a module, or an object, whose import
registers it).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from compress.errors import CompressError, first_line

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, concept: str, *, package: str | None = None, group: str | None = None) -> None:
        self.concept = concept
        self.package = package
        self.group = group
        self._entries: dict[str, T] = {}
        self._discovered = package is None and group is None

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.concept} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def discover(self) -> None:
        """Import the package's modules and the installed plugins once (idempotent)."""
        if self._discovered:
            return
        self._discovered = True  # first: a module that asks this registry while importing must not recurse
        if self.package is not None:
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{info.name}")
        if self.group is not None:
            for ep in importlib.metadata.entry_points(group=self.group):
                try:
                    ep.load()
                except Exception as exc:  # noqa: BLE001 - a broken plugin is the user's one-line problem
                    where = ep.dist.name if ep.dist is not None else ep.value
                    raise CompressError(
                        f"plugin {ep.name!r} ({where}, entry point group {self.group}): cannot load "
                        f"{ep.value}: {first_line(exc)}"
                    ) from None

    @property
    def entries(self) -> dict[str, T]:
        self.discover()
        return self._entries

    def get(self, name: str) -> T:
        try:
            return self.entries[name]
        except KeyError:
            raise CompressError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.entries, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"unknown {self.concept} {name!r}{hint} (known: {', '.join(self.names())})"

    def names(self) -> list[str]:
        return sorted(self.entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self.entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)
