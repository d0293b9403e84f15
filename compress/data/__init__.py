"""Dataset registry. Each entry is a pydantic config class (discriminated on ``name``) whose
``load()`` returns a :class:`DataBundle` of uint8 tensors decoded once."""

from __future__ import annotations

from compress.data.base import DataBundle, DatasetConfig, TensorLoader
from compress.registry import Registry

#: every module of this package is imported on first use (a new dataset is one new file), plus
#: installed plugins of the entry-point group ``compress.datasets``
DATASETS: Registry[type[DatasetConfig]] = Registry("dataset", package=__name__, group="compress.datasets")

__all__ = ["DATASETS", "DataBundle", "DatasetConfig", "TensorLoader"]
