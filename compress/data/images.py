"""Decode an image tree (a folder or a .tar.gz of one) once into a cached uint8 tensor file.

Layout: ``<root>/<split>/<class>/<image>``, where the tree may sit one folder down (as in
``cifar10-jpeg.tar.gz``, whose members are ``cifar10-jpeg/train/airplane/0001.jpg``). The cache is a
plain tensor file keyed by the source's path, size and mtime and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from compress.errors import CompressError, first_line, out_of_memory
from compress.files import atomic_save

log = logging.getLogger("compress.data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def load_cached(
    source: Path, splits: tuple[str, ...], image_size: int | None, field: str, shorter: int | None = None
) -> dict:
    """Return {split: (uint8 NCHW tensor, int64 labels)} and ``classes``, decoding on first use.

    A damaged cache file (truncated by a kill or a full disk in an older version, or not a cache at
    all) is deleted and the images decoded again, with one warning line. The cache is written with
    :func:`compress.files.atomic_save`: a failed write is one CompressError line and leaves no temp file.
    """
    path = cache_path(source, splits, image_size, shorter)
    if path.exists():
        cached, why = _read_cache(path, splits)
        if cached is not None:
            return cached
        log.warning("image cache %s is damaged (%s); decoding %s again", path, why, source)
        with contextlib.suppress(OSError):  # gone already, or not ours to delete: the write below says so
            path.unlink()
    data = decode_tree(source, splits, image_size, field, shorter)
    atomic_save(data, path)
    return data


def cache_path(source: Path, splits: tuple[str, ...], image_size: int | None, shorter: int | None = None) -> Path:
    """Where :func:`load_cached` keeps the decoded tree: keyed by the source's path, size, mtime and the view."""
    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{splits}|{image_size}"
    if shorter is not None:  # resize the shorter side + center crop (compress.deploy.eval_view)
        key += f"|shorter={shorter}"
    return cache_dir() / f"images-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def archive_images(source: Path) -> int:
    """How many image files a tar archive holds (names only: one pass through the stream)."""
    try:
        with tarfile.open(source) as tar:
            return sum(1 for m in tar if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CompressError(
            f"data.root: {source} is neither a folder nor a readable tar archive ({first_line(exc)})"
        ) from None


def _read_cache(path: Path, splits: tuple[str, ...]) -> tuple[dict | None, str]:
    """(the cached dict, "") or (None, why it is not a usable cache); weights-only, so nothing runs."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
        if out_of_memory(exc):
            raise  # a good cache too big for this machine is not a damaged one
        return None, first_line(exc)[:120]
    if not isinstance(obj, dict) or not isinstance(obj.get("classes"), list):
        return None, "not an image cache"
    for split in splits:
        entry = obj.get(split)
        if not (
            isinstance(entry, tuple)
            and len(entry) == 2
            and isinstance(entry[0], torch.Tensor)
            and isinstance(entry[1], torch.Tensor)
            and entry[0].dtype == torch.uint8
            and entry[0].ndim == 4
            and entry[1].ndim == 1
            and len(entry[0]) == len(entry[1])
        ):
            return None, f"no valid {split!r} split"
    return obj, ""


def index_tree(source: Path, splits: tuple[str, ...], field: str) -> tuple[list[str], dict[str, list]]:
    """(classes, {split: [(path or member name, reader, label)]}) of an image tree, sorted by class then
    file name; the tree may sit at any depth. One CompressError line when a split or class is missing."""
    found: dict[str, dict[str, list]] = {s: defaultdict(list) for s in splits}
    for parts, where, read in _walk(source):
        # Accept the tree at any depth: find the split folder, then class, then file.
        for i, part in enumerate(parts[:-2]):
            if part in found and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES and len(parts) - i == 3:
                found[part][parts[i + 1]].append((parts[-1], where, read))
                break
    for split, by_class in found.items():
        if not by_class:
            raise CompressError(f"{field}: no images under a '{split}/<class>/' folder in {source}")
    classes = sorted(found[splits[0]])
    for split in splits[1:]:
        if sorted(found[split]) != classes:
            raise CompressError(f"{field}: classes in '{split}/' differ from '{splits[0]}/' in {source}")
    out = {
        split: [
            (where, read, label)
            for label, cls in enumerate(classes)
            for _, where, read in sorted(by_class[cls], key=lambda t: t[0])
        ]
        for split, by_class in found.items()
    }
    return classes, out


def decode_tree(
    source: Path, splits: tuple[str, ...], image_size: int | None, field: str, shorter: int | None = None
) -> dict:
    from PIL import Image

    from compress.data.transforms import why_undecodable
    from compress.deploy import eval_view

    classes, found = index_tree(source, splits, field)
    out: dict = {"classes": classes}
    for split, items in found.items():
        x = None  # preallocated at the first image: the split takes its decoded size, once
        for i, (where, read, _) in enumerate(items):
            try:
                with Image.open(io.BytesIO(read())) as im:
                    im = im.convert("RGB")
                    if image_size is not None:
                        im = eval_view(im, image_size, image_size, shorter)
                    arr = np.asarray(im)
            except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file: name it
                raise CompressError(f"{field}: {where}: cannot decode the image ({why_undecodable(exc)})") from None
            if x is None:
                x = torch.empty((len(items), arr.shape[2], arr.shape[0], arr.shape[1]), dtype=torch.uint8)
            elif arr.shape[:2] != tuple(x.shape[2:]):
                raise CompressError(
                    f"{field}: images in '{split}/' have different sizes ({arr.shape[1]}x{arr.shape[0]} at {where}, "
                    f"{x.shape[3]}x{x.shape[2]} before); set image_size"
                )
            x[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # Pillow's buffer is read-only
        out[split] = (x, torch.tensor([label for _, _, label in items], dtype=torch.long))
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _walk(source: Path) -> Iterator[tuple[tuple[str, ...], str, callable]]:
    """Yield (path parts, where (a path, or archive:member), reader) for every file in a folder or a tar archive."""
    if source.is_dir():
        for dirpath, _, names in os.walk(source):
            rel = Path(dirpath).relative_to(source).parts
            for name in names:  # plain strings, the reader made on use: a million files stay a few hundred MB
                where = os.path.join(dirpath, name)
                yield (*rel, name), where, functools.partial(_read, where)
        return
    try:
        tar = tarfile.open(source)
    except (tarfile.TarError, OSError) as exc:
        first = str(exc).strip().splitlines()[0].rstrip(":") if str(exc).strip() else type(exc).__name__
        raise CompressError(f"data.root: {source} is neither a folder nor a readable tar archive ({first})") from None
    with tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        # Read each member's bytes now: the tar stream is only valid inside this block.
        blobs = {m.name: tar.extractfile(m).read() for m in members}
    for name, blob in blobs.items():
        yield tuple(Path(name).parts), f"{source}:{name}", (lambda b=blob: b)
