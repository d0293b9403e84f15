"""Stage registry; importing this package registers every built-in stage."""

from compress.stages import distill, export, prune, qat, quantize, sparsify, train  # noqa: E402,F401
from compress.stages.base import STAGES, Stage

__all__ = ["STAGES", "Stage"]
