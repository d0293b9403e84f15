"""Resume after `kill -9`: a resumed run reaches the same report as one that was never interrupted."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml

from compress.cli import main
from compress.pipeline import run
from compress.recipe import dump_recipe, validate_recipe
from tests.conftest import digits_recipe

RECIPE = digits_recipe("resume", 2, 24, 2)
ROOT = Path(__file__).resolve().parent.parent


def _stable(report: dict) -> dict:
    """Everything in a report that does not depend on the clock."""
    arts = {
        a["name"]: {k: a[k] for k in ("accuracy", "top5", "params", "nonzero_params", "macs", "size_bytes")}
        for a in report["artifacts"]
    }
    stages = [
        {k: v for k, v in s["metrics"].items() if k not in ("seconds", "speed")} | {"kind": s["kind"]}
        for s in report["stages"]
    ]
    for st in stages:
        for hist in st.get("history", []):
            hist.pop("seconds", None)
    return {"artifacts": arts, "stages": stages}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(validate_recipe(RECIPE), out, quiet=True)
    return out, json.loads((out / "report.json").read_text())


def start_run(recipe_file: Path, out: Path, plugins: Sequence[str] = ()) -> subprocess.Popen:
    """``compress run`` in a child process (after importing ``plugins``, e.g. a test-only stage)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = f"import sys; {''.join(f'import {p}; ' for p in plugins)}from compress.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, "run", str(recipe_file), "--out", str(out), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for(proc: subprocess.Popen, log: Path, needle: str) -> None:
    # No tight deadline: on a loaded 2-core machine the needle can take minutes (a fixed 120 s made
    # this flaky); the child ends by itself if the needle never comes, the 15 min cap is a safety net.
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and needle in log.read_text():
            return
        time.sleep(0.02)
    why = "the run ended" if proc.poll() is not None else "15 minutes passed"
    raise AssertionError(f"{why} before {needle!r} appeared; cannot test the kill")


def kill_during(recipe_file: Path, out: Path, needle: str, plugins: Sequence[str] = ()) -> None:
    """Start a real run in a child process and SIGKILL it as soon as train.log shows ``needle``."""
    proc = start_run(recipe_file, out, plugins)
    try:
        _wait_for(proc, out / "train.log", needle)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("needle", ["epoch 5/24", "prune fine-tune", "measured teacher"])
