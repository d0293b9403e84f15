"""Your own data: ``data: {name: "mypkg.data:load", ...}`` names a function that returns torch
``Dataset``s of (image, label), decoded once into the tensor-resident :class:`DataBundle` the
pipeline trains on (uint8 N×C×H×W, like every built-in dataset).

The function is imported with :func:`compress.userpath.import_object` (the recipe's folder first,
then the working directory) and called with ``kwargs``. It may return ``(train, test)`` (the class
names then come from the datasets' ``.classes``, as torchvision's datasets carry them),
``(train, test, class_names)``, a dict with the keys ``train``, ``test`` and ``class_names``, or a
ready :class:`DataBundle`. A sample is ``(image, label)``: a PIL image or a tensor (C×H×W or H×W;
uint8, or float in [0, 1] as ``ToTensor`` gives), and an integer label. With ``stream: false`` every
image is decoded into memory (refused early when it would not fit); ``stream: true`` reads samples
as training goes, in DataLoader workers (:mod:`compress.data.stream`); ``auto`` (the default) streams
when the decoded set would not fit the memory budget. Every problem is one line naming ``data.*``
and the sample.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from compress import userpath
from compress.data import DATASETS
from compress.data.base import DataBundle, DatasetConfig, ImageData, chunked_stats
from compress.data.samples import read_sample
from compress.data.stream import memory_budget
from compress.errors import CompressError, first_line

log = logging.getLogger("compress.data")

#: the registry name (and the recipe schema's tag) of every ``package.module:function`` dataset
USER_DATASET = "package.module:function"


@DATASETS.register(USER_DATASET)
class UserDataset(DatasetConfig):
    """Your own function (``name: mypkg.data:load``) returning train/test Datasets of (image, label)
    plus class names; resized to image_size, in memory or streamed (stream: auto decides by memory)."""

    name: str = Field(description="'package.module:function', imported from the recipe's folder, then the cwd")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the function")
    image_size: int | tuple[int, int] | None = Field(
        None, description="resize every image to this (side or [height, width]); required when sizes differ"
    )
    mean: tuple[float, ...] | None = Field(None, description="per channel, in [0, 1] units; default: computed on train")
    std: tuple[float, ...] | None = None
    augment: bool = Field(False, description="random crop (padding size/8) + horizontal flip while training")
    stream: Literal["auto"] | bool = Field(
        "auto", description="true: read samples while training (workers); false: decode once; auto: by memory"
    )
    workers: int | None = Field(None, ge=0, le=64, description="streaming: DataLoader worker processes")

    @field_validator("name")
    @classmethod
    def _spec(cls, v: str) -> str:
        userpath.split(v)  # ValueError: "'x' must look like 'package.module:function'"
        return v

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        sides = (v,) if isinstance(v, int) else v or ()
        if any(not 1 <= s <= 4096 for s in sides):
            raise ValueError(f"image_size must be between 1 and 4096, got {v}")
        return v

    @model_validator(mode="after")
    def _stats(self) -> UserDataset:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self

    def load(self) -> ImageData:
        fn = userpath.import_object(self.name, "data.name")
        if not callable(fn):
            raise CompressError(f"data.name: {self.name!r} is a {type(fn).__name__}, not a function")
        try:
            out = fn(**self.kwargs)
        except CompressError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's function failed: their bug, one line
            what = f"{type(exc).__name__}: {first_line(exc)}"
            raise CompressError(f"data.name: {self.name}(**kwargs) raised {what}") from None
        if isinstance(out, ImageData):
            return self._adjust(out)
        train, test, names = split_return(out, f"data.name: {self.name!r} returned")
        return to_bundle(
            train,
            test,
            names,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            augment=self.augment,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            stream=self.stream,
            workers=self.workers,
        )

    def _adjust(self, bundle: ImageData) -> ImageData:
        """A DataBundle is used as it is, except for the settings the recipe gives explicitly."""
        if self.image_size is not None:
            raise CompressError(f"data.image_size: {self.name!r} returns a DataBundle, which is not resized")
        if self.stream != "auto" and self.stream is not bundle.streaming:
            form = "streams already" if bundle.streaming else "is in memory already"
            raise CompressError(f"data.stream: {self.name!r} returns a {type(bundle).__name__}, which {form}")
        if self.workers is not None and not bundle.streaming:
            raise CompressError(f"data.workers: {self.name!r} returns a DataBundle, which is in memory already")
        for key in ("batch_size", "eval_batch_size", "augment", "mean", "std"):
            if key in self.model_fields_set:
                setattr(bundle, key, getattr(self, key))
        if len(bundle.mean) != bundle.channels or len(bundle.std) != bundle.channels:
            raise CompressError(f"data.mean: {len(bundle.mean)} values for {bundle.channels}-channel images")
        return bundle


def split_return(out: Any, what: str) -> tuple[Any, Any, Sequence[str]]:
    """(train, test, class_names) from what a user function returned (see the module docstring)."""
    if isinstance(out, dict):
        missing = [k for k in ("train", "test") if k not in out]
        if missing:
            raise CompressError(f"{what} a dict without {' and '.join(repr(k) for k in missing)}")
        train, test, names = out["train"], out["test"], out.get("class_names", out.get("classes"))
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
        train, test, names = out[0], out[1], out[2] if len(out) == 3 else None
    else:
        shape = f"a {len(out)}-tuple" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}"
        raise CompressError(
            f"{what} {shape}; expected (train, test), (train, test, class_names), "
            "{'train': ..., 'test': ..., 'class_names': ...} or a DataBundle"
        )
    if names is None:
        names = _classes_of(train)
    if names is None:
        raise CompressError(
            f"{what} no class names: return (train, test, class_names) or give the datasets a .classes list"
        )
    if isinstance(names, (str, bytes, dict)) or not isinstance(names, Sequence) or len(names) == 0:
        raise CompressError(f"{what} class names as a {type(names).__name__}; expected a non-empty list of names")
    return train, test, [str(n) for n in names]


def _classes_of(ds: Any) -> Sequence[str] | None:
    """torchvision datasets carry ``.classes``; a ``Subset`` carries its dataset's."""
    for obj in (ds, getattr(ds, "dataset", None)):
        names = getattr(obj, "classes", None)
        if isinstance(names, Sequence) and not isinstance(names, (str, bytes)) and len(names) > 0:
            return names
    return None


