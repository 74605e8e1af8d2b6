"""Typed config of the FedMD protocol (config group ``fedmd``). Kept free of heavy imports.

:class:`FedMDConfig` holds the protocol's own keys; the schema Hydra composes against adds every
registered consensus rule's options (:func:`fedmd_config_class`, generated from the rule registry
as the ``split`` schema is from the partitions: ``fedmd.trim`` belongs to
``fedmd.aggregate=trimmed_mean``). A misspelt key or a wrong type fails at composition, and
:func:`check_fedmd_config` checks the values (one clear line per problem).
Presets live in ``conf/fedmd/*.yaml``; ``fed-distill fedmd fedmd=NAME key=value`` picks one.

Label space (``label_space``):

* ``joint`` (the paper's): one output layer with the public classes first and the private
  classes after them, e.g. 10 digits + 6 letters = 16 outputs, letter ``k`` at output
  ``10 + k``. Private accuracy is the argmax over the private outputs only.
* ``shared``: public and private data have the *same* classes (same class names), so the
  model has one head of that size and nothing is offset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from fed_distill.checks import check_finite

PARTITIONS = ("balanced", "writer", "subclass")
SCORE_KINDS = ("logits", "softmax")
DIGEST_LOSSES = ("mae", "kl")
LABEL_SPACES = ("joint", "shared")
ON_INVALID = ("error", "skip")
REVISIT_OUTPUTS = ("all", "held")


def _paper_parties() -> list[str]:
    return [f"fedmd_{i}" for i in range(1, 11)]


@dataclass
class FedMDConfig:
    """FedMD (Li & Wang 2019): data, parties, transfer learning, rounds and baselines."""

    name: str = "quick"

    # --- data: a labelled public dataset and few-shot private data -----------------------
    public: str = "mnist5k"  # dataset name (fed-distill data info NAME)
    public_options: dict[str, Any] = field(default_factory=dict)  # e.g. {image_size: 28}
    public_classes: list[int] | None = None  # None = every class of the public dataset
    public_size: int | None = None  # cap on the public training pool (stratified); None = all
    public_val_size: int = 500  # held out of the public pool for early stopping
    # Classes of the public dataset whose training images join the public pool *without* their
    # labels: drawn into the alignment subsets (communicate / digest) only, never used for
    # transfer learning or validation; images a party owns are excluded. E.g. a held-out pool of
    # Fashion-MNIST images of the private classes that nobody labelled. [] = none (the paper).
    public_unlabelled_classes: list[int] = field(default_factory=list)
    public_unlabelled_size: int | None = None  # cap on those images (uniform draw); None = all
    private: str = "fashion_mnist"
    private_options: dict[str, Any] = field(default_factory=dict)
    private_classes: list[int] | None = None  # None = all; subclass: coarse (super)class ids
    # balanced | writer (one writer per party) | subclass | any split=NAME partition (iid,
    # dirichlet, quantity, noise, ...: samples_per_class x classes x parties images of the
    # private classes, partitioned by it with its split.* parameters)
    partition: str = "balanced"
    samples_per_class: int = 3  # per party and class (writer: minimum a writer must have)
    label_space: str = "joint"  # joint (public classes, then private ones) | shared
    data_dir: str | None = None
    download: bool = True

    # --- parties ---------------------------------------------------------------------------
    parties: list[str] = field(default_factory=_paper_parties)  # architectures, one per party
    num_parties: int | None = None  # None = len(parties); otherwise the list is cycled
    width_scale: float = 1.0  # shrinks the FedMD CNNs' filters (models that accept it)

    # --- transfer learning (public, then private) -----------------------------------------
    lr: float = 1e-3  # Adam everywhere, as in the paper
    # Adam's lr in the rounds' digest and revisit steps and in the alone-extended control (which
    # stands for the rounds' revisits); None = lr. Lower it when small private sets make the
    # parties' accuracy swing from round to round.
    round_lr: float | None = None
    head_l2: float = 1e-3  # L2 on the output layer's weights in every loss (the authors' Keras)
    public_epochs: int = 20
    public_batch_size: int = 128
    public_patience: int | None = 3  # early stopping on the public validation part
    private_epochs: int = 25
    private_batch_size: int = 32
    crop_padding: int = 0  # random-crop augmentation of images (0 = off, as in the paper)

    # --- collaboration rounds ----------------------------------------------------------------
    rounds: int = 20
    public_subset_size: int = 5000  # stratified public subset drawn afresh every round
    scores: str = "logits"  # what parties send: logits | softmax (with temperature)
    temperature: float = 1.0  # softmax scores and the KL digest loss
    # the consensus rule, a registered one (federated/rules/: what each weighs, its options
    # and what parties send for it; `fed-distill fedmd --cfg` lists them)
    aggregate: str = "mean"
    # DS-FL's entropy reduction: the consensus's log-probabilities divided by it (1 = off)
    sharpen: float = 1.0
    # diagnostic, not a rule: the consensus's errors on the public images whose true label the
    # benchmark knows are corrected (fedmd_server.oracle_corrected); consensus_acc becomes 1 and
    # FedMD's final accuracy is what a right consensus (same margins) gives this digest/revisit
    oracle_consensus: bool = False
    # private images per party held out of all its training (aggregate=reliability measures
    # the party's accuracy on them each round and sends it with its scores); 0 = none
    reliability_holdout: int = 0
    on_invalid_scores: str = "error"  # error | skip (leave the party out of that round)
    digest_loss: str = "mae"  # mae (the paper, on logits) | kl (with temperature)
    digest_epochs: int = 1
    digest_batch_size: int = 256
    revisit_epochs: int = 2
    revisit_batch_size: int = 5
    # the rounds' revisit: cross-entropy over all outputs (the paper) | held: over the public
    # outputs and the private classes the party holds, so it does not undo what the digest
    # taught of classes it has no images of (label skew)
    revisit_outputs: str = "all"
    # false: the last round has no revisit, so the parties keep the model of the last digest
    # (under label skew the revisit undoes much of what the digest taught); true = the paper
    final_revisit: bool = True

    # --- baselines ---------------------------------------------------------------------------
    pooled: bool = True  # each architecture trained on the union of the private data
    pooled_epochs: int = 50
    pooled_batch_size: int = 32
    extended_alone: bool = True  # control: alone + rounds*revisit_epochs more private epochs
    save_models: bool = True  # final party weights -> run_dir/parties/party_{i}.safetensors

    # --- interruption ----------------------------------------------------------------------------
    # run_dir/checkpoints/fedmd.safetensors after every party's transfer learning and baselines
    # and every N rounds; rerunning the same command continues from it (0 = no checkpoints).
    checkpoint_every: int = 1


def check_fedmd_config(
    c: FedMDConfig, split: Mapping[str, Any] | None = None, consensus: bool = True
) -> None:
    """Raise ConfigError (one line) for values no run can use; cheap, reads no data.
    ``split``: the ``split`` config, whose keys parameterise a registered partition
    (``fedmd.partition=noise split.sigma=0.3``). ``consensus=False`` leaves the rule to the
    server (a Flower party's process may not know a rule the server registered)."""
    from fed_distill.errors import ConfigError

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"fedmd.{msg}")

    private_split_params(c, split)  # the partition's own check, where it is a registered one
    if consensus:
        from fed_distill.federated.fedmd_consensus import check_consensus_config

        check_consensus_config(c)  # the rule's name, its options' own check and sharpen
    for key, allowed in (
        ("scores", SCORE_KINDS),
        ("digest_loss", DIGEST_LOSSES),
        ("label_space", LABEL_SPACES),
        ("on_invalid_scores", ON_INVALID),
        ("revisit_outputs", REVISIT_OUTPUTS),
    ):
        value = getattr(c, key)
        need(value in allowed, f"{key} must be one of {', '.join(allowed)}, got '{value}'")
    need(len(c.parties) > 0, "parties must name at least one architecture")
    need(
        c.num_parties is None or c.num_parties >= 1,
        f"num_parties must be >= 1, got {c.num_parties}",
    )
    for key in (
        "samples_per_class",
        "public_epochs",
        "public_batch_size",
        "private_epochs",
        "private_batch_size",
        "public_subset_size",
        "digest_epochs",
        "digest_batch_size",
        "revisit_batch_size",
        "pooled_epochs",
        "pooled_batch_size",
    ):
        need(getattr(c, key) >= 1, f"{key} must be >= 1, got {getattr(c, key)}")
    for key in (
        "rounds",
        "revisit_epochs",
        "public_val_size",
        "crop_padding",
        "checkpoint_every",
        "reliability_holdout",
    ):
        need(getattr(c, key) >= 0, f"{key} must be >= 0, got {getattr(c, key)}")
    need(
        c.public_size is None or c.public_size >= 1,
        f"public_size must be >= 1, got {c.public_size}",
    )
    need(
        c.public_unlabelled_size is None or c.public_unlabelled_size >= 1,
        f"public_unlabelled_size must be >= 1 or null, got {c.public_unlabelled_size}",
    )
    unl = list(c.public_unlabelled_classes)
    need(len(set(unl)) == len(unl), f"public_unlabelled_classes lists a class twice: {unl}")
    if c.public_classes is not None:
        both = sorted(set(unl) & set(c.public_classes))
        need(not both, f"public_unlabelled_classes {both} are also in public_classes (labelled)")
    else:
        need(not unl, "public_unlabelled_classes needs public_classes (the labelled ones) set")
    need(
        c.public_patience is None or c.public_patience >= 1, "public_patience must be >= 1 or null"
    )
    need(c.lr > 0, f"lr must be > 0, got {c.lr}")
    need(c.round_lr is None or c.round_lr > 0, f"round_lr must be > 0 or null, got {c.round_lr}")
    need(c.head_l2 >= 0, f"head_l2 must be >= 0, got {c.head_l2}")
    need(c.temperature > 0, f"temperature must be > 0, got {c.temperature}")
    need(c.width_scale > 0, f"width_scale must be > 0, got {c.width_scale}")
    for key in ("public_classes", "private_classes"):
        classes = getattr(c, key)
        if classes is not None:
            need(len(classes) > 0, f"{key} must list at least one class (or be null for all)")
            need(len(set(classes)) == len(classes), f"{key} lists a class twice: {classes}")
    check_finite(c, "fedmd")  # what the checks above let through: inf


