"""fed-distill: federated learning where clients share knowledge, not gradients.

The Python API (docs/api.md): ``fed_distill.run(stage, overrides=[...])`` runs any CLI stage
in-process and returns what it wrote; ``fed_distill.compose(stage, overrides=[...])`` returns
the resolved config. The building blocks a researcher extends are importable from here:
``make_split`` / ``register_partition``, ``load_dataset`` / ``register_dataset``,
``build_model`` / ``register_model``, ``Synthesizer`` / ``SyntheticBatch`` /
``register_synthesizer``, ``fit``, ``distill``, ``ensemble_probs``. They are imported on first use, so ``import fed_distill`` stays light.
"""

import importlib as _importlib
import os as _os

# OpenMP threads that spin while waiting turn a busy 2-core machine into a 10x slowdown for
# small models; passive waiting costs nothing when the machine is idle. Must precede torch import.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first attribute access)
_PUBLIC = {
    "run": "fed_distill.api",
    "compose": "fed_distill.api",
    "FedDistillError": "fed_distill.errors",
    "ConfigError": "fed_distill.errors",
    "DatasetError": "fed_distill.errors",
    "Dataset": "fed_distill.data",
    "DatasetInfo": "fed_distill.data",
    "load_dataset": "fed_distill.data",
    "list_datasets": "fed_distill.data",
    "register_dataset": "fed_distill.data",
    "make_split": "fed_distill.data.partition",
    "register_partition": "fed_distill.data.partition",
    "list_partitions": "fed_distill.data.partition",
    "Normalizer": "fed_distill.data.transforms",
    "build_model": "fed_distill.models",
    "register_model": "fed_distill.models",
    "list_models": "fed_distill.models",
    "Synthesizer": "fed_distill.synthesis",
    "SyntheticBatch": "fed_distill.synthesis",
    "register_synthesizer": "fed_distill.synthesis",
    "SynthesisOptions": "fed_distill.synthesis",
    "synthesis_options": "fed_distill.synthesis",
    "build_synthesizer": "fed_distill.synthesis",
    "list_synthesizers": "fed_distill.synthesis",
    "register_rule": "fed_distill.federated.rules",
    "RuleOptions": "fed_distill.federated.rules",
    "list_rules": "fed_distill.federated.rules",
    "TrainConfig": "fed_distill.train",
    "StudentConfig": "fed_distill.train",
    "fit": "fed_distill.train",
    "evaluate": "fed_distill.train",
    "distill": "fed_distill.train.student",
    "SyntheticPool": "fed_distill.train.student",
    "ensemble_probs": "fed_distill.ensemble",
    "class_shares": "fed_distill.ensemble",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(_importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'fed_distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
