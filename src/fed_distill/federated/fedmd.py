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
computes): the client's steps are here, the server's (validate, aggregate, draw the subset) in
:mod:`~fed_distill.federated.fedmd_server`, transfer learning and the baselines in
:mod:`~fed_distill.federated.fedmd_baselines`. :func:`fed_distill.federated.fedmd_run.run_fedmd`
chains them in one process, phase by phase, and the Flower runner calls the same functions on
separate machines. Each step seeds its own RNG from its arguments, so results do not depend on
the order in which parties are processed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from fed_distill.data.transforms import Normalizer
from fed_distill.errors import ConfigError, ModelError
from fed_distill.federated.config import FedMDConfig
from fed_distill.federated.fedmd_data import FedMDData
from fed_distill.federated.fedmd_server import (  # noqa: F401  (re-exported: the protocol's steps)
    aggregate,
    collect_scores,
    consensus_distance,
    consensus_of,
    draw_public_subset,
    validate_report,
    validate_scores,
)
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
    xy: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: TrainConfig,
    normalizer: Normalizer,
    loss_fn: Callable | None,
    **kwargs: Any,
) -> FitResult:
    """``fit`` under this step's own seed (``kwargs``: fit's ``device``, ``seed``, ``hflip``,
    ``desc``; no progress bar unless asked): every FedMD training step goes through here."""
    kwargs.setdefault("progress", False)
    with seeded(kwargs["seed"], kwargs.get("device", "cpu")):
        return fit(model, *xy, *(val or (None, None)), cfg, normalizer, loss_fn=loss_fn, **kwargs)


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
    xy = (public_x, consensus.float())
    return _seeded_fit(
        model, xy, None, cfg, normalizer, loss_fn, device=device, seed=seed, desc="digest"
    )


