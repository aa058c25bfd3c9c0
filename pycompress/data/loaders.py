"""DataLoaders with reproducible shuffling and worker seeding."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import build_dataset


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: seed numpy and ``random`` from the worker's torch seed (which DataLoader
    derives from its generator), so third-party augmentations are reproducible too."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False, pin_memory: bool = False,
                persistent_workers: bool = False) -> DataLoader:
    """A DataLoader whose shuffling and per-worker RNGs derive from ``seed`` only."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=pin_memory, generator=g,
                      worker_init_fn=seed_worker if num_workers > 0 else None,
                      persistent_workers=persistent_workers and num_workers > 0)


def make_loaders(name: str, *, data_root=None, batch_size: int = 128,
                 test_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0,
                 augment: bool = True, test_split: str = "test", drop_last: bool = False,
                 pin_memory: bool = False, **kwargs):
    """Build ``(train_loader, test_loader, info)`` for dataset ``name``.

    The train loader shuffles with a generator seeded by ``seed`` (same order for the same seed,
    also with workers: worker RNGs are seeded from it); the test loader does not shuffle.
    ``info`` is the train split's :class:`DatasetInfo`. Extra kwargs go to :func:`build_dataset`.

    >>> train, test, info = make_loaders("synthetic", batch_size=32, length=64)
    """
    train_set, info = build_dataset(name, "train", data_root=data_root, augment=augment, **kwargs)
    test_set, _ = build_dataset(name, test_split, data_root=data_root, augment=False, **kwargs)
    train = make_loader(train_set, batch_size, shuffle=True, seed=seed, num_workers=num_workers,
                        drop_last=drop_last, pin_memory=pin_memory)
    test = make_loader(test_set, test_batch_size or batch_size, shuffle=False, seed=seed,
                       num_workers=num_workers, pin_memory=pin_memory)
    return train, test, info
