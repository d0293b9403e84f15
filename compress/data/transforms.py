"""Image views shared by both data paths: the evaluation view and the training augmentations.

Evaluation: shorter side resized to ``image_size / crop_ratio`` and the center ``image_size``
cropped, in Pillow, by :func:`compress.deploy.eval_view` — the function a deployer's
``compress predict`` (and the copyable ``deploy.py``) uses, so a deployer resizing and cropping as the
ONNX metadata says feeds the model exactly the pixels the report's top-1 was measured on.

Training (``train_crop``): ``pad`` is a random crop of the zero-padded image plus a flip (CIFAR's);
``random_resized`` is Inception's RandomResizedCrop (area fraction in ``scale``, aspect ratio in
3/4..4/3) plus a flip, then optionally TrivialAugment or RandAugment, all from
``torchvision.transforms.v2`` on uint8 tensors. The crop boxes are drawn by :func:`rrc_boxes`, from a
``torch.Generator`` seeded per image (seed, epoch or replayed view, index), in both paths: the same
seed gives the same views on any number of workers, and a resumed run sees the images it would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

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


def rrc_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top, left, h, w) of ``n`` RandomResizedCrop boxes in an image of height x width: the area a
    uniform fraction in ``scale``, the aspect ratio log-uniform in 3/4..4/3, clamped into the image
    (where torchvision redraws up to 10 times, clamping keeps this vectorized; same ranges)."""
    area = height * width * torch.empty(n).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=gen)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).round().clamp(1, width).long()
    h = torch.sqrt(area / r).round().clamp(1, height).long()
    top = (torch.rand(n, generator=gen) * (height - h + 1)).floor().long()
    left = (torch.rand(n, generator=gen) * (width - w + 1)).floor().long()
    return top, left, h, w


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
    ) -> None:
        self.crop, self.size, self.pad, self.scale, self.flip = crop, size, pad, scale, flip
        self.auto_augment = auto_augment
        self._aa: Callable[[Tensor], Tensor] | None = None

    def __call__(self, img: Tensor, key: int) -> Tensor:
        """uint8 C x H x W (the full decoded image for random_resized, the evaluation view for pad)."""
        from torchvision.transforms.v2 import functional as TF

        gen = torch.Generator().manual_seed(key)
        if self.crop == "random_resized":
            top, left, h, w = (int(t) for t in rrc_boxes(1, img.shape[1], img.shape[2], self.scale, gen))
            img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        else:
            p = self.pad
            dy, dx = (int(v) for v in torch.randint(0, 2 * p + 1, (2,), generator=gen))
            padded = torch.nn.functional.pad(img, (p, p, p, p))
            img = padded[:, dy : dy + img.shape[1], dx : dx + img.shape[2]]
        if self.flip and bool(torch.rand(1, generator=gen) < 0.5):
            img = img.flip(2)
        if self.auto_augment is not None:
            if self._aa is None:
                self._aa = auto_augment_op(self.auto_augment)
            with torch.random.fork_rng(devices=[]):  # v2's ops draw from the global generator
                torch.manual_seed(key + 1)
                img = self._aa(img)
        return img.contiguous()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_aa": None}


def why_undecodable(exc: BaseException) -> str:
    """The reason, in a few words, without the reader object Pillow names (``<_io.BytesIO at 0x..>``)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read"
    return first_line(exc)


def decode(path: str, mode: str = "RGB") -> Tensor:
    """An image file -> uint8 C x H x W, at its own size; one CompressError line naming it when the
    file cannot be read or decoded."""
    try:
        if DECODER == "torchvision" and mode == "RGB" and path.lower().endswith((".jpg", ".jpeg", ".png")):
            from torchvision.io import ImageReadMode, decode_image, read_file

            return decode_image(read_file(path), mode=ImageReadMode.RGB)
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
