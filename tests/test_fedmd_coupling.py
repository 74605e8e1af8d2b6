"""The ``coupling`` consensus rule (federated/rules/coupling.py): each party read only on the
classes it holds; a consistent set of such views gives back the one distribution behind them,
what a party says about classes it does not hold changes nothing, balanced parties give the
mean, and the rule on a real run."""

import json

import pytest
import torch

from conftest import FEDMD_TINY
from fed_distill.api import compose
from fed_distill.cli import main
from fed_distill.errors import ConfigError, ProtocolError
from fed_distill.federated.fedmd_consensus import aggregate
from fed_distill.federated.fedmd_run import branch_rounds, setup_run
from fed_distill.federated.rules.coupling import couple, held_sets

pytestmark = pytest.mark.usefixtures("one_thread")


def _skewed_views(seed: int, parties: int = 10, n: int = 200):
    """A true q over 5 public and 5 private outputs; each party holds 2-4 private classes and
    reports q given its own classes, with 30 % of its mass on random other outputs."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(2 * torch.randn(n, 10, generator=g), -1)
    counts = torch.zeros(parties, 10)
    for p in range(parties):
        k = int(torch.randint(2, 5, (1,), generator=g))
        counts[p, 5 + torch.randperm(5, generator=g)[:k]] = 7.0
    held = held_sets(counts)
    views = []
    for p in range(parties):
        own = q * held[p]
        junk = torch.rand(n, 10, generator=g) * ~held[p]
        views.append(
            0.7 * own / own.sum(-1, keepdim=True) + 0.3 * junk / junk.sum(-1, keepdim=True)
        )
    return q, counts, torch.stack(views)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_consistent_views_give_back_the_distribution_behind_them(seed):
    q, counts, views = _skewed_views(seed)
    out = aggregate(list(views), "coupling", kind="softmax", class_counts=counts)
    assert (out - q).abs().max() < 5e-3  # 200 iterations: <= 2e-3 on these seeds
    assert torch.allclose(out.sum(-1), torch.ones(len(q)))
    # class_share, reading the 30 % said about classes a party does not hold, does not
    share = aggregate(list(views), "class_share", kind="softmax", class_counts=counts)
    assert (share - q).abs().max() > 0.05


def test_what_a_party_says_of_classes_it_does_not_hold_changes_nothing():
    _, counts, views = _skewed_views(3)
    held = held_sets(counts)
    other = views.clone()
    other[~held[:, None, :].expand_as(views)] = torch.rand(int((~held).sum()) * views.shape[1])
    assert torch.allclose(couple(views, held), couple(other, held), atol=1e-5)


def test_parties_holding_every_class_give_the_mean():
    _, _, views = _skewed_views(4)
    counts = torch.full((views.shape[0], 10), 3.0)
    counts[:, :5] = 0  # the public outputs, which nobody holds privately
    out = aggregate(list(views), "coupling", kind="softmax", class_counts=counts)
    assert torch.allclose(out, views.mean(0), atol=1e-5)


def test_it_needs_softmax_scores_and_class_counts(cli, tmp_path):
    _, counts, views = _skewed_views(5)
    with pytest.raises(ConfigError, match="softmax"):
        aggregate(list(views), "coupling", kind="logits", class_counts=counts)
    with pytest.raises(ProtocolError, match="class counts"):
        aggregate(list(views), "coupling", kind="softmax")
    code, out, err = cli("fedmd", "fedmd=quick", "fedmd.aggregate=coupling", f"run_dir={tmp_path}")
    text = out + err
    assert code != 0 and "set fedmd.scores=softmax" in text and "Traceback" not in text
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    assert not any(tmp_path.iterdir())


TINY = [*FEDMD_TINY, "fedmd.scores=softmax"]


@pytest.mark.slow
def test_on_balanced_parties_a_run_is_the_means(tmp_path):
    """The quick preset's parties hold every private class alike: coupling's rounds are the
    mean's, and the full command runs it."""
    base = setup_run(compose("fedmd", [*TINY, f"run_dir={tmp_path / 'mean'}"]))
    mean = branch_rounds(base, compose("fedmd", [*TINY, f"run_dir={tmp_path / 'mean'}"]))
    rule = [*TINY, "fedmd.aggregate=coupling"]
    coupled = branch_rounds(base, compose("fedmd", [*rule, f"run_dir={tmp_path / 'c'}"]))
    assert coupled["consensus_acc"] == pytest.approx(mean["consensus_acc"], abs=0.01)
    assert coupled["mean_acc"] == pytest.approx(mean["mean_acc"], abs=0.01)
    assert main(["fedmd", *rule, "fedmd.rounds=1", f"run_dir={tmp_path / 'full'}"]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    assert (
        full["config"]["fedmd"]["aggregate"] == "coupling" and len(full["party_acc"][0]) == 2
    )  # round 0 and 1
