"""One sample of a user's Dataset as the pipeline takes it: uint8 C×H×W and a class index, every
problem one line naming the split and index (shared by the in-memory and streaming user paths)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from compress.errors import CompressError, first_line


def read_sample(
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
