"""A memory budget for torch-pruning's tracing, so a model it cannot trace is refused, not the machine.

torch-pruning follows every reshape, view and slice of a traced graph by chaining index mappings;
on some architectures (MaxViT's grid/block partitions, Swin before its customized layers) those
chains multiply one channel into millions of indices and the process grows past 20 GB. A run must
never eat the machine: while torch-pruning works, the process's address space is capped
(``RLIMIT_AS``) at what it uses now plus a budget, so the runaway allocation fails fast with a
MemoryError that the prune stage turns into one line. The budget is a quarter of the machine's RAM
(at least 2 GiB, at most what is available), or ``COMPRESS_PRUNE_MEMORY_GB``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

GIB = 2**30


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _vm_size() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def budget_bytes() -> int:
    """How much more memory torch-pruning may take: ``COMPRESS_PRUNE_MEMORY_GB``, else a quarter of
    RAM, at least 2 GiB, at most what is available now."""
    given = os.environ.get("COMPRESS_PRUNE_MEMORY_GB")
    if given:
        return int(float(given) * GIB)
    total, available = _meminfo("MemTotal"), _meminfo("MemAvailable")
    if total is None:
        return 8 * GIB
    budget = max(2 * GIB, total // 4)
    return min(budget, available) if available else budget


@contextmanager
def capped() -> Iterator[int | None]:
    """Cap the address space at its current size plus :func:`budget_bytes` for the block; yields the
    budget in bytes (None where the cap cannot be set: not Linux, or a lower limit already holds)."""
    try:
        import resource
    except ImportError:  # not POSIX
        yield None
        return
    vm = _vm_size()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    budget = budget_bytes()
    limit = None if vm is None else vm + budget
    if hard != resource.RLIM_INFINITY and limit is not None:
        limit = min(limit, hard)
    if limit is None or (soft != resource.RLIM_INFINITY and soft <= limit):
        yield None
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield budget
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


#: how an allocation refused under the cap surfaces besides MemoryError: torch's CPU allocator, C++'s
#: new, and oneDNN (which cannot create a convolution primitive without its scratch memory)
_REFUSED = ("can't allocate memory", "std::bad_alloc", "could not create a primitive")


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation (under the cap: the budget ran out)."""
    return isinstance(exc, MemoryError) or any(text in str(exc) for text in _REFUSED)
