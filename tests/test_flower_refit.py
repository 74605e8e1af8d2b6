"""The statistics round (refit=head) on Flower's simulation engine: one more message per
client, the same uploads and the same re-fitted student as in-process."""

import json

import pytest
import torch

flwr = pytest.importorskip("flwr")

from conftest import FLOWER_ONESHOT  # noqa: E402
from fed_distill.cli import main  # noqa: E402
from fed_distill.feature_stats import read_feature_stats  # noqa: E402
from fed_distill.federated.flower.runner import FlowerOptions, run_flower  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ARGS = [
    *FLOWER_ONESHOT,
    "split.num_clients=3",
    "refit=head",
    "refit.steps=300",
    "refit.features=map",  # the whole map (the penultimate path: tests/test_flower.py)
    "refit.noise=0.05",  # the clients' noise is seeded alike in both runners
    "refit.clip=20",
]


def test_refit_round_on_flower_equals_in_process(tmp_path):
    assert main(["oneshot", *ARGS, f"run_dir={tmp_path / 'local'}"]) == 0
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    sim = run_flower("oneshot", [*ARGS, f"run_dir={tmp_path / 'sim'}"], FlowerOptions())
    assert sim["left_out"] == [] and sim["refit"]["left_out"] == []
    assert sim["refit"]["clients"] == [0, 1, 2]
    for i in range(3):  # each client's upload, noise included, is the in-process client's own
        name = f"feedback/feature_stats_{i}.safetensors"
        a, said_a = read_feature_stats(tmp_path / "local" / name)
        b, said_b = read_feature_stats(tmp_path / "sim" / name)
        assert said_a == said_b
        assert all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-6, atol=1e-8) for k in a)
    for key in ("student_acc", "student_refit_acc"):
        assert sim[key] == pytest.approx(local[key], abs=1e-6), key
    assert sim["class_acc"]["student_refit"] == pytest.approx(
        local["class_acc"]["student_refit"], abs=1e-6
    )
