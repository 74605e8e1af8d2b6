"""Typed options of the synthesizers (the ``synthesis`` group): one small dataclass per method,
each with its defaults and one ``check``. Kept light on purpose (dataclasses only, no torch).

A synthesizer registers with its options class (``@register_synthesizer(NAME,
options=CLS)``); ``synthesis=NAME`` then composes exactly that class's keys (``config.py``
generates the group from the registry), so ``--cfg`` shows what the method reads and a key of
another method is refused at start-up. The built-in methods share keys by inheritance:

* :class:`SynthesisOptions` -- every method: ``name`` (the preset), ``method``, ``batch_size``,
  ``flip``.
* :class:`InversionOptions` -- methods that optimise images against the frozen teachers
  (``iterations``, ``lr``, augmentation, the BN-statistics term and its per-class statistics).
* :class:`DeepInversionOptions` (``deepinversion``), :class:`GeneratorOptions` (``generator``),
  :class:`FastOptions` (``fast``), :class:`DenseOptions` (``dense``),
  :class:`CoBoostOptions` (``coboost``) and :class:`PublicOptions` (``public``, FedDF).

The defaults of :class:`DeepInversionOptions` are the ``cpu`` preset. ``legacy_settings``
keeps the fingerprints of run folders made when every method shared one flat config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fed_distill.checks import check_finite
from fed_distill.errors import ConfigError

COBOOST_WEIGHTS = ("client", "client_class")
META_UPDATES = ("maml", "reptile")
ENSEMBLES = ("weighted", "probs", "logits")
GENERATOR_TARGETS = ("ensemble", "cycling")
SYNTHESIS_MODES = ("cycling", "ensemble", "sampling")
LABEL_MODES = ("uniform", "weighted", "holders")
LR_SCHEDULES = ("cosine", "none")
INITS = ("randn",)


def _bad(msg: str) -> ConfigError:
    return ConfigError(f"synthesis.{msg}")


def one_of(key: str, value: str, options: tuple[str, ...]) -> None:
    """``synthesis.KEY must be one of ...`` unless ``value`` is in ``options``."""
    if value not in options:
        raise _bad(f"{key} must be one of {', '.join(options)}, got '{value}'")


def positive_ints(cfg: Any, *keys: str, minimum: int = 1) -> None:
    """Each key an integer >= ``minimum`` (bools refused)."""
    for key in keys:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise _bad(f"{key} must be {what}, got {value!r}")


def non_negative(cfg: Any, *keys: str) -> None:
    """Each key a number >= 0 (``not >= 0`` also rejects NaN)."""
    for key in keys:
        if not getattr(cfg, key) >= 0:
            raise _bad(f"{key} must be >= 0, got {getattr(cfg, key)}")


@dataclass
class SynthesisOptions:
    """What every synthesizer has. A method's options subclass this and extend :meth:`check`."""

    name: str = "cpu"  # preset name (informational)
    method: str = "deepinversion"  # the registered synthesizer (synthesis=NAME sets it)
    batch_size: int = 128  # images per synthetic batch
    flip: bool | None = None  # random horizontal flip; None = the dataset's default

    def check(self, num_available: int | None = None) -> None:
        """Raise ConfigError (one line) on a value this method cannot use; ``num_available``:
        the teachers at hand, where known. Subclasses call ``super().check`` first."""
        positive_ints(self, "batch_size")

    def validate(self, num_available: int | None = None) -> SynthesisOptions:
        """:meth:`check`, then no NaN / inf anywhere; returns ``self``."""
        self.check(num_available)
        check_finite(self, "synthesis")  # what the checks let through: inf
        return self

    def needs_class_stats(self) -> bool:
        """Whether this run loads the clients' uploaded class statistics."""
        return False

    def check_upload(self, upload: Any) -> None:
        """Raise ConfigError (one line) where this synthesis needs statistics the clients'
        ``upload`` config (``fed_distill.config.UploadConfig``) does not send."""


