"""Multi-process training with ``torchrun``: one process per device, DistributedDataParallel.

``torchrun --nproc_per_node N -m pycompress run RECIPE`` starts N processes; each reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment, and :func:`session` joins them into one
process group (nccl when they train on CUDA, each on GPU ``LOCAL_RANK``; gloo on CPUs). With one
process (plain ``pycompress run``, or ``torchrun`` with one) nothing here changes anything.

What the engine does under DDP (see ../README "Several processes"):

- **Data.** Every process sees its own share of each epoch: :class:`ShardSampler` draws ONE
  permutation from the loader's generator (seeded identically on every process, per epoch, by the
  trainer: ``set_epoch`` done right) and process ``r`` takes elements ``r, r + N, ...`` of it, the
  tail cut so that every process has the same number of steps. Global step ``k`` therefore trains
  on exactly the samples of step ``k`` of a one-process run whose batch is N times larger: the
  global batch is the per-process ``batch_size`` x N. The learning rate stays as the recipe says
  unless its ``distributed.lr_scale`` says to scale it.
- **Evaluation** counts every test image exactly once: process ``r`` evaluates images ``r, r+N,
  ...`` (no padding, no duplicates) and the sums of loss and correct predictions are all-reduced.
- **Model state.** Gradients are averaged by DDP (the student only: the KD teacher stays outside
  DDP, in eval mode under no_grad). Weights therefore stay identical, and so does everything
  computed from them: pruning masks and dense shadows (selected from the weights, or from a seeded
  generator for ``random``), weight-quantizer scales. Activation-quantizer calibration all-reduces
  the observed ranges (:func:`pycompress.quant.calibrate`). BatchNorm running statistics, the one
  state each process updates from its own data, are broadcast from process 0 at the end of every
  epoch (what DDP's ``broadcast_buffers`` would do at every step; it is off, so buffers that
  pruning adds and removes mid-stage are never broadcast stale). After every epoch
  :func:`check_replicas` compares a digest of every parameter and buffer across processes and
  stops the run, naming the tensors, if any differ.
- **Files.** Process 0 alone writes checkpoints, logs, curves, reports and artifacts, and runs the
  stages that do not train (ptq, bn_recalibrate, evaluate, export); the others wait at a barrier
  and receive its results, so every process continues from the same state.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, RandomSampler, Sampler

__all__ = [
    "ReplicaMismatch",
    "ShardSampler",
    "session",
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "barrier",
    "broadcast_object",
    "on_main",
    "shard_loader",
    "all_reduce_sum",
    "all_reduce_",
    "is_sharded",
    "broadcast_bn_buffers",
    "state_digests",
    "check_replicas",
    "lr_factor",
    "LR_SCALES",
]

LR_SCALES = ("none", "linear", "sqrt")
# How long a process waits at a collective for the others (process 0 runs export and evaluation
# alone while the others wait): long, because torchrun stops every process when one fails.
TIMEOUT = datetime.timedelta(hours=4)


class ReplicaMismatch(RuntimeError):
    """The processes of a DDP run no longer hold the same model."""


# ------------------------------------------------------------------------------ process group
def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[Optional[torch.device]]:
    """Join the processes ``torchrun`` started (``WORLD_SIZE`` > 1 in the environment) into a
    process group for the duration of the block; yields the device this process trains on
    (``cuda:LOCAL_RANK`` or cpu), or None when it runs alone (nothing is initialized then). A
    group that is already initialized (by the caller) is used as it is and left alone."""
    if dist.is_available() and dist.is_initialized():
        yield _device_for(device) if is_distributed() else None
        return
    if _env_world() <= 1:
        yield None
        return
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start several processes "
            f"with torchrun (torchrun --nproc_per_node N -m pycompress run RECIPE)"
        )
    dev = _device_for(device, before_init=True)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield dev
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _device_for(device: str, before_init: bool = False) -> torch.device:
    want = device or "auto"
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available (use --device cpu)")
    local = int(os.environ.get("LOCAL_RANK", "0")) if before_init else local_rank()
    n = torch.cuda.device_count()
    if local >= n:
        raise RuntimeError(
            f"LOCAL_RANK {local} but this machine has {n} CUDA device(s): start at most {n} processes per node "
            "(torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process (picklable objects; alone: ``obj``)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on process 0 only and return its result on every process. An exception on
    process 0 is raised again on every process (same type where it can be rebuilt from its
    message, else RuntimeError), so no process is left waiting."""
    if not is_distributed():
        return fn()
    out: Any = None
    err: Optional[tuple] = None
    if is_main():
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every process
            err = (type(exc), str(exc))
            main_exc = exc
    out, err = broadcast_object((out, err))
    if err is not None:
        if is_main():
            raise main_exc
        typ, msg = err
        try:
            raise typ(msg)
        except TypeError:
            raise RuntimeError(f"{typ.__name__} on process 0: {msg}") from None
    return out


