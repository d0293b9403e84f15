"""Stage registry; importing this package registers every built-in stage."""

from compress.stages.base import STAGES, Stage
from compress.stages import distill, export, prune, quantize, train  # noqa: E402,F401

__all__ = ["STAGES", "Stage"]
