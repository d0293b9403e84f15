"""``timm:<name>``: any timm model, built through timm's own arguments (``num_classes``, ``in_chans``).

The name is checked against timm's registry when the recipe loads (with "did you mean" hints), so a
typo never waits for the data to load. Random init unless the spec says ``pretrained: true`` (see
:mod:`compress.models.pretrained`).
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import Any

from torch import nn

from compress.errors import CompressError, first_line

PREFIX = "timm:"


@lru_cache(maxsize=1)
def _known() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def check_timm_name(name: str) -> str:
    """Validate ``timm:<architecture>[.<pretrained tag>]``; ValueError with close matches if unknown."""
    import timm

    arch, _, tag = name.removeprefix(PREFIX).partition(".")
    if arch and timm.is_model(arch):
        if tag and f"{arch}.{tag}" not in timm.list_pretrained(f"{arch}.*"):
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
            raise ValueError(f"timm model {arch!r} has no pretrained tag {tag!r} (known: {', '.join(tags) or 'none'})")
        return name
    close = difflib.get_close_matches(arch, _known(), n=3)
    hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else " (`timm.list_models()` lists them)"
    raise ValueError(f"unknown timm model {arch!r}{hint}")


def build_timm(name: str, num_classes: int, in_channels: int, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with the data's classes and channels; a bad argument is one CompressError line."""
    import timm

    arch = name.removeprefix(PREFIX)
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as exc:  # RuntimeError: unknown tag
        raise CompressError(f"model {name!r}: {first_line(exc)}") from None