def test_killed_run_resumes_to_the_same_report(needle, reference, tmp_path):
    ref_dir, ref_report = reference
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    out = tmp_path / "run"
    kill_during(recipe_file, out, needle)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "running" and not (out / "report.json").exists()  # visibly incomplete
    assert (out / "resume").is_dir()
    assert main(["run", str(recipe_file), "--out", str(out), "--quiet"]) == 2  # not silently restarted
    assert main(["run", str(recipe_file), "--resume", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert _stable(report) == _stable(ref_report)
    assert (out / "model.onnx").read_bytes() == (ref_dir / "model.onnx").read_bytes()
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    assert not (out / "resume").exists()
    assert "resumed after" in (out / "train.log").read_text()


def test_resume_refuses_a_different_recipe_a_finished_run_and_a_stranger(reference, tmp_path, capsys):
    ref_dir, _ = reference
    changed = json.loads(json.dumps(RECIPE))
    changed["stages"][1]["epochs"] = 5
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(changed, sort_keys=False))
    half = tmp_path / "half"
    half.mkdir()
    (half / "recipe.resolved.yaml").write_text((ref_dir / "recipe.resolved.yaml").read_text())
    (half / "status.json").write_text('{"state": "running"}')
    cases = [
        (half, "stages.1.epochs: 24 -> 5"),
        (ref_dir, "already finished"),
        (tmp_path / "nowhere", "not a compress run directory"),
    ]
    for target, needle in cases:
        assert main(["run", str(recipe_file), "--resume", str(target), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert sorted(p.name for p in half.iterdir()) == ["recipe.resolved.yaml", "status.json"]  # untouched


def test_same_recipe_and_seed_give_identical_metrics_and_onnx_bytes(reference, tmp_path):
    """Determinism on CPU: a second fresh run reproduces every metric and every ONNX byte."""
    ref_dir, ref_report = reference
    again = tmp_path / "again"
    run(validate_recipe(RECIPE), again, quiet=True)
    assert _stable(json.loads((again / "report.json").read_text())) == _stable(ref_report)
    for name in ("model.onnx", "model.int8.onnx", "teacher.onnx"):
        assert (again / name).read_bytes() == (ref_dir / name).read_bytes(), name
    assert ref_report["recipe"]["seed"] == 0 and ref_report["environment"]["torch"]


def test_resume_refuses_a_run_that_is_still_going(tmp_path, capsys):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    out = tmp_path / "run"
    proc = start_run(recipe_file, out)
    try:
        _wait_for(proc, out / "train.log", "epoch 3/24")
        assert main(["run", str(recipe_file), "--resume", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"still being written by process {proc.pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


# --------------------------------------------------------------------------- one line, never a traceback
def _interrupted(tmp_path: Path, recipe: dict) -> tuple[Path, Path]:
    """(recipe file, run dir) of a run that stopped before its first stage finished, as kill -9 leaves it."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "run"
    (out / "resume").mkdir(parents=True)
    (out / "recipe.resolved.yaml").write_text(dump_recipe(validate_recipe(recipe)))
    (out / "status.json").write_text(json.dumps({"state": "running", "stage": 1}))
    return recipe_file, out


class _NotATensor:
    pass


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("01-1.pt", "pickle", "plain pickle"),
        ("01-1.pt", "object", "tests.test_resume._NotATensor object"),
        ("01-1.pt", "truncated", "truncated or damaged"),
        ("progress.pt", "pickle", "start the run over with --overwrite"),
        ("progress.pt", "wrong dict", "is damaged (KeyError"),
    ],
)
def test_a_bad_resume_file_is_one_line_naming_it(name, content, needle, tmp_path, capsys):
    recipe_file, out = _interrupted(tmp_path, RECIPE)
    bad = out / "resume" / name
    if content == "pickle":  # what `compress run --resume` used to answer with a 25-line UnpicklingError
        bad.write_bytes(pickle.dumps({"epoch": 1, "model": {"w": _NotATensor()}}))
    elif content == "object":
        torch.save({"epoch": 1, "model": _NotATensor()}, bad)
    elif content == "truncated":
        torch.save({"epoch": 1, "model": {"w": torch.zeros(10_000)}}, bad)
        bad.write_bytes(bad.read_bytes()[:5000])
    else:
        torch.save({"completed": 1}, bad)
    before = sorted(p.name for p in (out / "resume").iterdir())
    assert main(["run", str(recipe_file), "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(bad) in lines[0] and needle in lines[0], lines[0]
    assert "weights_only=False" not in err and "arbitrary code" not in err
    assert sorted(p.name for p in (out / "resume").iterdir()) == before  # nothing touched


_LIMITED = """
import json, resource, signal, sys
from pathlib import Path
from compress.cli import main
limit, out = int(sys.argv[1]), Path(sys.argv[2])
if limit:  # no file may grow beyond this: writes fail with EFBIG as they fail with ENOSPC on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
code = main(sys.argv[3:])
print(json.dumps(sorted(str(p.relative_to(out)) for p in out.rglob("*"))))
sys.exit(code)
"""


def _small_recipe() -> dict:
    """Student only, one epoch: its first epoch file (~200 kB) is the run's first big write."""
    raw = digits_recipe("full", 1, 1)
    raw.pop("teacher")
    raw["stages"] = [{**raw["stages"][0], "target": "student", "epochs": 1}, {"kind": "export"}]
    return raw


def _tmpfs_prefix(mountpoint: Path) -> list[str] | None:
    """A command prefix that runs the rest with a 64 KiB tmpfs on ``mountpoint`` (a real full disk),
    in a private user+mount namespace (no root needed), or None where the system does not allow it."""
    base = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    mount = 'mount -t tmpfs -o size=64k tmpfs "$1"'
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run([*base, mount, "sh", str(mountpoint)], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return None
    return [*base, f'{mount} && shift && exec "$@"', "sh", str(mountpoint)]


@pytest.mark.parametrize("disk", ["file size limit", "tmpfs"])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(disk, tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_small_recipe(), sort_keys=False))
    disk_dir = tmp_path / "disk"
    disk_dir.mkdir()
    out = disk_dir / "run"
    prefix, limit, reason = [], 64_000, "File too large"
    if disk == "tmpfs":
        prefix, limit, reason = _tmpfs_prefix(disk_dir), 0, "No space left on device"
        if prefix is None:
            pytest.skip("no unprivileged user/mount namespaces here (unshare) for a tiny tmpfs")
    argv = ["run", str(recipe_file), "--out", str(out), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", _LIMITED, str(limit), str(out), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("compress: error: cannot write ") and reason in lines[0], lines[0]
    assert str(out / "resume" / "01-1.pt") in lines[0] and "--resume" in lines[0], lines[0]
    left = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [f for f in left if ".tmp" in f], left  # the failed write removed its temp file
    assert "model.onnx" not in left and "status.json" in left
