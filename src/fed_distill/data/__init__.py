"""Datasets: real files -> uint8 tensors (``sources``, with its readers in ``formats``, ``bundled``
and ``download``), who owns which index (``partition``), batch-level augmentation and
normalisation (``transforms``)."""

from fed_distill.data.sources import (
    Dataset,
    DatasetInfo,
    dataset_info,
    fetch_dataset,
    find_dataset_dir,
    list_datasets,
    load_dataset,
)

__all__ = [
    "Dataset",
    "DatasetInfo",
    "dataset_info",
    "fetch_dataset",
    "find_dataset_dir",
    "list_datasets",
    "load_dataset",
]
