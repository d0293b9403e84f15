"""Datasets: every registered one loads real tensors; CIFAR-10 reads all three on-disk forms."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data import DATASETS
from compress.data.base import augment_batch
from compress.errors import CompressError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_tree(root: Path, splits: tuple[str, ...], classes: list[str], per_class: int, size: int) -> np.ndarray:
    """Write a real PNG tree; return the first image's pixels for round-trip checks."""
    rng = np.random.default_rng(0)
    first = None
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                px = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(px).save(root / split / cls / f"{i:04d}.png")
                if first is None:
                    first = px
    return first


def configs(tmp_path: Path) -> dict[str, dict]:
    """A small, real config for each registered dataset (a new dataset must add one here)."""
    make_tree(tmp_path / "cifar", ("train", "test"), CIFAR_CLASSES, 2, 32)
    make_tree(tmp_path / "folder", ("train", "val"), ["cat", "dog", "eel"], 3, 20)
    return {
        "digits": {"name": "digits"},
        "synthetic": {"name": "synthetic", "num_classes": 4, "image_size": 8, "train_size": 40, "test_size": 12},
        "cifar10": {"name": "cifar10", "root": str(tmp_path / "cifar")},
        "imagefolder": {"name": "imagefolder", "root": str(tmp_path / "folder"), "image_size": 16},
        "package.module:function": {"name": "tests.test_user_data:tiny_digits"},
    }


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_loads(name, tmp_path):
    cfgs = configs(tmp_path)
    assert name in cfgs, f"add a test config for dataset {name!r}"
    data = DATASETS.get(name).model_validate(cfgs[name]).load()
    assert data.train_x.dtype == torch.uint8 and data.train_x.ndim == 4
    assert len(data.train_x) == len(data.train_y) > 0 and len(data.test_x) == len(data.test_y) > 0
    assert int(data.train_y.max()) < data.num_classes
    x, y = next(iter(data.train_loader(seed=0)))
    assert x.dtype == torch.float32 and x.shape[1:] == data.train_x.shape[1:] and len(x) == len(y)
    assert torch.isfinite(x).all()


def test_digits_split_is_fixed_and_stratified():
    a = DATASETS.get("digits").model_validate({"name": "digits"}).load()
    b = DATASETS.get("digits").model_validate({"name": "digits"}).load()
    assert torch.equal(a.test_x, b.test_x)
    assert len(a.train_x) + len(a.test_x) == 1797
    counts = torch.bincount(a.test_y)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each class of ~180


def test_cifar_from_tar_gz_matches_folder(tmp_path):
    first = make_tree(tmp_path / "cifar10-jpeg", ("train", "test"), CIFAR_CLASSES, 2, 32)
    archive = tmp_path / "c.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar10-jpeg", arcname="cifar10-jpeg")
    cfg = DATASETS.get("cifar10")
    from_tar = cfg.model_validate({"name": "cifar10", "root": str(archive)}).load()
    from_dir = cfg.model_validate({"name": "cifar10", "root": str(tmp_path / "cifar10-jpeg")}).load()
    assert torch.equal(from_tar.train_x, from_dir.train_x) and torch.equal(from_tar.test_y, from_dir.test_y)
    assert from_tar.class_names == CIFAR_CLASSES
    assert np.array_equal(from_tar.train_x[0].permute(1, 2, 0).numpy(), first)  # PNG: exact pixels


def test_cifar_python_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        # The real files key by str after latin1 decoding; emulate torchvision's layout.
        batch = {"data": batch[b"data"], "labels": batch[b"labels"]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    data = DATASETS.get("cifar10").model_validate({"name": "cifar10", "root": str(tmp_path)}).load()
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)


def test_cifar_python_format_refuses_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({"data": Evil()}, fh)
    with pytest.raises(CompressError, match="refusing to load builtins.print"):
        DATASETS.get("cifar10").model_validate({"name": "cifar10", "root": str(tmp_path)}).load()


def test_tree_without_images_is_a_user_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    cfg = DATASETS.get("imagefolder").model_validate({"name": "imagefolder", "root": str(tmp_path)})
    with pytest.raises(CompressError, match="no images under a 'train/<class>/' folder"):
        cfg.load()


def test_augment_batch_is_seeded_and_shape_preserving():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a = augment_batch(x, 2, True, torch.Generator().manual_seed(0))
    b = augment_batch(x, 2, True, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    # A crop of a zero-padded image: every value is either an original pixel or padding.
    assert set(a.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_shuffle_differs_per_epoch_but_is_reproducible():
    data = DATASETS.get("synthetic").model_validate({"name": "synthetic", "train_size": 64, "batch_size": 16}).load()
    loader = data.train_loader(seed=3)
    first = next(iter(loader))[1]
    loader.set_epoch(1)
    second = next(iter(loader))[1]
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))[1], first) and not torch.equal(first, second)


@pytest.mark.slow
def test_real_cifar10_archive():
    archive = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    if not archive.exists():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz not present")
    data = DATASETS.get("cifar10").model_validate({"name": "cifar10", "root": str(archive)}).load()
    assert data.train_x.shape == (50_000, 3, 32, 32) and data.test_x.shape == (10_000, 3, 32, 32)
    assert torch.bincount(data.train_y).tolist() == [5000] * 10
    assert data.class_names == CIFAR_CLASSES
