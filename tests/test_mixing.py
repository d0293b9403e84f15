"""Mixup/CutMix (compress.data.mixing): the batch law on real tensors, then real digits training and
distillation through the one training loop, and the refusals that keep cached or hard-label losses honest."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from compress.context import Context
from compress.data import DATASETS
from compress.data.digits import Digits
from compress.data.mixing import Mixing, beta, mix_batch, mix_generator, soft_targets
from compress.distill.kd import KD
from compress.errors import CompressError
from compress.models import build_model
from compress.training import OptimConfig, cross_entropy, evaluate, fit
from tests.test_cli import check_fails_cleanly

N, C, H, W = 8, 3, 12, 10


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i + 1 (so a pixel tells which image it came from); label i."""
    x = torch.arange(1, N + 1, dtype=torch.float32).view(N, 1, 1, 1).expand(N, C, H, W).contiguous()
    return x, torch.arange(N)


def test_mixup_blends_each_image_with_its_flipped_partner_and_targets_sum_to_one():
    x, y = _batch()
    xm, t = mix_batch(x, y, N, mixup=0.4, gen=mix_generator(0, 1, 2))
    assert t.shape == (N, N) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(N))
    lam = float(t[0, 0])
    assert 0 < lam < 1 and lam != 0.5
    expected = lam * F.one_hot(y, N) + (1 - lam) * F.one_hot(y.flip(0), N)
    torch.testing.assert_close(t, expected.float())
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    # the same generator seed mixes identically; another step draws another lambda
    again = mix_batch(x, y, N, mixup=0.4, gen=mix_generator(0, 1, 2))
    assert torch.equal(again[0], xm) and torch.equal(again[1], t)
    other = mix_batch(x, y, N, mixup=0.4, gen=mix_generator(0, 1, 3))
    assert float(other[1][0, 0]) != lam
    # channels_last batches stay channels_last (the loop trains in that layout)
    cl = x.contiguous(memory_format=torch.channels_last)
    for kw in ({"mixup": 0.4}, {"cutmix": 1.0}):
        assert mix_batch(cl, y, N, gen=mix_generator(0, 0, 0), **kw)[0].is_contiguous(memory_format=torch.channels_last)


def test_lambda_follows_beta_alpha_alpha():
    """2000 draws from per-step generators against scipy's Beta(α, α) (a wrong law, e.g. uniform, fails)."""
    for alpha in (0.2, 1.0, 2.0):
        lams = [beta(alpha, mix_generator(7, 0, s)) for s in range(2000)]
        assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3, alpha
    assert stats.kstest([beta(0.2, mix_generator(7, 0, s)) for s in range(2000)], "uniform").pvalue < 1e-6


def test_cutmix_lambda_is_the_area_actually_pasted():
    x, y = _batch()
    clipped = 0
    for step in range(200):
        gen = mix_generator(3, 0, step)
        xm, t = mix_batch(x, y, N, cutmix=1.0, gen=gen)
        own = (xm == x).all(1)  # (N, H, W): pixels still from the image itself
        assert ((xm == x) | (xm == x.flip(0))).all()  # pasted, never blended
        assert torch.equal(own, own[0].expand_as(own))  # one box for the whole batch
        lam = own[0].float().mean().item()
        torch.testing.assert_close(t[:, y].diagonal(), torch.full((N,), lam))  # weight on the own label
        torch.testing.assert_close(t.sum(1), torch.ones(N))
        # the raw Beta draw (the same order: prob draw, then lambda) differs where the box was clipped
        replay = mix_generator(3, 0, step)
        torch.rand((), generator=replay)
        clipped += abs(beta(1.0, replay) - lam) > 0.1
    assert clipped > 10  # boxes reaching over the border were corrected, not taken at their drawn size


