"""The server's side of the statistics round: re-fit the student's linear head on features drawn
from the clients' pooled per-class Gaussians (:class:`fed_distill.feature_stats.ClassGaussians`).

The body the student learnt from synthetic images already separates the classes; what it could
not learn from them is where the boundary between near-tied classes lies on real data. The
clients' statistics say that: N(mean_k, cov_k) of the student's own penultimate features on
class k's real images. The head is trained by SGD on samples of that mixture (classes drawn in
proportion to their image counts), nothing else of the student changes, and a class no client
holds keeps the distilled head's row (its gradient is masked).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fed_distill.class_stats import feature_layer
from fed_distill.feature_stats import ClassGaussians, feature_site
from fed_distill.federated.refit_config import RefitConfig


def shrunk_covariances(g: ClassGaussians, shrinkage: float) -> torch.Tensor:
    """(K, D, D) ``(1 - s) cov_k + s (trace(cov_k) / D) I``, plus a tiny ridge so each has a
    Cholesky factor (a class held by fewer than D images has a singular covariance)."""
    d = g.cov.shape[-1]
    eye = torch.eye(d, dtype=g.cov.dtype)
    avg = g.cov.diagonal(dim1=1, dim2=2).mean(1).view(-1, 1, 1)
    cov = (1 - shrinkage) * g.cov + shrinkage * avg * eye
    return cov + (1e-6 * avg.clamp_min(1e-12)) * eye


def fit_head(head: nn.Linear, g: ClassGaussians, rcfg: RefitConfig, seed: int) -> dict[str, float]:
    """Train ``head`` (in place) on ``rcfg.steps`` batches of features drawn from ``g``;
    returns the last steps' mean loss and the classes re-fitted.

    The fit runs in standardised coordinates (each feature centred and scaled by the mixture's
    mean and standard deviation, folded back into the weights at the end), so one learning rate
    serves any feature scale; the distilled head is the starting point (``refit.init``)."""
    held = g.held
    if not bool(held.any()):
        return {"loss": float("nan"), "classes": 0}
    gen = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(shrunk_covariances(g, rcfg.shrinkage)).float()
    prior = torch.where(held, g.counts, torch.zeros_like(g.counts))
    centre, scale = _mixture_moments(g, prior / prior.sum())
    mean = ((g.mean - centre) / scale).float()
    chol = chol / scale.float().view(1, -1, 1)
    lin = _standardised(head, centre, scale, zero=held if rcfg.init == "zero" else None)
    keep = held.float().view(-1, 1)  # only the rows of classes some client holds learn
    lin.weight.register_hook(lambda gr: gr * keep)
    lin.bias.register_hook(lambda gr: gr * keep.view(-1))
    opt = torch.optim.SGD(
        lin.parameters(), lr=rcfg.lr, momentum=0.9, weight_decay=rcfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / rcfg.steps))
    )
    losses: list[float] = []
    for _ in range(rcfg.steps):
        y, f = _draw(prior, mean, chol, rcfg.batch_size, gen)
        loss = nn.functional.cross_entropy(lin(f), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    with torch.no_grad():  # back to the features' own coordinates, held rows only
        w = lin.weight.double() / scale
        b = lin.bias.double() - w @ centre
        head.weight[held] = w[held].to(head.weight.dtype)
        if head.bias is not None:
            head.bias[held] = b[held].to(head.bias.dtype)
    tail = losses[-max(1, len(losses) // 10) :]
    return {"loss": sum(tail) / len(tail), "classes": int(held.sum())}


def _draw(
    prior: torch.Tensor, mean: torch.Tensor, chol: torch.Tensor, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (label, feature) draws: labels ~ prior, features ~ N(mean_y, L_y L_yᵀ), one matrix
    product per class drawn (cheaper than gathering a D x D factor per draw)."""
    y = torch.multinomial(prior.float(), n, replacement=True, generator=gen).sort().values
    z = torch.randn(n, mean.shape[1], generator=gen)
    f = torch.empty_like(z)
    start = 0
    for c, cnt in zip(*torch.unique_consecutive(y, return_counts=True), strict=True):
        rows = slice(start, start + int(cnt))  # y is sorted: class c's draws are contiguous
        f[rows] = mean[c] + z[rows] @ chol[c].T
        start += int(cnt)
    return y, f


def _mixture_moments(g: ClassGaussians, pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-feature standard deviation of the mixture Σ_k π_k N(mean_k, cov_k)."""
    centre = pi @ g.mean
    var = pi @ (g.cov.diagonal(dim1=1, dim2=2) + (g.mean - centre).square())
    return centre, var.sqrt().clamp_min(1e-6 * float(var.sqrt().max().clamp_min(1e-12)))


def _standardised(
    head: nn.Linear, centre: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
) -> nn.Linear:
    """A Linear on standardised features (f - centre) / scale that computes what ``head``
    computes on f (rows ``zero`` set to zero instead)."""
    lin = nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        w = head.weight.detach().double()
        b = head.bias.detach().double() if head.bias is not None else torch.zeros(len(w)).double()
        lin.weight.copy_(w * scale)
        lin.bias.copy_(b + w @ centre)
        if zero is not None:
            lin.weight[zero] = 0.0
            lin.bias[zero] = 0.0
    return lin


class MapHead(nn.Module):
    """The student with its global average pool and head replaced by one Linear on the whole
    flattened map the pool averaged (``refit.features=map``): logits = head(map.flatten(1))."""

    def __init__(self, base: nn.Module, width: int, num_classes: int) -> None:
        super().__init__()
        self.base = base
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        got: list[torch.Tensor] = []
        site = feature_site(self.base, "map")
        handle = site.register_forward_pre_hook(lambda _m, inp: got.append(inp[0]))
        try:
            self.base(x)  # (its own pool and head run too: a few operations, unused)
        finally:
            handle.remove()
        return self.head(got[0].flatten(1))


def refit_model(student: nn.Module, features: str, width: int, num_classes: int) -> nn.Module:
    """A copy of ``student`` whose head the round re-fits: the student itself (``penultimate``)
    or a :class:`MapHead` whose Linear starts as the distilled head spread evenly over the map's
    positions (so it computes what the student computes: avg-pool then the head)."""
    base = copy.deepcopy(student).cpu()
    if features != "map":
        return base
    model = MapHead(base, width, num_classes)
    fc = feature_layer(base)
    with torch.no_grad():
        if fc is not None and width % fc.in_features == 0:
            positions = width // fc.in_features  # flatten order: channel-major
            model.head.weight.copy_(fc.weight.repeat_interleave(positions, dim=1) / positions)
            model.head.bias.copy_(fc.bias if fc.bias is not None else 0.0)
    return model


def refit_head_layer(model: nn.Module) -> nn.Linear:
    """The Linear the round re-fits in a :func:`refit_model`."""
    return model.head if isinstance(model, MapHead) else feature_layer(model)
