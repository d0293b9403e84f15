"""Streaming data: images decoded from disk in DataLoader worker processes, for data that does not
fit in memory (ImageNet at 224² is ~190 GB as uint8), behind the interface of :class:`ImageData`.

A split is a :class:`Source`: a length, int64 labels, and per image its evaluation view (uint8
C x S x S) and, for ``random_resized`` training crops, its full decoded image. Training batches are
normalized in the workers, in parallel with the training step, as torchvision's reference loaders do
(measured: benchmarks/results/data_throughput.md); evaluation batches (500 images by default) travel
as uint8, a quarter of float32's shared memory, and are normalized in the main process.
Order and sharding are exactly the tensor-resident path's: a
``DistributedSampler`` whose seed is the one :class:`~compress.data.base.TensorLoader` draws its
permutation from, so under ``torchrun`` each rank takes every world-th image of one permutation
(``set_epoch`` reshuffles) and the two paths see the same batches. Every sample carries its own
augmentation seed (:func:`~compress.data.transforms.sample_key`), so views replay exactly
(``views=K``: cached teacher logits stay right) however many workers decode.

A worker that fails on an image raises one CompressError line naming the file; a worker that dies
is one line too, never a hung run.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from compress.data.base import ImageData, holdout_indices, normalize, spread
from compress.data.transforms import TrainView, decode, eval_image, sample_key
from compress.errors import CompressError, first_line

#: decoded images may take at most this fraction of the machine's memory (env COMPRESS_DATA_MAX_GB overrides)
MEMORY_SHARE = 0.5
#: training images the streaming path computes mean/std on (evenly spaced), when they are not given
STATS_IMAGES = 512
#: seconds a batch may take before the loader gives up on its workers (a hung decoder is an error)
WORKER_TIMEOUT = float(os.environ.get("COMPRESS_WORKER_TIMEOUT", 600))


def memory_budget() -> tuple[int, str]:
    """(bytes the decoded images may take, what sets it)."""
    env = os.environ.get("COMPRESS_DATA_MAX_GB")
    if env:
        try:
            return int(float(env) * 2**30), "COMPRESS_DATA_MAX_GB"
        except ValueError:
            raise CompressError(f"COMPRESS_DATA_MAX_GB: {env!r} is not a number of GB") from None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # torchrun's ranks each hold a copy
    share = f"half of this machine's {total / 2**30:.0f} GiB" + (f" over {local} local ranks" if local > 1 else "")
    return int(total * MEMORY_SHARE / local), f"{share}; COMPRESS_DATA_MAX_GB overrides"


def default_workers() -> int:
    """DataLoader worker processes when ``workers`` is not set: one per core, at most 8, shared by the
    processes torchrun starts on this machine (LOCAL_WORLD_SIZE), so ranks do not oversubscribe it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, cores // local))


class Source:
    """One split, image by image (subclasses: image files here, a user's Dataset in compress.data.user)."""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, i: int, view: TrainView | None, key: int | None) -> tuple[Tensor, int]:
        """(uint8 C x S x S, label) of image ``i``: its evaluation view, or ``view`` seeded by ``key``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def eval_view(self, i: int) -> Tensor:
        return self.sample(i, None, None)[0]

    def identity(self) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def take(self, idx: np.ndarray) -> Source:  # pragma: no cover - abstract
        """A source of these images only, in this order."""
        raise NotImplementedError

    def subset(self, n: int) -> Source:
        return self.take(spread(len(self), n))  # evenly spaced: a class-sorted split keeps every class


@dataclass
class FileSource(Source):
    """Image files: paths as one numpy bytes array (forked workers share it without copy-on-write
    growth, unlike a list of Python strings)."""

    paths: np.ndarray
    labels: np.ndarray
    size: int
    shorter: int | None
    mode: str = "RGB"

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return self.paths[i].decode()

    def sample(self, i: int, view: TrainView | None, key: int | None) -> tuple[Tensor, int]:
        if view is None or key is None:
            img = eval_image(self.path(i), self.size, self.shorter, self.mode)
        elif view.crop == "random_resized":  # crop the full decoded image, not the evaluation view
            img = view(decode(self.path(i), self.mode), key)
        else:
            img = view(eval_image(self.path(i), self.size, self.shorter, self.mode), key)
        return img, int(self.labels[i])

    def identity(self) -> bytes:
        h = hashlib.sha256(self.paths[: len(self.labels)].tobytes())
        h.update(self.labels.tobytes())
        h.update(f"{self.size}|{self.shorter}|{self.mode}".encode())
        return h.digest()

    def take(self, idx: np.ndarray) -> FileSource:
        return dataclasses.replace(self, paths=self.paths[idx], labels=self.labels[idx])


class _Samples(Dataset):
    """The torch Dataset the DataLoader reads: item (index, key) -> (uint8 image, label, index), with
    ``key`` the augmentation seed (None: the evaluation view)."""

    def __init__(self, source: Source, view: TrainView | None) -> None:
        self.source, self.view = source, view

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int | None]) -> tuple[Tensor, int, int]:
        i, key = item
        img, label = self.source.sample(i, self.view, key)
        return img, label, i


class _Keyed:
    """Batches of (index, augmentation key) from an index sampler."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool, key: Any) -> None:
        self.sampler, self.batch_size, self.drop_last, self.key = sampler, batch_size, drop_last, key

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        batch: list[tuple[int, int | None]] = []
        for i in self.sampler:
            batch.append((int(i), self.key(int(i))))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch


def stack_images(items: list[tuple[Tensor, int, int]]) -> Tensor:
    """The batch's uint8 images as one tensor; an image of another shape or type is one line naming it."""
    first = items[0][0]
    for img, _, i in items:
        if img.shape != first.shape or img.dtype != torch.uint8:
            raise CompressError(
                f"data: image {i} is {img.dtype} {tuple(img.shape)}, the batch's first is uint8 {tuple(first.shape)}; "
                "set data.image_size (every image must have one size)"
            )
    return torch.stack([img for img, _, _ in items], out=_batch_tensor((len(items), *first.shape), torch.uint8))


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A batch's tensor; in a worker, in shared memory from the start (as default_collate does): a
    private 38 MB batch copied into shared memory per step grew workers' heaps by ~8 MB a batch
    (measured), the allocator keeping the freed blocks."""
    out = torch.empty(shape, dtype=dtype)
    return out.share_memory_() if torch.utils.data.get_worker_info() is not None else out


def _collate_raw(items: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.tensor([label for _, label, _ in items], dtype=torch.long)
    return stack_images(items), y, torch.tensor([i for _, _, i in items], dtype=torch.long)


class _Collate:
    """Stack and normalize a batch where it was decoded (in a worker, in parallel with training),
    as torchvision's reference loaders do; the arithmetic is ImageData.normalize's."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = mean, std

    def __call__(self, items: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
        x = stack_images(items)
        y = torch.tensor([label for _, label, _ in items], dtype=torch.long)
        out = _batch_tensor(tuple(x.shape), torch.float32)
        return normalize(x, self.mean, self.std, out=out), y, torch.tensor([i for _, _, i in items], dtype=torch.long)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding parallelizes over workers; threads inside each would oversubscribe
    # What the fork copied stays put: the parent's not-yet-collected garbage (an old loader's iterator)
    # must not be finalized here, where it is not the parent (and copy-on-write pages stay shared).
    gc.freeze()


def loader_failure(exc: BaseException) -> str | None:
    """One line when ``exc`` is a loader worker's failure or death, else None. DataLoader's SIGCHLD
    handler raises a worker's death wherever the main process is (mid-forward, say), so the pipeline
    asks this of whatever a stage raised, as it asks :func:`compress.errors.out_of_memory`."""
    if isinstance(exc, RuntimeError) and re.search(r"DataLoader worker \(pid", str(exc)):
        return worker_error(exc)
    return None


def worker_error(exc: BaseException) -> str:
    """One line from what a DataLoader re-raises for a failed or dead worker."""
    text = str(exc)
    found = re.findall(r"CompressError: (.+)", text)
    if found:
        return found[-1].strip()
    caught = re.match(r"Caught (\w+) in DataLoader worker process", text)
    if caught:  # the worker's own exception: its last line, which names what failed
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        return f"data: a loader worker failed: {lines[-1] if lines else caught.group(1)}"
    if "exited unexpectedly" in text:
        died = re.search(r"\(pids?\(?s?\)? ([\d, ]+)\) exited unexpectedly(?: with exit code (-?\d+))?", text)
        how = f"pid {died.group(1)}, exit code {died.group(2)}" if died and died.group(2) else first_line(exc)[:80]
        return f"data: a loader worker died ({how}); lower data.workers, or set workers: 0 to see the cause"
    if isinstance(exc, RuntimeError) and "timed out" in text:
        return f"data: no batch within {WORKER_TIMEOUT:.0f} s from the loader workers (a hung decoder or disk)"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return f"data: a loader worker failed: {lines[-1] if lines else type(exc).__name__}"


class StreamLoader:
    """The training/evaluation loader of a :class:`StreamBundle` (TensorLoader's interface)."""

    def __init__(
        self, bundle: StreamBundle, source: Source, batch_size: int, *, seed: int | None, augment: bool,
        drop_last: bool, rank: int = 0, world: int = 1, views: int | None = None, normalize: bool = True,
    ) -> None:  # fmt: skip
        self.bundle, self.source, self.seed, self.augment = bundle, source, seed, augment
        self.views, self.epoch, self.normalize = views, 0, normalize
        self.batch_size = min(batch_size, len(source) // world) if drop_last else batch_size
        if seed is not None:  # the permutation TensorLoader draws: generator seed seed * 100_003 + epoch
            self.sampler: Any = DistributedSampler(
                range(len(source)), num_replicas=world, rank=rank, shuffle=True, seed=seed * 100_003, drop_last=True
            )
        else:
            self.sampler = range(len(source))
        view = bundle.train_view if augment else None
        self._batches = _Keyed(self.sampler, max(1, self.batch_size), drop_last, self._key)
        workers = bundle.workers
        self._loader = DataLoader(
            _Samples(source, view),
            batch_sampler=self._batches,
            # training batches normalized where decoded (in parallel with the step); evaluation batches
            # (eval_batch_size, 500 by default) travel as uint8, a quarter of the shared memory
            collate_fn=_Collate(bundle.mean, bundle.std) if normalize and seed is not None else _collate_raw,
            num_workers=workers,
            pin_memory=bundle.device.type == "cuda",
            persistent_workers=workers > 0 and seed is not None,
            worker_init_fn=_worker_init if workers > 0 else None,
            timeout=WORKER_TIMEOUT if workers > 0 else 0,
        )

    def __len__(self) -> int:
        return len(self._batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def view(self) -> int | None:
        """As TensorLoader.view: 0 without augmentation, the replayed view, or None (fresh views)."""
        if not self.augment:
            return 0
        return None if self.views is None else self.epoch % self.views

    def _key(self, i: int) -> int | None:
        if not self.augment:
            return None
        view = self.view()
        # fresh views are still seeded, by epoch: reproducible and resumable, but never repeated
        return sample_key(self.seed or 0, view if view is not None else 1_000_000 + self.epoch, i)

    def batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(images, labels, indices into this split) batches."""
        it = iter(self._loader)
        while True:
            try:
                x, y, idx = next(it)
            except StopIteration:
                return
            except CompressError as exc:  # DataLoader rebuilds a worker's error with its traceback
                if "DataLoader worker process" in str(exc):
                    raise CompressError(worker_error(exc)) from None
                raise
            except Exception as exc:  # noqa: BLE001 - a worker's exception or death, re-raised by DataLoader
                raise CompressError(worker_error(exc)) from None
            yield (self.bundle.normalize(x) if self.normalize and x.dtype == torch.uint8 else x), y, idx

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y, _ in self.batches():
            yield x, y


@dataclass
class StreamBundle(ImageData):
    """Data decoded as it is read, by ``workers`` DataLoader processes (0: in the main process)."""

    train: Source
    test: Source
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shape: tuple[int, int, int]  # (C, H, W) of every evaluation view and training crop
    train_view: TrainView
    augment: bool = True
    workers: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    describe: str = ""

    streaming = True

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.shape

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def test_size(self) -> int:
        return len(self.test)

    def to(self, device: torch.device) -> StreamBundle:
        self.device = torch.device(device)  # batches move per step; pinned memory when it is a GPU
        return self

    def _source(self, split: str) -> Source:
        return self.test if split == "test" else self.train

    def train_loader(
        self, seed: int, augment: bool | None = None, rank: int = 0, world: int = 1, views: int | None = None
    ) -> StreamLoader:
        aug = self.augment if augment is None else augment
        bs = max(1, self.batch_size // world)
        return StreamLoader(
            self, self.train, bs, seed=seed, augment=aug, drop_last=True, rank=rank, world=world, views=views
        )

    def eval_loader(self, split: str = "test") -> StreamLoader:
        return StreamLoader(self, self._source(split), self.eval_batch_size, seed=None, augment=False, drop_last=False)

    def raw(self, split: str, index: Sequence[int] | Tensor | np.ndarray) -> Tensor:
        source = self._source(split)
        idx = [int(i) for i in (index.tolist() if hasattr(index, "tolist") else index)]
        return (
            torch.stack([source.eval_view(i) for i in idx]) if idx else torch.empty((0, *self.shape), dtype=torch.uint8)
        )

    def raw_batches(
        self, split: str, images: int | None = None, batch_size: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        source = self._source(split)
        if images is not None and images < len(source):
            source = source.subset(images)
        loader = StreamLoader(
            self, source, batch_size or self.eval_batch_size, seed=None, augment=False, drop_last=False, normalize=False
        )
        yield from loader

    def limit(self, split: str, n: int) -> StreamBundle:
        if split == "test":
            return dataclasses.replace(self, test=self.test.subset(n))
        return dataclasses.replace(self, train=self.train.subset(n))

    def holdout(self, n: int) -> StreamBundle:
        held, rest = holdout_indices(len(self.train), n)
        return dataclasses.replace(self, train=self.train.take(rest), test=self.train.take(held))

    def fingerprint(self) -> bytes:
        h = hashlib.sha256(json.dumps(self.class_names).encode())
        h.update(self.train.identity())
        h.update(self.test.identity())
        return h.digest()
