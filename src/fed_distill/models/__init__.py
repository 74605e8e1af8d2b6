"""Model zoo: ``build_model(name, num_classes, in_channels, image_size, **kwargs)``.

Importing this package registers every model (ResNets, ``cnn_small``, the FedMD CNN family).
"""

# cnn and resnet are imported for their side effect: they register their builders.
from fed_distill.models import cnn, resnet  # noqa: F401
from fed_distill.models.families import (
    FAMILIES,
    describe,
    list_families,
    mixed,
    parse_architectures,
    teacher_architectures,
)
from fed_distill.models.fedmd import (
    FEDMD_CONFIGS,
    FedMDCNN,
    fedmd_base_model,
    fedmd_default_parties,
)
from fed_distill.models.registry import (
    build_model,
    count_parameters,
    list_models,
    model_info,
    model_kwargs,
    register_model,
)

__all__ = [
    "FAMILIES",
    "FEDMD_CONFIGS",
    "FedMDCNN",
    "build_model",
    "count_parameters",
    "describe",
    "list_families",
    "mixed",
    "parse_architectures",
    "teacher_architectures",
    "fedmd_base_model",
    "fedmd_default_parties",
    "list_models",
    "model_info",
    "model_kwargs",
    "register_model",
]
