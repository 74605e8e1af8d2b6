"""Class-aware synthesis: labels drawn by the classes' holders (``label_mode=holders``) and the
pixel-statistics prior (``upload.pixels`` / ``synthesis.pixel_scale``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fed_distill.class_stats import check_class_stats, compute_class_stats
from fed_distill.data.sources import load_dataset
from fed_distill.data.transforms import Normalizer
from fed_distill.errors import ConfigError, ProtocolError
from fed_distill.models import build_model
from fed_distill.synthesis import build_synthesizer, synthesis_options
from fed_distill.synthesis.inputs import holder_label_probs, label_probs
from fed_distill.synthesis.pixels import pixel_term, pooled_pixel_targets

# the α = 0.5 Fashion-MNIST split of the main job (seed 0): client 4 holds 1 shirt, 0 coats
COUNTS = torch.tensor(
    [
        [113, 460, 249, 0, 726, 1191, 368, 1149, 5758, 270],
        [321, 2345, 266, 1697, 2704, 2703, 3808, 0, 0, 0],
        [645, 0, 701, 310, 1982, 1235, 1823, 3737, 161, 3588],
        [3907, 4, 902, 76, 588, 870, 0, 1114, 81, 2142],
        [1014, 3191, 3882, 3917, 0, 1, 1, 0, 0, 0],
    ]
)


def test_holder_labels_balance_classes_and_follow_the_holders():
    q = holder_label_probs(COUNTS)
    assert torch.allclose(q.sum(dim=1), torch.ones(5, dtype=q.dtype), atol=1e-6)
    assert torch.allclose(q.sum(dim=0), torch.full((10,), 0.5, dtype=q.dtype), atol=1e-4)
    assert (q[COUNTS == 0] == 0).all()  # nobody makes a class it never saw
    # client 4 saw 1 shirt: it makes almost none (uniform over its classes: 1/6 of its batch)
    assert q[4, 6] < 1e-3 < 1 / 6
    assert q[1, 6] == q[:, 6].max()  # the biggest shirt holder makes the most shirts
    # all teachers together: every class equally often; one teacher: its row
    assert torch.allclose(label_probs(COUNTS, "holders"), torch.full((10,), 0.1), atol=1e-4)
    assert torch.allclose(label_probs(COUNTS, "holders", [2]), q[2].float())
    uniform = label_probs(COUNTS, "uniform", [4])
    assert uniform[6] == pytest.approx(1 / 6)


def test_holder_labels_with_an_infeasible_table_stay_distributions():
    counts = torch.tensor([[100, 100, 100, 0], [0, 0, 1, 100]])  # teacher 0 alone holds 3 of 4
    q = holder_label_probs(counts)
    assert torch.allclose(q.sum(dim=1), torch.ones(2, dtype=q.dtype), atol=1e-6)
    assert (q >= 0).all() and q[0, 3] == 0 and q[1, 0] == 0


def test_pixel_term_by_hand_and_per_batch_of_a_group():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 4, 4, generator=g), torch.tensor([0, 0, 1, 1, 1, 2])
    mu, var = torch.randn(3, 16, generator=g), torch.rand(3, 16, generator=g)
    want = 0.0
    for k in range(3):
        xs = x[y == k].flatten(1)
        rms_m = (xs.mean(0) - mu[k]).square().mean().sqrt()
        rms_v = (xs.var(0, unbiased=False) - var[k]).square().mean().sqrt()
        want += float((y == k).float().mean()) * float(rms_m + rms_v)
    assert float(pixel_term(x, y, mu, var)) == pytest.approx(want, rel=1e-5)
    group = pixel_term(torch.stack([x, 2 * x]), torch.stack([y, y]), mu, var)
    assert group.shape == (2,)
    assert float(group[1]) == pytest.approx(float(pixel_term(2 * x, y, mu, var)), rel=1e-6)


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return ds, Normalizer(ds.info.mean, ds.info.std)


def test_client_pixel_statistics_and_their_pooling(digits):
    ds, norm = digits
    model = build_model("cnn_small", 10, 1, 8, width=4).eval()
    halves = [slice(0, 700), slice(700, None)]
    stats = [
        compute_class_stats(model, ds.train_x[h], ds.train_y[h], norm, 10, pixels=True)
        for h in halves
    ]
    x, y = norm(ds.train_x).flatten(1), ds.train_y
    for k in (0, 7):
        xs = x[:700][y[:700] == k]
        assert torch.allclose(stats[0]["pixel.mean"][k], xs.mean(0), atol=1e-5)
        assert torch.allclose(stats[0]["pixel.var"][k], xs.var(0, unbiased=False), atol=1e-4)
    mean, var = pooled_pixel_targets(stats, 64)  # both clients: the statistics of all images
    for k in (3, 9):
        xs = x[y == k]
        assert torch.allclose(mean[k], xs.mean(0), atol=1e-5)
        assert torch.allclose(var[k], xs.var(0, unbiased=False), atol=1e-4)
    check_class_stats(stats[0], model, 10, "client 0")  # accepted as uploaded
    with pytest.raises(ConfigError, match="64 values per class, the images 784"):
        pooled_pixel_targets(stats, 784)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["pixel.var"].__setitem__((0, 0), -1.0), "negative"),
        (lambda s: s["pixel.mean"].__setitem__((1, 2), float("nan")), "NaN"),
        (lambda s: s.__setitem__("pixel.var", s["pixel.var"][:, :10]), "shape"),
        (lambda s: s.pop("pixel.var"), "missing"),
    ],
)
def test_bad_pixel_statistics_are_refused_with_the_client_named(digits, change, message):
    ds, norm = digits
    model = build_model("cnn_small", 10, 1, 8, width=4).eval()
    stats = compute_class_stats(model, ds.train_x[:300], ds.train_y[:300], norm, 10, pixels=True)
    change(stats)
    with pytest.raises(ProtocolError, match=f"client 2.*{message}|{message}.*client 2"):
        check_class_stats(stats, model, 10, "client 2")


def _teacher(ds, norm) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("cnn_small", 10, 1, 8, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = norm(ds.train_x), ds.train_y
    model.train()
    for _ in range(3):
        for idx in torch.randperm(len(y)).split(32):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_pixel_prior_pulls_each_class_towards_its_statistics(digits):
    """Against the same synthesis without the term (same seed): the images of each class end
    nearer the clients' per-class pixel statistics."""
    ds, norm = digits
    teacher = _teacher(ds, norm)
    stats = [compute_class_stats(teacher, ds.train_x, ds.train_y, norm, 10, pixels=True)]
    counts = stats[0]["counts"][None].numpy()
    mean, var = pooled_pixel_targets(stats, 64)

    def term(scale: float) -> float:
        cfg = synthesis_options(
            batch_size=60, iterations=40, lr=0.1, bn_scale=1.0, pixel_scale=scale
        )
        synth = build_synthesizer(
            cfg, [teacher], counts, (1, 8, 8), norm, False, "cpu", 0, class_stats=stats
        )
        batch = synth.synthesize()
        return float(pixel_term(batch.images, batch.labels, mean, var))

    without, with_prior = term(0.0), term(10.0)
    assert with_prior < 0.7 * without, (with_prior, without)


