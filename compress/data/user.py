"""Your own data: ``data: {name: "mypkg.data:load", ...}`` names a function that returns torch
``Dataset``s of (image, label), decoded once into the tensor-resident :class:`DataBundle` the
pipeline trains on (uint8 N×C×H×W, like every built-in dataset).

The function is imported with :func:`compress.userpath.import_object` (the recipe's folder first,
then the working directory) and called with ``kwargs``. It may return ``(train, test)`` (the class
names then come from the datasets' ``.classes``, as torchvision's datasets carry them),
``(train, test, class_names)``, a dict with the keys ``train``, ``test`` and ``class_names``, or a
ready :class:`DataBundle`. A sample is ``(image, label)``: a PIL image or a tensor (C×H×W or H×W;
uint8, or float in [0, 1] as ``ToTensor`` gives), and an integer label. Everything is held in
memory; a dataset whose decoded images would not fit is refused before decoding (streaming is a
later feature). Every problem is one line naming ``data.*`` and the sample.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from compress import userpath
from compress.data import DATASETS
from compress.data.base import DataBundle, DatasetConfig
from compress.errors import CompressError, first_line

#: the registry name (and the recipe schema's tag) of every ``package.module:function`` dataset
USER_DATASET = "package.module:function"
#: decoded images may take at most this fraction of the machine's memory (env COMPRESS_DATA_MAX_GB overrides)
MEMORY_SHARE = 0.5


@DATASETS.register(USER_DATASET)
class UserDataset(DatasetConfig):
    """Your own function (``name: mypkg.data:load``) returning train/test Datasets of (image, label)
    plus class names; decoded once into memory, resized to image_size."""

    name: str = Field(description="'package.module:function', imported from the recipe's folder, then the cwd")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the function")
    image_size: int | tuple[int, int] | None = Field(
        None, description="resize every image to this (side or [height, width]); required when sizes differ"
    )
    mean: tuple[float, ...] | None = Field(None, description="per channel, in [0, 1] units; default: computed on train")
    std: tuple[float, ...] | None = None
    augment: bool = Field(False, description="random crop (padding size/8) + horizontal flip while training")

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

    def load(self) -> DataBundle:
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
        if isinstance(out, DataBundle):
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
        )

    def _adjust(self, bundle: DataBundle) -> DataBundle:
        """A DataBundle is used as it is, except for the settings the recipe gives explicitly."""
        if "image_size" in self.model_fields_set:
            raise CompressError(f"data.image_size: {self.name!r} returns a DataBundle, which is not resized")
        for key in ("batch_size", "eval_batch_size", "augment", "mean", "std"):
            if key in self.model_fields_set:
                setattr(bundle, key, getattr(self, key))
        bundle.__post_init__()  # mean/std must still fit the channels
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


def memory_budget() -> tuple[int, str]:
    """(bytes the decoded images may take, what sets it)."""
    env = os.environ.get("COMPRESS_DATA_MAX_GB")
    if env:
        try:
            return int(float(env) * 2**30), "COMPRESS_DATA_MAX_GB"
        except ValueError:
            raise CompressError(f"COMPRESS_DATA_MAX_GB: {env!r} is not a number of GB") from None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * MEMORY_SHARE), f"half of this machine's {total / 2**30:.0f} GiB; COMPRESS_DATA_MAX_GB overrides"


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
) -> DataBundle:
    """Decode two Datasets of (image, label) into a DataBundle, refusing early what would not fit."""
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
    first, _ = _sample(train, 0, "train", size, len(class_names), field)
    need = (len(train) + len(test)) * first.numel()
    budget, why = memory_budget()
    if need > budget:
        raise CompressError(
            f"{field}: {len(train)} + {len(test)} images of {'x'.join(map(str, first.shape))} would take "
            f"{need / 2**30:.1f} GiB in memory, over the {budget / 2**30:.1f} GiB budget ({why}); every image "
            "is decoded into memory (streaming from disk is a later feature): set a smaller image_size or use a subset"
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
        img, label = _sample(ds, i, split, size, classes, field)
        if img.shape != first.shape:
            what = "channels" if img.shape[0] != first.shape[0] else "sizes"
            fix = "convert them to one mode" if what == "channels" else "set data.image_size"
            raise CompressError(
                f"{field}: images differ in {what} ({tuple(first.shape)} at train[0], {tuple(img.shape)} at "
                f"{split}[{i}]); {fix}"
            )
        x[i], y[i] = img, label
    return x, y


def _sample(
    ds: Any, i: int, split: str, size: tuple[int, int] | None, classes: int, field: str
) -> tuple[torch.Tensor, int]:
    where = f"{field}: {split}[{i}]"
    try:
        item = ds[i]
    except Exception as exc:  # noqa: BLE001 - the user's dataset failed: one line naming the sample
        raise CompressError(f"{where}: the dataset raised {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        got = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
        raise CompressError(f"{where} is {got}; expected (image, label)")
    try:
        image = image_tensor(item[0], size, where)
    except CompressError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated file, a decompression bomb, an odd mode: name the sample
        raise CompressError(f"{where}: the image cannot be decoded ({type(exc).__name__}: {first_line(exc)})") from None
    return image, _label(item[1], classes, where)


def _label(label: Any, classes: int, where: str) -> int:
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = label.item()
    if isinstance(label, np.integer):
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise CompressError(f"{where}: the label is {label!r} ({type(label).__name__}); expected a class index")
    if not 0 <= label < classes:
        raise CompressError(f"{where}: label {label} is out of range for {classes} class names")
    return label


def image_tensor(img: Any, size: tuple[int, int] | None, where: str) -> torch.Tensor:
    """A PIL image or a tensor as uint8 C×H×W, resized to ``size`` (height, width) when given."""
    from PIL import Image

    if isinstance(img, Image.Image):
        img = img.convert("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(img)
        return torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1).contiguous()
    if not isinstance(img, torch.Tensor):
        raise CompressError(f"{where}: the image is a {type(img).__name__}; expected a PIL image or a torch tensor")
    x = img.detach().cpu()
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise CompressError(f"{where}: the image tensor has shape {tuple(img.shape)}; expected C×H×W or H×W")
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()):
            raise CompressError(f"{where}: the float image holds NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise CompressError(
                f"{where}: float image values span [{lo:.3g}, {hi:.3g}]; expected [0, 1] (ToTensor's range) — "
                "leave normalization out: the pipeline normalizes with data.mean/std"
            )
        x = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
    elif x.dtype != torch.uint8:
        if x.dtype == torch.bool or int(x.min()) < 0 or int(x.max()) > 255:
            raise CompressError(f"{where}: {x.dtype} image values must be in 0..255")
        x = x.to(torch.uint8)
    if size is not None and tuple(x.shape[1:]) != size:
        resized = torch.nn.functional.interpolate(
            x[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
        )
        x = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return x.contiguous()


def chunked_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of a uint8 N×C×H×W tensor in [0, 1] units, a chunk at a time (a float
    copy of the whole split would take 4× its memory)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].double().div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    n = x.numel() // x.shape[1]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


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