def fedmd_config_class() -> type:
    """``FedMDConfig`` with every registered consensus rule's options as typed keys (generated
    from the rule registry, so ``fedmd.KEY`` accepts exactly what some rule takes)."""
    from fed_distill.federated.rules import all_rule_params, list_rules

    key = tuple(list_rules())
    params = all_rule_params()
    if _FEDMD_CLASS.get("key") != key or _FEDMD_CLASS.get("params") != params:
        own = {f.name for f in fields(FedMDConfig)}
        clash = sorted(own & set(params))
        if clash:
            from fed_distill.errors import ConfigError

            raise ConfigError(f"a consensus rule's option fedmd.{clash[0]} is a FedMD key itself")
        spec = [
            (name, kind, field(default=d) if not isinstance(d, list | dict) else
             field(default_factory=lambda d=d: type(d)(d)))
            for name, (kind, d) in params.items()
        ]  # fmt: skip
        cls = make_dataclass("FedMDConfig", spec, bases=(FedMDConfig,))
        _FEDMD_CLASS.update(key=key, params=params, cls=cls)
    return _FEDMD_CLASS["cls"]


_FEDMD_CLASS: dict[str, Any] = {}


def fedmd_config(node: Mapping[str, Any], known_only: bool = False) -> FedMDConfig:
    """A composed ``fedmd`` config as the generated :func:`fedmd_config_class`. ``known_only``:
    drop keys no rule registered here takes (a Flower party, whose process may not know a rule
    the server registered; the server checks the rule)."""
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    cls = fedmd_config_class()
    if known_only:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in dict(values).items() if k in names}  # type: ignore[union-attr]
    return cls(**values)  # type: ignore[arg-type]


