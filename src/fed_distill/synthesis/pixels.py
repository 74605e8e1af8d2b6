"""The pixel-statistics prior: what a class looks like, from the clients' "layer 0" statistics.

A client that uploads ``pixel.mean`` / ``pixel.var`` in its class statistics (``upload.pixels``)
gives, per class, the per-pixel mean and variance of its normalised training images. The server
pools them over clients (count-weighted: the statistics of all clients' images of the class
together) and, with ``synthesis.pixel_scale`` > 0, adds to every DeepInversion batch the term

    Σ_k w_k (rms(mean_k(x) − μ_k) + rms(var_k(x) − σ²_k))

where mean_k / var_k are the per-pixel mean and variance over the batch's images of class k,
w_k the share of class k in the batch and rms the root mean square over pixels: the images of a
class must, as a set, have the class's average silhouette and its per-pixel spread. Unlike a
start from the mean image, the term keeps acting while the teachers shape the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fed_distill.class_stats import class_membership
from fed_distill.errors import ConfigError


def pooled_pixel_targets(
    class_stats: Sequence[dict[str, torch.Tensor]], image_numel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, D) mean and variance of each class's pixels over all clients' images together.

    A class no client holds gets the count-weighted statistics of all classes."""
    counts = torch.stack([s["counts"].double() for s in class_stats])  # (clients, K)
    means = torch.stack([s["pixel.mean"].double() for s in class_stats])  # (clients, K, D)
    vars_ = torch.stack([s["pixel.var"].double() for s in class_stats])
    if means.shape[-1] != image_numel:
        raise ConfigError(
            f"synthesis.pixel_scale: the clients' pixel statistics have {means.shape[-1]} values"
            f" per class, the images {image_numel}; retrain the teachers' statistics for this data"
        )
    w = counts[..., None]
    n = w.sum(dim=0)  # (K, 1)
    mean = (w * means).sum(dim=0) / n.clamp_min(1.0)
    second = (w * (vars_ + means.square())).sum(dim=0) / n.clamp_min(1.0)
    total = w.sum(dim=(0, 1))
    overall_mean = (w * means).sum(dim=(0, 1)) / total.clamp_min(1.0)
    overall_second = (w * (vars_ + means.square())).sum(dim=(0, 1)) / total.clamp_min(1.0)
    empty = n[:, 0] <= 0
    mean[empty] = overall_mean
    second[empty] = overall_second
    var = (second - mean.square()).clamp_min(0.0)
    return mean.float(), var.float()


def pixel_term(
    x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
    """The term of the module docstring for images ``x`` (…, N, C, H, W) of labels ``y``
    (…, N) against (K, D) targets; leading axes (a group of batches) are kept."""
    k = mean.shape[0]
    member = class_membership(y, k)  # (…, N, K)
    flat = x.flatten(-3)  # (…, N, D)
    n_k = member.sum(dim=-2)  # (…, K)
    inv = 1.0 / n_k.clamp_min(1.0)
    m1 = (member.transpose(-1, -2) @ flat) * inv[..., None]  # (…, K, D)
    m2 = (member.transpose(-1, -2) @ flat.square()) * inv[..., None]
    v = (m2 - m1.square()).clamp_min(0.0)
    d = _rms(m1 - mean) + _rms(v - var)
    w = n_k / n_k.sum(dim=-1, keepdim=True)
    return (d * w).sum(dim=-1)


def _rms(d: torch.Tensor) -> torch.Tensor:
    # the small constant keeps the gradient finite where the difference is exactly 0
    return (d.square().mean(dim=-1) + 1e-12).sqrt()
