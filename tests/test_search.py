"""compress search: a budget on a tiny real model, measured; the chosen recipe reproduces the chosen
architecture; reruns resume; bad budgets are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from compress.search import frontier
from compress.search.config import TargetConfig

SEARCH = {
    "candidates": 6,
    "trials": 2,
    "ratios": [0.5],
    "sensitivity_images": 96,
    "probe_images": 64,
    "iters": 10,
    "warmup": 2,
    "depth": 2,
    "runtimes": ["onnxruntime", "openvino"],
    "estimate": {"epochs": 1, "kd": True},
    "finetune": {"epochs": 1, "kd": True},
}


def _recipe(tiny: dict, **target) -> dict:
    raw = {k: v for k, v in tiny.items() if k != "stages"}
    raw["stages"] = [{"kind": "export", "teacher": False}, {"kind": "quantize", "calibration_batches": 2}]
    raw["benchmark"] = {"batch_sizes": [1], "warmup": 1, "iters": 3, "devices": ["cpu"], "torch_snapshots": False}
    raw["target"] = {"batch_size": 1, "threads": 1, **target}
    raw["search"] = dict(SEARCH)
    return raw


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One search with --run on the tiny recipe: a generous latency budget and a size budget (bytes do
    not fluctuate) at half the unpruned student's INT8 file, so the search must prune."""
    from tests.conftest import TINY

    work = tmp_path_factory.mktemp("search")
    raw = _recipe(TINY, latency_ms=50.0, size_bytes=170_000)
    (work / "recipe.yaml").write_text(yaml.safe_dump(raw))
    out = work / "out"
    assert main(["search", str(work / "recipe.yaml"), "--out", str(out), "--run", "--quiet"]) == 0
    return out, raw


def test_chosen_model_meets_the_measured_budget(searched) -> None:
    out, raw = searched
    result = json.loads((out / "search.json").read_text())
    chosen = result["chosen"]
    assert chosen["meets_budget"]
    # measured again on the deployable file (dynamo export, parity-checked), not only by the probe
    assert chosen["confirmed"]["latency_ms"] <= raw["target"]["latency_ms"]
    assert chosen["confirmed"]["size_bytes"] <= raw["target"]["size_bytes"]
    unpruned = [r for r in result["rows"] if r["label"] == "unpruned" and r["precision"] == chosen["precision"]]
    assert unpruned and unpruned[0]["size_bytes"] > raw["target"]["size_bytes"]  # the budget forced a change
    assert chosen["estimated_acc"] is not None
    # every timed candidate is recorded with what the issue asks: architecture, latency, size, MACs, top-1s
    for row in result["rows"]:
        assert {"candidate", "latency_ms", "size_bytes", "macs", "proxy_acc", "estimated_acc"} <= set(row)
    where = {(r["sig"], r["precision"], r["runtime"], r["threads"]) for r in result["rows"]}
    assert len(where) == len(result["rows"])  # one row per architecture x precision x runtime x threads
    assert {r["runtime"] for r in result["rows"]} == {"onnxruntime", "openvino"}
    # INT8 and FP32 of one trained architecture are scored separately (ONNX Runtime, held-out images)
    trial = next(iter(result["trials"].values()))
    assert set(trial["estimated"]) == {"int8", "fp32"}
    assert (out / "pareto.png").stat().st_size > 10_000


def test_best_recipe_reproduces_the_chosen_architecture(searched) -> None:
    out, raw = searched
    result = json.loads((out / "search.json").read_text())
    chosen = result["chosen"]
    best = yaml.safe_load((out / "recipe.best.yaml").read_text())
    kinds = [s["kind"] for s in best["stages"]]
    assert kinds[-2:] == (["export", "quantize"] if chosen["precision"] == "int8" else kinds[-2:])
    assert ("prune_depth" in kinds) == bool(chosen["candidate"]["removed"])
    report = json.loads((out / "run" / "report.json").read_text())
    torch_students = [a for a in report["artifacts"] if a["role"] == "student" and a["format"] == "torch"]
    assert torch_students[-1]["params"] == chosen["params"]  # the run built the architecture the search timed
    assert deployable_macs(report) == chosen["confirmed"]["macs"]
    deployable = _deployable(report)
    assert deployable["precision"] == chosen["precision"]
    assert deployable["size_bytes"] <= raw["target"]["size_bytes"]


