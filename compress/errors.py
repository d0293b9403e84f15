"""One exception type per audience.

``CompressError`` is a *user* error (bad recipe, missing file, mismatched checkpoint): the CLI
prints its message on one line and exits 2. ``StageFailed`` is a pipeline that ran but produced
something we refuse to ship (e.g. ONNX parity broken): one line, exit 1. Anything else is a bug
and keeps its traceback.
"""


class CompressError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""


class StageFailed(Exception):
    """A stage ran but its result failed a correctness check; exit code 1."""