def all_reduce_sum(values: Sequence[float], device: Any = "cpu") -> List[float]:
    """Sums over processes of a few numbers (float64; alone: the numbers)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t)
    return t.tolist()


def _comm_device(device: Any) -> torch.device:
    """Where collective tensors live: the process's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------ data
class ShardSampler(Sampler):
    """Process ``rank``'s share of a dataset of ``n`` samples among ``world`` processes.

    ``shuffle=True`` (training): one permutation ``torch.randperm(n, generator)`` (the generator
    is shared with the DataLoader and seeded identically on every process), cut to a multiple of
    ``world``; process ``r`` takes elements ``r, r + world, ...``. With ``world`` 1 this is exactly
    the order of torch's RandomSampler on the same generator, and the ``world`` shards of a batch
    of ``b`` together are one batch of ``b * world`` of the one-process order.

    ``shuffle=False`` (evaluation): indices ``r, r + world, ...`` of ``range(n)``, nothing dropped
    and nothing padded, so the shards cover every sample exactly once (their lengths may differ
    by one).
    """

    def __init__(self, n: int, rank: int, world: int, *, shuffle: bool, generator: Optional[torch.Generator] = None):
        if not 0 <= rank < world:
            raise ValueError(f"ShardSampler: rank {rank} is not in [0, {world})")
        if shuffle and generator is None:
            raise ValueError("ShardSampler: a shuffling sampler needs the generator every process seeds alike")
        self.n, self.rank, self.world, self.shuffle, self.generator = int(n), rank, world, shuffle, generator

    def __len__(self) -> int:
        if self.shuffle:
            return self.n // self.world
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.rank, self.n, self.world))
        perm = torch.randperm(self.n, generator=self.generator)
        usable = (self.n // self.world) * self.world
        return iter(perm[:usable][self.rank :: self.world].tolist())


class _RankWorkerSeed:
    """worker_init_fn: the worker's RNGs (torch, numpy, random) from its DataLoader seed and the
    process rank, so that the processes' augmentations differ (process 0: as in one process)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        seed = (torch.initial_seed() + self.rank * 1_000_003) % 2**63
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)


def shard_loader(loader: DataLoader, *, shuffle: Optional[bool] = None) -> DataLoader:
    """``loader`` re-built to yield this process's share (see :class:`ShardSampler`): same
    dataset, batch size, workers, collate function and generator. ``shuffle`` defaults to whether
    ``loader`` shuffles (its sampler is a RandomSampler). A loader that is already sharded, and
    any loader when the process runs alone, is returned as it is."""
    if not is_distributed() or isinstance(getattr(loader, "sampler", None), ShardSampler):
        return loader
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"cannot shard a {type(loader).__name__} over {world_size()} processes: pass a torch DataLoader "
            "(or shard the data yourself with pycompress.train.distributed.ShardSampler)"
        )
    if loader.batch_size is None:
        raise ValueError("cannot shard a DataLoader with a batch_sampler: give it batch_size and a sampler")
    if shuffle is None:
        shuffle = isinstance(loader.sampler, RandomSampler)
    gen = loader.generator
    if shuffle and gen is None:
        gen = torch.Generator()
        gen.manual_seed(0)
    sampler = ShardSampler(len(loader.dataset), rank(), world_size(), shuffle=shuffle, generator=gen)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        generator=gen,
        worker_init_fn=_RankWorkerSeed(rank()) if loader.num_workers > 0 else None,
        persistent_workers=loader.persistent_workers,
    )


def is_sharded(loader: Any) -> bool:
    """Whether ``loader`` (or the loader it wraps, e.g. a first-n-batches view) yields one shard."""
    while loader is not None:
        if isinstance(getattr(loader, "sampler", None), ShardSampler):
            return True
        loader = getattr(loader, "loader", None)
    return False


# ------------------------------------------------------------------------------ model state
def broadcast_bn_buffers(model: nn.Module, src: int = 0) -> int:
    """Broadcast the running statistics of every BatchNorm of ``model`` from process ``src``;
    returns how many tensors were sent."""
    if not is_distributed():
        return 0
    from torch.nn.modules.batchnorm import _BatchNorm

    n = 0
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            for b in m.buffers(recurse=False):
                dev = _comm_device(b.device)
                if b.device == dev:
                    dist.broadcast(b, src)
                else:  # a CPU buffer under nccl
                    t = b.to(dev)
                    dist.broadcast(t, src)
                    b.copy_(t)
                n += 1
    return n


def state_digests(model: nn.Module) -> Dict[str, str]:
    """SHA-256 (first 16 hex digits) of the bytes of every entry of ``model.state_dict()``."""
    out = {}
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        b = t.detach().cpu().contiguous().reshape(-1)
        data = b.view(torch.uint8).numpy().tobytes() if b.numel() else b""
        out[name] = hashlib.sha256(str((t.dtype, tuple(t.shape))).encode() + data).hexdigest()[:16]
    return out


def check_replicas(model: nn.Module, what: str = "model") -> Dict[str, Any]:
    """Compare every parameter and buffer of ``model`` (masks, shadows, quantizer scales, BN
    statistics included) across processes, bit for bit, through digests gathered on every process.
    Returns ``{"world_size", "tensors", "identical": True}``; raises :class:`ReplicaMismatch`
    naming the tensors that differ (on every process)."""
    mine = state_digests(model)
    if not is_distributed():
        return {"world_size": 1, "tensors": len(mine), "identical": True}
    every: List[Optional[Dict[str, str]]] = [None] * world_size()
    dist.all_gather_object(every, mine)
    ref = every[0]
    bad = sorted(
        {name for r, d in enumerate(every[1:], 1) for name in set(ref) | set(d) if ref.get(name) != d.get(name)}
    )
    if bad:
        raise ReplicaMismatch(
            f"{what}: the {world_size()} processes no longer hold the same model; {len(bad)} tensor(s) differ from "
            f"process 0's: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}"
        )
    return {"world_size": world_size(), "tensors": len(ref), "identical": True}


def lr_factor(scale: str, world: Optional[int] = None) -> float:
    """The learning-rate factor of ``distributed.lr_scale`` for ``world`` processes: none 1,
    linear N (Goyal et al.'s rule for SGD), sqrt sqrt(N) (often used with Adam)."""
    world = world_size() if world is None else world
    if scale not in LR_SCALES:
        raise ValueError(f"lr_scale must be one of {LR_SCALES}, got {scale!r}")
    return {"none": 1.0, "linear": float(world), "sqrt": math.sqrt(world)}[scale]


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` (sum, min or max) wherever it lives (copied to the
    communication device and back when needed); alone: ``t``."""
    if not is_distributed():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    dev = _comm_device(t.device)
    if t.device == dev:
        dist.all_reduce(t, ops[op])
        return t
    tmp = t.to(dev)
    dist.all_reduce(tmp, ops[op])
    t.copy_(tmp)
    return t
