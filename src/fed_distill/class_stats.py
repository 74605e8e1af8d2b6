"""Per-class feature statistics: what a client uploads beside its teacher, and what a server
inverts against.

For every ``BatchNorm2d`` of a teacher (module order), the client computes, in eval mode over
its own training images, the per-class mean and biased variance of that layer's *input* (over
samples and positions) and the per-class sample counts; optionally also the per-class mean and
variance of the penultimate features (the input of the last ``Linear``). They are the same kind
of aggregate as the BN running statistics already inside the uploaded weights, split by label:
a few KB for a small CNN.

File ``teachers/class_stats_{i}.safetensors``::

    counts          (K,)    int64    training images per class
    bn.{j}.mean     (K, C_j) float32  per-class mean of BN layer j's input
    bn.{j}.var      (K, C_j) float32  per-class biased variance of it
    feat.mean/var   (K, D)   float32  penultimate features (optional)
    pixel.mean/var  (K, CHW) float32  per-pixel mean / variance of the normalised images of
                                      each class: "layer 0", an average image per class
                                      (optional, ``upload.pixels``; docs/class_stats.md)

A class the client holds no image of has zeros. The server (:func:`class_targets`) replaces the
rows of classes a client holds fewer than ``min_count`` images of by that client's global BN
running statistics, so every class has a target; :func:`class_mean_var` and
:func:`class_bn_term` give the batch side of the per-class DeepInversion term.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fed_distill.errors import ProtocolError

STATS_FILE = "class_stats_{}.safetensors"


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm2d layers of ``model`` in module order (the order the hooks use)."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def feature_layer(model: nn.Module) -> nn.Linear | None:
    """The last ``nn.Linear`` in module order: its input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class _ClassSums:
    """Per-class Σx, Σx² and counts of a hooked layer's input, accumulated in float64."""

    def __init__(self, num_classes: int, per_position: bool = False) -> None:
        self.k = num_classes
        # per_position: every (channel, position) is a feature of its own (pixel statistics)
        self.per_position = per_position
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.n = torch.zeros(num_classes, dtype=torch.float64)
        self.labels: torch.Tensor | None = None

    def __call__(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().float()
        flat = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)  # (N, C, P)
        if self.per_position:
            flat = x.flatten(1).unsqueeze(-1)  # (N, C·H·W, 1)
        # per-image sums in float32 (a few hundred positions), across images in float64
        onehot = nn.functional.one_hot(self.labels, self.k).double().to(x.device)  # (N, K)
        s1 = onehot.t() @ flat.sum(dim=2).double()
        s2 = onehot.t() @ flat.square().sum(dim=2).double()
        self.s1 = s1.cpu() if self.s1 is None else self.s1 + s1.cpu()
        self.s2 = s2.cpu() if self.s2 is None else self.s2 + s2.cpu()
        self.n += onehot.sum(dim=0).cpu() * flat.shape[2]

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.s1 is not None and self.s2 is not None
        n = self.n.clamp_min(1.0)[:, None]
        mean = self.s1 / n
        var = (self.s2 / n - mean.square()).clamp_min(0.0)
        return mean.float(), var.float()


