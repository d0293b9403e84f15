"""Dataset registry. Each entry is a pydantic config class (discriminated on ``name``) whose
``load()`` returns an :class:`ImageData`: a :class:`DataBundle` of uint8 tensors decoded once, or a
:class:`compress.data.stream.StreamBundle` decoding from disk as it goes."""

from __future__ import annotations

from compress.data.base import DataBundle, DatasetConfig, ImageData, TensorLoader
from compress.registry import Registry

#: every module of this package is imported on first use (a new dataset is one new file), plus
#: installed plugins of the entry-point group ``compress.datasets``
DATASETS: Registry[type[DatasetConfig]] = Registry("dataset", package=__name__, group="compress.datasets")

__all__ = ["DATASETS", "DataBundle", "DatasetConfig", "ImageData", "TensorLoader"]
