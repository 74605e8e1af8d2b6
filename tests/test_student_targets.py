"""student.targets: the teachers' soft labels of the student's batches, live (every teacher on
every batch), sampled (k teachers per image) or cached (once per pool image and its mirror)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fed_distill.data.transforms import Normalizer
from fed_distill.ensemble import class_shares, ensemble_probs
from fed_distill.errors import ConfigError
from fed_distill.models import build_model
from fed_distill.synthesis import build_synthesizer, synthesis_options
from fed_distill.train.student import SyntheticPool, distill
from fed_distill.train.student_config import StudentConfig
from fed_distill.train.targets import TeacherSampler, resolve_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NORM = Normalizer((0.5,), (0.25,))
COUNTS = np.array([[30, 0, 5, 40, 0, 9, 3, 0, 20, 1], [0, 25, 5, 2, 30, 0, 8, 12, 0, 6]] * 2)


def _test_set():
    d = load_digits()
    x = torch.from_numpy((d.images * (255 / 16)).round().astype(np.uint8))[:, None]
    return x[:100], torch.from_numpy(d.target[:100].astype(np.int64))


def _run(targets: str, k: int = 5, jitter: int = 2, checkpoint=None, on_epoch=None):
    """A tiny distillation from 4 random teachers; returns (student, the number of images
    the loop's teachers saw, the result)."""
    torch.manual_seed(0)
    teachers = [build_model("cnn_small", 10, 1, 8, width=8).eval() for _ in range(4)]
    seen = [0]
    for t in teachers:
        t.register_forward_hook(lambda m, i, o: seen.__setitem__(0, seen[0] + len(o)))
    scfg = synthesis_options(batch_size=16, iterations=3)
    synth = build_synthesizer(scfg, teachers, COUNTS, (1, 8, 8), NORM, True, "cpu", seed=7)
    student = build_model("cnn_small", 10, 1, 8, width=8)
    cfg = StudentConfig(
        epochs=3, initial_batches=0, steps_per_epoch=6, batch_size=16, jitter=jitter,
        targets=targets, target_teachers=k,
    )  # fmt: skip
    res = distill(
        student, teachers, synth, SyntheticPool(), cfg, normalizer=NORM, hflip=True,
        device="cpu", seed=3, test=_test_set(), progress=False, shares=class_shares(COUNTS),
        checkpoint_path=checkpoint, on_epoch=on_epoch,
    )  # fmt: skip
    return student, seen[0], res


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_sampled_with_as_many_draws_as_teachers_is_the_live_loop_bit_for_bit():
    live, n_live, _ = _run("live")
    sampled, n_sampled, _ = _run("sampled", k=4)
    assert _same(live, sampled) and n_live == n_sampled


def test_sampled_and_cached_ask_the_teachers_far_less_than_live():
    _, n_live, _ = _run("live")
    _, n_one, _ = _run("sampled", k=1)
    _, n_cached, _ = _run("cached")
    steps = 3 * (1 + 6)  # epochs x (the step on the new batch + the pool steps), 16 images each
    other = n_one - steps * 16  # the loop's other teacher calls (batch metrics), alike in all
    assert other >= 0
    assert n_live == other + 4 * steps * 16  # every teacher on every image
    assert n_cached == other + 4 * 2 * 48  # every teacher on each pool image and its mirror


def test_cached_without_the_roll_labels_as_the_live_loop(same_training):
    # flips are looked up exactly; with no roll the teachers see what the student sees
    live, _, r_live = _run("live", jitter=0)
    cached, _, r_cached = _run("cached", jitter=0)
    same_training(r_cached, cached, r_live, live)


class Stop(Exception):
    pass


def test_sampled_resumes_its_teacher_draws_from_a_checkpoint(tmp_path):
    ref, _, _ = _run("sampled", k=1)
    ckpt = tmp_path / "student.safetensors"

    def stop(epoch, row):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        _run("sampled", k=1, checkpoint=ckpt, on_epoch=stop)
    resumed, _, _ = _run("sampled", k=1, checkpoint=ckpt)
    assert _same(ref, resumed)


def _peaked_teachers(n: int) -> list[torch.nn.Module]:
    torch.manual_seed(1)
    teachers = []
    for _ in range(n):
        t = build_model("cnn_small", 10, 1, 8, width=8).eval()
        with torch.no_grad():
            t.fc.weight.mul_(40)  # confident, disagreeing teachers
        teachers.append(t)
    return teachers


@pytest.mark.parametrize("method", ["weighted", "probs"])
def test_sampled_soft_labels_converge_to_the_ensemble_as_draws_grow(method):
    teachers = _peaked_teachers(4)
    shares = class_shares(COUNTS)
    x = torch.randn(1, 1, 8, 8).repeat(400, 1, 1, 1)  # 400 independent draws of one image
    with torch.no_grad():
        full = ensemble_probs(torch.stack([t(x[:1]) for t in teachers]), method, shares)[0]
        errors = []
        for k in (1, 4, 64):
            est = TeacherSampler(4, k, method, shares, seed=0).label(teachers, x, 1.0)
            assert torch.allclose(est.sum(1), torch.ones(len(x)))
            errors.append((est - full).abs().sum(1).mean().item())
    assert errors[2] < 0.5 * errors[0] and errors[2] < 0.15, errors
    assert full.max() < 0.99  # the teachers disagree: a single draw is far from the ensemble
    assert errors[0] > 0.2, errors


def test_sampled_asks_few_teachers_each_about_a_whole_group_of_images():
    """100 teachers, a batch of 128, k = 5: one draw per group of 32 images, so at most 20
    teacher calls of at least 32 images each (not ~100 calls of a few images)."""
    sizes: list[int] = []

    class Counted(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(len(x))
            return self.inner(x)

    base = _peaked_teachers(4)
    teachers = [Counted(base[i % 4]) for i in range(100)]
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(100, 10))
    x = torch.randn(128, 1, 8, 8)
    sampler = TeacherSampler(100, 5, "weighted", class_shares(counts), seed=0)
    with torch.no_grad():
        sampler.label(teachers, x, 1.0)
    assert 0 < len(sizes) <= 20 and min(sizes) >= TeacherSampler.GROUP
    assert sum(sizes) <= 128 * 5


def test_a_class_no_drawn_teacher_holds_falls_back_to_their_mean():
    teachers = _peaked_teachers(2)
    counts = np.array([[10] * 5 + [0] * 5, [0] * 5 + [10] * 5])  # disjoint halves
    x = torch.randn(50, 1, 8, 8)
    with torch.no_grad():
        est = TeacherSampler(2, 1, "weighted", class_shares(counts), seed=0).label(teachers, x, 1.0)
        own = torch.stack([t(x).softmax(-1) for t in teachers])  # (2, N, C)
    # one draw: the drawn teacher's own softmax, whichever it is
    assert all(
        any(torch.allclose(est[i], own[j, i], atol=1e-6) for j in range(2)) for i in range(50)
    )


def test_modes_resolve_or_refuse_in_one_line():
    assert resolve_targets("auto", "none", 0.0, 0.0, False) == "sampled"
    assert resolve_targets("auto", "none", 0.03, 0.0, False) == "live"  # Co-Boosting's perturbation
    assert resolve_targets("auto", "none", 0.0, 0.0, True) == "live"
    assert resolve_targets("sampled", "cutmix", 0.0, 0.5, False) == "sampled"
    with pytest.raises(ConfigError, match="student.targets=cached cannot serve student.mix=cutmix"):
        resolve_targets("cached", "cutmix", 0.0, 0.0, False)
    with pytest.raises(ConfigError, match="its own soft-label rule"):
        resolve_targets("sampled", "none", 0.0, 0.0, True)
    with pytest.raises(ConfigError, match="student.target_teachers"):
        StudentConfig(target_teachers=0).validate()


def test_cached_with_mixing_is_one_line_before_any_work(cli, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli(
        "oneshot",
        "dataset=digits",
        f"run_dir={run}",
        "student.targets=cached",
        "student.mix=cutmix",
    )
    assert code != 0 and "==" not in out
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "student.targets=cached cannot serve student.mix=cutmix" in lines[0]
