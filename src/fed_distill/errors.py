"""Typed errors. The CLI prints any of them as one line and exits non-zero, without a traceback."""


class FedDistillError(Exception):
    """Base class: something the user can fix (bad input, missing file, wrong config)."""


class ConfigError(FedDistillError):
    """A config key, value or preset is wrong."""


class DatasetError(FedDistillError):
    """Dataset files are missing, truncated or malformed."""


class SplitError(FedDistillError):
    """A split is impossible, or a split file is malformed or made for other data."""


class ModelError(FedDistillError):
    """Unknown architecture or unusable model arguments."""


class CheckpointError(FedDistillError):
    """A weights/tensor file is missing, corrupt, pickle-based, or does not fit the model."""


class ProtocolError(FedDistillError):
    """A federated message (class scores, weights) is malformed: wrong shape, dtype, NaN or Inf."""


class FlowerError(FedDistillError):
    """Flower is missing, or a Flower run could not start (SuperLink, SuperNodes, app)."""
