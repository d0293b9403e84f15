"""The prune and sparsify stages: budgets, per-layer overrides, rounding, iterative schedules,
Taylor gradients, unstructured masks through training and AGP — on real models and data."""

from __future__ import annotations

import json

import pytest
import torch

from compress.checkpoint import load_weights, read_checkpoint
from compress.data.synthetic import Synthetic
from compress.errors import CompressError
from compress.models import build_model
from compress.pipeline import run
from compress.pruning import unstructured as U
from compress.pruning.structured import StructuredOptions, accumulate_gradients, count, prune_step, search_ratio
from compress.recipe import validate_recipe
from compress.stages.prune import step_share


def _run(tiny, tmp_path, *stages):
    tiny["teacher"] = None
    tiny["stages"] = list(stages)
    tiny["benchmark"].update(torch_snapshots=False, iters=1, warmup=0, batch_sizes=[1])
    out = run(validate_recipe(tiny), tmp_path / "run", quiet=True)
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("target", ["target_macs", "target_params"])
def test_prune_meets_a_macs_or_params_budget(target, tiny, tmp_path):
    _, report = _run(tiny, tmp_path, {"kind": "prune", target: 0.4})
    m = report["stages"][0]["metrics"]
    kept = m["macs_kept"] if target == "target_macs" else m["params_kept"]
    assert 0.36 <= kept <= 0.4, kept  # at most the budget, and not far below it


