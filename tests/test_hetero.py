"""One-shot with a different model on every client (``teachers.models``): architectures resolved
and cycled, recorded and checked per teacher, FedAvg reported as not applicable, every
synthesizer on mixed teachers (one without BatchNorm included), and a whole run on digits."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import FAST_TRAIN
from fed_distill.class_stats import compute_class_stats
from fed_distill.data.sources import load_dataset
from fed_distill.data.transforms import Normalizer
from fed_distill.errors import ConfigError, FedDistillError, ModelError
from fed_distill.models import build_model, fedmd_default_parties, parse_architectures
from fed_distill.models.families import teacher_architectures
from fed_distill.pipeline import load_teachers
from fed_distill.synthesis import DeepInversion, build_synthesizer, synthesis_options

pytestmark = pytest.mark.usefixtures("one_thread")

FEDMD_6 = "{name:fedmd_6,kwargs:{width_scale:0.1}}"
THREE = f"teachers.models=[cnn_small,resnet8,{FEDMD_6}]"
TINY = [
    *FAST_TRAIN,
    "dataset=digits",
    "split=iid",
    "split.num_clients=3",
    "seed=1",
    "synthesis.iterations=5",
    "synthesis.batch_size=32",
    "student.epochs=1",
    "student.initial_batches=1",
    "student.steps_per_epoch=3",
    "student.batch_size=32",
]


# ----------------------------------------------------------------------------- resolving
def test_architectures_are_cycled_with_kwargs_and_families():
    archs = teacher_architectures(
        ["cnn_small", {"name": "fedmd_3", "kwargs": {"width_scale": 0.5}}], ("resnet8", {}), 5
    )
    assert [a[0] for a in archs] == ["cnn_small", "fedmd_3"] * 2 + ["cnn_small"]
    assert archs[1][1] == {"width_scale": 0.5} and archs[0][1] == {}
    assert (
        teacher_architectures(None, ("resnet8", {"width": 8}), 2) == [("resnet8", {"width": 8})] * 2
    )
    family = parse_architectures("fedmd_family")
    assert [a[0] for a in family] == fedmd_default_parties() and len(family) == 10
    # a family inside a list, with kwargs for every member
    scaled = parse_architectures([{"name": "fedmd_family", "kwargs": {"width_scale": 0.1}}])
    assert all(k == {"width_scale": 0.1} for _, k in scaled)


@pytest.mark.parametrize(
    "value, message",
    [
        (["cnn_small", "nope"], "teachers.models[1]: unknown model 'nope'"),
        ([], "must be a non-empty list"),
        ([{"model": "cnn_small"}], "must be a model name or {name: NAME"),
        ([{"name": "cnn_small", "kwargs": 3}], "kwargs must be a mapping"),
    ],
)
def test_bad_architecture_lists_are_one_line(value, message):
    with pytest.raises(ModelError, match="teachers.models") as e:
        parse_architectures(value)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("teachers.models=[cnn_small,resnet9]", "unknown model 'resnet9'"),
        (
            "teachers.models=[{name:fedmd_3,kwargs:{depth:2}}]",
            "teachers.models[0]: model 'fedmd_3'",
        ),
    ],
)
def test_bad_teachers_models_fail_before_any_work(cli, tmp_path, override, message):
    code, _, err = cli("oneshot", *TINY, override, f"run_dir={tmp_path}")
    assert code == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "split.json").exists()


def test_homogeneous_list_trains_exactly_the_teachers_of_before(cli, tmp_path):
    """teachers.models=[cnn_small] with model=cnn_small is the run of before: same weights, and
    the fingerprint lets the second command reuse the first one's teachers."""
    args = [*FAST_TRAIN, "dataset=digits", "split=iid", "split.num_clients=2", "seed=3"]
    assert cli("split", *args, f"run_dir={tmp_path / 'a'}")[0] == 0
    assert cli("train-teachers", *args, f"run_dir={tmp_path / 'a'}")[0] == 0
    w0 = [(tmp_path / "a" / "teachers" / f"teacher_{i}.safetensors").read_bytes() for i in (0, 1)]
    code, out, _ = cli(
        "train-teachers", *args, "teachers.models=[cnn_small]", f"run_dir={tmp_path / 'a'}"
    )
    assert code == 0 and out.count("already trained") == 2
    assert [
        (tmp_path / "a" / "teachers" / f"teacher_{i}.safetensors").read_bytes() for i in (0, 1)
    ] == w0


