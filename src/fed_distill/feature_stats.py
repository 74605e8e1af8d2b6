"""The statistics round after distillation: what a client returns about the student's features.

After ``train-student`` the server may send the distilled student to the clients once. Each runs
it in eval mode over its own labelled images and returns, per class, three sums of the
student's *penultimate* features (the input of its last ``nn.Linear``, width ``D``)::

    counts  (K,)       int64    images of each class
    sum     (K, D)     float64  Σ f(x) over the class's images
    outer   (K, D, D)  float64  Σ f(x) f(x)ᵀ over them

File ``feedback/feature_stats_{i}.safetensors``, with the metadata ``student`` = the digest of
the student the client was sent (:func:`student_digest`), so statistics of another student are
refused. Sums, not means, so the server pools clients by adding them (:func:`pool`); the
class means and covariances follow. For ``cnn_small`` (D = 32) that is 10,570 numbers per client.

``features=map`` (``refit.features``) describes instead the last block's whole feature map, the
input of the student's global average pool (D = C·H·W: 288 for ``cnn_small`` on 28×28 images):
where each part of the image lies, which the average throws away.

The sums are accumulated in float64: a covariance from raw second moments loses digits to
cancellation in float32. Optional Gaussian noise (:func:`add_noise`, ``refit.noise`` with
``refit.clip``) is added by the client before upload; docs/class_stats.md says what the
statistics reveal and what the noise is (and is not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fed_distill.artifacts import read_weights, save_weights, tensors_digest
from fed_distill.class_stats import check_tensor_upload, feature_layer
from fed_distill.errors import ProtocolError

FEEDBACK_DIR = "feedback"
FEATURE_STATS_FILE = "feature_stats_{}.safetensors"
KEYS = ("counts", "sum", "outer")
FEATURES = ("penultimate", "map")  # what the clients describe (refit.features; feature_site)


def feature_site(model: nn.Module, features: str = "penultimate") -> nn.Module | None:
    """The module whose *input* the statistics describe: ``penultimate``, the last Linear (its
    input is the pooled feature vector); ``map``, the last global average pool (its input is
    the last block's whole feature map, C x H x W, before it is averaged away)."""
    if features == "map":
        pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
        return pools[-1] if pools else None
    return feature_layer(model)


@torch.no_grad()
def feature_width(
    model: nn.Module, features: str = "penultimate", image_shape: tuple[int, ...] = ()
) -> int | None:
    """D: how many numbers per image the statistics describe (None: the model has no such
    layer); ``map`` runs one blank image of ``image_shape`` through the model to see it."""
    site = feature_site(model, features)
    if site is None:
        return None
    if features != "map":
        return int(site.in_features)
    if not image_shape:
        raise ValueError("feature_width(features='map') needs the image shape (C, H, W)")
    got: list[torch.Tensor] = []
    handle = site.register_forward_pre_hook(lambda _m, inp: got.append(inp[0]))
    was_training = model.training
    try:
        device = next(model.parameters()).device
        model.eval()(torch.zeros(1, *image_shape, device=device))
    finally:
        handle.remove()
        model.train(was_training)
    return int(got[0][0].numel())


def student_digest(student: nn.Module) -> str:
    """What identifies the student the statistics describe (its weights, by content)."""
    return tensors_digest(student.state_dict())


@torch.no_grad()
def compute_feature_stats(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalizer,
    num_classes: int,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    clip: float | None = None,
    features: str = "penultimate",
) -> dict[str, torch.Tensor]:
    """The client's side: per-class count, Σf and Σffᵀ of ``model``'s features f (``features``:
    see :func:`feature_site`) on ``images`` (uint8) / ``labels``, in eval mode; ``clip``: each
    feature vector is first scaled down to L2 norm ≤ clip (what bounds one image's share, for
    :func:`add_noise`)."""
    site = feature_site(model, features)
    if site is None:
        raise ProtocolError(f"the student has no layer for features={features} to describe")
    d = feature_width(model, features, tuple(images.shape[1:]))
    s1 = torch.zeros(num_classes, d, dtype=torch.float64)
    s2 = torch.zeros(num_classes, d, d, dtype=torch.float64)
    got: list[torch.Tensor] = []
    handle = site.register_forward_pre_hook(lambda _m, inp: got.append(inp[0].detach()))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(labels), batch_size):
            got.clear()
            model(normalizer(images[i : i + batch_size].to(device)))
            f = got[0].flatten(1).double().cpu()
            if clip is not None:
                f = f * (clip / f.norm(dim=1, keepdim=True).clamp_min(clip))
            y = labels[i : i + batch_size].long().cpu()
            s1.index_add_(0, y, f)
            for c in y.unique().tolist():  # one (D, D) product per class in the batch
                fc = f[y == c]
                s2[c] += fc.T @ fc
    finally:
        handle.remove()
        model.train(was_training)
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes)
    return {"counts": counts, "sum": s1, "outer": s2}


