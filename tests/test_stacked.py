"""Stacked (grouped) teachers and the fast DeepInversion paths: same numbers as the plain ones."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fed_distill.data.transforms import Normalizer
from fed_distill.models import build_model, list_models
from fed_distill.synthesis import SynthesisOptions, synthesis_options
from fed_distill.synthesis.bn_hooks import BNFeatureHooks, batch_mean_var
from fed_distill.synthesis.deepinversion import DeepInversion
from fed_distill.synthesis.losses import (
    l2_prior,
    l2_prior_per_batch,
    total_variation,
    total_variation_per_batch,
)
from fed_distill.synthesis.stacked import (
    NotStackable,
    StackedBNHooks,
    StackedTeachers,
    StatBatchNorm2d,
    _BNWithStats,
    try_stack,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small_kwargs(name: str) -> dict:
    if name.startswith("fedmd"):
        return {"width_scale": 0.05}
    if name.startswith(("resnet", "cnn")):
        return {"width": 4}
    return {}


def _warmed(name: str, seed: int, size: int = 8, classes: int = 10) -> nn.Module:
    """A randomly initialised model whose BN running statistics are not the defaults."""
    torch.manual_seed(seed)
    m = build_model(name, classes, 1, size, **_small_kwargs(name))
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, size, size) * 1.5 + 0.3)
    return m.eval()


def _has_bn(m: nn.Module) -> bool:
    return any(isinstance(x, nn.BatchNorm2d) for x in m.modules())


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_stacks_or_falls_back(name):
    teachers = [_warmed(name, s) for s in range(3)]
    stacked, why = try_stack(teachers, (1, 8, 8))
    if stacked is None:  # a clean fallback: a reason, no exception
        assert why
        return
    x = torch.randn(3, 5, 1, 8, 8)
    with torch.no_grad():
        got = stacked(x)
        want = torch.stack([t(x[i]) for i, t in enumerate(teachers)])
        shared = stacked(x[0])
        want_shared = torch.stack([t(x[0]) for t in teachers])
    assert got.shape == (3, 5, 10)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert torch.allclose(shared, want_shared, atol=1e-5, rtol=1e-4)
    if not _has_bn(teachers[0]):
        return
    # per-teacher BN terms == BNFeatureHooks on each teacher alone, with the first layer
    # weighted, and so are their gradients to the input
    xs = x.clone().requires_grad_(True)
    with StackedBNHooks(stacked) as hooks:
        stacked(xs)
        terms = hooks.loss(first_bn_multiplier=3.0)
    assert terms.shape == (3,)
    terms.sum().backward()
    xr = x.clone().requires_grad_(True)
    ref = []
    for i, t in enumerate(teachers):
        with BNFeatureHooks(t) as bn:
            t(xr[i])
            ref.append(bn.loss(first_bn_multiplier=3.0))
    ref_t = torch.stack(ref)
    ref_t.sum().backward()
    assert torch.allclose(terms, ref_t.detach(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(xs.grad, xr.grad, rtol=1e-3, atol=1e-6 * xr.grad.abs().max())


def test_all_registered_bn_models_actually_stack():
    # the module docstring promises ResNets (residual adds) and FedMD (Keras pooling) convert
    for name in list_models():
        stacked, why = try_stack([_warmed(name, s) for s in range(2)], (1, 8, 8))
        assert stacked is not None, f"{name}: {why}"


def test_bn_with_stats_gradient_is_exact():
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    scale = torch.rand(3, dtype=torch.float64) + 0.5
    shift = torch.randn(3, dtype=torch.float64)

    def f(x):
        y, mean, var = _BNWithStats.apply(x, scale, shift)
        return y.sin().sum() + (mean - 0.3).norm() + (var - 2.0).norm()

    assert torch.autograd.gradcheck(f, (x,))
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (xc,))
    # values: the eval BN and the batch statistics of bn_hooks
    y, mean, var = _BNWithStats.apply(x, scale, shift)
    m_ref, v_ref = batch_mean_var(x)
    assert torch.allclose(mean, m_ref) and torch.allclose(var, v_ref)
    assert torch.allclose(y, x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))


def test_stat_bn_is_plain_bn_outside_the_hooks():
    teachers = [_warmed("cnn_small", s) for s in range(2)]
    stacked = StackedTeachers(teachers, (1, 8, 8))
    bns = [m for m in stacked.net.modules() if isinstance(m, StatBatchNorm2d)]
    assert len(bns) == 4 and all(not m.collect for m in bns)
    x = torch.randn(2, 3, 1, 8, 8)
    with torch.no_grad():
        plain = stacked(x)
    with StackedBNHooks(stacked):
        assert all(m.collect for m in bns)
        fused = stacked(x.clone().requires_grad_(True))
    assert torch.allclose(plain, fused.detach(), atol=1e-6)


def test_hooks_are_removed_after_an_exception():
    stacked = StackedTeachers([_warmed("cnn_small", s) for s in range(2)], (1, 8, 8))
    bns = [m for m in stacked.net.modules() if isinstance(m, StatBatchNorm2d)]
    with pytest.raises(RuntimeError, match="boom"), StackedBNHooks(stacked) as hooks:
        stacked(torch.randn(2, 3, 1, 8, 8, requires_grad=True))
        assert hooks.loss().shape == (2,)
        raise RuntimeError("boom")
    assert all(not m.collect and m.term is None for m in bns)
    assert len(hooks) == 0
    with StackedBNHooks(stacked) as hooks, pytest.raises(RuntimeError, match="before a forward"):
        hooks.loss()
    with (
        StackedBNHooks(stacked),
        pytest.raises(RuntimeError, match="already active"),
        StackedBNHooks(stacked),
    ):
        pass


class _WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.GroupNorm(2, 4)  # has parameters, not convertible
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.norm(self.bn(self.conv(x))).mean(dim=(2, 3)))


class _MixesChannels(nn.Module):
    """Parameter-free channel mixing in forward: the module tree looks fine, the math is not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.bn(self.conv(x))
        h = h - h.mean(dim=1, keepdim=True)  # mixes every channel of the (grouped) tensor
        return self.fc(h.mean(dim=(2, 3)))


