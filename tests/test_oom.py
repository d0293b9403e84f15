"""Running out of memory is one line naming the setting to lower, not a traceback (real allocations).

Each case runs a real pipeline in a child process whose address space is capped (RLIMIT_AS) a
little above what it has mapped after importing torch, so a too-large batch really fails to
allocate, in torch's training loop or in onnxruntime's calibration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")

CHILD = r"""
import resource, sys
import torch  # noqa: F401 - map torch first; the cap is on top of it
from compress.cli import main

vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 1500 * 2**20, resource.RLIM_INFINITY))
sys.exit(main(["run", sys.argv[1], "--out", sys.argv[2], "--quiet"]))
"""

BASE = {
    "name": "oom",
    "device": "cpu",
    "student": {"model": "resnet20"},
    "benchmark": {"batch_sizes": [1], "iters": 1, "warmup": 0, "devices": ["cpu"]},
}
CASES = {
    "training batch": (
        {"data": {"name": "synthetic", "image_size": 64, "train_size": 4096, "test_size": 64, "batch_size": 4096},
         "stages": [{"kind": "train", "epochs": 1, "optim": {"lr": 0.05, "precision": "fp32"}}]},
        "stages.0 (train): out of memory (tried to allocate",
        "lower data.batch_size",
    ),
    "calibration batch": (
        {"data": {"name": "synthetic", "image_size": 96, "train_size": 256, "test_size": 32, "batch_size": 32},
         "stages": [{"kind": "train", "epochs": 1, "optim": {"lr": 0.05, "precision": "fp32"}}, {"kind": "export"},
                    {"kind": "quantize", "calibration_batches": 1, "calibration_batch_size": 4096}]},
        "stages.2 (quantize): out of memory (tried to allocate",
        "lower stages.2.calibration_batch_size (now 4096)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_out_of_memory_names_the_setting_to_lower(case, tmp_path):
    extra, *needles = CASES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(BASE | extra, sort_keys=False))
    out = tmp_path / "run"
    root = Path(__file__).resolve().parent.parent
    # glibc reserves 64 MB of address space per extra malloc arena, and opens more of them when its
    # threads contend (a busy machine); pin the count so the cap means the same thing under load.
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(recipe), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
