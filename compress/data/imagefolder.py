"""A user's own ``train/`` + ``val/`` (or ``test/``) tree of class folders, in memory or streamed.

``stream: false`` decodes every image once (its evaluation view) into a cached uint8 tensor: the
fastest path when the set fits in memory. ``stream: true`` reads the files in DataLoader workers as
training goes, for sets that do not (ImageNet at 224² is ~190 GB decoded). ``auto`` (the default)
streams when the decoded set would exceed the memory budget (half the RAM; ``COMPRESS_DATA_MAX_GB``)
and says so. Both paths evaluate on the same view (shorter side to ``image_size / crop_ratio``, center
crop; see :mod:`compress.data.transforms`) and train with the same augmentations, so a recipe means
the same on any machine; only where the pixels wait differs.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from compress.data import DATASETS
from compress.data.base import DataBundle, DatasetConfig, ImageData, chunked_stats
from compress.data.images import archive_images, cache_path, index_tree, load_cached
from compress.data.stream import STATS_IMAGES, default_workers, memory_budget
from compress.data.transforms import TrainView, check_readable, mean_fill, resize_shorter
from compress.errors import CompressError

log = logging.getLogger("compress.data")
#: RandomResizedCrop's default area range (torchvision's)
SCALE = (0.08, 1.0)


@DATASETS.register("imagefolder")
class ImageFolder(DatasetConfig):
    """Your own train/ + val/ class folders: resized and center-cropped to image_size, held in memory
    or streamed from disk by worker processes (stream: auto decides by the memory budget)."""

    name: Literal["imagefolder"] = "imagefolder"
    root: Path
    val_split: Literal["val", "test"] = "val"
    image_size: int = Field(32, ge=4, le=1024)
    crop_ratio: float | None = Field(
        0.875,
        gt=0.05,
        le=1,
        description="evaluation: shorter side to image_size / crop_ratio, then center crop (null: resize to the size)",
    )
    mean: tuple[float, float, float] | None = Field(None, description="default: computed on train")
    std: tuple[float, float, float] | None = None
    augment: bool = True
    train_crop: Literal["random_resized", "pad"] = Field(
        "random_resized", description="random_resized: RandomResizedCrop + flip; pad: padded random crop + flip"
    )
    scale: tuple[float, float] = Field(SCALE, description="random_resized: range of the cropped area fraction")
    auto_augment: Literal["trivial", "randaugment"] | None = Field(
        None, description="TrivialAugmentWide or RandAugment after the crop (training only)"
    )
    stream: Literal["auto"] | bool = Field(
        "auto", description="true: decode from disk while training; false: decode once into memory; auto: by memory"
    )
    workers: int | None = Field(
        None, ge=0, le=64, description="streaming: DataLoader worker processes (default: one per core, <= 8)"
    )

    @model_validator(mode="after")
    def _check(self) -> ImageFolder:
        if not self.root.exists():
            raise ValueError(f"root {str(self.root)!r} does not exist")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be 0 < low <= high <= 1, got {list(self.scale)}")
        # by value, not by what was given: a resolved recipe (a run's recipe.resolved.yaml) gives every field
        if self.stream is False and self.workers is not None:
            raise ValueError("workers: only streaming uses worker processes (stream is false)")
        if self.train_crop == "pad" and tuple(self.scale) != SCALE:
            raise ValueError("scale: only train_crop: random_resized crops by area")
        if self.stream is not False and not self.root.is_dir():
            if self.stream is True:
                raise ValueError(f"stream: {str(self.root)!r} is an archive; extract it to a folder to stream it")
        defaults = {"scale": SCALE, "auto_augment": None, "train_crop": "random_resized"}
        for key, default in defaults.items():
            value = getattr(self, key)
            if not self.augment and (tuple(value) if key == "scale" else value) != default:
                raise ValueError(f"{key}: has no effect with augment: false")
        return self

    @property
    def shorter(self) -> int | None:
        return None if self.crop_ratio is None else resize_shorter(self.image_size, self.crop_ratio)

    def train_view(self, mean: tuple[float, ...]) -> TrainView:
        pad = max(1, self.image_size // 8)
        fill = mean_fill(mean)  # padding of the mean colour, as the in-memory path pads normalized zeros
        return TrainView(self.train_crop, self.image_size, pad, self.scale, True, self.auto_augment, fill)

    def load(self) -> ImageData:
        splits = ("train", self.val_split)
        if not self.root.is_dir():  # an archive: decoded into memory (cached), never streamed
            if not cache_path(self.root, splits, self.image_size, self.shorter).exists():
                self._refuse_beyond_budget(archive_images(self.root), "extract the archive to a folder to stream it")
            return self._in_memory(splits)
        classes, found = index_tree(self.root, splits, "data.root")
        n = sum(len(v) for v in found.values())
        self._warn_if_cropping_small(found["train"][0][0])
        if self.stream is False:
            self._refuse_beyond_budget(n, "set stream: true (or auto) to read them from disk while training")
            return self._in_memory(splits)
        if self.stream == "auto":
            need, (budget, why) = self._decoded(n), memory_budget()
            if need <= budget:
                return self._in_memory(splits)
            log.warning(
                "data: %d images at %dx%d would take %.1f GiB decoded, over the %.1f GiB memory budget (%s): "
                "streaming them from %s with %d workers (stream: auto)",
                n, self.image_size, self.image_size, need / 2**30, budget / 2**30, why, self.root,
                self.workers if self.workers is not None else default_workers(),
            )  # fmt: skip
        return self._streamed(classes, found)

    def _warn_if_cropping_small(self, first: str) -> None:
        """Images already at image_size (a CIFAR-like folder) lose their border to crop_ratio: say so."""
        from PIL import Image

        if self.crop_ratio is None or self.crop_ratio == 1:
            return
        try:
            with Image.open(first) as im:
                size = im.size
        except Exception:  # noqa: BLE001 - a bad file is named by the check that follows
            return
        if size == (self.image_size, self.image_size):
            log.warning(
                "data: images are %dx%d already; crop_ratio %g upscales them to %d and crops the center "
                "(set crop_ratio: 1.0 to keep them whole)", *size, self.crop_ratio, self.shorter,
            )  # fmt: skip

    def _decoded(self, n: int) -> int:
        return n * 3 * self.image_size**2

    def _refuse_beyond_budget(self, n: int, fix: str) -> None:
        """One line, before decoding anything, when ``n`` decoded images would not fit the memory budget."""
        need, (budget, why) = self._decoded(n), memory_budget()
        if need > budget:
            raise CompressError(
                f"data.stream: {n} images at {self.image_size}x{self.image_size} would take {need / 2**30:.1f} GiB "
                f"decoded, over the {budget / 2**30:.1f} GiB memory budget ({why}); {fix}"
            )

    def _in_memory(self, splits: tuple[str, str]) -> DataBundle:
        data = load_cached(self.root, splits, self.image_size, "data.root", self.shorter)
        train_x, train_y = data["train"]
        test_x, test_y = data[self.val_split]
        mean, std = (self.mean, self.std) if self.mean is not None else chunked_stats(train_x)  # no float copy
        return DataBundle(
            train_x=train_x,
            train_y=train_y,
            test_x=test_x,
            test_y=test_y,
            class_names=data["classes"],
            mean=tuple(mean),
            std=tuple(std),
            augment=self.augment,
            pad=max(1, self.image_size // 8),
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            eval_resize=self.shorter,
            # pad + flip without auto_augment: the vectorized whole-batch path (same distribution)
            train_view=self.train_view(mean) if self.train_crop != "pad" or self.auto_augment else None,
        )

    def _streamed(self, classes: list[str], found: dict[str, list]) -> ImageData:
        from compress.data.stream import FileSource, StreamBundle

        sources = {}
        for split, items in found.items():
            paths = [where for where, _, _ in items]
            _check_files(paths)
            sources[split] = FileSource(
                paths=np.array([p.encode() for p in paths]),
                labels=np.array([label for _, _, label in items], dtype=np.int64),
                size=self.image_size,
                shorter=self.shorter,
            )
        train, test = sources["train"], sources[self.val_split]
        if self.mean is not None:
            mean, std = self.mean, self.std
        else:  # evenly spaced training images' evaluation views: the set is too big to decode whole
            idx = np.linspace(0, len(train) - 1, min(STATS_IMAGES, len(train))).astype(np.int64)
            mean, std = chunked_stats(torch.stack([train.eval_view(int(i)) for i in idx]))
        workers = self.workers if self.workers is not None else default_workers()
        return StreamBundle(
            train=train,
            test=test,
            class_names=classes,
            mean=tuple(mean),
            std=tuple(std),
            shape=(3, self.image_size, self.image_size),
            train_view=self.train_view(mean),
            augment=self.augment,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            workers=workers,
            eval_resize=self.shorter,
            describe=f"streaming {len(train)} + {len(test)} images from {self.root} with {workers} workers",
        )


def _check_files(paths: list[str]) -> None:
    """Every file opens and starts like an image, checked before training (16 bytes each, threaded):
    the first bad one is one line naming it; a corrupt body is found (and named) when decoded."""
    with ThreadPoolExecutor(8) as pool:
        for start in range(0, len(paths), 4096):  # in windows: a future per file at once is ~2 KB x files
            window = paths[start : start + 4096]
            for path, why in zip(window, pool.map(lambda p: check_readable(Path(p)), window), strict=True):
                if why is not None:
                    raise CompressError(f"data.root: {path}: {why}")