def _data(out: Path) -> dict:
    return yaml.safe_load((out.parent / "recipe.yaml").read_text())["data"]


def _deployable(report: dict) -> dict:
    return [a for a in report["artifacts"] if a["role"] == "student" and a["format"] == "onnx"][-1]


def deployable_macs(report: dict) -> int:
    return _deployable(report)["macs"]


def test_rerun_resumes_without_measuring_again(searched, capsys) -> None:
    out, _ = searched
    before = json.loads((out / "search.json").read_text())
    recipe = out.parent / "recipe.yaml"
    assert main(["search", str(recipe), "--out", str(out), "--quiet", "--run"]) == 0
    after = json.loads((out / "search.json").read_text())
    # latencies are noisy: a re-measurement would not reproduce them; cached ones are the same numbers
    assert after["latency"] == before["latency"] and after["trials"] == before["trials"]
    assert "already ran" in capsys.readouterr().err
    assert after["final"]["meets_budget"] and after["final"]["latency_ms"] is not None


def test_a_changed_budget_reuses_every_measurement(searched, capsys) -> None:
    out, _ = searched
    before = json.loads((out / "search.json").read_text())
    recipe = str(out.parent / "recipe.yaml")
    # the budget is not part of the cache key: no candidate is timed or trained again
    assert main(["search", recipe, "--out", str(out), "--quiet", "--budget", "size_bytes=1000000"]) == 0
    after = json.loads((out / "search.json").read_text())
    assert after["latency"] == before["latency"]  # nothing timed again (a re-timing never gives the same numbers)
    assert all(after["trials"][sig] == trial for sig, trial in before["trials"].items())  # nor trained again
    # another thread count: the cached timings at 1 thread stay, the new count is timed, rows are the new count's
    assert main(["search", recipe, "--out", str(out), "--quiet", "--budget", "threads=2"]) == 0
    two = json.loads((out / "search.json").read_text())
    assert {r["threads"] for r in two["rows"]} == {2} and two["chosen"]["threads"] == 2
    for key, timed in before["latency"].items():
        assert {w: v for w, v in two["latency"][key].items() if w.endswith("/1")} == timed
    # as fast as a file: each candidate timed in turn with it, the limit its own measured time. The file is a
    # wide ResNet (resnet32x4, ~30x the student's MACs), so every candidate is clearly faster: the test is not
    # a coin toss between equal architectures on a noisy machine
    import compress
    from compress.models import build_model

    data = compress.load_data(_data(out))
    ref = out.parent / "wide.onnx"
    compress.export_onnx(build_model("resnet32x4", data.num_classes, data.channels), ref, data=data, parity_batch=8)
    budget = ["--budget", "latency_ms=null", "--budget", f"latency_of={ref}", "--budget", "threads=1"]
    assert main(["search", recipe, "--out", str(out), "--quiet", *budget]) == 0
    vs = json.loads((out / "search.json").read_text())
    assert all(r["latency_ms_budget"] > 0 for r in vs["rows"])
    assert vs["chosen"]["confirmed"]["latency_ms"] <= vs["chosen"]["confirmed"]["latency_ms_budget"]
    # an accuracy floor every candidate holds: met, and said so
    assert main(["search", recipe, "--out", str(out), "--quiet", "--budget", "max_accuracy_drop=100"]) == 0
    assert json.loads((out / "search.json").read_text())["chosen"]["meets_accuracy"] is True


