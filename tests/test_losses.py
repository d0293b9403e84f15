"""Distillation losses against hand computations; the objective's hooks, teachers and cache.

Every registered loss term is also exercised generically (``test_every_registered_term...``), so a
new term is tested without editing this file.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.data.base import DataBundle
from compress.distill import LOSSES, LayerPair, Outputs
from compress.distill.losses.attention import at_loss, attention_map
from compress.distill.losses.dkd import DKD, dkd_loss, dkd_parts
from compress.distill.losses.fitnets import FitNets, fitnets_loss
from compress.distill.losses.hinton import Hinton, hinton_loss
from compress.distill.objective import DistillObjective, TeacherCache
from compress.distill.taps import FeatureTaps, find_module
from compress.models import build_model
from compress.training import Batch

Z_S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
Z_T = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
Y = torch.tensor([1, 2])


def softmax(row, T=1.0):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def test_hinton_equals_the_formula_on_fixed_logits():
    T, alpha = 2.0, 0.7
    soft = sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(Z_S.tolist(), Z_T.tolist(), strict=True)) / 2 * T * T
    ce = sum(-math.log(softmax(s)[c]) for s, c in zip(Z_S.tolist(), Y.tolist(), strict=True)) / 2
    got = hinton_loss(Z_S, Z_T, Y, temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(alpha * soft + (1 - alpha) * ce, rel=1e-6)


def test_hinton_limits():
    z_s, z_t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert hinton_loss(z_s, z_t, y, temperature=3.0, alpha=0.0).item() == pytest.approx(F.cross_entropy(z_s, y).item())
    assert hinton_loss(z_t, z_t, y, temperature=3.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_equals_a_hand_computation():
    T, alpha, beta = 2.0, 1.0, 8.0
    total = 0.0
    for s, t, g in zip(Z_S.tolist(), Z_T.tolist(), Y.tolist(), strict=True):
        ps, pt = softmax(s, T), softmax(t, T)
        tckd = kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
        rest_s = [p / (1 - ps[g]) for i, p in enumerate(ps) if i != g]
        rest_t = [p / (1 - pt[g]) for i, p in enumerate(pt) if i != g]
        total += alpha * tckd + beta * kl(rest_t, rest_s)
    expected = total / 2 * T * T
    assert dkd_loss(Z_S, Z_T, Y, temperature=T, alpha=alpha, beta=beta).item() == pytest.approx(expected, rel=1e-5)


def test_dkd_reduces_to_its_parts_and_classical_kd():
    """The paper's Eq. 7: KL(p_t || p_s) = TCKD + (1 - p_t[gt]) * NCKD, sample by sample."""
    torch.manual_seed(0)
    z_s, z_t, y, T = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3, torch.randint(0, 10, (16,)), 3.0
    log_p_t = F.log_softmax(z_t / T, dim=1)
    tckd, nckd = dkd_parts(z_s, log_p_t, y, T)
    full = (log_p_t.exp() * (log_p_t - F.log_softmax(z_s / T, dim=1))).sum(1)
    p_gt = log_p_t.exp().gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(tckd + (1 - p_gt) * nckd, full, atol=1e-5, rtol=1e-5)
    assert dkd_loss(z_s, z_t, y, temperature=T, alpha=1.0, beta=0.0).item() == pytest.approx(
        (tckd.mean() * T * T).item(), rel=1e-5
    )
    assert dkd_loss(z_t, z_t, y, temperature=T, alpha=1.0, beta=8.0).item() == pytest.approx(0.0, abs=1e-5)


def _outputs(z_s, z_t_list, weights, combine="average", epoch=100.0, **kw):
    return Outputs(z_s=z_s, z_t=z_t_list, weights=weights, combine=combine, y=Y, epoch=epoch, **kw)


def test_dkd_warm_up_ramps_linearly():
    term = DKD(warmup_epochs=4).build({}, [])
    full = term(_outputs(Z_S, [Z_T], [1.0], epoch=10.0))
    assert term(_outputs(Z_S, [Z_T], [1.0], epoch=1.0)).item() == pytest.approx(full.item() / 4, rel=1e-6)
    assert term(_outputs(Z_S, [Z_T], [1.0], epoch=0.0)).item() == 0.0


