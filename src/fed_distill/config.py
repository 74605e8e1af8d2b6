"""Typed configuration: Hydra structured configs, so a misspelt key or a wrong type fails at
start-up with one clear line instead of an hour into a run.

The root schema is :class:`Config`; ``conf/config.yaml`` selects one option per group
(``dataset``, ``split``, ``model``, ``train``) and every group file is validated against it.
Dataset and model options are generated from the dataset sources and the model registry, so
``dataset=NAME`` / ``model=NAME`` accept exactly what the code can build.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, make_dataclass
from importlib.resources import files
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from fed_distill.conf import preset_names
from fed_distill.errors import ConfigError
from fed_distill.federated.config import FedMDConfig, fedmd_config_class
from fed_distill.federated.refit_config import REFIT_METHODS, RefitConfig
from fed_distill.train.fit import TrainConfig
from fed_distill.train.student_config import StudentConfig


@dataclass
class DatasetConfig:
    """Which dataset, and where its files are (``data_dir`` or $FED_DISTILL_DATA)."""

    name: str = "fashion_mnist"
    data_dir: str | None = None
    download: bool = True
    image_size: int | None = None  # digits: upsample the 8x8 images; folder: resize to NxN
    path: str | None = None  # dataset=npz: the .npz file; dataset=folder: the folder
    label: str = "fine"  # cifar100 only: fine | coarse


@dataclass
class SplitConfig:
    """How the dataset is partitioned among clients: the keys every partition has. The config
    the ``split`` group uses (:func:`split_config_class`) adds every registered partition's own
    parameters (``fed_distill.data.strategies``: ``split.alpha``, ``split.sigma``, ...)."""

    strategy: str = "dirichlet"  # a registered partition (fed_distill.data.partition)
    num_clients: int = 5
    val_fraction: float = 0.1  # held out of each client's train part for model selection
    server_clients: int = 0  # the last N clients train no teacher: their data is the server's own


def split_config_class() -> type:
    """``SplitConfig`` with every registered partition's parameters as typed keys (generated
    from the partition registry, so ``split.KEY`` accepts exactly what some partition takes)."""
    from fed_distill.data.partition import list_partitions
    from fed_distill.data.partition_registry import all_params

    key = tuple(list_partitions())
    if _SPLIT_CLASS.get("key") != key:
        fields = [
            (
                name,
                kind,
                field(default=default)
                if not isinstance(default, list | dict)
                else field(default_factory=lambda d=default: type(d)(d)),
            )
            for name, (kind, default) in all_params().items()
        ]
        _SPLIT_CLASS.update(
            key=key, cls=make_dataclass("SplitConfig", fields, bases=(SplitConfig,))
        )
    return _SPLIT_CLASS["cls"]


_SPLIT_CLASS: dict[str, Any] = {}


@dataclass
class ModelConfig:
    """Architecture from the registry (``fed-distill models`` lists them) and its arguments."""

    name: str = "cnn_small"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeachersConfig:
    """Per-client architectures (``models/families.py``): a list of registered names, each
    optionally ``{name: NAME, kwargs: {...}}``, cycled over the clients, or a family
    (``fedmd_family``); null = every teacher has the ``model=`` architecture."""

    models: Any = None


@dataclass
class UploadConfig:
    """What a one-shot client uploads besides its teacher's weights and label counts."""

    # per-class BN input statistics (teachers/class_stats_{i}.safetensors), for the per-class
    # BN term of synthesis (synthesis.class_stats); false = weights and label counts only
    class_stats: bool = True
    # with class_stats: also the per-class mean and variance of the penultimate features, for
    # synthesis.feature_scale > 0 (off by default: that term is off by default, and a model
    # with a wide flattened head, e.g. fedmd_1, would upload more than its weights)
    features: bool = False
    # with class_stats: also each class's per-pixel mean and variance of the images ("layer
    # 0": an average image per class, docs/class_stats.md says what it reveals), for
    # synthesis.pixel_scale > 0
    pixels: bool = False


