"""Per-class feature statistics: what a client computes and uploads, how the server checks them,
and the per-class BN term every BN-matching synthesizer can use (plain, fused and grouped paths
give the same numbers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fed_distill.artifacts import read_weights, save_weights
from fed_distill.class_stats import (
    ClassTargets,
    bn_layers,
    check_class_stats,
    class_bn_term,
    class_mean_var,
    class_targets,
    class_weights,
    compute_class_stats,
    load_class_stats,
)
from fed_distill.data.sources import load_dataset
from fed_distill.data.transforms import Normalizer
from fed_distill.errors import ProtocolError
from fed_distill.models import build_model
from fed_distill.synthesis import build_synthesizer, synthesis_options
from fed_distill.synthesis.bn_hooks import BNFeatureHooks, batch_mean_var
from fed_distill.synthesis.losses import total_variation
from fed_distill.synthesis.stacked import StackedBNHooks, StackedTeachers

K = 10
NORM = Normalizer((0.5,), (0.25,))


def _warmed(seed: int) -> nn.Module:
    """A small cnn_small whose BN running statistics are not the defaults."""
    torch.manual_seed(seed)
    m = build_model("cnn_small", K, 1, 8, width=4).train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 8, 8) * 1.5 + 0.3)
    return m.eval()


def _fake_stats(model: nn.Module, seed: int, counts: list[int] | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    stats = {"counts": torch.as_tensor(counts or [60] * K, dtype=torch.int64)}
    for j, m in enumerate(bn_layers(model)):
        stats[f"bn.{j}.mean"] = torch.randn(K, m.num_features, generator=g)
        stats[f"bn.{j}.var"] = torch.rand(K, m.num_features, generator=g) + 0.1
    d = model.fc.in_features
    stats["feat.mean"], stats["feat.var"] = torch.randn(K, d, generator=g), torch.rand(K, d)
    return stats


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_client_statistics_are_the_per_class_moments_of_each_bn_input(digits):
    model = _warmed(0)
    x, y = digits.train_x[:300], digits.train_y[:300]
    norm = Normalizer(digits.info.mean, digits.info.std)
    stats = compute_class_stats(model, x, y, norm, K, batch_size=64)  # several batches
    assert torch.equal(stats["counts"], torch.bincount(y, minlength=K))
    seen = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, inp, j=j: seen.__setitem__(j, inp[0]))
        for j, m in enumerate(bn_layers(model))
    ]
    with torch.no_grad():
        model(norm(x))
    for h in handles:
        h.remove()
    for j, inp in seen.items():
        for c in (0, 7):
            mean, var = batch_mean_var(inp[y == c])
            assert torch.allclose(stats[f"bn.{j}.mean"][c], mean, atol=1e-5)
            assert torch.allclose(stats[f"bn.{j}.var"][c], var, atol=1e-4)
    feats = torch.flatten(model.pool(model.features(norm(x))), 1)
    assert torch.allclose(stats["feat.mean"][3], feats[y == 3].mean(0), atol=1e-5)
    check_class_stats(stats, model, K, "client 0")  # what the server accepts


def test_a_class_without_images_has_zero_rows_and_count(digits):
    model = _warmed(1)
    keep = digits.train_y[:200] != 4
    x, y = digits.train_x[:200][keep], digits.train_y[:200][keep]
    stats = compute_class_stats(model, x, y, NORM, K, features=False)
    assert stats["counts"][4] == 0 and "feat.mean" not in stats
    assert not stats["bn.0.mean"][4].any() and not stats["bn.0.var"][4].any()


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda s: s.pop("bn.1.var"), "missing keys"),
        (lambda s: s.__setitem__("bn.0.mean", torch.zeros(K, 3)), "has shape"),
        (lambda s: s["bn.2.mean"].view(-1).__setitem__(0, float("nan")), "NaN or Inf"),
        (lambda s: s["bn.0.var"].view(-1).__setitem__(0, -1.0), "negative"),
        (lambda s: s["counts"].__setitem__(0, -3), "negative"),
        (lambda s: s.__setitem__("bn.9.mean", torch.zeros(K, 4)), "unknown keys"),
    ],
)
def test_malformed_statistics_are_refused_in_one_line(tmp_path, corrupt, message):
    model = _warmed(2)
    stats = _fake_stats(model, 0)
    corrupt(stats)
    with pytest.raises(ProtocolError, match=message) as e:
        check_class_stats(stats, model, K, "client 3")
    assert "client 3" in str(e.value) and "\n" not in str(e.value)
    save_weights(stats, tmp_path / "s.safetensors")
    with pytest.raises(ProtocolError, match=message):
        load_class_stats(tmp_path / "s.safetensors", model, K)


def test_targets_fall_back_to_global_statistics_for_rare_classes():
    model = _warmed(3)
    counts = [60, 49, 0, 50, 60, 60, 5, 60, 60, 60]
    stats = _fake_stats(model, 1, counts)
    for (mean, var), bn, j in zip(
        class_targets(model, stats, 50).bn, bn_layers(model), range(9), strict=False
    ):
        for c, n in enumerate(counts):
            want_m = stats[f"bn.{j}.mean"][c] if n >= 50 else bn.running_mean
            want_v = stats[f"bn.{j}.var"][c] if n >= 50 else bn.running_var
            assert torch.equal(mean[c], want_m) and torch.equal(var[c], want_v)


def test_one_class_of_weight_one_is_the_global_term():
    torch.manual_seed(0)
    x = torch.randn(12, 5, 6, 6)
    tm, tv = torch.randn(5), torch.rand(5)
    mean, var = class_mean_var(x, torch.ones(12, 1))
    got = class_bn_term(mean, var, tm[None], tv[None], torch.ones(1))
    gm, gv = batch_mean_var(x)
    want = torch.linalg.vector_norm(gm - tm) + torch.linalg.vector_norm(gv - tv)
    assert torch.allclose(got, want, atol=1e-5)


def test_per_class_hooks_on_one_labelled_class_equal_the_global_hooks():
    # every image labelled 0, and class 0's targets = the running statistics: the global term
    model = _warmed(4)
    targets = ClassTargets([(m.running_mean[None].repeat(K, 1), m.running_var[None].repeat(K, 1))
                            for m in bn_layers(model)])  # fmt: skip
    x = torch.randn(10, 1, 8, 8)
    y = torch.zeros(10, dtype=torch.long)
    with BNFeatureHooks(model) as h:
        model(x)
        want = h.loss()
    with BNFeatureHooks(model, class_targets=targets) as h:
        h.set_classes(y, class_weights(y, K))
        model(x)
        got = h.loss()
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("per_teacher_labels", [False, True])
@pytest.mark.parametrize("feature_scale", [0.0, 0.5])
def test_fused_per_class_term_has_the_plain_value_and_gradient(per_teacher_labels, feature_scale):
    teachers = [_warmed(s) for s in range(3)]
    targets = [class_targets(t, _fake_stats(t, s), 50, feature_scale) for s, t in enumerate(teachers)]  # fmt: skip
    torch.manual_seed(1)
    shape = (3, 16, 1, 8, 8) if per_teacher_labels else (16, 1, 8, 8)
    x = torch.randn(shape, requires_grad=True)
    y = torch.randint(0, K, shape[:-3])
    w = class_weights(y, K)
    plain = []
    for i, (t, tg) in enumerate(zip(teachers, targets, strict=True)):
        with BNFeatureHooks(t, class_targets=tg) as h:
            h.set_classes(y[i] if per_teacher_labels else y, w[i] if per_teacher_labels else w)
            t(x[i] if per_teacher_labels else x)
            plain.append(h.loss())
    plain = torch.stack(plain)
    (g_plain,) = torch.autograd.grad(plain.sum(), x)
    stacked = StackedTeachers(teachers, (1, 8, 8))
    with StackedBNHooks(stacked, class_targets=targets) as h:
        h.set_classes(y, w)
        stacked(x)
        fused = h.loss()
    (g_fused,) = torch.autograd.grad(fused.sum(), x)
    assert torch.allclose(plain, fused, rtol=1e-4)
    assert torch.allclose(g_plain, g_fused, atol=1e-6 * g_plain.abs().max().item() * 10)
    with torch.no_grad(), StackedBNHooks(stacked, class_targets=targets) as h:
        h.set_classes(y, w)
        stacked(x)  # the no-grad path (plain BN + statistics) gives the same value
        assert torch.allclose(h.loss(), fused.detach(), rtol=1e-4)


def test_feature_term_is_the_weighted_distance_of_class_mean_features():
    model = _warmed(11)
    stats = _fake_stats(model, 5, [60, 60, 10] + [60] * 7)
    targets = class_targets(model, stats, 50, feature_scale=2.0)
    # class 2 (10 images < 50) falls back to the client's count-weighted mean feature
    n = stats["counts"].float()[:, None]
    assert torch.allclose(targets.feat[2], (stats["feat.mean"] * n).sum(0) / n.sum())
    x, y = torch.randn(8, 1, 8, 8), torch.tensor([0, 0, 0, 2, 2, 5, 5, 5])
    w = class_weights(y, K)
    with BNFeatureHooks(model, class_targets=targets) as h:
        h.set_classes(y, w)
        model(x)
        total = h.loss()
    with BNFeatureHooks(model, class_targets=ClassTargets(targets.bn)) as h:
        h.set_classes(y, w)
        model(x)
        bn_only = h.loss()
    with torch.no_grad():
        f = torch.flatten(model.pool(model.features(x)), 1)
    want = sum(
        w[c] * torch.linalg.vector_norm(f[y == c].mean(0) - targets.feat[c]) for c in (0, 2, 5)
    )
    assert torch.allclose(total - bn_only, 2.0 * want, rtol=1e-4)


def test_per_class_momentum_moves_only_the_classes_of_the_batch():
    model = _warmed(5)
    targets = class_targets(model, _fake_stats(model, 2), 50)
    hooks = BNFeatureHooks(model, momentum=0.5, class_targets=targets)
    with hooks:
        y1 = torch.tensor([0, 0, 1, 1])
        hooks.set_classes(y1, class_weights(y1, K))
        model(torch.randn(4, 1, 8, 8))
        tracked = hooks.update_momentum()
    first = tracked[0]
    assert first[2].tolist() == [True, True] + [False] * 8
    with BNFeatureHooks(model, 0.5, tracked, targets) as hooks:
        y2 = torch.tensor([1, 1, 2, 2])
        hooks.set_classes(y2, class_weights(y2, K))
        model(torch.randn(4, 1, 8, 8) + 3)
        batch = hooks.hooks[0].batch_stats
        second = hooks.update_momentum()[0]
    assert torch.equal(second[0][0], first[0][0])  # class 0 not in the batch: unchanged
    assert torch.allclose(second[0][1], 0.5 * first[0][1] + 0.5 * batch[0][1])
    assert torch.equal(second[0][2], batch[0][2])  # class 2 seen for the first time
    assert second[2].tolist() == [True, True, True] + [False] * 7


COUNTS = np.array([[30, 30, 30, 0, 0, 60, 60, 60, 60, 60], [0, 0, 60, 60, 60, 60, 60, 1, 1, 60]])


def _synth(method: str, teachers, stats, **kw):
    cfg = synthesis_options(method=method, batch_size=20, iterations=4, lr=0.05, **kw)
    if method != "deepinversion":
        kw.setdefault("nz", 8)
        cfg = synthesis_options(method=method, batch_size=20, iterations=3, lr=1e-3, nz=8, ngf=4,
                              **{k: v for k, v in kw.items() if k != "nz"})  # fmt: skip
    return build_synthesizer(
        cfg, teachers, COUNTS, (1, 8, 8), NORM, False, "cpu", seed=3, class_stats=stats
    )


@pytest.mark.parametrize(
    "method,kw",
    [
        ("deepinversion", {"mode": "cycling"}),
        ("deepinversion", {"mode": "ensemble", "grouped": True}),
        ("deepinversion", {"mode": "ensemble", "grouped": False}),
        ("deepinversion", {"mode": "sampling", "num_teachers": 2}),
        ("deepinversion", {"mode": "ensemble", "grouped": True, "feature_scale": 0.5}),
        ("deepinversion", {"mode": "cycling", "feature_scale": 0.5}),
        ("generator", {"grouped": True}),
        ("generator", {"grouped": True, "feature_scale": 0.5}),
        ("generator", {"target": "cycling"}),
    ],
)
def test_every_fast_path_gives_the_plain_per_class_batch(method, kw):
    teachers = [_warmed(s) for s in (6, 7)]
    stats = [_fake_stats(t, s, COUNTS[i].tolist()) for i, (s, t) in enumerate(zip((6, 7), teachers, strict=True))]  # fmt: skip
    plain = _synth(method, teachers, stats, stacked=False, **kw)
    fast = _synth(method, teachers, stats, stacked=True, **kw)
    assert plain.class_targets is not None and fast.class_targets is not None
    for _ in range(2):
        a, b = plain.synthesize(), fast.synthesize()
        assert torch.equal(a.labels, b.labels)
        assert torch.allclose(a.images, b.images, atol=1e-3), (a.images - b.images).abs().max()
        assert a.stats["loss_bn"] == pytest.approx(b.stats["loss_bn"], rel=1e-3)
    # the per-class term differs from the global one on the same batch sequence
    glob = _synth(method, teachers, None, stacked=True, **kw)
    assert glob.class_targets is None
    assert glob.synthesize().stats["loss_bn"] != pytest.approx(
        _synth(method, teachers, stats, stacked=True, **kw).synthesize().stats["loss_bn"]
    )


def test_parallel_group_batches_have_their_per_class_loss():
    # parallel cycling (one grouped problem per teacher, each with its own labels): the kept
    # batch of each teacher has the loss the group reported, recomputed with plain hooks
    teachers = [_warmed(s) for s in (6, 7)]
    stats = [_fake_stats(t, s, COUNTS[i].tolist()) for i, (s, t) in enumerate(zip((6, 7), teachers, strict=True))]  # fmt: skip
    synth = _synth("deepinversion", teachers, stats, mode="cycling", parallel=True,
                   grouped=True, jitter=0, flip=False)  # fmt: skip
    assert synth.stacked is not None
    for t in range(2):
        batch = synth.synthesize()
        model, targets = teachers[t], synth.class_targets[t]
        with BNFeatureHooks(model, class_targets=targets) as bn, torch.no_grad():
            bn.set_classes(batch.labels, class_weights(batch.labels, K))
            ce = nn.functional.cross_entropy(model(batch.images), batch.labels)
            loss = ce + synth.cfg.bn_scale * bn.loss()
            loss = loss + synth.cfg.var_scale * total_variation(batch.images)
        assert loss.item() == pytest.approx(batch.stats["best_loss"], rel=1e-4)


def test_fast_meta_generator_tracks_per_class_statistics_and_resumes():
    teachers = [_warmed(s) for s in (8, 9)]
    stats = [_fake_stats(t, s, COUNTS[i].tolist()) for i, (s, t) in enumerate(zip((8, 9), teachers, strict=True))]  # fmt: skip
    a = _synth("fast", teachers, stats, bn_momentum=0.5, target="cycling")
    a.synthesize()
    a.synthesize()
    state = a.state_dict()
    assert len(state["tracked"][0][0]) == 3  # (mean, var, seen) per layer
    b = _synth("fast", teachers, stats, bn_momentum=0.5, target="cycling")
    b.load_state_dict(state)
    assert torch.equal(a.synthesize().images, b.synthesize().images)


@pytest.mark.accuracy
def test_matching_class_statistics_brings_each_class_closer_to_them(digits):
    # Images inverted against per-class targets (real digits' statistics) end up nearer those
    # targets, class by class, than images inverted against the global statistics (same
    # teacher, seed and budget).
    teacher = _warmed(10)
    norm = Normalizer(digits.info.mean, digits.info.std)
    stats = compute_class_stats(teacher, digits.train_x, digits.train_y, norm, K)
    counts = stats["counts"].numpy()[None]
    targets = class_targets(teacher, stats, 50)

    def distance(class_stats) -> float:
        cfg = synthesis_options(batch_size=40, iterations=60, lr=0.1, bn_scale=3.0, jitter=0)
        synth = build_synthesizer(cfg, [teacher], counts, (1, 8, 8), norm, False, "cpu", seed=0,
                                  class_stats=class_stats)  # fmt: skip
        batch = synth.synthesize()
        with BNFeatureHooks(teacher, class_targets=targets) as h, torch.no_grad():
            h.set_classes(batch.labels, class_weights(batch.labels, K))
            teacher(batch.images)
            return h.loss().item()

    # measured 0.05 against 1.06 (seed 0, 1 and 2 threads): a 3x margin leaves plenty of room
    assert distance([stats]) < 0.3 * distance(None)


def test_train_teachers_uploads_statistics_and_the_server_uses_them(cli, tmp_path, capsys):
    from conftest import FAST_TRAIN

    run = [f"run_dir={tmp_path}", *FAST_TRAIN, "train.epochs=1"]
    assert cli("split", "dataset=digits", "split=iid", "split.num_clients=2", f"run_dir={tmp_path}")[0] == 0  # fmt: skip
    assert cli("train-teachers", *run)[0] == 0
    files = [tmp_path / "teachers" / f"class_stats_{i}.safetensors" for i in range(2)]
    assert all(f.is_file() for f in files)
    m = json.loads((tmp_path / "teachers" / "metrics_teacher_0.json").read_text())
    assert m["class_stats_s"] > 0
    stats = read_weights(files[0])
    split = json.loads((tmp_path / "split.json").read_text())
    assert stats["counts"].tolist() == split["clients"][0]["train_class_counts"]
    student = [*run, "synthesis.iterations=3", "synthesis.batch_size=16", "student.epochs=1",
               "student.initial_batches=1", "student.steps_per_epoch=1"]  # fmt: skip
    code, out, err = cli("generate-initial", *student)
    assert code == 0, err and "no class statistics" not in out
    # turned off: the files go, and synthesis says it falls back to global statistics
    assert cli("train-teachers", *run, "upload.class_stats=false")[0] == 0
    assert not any(f.exists() for f in files)
    code, out, err = cli("generate-initial", *student, "force=true")
    assert code == 0, err
    assert "no class statistics for teacher(s) [0, 1]" in out
    # back on: already-trained teachers get their statistics without retraining
    code, out, _ = cli("train-teachers", *run)
    assert code == 0 and "already trained" in out and all(f.is_file() for f in files)


def test_a_corrupt_statistics_file_is_one_error_line(cli, tmp_path):
    from conftest import FAST_TRAIN

    run = [f"run_dir={tmp_path}", *FAST_TRAIN, "train.epochs=1"]
    assert cli("split", "dataset=digits", "split=iid", "split.num_clients=2", f"run_dir={tmp_path}")[0] == 0  # fmt: skip
    assert cli("train-teachers", *run)[0] == 0
    path = tmp_path / "teachers" / "class_stats_1.safetensors"
    stats = read_weights(path)
    stats["bn.0.var"][0, 0] = -1.0
    save_weights(stats, path)
    before = {p: p.read_bytes() for p in (tmp_path / "teachers").iterdir()}
    code, _, err = cli(
        "generate-initial", *run, "synthesis.iterations=2", "student.initial_batches=1"
    )
    assert code == 1 and "class_stats_1" in err and "negative" in err
    assert len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in (tmp_path / "teachers").iterdir()} == before


def test_student_init_fedavg_starts_from_the_averaged_teachers(cli, tmp_path):
    from conftest import FAST_TRAIN

    run = [f"run_dir={tmp_path}", *FAST_TRAIN, "synthesis.iterations=2", "synthesis.batch_size=16",
           "student.epochs=1", "student.initial_batches=1", "student.steps_per_epoch=1"]  # fmt: skip
    args = ["oneshot", "dataset=digits", "split=iid", "split.num_clients=2", *run]
    # no training step at all (no new batch, no pool step): the student is one-shot FedAvg
    code, _, err = cli(*args, "student.init=fedavg", "student.new_batches_per_epoch=0",
                       "student.steps_per_epoch=0")  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["student_acc"] == r["fedavg_acc"]
    code, _, err = cli(*args, "student.init=fedavg", "student.model=resnet8", "force=true")
    assert code == 1 and "student.init=fedavg needs the teachers' architecture" in err
    assert len(err.strip().splitlines()) == 1


def test_synthesis_benchmark_runs_each_synthesizer_with_and_without_statistics(benchmark_module):
    bench = benchmark_module("synthesis")
    got = bench.variants(["adi", "public"], "both")
    assert got == [
        ("adi", "adi", []),
        ("adi/global", "adi", ["synthesis.class_stats=false"]),
        ("public", "public", []),
    ]
    assert [v[0] for v in bench.variants(["generator"], "off")] == ["generator/global"]
