"""Data layer: local datasets (nothing downloads), augmentation, seeded loaders.

>>> from pycompress.data import build_dataset, make_loaders, names
>>> ds, info = build_dataset("fashion_mnist", "test")          # Debian package or --data-root
>>> train, test, info = make_loaders("cifar100", data_root="data", batch_size=64,
...                                  policy="micronet", seed=0)
"""
from .augment import MICRONET_SUBPOLICIES, MicroNetPolicy, SubPolicy, apply_op
from .datasets import (
    ENV_DATA_ROOT,
    DatasetInfo,
    CropFlip,
    DatasetNotFoundError,
    IDXFormatError,
    build_dataset,
    canonical_name,
    denormalize,
    names,
    read_idx,
    register,
    write_idx,
)
from .loaders import make_loader, make_loaders, seed_worker

__all__ = [
    "MICRONET_SUBPOLICIES", "MicroNetPolicy", "SubPolicy", "apply_op", "ENV_DATA_ROOT",
    "DatasetInfo", "DatasetNotFoundError", "IDXFormatError", "build_dataset", "canonical_name",
    "denormalize", "names", "read_idx", "register", "write_idx", "make_loader", "make_loaders",
    "seed_worker", "CropFlip",
]