def add_noise(
    stats: dict[str, torch.Tensor], noise: float, clip: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Gaussian noise of std ``noise·clip`` on every entry of the sums and ``noise·clip²`` on the
    outer products (symmetric, so the upload stays symmetric); counts stay exact (the label
    counts are uploaded anyway). The Gaussian mechanism with multiplier ``noise`` for features
    clipped to norm ``clip``: a privacy guarantee only once someone calibrates and accounts it."""
    if noise <= 0:
        return stats
    s1, s2 = stats["sum"], stats["outer"]
    held = (stats["counts"] > 0).double()  # a class without images stays exactly zero
    e1 = torch.randn(s1.shape, generator=generator, dtype=torch.float64) * noise * clip
    e2 = torch.randn(s2.shape, generator=generator, dtype=torch.float64) * noise * clip**2
    e2 = (e2 + e2.transpose(1, 2)) / 2**0.5  # symmetric, each entry still of std noise·clip²
    return {
        "counts": stats["counts"],
        "sum": s1 + e1 * held.view(-1, 1),
        "outer": s2 + e2 * held.view(-1, 1, 1),
    }


def check_feature_stats(
    stats: Mapping[str, torch.Tensor], dim: int, num_classes: int, who: str, noise_tol: float = 0.0
) -> None:
    """Raise ProtocolError (one line naming ``who``) unless ``stats`` are feature statistics of
    width ``dim`` for ``num_classes`` classes: the three keys with their shapes, finite, counts
    integral and ≥ 0, zero sums for a class without images, each class's outer-product sum
    symmetric and its covariance positive semi-definite within tolerance (``noise_tol``: the
    size of the noise the clients were asked to add)."""
    want = {"counts": (num_classes,), "sum": (num_classes, dim), "outer": (num_classes, dim, dim)}
    note = f"; expected {', '.join(KEYS)}"
    check_tensor_upload(stats, want, who, "feature statistic", note)
    for key, t in stats.items():
        ok = torch.is_floating_point(t) if key != "counts" else t.dtype != torch.bool
        if not ok or t.is_complex():
            raise ProtocolError(f"{who}: feature statistic '{key}' has dtype {t.dtype}")
    n = stats["counts"].double()
    if bool((n < 0).any()) or bool((n != n.round()).any()):
        raise ProtocolError(f"{who}: feature statistic 'counts' must be whole numbers >= 0")
    _check_moments(stats, n, who, noise_tol)


def _check_moments(
    stats: Mapping[str, torch.Tensor], n: torch.Tensor, who: str, tol: float
) -> None:
    s1, s2 = stats["sum"].double(), stats["outer"].double()
    empty = n == 0
    if bool(empty.any()) and (s1[empty].abs().max() > tol or s2[empty].abs().max() > tol):
        k = int(empty.nonzero()[0])
        raise ProtocolError(f"{who}: class {k} has no images but non-zero feature sums")
    scale = s2.abs().amax(dim=(1, 2)).clamp_min(1e-12)  # per class
    asym = (s2 - s2.transpose(1, 2)).abs().amax(dim=(1, 2))
    if bool((asym > 1e-6 * scale + tol).any()):
        k = int((asym > 1e-6 * scale + tol).nonzero()[0])
        raise ProtocolError(f"{who}: feature statistic 'outer' of class {k} is not symmetric")
    held = ~empty
    if not bool(held.any()):
        return
    nh = n[held].view(-1, 1, 1)
    mean = s1[held] / nh.view(-1, 1)
    cov = s2[held] / nh - mean.unsqueeze(2) * mean.unsqueeze(1)
    low = torch.linalg.eigvalsh((cov + cov.transpose(1, 2)) / 2).amin(dim=1)
    bound = 1e-6 * (scale[held] / n[held]) + tol / n[held].clamp_min(1)
    if bool((low < -bound).any()):
        k = int(held.nonzero()[int((low < -bound).nonzero()[0])])
        raise ProtocolError(
            f"{who}: the feature covariance of class {k} is not positive semi-definite"
            f" (eigenvalue {float(low.min()):.3g}); these are not sums of real features"
        )


def save_feature_stats(
    stats: Mapping[str, torch.Tensor], path: str | Path, round_: Mapping[str, str]
) -> None:
    """Write one client's upload with what identifies its round (``student``: the digest of the
    student it describes; ``round``: the client-side settings) as metadata."""
    save_weights(dict(stats), path, metadata={"kind": "feature_stats", **round_})


def read_feature_stats(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
    """The tensors of a statistics file (safetensors only; a pickle is refused unread) and the
    round it says it belongs to (``student`` and ``round``; None where it says nothing)."""
    from safetensors import safe_open

    stats = read_weights(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return stats, {"student": meta.get("student"), "round": meta.get("round")}


@dataclass
class ClassGaussians:
    """The clients' statistics pooled: per class the image count, feature mean and covariance."""

    counts: torch.Tensor  # (K,) float64
    mean: torch.Tensor  # (K, D) float64, zeros for a class without images
    cov: torch.Tensor  # (K, D, D) float64, PSD (negative eigenvalues from noise clipped)

    @property
    def held(self) -> torch.Tensor:
        """(K,) bool: classes some client holds at least 2 images of (a covariance exists)."""
        return self.counts >= 2


def pool(stats: Sequence[Mapping[str, torch.Tensor]]) -> ClassGaussians:
    """Add the clients' sums, then per class the mean and the (biased) covariance, projected
    onto the PSD cone (noisy uploads can leave small negative eigenvalues)."""
    n = sum(s["counts"].double() for s in stats)
    s1 = sum(s["sum"].double() for s in stats)
    s2 = sum(s["outer"].double() for s in stats)
    safe = n.clamp_min(1)
    mean = s1 / safe.view(-1, 1)
    cov = s2 / safe.view(-1, 1, 1) - mean.unsqueeze(2) * mean.unsqueeze(1)
    cov = (cov + cov.transpose(1, 2)) / 2
    w, v = torch.linalg.eigh(cov)
    cov = (v * w.clamp_min(0).unsqueeze(1)) @ v.transpose(1, 2)
    return ClassGaussians(n, mean, cov)