def test_off_or_not_drawn_is_identity_with_one_hot_targets():
    x, y = _batch()
    for kw in ({}, {"mixup": 0.0, "cutmix": 0.0}, {"mixup": 1.0, "prob": 0.0}):
        xm, t = mix_batch(x, y, N, gen=mix_generator(0, 0, 0), **kw)
        assert xm is x and torch.equal(t, F.one_hot(y, N).float())
    # smoothing folds in as (1 - s) * onehot + s / C, exactly what F.cross_entropy(label_smoothing=) does
    _, t = mix_batch(x, y, N, mixup=0.4, gen=mix_generator(0, 0, 1))
    _, ts = mix_batch(x, y, N, mixup=0.4, smoothing=0.1, gen=mix_generator(0, 0, 1))
    torch.testing.assert_close(ts, 0.9 * t + 0.1 / N)
    z = torch.randn(N, N)
    torch.testing.assert_close(F.cross_entropy(z, ts), F.cross_entropy(z, t, label_smoothing=0.1))
    torch.testing.assert_close(soft_targets(y, N, 0.2).sum(1), torch.ones(N))
    with pytest.raises(ValueError, match="prob"):
        mix_batch(x, y, N, mixup=1.0, prob=1.5, gen=mix_generator(0, 0, 0))


def test_prob_and_switch_choose_per_batch():
    x, y = _batch()
    kinds = []
    for step in range(600):
        xm, _ = mix_batch(x, y, N, mixup=1.0, cutmix=1.0, prob=0.6, switch=0.25, gen=mix_generator(1, 2, step))
        pasted = ((xm == x) | (xm == x.flip(0))).all()
        kinds.append("none" if xm is x else "cutmix" if pasted else "mixup")
    mixed = 600 - kinds.count("none")
    assert abs(mixed / 600 - 0.6) < 0.06
    assert abs(kinds.count("cutmix") / mixed - 0.25) < 0.06


# ----------------------------------------------------------------------------- through the training loop
@pytest.fixture(scope="module")
def digits_data():
    return Digits().load()


def _mixing(data, **fields):
    """The bundle with mixing fields set (a copy: the module's bundle stays unmixed)."""
    import copy

    mixed = copy.copy(data)
    for k, v in fields.items():
        setattr(mixed, k, v)
    return mixed


def _ctx(data, tmp_path, models=None) -> Context:
    return Context(
        recipe=SimpleNamespace(seed=0),  # type: ignore[arg-type] - fit reads only the seed
        device=torch.device("cpu"),
        run_dir=tmp_path,
        data=data,
        models=models or {},
        specs={},
        quiet=True,
        log=logging.getLogger("test_mixing"),
    )


FP32 = {"lr": 0.05, "precision": "fp32"}


def test_mixup_training_learns_and_its_loss_is_the_soft_target_ce(digits_data, tmp_path):
    data = _mixing(digits_data, mixup=0.4)
    torch.manual_seed(0)
    model = build_model("digits_student", 10, 1)
    ce, seen = cross_entropy(0.1), []

    def recording(m, batch):
        loss, logits = ce(m, batch)
        if not seen:
            seen.append((batch.x.clone(), batch.y.clone(), batch.target.clone(), logits.detach(), loss.detach()))
        return loss, logits

    metrics = fit(_ctx(data, tmp_path), model, recording, 4, OptimConfig(**FP32, label_smoothing=0.1), "mixup")
    x, y, target, logits, loss = seen[0]
    # the first batch is the loader's first batch mixed with the (seed 0, epoch 0, step 0) generator
    x0, y0, _ = next(data.train_loader(seed=0).batches())
    want_x, want_t = mix_batch(x0, y0, 10, mixup=0.4, gen=mix_generator(0, 0, 0))
    assert torch.equal(y, y0) and torch.equal(target, want_t) and not torch.equal(want_x, x0)
    torch.testing.assert_close(x, want_x)
    # by hand: cross-entropy with the smoothed soft targets, mean over the batch
    smoothed = 0.9 * target + 0.1 / 10
    torch.testing.assert_close(loss, -(smoothed * logits.log_softmax(1)).sum(1).mean())
    # it trained, and the test accuracy it reports is of unmixed images
    assert metrics["test_acc"] > 0.8, metrics["history"]
    assert metrics["test_acc"] == evaluate(model, data.eval_loader("test"), torch.device("cpu"))


