"""Typed config of distilling the teachers into one student (group ``student``), beside the
student loop (``train/student.py``).

A dataclass only (this module imports no torch): the root Hydra schema imports it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fed_distill.checks import check_finite
from fed_distill.errors import ConfigError

STUDENT_INITS = ("random", "fedavg")
STUDENT_MIXES = ("none", "cutmix", "mixup")
TARGET_MODES = ("auto", "live", "cached", "sampled")
AUTO_TARGETS = "sampled"  # what student.targets=auto means where that mode can serve the settings


@dataclass
class StudentConfig:
    """Distilling the teachers into one student on a growing synthetic dataset (group ``student``).

    ``generate-initial`` makes ``initial_batches`` non-adaptive batches; every student epoch then
    synthesises ``new_batches_per_epoch`` fresh batches (adaptive against the current student when
    ``adaptive``), trains on each at once, appends it to the pool, and takes ``steps_per_epoch``
    further steps on batches drawn from the whole pool with augmentation.
    """

    model: str | None = None  # None = the teachers' architecture
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # The student's starting weights: random (seeded), or fedavg = the teachers' weights
    # averaged by client data size (one-shot FedAvg; needs the teachers' architecture).
    init: str = "random"
    # The server's randomness (synthesis, the student's initial weights, its batches): null =
    # the run's `seed`. Another value repeats the server's side on the same split and teachers,
    # which is how run-to-run spread is measured on fixed teachers (`seed` also re-splits).
    seed: int | None = None
    epochs: int = 20
    initial_batches: int = 4
    new_batches_per_epoch: int = 1
    adaptive: bool = True  # new batches use Adaptive DI (competition with the current student)
    steps_per_epoch: int = 20  # pool steps per epoch, besides one step on each new batch
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | none
    loss: str = "kl"  # kl: KL to the teachers' soft labels at `temperature` | ce: CE on synthetic labels (the seed)
    temperature: float = 4.0
    # How the teachers' outputs combine into soft labels: weighted (each teacher's softmax
    # weighted by its share of each class) | probs (mean softmax) | logits (mean logits).
    ensemble: str = "weighted"
    # Fraction of every pool step's batch drawn fresh from the synthesizer's current generator
    # (synthesis=generator only): new images at the cost of one generator forward, labelled by
    # the teachers like the rest; 0 = every image from the pool.
    fresh: float = 0.0
    # Each epoch, after the new batches: this many shuffled passes over the whole pool in
    # batches of `batch_size` instead of `steps_per_epoch` random draws (DENSE's and
    # Co-Boosting's KD: one pass a round); the cosine schedule then steps once per epoch.
    # 0 = off.
    pool_passes: int = 0
    fresh_step: bool = True  # one step on each new batch at once, before the pool steps
    nesterov: bool = True  # SGD with Nesterov momentum
    clip_grad: float = 0.0  # max gradient norm of a student step (0 = no clipping)
    # Co-Boosting's hard-sample perturbation of every batch the student sees:
    # x + perturb * sign(grad_x sum(u * soft labels at `temperature`)), u ~ U(-1, 1), in
    # normalised-pixel units (0 = off)
    perturb: float = 0.0
    # The teachers' soft labels of the student's batches (train/targets.py): live = every
    # teacher on every augmented batch | sampled = `target_teachers` teachers drawn per step
    # (all of them when there are no more), so the cost does not grow with the number of
    # clients | cached = once per pool image and its mirror, looked up (the teachers never see
    # the roll) | auto = the recommended mode where it serves the other settings, else live.
    targets: str = "auto"
    target_teachers: int = 5
    augment: bool = True  # random roll (jitter) and flip of pool batches
    jitter: int = 2
    # Mixing of pool batches (after roll and flip), relabelled by the teachers like every
    # batch: cutmix pastes a random box (area ~ U(0, 1)) of another image of the batch,
    # mixup blends two images (weight ~ U(0, 1)); each pool batch is mixed with probability
    # `mix_prob`. none = off.
    mix: str = "none"
    mix_prob: float = 0.5
    server_data: bool = False  # train also on the real data of split clients without a teacher
    real_weight: float = 1.0  # weight of the server's real-data loss
    class_weights: list[float] | None = None  # per-class loss weights (the seed's "weighted")
    eval_every: int = 1
    # Resumable checkpoints: every N student epochs (and every N initial batches); 0 = none.
    checkpoint_every: int = 1

    def validate(self) -> StudentConfig:
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError(f"student.seed must be an integer or null, got {self.seed!r}")
        for key in ("epochs", "batch_size", "eval_every"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                raise ConfigError(
                    f"student.{key} must be a positive integer, got {getattr(self, key)!r}"
                )
        for key in (
            "initial_batches",
            "new_batches_per_epoch",
            "steps_per_epoch",
            "jitter",
            "checkpoint_every",
            "pool_passes",
        ):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 0):
                raise ConfigError(
                    f"student.{key} must be an integer >= 0, got {getattr(self, key)!r}"
                )
        if self.initial_batches + self.new_batches_per_epoch == 0:
            raise ConfigError(
                "student.initial_batches and student.new_batches_per_epoch are both 0: no data"
            )
        if self.loss not in ("kl", "ce"):
            raise ConfigError(f"student.loss must be kl or ce, got '{self.loss}'")
        if self.ensemble not in ("weighted", "probs", "logits"):
            raise ConfigError(
                f"student.ensemble must be weighted, probs or logits, got '{self.ensemble}'"
            )
        if self.init not in STUDENT_INITS:
            raise ConfigError(
                f"student.init must be one of {', '.join(STUDENT_INITS)}, got '{self.init}'"
            )
        if self.mix not in STUDENT_MIXES:
            raise ConfigError(
                f"student.mix must be one of {', '.join(STUDENT_MIXES)}, got '{self.mix}'"
            )
        if isinstance(self.mix_prob, bool) or not (
            isinstance(self.mix_prob, (int, float)) and 0 <= self.mix_prob <= 1
        ):
            raise ConfigError(f"student.mix_prob must be in [0, 1], got {self.mix_prob!r}")
        if isinstance(self.target_teachers, bool) or not (
            isinstance(self.target_teachers, int) and self.target_teachers >= 1
        ):
            raise ConfigError(
                f"student.target_teachers must be a positive integer, got {self.target_teachers!r}"
            )
        if self.targets not in TARGET_MODES:
            raise ConfigError(
                f"student.targets must be one of {', '.join(TARGET_MODES)}, got '{self.targets}'"
            )
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"student.optimizer must be sgd or adam, got '{self.optimizer}'")
        if self.schedule not in ("cosine", "none"):
            raise ConfigError(f"student.schedule must be cosine or none, got '{self.schedule}'")
        if not (self.lr > 0 and self.temperature > 0):
            raise ConfigError("student.lr and student.temperature must be > 0")
        if isinstance(self.fresh, bool) or not (
            isinstance(self.fresh, (int, float)) and 0 <= self.fresh <= 1
        ):
            raise ConfigError(f"student.fresh must be a fraction in [0, 1], got {self.fresh!r}")
        if not (self.clip_grad >= 0 and self.perturb >= 0):
            raise ConfigError("student.clip_grad and student.perturb must be >= 0")
        if self.steps_per_epoch == 0 and self.pool_passes == 0 and not self.fresh_step:
            raise ConfigError(
                "student.fresh_step=false with steps_per_epoch=0 and pool_passes=0: the"
                " student never takes a step"
            )
        if self.class_weights is not None and not all(w >= 0 for w in self.class_weights):
            raise ConfigError("student.class_weights must be non-negative")
        check_finite(self, "student")  # what the checks above let through: inf
        return self
