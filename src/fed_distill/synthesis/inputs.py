"""What every synthesizer checks and draws from its inputs: the teachers' class counts and
weights, the label distribution and balanced labels, private frozen copies of the teachers, and
the per-class targets built from the class statistics the clients uploaded; and
:class:`TeacherSynthesizer`, the constructor the built-in synthesizers share."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fed_distill.class_stats import ClassTargets, class_targets
from fed_distill.data.transforms import Normalizer
from fed_distill.ensemble import class_shares
from fed_distill.errors import ConfigError
from fed_distill.synthesis.base import Synthesizer
from fed_distill.synthesis.options import DeepInversionOptions, InversionOptions, SynthesisOptions
from fed_distill.synthesis.pixels import pooled_pixel_targets


def teacher_class_weights(class_counts: np.ndarray | torch.Tensor) -> torch.Tensor:
    """w[t][l] = share of label l in teacher t's training data; rows sum to 1 (float32, CPU)."""
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
    if counts.ndim != 2:
        raise ConfigError(
            f"class_counts must be (num_teachers, num_classes), got {tuple(counts.shape)}"
        )
    if (counts < 0).any():
        raise ConfigError("class_counts must be non-negative")
    totals = counts.sum(dim=1, keepdim=True)
    if (totals <= 0).any():
        empty = [i for i, v in enumerate(totals.flatten().tolist()) if v <= 0]
        raise ConfigError(f"teacher(s) {empty} have no training data (all class counts are 0)")
    return (counts / totals).float()