def private_split_params(
    c: FedMDConfig, split: Mapping[str, Any] | None, parties: int | None = None
) -> dict[str, Any] | None:
    """For ``fedmd.partition`` naming a registered partition (``split=NAME``'s options; FedMD's
    own are balanced, writer, subclass): its parameters from ``split`` (defaults filled in),
    checked by the partition's own check for ``parties`` parties (default: the configured
    ones) and the private classes, numbered 0..Q-1 as the partition sees them; None for
    FedMD's own partitions."""
    if c.partition in PARTITIONS:
        return None
    from fed_distill.data.partition import check_partition_params, list_partitions, own_params
    from fed_distill.errors import ConfigError

    if c.partition not in list_partitions():
        raise ConfigError(
            f"fedmd.partition must be one of {', '.join(PARTITIONS + tuple(list_partitions()))},"
            f" got '{c.partition}'"
        )
    parties = parties or c.num_parties or len(c.parties)
    num_classes = len(c.private_classes) if c.private_classes is not None else None
    params, n = check_partition_params(
        c.partition, own_params(c.partition, split or {}), parties, num_classes
    )
    if n != parties:
        raise ConfigError(
            f"fedmd.partition={c.partition}: the split names {n} clients, but there are"
            f" {parties} parties"
        )
    return params


