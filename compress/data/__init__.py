"""Dataset registry. Each entry is a pydantic config class (discriminated on ``name``) whose
``load()`` returns a :class:`DataBundle` of uint8 tensors decoded once."""

from __future__ import annotations

from compress.data.base import DataBundle, DatasetConfig, TensorLoader
from compress.registry import Registry

DATASETS: Registry[type[DatasetConfig]] = Registry("dataset")

from compress.data import cifar10, digits, imagefolder, synthetic  # noqa: E402,F401

__all__ = ["DATASETS", "DataBundle", "DatasetConfig", "TensorLoader"]
