"""Pure loss functions of data-free synthesis and distillation (no state, no hooks).

Each is tested on tiny tensors against hand-computed values in ``tests/test_synthesis.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logit given to classes a teacher does not own: finite, so 0-weighted samples stay NaN-free.
MASKED_LOGIT = -1e4


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's l2 image prior (``get_image_prior_losses``, l2 variant).

    Sum of the L2 norms (over the whole batch) of the horizontal, vertical and both diagonal
    neighbour differences of ``x`` (N, C, H, W).
    """
    diff1 = x[..., :, :-1] - x[..., :, 1:]
    diff2 = x[..., :-1, :] - x[..., 1:, :]
    diff3 = x[..., 1:, :-1] - x[..., :-1, 1:]
    diff4 = x[..., :-1, :-1] - x[..., 1:, 1:]
    return (
        torch.linalg.vector_norm(diff1)
        + torch.linalg.vector_norm(diff2)
        + torch.linalg.vector_norm(diff3)
        + torch.linalg.vector_norm(diff4)
    )


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """‖x‖₂ of the *whole batch tensor* (not a per-image mean), as in DeepInversion's CIFAR code.

    So its scale grows with sqrt(batch size); ``l2_scale`` values from the paper assume that.
    """
    return torch.linalg.vector_norm(x)


def total_variation_per_batch(x: torch.Tensor) -> torch.Tensor:
    """:func:`total_variation` of each batch of (T, N, C, H, W) ``x`` → (T,): the norms are
    taken over each batch separately, as T separate syntheses would."""
    diffs = (
        x[..., :, :-1] - x[..., :, 1:],
        x[..., :-1, :] - x[..., 1:, :],
        x[..., 1:, :-1] - x[..., :-1, 1:],
        x[..., :-1, :-1] - x[..., 1:, 1:],
    )
    dims = tuple(range(1, x.dim()))
    out = torch.linalg.vector_norm(diffs[0], dim=dims)
    for d in diffs[1:]:
        out = out + torch.linalg.vector_norm(d, dim=dims)
    return out


def l2_prior_per_batch(x: torch.Tensor) -> torch.Tensor:
    """:func:`l2_prior` of each batch of (T, N, C, H, W) ``x`` → (T,)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def js_divergence(
    p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 3.0
) -> torch.Tensor:
    """Jensen-Shannon divergence of Adaptive DeepInversion, in [0, 1].

    P, Q = softmax(logits / T), clamped to [0.01, 0.99] (keeps the logs finite), M = (P + Q) / 2,
    JS = 0.5·KL(P‖M) + 0.5·KL(Q‖M), summed over classes, averaged over the batch, clamped to
    [0, 1]. (The reference code passes the arguments of ``KLDivLoss`` the other way round and so
    computes KL(M‖P); this is the textbook JS that the report describes.)
    """
    p = F.softmax(p_logits / temperature, dim=1).clamp(0.01, 0.99)
    q = F.softmax(q_logits / temperature, dim=1).clamp(0.01, 0.99)
    m = 0.5 * (p + q)
    log_m = m.log()
    kl_pm = (p * (p.log() - log_m)).sum(dim=1)
    kl_qm = (q * (q.log() - log_m)).sum(dim=1)
    js = 0.5 * (kl_pm + kl_qm).mean()
    return js.clamp(0.0, 1.0)


def competition_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 3.0
) -> torch.Tensor:
    """Adaptive DI's competition term 1 − JS: small where teacher and student *disagree*."""
    return 1.0 - js_divergence(teacher_logits, student_logits, temperature)


def kl_div_with_temperature(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton distillation loss KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over the batch.

    The T² keeps gradient magnitudes comparable across temperatures.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


def kl_per_sample(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """(N,) KL(teacher ‖ softmax(student_logits)) per sample, the teacher given as probabilities
    (clamped before the log, so a zero probability adds nothing)."""
    log_t = teacher_probs.clamp_min(1e-12).log()
    return (teacher_probs * (log_t - F.log_softmax(student_logits, dim=1))).sum(dim=1)


def masked_logits(logits: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    """Logits with the classes where ``class_mask`` (bool, (C,) or (N, C)) is False set to a
    large negative value, so softmax/CE only competes among the owned classes."""
    return logits.masked_fill(~class_mask, MASKED_LOGIT)


def class_weighted_ce(
    logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """Cross-entropy with per-class weights, normalised by the total weight of the batch:

        Σᵢ w[yᵢ]·CEᵢ / Σᵢ w[yᵢ]

    the same as ``F.cross_entropy(weight=w)``, except that a batch whose labels all have weight 0
    gives 0 (not NaN): a sampled teacher that owns none of the labels contributes nothing.
    """
    ce = F.cross_entropy(logits, y, reduction="none")
    w = weights.to(ce.dtype)[y]
    return (w * ce).sum() / w.sum().clamp_min(eps)