@dataclass
class InversionOptions(SynthesisOptions):
    """Images optimised against the frozen teachers: the step budget, augmentation and the
    BatchNorm-statistics term with the clients' per-class statistics."""

    iterations: int = 100  # gradient steps per synthetic batch
    lr: float = 0.25
    jitter: int = 2  # max random roll in pixels, both axes
    label_mode: str = "uniform"  # uniform over the teacher's classes | weighted by class counts
    # | holders: each class mostly from the teachers holding most of it (inputs.holder_label_probs)
    bn_scale: float = 3.0  # weight of the BatchNorm-statistics matching term
    first_bn_multiplier: float = 1.0  # extra weight on the first BN layer (1 = none)
    # Per-class BN statistics (teachers/class_stats_{i}.safetensors, uploaded by the clients):
    # the images of class k match the class-k statistics of the teacher(s) instead of the
    # client's global ones; a class a client holds fewer than `class_stats_min` images of falls
    # back to its global statistics. Without the files (older runs, upload.class_stats=false)
    # the global statistics are used.
    class_stats: bool = True
    class_stats_min: int = 50
    # with class statistics: weight, relative to the BN term, of matching each class's mean
    # penultimate features to the uploaded ones (0 = off; needs upload.features)
    feature_scale: float = 0.0
    # --- speed (same math either way, see synthesis/stacked.py). `stacked`: run the teachers
    # as converted networks whose BatchNorm layers compute the BN-statistics term with one
    # fused forward/backward; a teacher that cannot be converted runs as it is.
    stacked: bool = True
    # with `stacked`: where a step uses several teachers, run them as ONE grouped network when
    # they share an architecture. null = auto: on for CUDA or with more than one intra-op
    # thread, off at 1 thread, where it was slower on the 2-core CPU (README "Synthesis speed").
    grouped: bool | None = None

    def check(self, num_available: int | None = None) -> None:
        super().check(num_available)
        one_of("label_mode", self.label_mode, LABEL_MODES)
        positive_ints(self, "iterations", "class_stats_min")
        positive_ints(self, "jitter", minimum=0)
        if not self.lr > 0:
            raise _bad(f"lr must be > 0, got {self.lr}")
        non_negative(self, "bn_scale", "first_bn_multiplier", "feature_scale")

    def needs_class_stats(self) -> bool:
        return bool(self.class_stats) and self.bn_scale > 0


