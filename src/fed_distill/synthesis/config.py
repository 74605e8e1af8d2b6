"""Typed config of synthesis (group ``synthesis``); the student's is in ``train/student_config.py``.

Kept light on purpose (dataclasses only, no torch import): the root Hydra schema imports it at
start-up. The defaults of :class:`SynthesisConfig` are the ``cpu`` preset; the YAML files in
``conf/synthesis/`` spell out every key of each preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fed_distill.checks import check_finite
from fed_distill.errors import ConfigError

SYNTHESIS_METHODS = ("deepinversion", "generator", "fast", "public", "dense", "coboost")
# further synthesis.method names: synthesizers registered from outside the package
# (register_synthesizer adds them), e.g. a researcher's subclass (docs/api.md)
REGISTERED_METHODS: set[str] = set()
COBOOST_WEIGHTS = ("client", "client_class")
META_UPDATES = ("maml", "reptile")
ENSEMBLES = ("weighted", "probs", "logits")
GENERATOR_TARGETS = ("ensemble", "cycling")
SYNTHESIS_MODES = ("cycling", "ensemble", "sampling")
LABEL_MODES = ("uniform", "weighted", "holders")
LR_SCHEDULES = ("cosine", "none")
INITS = ("randn",)


@dataclass
class SynthesisConfig:
    """Data-free image synthesis from frozen teachers (DeepInversion / Adaptive DeepInversion).

    mode: ``cycling`` = one teacher per batch, round-robin; ``ensemble`` = mean of all teachers'
    logits; ``sampling`` = Sampling DeepInversion (Algorithm 1 of the seed report): at every
    gradient step ``num_teachers`` distinct teachers are drawn and their losses averaged.
    """

    name: str = "cpu"  # preset name (informational)
    method: str = "deepinversion"
    mode: str = "cycling"
    num_teachers: int = 3  # sampling only: teachers drawn per gradient step
    batch_size: int = 128
    iterations: int = 100  # gradient steps per synthetic batch
    lr: float = 0.25
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # Adam betas on the pixels
    l2_scale: float = 0.0  # weight of the l2 norm of the batch
    var_scale: float = 1e-3  # weight of the total-variation prior
    bn_scale: float = 3.0  # weight of the BatchNorm-statistics matching term
    first_bn_multiplier: float = 1.0  # extra weight on the first BN layer (1 = none)
    comp_scale: float = 10.0  # Adaptive DI competition term; only used when a student is given
    # cycling: the competition term compares the teacher and the student among the classes the
    # teacher holds `class_stats_min` images of or more (its softmax and the student's masked
    # to them), so a teacher is not matched against the student on classes it never learnt
    comp_known: bool = False
    temperature: float = 3.0  # softmax temperature of the competition (JS) term
    jitter: int = 2  # max random roll in pixels, both axes
    flip: bool | None = None  # random horizontal flip; None = the dataset's default
    label_mode: str = "uniform"  # uniform over the teacher's classes | weighted by class counts
    # | holders: each class mostly from the teachers holding most of it (inputs.holder_label_probs)
    class_mask: bool = False  # restrict a teacher's logits to the classes it owns before CE
    class_weighted_ce: bool = False  # CE weight w[t][l] = share of label l in teacher t's data
    lr_schedule: str = "cosine"  # cosine | none
    init: str = "randn"  # initial pixels (normalised space)
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
    # cycling: weight of a diversity term that spreads the teacher's penultimate features of a
    # batch apart, from each other and from its last `div_bank` images (synthesis/diversity.py;
    # 0 = off)
    div_scale: float = 0.0
    div_bank: int = 1024
    # method=deepinversion: weight of matching each class's per-pixel mean and variance, pooled
    # over the clients' uploaded pixel statistics (synthesis/pixels.py; needs upload.pixels;
    # 0 = off)
    pixel_scale: float = 0.0
    # --- speed (method=deepinversion; same math either way, see synthesis/stacked.py).
    # `stacked`: run the teachers as converted networks whose BatchNorm layers compute the
    # BN-statistics term with one fused forward/backward; a teacher that cannot be converted
    # runs as it is. false = the sequential path of before (kept for comparison).
    stacked: bool = True
    # with `stacked`: where a step uses several teachers (ensemble, parallel cycling), run
    # them as ONE grouped network when they share an architecture. null = auto: on for CUDA
    # or with more than one intra-op thread, off at 1 thread, where it was slower than one
    # fused teacher after another on the 2-core CPU (README "Synthesis speed").
    grouped: bool | None = None
    # cycling only, needs `grouped`: synthesise one batch per teacher at once (T independent
    # problems in one grouped forward) and hand them out one per synthesize() call, in
    # round-robin order.
    # Off by default: the T batches of a group are all made against the student as it was when
    # the group was made, so an adaptive batch handed out later is made against an older
    # student; and a group is always T batches, even if fewer are needed.
    parallel: bool = False
    # --- generator-based synthesis (method=generator: DENSE; method=fast: Fast data-free KD).
    # `iterations` = generator steps per batch, `lr` = the generator's learning rate.
    nz: int = 100  # latent size
    ngf: int = 16  # generator width (channels of its last hidden layer)
    lr_z: float = 0.01  # learning rate of the per-batch latent codes
    # generator/fast: what the CE, BN and adversarial terms aim at: `ensemble` = all teachers
    # combined (by `ensemble`); `cycling` = one teacher per batch, round-robin, labels drawn
    # from its classes (as DeepInversion's cycling)
    target: str = "ensemble"
    oh_scale: float = 1.0  # weight of the CE ("one-hot") term on the teachers' ensemble
    adv_scale: float = 1.0  # weight of the adversarial term (student-ensemble disagreement)
    bn_momentum: float = 0.9  # fast: momentum of the tracked BN statistics (0 = off)
    meta_update: str = "maml"  # fast: first-order MAML or Reptile update of the meta-generator
    # dense / coboost (the peers' recipes, synthesis/peers.py; sources in docs/peers.md):
    # max gradient norm of the generator's step (0 = none; Co-Boosting: 10)
    grad_clip: float = 0.0
    hardness: float = 1.0  # coboost: exponent h of the hard-sample CE weight (1 - p_y)^h
    # coboost: the re-fitted ensemble weights, one per client on its logits (`client`, as
    # published) or one per client and class on its softmax, starting at the class shares
    # (`client_class`, our class-share rule with re-fitted shares)
    coboost_weights: str = "client"
    coboost_mu: float = 0.01  # coboost: size of the weights' signed gradient step
    coboost_mu_decay: float = 0.99  # coboost: the step shrinks by this factor every round
    # How the teachers' outputs combine into the target of the generator's CE and adversarial
    # terms and FedDF's pseudo-labels: weighted (class shares) | probs | logits.
    ensemble: str = "weighted"
    # --- method=public (FedDF): unlabeled images of another dataset instead of synthesis.
    public_dataset: str = "mnist5k"
    public_data_dir: str | None = None  # None = the usual lookup (see `fed-distill data info`)
    public_limit: int | None = None  # use at most this many public images (None = all)

    def check_upload(self, upload: Any) -> None:
        """Raise ConfigError (one line) where this synthesis needs statistics the clients'
        ``upload`` config (``fed_distill.config.UploadConfig``) does not send."""
        if self.pixel_scale > 0 and not (upload.class_stats and upload.pixels):
            raise ConfigError(
                f"synthesis.pixel_scale={self.pixel_scale} needs the clients' pixel statistics:"
                " add upload.pixels=true (docs/class_stats.md says what they reveal) or set"
                " synthesis.pixel_scale=0"
            )

    def validate(self, num_available: int | None = None) -> SynthesisConfig:
        """Raise ConfigError (one line) on a bad value; ``num_available`` = teachers at hand."""

        def bad(msg: str) -> ConfigError:
            return ConfigError(f"synthesis.{msg}")

        def one_of(key: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                raise bad(f"{key} must be one of {', '.join(options)}, got '{value}'")

        extra = tuple(sorted(REGISTERED_METHODS - set(SYNTHESIS_METHODS)))
        one_of("method", self.method, SYNTHESIS_METHODS + extra)
        one_of("mode", self.mode, SYNTHESIS_MODES)
        one_of("label_mode", self.label_mode, LABEL_MODES)
        one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        one_of("init", self.init, INITS)
        one_of("meta_update", self.meta_update, META_UPDATES)
        one_of("ensemble", self.ensemble, ENSEMBLES)
        one_of("target", self.target, GENERATOR_TARGETS)
        one_of("coboost_weights", self.coboost_weights, COBOOST_WEIGHTS)
        for key in ("batch_size", "iterations", "num_teachers", "nz", "ngf", "class_stats_min"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(f"{key} must be a positive integer, got {value!r}")
        if (
            self.mode == "sampling"
            and num_available is not None
            and self.num_teachers > num_available
        ):
            raise bad(
                f"num_teachers={self.num_teachers} but only {num_available} teachers are "
                "available for sampling"
            )
        if not self.lr > 0:
            raise bad(f"lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise bad(f"temperature must be > 0, got {self.temperature}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise bad(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.lr_z > 0:
            raise bad(f"lr_z must be > 0, got {self.lr_z}")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise bad(f"bn_momentum must be in [0, 1), got {self.bn_momentum}")
        if self.public_limit is not None and (
            isinstance(self.public_limit, bool)
            or not isinstance(self.public_limit, int)
            or self.public_limit < 1
        ):
            raise bad(f"public_limit must be a positive integer or null, got {self.public_limit!r}")
        for key in (
            "l2_scale",
            "var_scale",
            "bn_scale",
            "comp_scale",
            "first_bn_multiplier",
            "oh_scale",
            "adv_scale",
            "feature_scale",
            "div_scale",
            "pixel_scale",
            "grad_clip",
            "hardness",
            "coboost_mu",
        ):
            if not getattr(self, key) >= 0:  # also rejects NaN
                raise bad(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.coboost_mu_decay <= 1.0:
            raise bad(f"coboost_mu_decay must be in (0, 1], got {self.coboost_mu_decay}")
        for key in ("jitter", "div_bank"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(f"{key} must be an integer >= 0, got {value!r}")
        pixels = self.method == "deepinversion" and self.mode == "cycling" and not self.parallel
        if self.div_scale > 0 and not pixels:
            raise bad("div_scale applies to method=deepinversion, mode=cycling, parallel=false")
        if self.comp_known and self.mode != "cycling":
            raise bad("comp_known applies to mode=cycling")
        if self.class_weighted_ce and self.mode == "ensemble":
            # Ensemble CE is on the mean logits: there is no per-teacher term to weight.
            raise bad("class_weighted_ce applies to mode=cycling or sampling, not ensemble")
        check_finite(self, "synthesis")  # what the checks above let through: inf
        return self
