"""The teachers' soft labels of the synthetic pool, computed once per image and reused.

A pool image is fixed once it is made, and the student's augmentation of pool batches is a
flip and a small roll (``student.augment``). With ``student.targets=cached`` the ensemble's soft
labels are computed once for every pool image and for its mirror image (when flips are on),
when the image joins the pool, and every later step looks them up instead of running every
teacher on the batch. The student stage's teacher cost then follows the pool's size
(``2 x pool x teachers`` forward passes over the whole run) instead of its step count
(``steps x batch x teachers``): ~36x fewer forward passes with the default student, which is
what keeps the server's cost flat when the federation grows to 100 clients.

What it changes: the teachers label the un-rolled image (a roll of at most ``student.jitter``
pixels moves the image, not the label), and mixing or perturbing a batch after the lookup is
not possible, so ``student.mix``, ``student.perturb``, ``student.fresh`` and a synthesizer with its
own soft-label rule (Co-Boosting's re-fitted weights) need live targets
(:func:`resolve_targets`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fed_distill.ensemble import ensemble_probs
from fed_distill.errors import ConfigError
from fed_distill.train.student_config import AUTO_TARGETS, TARGET_MODES


def blockers(mode: str, mix: str, perturb: float, fresh: float, own_rule: bool) -> list[str]:
    """What, in a student's settings, ``mode`` cannot serve: ``cached`` labels pool images
    before any mixing, perturbation or fresh sample; ``sampled`` cannot perturb (the
    perturbation differentiates the full ensemble) nor follow a synthesizer's own rule."""
    found = []
    if mode == "cached" and mix != "none":
        found.append(f"student.mix={mix}")
    if mode in ("cached", "sampled") and perturb > 0:
        found.append(f"student.perturb={perturb}")
    if mode == "cached" and fresh > 0:
        found.append(f"student.fresh={fresh}")
    if mode in ("cached", "sampled") and own_rule:
        found.append("a synthesizer with its own soft-label rule")
    return found


def resolve_targets(mode: str, mix: str, perturb: float, fresh: float, own_rule: bool) -> str:
    """The mode a student runs with: ``auto`` -> ``AUTO_TARGETS`` where it can serve these
    settings, else ``live``; an explicit mode that cannot is a configuration error (``mode`` is
    one of ``TARGET_MODES``, as validated)."""
    assert mode in TARGET_MODES, mode
    if mode == "auto":
        ok = not blockers(AUTO_TARGETS, mix, perturb, fresh, own_rule)
        return AUTO_TARGETS if ok else "live"
    found = blockers(mode, mix, perturb, fresh, own_rule)
    if found:
        raise ConfigError(
            f"student.targets={mode} cannot serve {', '.join(found)};"
            " use student.targets=live or auto"
        )
    return mode