def synthesis_inputs(
    teachers: list[nn.Module], class_counts: np.ndarray, image_shape: tuple[int, ...]
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The checks every synthesizer makes on its inputs: at least one teacher, class counts
    (T, C) non-negative with one non-empty row per teacher, an image shape (C, H, W). Returns
    the counts as float64 and the shape as ints; raises ConfigError (one line) otherwise."""
    if not teachers:
        raise ConfigError("synthesis needs at least one teacher")
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
    teacher_class_weights(counts)  # 2-D, non-negative, no empty teacher
    if counts.shape[0] != len(teachers):
        raise ConfigError(
            f"class_counts has {counts.shape[0]} rows but there are {len(teachers)} teachers"
        )
    if len(image_shape) != 3:
        raise ConfigError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    c, h, w = (int(v) for v in image_shape)
    return counts, (c, h, w)


def label_probs(
    counts: torch.Tensor, label_mode: str, ids: list[int] | None = None
) -> torch.Tensor:
    """Label distribution of a batch made by teachers ``ids`` (all when None) of the (T, C)
    class ``counts``: ``uniform`` over the classes any of them owns, ``weighted`` by their
    summed counts, or ``holders``: the rows ``ids`` of :func:`holder_label_probs`, averaged (each
    class drawn mostly by the teachers that hold most of it; all teachers together draw every
    class equally often)."""
    if label_mode == "holders":
        table = holder_label_probs(counts)
        rows = table if ids is None else table[ids]
        return rows.mean(dim=0).float()
    sub = counts if ids is None else counts[ids]
    total = sub.sum(dim=0)
    p = (total > 0).double() if label_mode == "uniform" else total
    return (p / p.sum()).float()


def holder_label_probs(counts: torch.Tensor, iterations: int = 200) -> torch.Tensor:
    """(T, C): the label distribution of each teacher's batches under ``label_mode=holders``.

    Starts from the class shares (teacher t's share of class c's data) and rescales rows and
    columns alternately (Sinkhorn) until each row is a distribution and each column sums to
    T/C, so that a round of T batches draws every class equally often and each class's images
    come from its holders in proportion to their shares: a teacher that saw 1 shirt of 6,000
    makes almost none. Where no such table exists (a teacher holding most of too many
    classes) the rows stay distributions and the columns come as close as the shares allow."""
    c = counts.double()
    t, k = c.shape
    q = class_shares(c).double()
    held = c.sum(dim=0) > 0
    target = torch.where(held, torch.full((k,), t / max(int(held.sum()), 1)), torch.zeros(k))
    target = target.to(q)
    for _ in range(iterations):
        q = q * (target / q.sum(dim=0).clamp_min(1e-300))
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-300)
    return q


def balanced_labels(probs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels following ``probs`` with the least sampling noise: each class gets
    floor(p·n) labels, the remainder goes to distinct classes drawn by the leftover mass; then
    shuffled. (A multinomial draw would leave classes under-represented in small batches.)"""
    base = torch.floor(probs * n).long()
    labels = torch.repeat_interleave(torch.arange(probs.numel()), base)
    rest = n - int(base.sum())
    if rest > 0:
        resid = (probs * n - base).clamp_min(0)
        extra = torch.multinomial(resid / resid.sum(), rest, replacement=False, generator=generator)
        labels = torch.cat([labels, extra])
    return labels[torch.randperm(n, generator=generator)]


def frozen_copies(
    teachers: list[nn.Module], device: torch.device, need_bn: bool = False
) -> list[nn.Module]:
    """Private frozen copies of the teachers: the caller's modules keep their mode, grads and
    layout. ``need_bn`` (the BN term is on): at least one teacher must have BatchNorm layers;
    one without them gets a one-line note (it adds no BN term). On CPU the copies are channels_last, oneDNN's fast path for conv/pool (~1.2x per
    step). No weight gradient is ever computed through them, only gradients to the input."""
    fmt = torch.channels_last if device.type == "cpu" else torch.preserve_format
    out = []
    for teacher in teachers:
        t = copy.deepcopy(teacher).to(device, memory_format=fmt)
        t.eval().requires_grad_(False)
        out.append(t)
    without = [i for i, t in enumerate(out) if not has_bn(t)]
    if need_bn and len(without) == len(out):
        raise ConfigError(
            "synthesis.bn_scale > 0 needs teachers with BatchNorm2d layers; "
            "use a BN model or set synthesis.bn_scale=0"
        )
    if need_bn and without:
        print(
            f"note: teacher(s) {without} have no BatchNorm2d layers: they contribute the CE and"
            " adversarial terms only, not the BN-statistics term"
        )
    return out


def has_bn(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm2d layer (the BN-statistics term needs one)."""
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def teachers_class_targets(
    teachers: list[nn.Module],
    class_stats: list[dict[str, torch.Tensor] | None] | None,
    cfg: InversionOptions,
) -> list[ClassTargets] | None:
    """Per teacher, the class targets of the per-class BN (and feature) term
    (:func:`fed_distill.class_stats.class_targets`), or None: global statistics, when
    ``synthesis.class_stats`` is off, the BN term is off, or some teacher has no statistics."""
    if not cfg.class_stats or cfg.bn_scale <= 0 or not class_stats:
        return None
    if len(class_stats) != len(teachers) or any(s is None for s in class_stats):
        return None
    if cfg.feature_scale > 0 and any("feat.mean" not in s for s in class_stats):  # type: ignore[operator]
        print(
            f"note: synthesis.feature_scale={cfg.feature_scale} but the clients uploaded no feature"
            " statistics (train-teachers with upload.features=true); the feature term is off"
        )
    return [
        class_targets(t, s, cfg.class_stats_min, cfg.feature_scale)  # type: ignore[arg-type]
        for t, s in zip(teachers, class_stats, strict=True)
    ]


def pixel_targets(
    class_stats: list[dict[str, torch.Tensor] | None] | None,
    cfg: DeepInversionOptions,
    image_shape: tuple[int, int, int],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The targets of the pixel-statistics term (:mod:`fed_distill.synthesis.pixels`), or None
    when ``synthesis.pixel_scale`` is 0; a ConfigError (one line) when the term is asked for
    but some client uploaded no pixel statistics."""
    if cfg.pixel_scale <= 0:
        return None
    if not class_stats or any(s is None or "pixel.mean" not in s for s in class_stats):
        raise ConfigError(
            f"synthesis.pixel_scale={cfg.pixel_scale} needs every client's pixel statistics:"
            " train-teachers with upload.pixels=true (or set synthesis.pixel_scale=0)"
        )
    n = image_shape[0] * image_shape[1] * image_shape[2]
    mean, var = pooled_pixel_targets(class_stats, n)  # type: ignore[arg-type]
    return mean.to(device), var.to(device)


class TeacherSynthesizer(Synthesizer):
    """A synthesizer over private frozen copies of the teachers: the constructor the built-in
    ones share, with the calling convention of ``build_synthesizer``.

    It checks the inputs and validates ``cfg``, and keeps ``cfg``, ``device``, ``image_shape``
    (C, H, W), ``counts`` (T, C) float64, ``num_classes``, ``teachers`` (the frozen copies),
    ``shares`` (the class shares of ``ensemble.py``, on ``device``), ``normalizer``, ``flip``
    (``cfg.flip``, else ``hflip``), ``seed``, ``generator`` (the seeded CPU generator that draws
    every random choice, so a seed gives the same batches on any device) and ``class_targets``
    (:func:`teachers_class_targets`; None where ``uses_bn`` is false). A subclass takes its own
    keyword arguments and passes the rest on (``*inputs, **options``); ``build_synthesizer``
    offers it those it declares and this constructor's."""

    #: Whether the method matches the teachers' BN statistics (``synthesis.bn_scale``).
    uses_bn: bool = True

    def __init__(
        self,
        cfg: SynthesisOptions,
        teachers: list[nn.Module],
        class_counts: np.ndarray,
        image_shape: tuple[int, int, int],
        normalizer: Normalizer,
        hflip: bool = False,
        device: torch.device | str = "cpu",
        seed: int = 0,
        class_stats: list[dict[str, torch.Tensor] | None] | None = None,
    ) -> None:
        counts, self.image_shape = synthesis_inputs(teachers, class_counts, image_shape)
        cfg.validate(num_available=len(teachers))
        self.cfg = cfg
        self.device = torch.device(device)
        self.counts = counts
        self.num_classes = int(counts.shape[1])
        need_bn = self.uses_bn and cfg.bn_scale > 0  # type: ignore[attr-defined]
        self.teachers = frozen_copies(teachers, self.device, need_bn=need_bn)
        self.shares = class_shares(counts).to(self.device)
        self.normalizer = normalizer
        self.flip = bool(hflip) if cfg.flip is None else bool(cfg.flip)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        # per teacher, per BN layer: (K, C) class targets (None: the global BN statistics)
        self.class_targets = (
            teachers_class_targets(self.teachers, class_stats, cfg) if self.uses_bn else None
        )
        self.uploaded = class_stats  # the clients' uploaded statistics, as given