def test_attention_map_and_loss_by_hand():
    f = torch.tensor([[[[1.0, -2.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    a = [(1 + 9) / 2, (4 + 0) / 2, 0.0, (4 + 0) / 2]  # mean_c f^2, row-major
    norm = math.sqrt(sum(v * v for v in a))
    torch.testing.assert_close(attention_map(f)[0], torch.tensor([v / norm for v in a]))
    assert at_loss(3 * f, f).item() == pytest.approx(0.0, abs=1e-7)  # scale-free: same attention
    g = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    b = torch.tensor([0.0, 1.0, 1.0, 0.0]) / math.sqrt(2)
    assert at_loss(g, f).item() == pytest.approx(((b - attention_map(f)[0]) ** 2).mean().item(), rel=1e-6)


def test_attention_resizes_the_student_map_and_ignores_channel_counts():
    f_t = torch.rand(2, 8, 4, 4)
    f_s = f_t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[:, :3]  # 8x8, 3 channels
    pooled = F.adaptive_avg_pool2d(f_s.pow(2).mean(1, keepdim=True), 4)
    expected = (F.normalize(pooled.flatten(1), dim=1) - attention_map(f_t)).pow(2).mean()
    assert at_loss(f_s, f_t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_fitnets_mse_with_and_without_regressor():
    f = torch.randn(2, 4, 3, 3)
    assert fitnets_loss(f, f).item() == 0.0
    term = FitNets(pairs=[LayerPair(student="a", teacher="b")])
    same = term.build({"a": f}, [{"b": f}])
    assert len(same.regressors) == 0  # equal channels: no regressor, plain MSE
    f_s = torch.randn(2, 3, 6, 6, requires_grad=True)
    mod = term.build({"a": f_s}, [{"b": f}])
    (reg,) = mod.regressors
    assert isinstance(reg, nn.Conv2d) and (reg.in_channels, reg.out_channels, reg.kernel_size) == (3, 4, (1, 1))
    loss = mod(_outputs(Z_S, [Z_T], [1.0], feats_s={"a": f_s}, feats_t=[{"b": f}]))
    expected = F.mse_loss(F.adaptive_avg_pool2d(reg(f_s), 3), f)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert reg.weight.grad is not None and f_s.grad is not None
    vec = term.build({"a": torch.randn(2, 5)}, [{"b": torch.randn(2, 7)}])
    assert isinstance(vec.regressors[0], nn.Linear)
    with pytest.raises(ValueError, match="cannot be matched"):
        term.build({"a": torch.randn(2, 5)}, [{"b": f}])


def test_multi_teacher_weights_are_honoured():
    z_t2 = torch.tensor([[0.0, 3.0, 1.0], [2.0, 2.0, -1.0]])
    T, w = 2.0, [0.25, 0.75]
    hinton = Hinton(temperature=T, alpha=1.0).build({}, [])
    # average: KL from the weighted mixture of the teachers' soft targets, by hand
    expected = 0.0
    for s, t1, t2 in zip(Z_S.tolist(), Z_T.tolist(), z_t2.tolist(), strict=True):
        mix = [w[0] * a + w[1] * b for a, b in zip(softmax(t1, T), softmax(t2, T), strict=True)]
        expected += kl(mix, softmax(s, T))
    got = hinton(_outputs(Z_S, [Z_T, z_t2], w, "average"))
    assert got.item() == pytest.approx(expected / 2 * T * T, rel=1e-5)
    # per_teacher: the weighted sum of one loss per teacher
    per = hinton(_outputs(Z_S, [Z_T, z_t2], w, "per_teacher"))
    one = [hinton_loss(Z_S, z, Y, temperature=T, alpha=1.0).item() for z in (Z_T, z_t2)]
    assert per.item() == pytest.approx(w[0] * one[0] + w[1] * one[1], rel=1e-6)


def _pair(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet20", 10, 3), build_model("resnet8x4", 10, 3)


def _batch(n=4, epoch=0.0):
    return Batch(torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,)), torch.arange(n), 0, epoch)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_objective_trains_the_student_only_and_removes_its_hooks():
    student, teacher = _pair()
    teacher.train()
    t_flags = [p.requires_grad for p in teacher.parameters()]
    terms = [
        LOSSES.get("ce")(),
        LOSSES.get("attention")(pairs=[{"student": "layer2", "teacher": "layer2"}]),
        LOSSES.get("fitnets")(pairs=[{"student": "layer3", "teacher": "layer3"}]),
    ]
    objective = DistillObjective(student, [(teacher, 1.0)], terms, example=torch.randn(2, 3, 16, 16))
    assert _hooks(student) == _hooks(teacher) == 0  # the dry run's hooks are gone too
    with objective:
        assert _hooks(student) == 2 and _hooks(teacher) == 2 and not teacher.training
        loss, logits = objective(student.train(), _batch())
        loss.backward()
    assert _hooks(student) == _hooks(teacher) == 0
    assert teacher.training and [p.requires_grad for p in teacher.parameters()] == t_flags
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in objective.aux.parameters())  # the FitNets regressor learns
    assert logits.shape == (4, 10)


def test_hooks_are_removed_when_the_step_raises():
    student, teacher = _pair()
    terms = [LOSSES.get("attention")(pairs=[{"student": "layer1", "teacher": "layer1"}])]
    objective = DistillObjective(student, [(teacher, 1.0)], terms, example=torch.randn(2, 3, 16, 16))
    with pytest.raises(RuntimeError), objective:
        objective(student, Batch(torch.randn(4, 5, 16, 16), torch.zeros(4, dtype=torch.long), torch.arange(4), 0, 0))
    assert _hooks(student) == _hooks(teacher) == 0


def test_unknown_layer_names_list_close_matches():
    student, _ = _pair()
    with pytest.raises(ValueError, match=r"no module 'layer2\.0\.conv3'.*close matches: layer2\.0\.conv[12]"):
        find_module(student, "layer2.0.conv3", "student")
    with pytest.raises(ValueError, match=r"'layr2'.*layer2"):
        FeatureTaps(student, ["layr2"], "student")


def test_a_module_never_called_in_forward_is_an_error():
    student, teacher = _pair()
    student.unused = nn.Conv2d(3, 3, 1)
    terms = [LOSSES.get("attention")(pairs=[{"student": "unused", "teacher": "layer1"}])]
    with pytest.raises(ValueError, match="'unused' produced no tensor output"):
        DistillObjective(student, [(teacher, 1.0)], terms, example=torch.randn(2, 3, 16, 16))
    assert _hooks(student) == 0


def _augmented_bundle(n=24):
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(n, 3, 16, 16, generator=gen) * 255).to(torch.uint8)
    y = torch.arange(n) % 10
    names = [str(i) for i in range(10)]
    return DataBundle(x, y, x[:8], y[:8], names, (0.5,) * 3, (0.3,) * 3, augment=True, batch_size=8)


def test_replayed_views_show_the_same_image_per_index():
    loader = _augmented_bundle().train_loader(seed=1, views=2)

    def images(epoch):
        loader.set_epoch(epoch)
        out = {}
        for x, _, idx in loader.batches():
            out.update({int(i): img for i, img in zip(idx, x, strict=True)})
        return out

    e0, e1, e2 = images(0), images(1), images(2)
    assert loader.view() == 0 and e0.keys() == e2.keys()
    assert all(torch.equal(e0[i], e2[i]) for i in e0)  # epoch 2 replays view 0
    assert any(not torch.equal(e0[i], e1[i]) for i in e0)  # view 1 differs
    fresh = _augmented_bundle().train_loader(seed=1)
    assert fresh.view() is None  # new augmentations every epoch: nothing may be cached


def test_cached_teacher_logits_equal_live_ones():
    data = _augmented_bundle()
    student, teacher = _pair()
    teacher.eval()
    cache = TeacherCache(2, 1, len(data.train_x), 10, torch.device("cpu"))
    terms = [LOSSES.get("hinton")()]
    cached = DistillObjective(student, [(teacher, 1.0)], terms, example=data.example_input(2), cache=cache)
    live = DistillObjective(student, [(teacher, 1.0)], terms, example=data.example_input(2))
    loader = data.train_loader(seed=0, views=2)
    with cached, live:
        for epoch in range(4):
            loader.set_epoch(epoch)
            for x, y, idx in loader.batches():
                batch = Batch(x, y, idx, loader.view(), float(epoch))
                (a,), _ = cached.teacher_outputs(batch)
                (b,), _ = live.teacher_outputs(batch)
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    per_epoch = len(loader) * data.batch_size
    assert cache.misses == 2 * per_epoch and cache.hits == 2 * per_epoch  # epochs 2, 3 replay views 0, 1


def test_every_registered_term_gives_a_finite_loss_with_gradients():
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        raw = {"name": name}
        if "pairs" in cls.model_fields:
            raw["pairs"] = [{"student": "layer3", "teacher": "layer3"}]
        term = cls.model_validate(raw)
        student, teacher = _pair()
        objective = DistillObjective(student, [(teacher, 1.0)], [term], example=torch.randn(2, 3, 16, 16))
        with objective:
            loss, _ = objective(student.train(), _batch(epoch=50.0))
            loss.backward()
        assert torch.isfinite(loss), name
        grads = [p.grad.abs().sum() for p in student.parameters() if p.grad is not None]
        assert grads and sum(grads) > 0, name
