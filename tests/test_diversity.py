"""synthesis.div_scale: the uniformity term over a batch's teacher features and a bank of the
teacher's earlier images (synthesis/diversity.py), by hand and inside DeepInversion."""

import math

import pytest
import torch
import torch.nn.functional as F
from tests.test_synthesis import _cfg, _make, digits_setup  # noqa: F401 - the module fixture

from fed_distill.errors import ConfigError
from fed_distill.synthesis import synthesis_options
from fed_distill.synthesis.diversity import UNIFORMITY_T, FeatureBank, uniformity_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _by_hand(f, y, bank=None) -> float:
    f = F.normalize(f, dim=1)
    others, other_y = (f, y) if bank is None else (torch.cat([f, bank[0]]), torch.cat([y, bank[1]]))
    rows = []
    for i in range(len(f)):
        terms = [
            math.exp(-UNIFORMITY_T * float((f[i] - others[j]).square().sum()))
            for j in range(len(others))
            if j != i and other_y[j] == y[i]
        ]
        if terms:
            rows.append(math.log(sum(terms) / len(terms)))
    return sum(rows) / len(rows)


def test_uniformity_loss_by_hand():
    torch.manual_seed(0)
    f, y = torch.randn(6, 5), torch.tensor([0, 1, 0, 2, 1, 0])  # class 2 has no partner here
    bank = (F.normalize(torch.randn(4, 5), dim=1), torch.tensor([2, 2, 1, 3]))
    assert uniformity_loss(f, y) == pytest.approx(_by_hand(f, y), abs=1e-5)
    assert uniformity_loss(f, y, bank) == pytest.approx(_by_hand(f, y, bank), abs=1e-5)
    # identical features: every distance 0, the maximum 0; spread ones are lower
    zeros = torch.zeros(4, dtype=torch.long)
    assert uniformity_loss(torch.ones(4, 3), zeros) == pytest.approx(0.0, abs=1e-6)
    assert uniformity_loss(torch.eye(3), zeros[:3]) == pytest.approx(-2 * UNIFORMITY_T, abs=1e-5)
    # only pairs of one class count: orthogonal images of different classes change nothing
    assert float(uniformity_loss(torch.eye(3), torch.arange(3))) == 0.0


def test_uniformity_gradient_spreads_features():
    torch.manual_seed(1)
    f = (torch.ones(8, 4) + 0.05 * torch.randn(8, 4)).requires_grad_(True)
    y = torch.zeros(8, dtype=torch.long)
    opt = torch.optim.SGD([f], lr=0.5)
    start = uniformity_loss(f, y).item()
    for _ in range(50):
        opt.zero_grad()
        uniformity_loss(f, y).backward()
        opt.step()
    assert uniformity_loss(f, y).item() < start - 1.0


def test_feature_bank_keeps_the_last_images_normalised():
    bank = FeatureBank(num_teachers=2, size=5)
    bank.add(0, 3 * torch.ones(3, 4), torch.tensor([1, 2, 3]))
    bank.add(0, torch.arange(16.0).reshape(4, 4), torch.tensor([4, 5, 6, 7]))
    kept = bank.get(0)
    assert kept is not None and bank.get(1) is None
    assert kept[0].shape == (5, 4) and kept[1].tolist() == [3, 4, 5, 6, 7]
    assert torch.allclose(kept[0].norm(dim=1), torch.ones(5))
    assert torch.allclose(kept[0][-1], F.normalize(torch.tensor([12.0, 13, 14, 15]), dim=0))
    again = FeatureBank(num_teachers=2, size=5)
    again.load_state_dict(bank.state_dict())
    restored = again.get(0)
    assert restored is not None and again.get(1) is None
    assert torch.equal(restored[0], kept[0]) and torch.equal(restored[1], kept[1])


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(div_scale=1.0, mode="ensemble"), "div_scale applies to mode=cycling"),
        (dict(div_scale=1.0, mode="cycling", parallel=True), "div_scale applies"),
        (dict(div_scale=-1.0), "div_scale must be >= 0"),
        (dict(div_bank=-3), "div_bank must be an integer >= 0"),
    ],
)
def test_bad_diversity_settings_are_one_line(kw, message):
    with pytest.raises(ConfigError, match=message):
        synthesis_options(**kw).validate()


def _features(teacher, x: torch.Tensor) -> torch.Tensor:
    out = {}
    head = [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)][-1]
    handle = head.register_forward_pre_hook(lambda _m, inp: out.setdefault("f", inp[0]))
    with torch.no_grad():
        teacher(x)
    handle.remove()
    return F.normalize(out["f"].flatten(1), dim=1)


def test_diversity_term_spreads_a_teachers_batches(digits_setup):  # noqa: F811
    """Two batches of one teacher: with the term their features are more spread (lower
    uniformity) than without, at the same seed, and the teacher still recognises them."""
    teachers, _, _ = digits_setup
    spread = {}
    for scale in (0.0, 1.0):
        synth = _make(digits_setup, _cfg(iterations=40, div_scale=scale), n=1)
        batches = [synth.synthesize(), synth.synthesize()]
        x = torch.cat([b.images for b in batches])
        y = torch.cat([b.labels for b in batches])
        spread[scale] = uniformity_loss(_features(teachers[0], x), y).item()
        with torch.no_grad():
            acc = (teachers[0](x).argmax(1) == y).float().mean().item()
        assert acc > 0.75, (scale, acc)  # measured 1.00 without the term, 0.92 with
        assert ("loss_div" in batches[1].stats) == (scale > 0)
    bank = synth.bank
    kept = bank.get(0) if bank is not None else None
    assert kept is not None and kept[0].shape[0] == 64
    assert spread[1.0] < spread[0.0] - 0.2, spread  # measured -0.73 against -0.29


def test_resumed_synthesizer_continues_with_its_bank(digits_setup):  # noqa: F811
    cfg = _cfg(iterations=10, div_scale=1.0)
    first = _make(digits_setup, cfg, n=2)
    first.synthesize()
    first.synthesize()
    state = first.state_dict()
    assert set(state["feature_bank"]) == {"0.features", "0.labels", "1.features", "1.labels"}
    second = _make(digits_setup, cfg, n=2, seed=5)
    second.load_state_dict(state)
    assert torch.equal(first.synthesize().images, second.synthesize().images)