def preset_protocol(name: str) -> str | None:
    """``"fedmd"`` for an ``experiment=NAME`` preset that sets the ``fedmd`` group, ``"oneshot"``
    for one that does not (every built-in preset: FedMD's are ``fedmd=NAME``); None when no
    built-in preset has that name."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    path = files("fed_distill.conf") / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return None
    raw = OmegaConf.to_container(OmegaConf.create(path.read_text()))
    overrides = [next(iter(d)) for d in raw.get("defaults", []) if isinstance(d, dict)]
    sets_fedmd = "fedmd" in raw or any(k.split()[-1].strip("/") == "fedmd" for k in overrides)
    return "fedmd" if sets_fedmd else "oneshot"


def check_preset_for_fedmd(cfg: Any) -> None:
    """One ConfigError line when ``experiment=NAME`` is a one-shot preset and the run is
    FedMD's: its keys (dataset, split, synthesis, ...) would be ignored, the run not the
    one the preset describes."""
    from fed_distill.conf import preset_names
    from fed_distill.errors import ConfigError

    name = cfg.get("experiment")
    if not name or preset_protocol(str(name)) != "oneshot":
        return
    raise ConfigError(
        f"experiment={name} is a one-shot preset (fed-distill oneshot experiment={name}); FedMD"
        f" takes its presets as fedmd=NAME ({', '.join(preset_names('fedmd'))})"
    )


def check_preset_for_oneshot(stage: str, cfg: Any, explicit: Any = ()) -> None:
    """One ConfigError line when a one-shot stage is given FedMD's settings, which it would
    ignore: an ``experiment=NAME`` preset that sets the ``fedmd`` group (no built-in one does),
    or a typed ``fedmd=NAME`` preset / ``fedmd.KEY`` (``explicit``: the override keys)."""
    from fed_distill.errors import ConfigError

    name = cfg.get("experiment")
    if name and preset_protocol(str(name)) == "fedmd":
        raise ConfigError(
            f"experiment={name} is a FedMD preset (fed-distill fedmd experiment={name}); stage"
            f" {stage} does not read it"
        )
    typed = [str(k) for k in explicit if k == "fedmd" or str(k).startswith("fedmd.")]
    if not typed:
        return
    if typed[0] == "fedmd":
        from omegaconf import OmegaConf

        name = OmegaConf.select(cfg, "fedmd.name", default="NAME")
        raise ConfigError(
            f"fedmd={name} is a FedMD preset (fed-distill fedmd fedmd={name}); stage {stage}"
            " does not read the fedmd group: drop it"
        )
    raise ConfigError(
        f"{typed[0]} is a FedMD key (fed-distill fedmd {typed[0]}=...); stage {stage} does not"
        " read the fedmd group: drop it"
    )


def split_of(cfg: Any) -> dict[str, Any] | None:
    """A run config's ``split`` node as a plain dict (None without one), for
    :func:`private_split_params` and ``build_fedmd_data``."""
    node = cfg.get("split")
    if node is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    return (
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    )