@dataclass
class Config:
    seed: int = 0
    run_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda[:N]
    progress: bool = True  # progress bars
    force: bool = False  # redo a finished stage
    logger: str = "none"  # none | tensorboard (live curves under run_dir/tb/)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # one synthesizer's typed options (synthesis=NAME, generated from the registry: only its keys)
    synthesis: Any = None
    student: StudentConfig = field(default_factory=StudentConfig)
    fedmd: FedMDConfig = field(default_factory=FedMDConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    # the statistics round after distillation: refit=none (one-shot) | head
    refit: RefitConfig = field(default_factory=RefitConfig)
    experiment: str | None = None  # name of the preset applied (set by experiment=NAME)


_STORED: set[tuple[str, str]] = set()


def register_configs() -> None:
    """Put the schema and the generated dataset / split / model options into Hydra's
    ConfigStore; names registered since the last call (``register_dataset`` /
    ``register_partition`` / ``register_model`` from Python) are added on the next one."""
    from fed_distill.data.partition import get_partition, list_partitions
    from fed_distill.data.sources import list_datasets
    from fed_distill.models import list_models

    cs = ConfigStore.instance()
    split_cls = split_config_class()
    fedmd_cls = fedmd_config_class()
    if (
        ("", "base_config") not in _STORED
        or _STORED_SCHEMA.get("split") is not split_cls
        or (_STORED_SCHEMA.get("fedmd") is not fedmd_cls)
    ):
        # the root schema carries the split keys of every partition registered so far, and
        # the fedmd keys of every consensus rule
        cs.store(name="base_config", node=Config(split=split_cls(), fedmd=fedmd_cls()))
        _STORED.add(("", "base_config"))
        _STORED_SCHEMA.update(split=split_cls, fedmd=fedmd_cls)
        _STORED.difference_update({k for k in _STORED if k[0] == "split"})
        for option in list(cs.repo.get("split", {})):  # partitions no longer registered
            if option.removesuffix(".yaml") not in list_partitions():
                del cs.repo["split"][option]
    for name in list_partitions():
        if ("split", name) not in _STORED:
            defaults = {k: d for k, (_, d) in get_partition(name).params.items()}
            cs.store(group="split", name=name, node=split_cls(strategy=name, **defaults))
            _STORED.add(("split", name))
    _store_synthesis(cs)
    for group, names, node in (
        ("dataset", list_datasets(), DatasetConfig),
        ("model", list_models(), ModelConfig),
        ("refit", REFIT_METHODS, lambda name: RefitConfig(method=name)),
    ):
        for name in names:
            if (group, name) not in _STORED:
                cs.store(group=group, name=name, node=node(name=name))
                _STORED.add((group, name))


_STORED_SCHEMA: dict[str, type] = {}  # the generated split / fedmd classes base_config holds
SYNTHESIS_SCHEMA = "synthesis_schema"  # the group of the methods' options a preset starts from


def _store_synthesis(cs: ConfigStore) -> None:
    """Per registered synthesizer, its options as ``synthesis_schema/NAME`` (what a preset in
    ``conf/synthesis/`` names in its defaults) and, unless a preset file of that name exists,
    as the option ``synthesis=NAME`` (its defaults). A name registered again with other
    options is stored again; one no longer registered is dropped."""
    from fed_distill.synthesis import list_synthesizers, options_class

    names = list_synthesizers()
    for group in (SYNTHESIS_SCHEMA, "synthesis"):
        for option in list(cs.repo.get(group, {})):
            name = option.removesuffix(".yaml")
            if (group, name) in _STORED and name not in names:
                del cs.repo[group][option]
                _STORED.discard((group, name))
    for name in names:
        cls = options_class(name)
        node = cls(name=name, method=name)
        for group in (SYNTHESIS_SCHEMA, "synthesis"):
            preset = files("fed_distill.conf") / "synthesis" / f"{name}.yaml"
            if group == "synthesis" and preset.is_file():
                continue
            if _STORED_OPTIONS.get((group, name)) is not cls:
                cs.store(group=group, name=name, node=node)
                _STORED.add((group, name))
                _STORED_OPTIONS[(group, name)] = cls


_STORED_OPTIONS: dict[tuple[str, str], type] = {}


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose the config for ``overrides``; any problem becomes one ConfigError line."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="fed_distill.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf raise many types; all are config errors
        message = describe_config_error(e)
    else:
        return cfg
    finally:
        GlobalHydra.instance().clear()
    raise ConfigError(_foreign_synthesis_key(message, overrides) or message)


def _foreign_synthesis_key(message: str, overrides: list[str]) -> str | None:
    """For an unknown ``synthesis.KEY``: the line that names the chosen method's options and
    the methods that take KEY (composed again without the ``synthesis.*`` overrides to learn
    the method); None for anything else."""
    m = re.match(r"unknown config key 'synthesis\.(\w+)'", message)
    if not m:
        return None
    from fed_distill.synthesis.registry import foreign_key_error

    try:
        method = _chosen_method(overrides)
    except ConfigError:
        return None
    return str(foreign_key_error(m.group(1), method))


def _chosen_method(overrides: list[str]) -> str:
    """The synthesizer ``overrides`` choose, composed without their ``synthesis.KEY`` ones (a
    key of another method would stop the composition)."""
    own = [o for o in overrides if not o.lstrip("+~").startswith("synthesis.")]
    return str(compose_config(own).synthesis.method)


def shown_config(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` as ``--cfg`` prints it: the ``fedmd`` node without the options of the rules not
    chosen (the schema carries every rule's keys, at their defaults)."""
    from fed_distill.federated.rules import all_rule_params, get_rule

    out = to_container(cfg)
    fedmd = out.get("fedmd") or {}
    if "aggregate" in fedmd:
        own = {f.name for f in fields(get_rule(fedmd["aggregate"]).options)}
        for key in all_rule_params():
            if key not in own:
                fedmd.pop(key, None)
    return out


def choices_comment() -> str:
    """What each component key can be, read from the registries, as YAML comment lines (``--cfg``
    prints them under the config)."""
    from fed_distill.data.partition import list_partitions
    from fed_distill.data.sources import list_datasets
    from fed_distill.federated.fedmd_consensus import list_rules
    from fed_distill.models import list_models
    from fed_distill.synthesis import list_synthesizers

    presets = preset_names("synthesis")
    lines = {
        "synthesis=": f"{', '.join(sorted({*presets, *list_synthesizers()}))}"
        f" (methods: {', '.join(list_synthesizers())})",
        "student=": ", ".join(preset_names("student")),
        "split=": ", ".join(list_partitions()),
        "dataset=": ", ".join(list_datasets()),
        "model=": ", ".join(list_models()),
        "refit=": ", ".join(REFIT_METHODS),
        "fedmd.aggregate=": ", ".join(list_rules()),
    }
    return "\n".join(f"# {key}{value}" for key, value in lines.items())


def applicable_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``overrides`` split into those that apply and the ``synthesis.KEY=...`` ones the chosen
    synthesizer does not take: for tools that hand one list of overrides to runs of several
    methods (the benchmarks), so ``synthesis.ngf=8`` reaches the generator rows only."""
    from fed_distill.synthesis import options_class

    keys = {f.name for f in fields(options_class(_chosen_method(overrides)))}
    kept, dropped = [], []
    for o in overrides:
        key = o.lstrip("+~").split("=")[0]
        foreign = key.startswith("synthesis.") and key.split(".")[1] not in keys
        (dropped if foreign else kept).append(o)
    return kept, dropped


def describe_config_error(e: BaseException) -> str:
    """Squeeze Hydra's multi-line composition errors into one actionable line."""
    chain = []
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(x) for x in chain)
    m = re.search(
        r"Could not find '([\w\-/]+)/([^']+)'\n\nAvailable options in '[^']+':\n((?:\t.*\n?)*)",
        text,
    )
    if m:
        options = ", ".join(o.strip() for o in m.group(3).splitlines() if o.strip())
        return f"unknown {m.group(1)} '{m.group(2)}'; available: {options}"
    m = re.search(r"Key '([^']+)' (?:is )?not in (?:struct|'(\w+)')", text)
    full = re.search(r"full_key: ([\w.\[\]]+)", text)
    if m:
        key = full.group(1) if full else m.group(1)
        return f"unknown config key '{key}' (check the spelling; `fed-distill STAGE --cfg` prints every key)"
    m = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", text)
    if m and full:
        return (
            f"config key '{full.group(1)}' needs a value of type {m.group(2)}, got '{m.group(1)}'"
        )
    first = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("To append")
    ]
    return "config: " + "; ".join(first[:2])


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def as_object(node: DictConfig, cls: type) -> Any:
    """A config node as its dataclass (validated)."""
    return cls(**OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