def masked_cross_entropy(
    outputs: torch.Tensor,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy with the softmax over the outputs where ``outputs`` (bool, one per output)
    is true; the others get no gradient (a restricted softmax, as FedRS's for absent classes)."""
    keep = outputs.bool()

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        masked = logits.float().masked_fill(~keep.to(logits.device), float("-inf"))
        return F.cross_entropy(masked, target)

    return loss


def revisit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    normalizer: Normalizer,
    *,
    outputs: torch.Tensor | None = None,
    epochs: int = 2,
    batch_size: int = 5,
    lr: float = 1e-3,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    patience: int | None = None,
    crop_padding: int = 0,
    hflip: bool = False,
    head_l2: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    desc: str = "revisit",
    progress: bool = False,
) -> FitResult | None:
    """Revisit (client): a few epochs of cross-entropy (+ the head L2) on labelled data, joint
    labels; without ``val`` the last weights are kept (a party has a handful of samples).

    Transfer learning's public step is this on the public data with ``val`` (its held-out part):
    the weights with the best validation accuracy are kept, early stopping after ``patience``
    epochs without progress. ``epochs=0`` does nothing and returns None. ``outputs`` (bool per
    output): the cross-entropy's softmax over those outputs only (:func:`masked_cross_entropy`).
    """
    if epochs < 1:
        return None
    cfg = adam_config(epochs, batch_size, lr, patience=patience, crop_padding=crop_padding)
    base = None if outputs is None else masked_cross_entropy(outputs)
    loss_fn = with_head_l2(base, model, head_l2)
    kwargs = dict(hflip=hflip, device=device, seed=seed, desc=desc, progress=progress)
    return _seeded_fit(model, (x, y), val, cfg, normalizer, loss_fn, **kwargs)


@dataclass(frozen=True)
class Party:
    """Party ``index`` of a run: the run's data and FedMD options, the device, and the run's
    seed, from which each of the party's steps derives its own (:meth:`seed_for`)."""

    index: int
    data: FedMDData
    c: FedMDConfig
    device: torch.device | str = "cpu"
    seed: int = 0

    def seed_for(self, *keys: int) -> int:
        """The seed of this party's step ``keys`` (stage, and round where there is one)."""
        return step_seed(self.seed, self.index, *keys)

    def own_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This party's private images and joint labels."""
        return self.data.private_x[self.index], self.data.private_y[self.index]

    def test_accuracy(self, model: torch.nn.Module) -> float:
        """``model``'s accuracy on the private test task (:func:`private_accuracy`)."""
        d = self.data
        return private_accuracy(
            model, d.test_x, d.test_y, d.private_norm, d.offset, d.num_private, self.device
        )

    def held_outputs(self) -> torch.Tensor:
        """Bool per output: the public classes' outputs and those of the private classes this
        party holds images of (its own labels: nothing leaves the party)."""
        d = self.data
        held = torch.bincount(self.own_data()[1], minlength=d.num_outputs) > 0
        held[: d.offset] = True
        return held

    def test_logits(self, model: torch.nn.Module) -> torch.Tensor:
        """``model``'s logits on the private test task."""
        return predict_logits(model, self.data.test_x, self.data.private_norm, self.device)

    def revisit(
        self,
        model: torch.nn.Module,
        xy: tuple[torch.Tensor, torch.Tensor],
        schedule: tuple[int, int, float],
        stage: tuple[int, ...],
        **kwargs: Any,
    ) -> FitResult | None:
        """:func:`revisit` on private-task data ``xy`` for ``schedule`` = (epochs, batch size,
        lr), seeded for ``stage``, with the run's head L2, crop and flip (``kwargs``: revisit's
        desc, progress)."""
        epochs, batch_size, lr = schedule
        c, crop = self.c, self.c.crop_padding
        return revisit(
            model,
            *xy,
            self.data.private_norm,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            head_l2=c.head_l2,
            crop_padding=crop,
            hflip=bool(crop) and self.data.private_hflip,
            device=self.device,
            seed=self.seed_for(*stage),
            **kwargs,
        )


def party_report(
    model: torch.nn.Module, party: Party, subset_x: torch.Tensor, sends: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """Communicate (client): what party ``party`` sends on the round's public subset -- its
    class scores, and what the server asks for besides (``sends``: what the rule
    ``fedmd.aggregate`` needs): ``class_counts`` (its private images per output, a count per
    class) or ``reliability`` (its accuracy on its held-out private images). The in-process
    rounds and the Flower client both call this."""
    c, d = party.c, party.data
    out = {
        "scores": class_scores(
            model,
            subset_x,
            d.public_norm,
            kind=c.scores,
            temperature=c.temperature,
            device=party.device,
        )
    }
    if "class_counts" in sends:
        counts = torch.bincount(party.own_data()[1], minlength=d.num_outputs)
        out["class_counts"] = counts.float()
    if "reliability" in sends:
        hx, hy = d.holdout_x[party.index], d.holdout_y[party.index]
        acc = private_accuracy(model, hx, hy, d.private_norm, d.offset, d.num_private, party.device)
        out["reliability"] = torch.tensor([acc], dtype=torch.float32)
    return out


class LocalRound(NamedTuple):
    """A party's side of a round: its logits on the private test task after revisit, its
    private accuracy right after the digest (before revisit) and the seconds of each step."""

    test_logits: torch.Tensor
    digest_acc: float
    times: dict[str, float]


def _digest_step(
    model: torch.nn.Module, party: Party, subset_x: torch.Tensor, consensus: torch.Tensor, r: int
) -> None:
    """The round's digest with the run's options (seeded for party and round)."""
    c = party.c
    digest(
        model,
        subset_x,
        consensus,
        party.data.public_norm,
        epochs=c.digest_epochs,
        batch_size=c.digest_batch_size,
        lr=round_lr(c),
        head_l2=c.head_l2,
        loss=c.digest_loss,
        scores=c.scores,
        temperature=c.temperature,
        device=party.device,
        seed=party.seed_for(10, r),
    )


def _revisit_step(model: torch.nn.Module, party: Party, r: int) -> None:
    """The round's revisit with the run's options (seeded for party and round)."""
    c = party.c
    schedule = (c.revisit_epochs, c.revisit_batch_size, round_lr(c))
    outputs = party.held_outputs() if c.revisit_outputs == "held" else None
    party.revisit(model, party.own_data(), schedule, (11, r), outputs=outputs)


def local_round(
    model: torch.nn.Module,
    party: Party,
    subset_x: torch.Tensor,
    consensus: torch.Tensor,
    round_: int,
) -> LocalRound:
    """One party's side of round ``round_`` after the consensus arrives: digest, evaluate (the
    accuracy after digest), revisit, then the logits on the private test task. With
    ``fedmd.final_revisit=false`` the last round has no revisit: the run ends on its digest.

    The in-process rounds (``fedmd_run``) and the Flower client both call this, with the same seeds.
    """
    c = party.c
    t0 = time.perf_counter()
    _digest_step(model, party, subset_x, consensus, round_)
    t1 = time.perf_counter()
    if not c.final_revisit and round_ == c.rounds:  # the parties keep the digested model
        logits = party.test_logits(model)
        d = party.data
        acc = restricted_accuracy(logits, d.test_y, d.offset, d.num_private)
        times = {"digest": t1 - t0, "revisit": 0.0, "evaluate": time.perf_counter() - t1}
        return LocalRound(logits, acc, times)
    digest_acc = party.test_accuracy(model)  # eval mode: changes nothing the revisit sees
    t2 = time.perf_counter()
    _revisit_step(model, party, round_)
    t3 = time.perf_counter()
    logits = party.test_logits(model)
    evaluate = (t2 - t1) + (time.perf_counter() - t3)
    return LocalRound(
        logits, digest_acc, {"digest": t1 - t0, "revisit": t3 - t2, "evaluate": evaluate}
    )


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