def to_bundle(
    train: Any,
    test: Any,
    class_names: Sequence[str],
    *,
    image_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augment: bool = False,
    batch_size: int = 128,
    eval_batch_size: int = 500,
    field: str = "data",
    stream: str | bool = "auto",
    workers: int | None = None,
) -> ImageData:
    """Two Datasets of (image, label) as a DataBundle (decoded now) or a StreamBundle (decoded as read),
    as ``stream`` says (auto: stream what would not fit the memory budget; false: refuse it early)."""
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    for split, ds in (("train", train), ("test", test)):
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise CompressError(f"{field}: the {split} split is a {type(ds).__name__}, not a Dataset (len + indexing)")
        try:
            n = len(ds)
        except Exception as exc:  # noqa: BLE001 - the user's __len__ raised: one line
            raise CompressError(
                f"{field}: len() of the {split} split raised {type(exc).__name__}: {first_line(exc)}"
            ) from None
        if n == 0:
            raise CompressError(f"{field}: the {split} split is empty")
    first, _ = read_sample(train, 0, "train", size, len(class_names), field)
    need = (len(train) + len(test)) * first.numel()
    budget, why = memory_budget()
    what = f"{len(train)} + {len(test)} images of {'x'.join(map(str, first.shape))}"
    if stream is True or (stream == "auto" and need > budget):
        if stream == "auto":
            log.warning(
                "%s: %s would take %.1f GiB decoded, over the %.1f GiB memory budget (%s): streaming them "
                "(stream: auto)", field, what, need / 2**30, budget / 2**30, why,
            )  # fmt: skip
        from compress.data.user_stream import stream_datasets

        return stream_datasets(
            train, test, class_names, first, size=size, mean=mean, std=std, augment=augment, batch_size=batch_size,
            eval_batch_size=eval_batch_size, field=field, workers=workers,
        )  # fmt: skip
    if need > budget:
        raise CompressError(
            f"{field}: {what} would take {need / 2**30:.1f} GiB in memory, over the {budget / 2**30:.1f} GiB "
            f"budget ({why}); set stream: true (or auto) to read them while training, or a smaller image_size"
        )
    xs = {s: _decode(ds, s, first, size, len(class_names), field) for s, ds in (("train", train), ("test", test))}
    (train_x, train_y), (test_x, test_y) = xs["train"], xs["test"]
    channels = train_x.shape[1]
    if mean is None or std is None:
        mean, std = chunked_stats(train_x)
    if len(mean) != channels or len(std) != channels:
        raise CompressError(f"{field}.mean: {len(mean)} values for {channels}-channel images; give one per channel")
    return DataBundle(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        class_names=list(class_names),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        augment=augment,
        pad=max(1, min(train_x.shape[2:]) // 8),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
    )


def _decode(
    ds: Any, split: str, first: torch.Tensor, size: tuple[int, int] | None, classes: int, field: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split into a preallocated uint8 tensor (so memory stays at the estimate)."""
    x = torch.empty((len(ds), *first.shape), dtype=torch.uint8)
    y = torch.empty(len(ds), dtype=torch.long)
    for i in range(len(ds)):
        img, label = read_sample(ds, i, split, size, classes, field)
        if img.shape != first.shape:
            what = "channels" if img.shape[0] != first.shape[0] else "sizes"
            fix = "convert them to one mode" if what == "channels" else "set data.image_size"
            raise CompressError(
                f"{field}: images differ in {what} ({tuple(first.shape)} at train[0], {tuple(img.shape)} at "
                f"{split}[{i}]); {fix}"
            )
        x[i], y[i] = img, label
    return x, y


class BatchLoader:
    """Any re-iterable of (images, labels) batches with a length (a torch DataLoader, a list), as the
    training loop's loader (:class:`TensorLoader`'s ``batches``/``set_epoch``/``view``/``len``)."""

    def __init__(self, batches: Any, field: str) -> None:
        if batches is None or not hasattr(batches, "__iter__"):
            raise CompressError(f"{field}: expected batches of (images, labels), got {type(batches).__name__}")
        if iter(batches) is batches:
            raise CompressError(f"{field}: an iterator is used up after one epoch; pass a DataLoader or a list")
        if not hasattr(batches, "__len__") or len(batches) == 0:
            raise CompressError(f"{field}: needs a length and at least one batch (a DataLoader or a list of batches)")
        self.source, self.field = batches, field

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.source, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler shuffles per epoch
            sampler.set_epoch(epoch)

    def view(self) -> int | None:
        return None  # augmentation is the loader's own: nothing per image may be cached

    def batches(self) -> Any:
        seen = 0
        for i, batch in enumerate(self.source):
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
                raise CompressError(f"{self.field}: batch {i} is a {type(batch).__name__}; expected (images, labels)")
            x, y = batch[0], torch.as_tensor(batch[1])
            if y.ndim != 1 or len(y) != len(x) or y.is_floating_point():
                raise CompressError(
                    f"{self.field}: batch {i} has labels of shape {tuple(y.shape)} ({y.dtype}) for {len(x)} images; "
                    "expected one class index per image"
                )
            yield x, y.long(), torch.arange(seen, seen + len(x))
            seen += len(x)

    def __iter__(self) -> Any:
        for x, y, _ in self.batches():
            yield x, y
