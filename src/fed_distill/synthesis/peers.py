"""The peers' recipes, written from their papers and public code (facts and hyper-parameters
only; sources in docs/peers.md): ``synthesis=dense`` and ``synthesis=coboost``.

Both re-initialise the generator (weights N(0, 0.02), BN scales N(1, 0.02), biases 0) and draw
fresh latent codes and labels for every synthesis round, take ``iterations`` Adam steps (betas
0.5, 0.999) on generator and codes, and keep the batch of the step with the lowest loss; every
round's batch stays in the student's pool.

- ``dense`` (DENSE, Zhang et al., NeurIPS 2022): on a random crop (``jitter`` pixels of zero
  padding) and flip of each generated image,
  ``oh · CE(ensemble, y) + bn · Σ_teachers BN_t + adv · adv``, with
  ``adv = −mean_i [ 1(student and ensemble disagree on x_i) · KL(ensemble ‖ student) ]``
  (DENSE's public code masks the samples where the top classes *differ*; our ``generator``
  follows the other published form, where they agree).
- ``coboost`` (Co-Boosting, Dai et al., ICLR 2024): on the plain generated images,
  ``oh · mean_i (1 − p_i,y)^h · CE_i + bn · mean_t BN_t + adv · adv``, p the ensemble's
  probabilities (hard samples weigh more), ``adv = −mean_i KL_T(ensemble ‖ student)·T²`` at
  ``temperature`` T (no mask), the generator's gradient clipped to norm ``grad_clip``. From the
  second round on, before its batch joins the pool, the ensemble weights are re-fitted on the
  pool: one shuffled pass in batches of ``batch_size``, each a signed gradient step of size
  ``coboost_mu · coboost_mu_decay^round`` on the pool labels' cross-entropy, clipped to [0, 1].
  The student distils from the same re-weighted ensemble (:meth:`student_probs`).
  ``coboost_weights=client`` (published): one weight per client on its logits, starting at
  1/T, ensemble = softmax(Σ w_t z_t / Σ w_t). ``client_class``: one weight per client and
  class, starting at the class shares of ``ensemble.py``, ensemble = the class-share rule
  ``Σ_t w_tc softmax(z_t)_c`` (normalised) with re-fitted shares.

The BN term takes the per-class statistics the clients uploaded where there are (as the other
synthesizers, ``synthesis.class_stats``); Co-Boosting's published BN weight is 0, so there they
apply only with ``synthesis.bn_scale > 0``.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fed_distill.ensemble import ensemble_probs
from fed_distill.synthesis.base import SyntheticBatch, frozen_student
from fed_distill.synthesis.generator import GeneratorSynthesizer, adversarial_loss
from fed_distill.synthesis.losses import kl_per_sample
from fed_distill.synthesis.options import CoBoostOptions, DenseOptions
from fed_distill.synthesis.registry import register_synthesizer


def reset_generator(net: nn.Module, gen: torch.Generator) -> None:
    """DENSE's and Co-Boosting's re-initialisation: conv/linear weights N(0, 0.02), BN scales
    N(1, 0.02), biases 0, drawn from ``gen``."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=gen) * 0.02)
                m.bias.zero_()