def test_pixel_prior_without_the_clients_statistics_is_one_line(digits):
    ds, norm = digits
    teacher = build_model("cnn_small", 10, 1, 8, width=4).eval()
    stats = [compute_class_stats(teacher, ds.train_x, ds.train_y, norm, 10)]  # no pixels
    cfg = synthesis_options(batch_size=8, iterations=1, pixel_scale=1.0)
    with pytest.raises(ConfigError, match="upload.pixels=true"):
        build_synthesizer(
            cfg,
            [teacher],
            stats[0]["counts"][None].numpy(),
            (1, 8, 8),
            norm,
            False,
            "cpu",
            0,
            class_stats=stats,
        )
    with pytest.raises(ConfigError, match="pixel_scale must be >= 0"):
        synthesis_options(pixel_scale=-1.0).validate()


def test_competition_among_the_classes_a_teacher_knows(digits):
    """comp_known: teacher t's competition with the student is the JS divergence term of both
    softmaxes masked to the classes t holds class_stats_min images of, on the plain and the
    grouped (parallel) path alike."""
    from fed_distill.synthesis.losses import competition_loss, masked_logits

    ds, norm = digits
    teacher = _teacher(ds, norm)
    student = build_model("cnn_small", 10, 1, 8, width=4).eval()
    counts = torch.tensor([[100, 100, 100, 10, 0, 0, 0, 0, 0, 0]] * 2).numpy()
    g = torch.Generator().manual_seed(0)
    logits, s_logits = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    known = torch.tensor([True] * 3 + [False] * 7)  # 10 images of class 3 < class_stats_min 50
    want = competition_loss(masked_logits(logits, known), masked_logits(s_logits, known), 3.0)
    cfg = synthesis_options(batch_size=8, iterations=2, comp_known=True)
    synth = build_synthesizer(cfg, [teacher] * 2, counts, (1, 8, 8), norm, False, "cpu", 0)
    assert float(synth._comp(logits, s_logits, 1)) == pytest.approx(float(want), rel=1e-6)
    plain = float(competition_loss(logits, s_logits, 3.0))
    assert float(synthesis_options().comp_known) == 0 and plain != pytest.approx(float(want))
    batch = synth.synthesize(student)  # an adaptive batch runs with the term
    assert "loss_comp" in batch.stats
    with pytest.raises(ConfigError, match="comp_known applies to mode=cycling"):
        synthesis_options(mode="ensemble", comp_known=True).validate()
