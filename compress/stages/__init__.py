"""Stage kinds, one file each, found by discovery (see :data:`STAGES`); no import list."""

from compress.stages.base import STAGES, Stage

__all__ = ["STAGES", "Stage"]
