"""FedMD's consensus rules (fedmd_consensus.py): hand-computed values on tiny tensors, what
parties send and how the server checks it, the consensus's accuracy, the held-out images, and
the rules on real small data (the quick preset)."""

import json
import math

import pytest
import torch

from conftest import FEDMD_DIGITS_POOL, FEDMD_TINY
from fed_distill.api import compose
from fed_distill.cli import main
from fed_distill.conf import preset_names
from fed_distill.errors import ConfigError, ProtocolError
from fed_distill.federated.config import FedMDConfig, check_fedmd_config
from fed_distill.federated.fedmd_consensus import (
    aggregate,
    confidence_weights,
    list_rules,
    sharpen,
)
from fed_distill.federated.fedmd_data import build_fedmd_data
from fed_distill.federated.fedmd_run import branch_rounds, setup_run
from fed_distill.federated.fedmd_server import (
    collect_scores,
    consensus_accuracy,
    oracle_corrected,
    validate_report,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------- the rules
def test_confidence_weighs_each_sample_by_the_partys_certainty():
    a = t([[0.5, 0.5], [0.8, 0.2], [0.9, 0.1]])
    b = t([[1.0, 0.0], [0.2, 0.8], [0.6, 0.4]])
    w = confidence_weights(torch.stack([a, b]))
    assert w[0, 0].item() == pytest.approx(1e-6) and w[1, 0].item() == pytest.approx(1.0)
    # by hand: 1 - H/ln 2 = 0.531004 (0.9 / 0.1) and 0.029049 (0.6 / 0.4)
    assert w[:, 2].tolist() == pytest.approx([0.531004, 0.029049], abs=1e-5)
    c = aggregate([a, b], "confidence", kind="softmax")
    assert c[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-5)  # the unsure party is ignored
    assert c[1].tolist() == pytest.approx([0.5, 0.5])  # equally sure: the mean
    assert c[2, 0].item() == pytest.approx(0.884439, abs=1e-5)
    # logits: weights from softmax(logits / T), applied to the logits themselves
    z = aggregate([t([[0.0, 0.0]]), t([[2.0, 0.0]])], "confidence", kind="logits", temperature=1)
    wb = 1 - (
        -(torch.tensor([2.0, 0.0]).softmax(0) * torch.tensor([2.0, 0.0]).log_softmax(0)).sum()
        / math.log(2)
    )
    assert z[0, 0].item() == pytest.approx(2 * wb.item() / (wb.item() + 1e-6), abs=1e-5)


def test_class_share_weighs_each_class_by_the_partys_share_of_it():
    counts = t([[0, 3, 1], [0, 1, 3]])  # output 0 is a public class nobody holds privately
    a, b = t([[1.0, 2.0, 4.0]]), t([[3.0, 6.0, 0.0]])
    c = aggregate([a, b], "class_share", kind="logits", class_counts=counts)
    assert c[0].tolist() == pytest.approx([2.0, 3.0, 1.0])  # (.5,.5), (.75,.25), (.25,.75)
    pa, pb = t([[0.2, 0.6, 0.2]]), t([[0.2, 0.2, 0.6]])
    p = aggregate([pa, pb], "class_share", kind="softmax", class_counts=counts)
    assert p[0].tolist() == pytest.approx([1 / 6, 5 / 12, 5 / 12])  # 0.2, 0.5, 0.5 renormalised
    # every party holding as much of every class: the mean
    even = aggregate([a, b], "class_share", class_counts=t([[0, 2, 2], [0, 2, 2]]))
    assert torch.allclose(even, aggregate([a, b], "mean"))
    with pytest.raises(ProtocolError, match="class counts"):
        aggregate([a, b], "class_share")


def test_reliability_weighs_each_party_and_sharpen_divides_log_probabilities():
    a, b = t([[4.0, 0.0]]), t([[0.0, 4.0]])
    assert aggregate([a, b], "reliability", reliability=t([0.75, 0.25])).tolist() == [[3.0, 1.0]]
    assert aggregate([a, b], "reliability", reliability=t([0.0, 0.0])).tolist() == [[2.0, 2.0]]
    assert sharpen(t([[2.0, -1.0]]), 0.5, "logits").tolist() == [[4.0, -2.0]]
    p = sharpen(t([[0.8, 0.2]]), 0.5, "softmax")
    assert p[0].tolist() == pytest.approx([0.64 / 0.68, 0.04 / 0.68])
    same = t([[0.8, 0.2]])
    assert sharpen(same, 1.0, "softmax") is same
    # applied after the rule
    assert aggregate([a, b], "mean", sharpen_t=0.5).tolist() == [[4.0, 4.0]]


def test_config_checks_name_the_rule_and_sharpen():
    base = FedMDConfig()
    check_fedmd_config(base)
    for kwargs, match in (
        ({"aggregate": "vote"}, "fedmd.aggregate must be one of " + ", ".join(list_rules())),
        ({"sharpen": 0.0}, "fedmd.sharpen must be a finite number > 0"),
        ({"sharpen": float("nan")}, "fedmd.sharpen must be a finite number > 0"),
        ({"aggregate": "reliability"}, "needs fedmd.reliability_holdout >= 1"),
        ({"reliability_holdout": -1}, "fedmd.reliability_holdout must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            check_fedmd_config(FedMDConfig(**kwargs))
    check_fedmd_config(FedMDConfig(aggregate="reliability", reliability_holdout=1))


# ----------------------------------------------------------------------------- what parties send
def test_what_a_party_sends_is_checked_and_a_bad_value_names_it():
    scores = torch.zeros(4, 3)
    ok = validate_report(
        {"scores": scores, "reliability": t([0.5]), "class_counts": t([0, 2, 1])},
        (4, 3),
        "party 2 (fedmd_4)",
        ("reliability", "class_counts"),
    )
    assert ok["reliability"].tolist() == [0.5] and ok["class_counts"].tolist() == [0, 2, 1]
    bad = [
        ({"reliability": t([float("nan")])}, "reliability is not finite"),
        ({"reliability": t([1.5])}, "reliability must be one number in [0, 1], got [1.5]"),
        ({"reliability": t([-0.1])}, "reliability must be one number in [0, 1]"),
        ({"reliability": t([0.5, 0.5])}, "reliability must be one number"),
        ({}, "the message lacks 'reliability'"),
        ({"reliability": torch.tensor([1])}, "reliability must be a float tensor"),
    ]
    for extra, match in bad:
        with pytest.raises(ProtocolError) as e:
            validate_report(
                {"scores": scores, **extra}, (4, 3), "party 2 (fedmd_4)", ("reliability",)
            )
        assert str(e.value).startswith("party 2 (fedmd_4): ") and match in str(e.value)
    for counts, match in (
        (t([0, -1, 3]), "whole numbers >= 0"),
        (t([0, 1.5, 3]), "whole numbers >= 0"),
        (t([0, 0, 0]), "some > 0"),
        (t([1, 2]), "class_counts have shape (2,), expected (3,)"),
    ):
        with pytest.raises(ProtocolError, match=match.replace("(", r"\(").replace(")", r"\)")):
            validate_report(
                {"scores": scores, "class_counts": counts}, (4, 3), 1, ("class_counts",)
            )
    # a refused upload leaves the party out of the round (skip) or stops the run (error)
    msgs = [
        {"scores": scores, "reliability": t([0.9])},
        {"scores": scores, "reliability": t([2.0])},
    ]
    valid, used, left = collect_scores(msgs, (4, 3), ["a", "b"], "skip", ("reliability",))
    assert used == [0] and left[0]["party"] == 1 and left[0]["reason"].startswith("b: reliability")
    with pytest.raises(ProtocolError, match="^b: reliability"):
        collect_scores(msgs, (4, 3), ["a", "b"], "error", ("reliability",))


def test_consensus_accuracy_scores_each_image_over_its_own_tasks_outputs():
    consensus = t([[1, 0, 9, 9], [0, 0, 1, 2], [0, 0, 0, 1], [5, 0, 0, 0]])
    true_y = torch.tensor([0, 3, 2, -1])  # -1: unknown to the benchmark, not counted
    assert consensus_accuracy(consensus, true_y, [(0, 2), (2, 2)]) == pytest.approx(2 / 3)
    assert consensus_accuracy(consensus, true_y, [(2, 2)]) == pytest.approx(1 / 2)
    assert consensus_accuracy(consensus, torch.tensor([-1] * 4), [(0, 2)]) is None


def test_oracle_consensus_swaps_only_the_wrong_rows_scores():
    consensus = t([[1, 0, 9, 8], [0, 0, 1, 2], [0, 0, 3, 1], [5, 0, 0, 0]])
    true_y = torch.tensor([1, 3, 3, -1])  # row 1 right, rows 0 and 2 wrong, row 3 unknown
    fixed = oracle_corrected(consensus, true_y, [(0, 2), (2, 2)])
    assert fixed.tolist() == [[0, 1, 9, 8], [0, 0, 1, 2], [0, 0, 1, 3], [5, 0, 0, 0]]
    assert consensus_accuracy(fixed, true_y, [(0, 2), (2, 2)]) == 1.0
    assert consensus[0, 0].item() == 1  # the rule's consensus is left as it was


# ----------------------------------------------------------------------------- data
DIGITS = FEDMD_DIGITS_POOL


def test_true_public_labels_and_held_out_images():
    plain = build_fedmd_data(FedMDConfig(**DIGITS), num_parties=4, seed=0)
    unl = plain.public_y < 0
    assert torch.equal(plain.public_true_y[~unl], plain.public_y[~unl])
    assert set(plain.public_true_y[unl].tolist()) == {5, 6, 7, 8, 9}  # private outputs
    held = build_fedmd_data(FedMDConfig(**DIGITS, reliability_holdout=2), num_parties=4, seed=0)
    assert held.summary()["holdout_per_party"] == [2] * 4 and plain.holdout_y == []
    for p in range(4):
        assert len(held.private_y[p]) == 13
        mine = {x.numpy().tobytes() for x in plain.private_x[p]}
        kept = {x.numpy().tobytes() for x in held.private_x[p]}
        out = {x.numpy().tobytes() for x in held.holdout_x[p]}
        assert kept | out == mine and not kept & out
        assert held.party_info[p]["num_samples"] == 13
    assert torch.equal(held.public_x, plain.public_x) and torch.equal(held.test_y, plain.test_y)
    with pytest.raises(ConfigError, match="reliability_holdout=15 leaves party 0 nothing"):
        build_fedmd_data(FedMDConfig(**DIGITS, reliability_holdout=15), num_parties=4, seed=0)


def test_skewed_preset_is_the_default_one_dealt_by_dirichlet():
    base = compose("fedmd", [])
    skewed = compose("fedmd", ["fedmd=fashion_unlabelled_pool_skewed"])
    a, b = dict(base.fedmd), dict(skewed.fedmd)
    assert {k for k in a if a[k] != b[k]} == {"name", "partition"}
    assert b["partition"] == "dirichlet" and skewed.split.alpha == 0.5
    assert (
        compose("fedmd", ["fedmd=fashion_unlabelled_pool_skewed", "split.alpha=0.1"]).split.alpha
        == 0.1
    )


PAPER_ROUNDS = {
    "scores": "logits",
    "aggregate": "mean",
    "digest_loss": "mae",
    "revisit_outputs": "all",
    "final_revisit": True,
}
POOL_ROUNDS = {
    "scores": "softmax",
    "aggregate": "confidence",
    "digest_loss": "kl",
    "revisit_outputs": "held",
    "final_revisit": False,
}


POOL_PRESETS = {"fashion_unlabelled_pool", "fashion_unlabelled_pool_skewed"}


@pytest.mark.parametrize("preset", preset_names("fedmd"))
def test_the_paper_presets_keep_the_papers_rounds(preset):
    """The default preset and its skewed variant run issue 41's rounds; every other preset,
    shipped now or later, the paper's (the schema's defaults)."""
    rounds = POOL_ROUNDS if preset in POOL_PRESETS else PAPER_ROUNDS
    c = compose("fedmd", [f"fedmd={preset}"]).fedmd
    assert {k: c[k] for k in rounds} == rounds
    assert compose("fedmd", []).fedmd.name == "fashion_unlabelled_pool"
    assert set(preset_names("fedmd")) >= POOL_PRESETS


# ----------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_rules_branch_from_one_setup_as_full_runs_do(tmp_path):
    """A rule's rounds from a shared setup equal the full run; on the balanced quick parties
    class_share is the mean; consensus_acc is one fraction per round."""
    rule = ["fedmd.aggregate=class_share", "fedmd.sharpen=0.5"]
    assert main(["fedmd", *FEDMD_TINY, *rule, f"run_dir={tmp_path / 'full'}"]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    base = setup_run(compose("fedmd", [*FEDMD_TINY, f"run_dir={tmp_path / 'mean'}"]))
    mean = branch_rounds(base, compose("fedmd", [*FEDMD_TINY, f"run_dir={tmp_path / 'mean'}"]))
    share = compose(
        "fedmd", [*FEDMD_TINY, "fedmd.aggregate=class_share", f"run_dir={tmp_path / 's'}"]
    )
    branched = branch_rounds(
        base, compose("fedmd", [*FEDMD_TINY, *rule, f"run_dir={tmp_path / 'b'}"])
    )
    for key in ("party_acc", "consensus_acc", "consensus_distance", "alone_extended_acc"):
        assert branched[key] == full[key], key
    assert branched["fingerprint"] == full["fingerprint"]
    assert len(full["consensus_acc"]) == 2 and all(0 <= v <= 1 for v in full["consensus_acc"])
    assert full["consensus_private_acc"] == [None, None]  # quick's public data: digits 0-4 only
    same = branch_rounds(base, share)
    assert same["consensus_acc"] == pytest.approx(mean["consensus_acc"], abs=0.01)
    assert same["mean_acc"] == pytest.approx(mean["mean_acc"], abs=0.01)
    oracle = compose(
        "fedmd", [*FEDMD_TINY, "fedmd.oracle_consensus=true", f"run_dir={tmp_path / 'o'}"]
    )
    assert branch_rounds(base, oracle)["consensus_acc"] == [1.0, 1.0]
    with pytest.raises(ConfigError, match="differ in more than the rounds"):
        branch_rounds(base, compose("fedmd", [*FEDMD_TINY, "fedmd.revisit_epochs=3"]))


@pytest.mark.slow
def test_reliability_runs_on_held_out_images(tmp_path):
    args = [*FEDMD_TINY, "fedmd.aggregate=reliability", "fedmd.reliability_holdout=2"]
    assert main(["fedmd", *args, "fedmd.rounds=1", f"run_dir={tmp_path}"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert (
        r["data"]["holdout_per_party"] == [2, 2, 2] and r["data"]["private_per_party"] == [13] * 3
    )
    assert len(r["consensus_acc"]) == 1 and r["left_out"] == [[]]
