"""student.mix: cutmix / mixup of the student's pool batches (relabelled by the teachers)."""

from __future__ import annotations

import pytest
import torch

from fed_distill.errors import ConfigError
from fed_distill.train.student import mix_batch
from fed_distill.train.student_config import StudentConfig


def _batch() -> torch.Tensor:
    return torch.arange(4 * 1 * 6 * 6, dtype=torch.float32).view(4, 1, 6, 6)


def test_cutmix_pastes_one_box_of_a_partner_image():
    x = _batch()
    for seed in range(20):
        out = mix_batch(x, "cutmix", 1.0, torch.Generator().manual_seed(seed))
        changed = (out != x).any(dim=0)[0]  # (H, W) pixels changed in some image
        if not changed.any():
            continue  # an empty box or the identity pairing
        rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
        box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()  # one rectangle
        # every image's box holds another image's pixels of the same place
        for i in range(4):
            patch = out[i, 0][changed]
            assert any(torch.equal(patch, x[j, 0][changed]) for j in range(4))


def test_mixup_blends_pairs_and_prob_zero_keeps_the_batch():
    x = torch.randn(6, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    out = mix_batch(x, "mixup", 1.0, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same draws, in the function's order
    lam = float(torch.rand(4, generator=g)[1])
    perm = torch.randperm(6, generator=g)
    assert torch.allclose(out, lam * x + (1 - lam) * x[perm])
    assert not torch.equal(out, x)
    assert torch.equal(mix_batch(x, "cutmix", 0.0, torch.Generator().manual_seed(1)), x)


def test_mix_is_reproducible_from_the_generator():
    x = torch.randn(8, 1, 10, 10)
    a = mix_batch(x, "cutmix", 0.7, torch.Generator().manual_seed(3))
    b = mix_batch(x, "cutmix", 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"mix": "cutout"}, "student.mix must be one of none, cutmix, mixup"),
        ({"mix_prob": 1.5}, "student.mix_prob must be in"),
        ({"mix_prob": True}, "student.mix_prob must be in"),
    ],
)
def test_bad_mix_values_are_one_line(kw, message):
    with pytest.raises(ConfigError, match=message):
        StudentConfig(**kw).validate()
