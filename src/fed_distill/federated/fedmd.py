"""FedMD (Li & Wang 2019, arXiv 1910.03581): heterogeneous parties learn together by sharing
class scores on a public dataset, never weights.

Protocol, per party ``k`` with its own architecture ``f_k`` and a few private samples ``D_k``::

    transfer learning   f_k fits the labelled public data D_0 (early stopping on a held-out
                        part of D_0), then its private data D_k          -> "alone" accuracy
    for r = 1 .. R:
      draw              a stratified public subset X_r (public_subset_size, fresh each round)
      communicate       party k sends s_k = f_k(X_r)      (class_scores: logits or softmax)
      aggregate         server: consensus = mean_k s_k    (aggregate: mean/median/trimmed_mean)
      distribute        every party receives the consensus
      digest            party k fits f_k(X_r) -> consensus (digest: MAE on logits, or KL)
      revisit           party k trains on D_k for a few epochs                 (revisit)
      evaluate          accuracy of every party on the private test task

Baselines: *alone* (round 0, after transfer learning) and *pooled* (each architecture, from its
public-pretrained weights, trained on the union of all private data: the paper's upper bound).
A control the paper lacks, *alone_extended*, continues the alone model on its own private data
for as many epochs as the rounds' revisits add up to, so gains from collaboration can be told
apart from gains from simply training longer.

Label space: one joint output layer, public classes first, private classes offset after them
(10 digits + 6 letters = 16 outputs; see ``fed_distill.federated.config``). Private accuracy is
the argmax over the private outputs only (:func:`private_accuracy`). Scores are exchanged over
*all* outputs, as in the paper. There is no separate private-only head: the joint layer is the
way to give public and private classes their own outputs (``label_space=shared`` when public and
private data have the very same classes).

Optimisation follows the authors' Keras code: Adam (lr 1e-3) everywhere, a fresh optimiser per
step, and an L2 penalty of 1e-3 on the output layer's weights in every loss (``head_l2``;
their ``kernel_regularizer=l2(1e-3)``), which keeps the exchanged logits on a moderate scale.

Every protocol step is a plain function of tensors and a model (what a client or the server
computes); :func:`run_fedmd` chains them in one process, and a Flower runner can call the same
functions on separate machines. Each step seeds its own RNG from its arguments, so results do
not depend on the order in which parties are processed.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from fed_distill.artifacts import save_checkpoint
from fed_distill.data.transforms import Normalizer
from fed_distill.errors import ConfigError, ModelError, ProtocolError
from fed_distill.federated.config import AGGREGATES, FedMDConfig, check_fedmd_config
from fed_distill.federated.fedmd_data import FedMDData, build_fedmd_data, stratified_subset
from fed_distill.train.fit import FitResult, TrainConfig, fit, predict_logits

# ============================================================================ small helpers


def step_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed derived from ``seed`` and integer keys (party, stage, round)."""
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1)[0] >> 1)


@contextmanager
def seeded(seed: int, device: torch.device | str = "cpu"):
    """Run a block with torch's global RNG (dropout, init) seeded, restoring it afterwards."""
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def adam_config(
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int | None = None,
    crop_padding: int = 0,
) -> TrainConfig:
    """The paper's optimiser everywhere: Adam, constant learning rate, no weight decay."""
    return TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer="adam",
        weight_decay=0.0,
        schedule="none",
        crop_padding=crop_padding,
        patience=patience,
        eval_every=1,
        min_steps=0,  # the protocol fixes epochs exactly: no extra steps for tiny datasets
    )


def round_lr(c: FedMDConfig) -> float:
    """Adam's learning rate in the rounds' digest and revisit (and the alone-extended control)."""
    return c.lr if c.round_lr is None else c.round_lr


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The weight of the model's last linear layer (its classifier head)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no linear output layer for head_l2")
    return linears[-1].weight


