"""Image views shared by both data paths: the evaluation view and the training augmentations.

Evaluation: shorter side resized to ``image_size / crop_ratio`` and the center ``image_size``
cropped, in Pillow, by :func:`compress.deploy.eval_view` — the function a deployer's
``compress predict`` (and the copyable ``deploy.py``) uses, so a deployer resizing and cropping as the
ONNX metadata says feeds the model exactly the pixels the report's top-1 was measured on.

Training (``train_crop``): ``pad`` is a random crop of the zero-padded image plus a flip (CIFAR's);
``random_resized`` is Inception's RandomResizedCrop (area fraction in ``scale``, aspect ratio in
3/4..4/3) plus a flip, then optionally TrivialAugment or RandAugment: ``torchvision.transforms.v2``'s
own, on uint8 tensors, their draws seeded per image (seed, epoch or replayed view, index), so the
same seed gives the same views on any number of workers, and a resumed run sees what it would have.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compress.deploy import eval_view
from compress.errors import CompressError, first_line

RATIO = (3 / 4, 4 / 3)
#: what the decoder of training images is: "pil" or "torchvision" (libjpeg-turbo via torchvision.io);
#: chosen by benchmarks/jpeg_decode.py
DECODER = "torchvision"


def resize_shorter(image_size: int, crop_ratio: float) -> int:
    """The shorter side evaluation resizes to before its center crop (timm/torchvision: floor)."""
    return int(math.floor(image_size / crop_ratio))


def sample_key(seed: int, which: int, index: int) -> int:
    """One generator seed per (seed, epoch or view, image): independent of workers and batch order."""
    return (seed * 1_000_003 + which * 7_919 + index * 104_729 + 12_345) % (2**63 - 1)


def mean_fill(mean: tuple[float, ...] | list[float]) -> tuple[int, ...]:
    """The uint8 pixel of the mean colour (what a normalized zero is)."""
    return tuple(int(round(m * 255)) for m in mean)


def auto_augment_op(kind: str | None) -> Callable[[Tensor], Tensor] | None:
    from torchvision.transforms import v2

    if kind is None:
        return None
    return v2.TrivialAugmentWide() if kind == "trivial" else v2.RandAugment()


class TrainView:
    """The training augmentation of one image: picklable (it runs in DataLoader workers)."""

    def __init__(
        self,
        crop: str,
        size: int,
        pad: int,
        scale: tuple[float, float],
        flip: bool,
        auto_augment: str | None,
        fill: tuple[int, ...] = (0,),
    ) -> None:
        self.crop, self.size, self.pad, self.scale, self.flip = crop, size, pad, scale, flip
        self.auto_augment = auto_augment
        self.fill = fill
        self._ops: Callable[[Tensor], Tensor] | None = None

    def __call__(self, img: Tensor, key: int) -> Tensor:
        """uint8 C x H x W (the full decoded image for random_resized, the evaluation view for pad).

        torchvision's own transforms and parameter draws (RandomResizedCrop's ten tries and centre
        fallback, the flip's coin, the auto-augment ops), drawn from the global generator seeded with
        ``key``, then put back: the caller's random state is left as it was."""
        from torchvision.transforms import v2

        if self._ops is None:
            if self.crop == "random_resized":
                crop: Any = v2.RandomResizedCrop(self.size, scale=self.scale, ratio=RATIO, antialias=True)
            else:
                crop = v2.RandomCrop(img.shape[1:], padding=self.pad, fill=self.fill)
            ops = [crop, *([v2.RandomHorizontalFlip()] if self.flip else [])]
            self._ops = v2.Compose([*ops, *([auto_augment_op(self.auto_augment)] if self.auto_augment else [])])
        gen = torch.default_generator  # not torch.manual_seed: it also seeds every accelerator (~120 us)
        state = gen.get_state()
        try:
            gen.manual_seed(key)
            return self._ops(img).contiguous()
        finally:
            gen.set_state(state)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ops": None}


def why_undecodable(exc: BaseException) -> str:
    """The reason, in a few words, without the reader object Pillow names (``<_io.BytesIO at 0x..>``)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read"
    # torchvision's decoders name their C++ source ("... /__w/vision/.../decode_jpeg.cpp:171 ..."): drop it
    return (
        re.sub(r"\s*\(?(Exception raised from|/__w/|\S+\.cpp:\d+)[^)]*\)?", "", first_line(exc)).strip()
        or type(exc).__name__
    )


def decode(path: str, mode: str = "RGB") -> Tensor:
    """An image file -> uint8 C x H x W, at its own size; one CompressError line naming it when the
    file cannot be read or decoded."""
    try:
        if DECODER == "torchvision" and mode == "RGB" and path.lower().endswith((".jpg", ".jpeg", ".png")):
            from torchvision.io import ImageReadMode, decode_image, read_file

            img = decode_image(read_file(path), mode=ImageReadMode.RGB)
            if img.dtype == torch.uint8:
                return img
            # a 16-bit PNG: Pillow converts it to 8 bits, as the evaluation view does
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode))
        return torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1).contiguous()
    except Exception as exc:  # noqa: BLE001 - libjpeg, Pillow and the OS raise many types for one bad file
        raise CompressError(f"data.root: {path}: cannot decode the image ({why_undecodable(exc)})") from None


def eval_image(path: str, size: int, shorter: int | None, mode: str = "RGB") -> Tensor:
    """An image file's evaluation view as uint8 C x size x size (Pillow, :func:`compress.deploy.eval_view`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(eval_view(im.convert(mode), size, size, shorter))
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt files raise many types
        raise CompressError(f"data.root: {path}: cannot decode the image ({why_undecodable(exc)})") from None
    return torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1).contiguous()


#: the first bytes of the image formats the loaders read
MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"GIF8", b"RIFF", b"II*\x00", b"MM\x00*", b"P6", b"P5")


def check_readable(path: Path) -> str | None:
    """Why ``path`` cannot be an image we read (empty, unreadable, not an image by its first bytes), or
    None; cheap (16 bytes), so a whole tree is checked before training starts."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if not head:
        return "the file is empty"
    if not head.startswith(MAGIC):
        return "not an image file (unknown first bytes)"
    return None