@dataclass
class DeepInversionOptions(InversionOptions):
    """DeepInversion / Adaptive DI (``synthesis/deepinversion.py``).

    mode: ``cycling`` = one teacher per batch, round-robin; ``ensemble`` = mean of all teachers'
    logits; ``sampling`` = Sampling DeepInversion (Algorithm 1 of the seed report): at every
    gradient step ``num_teachers`` distinct teachers are drawn and their losses averaged.
    """

    mode: str = "cycling"
    num_teachers: int = 3  # sampling only: teachers drawn per gradient step
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # Adam betas on the pixels
    l2_scale: float = 0.0  # weight of the l2 norm of the batch
    var_scale: float = 1e-3  # weight of the total-variation prior
    comp_scale: float = 10.0  # Adaptive DI competition term; only used when a student is given
    # cycling: the competition term compares the teacher and the student among the classes the
    # teacher holds `class_stats_min` images of or more (its softmax and the student's masked
    # to them), so a teacher is not matched against the student on classes it never learnt
    comp_known: bool = False
    temperature: float = 3.0  # softmax temperature of the competition (JS) term
    class_mask: bool = False  # restrict a teacher's logits to the classes it owns before CE
    class_weighted_ce: bool = False  # CE weight w[t][l] = share of label l in teacher t's data
    lr_schedule: str = "cosine"  # cosine | none
    init: str = "randn"  # initial pixels (normalised space)
    # cycling: weight of a diversity term that spreads the teacher's penultimate features of a
    # batch apart, from each other and from its last `div_bank` images (synthesis/diversity.py;
    # 0 = off)
    div_scale: float = 0.0
    div_bank: int = 1024
    # weight of matching each class's per-pixel mean and variance, pooled over the clients'
    # uploaded pixel statistics (synthesis/pixels.py; needs upload.pixels; 0 = off)
    pixel_scale: float = 0.0
    # cycling only, needs `grouped`: synthesise one batch per teacher at once (T independent
    # problems in one grouped forward) and hand them out one per synthesize() call, in
    # round-robin order. Off by default: the T batches of a group are all made against the
    # student as it was when the group was made, and a group is always T batches.
    parallel: bool = False

    def check(self, num_available: int | None = None) -> None:
        super().check(num_available)
        one_of("mode", self.mode, SYNTHESIS_MODES)
        one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        one_of("init", self.init, INITS)
        positive_ints(self, "num_teachers")
        positive_ints(self, "div_bank", minimum=0)
        sampling = self.mode == "sampling" and num_available is not None
        if sampling and self.num_teachers > num_available:  # type: ignore[operator]
            raise _bad(
                f"num_teachers={self.num_teachers} but only {num_available} teachers are "
                "available for sampling"
            )
        if not self.temperature > 0:
            raise _bad(f"temperature must be > 0, got {self.temperature}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise _bad(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        non_negative(self, "l2_scale", "var_scale", "comp_scale", "div_scale", "pixel_scale")
        if self.div_scale > 0 and not (self.mode == "cycling" and not self.parallel):
            raise _bad("div_scale applies to mode=cycling, parallel=false")
        if self.comp_known and self.mode != "cycling":
            raise _bad("comp_known applies to mode=cycling")
        if self.class_weighted_ce and self.mode == "ensemble":
            # Ensemble CE is on the mean logits: there is no per-teacher term to weight.
            raise _bad("class_weighted_ce applies to mode=cycling or sampling, not ensemble")

    def check_upload(self, upload: Any) -> None:
        if self.pixel_scale > 0 and not (upload.class_stats and upload.pixels):
            raise ConfigError(
                f"synthesis.pixel_scale={self.pixel_scale} needs the clients' pixel statistics:"
                " add upload.pixels=true (docs/class_stats.md says what they reveal) or set"
                " synthesis.pixel_scale=0"
            )


@dataclass
class GeneratorOptions(InversionOptions):
    """Generator-based synthesis (DENSE's generator, ``synthesis/generator.py``):
    ``iterations`` = generator steps per batch, ``lr`` = the generator's learning rate."""

    name: str = "generator"
    method: str = "generator"
    nz: int = 100  # latent size
    ngf: int = 16  # generator width (channels of its last hidden layer)
    lr_z: float = 0.01  # learning rate of the per-batch latent codes
    # what the CE, BN and adversarial terms aim at: `ensemble` = all teachers combined (by
    # `ensemble`); `cycling` = one teacher per batch, round-robin, labels from its classes
    target: str = "ensemble"
    oh_scale: float = 1.0  # weight of the CE ("one-hot") term on the teachers' ensemble
    adv_scale: float = 1.0  # weight of the adversarial term (student-ensemble disagreement)
    # How the teachers' outputs combine into the target of the CE and adversarial terms:
    # weighted (class shares) | probs | logits.
    ensemble: str = "weighted"

    def check(self, num_available: int | None = None) -> None:
        super().check(num_available)
        one_of("ensemble", self.ensemble, ENSEMBLES)
        one_of("target", self.target, GENERATOR_TARGETS)
        positive_ints(self, "nz", "ngf")
        if not self.lr_z > 0:
            raise _bad(f"lr_z must be > 0, got {self.lr_z}")
        non_negative(self, "oh_scale", "adv_scale")


@dataclass
class FastOptions(GeneratorOptions):
    """Fast data-free KD: the generator meta-learnt across batches."""

    name: str = "fast"
    method: str = "fast"
    bn_momentum: float = 0.9  # momentum of the tracked BN statistics (0 = off)
    meta_update: str = "maml"  # first-order MAML or Reptile update of the meta-generator

    def check(self, num_available: int | None = None) -> None:
        super().check(num_available)
        one_of("meta_update", self.meta_update, META_UPDATES)
        if not 0.0 <= self.bn_momentum < 1.0:
            raise _bad(f"bn_momentum must be in [0, 1), got {self.bn_momentum}")


@dataclass
class DenseOptions(GeneratorOptions):
    """DENSE's published recipe (``synthesis/peers.py``; sources in docs/peers.md)."""

    name: str = "dense"
    method: str = "dense"
    temperature: float = 3.0  # of the KL in the adversarial term
    grad_clip: float = 0.0  # max gradient norm of the generator's step (0 = none)

    def check(self, num_available: int | None = None) -> None:
        super().check(num_available)
        if not self.temperature > 0:
            raise _bad(f"temperature must be > 0, got {self.temperature}")
        non_negative(self, "grad_clip")


@dataclass
class CoBoostOptions(DenseOptions):
    """Co-Boosting (``synthesis/peers.py``)."""

    name: str = "coboost"
    method: str = "coboost"
    hardness: float = 1.0  # exponent h of the hard-sample CE weight (1 - p_y)^h
    # the re-fitted ensemble weights, one per client on its logits (`client`, as published) or
    # one per client and class on its softmax, starting at the class shares (`client_class`)
    coboost_weights: str = "client"
    coboost_mu: float = 0.01  # size of the weights' signed gradient step
    coboost_mu_decay: float = 0.99  # the step shrinks by this factor every round

    def check(self, num_available: int | None = None) -> None:
        super().check(num_available)
        one_of("coboost_weights", self.coboost_weights, COBOOST_WEIGHTS)
        non_negative(self, "hardness", "coboost_mu")
        if not 0.0 < self.coboost_mu_decay <= 1.0:
            raise _bad(f"coboost_mu_decay must be in (0, 1], got {self.coboost_mu_decay}")


@dataclass
class PublicOptions(SynthesisOptions):
    """FedDF: unlabeled images of another dataset instead of synthesis (``synthesis/public.py``)."""

    name: str = "public"
    method: str = "public"
    public_dataset: str = "mnist5k"
    public_data_dir: str | None = None  # None = the usual lookup (see `fed-distill data info`)
    public_limit: int | None = None  # use at most this many public images (None = all)
    # how the teachers' outputs combine into the pseudo-labels: weighted | probs | logits
    ensemble: str = "weighted"

    def check(self, num_available: int | None = None) -> None:
        super().check(num_available)
        one_of("ensemble", self.ensemble, ENSEMBLES)
        if self.public_limit is not None:
            positive_ints(self, "public_limit")


# The one flat config every method shared before each owned its options, at its defaults of
# then (frozen here: later changes to a method's defaults must not move another's). A run
# folder's fingerprints were computed over all of these keys; ``legacy_settings`` fills in the
# keys a method does not carry, so unchanged settings keep their fingerprints.
LEGACY_DEFAULTS: dict[str, Any] = {
    "name": "cpu", "method": "deepinversion", "mode": "cycling", "num_teachers": 3,
    "batch_size": 128, "iterations": 100, "lr": 0.25, "betas": [0.5, 0.9], "l2_scale": 0.0,
    "var_scale": 0.001, "bn_scale": 3.0, "first_bn_multiplier": 1.0, "comp_scale": 10.0,
    "comp_known": False, "temperature": 3.0, "jitter": 2, "flip": None, "label_mode": "uniform",
    "class_mask": False, "class_weighted_ce": False, "lr_schedule": "cosine", "init": "randn",
    "class_stats": True, "class_stats_min": 50, "feature_scale": 0.0, "div_scale": 0.0,
    "div_bank": 1024, "pixel_scale": 0.0, "stacked": True, "grouped": None, "parallel": False,
    "nz": 100, "ngf": 16, "lr_z": 0.01, "target": "ensemble", "oh_scale": 1.0, "adv_scale": 1.0,
    "bn_momentum": 0.9, "meta_update": "maml", "grad_clip": 0.0, "hardness": 1.0,
    "coboost_weights": "client", "coboost_mu": 0.01, "coboost_mu_decay": 0.99,
    "ensemble": "weighted", "public_dataset": "mnist5k", "public_data_dir": None,
    "public_limit": None,
}  # fmt: skip


def legacy_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (one method's keys) with every key of the old flat config it lacks at the
    old default: the dict older run folders' fingerprints were computed from."""
    return {**LEGACY_DEFAULTS, **settings}
