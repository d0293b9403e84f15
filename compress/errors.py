"""One exception type per audience.

``CompressError`` is a *user* error (bad recipe, missing file, mismatched checkpoint): the CLI
prints its message on one line and exits 2. ``StageFailed`` is a pipeline that ran but produced
something we refuse to ship (e.g. ONNX parity broken): one line, exit 1. Anything else is a bug
and keeps its traceback.
"""


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (library errors are long), or ``default`` / its type."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if default is None else default


class CompressError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""


class StageFailed(Exception):
    """A stage ran but its result failed a correctness check; exit code 1."""


OOM_TEXT = ("can't allocate memory", "out of memory", "Failed to allocate memory")


def out_of_memory(exc: BaseException) -> str | None:
    """If ``exc`` is an allocation failure (torch CPU/CUDA, numpy, onnxruntime), a short description; else None."""
    import re

    text = str(exc)
    if not (isinstance(exc, MemoryError) or (isinstance(exc, Exception) and any(t in text for t in OOM_TEXT))):
        return None
    m = re.search(r"allocate (\d+) bytes|buffer of size (\d+)", text)
    if m is None:
        return "out of memory"
    return f"out of memory (tried to allocate {int(m.group(1) or m.group(2)) / 2**30:.2f} GiB)"