# ----------------------------------------------------------------------------- a whole run
def test_oneshot_with_three_architectures_on_digits(cli, tmp_path):
    code, out, err = cli("oneshot", *TINY, THREE, f"run_dir={tmp_path}")
    assert code == 0, err
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["fedavg_acc"] is None and "architectures differ" in r["fedavg_note"]
    assert len(r["teacher_acc"]) == 3 and r["student_acc"] is not None
    # per class: no FedAvg either, one list per teacher whatever its architecture
    assert r["class_acc"]["fedavg"] is None and len(r["class_acc"]["teachers"]) == 3
    assert "FedAvg (one-shot): not applicable" in out
    tdir = tmp_path / "teachers"
    models = [json.loads((tdir / f"metrics_teacher_{i}.json").read_text()) for i in range(3)]
    assert [m["model"] for m in models] == ["cnn_small", "resnet8", "fedmd_6"]
    assert models[2]["model_kwargs"] == {"width_scale": 0.1}
    spec = json.loads((tdir / "teachers.json").read_text())
    assert [m["name"] for m in spec["models"]] == ["cnn_small", "resnet8", "fedmd_6"]
    teachers, _ = load_teachers(tmp_path)
    assert [type(t).__name__ for t in teachers] == ["SmallCNN", "CifarResNet", "FedMDCNN"]
    # the student is the model= architecture by default
    assert json.loads((tmp_path / "student" / "metrics.json").read_text())["model"] == "cnn_small"
    # the report: each teacher's model and a dash with the reason for FedAvg
    assert cli("report", str(tmp_path))[0] == 0
    report = (tmp_path / "report.md").read_text()
    assert "| teacher 1 (resnet8) |" in report
    assert "| FedAvg (one-shot) |  | — (not applicable: the teachers' architectures" in report
    # student.init=fedavg (as student=generator sets it): a note, then a random start
    code, out, err = cli(
        "train-student",
        *TINY,
        THREE,
        "student.init=fedavg",
        "student.model=resnet8",
        f"run_dir={tmp_path}",
    )
    assert code == 0, err
    assert "note: student.init=fedavg ignored" in out and "student (resnet8)" in out


def test_every_teacher_file_is_checked_against_its_own_architecture(cli, tmp_path):
    args = [*FAST_TRAIN, "dataset=digits", "split=iid", "split.num_clients=2", "seed=1"]
    assert cli("split", *args, f"run_dir={tmp_path}")[0] == 0
    assert (
        cli("train-teachers", *args, "teachers.models=[cnn_small,resnet8]", f"run_dir={tmp_path}")[
            0
        ]
        == 0
    )
    tdir = tmp_path / "teachers"
    load_teachers(tmp_path)
    # teachers.json swapped: teacher 0's weights do not fit resnet8
    spec_path, spec_text = tdir / "teachers.json", (tdir / "teachers.json").read_text()
    spec = json.loads(spec_text)
    spec["models"].reverse()
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(FedDistillError, match="records architecture cnn_small"):
        load_teachers(tmp_path)
    spec_path.write_text(spec_text)
    # a metrics file naming another architecture than teachers.json
    mpath = tdir / "metrics_teacher_1.json"
    m = json.loads(mpath.read_text())
    m["model"] = "resnet20"
    mpath.write_text(json.dumps(m))
    with pytest.raises(FedDistillError, match="teachers.json gives teacher 1 resnet8"):
        load_teachers(tmp_path)
    # and a malformed models list
    spec["models"] = spec["models"][:1]
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(FedDistillError, match=r"malformed \(models"):
        load_teachers(tmp_path)


def test_teachers_models_needs_a_valid_config_line(cli, tmp_path):
    code, _, err = cli("train-teachers", "teachers.models=3", f"run_dir={tmp_path}")
    assert code == 1 and "teachers.models must be a non-empty list" in err
    with pytest.raises(ConfigError):
        from fed_distill.config import compose_config
        from fed_distill.teachers import configured_architectures

        configured_architectures(compose_config(["teachers.models=[x]"]), 2)