class TeacherSampler:
    """``k`` teachers per image of a student step instead of all of them
    (``student.targets=sampled``).

    Each image gets ``k`` teachers (one draw per group of images, below), with replacement,
    teacher ``t`` with probability ``q_t``: its mean class share under the ``weighted`` rule
    (a teacher that holds little of anything is rarely asked), uniform under the others. Under
    ``probs`` / ``logits`` the drawn teachers are averaged (for ``probs`` an unbiased estimate
    of the ensemble). The ``weighted``
    rule's class-``c`` probability is the share-weighted mean ``sum_t s_tc p_t(c|x)`` (the
    shares of a class sum to 1); it is estimated per class by the drawn teachers' mean of
    ``p_t(c|x)`` weighted by ``s_tc / q_t`` (self-normalised importance sampling: consistent,
    and a class none of the drawn teachers holds falls back to their plain mean instead of
    0), then normalised over classes. The draws are made per group of ``GROUP`` consecutive
    images of the batch (4 groups in a batch of 128): a step's gradient does not lean on the
    same few teachers, and every teacher call still gets at least ``GROUP`` images (per-image
    draws made ~100 calls of ~6 images each at 100 teachers, which cost 2x the live loop at
    5). With ``k >= T`` every teacher labels every image: the live ensemble, exactly.
    """

    GROUP = 32  # images that share one draw of k teachers

    def __init__(
        self, num_teachers: int, k: int, method: str, shares: torch.Tensor | None, seed: int
    ) -> None:
        self.num_teachers, self.k, self.method = num_teachers, k, method
        self.shares = None if shares is None else shares.float().cpu()
        self.gen = torch.Generator().manual_seed(seed)
        mass = self.shares.mean(1) if method == "weighted" and self.shares is not None else None
        uniform = torch.full((num_teachers,), 1.0 / num_teachers)
        self.q = uniform if mass is None else mass / mass.sum()

    @property
    def exact(self) -> bool:
        """Whether every teacher labels every image (``k`` >= the number of teachers)."""
        return self.k >= self.num_teachers

    def label(self, teachers: list[nn.Module], x: torch.Tensor, temperature: float) -> torch.Tensor:
        """The soft labels of ``x`` (N, ...) from ``k`` teachers drawn per group of images."""
        n = len(x)
        groups = max(1, n // self.GROUP)
        d = torch.multinomial(self.q, groups * self.k, replacement=True, generator=self.gen)
        d = d.view(groups, self.k)[torch.arange(n) * groups // n]  # (n, k): a group's draw
        logits = None
        for t in d.unique().tolist():
            pos = (d == t).nonzero()  # (m, 2): image, draw
            rows, inv = pos[:, 0].unique(return_inverse=True)
            z = teachers[t](x[rows.to(x.device)])
            if logits is None:
                logits = z.new_zeros((self.k, n, z.shape[1]))
            logits[pos[:, 1].to(z.device), pos[:, 0].to(z.device)] = z[inv.to(z.device)]
        assert logits is not None
        if self.method != "weighted" or self.shares is None:
            return ensemble_probs(logits, self.method, None, temperature)
        p = (logits / temperature).softmax(-1)  # (k, n, C)
        w = (self.shares[d] / self.q[d][..., None]).transpose(0, 1).to(p.device, p.dtype)
        den = w.sum(0)
        ratio = torch.where(den > 0, (w * p).sum(0) / den.clamp_min(1e-12), p.mean(0))
        return ratio / ratio.sum(-1, keepdim=True).clamp_min(1e-12)


class PoolTargets:
    """Soft labels of every pool image, per batch as the pool holds them: (n, V, C) with view
    0 the image and view 1 its mirror (V = 2 when ``hflip``).

    ``label`` maps a batch of images to the ensemble's soft labels (the loop's rule at the
    student's temperature). Each pool batch is labelled on its own, so a pool rebuilt from a
    checkpoint gets the very same values back.
    """

    def __init__(self, label: Callable[[torch.Tensor], torch.Tensor], hflip: bool) -> None:
        self.label = label
        self.hflip = hflip
        self.batches: list[torch.Tensor] = []
        self._cat: torch.Tensor | None = None

    def sync(self, pool_batches: list[torch.Tensor], device: torch.device) -> None:
        """Label the pool batches not labelled yet (new ones are appended at the end)."""
        for x in pool_batches[len(self.batches) :]:
            x = x.to(device)
            views = [x, x.flip(3)] if self.hflip else [x]
            with torch.no_grad():  # not inference_mode: the labels enter the student's loss
                self.batches.append(torch.stack([self.label(v) for v in views], 1))
            self._cat = None

    def last(self) -> torch.Tensor:
        """The un-flipped soft labels of the newest batch."""
        return self.batches[-1][:, 0]

    def lookup(self, idx: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
        """Soft labels of pool images ``idx``, mirrored where ``flip`` is true."""
        if self._cat is None:
            self._cat = torch.cat(self.batches)
        rows = self._cat[idx.to(self._cat.device)]
        if flip is None or not self.hflip:
            return rows[:, 0]
        return rows[torch.arange(len(idx), device=rows.device), flip.long().to(rows.device)]
