"""What the benchmark scripts share: the command line a result came from, where results are
written, and round-robin ONNX Runtime latency. Scripts run as ``python benchmarks/<name>.py`` from the
project root, so this module imports as ``common``."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def command() -> str:
    """The command that produced a result, as typed from the project root."""
    return shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def stamp(started: dt.datetime, threads: int) -> dict[str, Any]:
    """The head of a result: the command, when it started, and the machine at ``threads`` threads."""
    from compress.env import environment

    return {"command": command(), "date": started.isoformat(timespec="seconds"), "environment": environment(threads)}


def machine(env: dict[str, Any]) -> str:
    """The CPU and the instruction sets that decide INT8 exactness and bf16 speed, for a result's header."""
    return f"{env['cpu']} [{env.get('isa', 'ISA not recorded')}]"


def isa_kind(env: dict[str, Any]) -> str:
    """The class of CPU a result holds for, for its file name: the x86 extension that decides INT8
    exactness and bf16 speed (amx_int8 > avx512_bf16 > avx512_vnni > avx_vnni > avx2), or the arch."""
    arch, *flags = env["isa"].split()
    return next((f for f in ("amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx2") if f in flags), arch)


def random_input(inp: Any, batch: int, rng: Any) -> Any:
    """Random pixels for an ORT session input (its ``get_inputs()`` entry) at ``batch``, in its dtype."""
    import numpy as np

    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    return rng.integers(0, 255, size=[batch, *shape[1:]]).astype(np.uint8 if "uint8" in inp.type else np.float32)


def save(stem: str, result: dict[str, Any], markdown: str) -> None:
    """benchmarks/results/<stem>.json (``result``) and <stem>.md (``markdown``), written together at the end."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown)


def side_by_side(
    paths: dict[str, Path],
    threads: int,
    rounds: int = 5,
    configs: tuple[tuple[int, int, int, str], ...] | None = None,
    plain: frozenset[str] = frozenset(),
) -> dict[str, dict[str, float]]:
    """p50 latency of each ONNX file at batch 1 (``threads`` and 1 thread) and batch 32 (or at each
    ``(batch, threads, iters, key)`` of ``configs``; the names in ``plain`` in a plain ORT session,
    without the precision mode a file that saturates on this CPU otherwise gets), measured
    round-robin in one process (every round times every file), so drift on a shared machine hits all
    rows alike. Each turn opens a fresh session at ONNX Runtime's defaults (worker threads spin) and
    closes it before the next file's turn: no idle pool steals the timed one's cores, and no file
    is timed with its threads handicapped (turning spinning off made 2-thread FP32 at batch 1 as
    slow as 1 thread, flattering INT8)."""
    import numpy as np

    from compress.bench.measure import time_ort
    from compress.onnx_utils import session

    rng = np.random.default_rng(0)
    configs = configs or (
        (1, threads, 40, "p50_ms_bs1"),
        (1, 1, 40, "p50_ms_bs1_1thread"),
        (32, threads, 8, "p50_ms_bs32"),
    )
    batches = sorted({c[0] for c in configs})
    samples: dict[str, dict[str, list[float]]] = {n: {c[3]: [] for c in configs} for n in paths}
    feeds = {}
    for n, p in paths.items():
        inp = session(p).get_inputs()[0]
        for bs in batches:
            feeds[n, bs] = random_input(inp, bs, rng)
    for _ in range(rounds):
        for n, p in paths.items():
            for bs, t, iters, key in configs:
                timed = time_ort(p, feeds[n, bs], "cpu", t, 5, iters, n not in plain)  # own session, closed after
                assert not isinstance(timed, str)  # only CUDA/TensorRT can fall back
                samples[n][key] += timed[0]
    return {n: {k: float(np.median(v)) for k, v in d.items()} for n, d in samples.items()}