def test_mixing_is_reproducible_and_ignores_the_global_rng(digits_data, tmp_path):
    data = _mixing(digits_data, cutmix=1.0, mixup=0.2, mix_prob=0.8)
    states = []
    for run in range(2):
        torch.manual_seed(0)
        model = build_model("digits_student", 10, 1)
        torch.manual_seed(1234 + run)  # a different global RNG for the training itself
        fit(_ctx(data, tmp_path / str(run)), model, cross_entropy(), 1, OptimConfig(**FP32), "mix")
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key
    assert Mixing.of(digits_data, 0) is None and Mixing.of(_mixing(digits_data, mixup=1.0, mix_prob=0.0), 0) is None


@pytest.fixture(scope="module")
def digits_teacher(digits_data, tmp_path_factory):
    """A trained teacher; the small digits model is teacher enough here (the big one costs 10x the time)."""
    torch.manual_seed(1)
    teacher = build_model("digits_student", 10, 1)
    fit(_ctx(digits_data, tmp_path_factory.mktemp("t")), teacher, cross_entropy(), 3, OptimConfig(**FP32), "t")
    return teacher


def test_kd_with_cutmix_trains_and_the_teacher_sees_the_mixed_image(digits_data, digits_teacher, tmp_path):
    data = _mixing(digits_data, cutmix=1.0)
    torch.manual_seed(0)
    student = build_model("digits_student", 10, 1)
    models = {"student": student, "teacher": digits_teacher}
    kd = KD(loss="hinton", temperature=4.0, alpha=0.9)
    kd.preflight(models, data, "stages.1.kd")
    shown = []
    hook = digits_teacher.register_forward_hook(lambda m, args, out: shown.append(args[0].detach().clone()))
    try:
        metrics = kd.fit(_ctx(data, tmp_path, models), student, 4, OptimConfig(**FP32), "stages.1.kd")
    finally:
        hook.remove()
    x0, y0, _ = next(data.train_loader(seed=0).batches())
    want_x, _ = mix_batch(x0, y0, 10, cutmix=1.0, gen=mix_generator(0, 0, 0))
    assert not torch.equal(want_x, x0)
    torch.testing.assert_close(shown[1], want_x)  # shown[0]: the objective's dry forward on an example
    assert metrics["test_acc"] > 0.8, metrics["history"]


def test_cached_teacher_with_mixup_is_refused_in_one_line(digits_data, digits_teacher):
    models = {"student": build_model("digits_student", 10, 1), "teacher": digits_teacher}
    with pytest.raises(CompressError) as exc:
        KD(cache_teacher=True).preflight(models, _mixing(digits_data, mixup=0.2), "stages.1.kd")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("stages.1.kd.cache_teacher: data.mixup ")
    assert "turn cache_teacher off or set data.mixup: 0" in msg
    with pytest.raises(CompressError, match=r"data\.mixup and data\.cutmix"):
        KD(cache_teacher=True).preflight(models, _mixing(digits_data, mixup=0.2, cutmix=1.0), "f")
    KD(cache_teacher=True).preflight(models, _mixing(digits_data, mixup=0.2, mix_prob=0.0), "f")  # never mixes


def test_a_term_that_needs_hard_labels_is_refused_with_mixing(digits_data, digits_teacher):
    """DKD splits the KL around one true class; mixed images have two."""
    models = {"student": build_model("digits_student", 10, 1), "teacher": digits_teacher}
    kd = KD(losses=[{"name": "ce"}, {"name": "dkd"}])
    with pytest.raises(CompressError) as exc:
        kd.preflight(models, _mixing(digits_data, cutmix=1.0), "stages.1.kd")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("stages.1.kd.losses.1: dkd cannot learn from the soft labels"), msg
    assert "data.cutmix" in msg
    kd.preflight(models, digits_data, "stages.1.kd")  # without mixing DKD is fine


@pytest.mark.skipif(
    "mixup" not in DATASETS.get("synthetic").model_fields, reason="the data.mixup recipe field is not there yet"
)
def test_cli_refuses_cache_teacher_with_mixup(tiny, write_recipe, tmp_path, capsys):
    tiny["data"]["mixup"] = 0.2
    tiny["stages"][1]["kd"] = {"cache_teacher": True}
    check_fails_cleanly(
        capsys, ["run", str(write_recipe(tiny))], tmp_path / "out", "stages.1.kd.cache_teacher", "data.mixup"
    )
