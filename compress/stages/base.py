"""The Stage contract. A stage is a pydantic model (its recipe entry) with an ``apply`` method.

The pipeline knows nothing about specific stages: it asks each one which models it ``changes``
(to checkpoint them) and which capabilities it ``needs``/``provides`` (to reject an impossible order
such as quantize-before-export at load time, before any training starts).

A new stage is ONE file: a module in ``compress/stages/`` (or an installed plugin's module named by
an entry point of the group ``compress.stages``) that registers its class with
``@STAGES.register(kind)`` and declares an ``example`` entry; the parametrized tests run that example
with the prerequisites its ``needs`` imply, so it is tested without editing a test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from compress.registry import Registry

if TYPE_CHECKING:
    from compress.context import Context
    from compress.data import ImageData


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str

    #: capabilities this stage needs from the recipe or earlier stages ("teacher", "onnx", ...)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: capabilities it provides to later stages
    provides: ClassVar[frozenset[str]] = frozenset()
    #: a small, valid recipe entry (runs in seconds on the tests' tiny data): what the tests run
    example: ClassVar[dict[str, Any]] = {}
    #: old field name -> where it went, so an old recipe's error says how to write it now
    renamed: ClassVar[dict[str, str]] = {}

    def changes(self) -> tuple[str, ...]:
        """Roles ("teacher"/"student") whose torch weights this stage modifies."""
        return ()

    def components(self) -> list[tuple[str, Any]]:
        """The sub-blocks this stage is composed of (``kd:``, ``finetune:``, ...): any field whose
        value has its own ``requirements()`` and ``preflight()``, so they count without glue code."""
        values = ((name, getattr(self, name)) for name in type(self).model_fields)
        return [(n, v) for n, v in values if hasattr(v, "requirements") and hasattr(v, "preflight")]

    def requirements(self) -> frozenset[str]:
        """Per-instance needs: ``needs`` plus the components' (prune needs a teacher only with ``finetune.kd``)."""
        return self.needs.union(*(block.requirements() for _, block in self.components()))

    def preflight(self, models: dict[str, nn.Module], data: ImageData, field: str) -> None:
        """Check the recipe against the built models and data before anything is written.

        Raise CompressError naming ``field`` (e.g. ``stages.2``) for a user error that the schema
        alone cannot see, such as a module-name pattern that matches nothing. The default checks the
        components (each at ``field.name``); a stage with checks of its own calls it too.
        """
        for name, block in self.components():
            block.preflight(models, data, f"{field}.{name}")

    def memory_hint(self, field: str) -> str:
        """What to lower when this stage runs out of memory (``field`` is its recipe path)."""
        return "lower data.batch_size (training) or data.eval_batch_size (evaluation)"

    def apply(self, ctx: Context) -> dict[str, Any]:
        """Run the stage; return metrics for the report."""
        raise NotImplementedError


#: discovered: every module of compress.stages (a new stage is one new file), plus installed plugins
#: of the entry-point group ``compress.stages`` (a third party adds a stage with ``pip install``)
STAGES: Registry[type[Stage]] = Registry("stage kind", package="compress.stages", group="compress.stages")
