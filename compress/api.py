"""The Python API: ``compress.run`` on a recipe with the caller's own models and data, and the
building blocks (``prune``, ``distill``) on any ``nn.Module`` without a recipe (issue 21)."""

from __future__ import annotations
