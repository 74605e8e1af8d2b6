"""The peers' recipes (synthesis=dense, synthesis=coboost): their loss terms by hand, their
presets, Co-Boosting's ensemble-weight re-fit and hard-sample perturbation, and a student loop
that resumes from a checkpoint exactly as an uninterrupted one."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FAST_TRAIN
from fed_distill.artifacts import load_checkpoint
from fed_distill.config import compose_config
from fed_distill.data.transforms import Normalizer
from fed_distill.ensemble import ensemble_probs
from fed_distill.errors import ConfigError
from fed_distill.models import build_model
from fed_distill.synthesis import build_synthesizer, synthesis_options
from fed_distill.synthesis.base import SyntheticBatch
from fed_distill.synthesis.generator import ImageGenerator
from fed_distill.synthesis.peers import (
    crop_flip,
    dense_adversarial,
    hardness_ce,
    reset_generator,
    weighted_ensemble,
)
from fed_distill.train.student import SyntheticPool, distill
from fed_distill.train.student_config import StudentConfig

pytestmark = pytest.mark.usefixtures("one_thread")
NORM = Normalizer((0.5,), (0.25,))


def test_crop_flip_shifts_each_image_by_its_own_offset_with_zero_padding():
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4) + 1
    off = torch.tensor([[1, 1], [0, 2]])  # pad 1: (1, 1) is the identity crop
    out = crop_flip(x, 1, off, torch.tensor([False, False]))
    assert torch.equal(out[0], x[0])
    # image 1: one row down (top row is padding), one column left (right column is padding)
    expect = torch.zeros(1, 4, 4)
    expect[:, 1:, :3] = x[1, :, :3, 1:]
    assert torch.equal(out[1], expect)
    flipped = crop_flip(x, 0, torch.zeros(2, 2, dtype=torch.long), torch.tensor([True, False]))
    assert torch.equal(flipped[0], x[0].flip(2)) and torch.equal(flipped[1], x[1])


def test_dense_adversarial_counts_only_samples_where_student_and_teacher_disagree():
    t = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    s = torch.log(torch.tensor([[0.2, 0.8], [0.9, 0.1]]))  # sample 0 disagrees, 1 agrees
    kl0 = 0.7 * np.log(0.7 / 0.2) + 0.3 * np.log(0.3 / 0.8)
    assert dense_adversarial(t, s).item() == pytest.approx(-kl0 / 2, rel=1e-5)


def test_hardness_ce_weights_each_sample_by_one_minus_its_label_probability():
    p = torch.tensor([[0.9, 0.1], [0.25, 0.75]])
    y = torch.tensor([0, 0])
    expect = (0.1**2 * -np.log(0.9) + 0.75**2 * -np.log(0.25)) / 2
    assert hardness_ce(p, y, 2.0).item() == pytest.approx(expect, rel=1e-5)
    assert hardness_ce(p, y, 0.0).item() == pytest.approx(F.nll_loss(p.log(), y).item())


def test_weighted_ensemble_per_client_and_per_client_class():
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    equal = weighted_ensemble(logits, torch.full((3,), 0.2))
    assert torch.allclose(equal, ensemble_probs(logits, "logits"))
    only_first = weighted_ensemble(logits, torch.tensor([1.0, 0.0, 0.0]), temperature=2.0)
    assert torch.allclose(only_first, F.softmax(logits[0] / 2, dim=1))
    shares = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(
        weighted_ensemble(logits, shares), ensemble_probs(logits, "weighted", shares)
    )


def test_reset_generator_is_seeded_and_matches_the_published_initialisation():
    nets = [ImageGenerator(16, (1, 8, 8), 8) for _ in range(2)]
    for net in nets:
        reset_generator(net, torch.Generator().manual_seed(5))
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    w = nets[0].fc.weight
    assert abs(w.std().item() - 0.02) < 0.005 and nets[0].fc.bias.abs().max() == 0


def test_presets_bring_their_student_and_an_explicit_student_wins():
    for name in ("dense", "coboost"):
        cfg = compose_config([f"synthesis={name}"])
        assert cfg.synthesis.method == name and cfg.student.pool_passes == 1
        assert cfg.student.epochs == 200 and not cfg.student.fresh_step
    assert compose_config(["synthesis=dense"]).student.temperature == 20.0
    assert compose_config(["synthesis=coboost"]).student.perturb > 0
    assert compose_config(["synthesis=dense", "student=long"]).student.pool_passes == 0
    assert compose_config([]).synthesis.method == "deepinversion"


def test_dense_with_ensemble_weighted_distils_the_class_share_ensemble():
    assert compose_config(["synthesis=dense"]).student.ensemble == "logits"  # published
    cfg = compose_config(["synthesis=dense", "synthesis.ensemble=weighted"])
    assert cfg.synthesis.ensemble == cfg.student.ensemble == "weighted"  # one key, both ends
    explicit = ["synthesis=dense", "synthesis.ensemble=weighted", "student.ensemble=logits"]
    assert compose_config(explicit).student.ensemble == "logits"  # an explicit key wins


@pytest.mark.parametrize("rule", ["logits", "weighted"])
def test_dense_ce_aims_at_its_ensemble_rule(rule):
    # two classes; teacher 0 holds 3/4 of class 0, teacher 1 3/4 of class 1
    a, b = _Reader([0, 1]), _Reader([1, 0])
    cfg = synthesis_options(method="dense", batch_size=4, bn_scale=0.0, ensemble=rule)
    counts = np.array([[3, 1], [1, 3]])
    synth = build_synthesizer(cfg, [a, b], counts, (1, 1, 2), NORM, False, "cpu", seed=0)
    x = torch.tensor([[[[0.3, 0.1]]], [[[0.0, 0.2]]]])
    y = torch.tensor([0, 1])
    _, ce, bn, adv = synth._terms(x, y, None, [])
    za = 10 * x[:, 0, 0, :].numpy()
    zb = za[:, ::-1]  # teacher 1 reads the classes swapped

    def softmax(z):
        return np.exp(z) / np.exp(z).sum(1, keepdims=True)

    if rule == "logits":
        p = softmax((za + zb) / 2)
    else:
        q = softmax(za) * [0.75, 0.25] + softmax(zb) * [0.25, 0.75]
        p = q / q.sum(1, keepdims=True)
    expect = -np.log(p[[0, 1], [0, 1]]).mean()
    assert ce.item() == pytest.approx(expect, rel=1e-5)
    assert bn.item() == adv.item() == 0.0


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: synthesis_options(method="coboost", coboost_weights="clients"), "coboost_weights"),
        (lambda: synthesis_options(method="coboost", coboost_mu_decay=0.0), "coboost_mu_decay"),
        (lambda: StudentConfig(fresh_step=False, steps_per_epoch=0), "never takes a step"),
    ],
)
def test_bad_peer_settings_are_one_line_config_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make().validate()


class _Reader(nn.Module):
    """A teacher whose logits are 10 × the first pixel row read through a class permutation."""

    def __init__(self, perm: list[int]) -> None:
        super().__init__()
        self.register_buffer("perm", torch.tensor(perm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * x[:, 0, 0, :][:, self.perm]


@pytest.mark.parametrize("mode", ["client", "client_class"])
def test_coboost_refit_moves_weight_to_the_teacher_that_labels_the_pool_right(mode):
    k = 4
    good, bad = _Reader(list(range(k))), _Reader([1, 2, 3, 0])
    cfg = synthesis_options(
        method="coboost", batch_size=8, bn_scale=0.0, coboost_weights=mode, coboost_mu=0.05
    )
    counts = np.ones((2, k), dtype=np.int64)
    synth = build_synthesizer(cfg, [good, bad], counts, (1, 4, 4), NORM, False, "cpu", seed=0)
    y = torch.arange(16) % k
    x = torch.zeros(16, 1, 4, 4)
    x[torch.arange(16), 0, 0, y] = 1.0
    pool = SyntheticPool()
    pool.append(SyntheticBatch(x, y, [0, 1]))
    synth.bind_pool(pool)
    before = synth.weights.clone()
    logits = torch.stack([good(x), bad(x)])

    def pool_ce(w):
        return F.nll_loss(weighted_ensemble(logits, w).log(), y).item()

    synth.batches = 1
    synth._after_round()
    w = synth.weights
    assert w.shape == before.shape and (w >= 0).all() and (w <= 1).all()
    assert (w[0] > before[0]).all() and (w[1] < before[1]).all()
    assert pool_ce(w) < pool_ce(before)


def _setup(method: str, student_kw: dict | None = None, **synth_kw):
    torch.manual_seed(0)
    teachers = [build_model("cnn_small", 10, 1, 8, width=8).eval() for _ in range(2)]
    counts = np.array([[5] * 5 + [1] * 5, [1] * 5 + [5] * 5])
    scfg = synthesis_options(
        method=method, batch_size=16, iterations=3, nz=8, ngf=4, lr=0.01, jitter=2, **synth_kw
    )
    synth = build_synthesizer(scfg, teachers, counts, (1, 8, 8), NORM, True, "cpu", seed=7)
    student = build_model("cnn_small", 10, 1, 8, width=8, dropout=0.2)
    cfg = StudentConfig(
        epochs=4,
        initial_batches=0,
        fresh_step=False,
        steps_per_epoch=0,
        pool_passes=1,
        batch_size=12,
        nesterov=False,
        schedule="cosine",
        ensemble="logits",
        clip_grad=10.0 if method == "coboost" else 0.0,
        perturb=0.03 if method == "coboost" else 0.0,
        **(student_kw or {}),
    )
    return student, teachers, synth, SyntheticPool(), cfg


class Stop(Exception):
    pass


def test_dense_cached_soft_labels_are_the_live_loops_for_far_fewer_teacher_calls(same_training):
    assert compose_config(["synthesis=dense"]).student.targets == "cached"  # the preset
    digits = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    kw_d = dict(normalizer=NORM, hflip=True, device="cpu", seed=3, progress=False)
    kw_d["test"] = (digits, torch.arange(50) % 10)
    runs = {}
    for mode in ("live", "cached"):
        student, teachers, synth, pool, cfg = _setup("dense", {"targets": mode, "jitter": 0})
        seen = [0]
        for t in teachers:
            t.register_forward_hook(
                lambda m, i, o, seen=seen: seen.__setitem__(0, seen[0] + len(o))
            )
        res = distill(student, teachers, synth, pool, cfg, **kw_d)
        runs[mode] = (res, student, seen[0])
    (live, s_live, n_live), (cached, s_cached, n_cached) = runs["live"], runs["cached"]
    same_training(cached, s_cached, live, s_live)
    # the KD passes see 16 + 32 + 48 + 64 = 160 images; the cache labels 64 images twice
    assert n_live - n_cached == 2 * (160 - 2 * 64)


@pytest.mark.parametrize(
    "method,kw,student_kw",
    [
        ("dense", {"flip": True}, None),
        ("dense", {"flip": True}, {"targets": "cached", "jitter": 0}),  # the preset's
        ("coboost", {"bn_scale": 0.0, "grad_clip": 10.0}, None),
        ("coboost", {"coboost_weights": "client_class", "bn_scale": 1.0}, None),
    ],
)
def test_peer_distill_resumed_from_a_checkpoint_is_bit_identical(tmp_path, method, kw, student_kw):
    digits = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    kw_d = dict(
        normalizer=NORM,
        hflip=True,
        device="cpu",
        seed=3,
        test=(digits, torch.arange(50) % 10),
        progress=False,
    )
    student, teachers, synth, pool, cfg = _setup(method, student_kw, **kw)
    ref = distill(student, teachers, synth, pool, cfg, **kw_d)
    ref_state = {k: v.clone() for k, v in student.state_dict().items()}
    ref_weights = None if synth.weights is None else synth.weights.clone()
    assert ref.metrics["pool_size"] == [16.0, 32.0, 48.0, 64.0]  # every round's batch is kept

    def stop_at_2(epoch, row):
        if epoch == 2:
            raise Stop

    ckpt = tmp_path / "student.safetensors"
    student, teachers, synth, pool, cfg = _setup(method, student_kw, **kw)
    with pytest.raises(Stop):
        distill(
            student, teachers, synth, pool, cfg, checkpoint_path=ckpt, on_epoch=stop_at_2, **kw_d
        )
    assert load_checkpoint(ckpt)["epoch"] == 1
    student, teachers, synth, pool, cfg = _setup(method, student_kw, **kw)
    torch.manual_seed(1234)  # restored from the checkpoint
    res = distill(student, teachers, synth, pool, cfg, checkpoint_path=ckpt, **kw_d)
    assert res.metrics["loss"] == ref.metrics["loss"]
    assert res.metrics["test_acc"] == ref.metrics["test_acc"]
    for k, v in ref_state.items():
        assert torch.equal(v, student.state_dict()[k]), k
    if ref_weights is not None:
        assert torch.equal(ref_weights, synth.weights)
        fresh = _setup(method, student_kw, **kw)[2].weights
        assert not torch.equal(ref_weights, fresh)  # re-fitted


def test_peers_benchmark_rows_report_final_best_and_time_to_reach(benchmark_module):
    peers = benchmark_module("peers")

    def run(acc, minutes):
        curve = {"test_acc": acc, "elapsed_s": [60.0 * m for m in minutes]}
        return {"results": {"student_acc": acc[-1], "ensemble_acc": 0.9}, "curve": curve}

    runs = {
        "default": run([0.5, 0.7, 0.8], [1, 2, 3]),
        "dense": run([0.6, 0.75, 0.65], [10, 20, 30]),
    }
    runs["dense"]["results"]["class_acc"] = {"student": [0.9, 0.4], "ensemble": [0.95, 0.8]}
    runs["dense"]["results"]["class_names"] = ["Coat", "Shirt"]
    runs["dense"]["results"]["ensemble_acc_by_method"] = {"logits": 0.7, "weighted": 0.8}
    rows = {r[2]: r for r in peers.rows_for(0.5, runs, seed=1)}
    assert rows["dense"][:2] == [0.5, 1]
    assert rows["dense"][5] == "65.00" and rows["dense"][7:9] == ["75.00", "30.0"]  # best, min
    assert rows["dense"][6] == "40.0 (Shirt)"  # the worst class gap beside the final accuracy
    assert rows["default"][6] == "—"  # results without per-class figures
    assert rows["dense"][10] == "0.812"  # 65 % of the class-share ensemble's 80 %
    assert rows["default"][10] == "0.889"  # no per-rule figures: its own ensemble (90 %)
    assert rows["dense"][11] == "2.0 (0.07 of its time)"  # the default passed 65 % at 2 min
    assert rows["default"][11] == "—" and rows["default"][3] == "yes"
    other = {r[2]: r for r in peers.rows_for(0.5, {"dense": run([0.7, 0.75], [5, 10])}, seed=2)}
    means = {r[1]: r for r in peers.mean_rows([rows["dense"], other["dense"]])}
    # (65 + 75) / 2 final, (75 + 75) / 2 best, (30 + 10) / 2 min, (0.812 + 0.833) / 2 share
    assert means["dense"] == [0.5, "dense", 2, "70.00", "75.00", "20.0", "0.823"]


@pytest.mark.slow
def test_peers_benchmark_passes_the_device_to_every_stage(benchmark_module, tmp_path):
    peers = benchmark_module("peers")
    small = ["train.epochs=2", "train.min_steps=20", "synthesis.iterations=2"]
    small += ["synthesis.batch_size=32", "synthesis.ngf=8"]
    args = ["--dataset", "digits", "--rounds", "1", "--default-epochs", "1", "--seeds", "3"]
    args += ["--only", "default", "dense/weighted", "--out", str(tmp_path / "out")]
    args += ["--figures", str(tmp_path / "fig")]
    if not torch.cuda.is_available():  # the split and teachers' stages get it: cuda fails there
        with pytest.raises(ConfigError, match="device=cuda was asked for"):
            extra = tuple(peers.common(peers.parse_args(["--device", "cpu", "--", *small])))
            assert extra[0] == "device=cpu"
            peers.bench.prepare_teachers(
                tmp_path / "t", 0.5, 3, None, "digits", ("device=cuda", *extra[1:])
            )
        assert not (tmp_path / "t" / "alpha0.5" / "_teachers" / "teachers").exists()
    assert peers.main([*args, "--device", "cpu", "--", *small]) == 0
    base = tmp_path / "out" / "seed3" / "alpha0.5"
    for slug, rule in (("default", "weighted"), ("dense_weighted", "weighted")):
        r = json.loads((base / slug / "results.json").read_text())
        assert r["config"]["device"] == "cpu" and r["config"]["seed"] == 3  # not "auto"
        assert r["config"]["dataset"]["name"] == "digits" and r["ensemble_method"] == rule
    assert len(json.loads((base / "dense_weighted.json").read_text())["curve"]["test_acc"]) == 1
    assert (tmp_path / "fig" / "peers_digits_alpha0.5_seed3.png").is_file()
    table = (tmp_path / "out" / "table.txt").read_text()
    assert "dense/weighted" in table and "mean over seeds" in table


@pytest.mark.parametrize(
    "method,rule",
    [
        pytest.param("dense", "logits", marks=pytest.mark.slow),
        pytest.param("dense", "weighted", marks=pytest.mark.slow),
        ("coboost", "logits"),
    ],
)
def test_oneshot_with_a_peer_records_every_round_and_the_best_selected_on_test(
    cli, tmp_path, method, rule
):
    small = "synthesis.batch_size=32 synthesis.iterations=3 synthesis.ngf=8 student.epochs=2"
    small += f" synthesis.ensemble={rule}"
    data = f"dataset=digits split=iid split.num_clients=2 seed=1 run_dir={tmp_path}"
    code, _, err = cli("oneshot", *data.split(), *FAST_TRAIN, f"synthesis={method}", *small.split())
    assert code == 0, err
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["ensemble_method"] == r["config"]["student"]["ensemble"] == rule
    curve = r["student_curve"]
    assert len(curve["test_acc"]) == len(curve["elapsed_s"]) == 2
    assert curve["best_test_acc_selected_on_test"] == max(curve["test_acc"])
    assert r["config"]["student"]["pool_passes"] == 1  # the preset brought its student
    assert r["synthetic_images"] == 64


def test_peers_progress_reads_finished_rows_and_checkpoints_and_runs_nothing(
    benchmark_module, tmp_path, capsys
):
    from fed_distill.artifacts import save_checkpoint

    peers = benchmark_module("peers")
    base = tmp_path / "out" / "seed1" / "alpha0.3"
    base.mkdir(parents=True)
    done = {"curve": {"test_acc": [0.5, 0.9, 0.8], "elapsed_s": [60.0, 120.0, 180.0]}}
    (base / "default.json").write_text(json.dumps(done))
    metrics = {"test_acc": [0.1, 0.35, 0.3], "elapsed_s": [30.0, 60.0, 96.0]}
    ckpt = base / "dense" / "checkpoints" / "student.safetensors"
    save_checkpoint({"epoch": 2, "metrics": metrics}, ckpt)  # what the student loop writes
    args = ["--progress", "--out", str(tmp_path / "out"), "--alphas", "0.3", "--seeds", "1"]
    args += ["--dataset", "digits", "--figures", str(tmp_path / "fig")]
    assert peers.main([*args, "--only", "default", "dense", "coboost"]) == 0
    rows = {line.split()[2]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["default"][3:] == ["finished", "3", "80.00", "90.00", "3.0"]
    assert rows["dense"][3:] == ["unfinished", "3", "30.00", "35.00", "1.6"]
    assert "coboost" not in rows  # never started: no row, and nothing was run
    assert sorted(p.name for p in base.iterdir()) == ["default.json", "dense"]
    assert (tmp_path / "fig" / "peers_digits_alpha0.3_seed1.png").is_file()