# ----------------------------------------------------------------------------- synthesizers
class NoBN(nn.Module):
    """A teacher without BatchNorm layers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def mixed_teachers():
    """cnn_small, resnet8 and a BN-less net, briefly trained on digits, with their counts and
    class statistics."""
    torch.manual_seed(0)
    ds = load_dataset("digits")
    norm = Normalizer(ds.info.mean, ds.info.std)
    x, y = norm(ds.train_x[:600]), ds.train_y[:600]
    teachers = [
        build_model("cnn_small", 10, 1, 8, width=8),
        build_model("resnet8", 10, 1, 8, width=8),
        NoBN(),
    ]
    for t in teachers:
        opt = torch.optim.Adam(t.parameters(), lr=0.01)
        for s in range(0, 600, 50):
            loss = nn.functional.cross_entropy(t(x[s : s + 50]), y[s : s + 50])
            opt.zero_grad()
            loss.backward()
            opt.step()
        t.eval()
    counts = np.stack([torch.bincount(y, minlength=10).numpy()] * 3)
    stats = [compute_class_stats(t, ds.train_x[:600], y, norm, 10) for t in teachers]
    return teachers, counts, norm, stats


@pytest.mark.parametrize(
    "kw",
    [
        dict(mode="cycling"),
        dict(mode="ensemble", grouped=True),
        dict(mode="sampling", num_teachers=2),
        dict(method="generator", iterations=3),
    ],
    ids=["cycling", "ensemble", "sampling", "generator"],
)
def test_every_synthesizer_works_with_mixed_teachers(mixed_teachers, kw, capsys):
    teachers, counts, norm, stats = mixed_teachers
    cfg = synthesis_options(**{"batch_size": 16, "iterations": 4, "bn_scale": 1.0, **kw})
    synth = build_synthesizer(
        cfg, teachers, counts, (1, 8, 8), norm, False, "cpu", seed=0, class_stats=stats
    )
    assert "teacher(s) [2] have no BatchNorm2d layers" in capsys.readouterr().out
    for _ in range(3):  # cycling reaches the BN-less teacher on the third batch
        b = synth.synthesize()
        assert b.images.shape == (16, 1, 8, 8) and torch.isfinite(b.images).all()
    if isinstance(synth, DeepInversion):
        assert synth.stacked is None  # never grouped across architectures
        if kw["mode"] == "cycling":
            assert b.teacher_ids == [2] and b.stats["loss_bn"] == 0.0


@pytest.fixture(scope="module")
def four_teachers(mixed_teachers):
    """cnn_small, resnet8, and a second (differently trained) copy of each: two architectures."""
    teachers, counts, norm, stats = mixed_teachers
    twins = []
    for t in teachers[:2]:
        twin = copy.deepcopy(t)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(1.05)
        twins.append(twin)
    order = [teachers[0], teachers[1], twins[0], twins[1]]
    return order, np.concatenate([counts[:2], counts[:2]]), norm, [*stats[:2], *stats[:2]]


@pytest.mark.parametrize(
    "kw",
    # the generator at a small lr, as in test_generator: rounding differences stay small
    [dict(mode="ensemble"), dict(method="generator", lr=1e-3, nz=8, ngf=4)],
    ids=["ensemble", "generator"],
)
def test_grouping_by_architecture_gives_the_same_batches(four_teachers, kw):
    """grouped=true runs the teachers as one grouped network per architecture; the batches equal
    those of grouped=false (one teacher after another)."""
    from fed_distill.synthesis.arch_groups import ArchitectureGroups

    teachers, counts, norm, stats = four_teachers
    batches = []
    for grouped in (True, False):
        cfg = synthesis_options(
            **{"batch_size": 16, "iterations": 4, "bn_scale": 1.0, "grouped": grouped, **kw}
        )
        synth = build_synthesizer(
            cfg, teachers, counts, (1, 8, 8), norm, False, "cpu", seed=4, class_stats=stats
        )
        net = getattr(synth, "stacked", None) or getattr(synth, "grouped", None)
        if grouped:
            assert isinstance(net, ArchitectureGroups)
            assert [ids for ids, _ in net.groups] == [[0, 2], [1, 3]]
        else:
            assert net is None
        batches.append([synth.synthesize() for _ in range(2)])
    for a, b in zip(*batches, strict=True):
        assert a.teacher_ids == b.teacher_ids
        assert torch.allclose(a.images, b.images, atol=1e-3)
        assert a.stats["loss_bn"] == pytest.approx(b.stats["loss_bn"], rel=1e-3)


def test_architecture_groups_equal_each_teacher_alone(four_teachers):
    """One batch per teacher (parallel cycling's layout): logits and BN terms, per class, of
    the groups equal every teacher's own."""
    from fed_distill.class_stats import class_targets
    from fed_distill.synthesis import BNFeatureHooks
    from fed_distill.synthesis.arch_groups import (
        ArchitectureGroupHooks,
        try_group_by_architecture,
    )

    teachers, _, _, stats = four_teachers
    targets = [class_targets(t, s, 1) for t, s in zip(teachers, stats, strict=True)]
    groups, why = try_group_by_architecture(teachers, (1, 8, 8))
    assert groups is not None, why
    x = torch.randn(4, 6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(1))
    w = torch.rand(4, 10)
    with ArchitectureGroupHooks(groups, targets) as hooks:
        hooks.set_classes(y, w)
        logits = groups(x)
        loss = hooks.loss(2.0)
    for t, teacher in enumerate(teachers):
        with BNFeatureHooks(teacher, class_targets=targets[t]) as h:
            h.set_classes(y[t], w[t])
            own = teacher(x[t])
            assert torch.allclose(logits[t], own, atol=1e-4)
            assert torch.allclose(loss[t], h.loss(2.0), rtol=1e-4, atol=1e-4)


def test_no_teacher_with_bn_is_still_an_error(mixed_teachers):
    teachers, counts, norm, _ = mixed_teachers
    cfg = synthesis_options(batch_size=16, iterations=2, bn_scale=1.0)
    with pytest.raises(ConfigError, match="needs teachers with BatchNorm2d"):
        build_synthesizer(cfg, teachers[2:], counts[2:], (1, 8, 8), norm, False, "cpu", seed=0)