def test_budget_errors_are_one_line(tiny, write_recipe, tmp_path, capsys) -> None:
    raw = _recipe(tiny, latency_ms=50.0)
    del raw["target"]
    path = write_recipe(raw)
    cases = [
        ([], "no target: block"),
        (["--budget", "latency=1"], "--budget 'latency=1'"),
        (["--budget", "latency_ms=-1"], "--budget/target: latency_ms: Input should be greater than 0"),
        (["--budget", "latency_ms=0.00001", "--candidates", "2"], "no candidate meets"),
    ]
    for extra, expected in cases:
        code = main(["search", str(path), "--out", str(tmp_path / "o"), "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == 2, err
        assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    other = write_recipe({**raw, "target": {"latency_ms": 40.0}, "data": {**raw["data"], "seed": 1}}, "other.yaml")
    assert main(["search", str(other), "--out", str(tmp_path / "o"), "--quiet"]) == 2  # o: a search on other data
    assert "other models" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"stages": [{"kind": "train", "epochs": 1}, {"kind": "export"}]}, "stages.0 (train): compress search starts"),
        ({"stages": [{"kind": "export"}, {"kind": "quantize", "mode": "fp16"}]}, "stages.1.mode"),
        ({"search": {"method": "taylor"}}, "search.method"),
        ({"search": {"ratios": [0.95]}}, "search.ratios.0"),
        (
            {
                "teacher": None,
                "search": {"estimate": {"epochs": 1}, "finetune": {"epochs": 1}},
                "target": {"latency_ms": 5, "max_accuracy_drop": 1, "accuracy_from": "teacher"},
            },
            "no teacher",
        ),
    ],
)
def test_recipes_the_search_cannot_honour_are_refused_up_front(tiny, write_recipe, tmp_path, capsys, change, expected):
    raw = {**_recipe(tiny, latency_ms=50.0), **change}
    code = main(["search", str(write_recipe(raw)), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "search.json").exists()  # refused before anything was measured


def test_target_block_is_validated_with_the_recipe(tiny, write_recipe, capsys) -> None:
    raw = _recipe(tiny, latency_ms=1.0)
    raw["target"] = {"batch_size": 1}
    assert main(["validate", str(write_recipe(raw))]) == 2
    assert "latency_ms, latency_of, size_bytes, macs, max_accuracy_drop" in capsys.readouterr().err
    raw["target"] = {"latency_ms": 1.0, "runtime": "tensorflow"}
    assert main(["validate", str(write_recipe(raw))]) == 2
    assert "target.runtime" in capsys.readouterr().err


def _row(lat: float, proxy: float, est: float | None = None, size: int = 100) -> dict:
    return {"latency_ms": lat, "size_bytes": size, "macs": 1, "proxy_acc": proxy, "estimated_acc": est}


def test_frontier_selection() -> None:
    rows = [_row(1.0, 0.9), _row(0.5, 0.8), _row(0.6, 0.7), _row(0.2, 0.5), _row(2.0, 0.95)]
    assert [r["latency_ms"] for r in frontier.pareto(rows, "proxy_acc")] == [0.2, 0.5, 1.0, 2.0]
    picks = frontier.to_train(rows, {"latency_ms": 1.0}, None, 2)
    assert [r["latency_ms"] for r in picks] == [1.0, 0.5]  # inside the budget, best proxy first
    trained = [_row(1.0, 0.9, 0.85), _row(0.5, 0.8, 0.87), _row(2.0, 0.95, 0.99)]
    best, _ = frontier.choose(trained, {"latency_ms": 1.0}, None)
    assert best["latency_ms"] == 0.5  # the estimate decides, not the proxy; 2.0 ms is over budget
    fastest, why = frontier.choose(trained, {}, 0.86)
    assert fastest["latency_ms"] == 0.5 and "fastest" in why
    below, why = frontier.choose(trained, {"latency_ms": 1.0}, 0.9)  # the best inside the budget is under it
    assert below["estimated_acc"] == 0.87 and "below the floor" in why
    tie = [_row(0.7, 0.8, 0.87), _row(0.5, 0.8, 0.87)]
    assert frontier.choose(tie, {"latency_ms": 1.0}, None)[0]["latency_ms"] == 0.5  # a tie goes to the faster
    assert TargetConfig(max_accuracy_drop=1.0).budget() == {}


def test_each_pick_is_confirmed_on_its_deployable_file_before_it_is_trained() -> None:
    rows = [_row(0.9, 0.9), _row(0.8, 0.85), _row(0.5, 0.8), _row(0.3, 0.6)]
    deployable = {0.9: 1.1, 0.8: 0.75, 0.5: 0.5, 0.3: 0.3}  # the best proxy's file runs slower than its probe
    asked: list[float] = []

    def confirm(row: dict) -> dict:
        asked.append(row["latency_ms"])
        return {**row, "latency_ms": deployable[row["latency_ms"]]}

    picks, missed = frontier.shortlist(rows, {"latency_ms": 1.0}, None, 2, confirm)
    assert [r["latency_ms"] for r in picks] == [0.8, 0.5]  # the miss handed its place to the next best proxy
    assert [m["latency_ms"] for m in missed] == [0.9] and missed[0]["confirmed"]["latency_ms"] == 1.1
    assert asked == [0.9, 0.8, 0.5]  # each pick measured once, none after the shortlist held
    # against a reference file the limit is the row's own: its paired ratio decides
    paired = [{**_row(0.9, 0.9), "latency_ms_budget": 1.0}, {**_row(0.8, 0.8), "latency_ms_budget": 1.0}]
    slow = lambda r: {**r, "latency_ms_budget": 0.85}  # noqa: E731 - both files at 0.85 of the reference's pace
    picks, missed = frontier.shortlist(paired, {"latency_ms": float("inf")}, None, 2, slow)
    assert [r["latency_ms"] for r in picks] == [0.8] and len(missed) == 1
    # the winner alike: the most accurate trained row whose file misses hands over to the next
    trained = [_row(0.9, 0.9, 0.88), _row(0.8, 0.8, 0.86), _row(0.5, 0.8, 0.80)]
    best = lambda pool: [r] if (r := frontier.choose(pool, {"latency_ms": 1.0}, None)[0]) else []  # noqa: E731
    won, missed = frontier.confirmed(trained, best, confirm, {"latency_ms": 1.0})
    assert [r["estimated_acc"] for r in won] == [0.86] and won[0]["confirmed"]["latency_ms"] == 0.75
    assert [m["estimated_acc"] for m in missed] == [0.88]
    # an accuracy floor alone has no budget to confirm
    assert frontier.shortlist(rows, {}, 0.5, 2, None) == (frontier.to_train(rows, {}, 0.5, 2), [])


def test_a_close_call_against_the_reference_file_is_timed_in_more_pairs(tmp_path) -> None:
    """The reference file is timed in pairs with the candidate, order alternating; the budget reads the
    median paired ratio, and a ratio near 1 is measured further before it is decided on."""
    import numpy as np
    import torch

    import compress
    from compress.commands.search_probe import CLOSE, MAX_PAIRS, Prober, clear
    from compress.models import build_model
    from compress.search.config import SearchConfig
    from compress.stages.export import Export
    from compress.stages.quantize import Quantize
    from tests.conftest import TINY

    torch.manual_seed(0)
    data = compress.load_data(TINY["data"])
    small, wide = tmp_path / "small.onnx", tmp_path / "wide.onnx"
    compress.export_onnx(build_model("resnet20", data.num_classes, data.channels), small, data=data, parity_batch=8)
    compress.export_onnx(build_model("resnet32x4", data.num_classes, data.channels), wide, data=data, parity_batch=8)
    cfg = SearchConfig(iters=10, warmup=2)
    for ref in (small, wide):
        prober = Prober(data, TargetConfig(latency_of=ref), cfg, Export(), Quantize())
        try:
            out = prober.time(small, "onnxruntime", 1, rounds=4, decide=True)
            quick = prober.time(small, "onnxruntime", 1)
        finally:
            prober.close()
        ratios = out["ratios"]
        assert out["latency_ratio"] == pytest.approx(float(np.median(ratios)))
        assert out["latency_ms_budget"] == pytest.approx(out["latency_ms"] / out["latency_ratio"])
        assert len(quick["ratios"]) == 2  # a probe: two pairs, no sequential decision
        # four pairs at least; fewer than the most only when every pair agreed by a margin
        assert 4 <= len(ratios) <= MAX_PAIRS
        assert len(ratios) == MAX_PAIRS or clear(ratios)
        assert clear(ratios) == (max(ratios) < 1 - CLOSE or min(ratios) > 1 + CLOSE)
        assert not clear(ratios[:-1]) or len(ratios) == 4  # it stopped at the first pair that made it clear
        assert frontier.fits(out, {"latency_ms": float("inf")}) == (out["latency_ratio"] <= 1)
    assert max(ratios) < 0.5 and len(ratios) == 4  # ~30x the MACs: clear at once, no extra pairs


WRONG_TEST = """
import torch
from torch.utils.data import TensorDataset

from compress.data.digits import Digits


def load():
    d = Digits().load()
    wrong = (d.test_y + 1) % 10  # every test label is wrong: a choice scored on them would pick blind
    return TensorDataset(d.train_x, d.train_y), TensorDataset(d.test_x, wrong), d.class_names
"""


def test_choices_are_scored_on_held_out_training_images_never_on_the_test_split(digits_run, tmp_path, monkeypatch):
    """A trained digits student whose test labels are all wrong: every proxy, trial and estimate the
    search chooses by still reads high (they never see the test split), the reported test top-1 is
    near zero."""
    from compress.data.digits import Digits

    run, _, _ = digits_run
    (tmp_path / "wrong_test.py").write_text(WRONG_TEST)
    monkeypatch.chdir(tmp_path)
    d = Digits().load()
    raw = {
        "name": "heldout",
        "seed": 0,
        "device": "cpu",
        "data": {"name": "wrong_test:load", "mean": list(d.mean), "std": list(d.std), "stream": False},
        "teacher": {"model": "digits_teacher", "checkpoint": str(run / "checkpoints" / "01-train" / "teacher.pt")},
        "student": {"model": "digits_student", "checkpoint": str(run / "checkpoints" / "02-distill" / "student.pt")},
        "stages": [{"kind": "export", "teacher": False}, {"kind": "quantize", "calibration_batches": 2}],
        "target": {"latency_ms": 1000.0, "batch_size": 1, "threads": 1, "max_accuracy_drop": 50.0},
        "search": {**SEARCH, "candidates": 3, "trials": 1, "runtimes": ["onnxruntime"], "iters": 5, "warmup": 1},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["search", "recipe.yaml", "--out", "out", "--quiet"]) == 0
    result = json.loads((tmp_path / "out" / "search.json").read_text())
    held = len(d.train_y) // 5  # the default 5,000 capped at a fifth of the 1,437 training images
    assert result["selection"] == f"{held:,} held-out training images"
    base = result["base"]
    assert base["student_acc"] < 0.1 < 0.8 < base["select_student_acc"]  # the test split is reported, wrong labels
    assert result["sensitivity"]["base_acc"] > 0.8  # the sweep's reference, on the held-out images too
    unpruned = [r for r in result["rows"] if r["label"] == "unpruned"]
    assert unpruned and all(r["proxy_acc"] > 0.8 for r in unpruned)
    assert result["trials"] and all(t["select_acc"] > 0.8 for t in result["trials"].values())
    assert all(min(t["estimated"].values()) > 0.8 for t in result["trials"].values())
    assert result["chosen"]["estimated_acc"] > 0.8
    # the floor's reference is the unpruned student given the same short fine-tune (a control trial): the
    # student trained on the held-out images, a fine-tune on the others partly forgets them
    control = result["trials"][unpruned[0]["sig"]]["select_acc"]
    assert result["floor"]["student"] == control
    assert result["floor"]["forgotten"] == pytest.approx(base["select_student_acc"] - control)
    assert result["floor"]["floor"] == pytest.approx(control - 0.5)