def test_unsupported_models_fall_back_cleanly():
    for cls, match in ((_WithLayerNorm, "parameters or buffers"), (_MixesChannels, "differ")):
        teachers = [cls().eval() for _ in range(2)]
        with pytest.raises(NotStackable, match=match):
            StackedTeachers(teachers, (1, 8, 8))
        stacked, why = try_stack(teachers, (1, 8, 8))
        assert stacked is None and why
    # different architectures
    stacked, why = try_stack([_warmed("cnn_small", 0), _warmed("resnet8", 1)], (1, 8, 8))
    assert stacked is None and "differ" in why


@pytest.mark.parametrize("cls", [_WithLayerNorm, _MixesChannels])
def test_unsupported_teachers_still_synthesise(cls):
    # DeepInversion with teachers that cannot be grouped runs them one after another: as they
    # are (a GroupNorm), or converted one by one (channel mixing within one teacher is fine).
    teachers = [cls() for _ in range(2)]
    for t in teachers:
        with torch.no_grad():
            t(torch.randn(8, 1, 8, 8))
        t.eval()
    cfg = synthesis_options(mode="ensemble", batch_size=8, iterations=3, bn_scale=1.0)
    synth = _di(cfg, teachers)
    assert synth.stacked is None
    assert all((f is None) == (cls is _WithLayerNorm) for f in synth.fast)
    batch = synth.synthesize()
    assert batch.images.shape == (8, 1, 8, 8) and torch.isfinite(batch.images).all()
    slow = _di(synthesis_options(**{**vars(cfg), "stacked": False}), teachers).synthesize()
    assert torch.allclose(batch.images, slow.images, atol=1e-4)


def test_per_batch_priors_equal_the_batch_priors():
    x = torch.randn(3, 4, 2, 6, 5)
    tv = total_variation_per_batch(x)
    l2 = l2_prior_per_batch(x)
    for t in range(3):
        assert tv[t].item() == pytest.approx(total_variation(x[t]).item(), rel=1e-5)
        assert l2[t].item() == pytest.approx(l2_prior(x[t]).item(), rel=1e-5)


# ------------------------------------------------------------------------------ DeepInversion

CLASSES = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 2, 4, 6, 8]]


def _counts(classes=CLASSES) -> np.ndarray:
    c = np.zeros((len(classes), 10), dtype=np.int64)
    for i, cls in enumerate(classes):
        c[i, cls] = 10 + i
    return c