def with_head_l2(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    model: torch.nn.Module,
    head_l2: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``loss_fn`` (cross-entropy when None) plus ``head_l2 * sum(W_head ** 2)``.

    This is the authors' Keras ``kernel_regularizer=l2(1e-3)`` on the output layer, which is
    part of every loss their models minimise (transfer learning, digest, revisit). It keeps the
    logits on a moderate scale, which matters when parties exchange and match raw logits.
    ``head_l2=0`` returns ``loss_fn`` unchanged.
    """
    if head_l2 <= 0:
        return loss_fn
    weight = head_weight(model)
    base = loss_fn if loss_fn is not None else F.cross_entropy

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return base(logits, target) + head_l2 * weight.float().pow(2).sum()

    return loss


def restricted_accuracy(
    logits: torch.Tensor, y: torch.Tensor, offset: int, num_private: int
) -> float:
    """Accuracy of ``logits`` over outputs ``offset .. offset+num_private-1`` only (joint ``y``)."""
    if len(y) == 0:
        return float("nan")
    pred = logits[:, offset : offset + num_private].argmax(1) + offset
    return (pred == y.cpu()).float().mean().item()


def private_accuracy(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    normalizer: Normalizer,
    offset: int,
    num_private: int,
    device: torch.device | str = "cpu",
) -> float:
    """Accuracy on the private task: argmax over outputs ``offset .. offset+num_private-1`` only.

    ``y`` holds joint labels (already offset). The public outputs are ignored, so a party is
    never marked wrong for calling a letter a digit. Fraction in [0, 1]; NaN for no samples.
    """
    if len(y) == 0:
        return float("nan")
    return restricted_accuracy(predict_logits(model, x, normalizer, device), y, offset, num_private)


# ============================================================================ protocol steps


def class_scores(
    model: torch.nn.Module,
    public_x: torch.Tensor,
    normalizer: Normalizer,
    *,
    kind: str = "logits",
    temperature: float = 1.0,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> torch.Tensor:
    """Communicate (client): the model's class scores on the public subset, float32 (N, C) on CPU.

    ``kind="logits"`` (the paper) sends raw logits; ``"softmax"`` sends softmax(logits / T).
    Computed in eval mode (no dropout, BatchNorm running statistics).
    """
    logits = predict_logits(model, public_x, normalizer, device, batch_size)
    if kind == "logits":
        return logits
    if kind == "softmax":
        return F.softmax(logits / temperature, dim=1)
    raise ConfigError(f"fedmd.scores must be logits or softmax, got '{kind}'")


def validate_scores(scores: Any, expected_shape: Sequence[int], party: str | int) -> torch.Tensor:
    """Check one party's message (server side): a finite float tensor of ``expected_shape``.

    Raises :class:`ProtocolError` with a one-line message naming the party; returns the scores
    as float32 on the CPU.
    """
    who = party if isinstance(party, str) else f"party {party}"
    expected = tuple(int(s) for s in expected_shape)
    if not isinstance(scores, torch.Tensor):
        raise ProtocolError(
            f"{who}: class scores must be a tensor of shape {expected}, got {type(scores).__name__}"
        )
    if not torch.is_floating_point(scores):
        raise ProtocolError(f"{who}: class scores must be floating point, got dtype {scores.dtype}")
    if tuple(scores.shape) != expected:
        raise ProtocolError(
            f"{who}: class scores have shape {tuple(scores.shape)}, expected {expected} "
            "(public subset size x number of outputs)"
        )
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(scores).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ProtocolError(
            f"{who}: class scores contain {n_nan} NaN and {n_inf} Inf values "
            f"(of {scores.numel()}); the party's model has diverged"
        )
    return scores.detach().to("cpu", torch.float32)


def aggregate(
    scores_list: Sequence[torch.Tensor],
    method: str = "mean",
    weights: Sequence[float] | None = None,
    trim: float = 0.1,
) -> torch.Tensor:
    """Aggregate (server): the consensus of the parties' scores, element-wise.

    * ``mean`` -- the paper's average; optional per-party ``weights`` (normalised to sum 1).
    * ``median`` -- coordinate-wise median (the mean of the two middle values for an even count).
    * ``trimmed_mean`` -- per coordinate, drop the ``floor(trim * n)`` lowest and highest values
      and average the rest.

    The robust options bound the influence of a few outlier parties.
    """
    if len(scores_list) == 0:
        raise ProtocolError("aggregate: no party sent class scores")
    if method not in AGGREGATES:
        raise ConfigError(f"fedmd.aggregate must be one of {', '.join(AGGREGATES)}, got '{method}'")
    stack = torch.stack([s.float() for s in scores_list])  # (P, N, C)
    n = stack.shape[0]
    if weights is not None:
        if method != "mean":
            raise ConfigError(f"aggregate weights only apply to mean, not '{method}'")
        w = torch.as_tensor(list(weights), dtype=torch.float32)
        if w.shape != (n,) or not bool(torch.isfinite(w).all()) or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(
                f"aggregate weights must be {n} non-negative numbers with a positive sum, "
                f"got {list(weights)}"
            )
        return torch.einsum("p,pnc->nc", w / w.sum(), stack)
    if method == "mean":
        return stack.mean(0)
    ordered = stack.sort(dim=0).values
    if method == "median":
        mid = n // 2
        return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    if not 0 <= trim < 0.5:
        raise ConfigError(f"fedmd.trim must be in [0, 0.5), got {trim}")
    k = int(math.floor(trim * n))
    return ordered[k : n - k].mean(0)


def collect_scores(
    messages: Sequence[Any],
    expected_shape: Sequence[int],
    party_names: Sequence[str],
    on_invalid: str = "error",
) -> tuple[list[torch.Tensor], list[int], list[dict[str, Any]]]:
    """Validate every party's message (server side).

    Returns the valid scores, the indices of the parties they came from, and the left-out
    parties (``{"party", "reason"}``). ``on_invalid="error"`` raises the first ProtocolError;
    ``"skip"`` leaves the party out of this round's consensus (at least one must remain).
    """
    valid, used, left_out = [], [], []
    for i, (msg, name) in enumerate(zip(messages, party_names, strict=True)):
        try:
            valid.append(validate_scores(msg, expected_shape, name))
            used.append(i)
        except ProtocolError as e:
            if on_invalid != "skip":
                raise
            left_out.append({"party": i, "reason": str(e)})
    if not valid:
        raise ProtocolError(
            "every party's class scores were rejected this round: "
            + "; ".join(d["reason"] for d in left_out)
        )
    return valid, used, left_out


def consensus_distance(scores: torch.Tensor, consensus: torch.Tensor) -> float:
    """Mean absolute difference between one party's scores and the consensus."""
    return (scores.float() - consensus.float()).abs().mean().item()


def digest_loss(
    loss: str = "mae", scores: str = "logits", temperature: float = 1.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The digest objective ``loss_fn(logits, consensus)``.

    * ``mae`` with logits scores: mean |logits - consensus| (the paper, Keras' MAE on logits);
      with softmax scores: mean |softmax(logits / T) - consensus|.
    * ``kl``: KL(target || softmax(logits / T)) * T^2, the target being the consensus (softmax
      scores) or softmax(consensus / T) (logits scores).
    """
    t = float(temperature)
    if loss == "mae":
        if scores == "logits":
            return lambda logits, target: F.l1_loss(logits, target)
        return lambda logits, target: F.l1_loss(F.softmax(logits / t, dim=1), target)
    if loss == "kl":

        def kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            p = F.softmax(target / t, dim=1) if scores == "logits" else target
            return F.kl_div(F.log_softmax(logits / t, dim=1), p, reduction="batchmean") * t * t

        return kl
    raise ConfigError(f"fedmd.digest_loss must be mae or kl, got '{loss}'")


def _seeded_fit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    val: tuple[torch.Tensor | None, torch.Tensor | None],
    cfg: TrainConfig,
    normalizer: Normalizer,
    loss_fn: Callable,
    *,
    hflip: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
    desc: str = "",
    progress: bool = False,
) -> FitResult:
    """``fit`` under this step's own seed: every FedMD training step goes through here."""
    with seeded(seed, device):
        return fit(
            model,
            x,
            y,
            val[0],
            val[1],
            cfg,
            normalizer,
            hflip=hflip,
            device=device,
            seed=seed,
            desc=desc,
            progress=progress,
            loss_fn=loss_fn,
        )


def digest(
    model: torch.nn.Module,
    public_x: torch.Tensor,
    consensus: torch.Tensor,
    normalizer: Normalizer,
    *,
    epochs: int = 1,
    batch_size: int = 256,
    lr: float = 1e-3,
    loss: str = "mae",
    scores: str = "logits",
    temperature: float = 1.0,
    head_l2: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> FitResult:
    """Digest (client): train the model so its scores on the public subset approach the consensus.

    Fresh Adam, ``epochs`` passes, no augmentation (the targets belong to the plain images).
    """
    cfg = adam_config(epochs, batch_size, lr)
    loss_fn = with_head_l2(digest_loss(loss, scores, temperature), model, head_l2)
    return _seeded_fit(
        model,
        public_x,
        consensus.float(),
        (None, None),
        cfg,
        normalizer,
        loss_fn,
        device=device,
        seed=seed,
        desc="digest",
    )


def revisit(
    model: torch.nn.Module,
    private_x: torch.Tensor,
    private_y: torch.Tensor,
    normalizer: Normalizer,
    *,
    epochs: int = 2,
    batch_size: int = 5,
    lr: float = 1e-3,
    crop_padding: int = 0,
    hflip: bool = False,
    head_l2: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    desc: str = "revisit",
    progress: bool = False,
) -> FitResult | None:
    """Revisit (client): a few epochs of cross-entropy on the party's private data (joint labels).

    No validation (a party has a handful of samples): the last weights are kept. ``epochs=0``
    does nothing and returns None.
    """
    if epochs < 1:
        return None
    cfg = adam_config(epochs, batch_size, lr, crop_padding=crop_padding)
    return _seeded_fit(
        model,
        private_x,
        private_y,
        (None, None),
        cfg,
        normalizer,
        with_head_l2(None, model, head_l2),
        hflip=hflip,
        device=device,
        seed=seed,
        desc=desc,
        progress=progress,
    )


def pretrain_public(
    model: torch.nn.Module,
    public_x: torch.Tensor,
    public_y: torch.Tensor,
    val_x: torch.Tensor | None,
    val_y: torch.Tensor | None,
    normalizer: Normalizer,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    patience: int | None = 3,
    crop_padding: int = 0,
    hflip: bool = False,
    head_l2: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    desc: str = "public",
    progress: bool = False,
) -> FitResult:
    """Transfer learning, step 1: fit the labelled public data; keep the best on validation."""
    cfg = adam_config(epochs, batch_size, lr, patience=patience, crop_padding=crop_padding)
    return _seeded_fit(
        model,
        public_x,
        public_y,
        (val_x, val_y),
        cfg,
        normalizer,
        with_head_l2(None, model, head_l2),
        hflip=hflip,
        device=device,
        seed=seed,
        desc=desc,
        progress=progress,
    )


def transfer_learning(
    model: torch.nn.Module,
    data: FedMDData,
    party: int,
    c: FedMDConfig,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Transfer learning for one party: public data, then its private data.

    Returns ``public_val_acc``, ``private_acc_after_public``, ``alone_acc`` (private test task
    after both steps), the epochs run, ``public_state`` (weights after the public step, the
    starting point of the pooled baseline) and ``test_logits`` on the private test task.
    """
    crop = c.crop_padding
    public_x, public_y = data.public_labelled()  # unlabelled public images: alignment only
    res = pretrain_public(
        model,
        public_x,
        public_y,
        data.public_val_x if len(data.public_val_y) else None,
        data.public_val_y if len(data.public_val_y) else None,
        data.public_norm,
        epochs=c.public_epochs,
        batch_size=c.public_batch_size,
        lr=c.lr,
        head_l2=c.head_l2,
        patience=c.public_patience,
        crop_padding=crop,
        hflip=bool(crop) and data.public_hflip,
        device=device,
        seed=step_seed(seed, party, 1),
        desc=f"party {party} public",
        progress=progress,
    )
    public_state = copy.deepcopy(res.state_dict)
    after_public = private_accuracy(
        model, data.test_x, data.test_y, data.private_norm, data.offset, data.num_private, device
    )
    revisit(
        model,
        data.private_x[party],
        data.private_y[party],
        data.private_norm,
        epochs=c.private_epochs,
        batch_size=c.private_batch_size,
        lr=c.lr,
        head_l2=c.head_l2,
        crop_padding=crop,
        hflip=bool(crop) and data.private_hflip,
        device=device,
        seed=step_seed(seed, party, 2),
        desc=f"party {party} private",
        progress=progress,
    )
    test_logits = predict_logits(model, data.test_x, data.private_norm, device)
    alone = restricted_accuracy(test_logits, data.test_y, data.offset, data.num_private)
    return {
        "public_val_acc": res.best_val_acc,
        "public_epochs_run": len(res.history.get("train_loss", [])),
        "private_acc_after_public": after_public,
        "alone_acc": alone,
        "public_state": public_state,
        "test_logits": test_logits,
    }


def pooled_baseline(
    model: torch.nn.Module,
    data: FedMDData,
    party: int,
    c: FedMDConfig,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Upper bound for one architecture: ``model`` (public-pretrained weights) trained on the
    union of every party's private data, evaluated on the private test task."""
    x, y = data.pooled()
    crop = c.crop_padding
    revisit(
        model,
        x,
        y,
        data.private_norm,
        epochs=c.pooled_epochs,
        batch_size=c.pooled_batch_size,
        lr=c.lr,
        head_l2=c.head_l2,
        crop_padding=crop,
        hflip=bool(crop) and data.private_hflip,
        device=device,
        seed=step_seed(seed, party, 3),
        desc=f"party {party} pooled",
    )
    return private_accuracy(
        model, data.test_x, data.test_y, data.private_norm, data.offset, data.num_private, device
    )


def alone_extended(
    model: torch.nn.Module,
    data: FedMDData,
    party: int,
    c: FedMDConfig,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float | None:
    """Control for one party: the alone model (changed in place) trained on its own private data
    for as many epochs as the rounds' revisits add up to; private test accuracy."""
    if not (c.extended_alone and c.rounds * c.revisit_epochs > 0):
        return None
    revisit(
        model,
        data.private_x[party],
        data.private_y[party],
        data.private_norm,
        epochs=c.rounds * c.revisit_epochs,
        batch_size=c.revisit_batch_size,
        lr=round_lr(c),
        head_l2=c.head_l2,
        crop_padding=c.crop_padding,
        hflip=bool(c.crop_padding) and data.private_hflip,
        device=device,
        seed=step_seed(seed, party, 4),
    )
    return private_accuracy(
        model, data.test_x, data.test_y, data.private_norm, data.offset, data.num_private, device
    )


def local_round(
    model: torch.nn.Module,
    data: FedMDData,
    party: int,
    c: FedMDConfig,
    subset_x: torch.Tensor,
    consensus: torch.Tensor,
    round_: int,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One party's side of round ``round_`` after the consensus arrives: digest, revisit, then
    the logits on the private test task. Returns the logits and the seconds of each step.

    The same seeds as :func:`run_fedmd`'s loop, so a distributed runner calling this reproduces it.
    """
    t0 = time.perf_counter()
    digest(
        model,
        subset_x,
        consensus,
        data.public_norm,
        epochs=c.digest_epochs,
        batch_size=c.digest_batch_size,
        lr=round_lr(c),
        head_l2=c.head_l2,
        loss=c.digest_loss,
        scores=c.scores,
        temperature=c.temperature,
        device=device,
        seed=step_seed(seed, party, 10, round_),
    )
    t1 = time.perf_counter()
    revisit(
        model,
        data.private_x[party],
        data.private_y[party],
        data.private_norm,
        epochs=c.revisit_epochs,
        batch_size=c.revisit_batch_size,
        lr=round_lr(c),
        head_l2=c.head_l2,
        crop_padding=c.crop_padding,
        hflip=bool(c.crop_padding) and data.private_hflip,
        device=device,
        seed=step_seed(seed, party, 11, round_),
    )
    t2 = time.perf_counter()
    logits = predict_logits(model, data.test_x, data.private_norm, device)
    times = {"digest": t1 - t0, "revisit": t2 - t1, "evaluate": time.perf_counter() - t2}
    return logits, times


def draw_public_subset(public_y: torch.Tensor, size: int, seed: int, round_: int) -> np.ndarray:
    """Indices of this round's stratified public subset (the same for every party).

    Strata are the public labels; the unlabelled public images (label -1) form one stratum, so
    no label of theirs is ever used.
    """
    if size > len(public_y):
        raise ConfigError(
            f"fedmd.public_subset_size={size} is larger than the public set ({len(public_y)})"
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 4242, int(round_)]))
    return stratified_subset(public_y.numpy(), size, rng)


# ============================================================================ parties


def party_architectures(c: FedMDConfig) -> list[str]:
    """One architecture name per party (``parties`` cycled to ``num_parties``), checked."""
    from fed_distill.models import list_models

    n = c.num_parties or len(c.parties)
    names = [str(c.parties[i % len(c.parties)]) for i in range(n)]
    known = set(list_models())
    for name in names:
        if name not in known:
            raise ModelError(
                f"fedmd.parties: unknown architecture '{name}'; available: "
                + ", ".join(sorted(known))
            )
    return names


def build_party_model(
    name: str, data: FedMDData, width_scale: float = 1.0, seed: int = 0
) -> torch.nn.Module:
    """Build a party's model with the joint output layer (``width_scale`` where it applies)."""
    from fed_distill.models import build_model, model_kwargs

    kwargs: dict[str, Any] = {}
    if "width_scale" in model_kwargs(name):
        kwargs["width_scale"] = width_scale
    with seeded(seed):
        model = build_model(name, data.num_outputs, data.in_channels, data.image_size, **kwargs)
    # channels_last: 2-3x faster convolutions and pooling on CPU for these small nets.
    return model.to(memory_format=torch.channels_last)


# ============================================================================ runner


def run_fedmd(cfg: DictConfig) -> dict[str, Any]:
    """``fed-distill fedmd``: transfer learning, R rounds of FedMD, alone and pooled baselines.

    Writes ``run_dir/results.json`` (``rounds``, ``party_acc`` [per party, rounds+1 values,
    round 0 = after transfer learning], ``alone_acc``, ``pooled_acc``, ``alone_extended_acc``,
    ``wall_time_s``, ``round_times_s``, ``parties``, per-round ``consensus_distance`` and
    ``left_out`` parties, the resolved ``config``) and ``run_dir/fedmd_accuracy.png``.
    Presets: ``fedmd=quick|fashion|fashion_same_domain|mnist_femnist_balanced|...``.
    """
    from fed_distill.artifacts import load_json, remove_file, save_json, save_weights
    from fed_distill.config import as_object, to_container
    from fed_distill.pipeline import _fingerprint, checkpoint_dir, format_table
    from fed_distill.train.fit import load_resumable
    from fed_distill.utils import progress_bar, resolve_device, seed_everything

    t_start = time.perf_counter()
    c: FedMDConfig = as_object(cfg.fedmd, FedMDConfig)
    check_fedmd_config(c)
    if c.data_dir is None and cfg.get("dataset") is not None and cfg.dataset.get("data_dir"):
        c.data_dir = str(cfg.dataset.data_dir)  # dataset.data_dir=DIR works here too
    device = resolve_device(str(cfg.device))
    seed = int(cfg.seed)
    probe = progress_bar([], enabled=bool(cfg.progress))
    show = not probe.disable  # progress bars on interactive terminals only
    probe.close()
    run_dir = Path(str(cfg.run_dir))
    archs = party_architectures(c)
    names = [f"party {i} ({a})" for i, a in enumerate(archs)]
    # A finished run with the same settings is not redone; an interrupted one continues from
    # run_dir/checkpoints/fedmd.safetensors (written after every party's transfer learning and
    # baselines, and every fedmd.checkpoint_every rounds). force=true starts afresh.
    fp = _fingerprint(
        {"fedmd": {k: v for k, v in asdict(c).items() if k != "checkpoint_every"}, "seed": seed}
    )
    ckpt_path = checkpoint_dir(run_dir) / "fedmd.safetensors"
    if cfg.force:
        remove_file(ckpt_path)
    elif (run_dir / "results.json").is_file():
        old = load_json(run_dir / "results.json", "results.json")
        if isinstance(old, dict) and old.get("fingerprint") == fp:
            print(
                f"fedmd already finished (mean accuracy {old['mean_acc'][0]:.4f} alone ->"
                f" {old['mean_acc'][-1]:.4f} after {old['rounds']} rounds, {run_dir / 'results.json'});"
                " force=true to redo"
            )
            if not (run_dir / "fedmd_accuracy.png").is_file():  # killed just before the plot
                plot_fedmd(old, run_dir / "fedmd_accuracy.png")
            return old
    seed_everything(seed)
    stage_times: dict[str, float] = {}

    t0 = time.perf_counter()
    data = build_fedmd_data(c, len(archs), seed)
    stage_times["data"] = time.perf_counter() - t0
    print(
        f"fedmd '{c.name}': {len(archs)} parties; public {c.public} ({len(data.public_y)} train,"
        f" {len(data.public_val_y)} val, {len(data.public_names)} classes); private {c.private}"
        f" ({c.partition}, {sum(len(y) for y in data.private_y)} images in all, "
        f"{data.num_private} classes at outputs {data.offset}..{data.offset + data.num_private - 1}"
        f" of {data.num_outputs}); test {len(data.test_y)} images; device {device}"
    )

    # --- resuming ------------------------------------------------------------------------------
    models: list[torch.nn.Module] = []
    transfer: list[dict[str, Any]] = []
    ensemble: list[float] = []
    pooled: list[float | None] = [None] * len(archs)
    extended: list[float | None] = [None] * len(archs)
    party_acc: list[list[float]] = []
    distances: list[list[float | None]] = []
    left_out_log: list[list[dict[str, Any]]] = []
    round_times: list[float] = []
    steps = {"communicate": 0.0, "aggregate": 0.0, "digest": 0.0, "revisit": 0.0, "evaluate": 0.0}
    done = {"transfer": 0, "pooled": 0, "extended": 0, "rounds": 0}
    meta = {"fingerprint": fp}
    every = c.checkpoint_every

    def checkpoint() -> None:
        if every <= 0:
            return
        state = {
            "meta": meta,
            "done": done,
            "models": [m.state_dict() for m in models],
            "transfer": transfer,
            "ensemble": ensemble,
            "pooled": pooled,
            "extended": extended,
            "party_acc": party_acc,
            "distances": distances,
            "left_out": left_out_log,
            "round_times": round_times,
            "steps": steps,
            "stage_times": stage_times,
            "elapsed": time.perf_counter() - t_start,
            "rng": torch.get_rng_state(),
        }
        save_checkpoint(state, ckpt_path)

    ckpt = load_resumable(ckpt_path if every > 0 else None, meta, "fedmd")
    if ckpt is not None:
        for i, state in enumerate(ckpt["models"]):
            m = build_party_model(archs[i], data, c.width_scale, seed=step_seed(seed, i, 0))
            m.load_state_dict(state)
            models.append(m.to(device))
        transfer, ensemble = ckpt["transfer"], ckpt["ensemble"]
        pooled, extended, party_acc = ckpt["pooled"], ckpt["extended"], ckpt["party_acc"]
        distances, left_out_log = ckpt["distances"], ckpt["left_out"]
        round_times, steps, done = ckpt["round_times"], ckpt["steps"], ckpt["done"]
        stage_times = {**ckpt["stage_times"], "data": stage_times["data"]}
        t_start -= ckpt["elapsed"]
        torch.set_rng_state(ckpt["rng"])
        print(
            f"fedmd: resuming after {done['transfer']}/{len(archs)} parties' transfer learning,"
            f" {done['pooled']} pooled and {done['extended']} extended baselines,"
            f" {done['rounds']}/{c.rounds} rounds (checkpoint {ckpt_path})"
        )

    # --- transfer learning ---------------------------------------------------------------------
    t0 = time.perf_counter()
    for i, arch in enumerate(archs):
        if i < done["transfer"]:
            continue  # restored from the checkpoint
        m = build_party_model(arch, data, c.width_scale, seed=step_seed(seed, i, 0)).to(device)
        tr = transfer_learning(m, data, i, c, device=device, seed=seed, progress=show)
        print(
            f"{names[i]}: public val {tr['public_val_acc']:.4f} "
            f"({tr['public_epochs_run']} epochs), private test after public "
            f"{tr['private_acc_after_public']:.4f}, alone {tr['alone_acc']:.4f}"
        )
        models.append(m)
        transfer.append(tr)
        done["transfer"] = i + 1
        checkpoint()
    stage_times["transfer_learning"] = (
        stage_times.get("transfer_learning", 0.0) + time.perf_counter() - t0
    )
    alone = [tr["alone_acc"] for tr in transfer]
    # diagnostic: the mean-logit ensemble of the parties on the private test task, per round
    if not ensemble:
        ensemble = [
            restricted_accuracy(
                torch.stack([tr.pop("test_logits") for tr in transfer]).mean(0),
                data.test_y,
                data.offset,
                data.num_private,
            )
        ]

    # --- baselines: pooled (upper bound) and alone extended (control) --------------------------
    t0 = time.perf_counter()
    if c.pooled:
        for i, arch in enumerate(archs):
            if i < done["pooled"]:
                continue
            m = build_party_model(arch, data, c.width_scale, seed=step_seed(seed, i, 0))
            m.load_state_dict(transfer[i]["public_state"])
            pooled[i] = pooled_baseline(m.to(device), data, i, c, device=device, seed=seed)
            del m
            done["pooled"] = i + 1
            checkpoint()
    stage_times["pooled"] = stage_times.get("pooled", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    if c.extended_alone and c.rounds * c.revisit_epochs > 0:
        for i in range(len(archs)):
            if i < done["extended"]:
                continue
            extended[i] = alone_extended(copy.deepcopy(models[i]), data, i, c, device, seed)
            done["extended"] = i + 1
            checkpoint()
    stage_times["alone_extended"] = (
        stage_times.get("alone_extended", 0.0) + time.perf_counter() - t0
    )
    for transfer_result in transfer:
        transfer_result.pop("public_state", None)

    # --- collaboration rounds ---------------------------------------------------------------------
    if not party_acc:
        party_acc = [[a] for a in alone]
    crop = c.crop_padding
    bar = progress_bar(range(done["rounds"] + 1, c.rounds + 1), desc="fedmd rounds", enabled=show)
    for r in bar:
        t_round = time.perf_counter()
        idx = torch.as_tensor(draw_public_subset(data.public_y, c.public_subset_size, seed, r))
        subset_x = data.public_x[idx]

        t0 = time.perf_counter()
        messages = [
            class_scores(
                m,
                subset_x,
                data.public_norm,
                kind=c.scores,
                temperature=c.temperature,
                device=device,
            )
            for m in models
        ]
        steps["communicate"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        expected = (len(idx), data.num_outputs)
        valid, used, left_out = collect_scores(messages, expected, names, c.on_invalid_scores)
        weights = (
            [c.aggregate_weights[i] for i in used] if c.aggregate_weights is not None else None
        )
        consensus = aggregate(valid, c.aggregate, weights, c.trim)
        dist: list[float | None] = [None] * len(models)
        for i, s in zip(used, valid, strict=True):
            dist[i] = consensus_distance(s, consensus)
        distances.append(dist)
        left_out_log.append(left_out)
        steps["aggregate"] += time.perf_counter() - t0

        logit_sum = torch.zeros(len(data.test_y), data.num_outputs)
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            digest(
                m,
                subset_x,
                consensus,
                data.public_norm,
                epochs=c.digest_epochs,
                batch_size=c.digest_batch_size,
                lr=round_lr(c),
                head_l2=c.head_l2,
                loss=c.digest_loss,
                scores=c.scores,
                temperature=c.temperature,
                device=device,
                seed=step_seed(seed, i, 10, r),
            )
            t1 = time.perf_counter()
            revisit(
                m,
                data.private_x[i],
                data.private_y[i],
                data.private_norm,
                epochs=c.revisit_epochs,
                batch_size=c.revisit_batch_size,
                lr=round_lr(c),
                head_l2=c.head_l2,
                crop_padding=crop,
                hflip=bool(crop) and data.private_hflip,
                device=device,
                seed=step_seed(seed, i, 11, r),
            )
            t2 = time.perf_counter()
            logits = predict_logits(m, data.test_x, data.private_norm, device)
            party_acc[i].append(
                restricted_accuracy(logits, data.test_y, data.offset, data.num_private)
            )
            logit_sum += logits
            steps["digest"] += t1 - t0
            steps["revisit"] += t2 - t1
            steps["evaluate"] += time.perf_counter() - t2
        ensemble.append(
            restricted_accuracy(logit_sum / len(models), data.test_y, data.offset, data.num_private)
        )
        round_times.append(time.perf_counter() - t_round)
        mean_now = float(np.mean([a[-1] for a in party_acc]))
        bar.set_postfix(mean_acc=f"{mean_now:.4f}")
        if not show:
            print(
                f"round {r}/{c.rounds}: mean private accuracy {mean_now:.4f} "
                f"(alone {np.mean(alone):.4f}), {round_times[-1]:.1f}s"
                + (f", left out {[d['party'] for d in left_out]}" if left_out else "")
            )
        done["rounds"] = r
        if every > 0 and r % every == 0 and r < c.rounds:
            checkpoint()
    bar.close()
    stage_times["rounds"] = float(sum(round_times))

    # --- results ------------------------------------------------------------------------------------
    if c.save_models:
        for i, m in enumerate(models):
            save_weights(m, run_dir / "parties" / f"party_{i}.safetensors", {"arch": archs[i]})
    final = [a[-1] for a in party_acc]
    results: dict[str, Any] = {
        "rounds": c.rounds,
        "parties": archs,
        "party_acc": party_acc,
        "alone_acc": alone,
        "pooled_acc": pooled,
        "alone_extended_acc": extended,
        "final_acc": final,
        "mean_acc": [float(np.mean([a[r] for a in party_acc])) for r in range(c.rounds + 1)],
        "mean_gain": float(np.mean(final) - np.mean(alone)),
        "ensemble_acc": ensemble,
        "public_val_acc": [tr["public_val_acc"] for tr in transfer],
        "private_acc_after_public": [tr["private_acc_after_public"] for tr in transfer],
        "consensus_distance": distances,
        "left_out": left_out_log,
        "wall_time_s": time.perf_counter() - t_start,
        "round_times_s": round_times,
        "step_times_s": steps,
        "stage_times_s": stage_times,
        "device": str(device),
        "data": data.summary(),
        "preset": c.name,
        "config": to_container(cfg),
        "fingerprint": fp,
    }
    save_json(results, run_dir / "results.json")
    remove_file(ckpt_path)
    plot_fedmd(results, run_dir / "fedmd_accuracy.png")
    print(summary_table(results, format_table))
    print(f"results in {run_dir / 'results.json'}, figure {run_dir / 'fedmd_accuracy.png'}")
    return results


def summary_table(results: dict[str, Any], format_table: Callable | None = None) -> str:
    """Per party: alone -> after R rounds -> pooled, gain; then the means and timings."""
    if format_table is None:
        from fed_distill.pipeline import format_table
    r = results["rounds"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    rows = []
    for i, arch in enumerate(results["parties"]):
        acc = results["party_acc"][i]
        rows.append(
            [
                i,
                arch,
                f(results["alone_acc"][i]),
                f(results.get("alone_extended_acc", [None] * (i + 1))[i]),
                f(acc[-1]),
                f(results["pooled_acc"][i]),
                f"{100 * (acc[-1] - results['alone_acc'][i]):+.1f}",
            ]
        )

    def mean(key: str) -> str:
        vals = [v for v in results.get(key, []) if v is not None]
        return f(float(np.mean(vals))) if vals else "-"

    final = [a[-1] for a in results["party_acc"]]
    gain = 100 * (np.mean(final) - np.mean(results["alone_acc"]))
    rows.append(
        [
            "mean",
            "",
            mean("alone_acc"),
            mean("alone_extended_acc"),
            f(float(np.mean(final))),
            mean("pooled_acc"),
            f"{gain:+.1f}",
        ]
    )
    header = ["party", "model", "alone", "alone ext.", f"FedMD r{r}", "pooled", "gain pts"]
    rt = results.get("round_times_s") or [0.0]
    tail = f"mean time per round {np.mean(rt):.1f}s; wall time {results['wall_time_s']:.1f}s"
    return format_table(header, rows) + "\n" + tail


def plot_fedmd(results: dict[str, Any], path: str | Path) -> None:
    """Per-party private test accuracy per round (round 0 = alone), with the mean in black, the
    mean alone and mean pooled levels as horizontal lines, and each party's pooled accuracy as a
    star at the right edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fed_distill.artifacts import save_figure

    rounds = results["rounds"]
    xs = np.arange(rounds + 1)
    x_pooled = rounds + max(0.6, 0.08 * rounds)  # the pooled column, right of the last round
    fig, ax = plt.subplots(figsize=(8.5, 5))
    cmap = plt.get_cmap("tab10")
    pooled = results["pooled_acc"]
    for i, acc in enumerate(results["party_acc"]):
        color = cmap(i % 10)
        ax.plot(xs, acc, color=color, lw=1.2, alpha=0.8, label=f"{i}: {results['parties'][i]}")
        if pooled[i] is not None:
            ax.plot([x_pooled], [pooled[i]], marker="*", ms=9, color=color, ls="none")
    mean = np.mean(np.asarray(results["party_acc"], dtype=float), axis=0)
    ax.plot(xs, mean, color="black", lw=2.6, label="mean of parties")
    if results.get("ensemble_acc"):
        ax.plot(
            xs,
            results["ensemble_acc"],
            color="purple",
            lw=1.6,
            ls="--",
            label="ensemble (diagnostic)",
        )
    ax.axhline(np.mean(results["alone_acc"]), color="grey", ls="--", lw=1.5, label="mean alone")
    pooled_vals = [p for p in pooled if p is not None]
    if pooled_vals:
        ax.axhline(np.mean(pooled_vals), color="black", ls=":", lw=1.5, label="mean pooled")
        ax.plot([], [], marker="*", color="grey", ls="none", ms=9, label="pooled (per party)")
    ext = [v for v in results.get("alone_extended_acc", []) if v is not None]
    if ext:
        ax.axhline(np.mean(ext), color="tab:brown", ls="-.", lw=1.2, label="mean alone, extended")
    ax.set_xlim(-0.3, x_pooled + 0.5)
    ticks: list[float] = list(range(0, rounds + 1, max(1, rounds // 10)))
    labels = [str(t) for t in ticks]
    if pooled_vals:
        ticks.append(x_pooled)
        labels.append("pooled")
    ax.set_xticks(ticks, labels)
    ax.set_xlabel("round (0 = after transfer learning = alone)")
    ax.set_ylabel("private test accuracy")
    ax.set_title(
        f"FedMD ({results.get('preset', '')}): {len(results['parties'])} parties, "
        f"mean gain {100 * results.get('mean_gain', mean[-1] - mean[0]):+.1f} points"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    save_figure(fig, path)
