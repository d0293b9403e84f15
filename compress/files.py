"""Files written whole or not at all, and torch files read weights-only, each failure one line.

``atomic_save``/``atomic_write_text`` write to a temp file, fsync and rename, so a kill or a full disk
leaves the old file or the new one, never half of one; a failed write removes its temp file and is
one :class:`CompressError` naming the file. ``safe_load`` is ``torch.load(weights_only=True)`` with
every failure (not a torch file, a pickle of objects, a truncated file) as one line naming it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from errno import EINVAL
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError, first_line


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file, fsync, rename: a kill leaves the old file or the new one, never half.

    A write that fails (disk full, file too large, no permission) removes the temp file and is one
    CompressError line naming ``path``.
    """
    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str | bytes, path: Path, hint: str | None = None) -> None:
    """:func:`atomic_save` for text or bytes (status, resolved recipe, reports)."""
    atomic_write(path, lambda fh: fh.write(text if isinstance(text, bytes) else text.encode()), hint)


def atomic_write(path: Path, write: Any, hint: str | None = None) -> None:
    """Call ``write(binary file)`` on a temp file beside ``path``, fsync, rename; on failure remove the
    temp file and raise one CompressError line naming ``path`` with ``hint`` (default WRITE_HINT)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = write_failure(exc)
        if reason is None:
            raise  # not an I/O failure (a bug, or Ctrl-C): keep it as it is
        raise CompressError(f"cannot write {path}: {reason}; {hint or WRITE_HINT}") from None


WRITE_HINT = "nothing was left half-written; free disk space and run again (`compress run --resume RUN_DIR` continues)"


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, if ``exc`` is an I/O failure: the OSError's text (torch.save wraps it in a
    RuntimeError whose own message is an internal assertion); None for anything else."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError):
            return cur.strerror or first_line(cur)
        cur = cur.__cause__ or cur.__context__
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
        return f"the write failed ({first_line(exc)})"
    return None


def _why(exc: BaseException) -> str:
    """What is wrong with a file torch.load refused, in words (never 'use weights_only=False')."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        for line in text.splitlines():
            if "Unsupported global:" in line:
                what = line.split("Unsupported global:", 1)[1].split(" was not", 1)[0].replace("GLOBAL", "").strip()
                return f"it holds a {what} object, and only tensors and plain data are read (never code)"
        if "Unsupported operand" in text:
            return "it is a plain pickle, not a file of tensors written by torch.save; only tensors are read"
        return "it holds objects other than tensors and plain data, which are never read"
    if "PytorchStreamReader" in text or "zip archive" in text or (isinstance(exc, OSError) and exc.errno == EINVAL):
        return "it is truncated or damaged (not a complete torch.save archive)"  # EINVAL: a seek past its end
    if isinstance(exc, OSError):
        return exc.strerror or first_line(exc)
    first = first_line(exc, "")
    if len(first) < 12 or isinstance(exc, (EOFError, KeyError)):  # e.g. "101" from the unpickler on a text file
        return f"not a PyTorch checkpoint file ({type(exc).__name__})"
    return first


def safe_load(path: Path, field: str, *, device: Any = "cpu", mmap: bool = False, hint: str = "") -> Any:
    """``torch.load(weights_only=True)``; a bad file is one CompressError line naming it and why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": two more lines on stderr
            if mmap:  # cheap (tensors mapped, not read); a file it cannot map is read plainly, to say why
                with contextlib.suppress(Exception):
                    return torch.load(path, map_location=device, weights_only=True, mmap=True)
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise CompressError(
            f"{field}: cannot load {path} as a weights-only checkpoint: {_why(exc)}{f'; {hint}' if hint else ''}"
        ) from None


def is_safetensors(path: Path) -> bool:
    """``path`` is (named or shaped like) a safetensors file: an 8-byte header length, then JSON."""
    if Path(path).suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write ``tensors`` (with string ``metadata``) as one safetensors file, atomically (see atomic_write).

    Tensors that share storage (tied weights) are stored as separate copies, which the format requires."""
    from safetensors.torch import save

    seen: set[tuple[int, int]] = set()
    plain: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        where = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        plain[key] = t.clone() if where in seen and t.numel() else t
        seen.add(where)
    atomic_write(path, lambda fh: fh.write(save(plain, metadata=metadata)))


def load_safetensors(path: Path, field: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, on the CPU; a bad file is one CompressError line.
    Reading one runs no code: the format is a JSON header and raw tensor bytes."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    except OSError as exc:
        raise CompressError(f"{field}: cannot read {path}: {exc.strerror or first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: a damaged or foreign file
        raise CompressError(
            f"{field}: cannot load {path} as a safetensors file: it is truncated or damaged ({first_line(exc)})"
        ) from None
    return tensors, metadata


# --------------------------------------------------------------------------- plain data as JSON (safetensors metadata)
_TAGS = ("$tuple", "$tensor", "$dtype", "$dict")


def to_json(value: Any) -> str:
    """``value`` (plain data as a weights-only load returns it: numbers, strings, lists, tuples, dicts,
    tensors, dtypes) as JSON that :func:`from_json` turns back into the same types, tuples included."""
    import json

    return json.dumps(_encode(value), separators=(",", ":"))


def from_json(text: str) -> Any:
    """The inverse of :func:`to_json` (ValueError for text it did not write)."""
    import json

    return _decode(json.loads(text))


def _encode(value: Any) -> Any:
    kind = type(value)
    if kind in (type(None), bool, int, float, str):
        return value
    if kind is list:
        return [_encode(v) for v in value]
    if kind in (tuple, torch.Size):
        return {"$tuple": [_encode(v) for v in value]}
    if kind is dict:
        if not all(type(k) is str for k in value):
            raise TypeError("only dicts with string keys are plain data")
        body = {k: _encode(v) for k, v in value.items()}
        return {"$dict": body} if len(body) == 1 and next(iter(body)).startswith("$") else body
    if kind is torch.dtype:
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Tensor):
        import base64

        from safetensors.torch import save

        return {"$tensor": base64.b64encode(save({"t": value.detach().cpu().contiguous()})).decode()}
    raise TypeError(f"{kind.__name__} is not plain data")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _TAGS:
        tag, body = next(iter(value.items()))
        if tag == "$tuple" and isinstance(body, list):
            return tuple(_decode(v) for v in body)
        if tag == "$dict" and isinstance(body, dict):
            return {k: _decode(v) for k, v in body.items()}
        if tag == "$dtype" and isinstance(getattr(torch, str(body), None), torch.dtype):
            return getattr(torch, body)
        if tag == "$tensor" and isinstance(body, str):
            import base64

            from safetensors.torch import load

            return load(base64.b64decode(body))["t"]
        raise ValueError(f"malformed {tag} value")
    return {k: _decode(v) for k, v in value.items()}