def test_search_ratio_is_the_smallest_that_fits():
    model = build_model("resnet20", 10, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    macs0, _ = count(model, x)
    opts = StructuredOptions()
    ratio, got = search_ratio(model, x, opts, int(0.5 * macs0), "macs", 10)
    assert got <= 0.5 * macs0 and count(model, x)[0] == macs0  # the model itself untouched
    slightly_less = StructuredOptions()
    twin = build_model("resnet20", 10, 3).eval()
    twin.load_state_dict(model.state_dict())
    prune_step(twin, x, slightly_less, ratio - 0.02, 10)
    assert count(twin, x)[0] > 0.5 * macs0  # a visibly smaller ratio misses the budget


def test_search_with_round_to_finds_a_ratio_below_max_ratio():
    # with round_to 8, ratio 0.9 leaves ResNet-20 whole (each width would round to 0, so no layer
    # is pruned): the search must not take max_ratio as its feasible end
    model = build_model("resnet20", 10, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    macs0, _ = count(model, x)
    opts = StructuredOptions(round_to=8)
    twin = build_model("resnet20", 10, 3).eval()
    prune_step(twin, x, opts, 0.9, 10)
    assert count(twin, x)[0] == macs0  # the trap
    ratio, got = search_ratio(model, x, opts, int(0.5 * macs0), "macs", 10)
    assert got <= 0.5 * macs0 and ratio < 0.9


def test_overrides_round_to_and_ignore(tiny, tmp_path):
    stage = {
        "kind": "prune",
        "ratio": 0.5,
        "round_to": 4,
        "ratios": {"layer3.*": 0.25},
        "ignore": ["layer1.0.conv1"],
    }
    out, _ = _run(tiny, tmp_path, stage)
    model = build_model("resnet20", 10, 3)
    state, pruned = read_checkpoint(out / "checkpoints" / "01-prune" / "student.pt", "student", "t")
    load_weights(model, state, pruned=pruned, field="t")
    assert model.layer1[0].conv1.out_channels == 16  # ignored
    assert model.layer1[1].conv1.out_channels == 8  # 16 * (1 - 0.5)
    assert model.layer3[1].conv1.out_channels == 48  # 64 * (1 - 0.25)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.out_channels % 4 == 0 for c in convs)


def test_iterative_steps_with_finetune_reach_the_one_shot_size(tiny, tmp_path):
    _, one = _run(tiny, tmp_path / "a", {"kind": "prune", "ratio": 0.5})
    _, it = _run(tiny, tmp_path / "b", {"kind": "prune", "ratio": 0.5, "steps": 3, "finetune": {"epochs": 1}})
    m1, m3 = one["stages"][0]["metrics"], it["stages"][0]["metrics"]
    assert [r["step"] for r in m3["steps"]] == [1, 2, 3]
    params = [r["params"] for r in m3["steps"]]
    assert params[0] > params[1] > params[2]
    assert abs(m3["params_after"] - m1["params_after"]) <= 0.03 * m1["params_after"]
    assert all("test_acc_finetuned" in r for r in m3["steps"]) and len(m3["history"]) == 1


def test_step_share_is_linear_in_removed_channels():
    kept = 1.0
    for step in (1, 2, 3, 4):
        kept *= 1 - step_share(0.6, step, 4)
        assert kept == pytest.approx(1 - 0.6 * step / 4)


def test_taylor_uses_gradients_and_leaves_none_behind(tiny, tmp_path):
    kept = {}
    for method in ("taylor", "l1"):
        out, _ = _run(tiny, tmp_path / method, {"kind": "prune", "method": method, "ratio": 0.5, "taylor_batches": 2})
        state, _ = read_checkpoint(out / "checkpoints" / "01-prune" / "student.pt", "student", "t")
        kept[method] = state["conv1.weight"]  # the stem conv's surviving filters
    # same count, different choice: Taylor ranked by gradients, not by weight magnitude
    assert kept["taylor"].shape == kept["l1"].shape and not torch.equal(kept["taylor"], kept["l1"])
    model = build_model("resnet20", 10, 3).eval()
    data = Synthetic(image_size=16, train_size=64, test_size=32).load()
    accumulate_gradients(model, data.train_loader(seed=0, augment=False), torch.device("cpu"), 2)
    assert all(p.grad is not None for p in model.parameters())
    prune_step(model, data.example_input(2), StructuredOptions(method="taylor"), 0.5, 10)
    model.zero_grad(set_to_none=True)  # what the stage does after each step
    assert all(p.grad is None for p in model.parameters())


def test_target_in_steps_meets_each_steps_budget(tiny, tmp_path):
    _, report = _run(tiny, tmp_path, {"kind": "prune", "target_macs": 0.4, "steps": 2, "finetune": {"epochs": 1}})
    m = report["stages"][0]["metrics"]
    first, second = (r["macs"] / m["macs_before"] for r in m["steps"])
    assert 0.66 <= first <= 0.7 and 0.36 <= second <= 0.4  # linear in MACs: 70% then 40%


def test_conflicting_overrides_in_one_coupled_group(tiny, tmp_path):
    # layer1.0.conv2 and layer1.2.conv2 both write the residual stream of layer1: one group.
    tiny["teacher"] = None
    tiny["stages"] = [{"kind": "prune", "ratios": {"layer1.0.conv2": 0.2, "layer1.2.conv2": 0.6}}]
    with pytest.raises(CompressError, match=r"stages\.0\.ratios: layers of one coupled group .* get different ratios"):
        run(validate_recipe(tiny), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_ratio_above_max_ratio_is_refused():
    with pytest.raises(Exception, match=r"ratio 0.95 \(ratio\) exceeds max_ratio 0.9"):
        validate_recipe({"name": "x", "data": {"name": "synthetic"}, "student": {"model": "resnet20"},
                         "stages": [{"kind": "prune", "ratio": 0.95}]})  # fmt: skip


def test_pattern_typos_are_recipe_errors(tiny, tmp_path):
    tiny["teacher"] = None
    tiny["stages"] = [{"kind": "prune", "ratios": {"layer9.*": 0.3}}]
    with pytest.raises(CompressError, match=r"stages\.0\.ratios: pattern 'layer9\.\*' matches no module"):
        run(validate_recipe(tiny), tmp_path / "run", quiet=True)


def test_two_targets_are_rejected():
    with pytest.raises(Exception, match="give one of ratio, target_macs, target_params"):
        validate_recipe({"name": "x", "data": {"name": "synthetic"}, "student": {"model": "resnet20"},
                         "stages": [{"kind": "prune", "ratio": 0.3, "target_macs": 0.5}]})  # fmt: skip


# --- unstructured ---------------------------------------------------------------------------


def test_agp_formula():
    # Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n Δt))^3
    assert U.agp(0.0, 0.8, 0.0, 1.0, 5.0) == 0.0
    assert U.agp(3.0, 0.8, 0.0, 1.0, 5.0) == pytest.approx(0.8 + (0.0 - 0.8) * (1 - 2 / 4) ** 3)
    assert U.agp(9.0, 0.8, 0.0, 1.0, 5.0) == 0.8


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_oneshot_sparsity_is_exact_and_masks_become_permanent(scope):
    model = build_model("resnet20", 10, 3)
    layers = U.prunable(model, ignore=[])
    U.sparsify_to(layers, 0.4, scope)
    first = {n: m.weight_mask.clone() for n, m in layers}
    U.sparsify_to(layers, 0.7, scope)  # grows: every weight removed at 40% stays removed
    assert all(bool((m.weight_mask[first[n] == 0] == 0).all()) for n, m in layers)
    U.sparsify_to(layers, 0.7, scope)  # idempotent at the target
    U.finish(layers)
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    assert U.overall_sparsity(layers) == pytest.approx(0.7, abs=1e-3)
    per_layer = U.layer_sparsity(layers).values()
    if scope == "layer":
        assert all(s == pytest.approx(0.7, abs=0.01) for s in per_layer)
    else:  # global ranking: layers differ
        assert max(per_layer) - min(per_layer) > 0.05


def test_agp_finetune_keeps_masks_and_shrinks_the_compressed_file(tiny, tmp_path):
    stage = {
        "kind": "sparsify",
        "sparsity": 0.8,
        "sparsity_schedule": "agp",
        "finetune": {"epochs": 2},
        "update_every": 0.5,
    }
    out, report = _run(tiny, tmp_path, stage, {"kind": "export"})
    m = report["stages"][0]["metrics"]
    assert m["sparsity"] == pytest.approx(0.8, abs=2e-3)  # reached, and training did not refill the zeros
    assert m["state_dict_gzip_bytes"]["after"] < 0.6 * m["state_dict_gzip_bytes"]["before"]
    assert len(m["history"]) == 2
    arts = {a["name"]: a for a in report["artifacts"]}
    dense = sum(p.numel() for p in build_model("resnet20", 10, 3).parameters())
    assert arts["student@sparsify"]["params"] == dense  # same shapes: same MACs, no faster
    assert arts["student@sparsify"]["nonzero_params"] < 0.25 * dense
    model = build_model("resnet20", 10, 3)
    state, _ = read_checkpoint(out / "checkpoints" / "01-sparsify" / "student.pt", "student", "t")
    load_weights(model, state, pruned=False, field="t")
    assert U.overall_sparsity(U.prunable(model, [])) == pytest.approx(0.8, abs=2e-3)


def test_agp_needs_finetuning():
    with pytest.raises(Exception, match="add finetune: {epochs: N}"):
        validate_recipe({"name": "x", "data": {"name": "synthetic"}, "student": {"model": "resnet20"},
                         "stages": [{"kind": "sparsify", "sparsity_schedule": "agp"}]})  # fmt: skip


def test_vit_loses_whole_heads_to_a_macs_target_in_steps(tiny, tmp_path):
    tiny["data"]["image_size"] = 32
    tiny["student"] = {"model": "tests.test_prune_zoo:tiny_vit"}
    stage = {"kind": "prune", "target_macs": 0.6, "head_ratio": 0.5, "steps": 2, "finetune": {"epochs": 1}}
    out, report = _run(tiny, tmp_path, stage, {"kind": "export"})
    m = report["stages"][0]["metrics"]
    assert (m["heads_before"], [r["heads"] for r in m["steps"]], m["heads_after"]) == (8, [6, 4], 4)
    assert 0.55 <= m["macs_kept"] <= 0.6 and 0.75 <= m["steps"][0]["macs"] / m["macs_before"] <= 0.8
    # the checkpoint rebuilds the separable-head attention; the exported ONNX agrees with it
    from tests.test_prune_zoo import tiny_vit

    model = tiny_vit(10)
    state, pruned = read_checkpoint(out / "checkpoints" / "01-prune" / "student.pt", "student", "t")
    load_weights(model, state, pruned=pruned, field="t")
    assert [layer.self_attention.num_heads for layer in model.encoder.layers] == [2, 2]
    assert report["stages"][1]["metrics"]["student"]["max_abs_diff"] < 1e-3


def test_recalibrate_bn_measures_the_pruned_networks_statistics(tiny, tmp_path):
    """After pruning, each BatchNorm's running mean/var are re-measured: for the first BN (fed by the
    input conv alone) they equal the average of its per-batch statistics over the batches seen."""
    from compress.checkpoint import load_model

    stages = ({"kind": "train", "epochs": 1}, {"kind": "prune", "ratio": 0.5}, {"kind": "recalibrate_bn", "batches": 3})
    out, report = _run(tiny, tmp_path, *stages)
    metrics = report["stages"][2]["metrics"]
    assert metrics["batches"] == 3 and metrics["layers"] > 10
    (ckpt,) = (out / "checkpoints").glob("*-recalibrate_bn/student.pt")
    model = load_model(ckpt, "student").eval()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    means, variances = [], []

    def record(module, inputs):  # returns None: the input passes unchanged
        means.append(inputs[0].mean((0, 2, 3)))
        variances.append(inputs[0].var((0, 2, 3)))

    hook = bn.register_forward_pre_hook(record)
    data = validate_recipe(tiny).data.load()
    with torch.no_grad():
        for i, (x, _) in enumerate(data.train_loader(seed=tiny["seed"], augment=False)):
            if i == 3:
                break
            model(x)
    hook.remove()
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack(variances).mean(0), rtol=1e-4, atol=1e-5)