def _di(cfg: SynthesisOptions, teachers, counts=None, seed: int = 0) -> DeepInversion:
    counts = _counts()[: len(teachers)] if counts is None else counts
    norm = Normalizer((0.5,), (0.25,))
    return DeepInversion(cfg, teachers, counts, (1, 8, 8), norm, device="cpu", seed=seed)


def _cfg(**kw) -> SynthesisOptions:
    base = dict(batch_size=16, iterations=8, lr=0.2, jitter=1, bn_scale=1.0)
    base.update(kw)
    return synthesis_options(**base)


@pytest.fixture(scope="module")
def teachers():
    return [_warmed("cnn_small", s) for s in range(3)]


@pytest.mark.parametrize("grouped", [True, False])
def test_ensemble_fast_paths_give_the_sequential_batch(teachers, grouped):
    student = _warmed("cnn_small", 9)
    cfg_kw = dict(mode="ensemble", class_mask=True, first_bn_multiplier=2.0, l2_scale=1e-3)
    slow = _di(_cfg(stacked=False, **cfg_kw), teachers, seed=3)
    fast = _di(_cfg(stacked=True, grouped=grouped, **cfg_kw), teachers, seed=3)
    assert slow.stacked is None and all(f is None for f in slow.fast)
    if grouped:
        assert fast.stacked is not None
    else:
        assert fast.stacked is None and all(f is not None for f in fast.fast)
    for adaptive in (None, student):
        a, b = slow.synthesize(adaptive), fast.synthesize(adaptive)
        assert torch.equal(a.labels, b.labels)
        assert torch.allclose(a.images, b.images, atol=1e-4), (a.images - b.images).abs().max()
        for key in ("loss", "best_loss", "loss_ce", "loss_bn", "loss_tv"):
            assert a.stats[key] == pytest.approx(b.stats[key], rel=1e-4, abs=1e-5), key
        assert a.stats["teacher_acc"] == b.stats["teacher_acc"]


@pytest.mark.parametrize("mode", ["cycling", "sampling"])
def test_one_teacher_fast_path_gives_the_sequential_batch(teachers, mode):
    kw = dict(mode=mode, num_teachers=2, class_weighted_ce=True, iterations=6)
    slow = _di(_cfg(stacked=False, **kw), teachers, seed=5)
    fast = _di(_cfg(stacked=True, **kw), teachers, seed=5)
    assert all(f is not None for f in fast.fast)
    for _ in range(2):
        a, b = slow.synthesize(), fast.synthesize()
        assert a.teacher_ids == b.teacher_ids and torch.equal(a.labels, b.labels)
        assert torch.allclose(a.images, b.images, atol=1e-4), (a.images - b.images).abs().max()
        assert a.stats["best_loss"] == pytest.approx(b.stats["best_loss"], rel=1e-4)


def test_parallel_cycling_hands_out_batches_in_teacher_order(teachers):
    synth = _di(_cfg(mode="cycling", parallel=True, grouped=True, class_mask=True), teachers)
    assert synth.stacked is not None
    made = []
    real = synth._synthesize_group

    def spy(student):
        made.append(1)
        return real(student)

    synth._synthesize_group = spy  # count groups
    batches = [synth.synthesize() for _ in range(5)]
    assert [b.teacher_ids for b in batches] == [[0], [1], [2], [0], [1]]
    assert len(made) == 2  # one group per T calls
    for b in batches:
        (t,) = b.teacher_ids
        assert set(b.labels.tolist()) <= set(CLASSES[t])
        assert b.images.shape == (16, 1, 8, 8) and b.stats["group_size"] == 3
        assert synth.last_loss_curve is not None and synth.last_loss_curve.shape == (8,)
    # every batch owns its storage: changing one changes no other
    keep = [b.images.clone() for b in batches]
    batches[0].images.add_(5.0)
    assert all(torch.equal(b.images, k) for b, k in zip(batches[1:], keep[1:], strict=True))
    assert len({b.images.untyped_storage().data_ptr() for b in batches}) == 5


