"""CIFAR-10 from a local copy in any of three forms; never downloaded unless ``download: true``.

``root`` may be (1) torchvision's python-format folder (``cifar-10-batches-py`` or its parent),
(2) an ImageFolder tree with ``train/`` and ``test/``, or (3) a ``.tar.gz`` of such a tree, e.g.
``../shared/data/cifar10-jpeg.tar.gz``. Forms 2 and 3 are decoded once into a uint8 tensor cache.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import model_validator

from compress.data import DATASETS
from compress.data.base import DataBundle, DatasetConfig
from compress.data.images import load_cached
from compress.errors import CompressError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@DATASETS.register("cifar10")
class Cifar10(DatasetConfig):
    """CIFAR-10 (50k/10k, 32x32): a python-format folder, an ImageFolder tree or a .tar.gz of one."""

    name: Literal["cifar10"] = "cifar10"
    root: Path
    download: bool = False
    augment: bool = True

    @model_validator(mode="after")
    def _root_exists(self) -> Cifar10:
        if not self.download and not self.root.exists():
            raise ValueError(f"root {str(self.root)!r} does not exist (set data.root, or download: true)")
        return self

    def load(self) -> DataBundle:
        root = self.root
        if self.download:
            import torchvision

            torchvision.datasets.CIFAR10(str(root), download=True)
        py = _python_format_dir(root)
        if py is not None:
            train_x, train_y = _read_python_batches(py, [f"data_batch_{i}" for i in range(1, 6)])
            test_x, test_y = _read_python_batches(py, ["test_batch"])
            classes = CLASSES
        else:
            data = load_cached(root, ("train", "test"), 32, "data.root")
            (train_x, train_y), (test_x, test_y), classes = data["train"], data["test"], data["classes"]
        if len(classes) != 10:
            raise CompressError(f"data.root: CIFAR-10 needs 10 classes, found {len(classes)} in {root}")
        return DataBundle(
            train_x=train_x,
            train_y=train_y,
            test_x=test_x,
            test_y=test_y,
            class_names=list(classes),
            mean=MEAN,
            std=STD,
            augment=self.augment,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
        )


def _python_format_dir(root: Path) -> Path | None:
    for cand in (root, root / "cifar-10-batches-py"):
        if cand.is_dir() and (cand / "data_batch_1").is_file():
            return cand
    return None


class _ArrayUnpickler(pickle.Unpickler):
    """The python-format batches are pickled dicts of numpy arrays; allow exactly that."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _read_python_batches(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as fh:
                batch = _ArrayUnpickler(fh, encoding="latin1").load()
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch["labels"], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise CompressError(f"data.root: cannot read CIFAR batch {path}: {exc}") from None
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
