"""The data interface every stage uses (:class:`ImageData`) and its tensor-resident form.

Two forms sit behind one interface: :class:`DataBundle` (here) decodes once and holds each split as a
uint8 tensor (N, C, H, W) plus int64 labels; following airbench/nanoGPT, a loader then shuffles with
a seeded generator, slices batches, normalizes and augments the whole batch at once (random crop with
padding + horizontal flip) on whatever device the data is: the fastest path for data that fits in
memory. :class:`compress.data.stream.StreamBundle` decodes from disk in DataLoader worker processes,
for data that does not. Stages only use what :class:`ImageData` declares: loaders yielding
normalized float batches, and ``raw`` uint8 evaluation views (what an exported uint8-input model takes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor


class DatasetConfig(BaseModel):
    """Fields every dataset accepts."""

    model_config = ConfigDict(extra="forbid")

    name: str
    batch_size: int = Field(128, gt=0, le=65536, description="training batch size")
    eval_batch_size: int = Field(500, gt=0, le=65536, description="batch size for evaluation/calibration")
    mixup: float = Field(0.0, ge=0, le=10, description="mixup's Beta alpha while training (0: off)")
    cutmix: float = Field(0.0, ge=0, le=10, description="cutmix's Beta alpha while training (0: off)")
    mix_prob: float = Field(1.0, ge=0, le=1, description="share of training batches mixed, when mixup/cutmix is on")
    mix_switch: float = Field(0.5, ge=0, le=1, description="chance a mixed batch uses cutmix, when both are on")

    @model_validator(mode="after")
    def _mixing(self) -> DatasetConfig:
        if not (self.mixup or self.cutmix) and (self.mix_prob, self.mix_switch) != (1.0, 0.5):
            raise ValueError("mix_prob/mix_switch: no effect without mixup or cutmix")
        if not (self.mixup and self.cutmix) and self.mix_switch != 0.5:
            raise ValueError("mix_switch: chooses between mixup and cutmix; set both")
        return self

    def load(self) -> ImageData:  # pragma: no cover - abstract
        raise NotImplementedError

    def open(self) -> ImageData:
        """``load()``, with the batch mixing every dataset takes (see :mod:`compress.data.mixing`)."""
        data = self.load()
        for key in ("mixup", "cutmix", "mix_prob", "mix_switch"):
            setattr(data, key, getattr(self, key))
        return data


@dataclass(kw_only=True)
class ImageData:
    """What stages may use of a dataset, whatever its form (tensor-resident or streaming).

    Every form provides, besides the attributes ``class_names``, ``mean``, ``std``, ``augment``,
    ``batch_size``, ``eval_batch_size``, ``mixup``/``cutmix``/``mix_prob``/``mix_switch`` (batch mixing while
    training, see :mod:`compress.data.mixing`) and ``eval_resize`` (the shorter side evaluation images are
    resized to before their center crop; None: resized straight to the input size):

    - ``train_size`` / ``test_size``, ``input_shape`` (C, H, W);
    - ``train_loader(seed, augment=, rank=, world=, views=)`` and ``eval_loader(split)``;
    - ``raw(split, index)``: the uint8 evaluation views of those images (no augmentation);
    - ``raw_batches(split, images=None, batch_size=None)``: (uint8 images, labels) in order;
    - ``limit(split, n)``: a copy whose split holds only ``n`` evenly spaced images;
    - ``holdout(n)``: a copy for choosing between models without the test split: its test split is ``n``
      evenly spaced training images, its train split the rest;
    - ``fingerprint()``: bytes identifying the content; ``to(device)``.
    """

    streaming = False
    batch_size: int = 128
    eval_batch_size: int = 500
    extra: dict = field(default_factory=dict)
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mix_switch: float = 0.5
    eval_resize: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    def normalize(self, x: Tensor) -> Tensor:
        return normalize(x, self.mean, self.std)

    def example_input(self, batch_size: int = 1) -> Tensor:
        """A real, normalized test batch (for tracing, export and parity checks)."""
        return self.normalize(self.raw("test", range(min(batch_size, self.test_size))))


@dataclass
class DataBundle(ImageData):
    train_x: Tensor  # uint8 (N, C, H, W)
    train_y: Tensor  # int64 (N,)
    test_x: Tensor
    test_y: Tensor
    class_names: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    augment: bool = False  # random crop (padding `pad`) + horizontal flip
    pad: int = 4
    flip: bool = True
    train_view: Any = None  # a compress.data.transforms.TrainView: per-image augmentation instead of pad/flip

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise ValueError(f"{split} images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if len(x) != len(y) or len(x) == 0:
                raise ValueError(f"{split} split has {len(x)} images and {len(y)} labels")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean/std must have one value per channel")

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def train_size(self) -> int:
        return len(self.train_y)

    @property
    def test_size(self) -> int:
        return len(self.test_y)

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        return (self.test_x, self.test_y) if split == "test" else (self.train_x, self.train_y)

    def raw(self, split: str, index) -> Tensor:  # noqa: ANN001 - any index sequence
        x, _ = self._split(split)
        return x[torch.as_tensor(list(index) if isinstance(index, range) else index, dtype=torch.long)].cpu()

    def raw_batches(
        self, split: str, images: int | None = None, batch_size: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self._split(split)
        n, step = min(images or len(y), len(y)), batch_size or self.eval_batch_size
        for start in range(0, n, step):
            yield x[start : min(n, start + step)].cpu(), y[start : min(n, start + step)].cpu()

    def limit(self, split: str, n: int) -> DataBundle:
        if split == "test":
            idx = torch.from_numpy(spread(len(self.test_y), n))
            return dataclasses.replace(self, test_x=self.test_x[idx], test_y=self.test_y[idx])
        idx = torch.from_numpy(spread(len(self.train_y), n))
        return dataclasses.replace(self, train_x=self.train_x[idx], train_y=self.train_y[idx])

    def holdout(self, n: int) -> DataBundle:
        held, rest = (torch.from_numpy(i).to(self.train_y.device) for i in holdout_indices(len(self.train_y), n))
        return dataclasses.replace(
            self, train_x=self.train_x[rest], train_y=self.train_y[rest], test_x=self.train_x[held],
            test_y=self.train_y[held],
        )  # fmt: skip

    def fingerprint(self) -> bytes:
        h = hashlib.sha256(json.dumps(self.class_names).encode())
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(repr(tuple(t.shape)).encode() + t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device) -> DataBundle:
        """Move the uint8 tensors to ``device`` once (a CIFAR train split is 150 MB)."""
        for name in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def train_loader(
        self, seed: int, augment: bool | None = None, rank: int = 0, world: int = 1, views: int | None = None
    ) -> TensorLoader:
        """Shuffled training batches; under DDP each of ``world`` ranks takes every world-th image of the
        same permutation, in batches of batch_size // world, so the global batch stays batch_size.

        ``views=K`` replays K fixed augmentations: image i in epoch e is crop/flipped exactly as in
        epoch e - K (its parameters depend only on seed, e mod K and i), so anything computed from an
        augmented image (cached teacher logits) can be reused. Without it every epoch draws new ones.
        """
        aug = self.augment if augment is None else augment
        bs = max(1, self.batch_size // world)
        loader = TensorLoader(self, self.train_x, self.train_y, bs, seed=seed, augment=aug, drop_last=True)
        loader.rank, loader.world = rank, world
        loader.views = views
        return loader

    def eval_loader(self, split: str = "test") -> TensorLoader:
        x, y = (self.test_x, self.test_y) if split == "test" else (self.train_x, self.train_y)
        return TensorLoader(self, x, y, self.eval_batch_size, seed=None, augment=False, drop_last=False)


class TensorLoader:
    """Iterates (images, labels) batches; shuffled with a per-epoch seed when ``seed`` is set."""

    def __init__(
        self,
        bundle: DataBundle,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        seed: int | None,
        augment: bool,
        drop_last: bool,
    ) -> None:
        self.bundle, self.x, self.y = bundle, x, y
        self.batch_size = min(batch_size, len(x)) if drop_last else batch_size
        self.seed, self.augment, self.drop_last = seed, augment, drop_last
        self.epoch = 0
        self.rank, self.world = 0, 1
        self.views: int | None = None

    def __len__(self) -> int:
        n = len(self.x) // self.world
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view(self) -> int | None:
        """Which fixed augmentation the current epoch replays: 0 without augmentation, None when
        every epoch draws fresh random augmentations (then nothing per-image can be cached)."""
        if not self.augment:
            return 0
        return None if self.views is None else self.epoch % self.views

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y, _ in self.batches():
            yield x, y

    def batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(images, labels, indices into this split) batches."""
        gen = None
        order = torch.arange(len(self.x), device=self.x.device)
        if self.seed is not None:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(self.x), generator=gen).to(self.x.device)
            if self.world > 1:  # every rank draws the same permutation and keeps its own stride
                order = order[self.rank :: self.world]
        view = self.view() if self.augment else None
        per_image = self.augment and self.bundle.train_view is not None
        table = self._view_table(view) if view is not None and not per_image else None
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            if per_image:  # the streaming path's per-image augmentation, with its per-image seeds
                yield self.bundle.normalize(self._per_image(idx, view)), self.y[idx], idx
                continue
            xb = self.bundle.normalize(self.x[idx])
            if table is not None:
                dy, dx, flip = (t[idx] for t in table)
                xb = crop_flip(xb, self.bundle.pad, dy, dx, flip if self.bundle.flip else None)
            elif self.augment:
                xb = augment_batch(xb, self.bundle.pad, self.bundle.flip, gen)
            yield xb, self.y[idx], idx

    def _per_image(self, idx: Tensor, view: int | None) -> Tensor:
        from compress.data.transforms import sample_key

        which = view if view is not None else 1_000_000 + self.epoch
        aug = self.bundle.train_view
        imgs = [aug(self.x[j].cpu(), sample_key(self.seed or 0, which, j)) for j in idx.tolist()]
        return torch.stack(imgs).to(self.x.device)

    def _view_table(self, view: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image crop offsets and flips of fixed augmentation ``view`` (a function of seed, view)."""
        gen = torch.Generator().manual_seed((self.seed or 0) * 100_003 + 7_919 * (view + 1) + 1)
        n, pad = len(self.x), self.bundle.pad
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5
        return dy.to(self.x.device), dx.to(self.x.device), flip.to(self.x.device)


def augment_batch(x: Tensor, pad: int, flip: bool, gen: torch.Generator | None) -> Tensor:
    """Random crop with zero padding and random horizontal flip, vectorized over the batch."""
    n = x.shape[0]
    dy = dx = None
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    mask = (torch.rand(n, generator=gen) < 0.5).to(x.device) if flip else None
    return crop_flip(x, pad, dy, dx, mask)


def crop_flip(x: Tensor, pad: int, dy: Tensor | None, dx: Tensor | None, flip: Tensor | None) -> Tensor:
    """Crop each image at offsets (dy, dx) of its zero-padded copy, then mirror where ``flip``."""
    n, _, h, w = x.shape
    if pad > 0 and dy is not None and dx is not None:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # n,1,h,1
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # n,1,1,w
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def spread(total: int, n: int) -> np.ndarray:
    """``n`` evenly spaced indices of ``total`` (all of them when n >= total): what ``limit`` keeps, so a
    subset of a class-sorted split (an ImageFolder tree, CIFAR's) still holds every class."""
    if n >= total:
        return np.arange(total, dtype=np.int64)
    return np.unique(np.linspace(0, total - 1, max(n, 1)).round().astype(np.int64))


def holdout_indices(total: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(``n`` evenly spaced indices of ``total``, the others): a held-out slice that keeps every class
    of a class-sorted split, and what is left to train on. Refuses to hold out everything."""
    if not 0 < n < total:
        raise ValueError(f"cannot hold out {n} of {total} training images")
    held = spread(total, n)
    keep = np.ones(total, dtype=bool)
    keep[held] = False
    return held, np.flatnonzero(keep)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...], out: Tensor | None = None) -> Tensor:
    """uint8 NCHW -> float (x / 255 - mean) / std: the exported graph's preprocessing op for op, in
    place on one new tensor (three allocations per batch cost more than the arithmetic at 224²), or
    into ``out``."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    y = x.float() if out is None else out.copy_(x)
    return y.div_(255.0).sub_(m).div_(s)


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of a uint8 image tensor, in [0, 1] units."""
    xf = x.float().div(255.0).transpose(0, 1).reshape(x.shape[1], -1)
    std = xf.std(dim=1).clamp_min(1e-3)
    return tuple(xf.mean(dim=1).tolist()), tuple(std.tolist())


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