@torch.no_grad()
def compute_class_stats(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalizer,
    num_classes: int,
    device: torch.device | str = "cpu",
    features: bool = True,
    batch_size: int = 512,
    pixels: bool = False,
) -> dict[str, torch.Tensor]:
    """The class-statistics dict of ``model`` (eval mode) on ``images`` (uint8) / ``labels``
    (what a client computes once, on its own training part, after training its teacher);
    ``pixels``: also each class's per-pixel mean and variance of the normalised images."""
    layers = bn_layers(model)
    hooked: list[tuple[str, nn.Module]] = [(f"bn.{j}", m) for j, m in enumerate(layers)]
    head = feature_layer(model) if features else None
    if head is not None:
        hooked.append(("feat", head))
    sums = {name: _ClassSums(num_classes) for name, _ in hooked}
    handles = [m.register_forward_pre_hook(sums[name]) for name, m in hooked]
    if pixels:  # "layer 0": the images themselves, one position per pixel
        sums["pixel"] = _ClassSums(num_classes, per_position=True)
        handles.append(model.register_forward_pre_hook(sums["pixel"]))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(labels), batch_size):
            y = labels[i : i + batch_size].to(device)
            for s in sums.values():
                s.labels = y
            model(normalizer(images[i : i + batch_size].to(device)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {"counts": torch.bincount(labels.long().cpu(), minlength=num_classes)}
    for name, s in sums.items():
        if s.s1 is None:  # no images at all: zeros of the right width
            if name == "pixel":
                width = images[0].numel()
            else:
                width = layers[int(name[3:])].num_features if name != "feat" else head.in_features
            zeros = torch.zeros(num_classes, width)
            out[f"{name}.mean"], out[f"{name}.var"] = zeros, zeros.clone()
        else:
            out[f"{name}.mean"], out[f"{name}.var"] = s.mean_var()
    return out


def check_class_stats(
    stats: Mapping[str, torch.Tensor], model: nn.Module, num_classes: int, who: str
) -> None:
    """Raise ProtocolError (one line) unless ``stats`` fit ``model``'s BN layers and
    ``num_classes``: every key present with the right shape, finite values, non-negative
    variances and counts."""
    layers = bn_layers(model)
    want = {"counts": (num_classes,)}
    for j, m in enumerate(layers):
        want[f"bn.{j}.mean"] = want[f"bn.{j}.var"] = (num_classes, m.num_features)
    head = feature_layer(model)
    if "feat.mean" in stats or "feat.var" in stats:
        if head is None:
            raise ProtocolError(f"{who}: class statistics hold features but the model has none")
        want["feat.mean"] = want["feat.var"] = (num_classes, head.in_features)
    if "pixel.mean" in stats or "pixel.var" in stats:
        want["pixel.mean"] = want["pixel.var"] = _pixel_shape(stats, num_classes, who)
    note = f" for a model with {len(layers)} BatchNorm layers"
    check_tensor_upload(stats, want, who, "class statistic", note)
    for key, t in stats.items():
        if (key == "counts" or key.endswith(".var")) and bool((t < 0).any()):
            raise ProtocolError(f"{who}: class statistic '{key}' has negative values")


def check_keys(
    got: Mapping[str, Any], want: Iterable[str], who: str, what: str, note: str = ""
) -> None:
    """One ProtocolError line naming ``who`` unless ``got`` has exactly the keys ``want``
    (``what``: how the message names one entry, e.g. "weight"; ``note``: advice after it)."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ProtocolError(
            f"{who}: {what}s have missing keys {missing[:3]} / unknown keys {extra[:3]}{note}"
        )


def check_tensor_upload(
    stats: Mapping[str, torch.Tensor],
    want: Mapping[str, tuple[int, ...]],
    who: str,
    what: str,
    note: str = "",
) -> None:
    """The checks every statistics upload starts with, one ProtocolError line naming ``who``:
    exactly the keys of ``want``, each of its shape, every value finite (``what``: how the
    message names one entry, e.g. "class statistic")."""
    check_keys(stats, want, who, what, note)
    for key, shape in want.items():
        t = stats[key]
        if tuple(t.shape) != shape:
            raise ProtocolError(
                f"{who}: {what} '{key}' has shape {tuple(t.shape)}, expected {shape}"
            )
        if not bool(torch.isfinite(t.double()).all()):
            raise ProtocolError(f"{who}: {what} '{key}' contains NaN or Inf")


def _pixel_shape(stats: Mapping[str, torch.Tensor], num_classes: int, who: str) -> tuple:
    """The shape both pixel statistics must have: (K, D) with the D the client sent (the
    synthesizer checks D against the image size it makes); each key is named for its own
    shape, and a mean and variance of different widths are named together, neither blamed
    for the other."""
    widths = {}
    for key in ("pixel.mean", "pixel.var"):
        t = stats.get(key)
        if t is None:
            continue
        if t.dim() != 2 or t.shape[1] < 1:
            raise ProtocolError(
                f"{who}: class statistic '{key}' must be (classes, pixels), got {tuple(t.shape)}"
            )
        widths[key] = int(t.shape[1])
    if len(set(widths.values())) > 1:
        raise ProtocolError(
            f"{who}: class statistics 'pixel.mean' of shape {tuple(stats['pixel.mean'].shape)} and"
            f" 'pixel.var' of shape {tuple(stats['pixel.var'].shape)} must have the same width"
            " (the images' channels x height x width); recompute them with upload.pixels=true"
        )
    return (num_classes, next(iter(widths.values())))


def save_class_stats(stats: Mapping[str, torch.Tensor], path: str | Path) -> None:
    from fed_distill.artifacts import save_weights

    save_weights(dict(stats), path, metadata={"kind": "class_stats"})


def load_class_stats(
    path: str | Path, model: nn.Module, num_classes: int
) -> dict[str, torch.Tensor] | None:
    """The checked class statistics at ``path``, or None when there is no such file."""
    from fed_distill.artifacts import read_weights

    path = Path(path)
    if not path.is_file():
        return None
    stats = read_weights(path)
    check_class_stats(stats, model, num_classes, str(path))
    return stats


@dataclass
class ClassTargets:
    """What a synthesizer matches for one teacher: per BN layer the (K, C) target mean and
    variance of each class; optionally the (K, D) per-class mean penultimate features, matched
    with weight ``feature_scale`` relative to the BN term."""

    bn: list[tuple[torch.Tensor, torch.Tensor]]
    feat: torch.Tensor | None = None
    feature_scale: float = 0.0


def class_targets(
    model: nn.Module,
    stats: Mapping[str, torch.Tensor],
    min_count: int,
    feature_scale: float = 0.0,
) -> ClassTargets:
    """The targets of one teacher: the client's class-c statistics where it holds at least
    ``min_count`` images of c, its global statistics otherwise (the BN running statistics;
    for features, the count-weighted mean over its classes). Features only with
    ``feature_scale`` > 0 and when the client uploaded them."""
    use = (stats["counts"] >= max(1, int(min_count)))[:, None]
    bn = []
    for j, m in enumerate(bn_layers(model)):
        assert m.running_mean is not None and m.running_var is not None
        rm, rv = m.running_mean.detach().float(), m.running_var.detach().float()
        dev = rm.device
        mean = torch.where(use.to(dev), stats[f"bn.{j}.mean"].to(dev).float(), rm)
        var = torch.where(use.to(dev), stats[f"bn.{j}.var"].to(dev).float(), rv)
        bn.append((mean, var))
    feat = None
    if feature_scale > 0 and "feat.mean" in stats:
        fm = stats["feat.mean"].float()
        n = stats["counts"].float()[:, None]
        overall = (fm * n).sum(dim=0) / n.sum().clamp_min(1.0)
        dev = bn[0][0].device if bn else torch.device("cpu")
        feat = torch.where(use, fm, overall).to(dev)
    return ClassTargets(bn, feat, float(feature_scale) if feat is not None else 0.0)


class ClassFeatureHook:
    """Forward pre-hook on a teacher's last linear layer (or a grouped one over T teachers):
    after a forward, ``term`` (T,) = Σ_k w[t, k] ‖mean of teacher t's features over the images
    of class k − target[t, k]‖₂. ``classes`` = ((T, N, K) membership, (T, K) weights)."""

    def __init__(self, layer: nn.Module, targets: torch.Tensor) -> None:
        self.targets = targets  # (T, K, D)
        self.classes: tuple[torch.Tensor, torch.Tensor] | None = None
        self.term: torch.Tensor | None = None
        self.enabled = True
        self._handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not self.enabled or self.classes is None:
            return
        member, weights = self.classes
        f = inputs[0].float()
        f = f.reshape(f.shape[0], self.targets.shape[0], -1)  # (N, T, D)
        inv = 1.0 / member.sum(dim=1).clamp_min(1.0)  # (T, K)
        mean = torch.einsum("tnk,ntd->tkd", member, f) * inv[..., None]
        d = torch.linalg.vector_norm(mean - self.targets, dim=-1)
        self.term = (d * weights).sum(dim=-1)

    def remove(self) -> None:
        self._handle.remove()


def class_membership(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(…, N) labels → (…, N, K) float one-hot membership."""
    return nn.functional.one_hot(labels.long(), num_classes).float()


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(…, N) labels → (…, K) share of the batch in each class (n_k / N)."""
    return class_membership(labels, num_classes).mean(dim=-2)


def class_mean_var(x: torch.Tensor, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean and biased variance of (N, C, H, W) ``x`` over the images of each class
    and their positions; ``member`` (N, K) one-hot. Returns (K, C) each (zeros for a class with
    no image; give those zero weight)."""
    hw = x.shape[2] * x.shape[3]
    s1 = x.sum(dim=(2, 3))  # (N, C)
    s2 = x.square().sum(dim=(2, 3))
    inv = 1.0 / (member.sum(dim=0) * hw).clamp_min(1.0)  # (K,)
    mean = (member.t() @ s1) * inv[:, None]
    var = (member.t() @ s2) * inv[:, None] - mean.square()
    return mean, var.clamp_min(0.0)


def class_bn_term(
    mean: torch.Tensor,
    var: torch.Tensor,
    target_mean: torch.Tensor,
    target_var: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Σ_k w_k (‖mean_k − target_mean_k‖₂ + ‖var_k − target_var_k‖₂) over the last axis;
    leading axes (e.g. teachers) are kept. With one class of weight 1 it is DeepInversion's
    global BN term."""
    d = torch.linalg.vector_norm(mean - target_mean, dim=-1) + torch.linalg.vector_norm(
        var - target_var, dim=-1
    )
    return (d * weights).sum(dim=-1)