def crop_flip(
    x: torch.Tensor, pad: int, offsets: torch.Tensor, flips: torch.Tensor
) -> torch.Tensor:
    """Per-image random crop of ``x`` (N, C, H, W) zero-padded by ``pad`` pixels (``offsets``
    (N, 2) in [0, 2·pad]: the crop's top-left corner) and horizontal flip where ``flips`` (N,)
    is true. Differentiable in ``x``."""
    n, c, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = offsets[:, 0, None] + torch.arange(h, device=x.device)
        cols = offsets[:, 1, None] + torch.arange(w, device=x.device)
        x = torch.gather(xp, 2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
        x = torch.gather(x, 3, cols[:, None, None, :].expand(n, c, h, w))
    return torch.where(flips[:, None, None, None], x.flip(3), x)


def dense_adversarial(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """DENSE's public code: −mean over the batch of KL(teacher ‖ student) on the samples whose
    top classes differ (0 for the others)."""
    return adversarial_loss(teacher_probs, student_logits, agree=False)


def hardness_ce(probs: torch.Tensor, y: torch.Tensor, h: float) -> torch.Tensor:
    """Co-Boosting's hard-sample CE: mean_i (1 − p_i,y)^h · (−log p_i,y), the weight detached."""
    p_y = probs.gather(1, y[:, None]).squeeze(1)
    weight = (1.0 - p_y.detach()).clamp_min(0.0).pow(h)
    return (weight * -p_y.clamp_min(1e-12).log()).mean()


def tempered_kl(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, t: float
) -> torch.Tensor:
    """mean_i KL(teacher ‖ softmax(student/t))·t² (``teacher_probs`` already at temperature t)."""
    return kl_per_sample(teacher_probs, student_logits / t).mean() * t * t


def weighted_ensemble(
    logits: torch.Tensor, weights: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """(T, N, C) logits → (N, C) probabilities with re-fitted ensemble weights: (T,) per client
    on the logits (Co-Boosting), or (T, C) per client and class on the softmax outputs (the
    class-share rule of ``ensemble.py`` with these weights as shares)."""
    if weights.dim() == 2:
        return ensemble_probs(logits, "weighted", weights, temperature)
    w = weights.to(logits.dtype)[:, None, None]
    z = (w * logits).sum(dim=0) / weights.sum().clamp_min(1e-12)
    return F.softmax(z / temperature, dim=-1)


class _PeerSynthesizer(GeneratorSynthesizer):
    """What both recipes share: the generator network, teachers (fused / grouped), BN hooks and
    per-class targets of :class:`GeneratorSynthesizer`; a round = one re-initialised generator."""

    recipe = ""
    pool: Any = None  # the student's pool (bind_pool)
    _weights: torch.Tensor | None = None

    # The generator is re-initialised every round: there is no trained generator to sample
    # from. (GeneratorSynthesizer.__init__ assigns the flag; this class keeps it False.)
    @property
    def can_sample(self) -> bool:  # type: ignore[override]
        return False

    @can_sample.setter
    def can_sample(self, value: bool) -> None:
        pass

    @property
    def weights(self) -> torch.Tensor | None:
        """Co-Boosting's re-fitted ensemble weights (None: the ``ensemble`` rule)."""
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        self._weights = value

    def bind_pool(self, pool: Any) -> None:
        self.pool = pool

    def _ensemble(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        if self.weights is not None:
            return weighted_ensemble(logits, self.weights, temperature)
        return ensemble_probs(logits, self.cfg.ensemble, self.shares, temperature)

    def _terms(
        self, xa: torch.Tensor, y: torch.Tensor, student: nn.Module | None, hooks: list
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs, ce, bn, adv) of one step; subclasses say how."""
        raise NotImplementedError

    def _views(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per step, the crop offsets and flips of the images (None: the plain images)."""
        return [None] * self.cfg.iterations

    def synthesize(self, student: nn.Module | None = None) -> SyntheticBatch:
        cfg, dev, gen = self.cfg, self.device, self.generator
        n, ids = cfg.batch_size, list(range(len(self.teachers)))
        y = torch.randint(0, self.num_classes, (n,), generator=gen).to(dev)
        z = torch.randn((n, cfg.nz), generator=gen).to(dev).requires_grad_(True)
        reset_generator(self.net, gen)
        views = self._views(n)
        net = self.net.train()
        opt = torch.optim.Adam(
            [{"params": net.parameters()}, {"params": [z], "lr": cfg.lr_z}],
            lr=cfg.lr,
            betas=(0.5, 0.999),
        )
        adaptive = student is not None and cfg.adv_scale > 0
        best_loss, best_x, t0 = float("inf"), None, time.perf_counter()
        with frozen_student(student if adaptive else None), ExitStack() as stack:
            hooks = self._enter_hooks(stack, 0.0, ids, y) if cfg.bn_scale > 0 else []
            for view in views:
                img = net(z)
                xa = self.normalizer(img if view is None else crop_flip(img, cfg.jitter, *view))
                _, ce, bn, adv = self._terms(xa, y, student if adaptive else None, hooks)
                loss = cfg.oh_scale * ce + cfg.bn_scale * bn + cfg.adv_scale * adv
                if loss.item() < best_loss or best_x is None:
                    best_loss, best_x = loss.item(), self.normalizer(img.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                opt.step()
            for h in hooks:
                h.enabled = False
            assert best_x is not None
            with torch.no_grad():
                acc = (self._ensemble(self._logits(best_x, ids)).argmax(1) == y).float().mean()
        seconds = time.perf_counter() - t0
        self._after_round()
        self.batches += 1
        stats = {
            "loss": float(loss.detach()),
            "best_loss": best_loss,
            "teacher_acc": float(acc),
            "loss_ce": float(ce.detach()),
            "loss_bn": float(bn.detach()),
            "loss_adv": float(adv.detach()),
            "iterations": float(cfg.iterations),
            "seconds": seconds,
            "images_per_s": n * cfg.iterations / max(seconds, 1e-9),
        }
        return SyntheticBatch(best_x.to("cpu", copy=True), y.to("cpu", copy=True), ids, stats)

    def _after_round(self) -> None:
        """What a round does after its generator steps, before its batch joins the pool."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.weights is not None:
            state["ensemble_weights"] = self.weights.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "ensemble_weights" in state:
            self.weights = state["ensemble_weights"].to(self.device)


@register_synthesizer("dense", options=DenseOptions, meta=False)
class DenseSynthesizer(_PeerSynthesizer):
    """``synthesis=dense``: DENSE's published recipe (see the module docstring)."""

    recipe = "dense"

    def _views(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        gen, iters, pad = self.generator, self.cfg.iterations, self.cfg.jitter
        offsets = torch.randint(0, 2 * pad + 1, (iters, n, 2), generator=gen).to(self.device)
        if self.flip:
            flips = (torch.rand((iters, n), generator=gen) < 0.5).to(self.device)
        else:
            flips = torch.zeros((iters, n), dtype=torch.bool, device=self.device)
        return [(offsets[i], flips[i]) for i in range(iters)]

    def _terms(self, xa, y, student, hooks):
        zero = torch.zeros((), device=self.device)
        probs = self._ensemble(self._logits(xa, list(range(len(self.teachers)))))
        ce = F.nll_loss(probs.clamp_min(1e-12).log(), y)
        mult = self.cfg.first_bn_multiplier
        bn = torch.cat([h.loss(mult).reshape(-1) for h in hooks]).sum() if hooks else zero
        adv = dense_adversarial(probs, student(xa)) if student is not None else zero
        return probs, ce, bn, adv


@register_synthesizer("coboost", options=CoBoostOptions, meta=False)
class CoBoostSynthesizer(_PeerSynthesizer):
    """``synthesis=coboost``: Co-Boosting (see the module docstring)."""

    recipe = "coboost"

    @property
    def weights(self) -> torch.Tensor:
        if self._weights is None:  # published: 1/T per client; client_class: the class shares
            t = len(self.teachers)
            if self.cfg.coboost_weights == "client":
                self._weights = torch.full((t,), 1.0 / t, device=self.device)
            else:
                self._weights = self.shares.clone()
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        self._weights = value

    def student_probs(self, logits: torch.Tensor, temperature: float) -> torch.Tensor | None:
        assert self.weights is not None
        return weighted_ensemble(logits, self.weights.detach(), temperature)

    def _terms(self, xa, y, student, hooks):
        zero = torch.zeros((), device=self.device)
        logits = self._logits(xa, list(range(len(self.teachers))))
        probs = self._ensemble(logits)
        ce = hardness_ce(probs, y, self.cfg.hardness)
        mult = self.cfg.first_bn_multiplier
        bn = torch.cat([h.loss(mult).reshape(-1) for h in hooks]).mean() if hooks else zero
        adv = zero
        if student is not None:
            t = self.cfg.temperature
            adv = -tempered_kl(self._ensemble(logits, t), student(xa), t)
        return probs, ce, bn, adv

    def _after_round(self) -> None:
        """Re-fit the ensemble weights on the pool made so far (from the second round on)."""
        pool, cfg = self.pool, self.cfg
        if self.batches == 0 or pool is None or len(pool) == 0:
            return
        assert self.weights is not None
        x_all, y_all = pool.tensors()
        step = cfg.coboost_mu * cfg.coboost_mu_decay**self.batches
        ids = list(range(len(self.teachers)))
        perm = torch.randperm(len(y_all), generator=self.generator)
        for idx in perm.split(cfg.batch_size):
            with torch.no_grad():
                logits = self._logits(x_all[idx].to(self.device), ids)
            w = self.weights.detach().clone().requires_grad_(True)
            probs = weighted_ensemble(logits, w)
            loss = F.nll_loss(probs.clamp_min(1e-12).log(), y_all[idx].to(self.device))
            (g,) = torch.autograd.grad(loss, w)
            self.weights = (w.detach() - step * g.sign()).clamp(0.0, 1.0)