def test_parallel_batches_are_independent_problems(teachers):
    # Batch 0 of a group depends only on teacher 0: replacing teacher 1 (same classes, so the
    # same random draws) leaves it unchanged, while batch 1 changes.
    other = [teachers[0], _warmed("cnn_small", 7)]
    counts = _counts([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    cfg = _cfg(mode="cycling", parallel=True, grouped=True, l2_scale=1e-3, first_bn_multiplier=2.0)
    a = _di(cfg, teachers[:2], counts)
    b = _di(cfg, other, counts)
    a0, a1 = a.synthesize(), a.synthesize()
    b0, b1 = b.synthesize(), b.synthesize()
    assert torch.equal(a0.labels, b0.labels)
    assert torch.allclose(a0.images, b0.images, atol=1e-5)
    assert a0.stats["best_loss"] == pytest.approx(b0.stats["best_loss"], rel=1e-5)
    assert not torch.allclose(a1.images, b1.images, atol=1e-3)


def test_parallel_group_batch_matches_its_loss(teachers):
    # The kept batch of each teacher has the best loss the group reported for it: recompute
    # that loss on the kept pixels with the plain teacher and BNFeatureHooks.
    cfg = _cfg(mode="cycling", parallel=True, grouped=True, jitter=0, flip=False, iterations=6)
    synth = _di(cfg, teachers)
    for t in range(3):
        batch = synth.synthesize()
        assert batch.teacher_ids == [t]
        model = teachers[t]
        with BNFeatureHooks(model) as bn, torch.no_grad():
            ce = F.cross_entropy(model(batch.images), batch.labels)
            loss = ce + cfg.bn_scale * bn.loss() + cfg.var_scale * total_variation(batch.images)
        assert loss.item() == pytest.approx(batch.stats["best_loss"], rel=1e-4)


def test_parallel_queue_is_not_mixed_between_adaptive_and_plain_calls(teachers):
    student = _warmed("cnn_small", 11)
    synth = _di(_cfg(mode="cycling", parallel=True, grouped=True, iterations=3), teachers)
    first = synth.synthesize()  # plain group; teacher 0 handed out
    adaptive = synth.synthesize(student)  # the queued plain batches are dropped
    assert first.teacher_ids == [0] and adaptive.teacher_ids == [1]  # order kept
    assert "loss_comp" in adaptive.stats and "loss_comp" not in first.stats
    assert synth.synthesize(student).teacher_ids == [2]
    assert student.training is False  # _warmed put it in eval; the call restored that
    student.train()
    synth.synthesize(student)
    assert student.training and all(p.requires_grad for p in student.parameters())


def test_parallel_without_grouping_is_plain_cycling(teachers):
    synth = _di(_cfg(mode="cycling", parallel=True, grouped=False, iterations=2), teachers)
    assert synth.stacked is None
    assert [synth.synthesize().teacher_ids for _ in range(3)] == [[0], [1], [2]]
    assert "group_size" not in synth.synthesize().stats


def test_stacking_leaves_the_callers_teachers_alone(teachers):
    before = [copy.deepcopy(t.state_dict()) for t in teachers]
    modes = [t.training for t in teachers]
    synth = _di(_cfg(mode="ensemble", iterations=2), teachers)
    synth.synthesize()
    for t, sd, m in zip(teachers, before, modes, strict=True):
        assert t.training == m
        assert all(torch.equal(v, t.state_dict()[k]) for k, v in sd.items())
        assert not any(isinstance(x, StatBatchNorm2d) for x in t.modules())


def test_relu_then_maxpool_runs_as_pool_then_relu_with_the_same_gradient():
    teacher = _warmed("cnn_small", 0, size=16)
    stacked = StackedTeachers([teacher], (1, 16, 16))
    kinds = [type(m) for m in stacked.net.features]
    assert kinds[:4] == [nn.Conv2d, StatBatchNorm2d, nn.MaxPool2d, nn.ReLU]
    assert [type(m) for m in teacher.features][2:4] == [nn.ReLU, nn.MaxPool2d]  # caller's
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    stacked.double()
    ref = copy.deepcopy(teacher).double()
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    stacked(xa)[0].square().sum().backward()
    ref(xb).square().sum().backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)


def test_grouped_auto_follows_the_thread_count(teachers):
    cfg = _cfg(mode="ensemble", iterations=1)  # grouped=None: auto
    assert cfg.grouped is None
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _di(cfg, teachers)
        torch.set_num_threads(2)
        two = _di(cfg, teachers)
    finally:
        torch.set_num_threads(n)
    assert one.stacked is None and all(f is not None for f in one.fast)
    assert two.stacked is not None
