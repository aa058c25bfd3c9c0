"""The training loop: optimizers with no-bias-decay groups, per-iteration LR schedules, optional KD
and AMP, top-1/top-5, a progress bar, metric logs and curves, atomic checkpoints and exact resume.

Determinism and resume: at the start of epoch ``e`` every RNG (python, numpy, torch, and the train
loader's shuffling generator) is re-seeded from ``(seed, name, e)``. The data order, augmentation and
dropout of an epoch therefore depend only on the seed and the epoch, not on what ran before, and a
run resumed from the checkpoint written at the end of epoch ``e - 1`` (model, optimizer, scheduler
position, AMP scaler, hook state, history and best metric) repeats epochs ``e, e+1, ...`` exactly as
an uninterrupted run does (bit for bit on the CPU).

Files in ``out_dir``: ``checkpoint.pt`` (every epoch), ``best.pt`` (best eval top-1, or last epoch
when there is no eval loader), ``metrics.csv`` or ``metrics.jsonl``, ``curves.png``.

Under ``torchrun`` (an initialized process group of N > 1 processes) the same Trainer trains with
DistributedDataParallel: each process gets its shard of the data (the loaders are re-built with
:class:`pycompress.train.distributed.ShardSampler` unless they already are), the metrics of an epoch
are summed over the processes, evaluation covers every sample once, process 0 alone writes, and the
processes are checked to hold bit-identical models after every epoch. See
:mod:`pycompress.train.distributed`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import zlib
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as D
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything
from .metrics import Average, plot_curves, topk_correct, write_metrics
from .schedules import build_scheduler

OPTIMIZERS = ("sgd", "adam", "adamw")
_OPT_KEYS = {
    "sgd": {"name", "lr", "momentum", "nesterov", "weight_decay", "no_bias_decay", "dampening"},
    "adam": {"name", "lr", "betas", "eps", "weight_decay", "no_bias_decay", "amsgrad"},
    "adamw": {"name", "lr", "betas", "eps", "weight_decay", "no_bias_decay", "amsgrad"},
}
OPTIMIZER_DEFAULTS = {
    "sgd": {"momentum": 0.9, "weight_decay": 1e-4},
    "adam": {"weight_decay": 0.0},
    "adamw": {"weight_decay": 1e-2},
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _num(name: str, value: Any, *, low: float = 0.0, low_ok: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"optimizer: {name!r} must be a finite number, got {value!r}")
    if value < low or (value == low and not low_ok):
        raise ValueError(f"optimizer: {name!r} must be {'>=' if low_ok else '>'} {low}, got {value!r}")
    return float(value)


def param_groups(model: nn.Module, weight_decay: float, no_bias_decay: bool = True) -> List[Dict]:
    """Parameter groups for an optimizer. With ``no_bias_decay`` every parameter with fewer than
    two dimensions (biases, BatchNorm weights and biases, learned quantizer scales) goes to a
    group with ``weight_decay=0``; conv and linear weights keep ``weight_decay``. Frozen parameters
    (requires_grad False) are left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_bias_decay and p.dim() < 2 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("optimizer: the model has no trainable parameters")
    return groups


def validate_optimizer_spec(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """Check an optimizer spec and return it with defaults filled in. Keys: ``name`` (sgd, adam,
    adamw), ``lr`` (required), ``weight_decay``, ``no_bias_decay`` (default True); sgd:
    ``momentum`` (0.9), ``nesterov``, ``dampening``; adam/adamw: ``betas``, ``eps``, ``amsgrad``."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"optimizer: expected a mapping, got {type(spec).__name__}")
    name = spec.get("name")
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(f"optimizer: 'name' must be one of {OPTIMIZERS}, got {name!r}")
    name = name.lower()
    unknown = sorted(set(spec) - _OPT_KEYS[name])
    if unknown:
        raise ValueError(f"optimizer: unknown key {unknown[0]!r} for {name} (allowed: {sorted(_OPT_KEYS[name])})")
    if "lr" not in spec:
        raise ValueError("optimizer: missing required key 'lr'")
    out = {"name": name, "no_bias_decay": True, **OPTIMIZER_DEFAULTS[name], **dict(spec)}
    out["name"] = name
    out["lr"] = _num("lr", out["lr"], low=0.0, low_ok=False)
    out["weight_decay"] = _num("weight_decay", out["weight_decay"])
    for key in ("no_bias_decay", "nesterov", "amsgrad"):
        if key in out and not isinstance(out[key], bool):
            raise ValueError(f"optimizer: {key!r} must be true or false, got {out[key]!r}")
    if "momentum" in out:
        out["momentum"] = _num("momentum", out["momentum"])
    if "dampening" in out:
        out["dampening"] = _num("dampening", out["dampening"])
    if out.get("nesterov") and (out.get("momentum", 0) <= 0 or out.get("dampening", 0) != 0):
        raise ValueError("optimizer: 'nesterov' needs momentum > 0 and dampening 0")
    if "eps" in out:
        out["eps"] = _num("eps", out["eps"], low=0.0, low_ok=False)
    if "betas" in out:
        b = out["betas"]
        if (
            not isinstance(b, (list, tuple))
            or len(b) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in b)
        ):
            raise ValueError(f"optimizer: 'betas' must be two numbers in [0, 1), got {b!r}")
        out["betas"] = [float(v) for v in b]  # a list, so the resolved recipe dumps as YAML
    return out


def build_optimizer(model: nn.Module, spec: Mapping[str, Any]) -> torch.optim.Optimizer:
    """An SGD / Adam / AdamW optimizer from a spec (see :func:`validate_optimizer_spec`)."""
    s = validate_optimizer_spec(spec)
    groups = param_groups(model, s["weight_decay"], s["no_bias_decay"])
    kw = {k: v for k, v in s.items() if k not in ("name", "no_bias_decay", "weight_decay")}
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[s["name"]]
    return cls(groups, **kw)


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _split_batch(batch):
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError("each batch must be an (inputs, targets) pair")


def _progress(iterable, total, desc, enabled):
    if enabled is False:
        return iterable
    try:
        # Plain tqdm, not tqdm.auto: its asyncio variant calls iter() on the loader in __init__,
        # which draws from the loader's generator and changes the data order with the bar on.
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    # enabled None: a bar only when stderr is a terminal (no bar spam in CI logs).
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=None if enabled is None else False,
        file=sys.stderr,
    )


def epoch_seed(seed: int, name: str, epoch: int) -> int:
    """The seed of epoch ``epoch`` (0-based) of a loop named ``name`` with base seed ``seed``: the
    :class:`Trainer` re-seeds every RNG and its train loader's generator from it at the start of
    each epoch (a recipe stage's Trainer: the recipe's seed and the stage's name)."""
    return (int(seed) * 1_000_003 + zlib.crc32(str(name).encode()) * 7_919 + int(epoch)) % (2**63)


def calibration_seed(seed: int, stage_index: int) -> int:
    """The seed a recipe run gives the batches a stage draws outside training (calibration,
    post-training quantization, BatchNorm recalibration): the recipe's ``seed`` and the stage's
    position in the recipe's ``stages`` (0-based, every kind counted)."""
    return int(seed) * 7 + int(stage_index)


def seed_loader(loader: Any, seed: int) -> None:
    """Seed ``loader``'s shuffling ``torch.Generator`` (``DataLoader(generator=...)``), when it has
    one, and python, numpy and torch (:func:`seed_everything`) from ``seed``: the next pass over
    ``loader`` then draws the same batches as any other pass seeded the same way."""
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(int(seed) % (2**63))
    seed_everything(seed)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: Any = "cpu",
    *,
    amp: bool = False,
    max_batches: Optional[int] = None,
    progress: Optional[bool] = False,
    desc: str = "eval",
    predictions: bool = False,
    distributed: bool = False,
) -> Dict[str, Any]:
    """Cross-entropy loss, top-1 and top-5 accuracy (percent) of ``model`` in eval mode. The
    model's train/eval mode is restored afterwards. ``predictions=True`` adds "predictions", the
    top-1 class of every sample in loader order (int64 tensor on the CPU), to compare two models.

    ``distributed=True`` (inside a process group): ``loader`` is this process's shard (e.g. a
    :func:`pycompress.train.distributed.shard_loader`) and the sums are all-reduced, so every
    process returns the metrics of all shards together; "samples" counts them all."""
    if distributed and predictions:
        raise ValueError("evaluate: predictions=True is not supported with distributed=True")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss, n = 0.0, 0
    c1 = c5 = 0
    preds: List[torch.Tensor] = []
    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    try:
        for i, batch in enumerate(_progress(loader, total, desc, progress)):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _split_batch(batch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            a1, a5 = topk_correct(logits, y, (1, 5))
            c1 += a1
            c5 += a5
            n += y.numel()
            if predictions:
                preds.append(logits.argmax(dim=1).cpu())
    finally:
        model.train(was_training)
    if distributed:
        loss, c1, c5, n = D.all_reduce_sum([loss, c1, c5, n], device)
        c1, c5, n = int(c1), int(c5), int(n)
    if n == 0:
        raise ValueError("evaluate: the loader produced no samples")
    out: Dict[str, Any] = {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "samples": n}
    if predictions:
        out["predictions"] = torch.cat(preds)
    return out


class Hook:
    """Optional callbacks a stage can attach to the loop (pruning masks, regularizers, ...). Every
    method is optional; ``state_dict``/``load_state_dict`` are saved in the checkpoint."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def extra_loss(self, trainer: "Trainer") -> Optional[torch.Tensor]: ...
    def before_step(self, trainer: "Trainer") -> None: ...  # after backward, before optimizer.step
    def after_step(self, trainer: "Trainer") -> None: ...
    def on_epoch_end(self, trainer: "Trainer", row: Dict[str, Any]) -> None: ...
    def before_load(self, trainer: "Trainer", checkpoint: Dict[str, Any]) -> None: ...  # e.g. add mask buffers


class Trainer:
    """Train ``model`` for ``epochs`` epochs.

    Args:
        model: the network (moved to ``device``).
        train_loader / eval_loader: yield ``(inputs, targets)``; eval may be None.
        epochs: number of epochs (>= 1).
        optimizer: a spec dict for :func:`build_optimizer` (built after the model is on
            ``device``) or a ready optimizer.
        schedule: a spec dict for :func:`pycompress.train.build_scheduler` (``epochs`` defaults to
            this run's epochs for cosine schedules) or None for a constant LR.
        distiller: a :class:`pycompress.distill.Distiller`; when given the loss is its KD loss
            (teacher outputs computed under no_grad in eval mode), else cross-entropy.
        amp: autocast (fp16 + GradScaler on CUDA, bf16 on CPU).
        seed: base seed; see the module docstring for the per-epoch seeding.
        out_dir: where checkpoints, logs and curves go (None: nothing is written, no resume).
        log_format: "csv" or "jsonl".
        progress: True / False, or None for a bar only on a terminal.
        max_steps_per_epoch: cap on iterations per epoch (smoke tests, quick recipes).
        grad_clip: max global grad norm, or None.
        hooks: :class:`Hook` objects.
        checkpoint_extra: callable returning extra entries for every checkpoint (e.g. how to
            rebuild the model).
        name: stage name (seeding, progress bar, messages).
        log: a callable taking one line of text per epoch (default: print to stdout; nothing on
            processes other than 0 of a DDP run).
        eval_modules: modules kept in eval mode while the rest trains (frozen layers: their BatchNorm
            statistics and dropout stay fixed; see :func:`freeze_except`).
        distributed: DDP options for runs under torchrun: ``find_unused_parameters`` (False),
            ``sync_bn`` (False; SyncBatchNorm on CUDA, ignored with a note on CPUs, where torch
            has none). Without a process group of more than one process they change nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        eval_loader: Optional[Iterable] = None,
        *,
        epochs: int,
        optimizer: Any,
        schedule: Optional[Mapping[str, Any]] = None,
        device: Any = "cpu",
        distiller: Optional[nn.Module] = None,
        amp: bool = False,
        compile: Optional[Mapping[str, Any]] = None,
        seed: int = 0,
        out_dir: Optional[str] = None,
        log_format: str = "csv",
        progress: Optional[bool] = None,
        max_steps_per_epoch: Optional[int] = None,
        grad_clip: Optional[float] = None,
        hooks: Sequence[Hook] = (),
        checkpoint_extra: Optional[Callable[[], Dict[str, Any]]] = None,
        name: str = "train",
        log: Optional[Callable[[str], None]] = None,
        distributed: Optional[Mapping[str, Any]] = None,
        eval_modules: Sequence[nn.Module] = (),
    ) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"Trainer: epochs must be an integer >= 1, got {epochs!r}")
        if max_steps_per_epoch is not None and (
            isinstance(max_steps_per_epoch, bool) or not isinstance(max_steps_per_epoch, int) or max_steps_per_epoch < 1
        ):
            raise ValueError(f"Trainer: max_steps_per_epoch must be an integer >= 1, got {max_steps_per_epoch!r}")
        if log_format not in ("csv", "jsonl"):
            raise ValueError(f"Trainer: log_format must be 'csv' or 'jsonl', got {log_format!r}")
        self.device = torch.device(device)
        self.world_size, self.rank = D.world_size(), D.rank()
        opts = dict(distributed or {})
        unknown = sorted(set(opts) - {"find_unused_parameters", "sync_bn"})
        if unknown:
            raise ValueError(f"Trainer: unknown distributed option {unknown[0]!r} (find_unused_parameters, sync_bn)")
        self.find_unused_parameters = bool(opts.get("find_unused_parameters", False))
        self._ddp: Optional[nn.Module] = None
        if self.world_size > 1:
            train_loader = D.shard_loader(train_loader)
            if eval_loader is not None and not D.is_sharded(eval_loader):
                eval_loader = D.shard_loader(eval_loader, shuffle=False)
            if not D.is_main():
                log, progress = (lambda line: None), False
        self.model = model.to(self.device)
        self.distiller = distiller.to(self.device) if distiller is not None else None
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.epochs = epochs
        self.amp = bool(amp)
        # torch.compile of the student's training forward (and so its backward): None = eager, else
        # torch.compile's keyword arguments (mode, fullgraph, dynamic). Evaluation stays eager.
        self.compile = None if compile is None else dict(compile)
        self._compiled: Optional[nn.Module] = None
        self.compile_seconds: Optional[float] = None  # the first compiled step, compilation included
        self.graph_breaks: Optional[int] = None  # graph breaks dynamo reported while compiling
        self.seed = int(seed)
        self.out_dir = os.fspath(out_dir) if out_dir is not None else None
        self.log_format = log_format
        self.progress = progress
        self.grad_clip = grad_clip
        self.hooks = list(hooks)
        self.eval_modules = list(eval_modules)
        self.checkpoint_extra = checkpoint_extra
        self.name = name
        self.log = log or (lambda line: print(line, flush=True))
        self.sync_bn = bool(opts.get("sync_bn", False)) and self.world_size > 1
        if self.sync_bn:
            if self.device.type == "cuda":
                # the same Parameter and buffer objects: optimizers and hooks built before keep working
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:
                self.sync_bn = False
                self.log(f"[{name}] sync_bn ignored: torch's SyncBatchNorm runs on CUDA only (gloo on CPUs)")
        n = len(train_loader)
        if n == 0:
            raise ValueError(f"stage {name!r}: the training loader is empty")
        self.steps_per_epoch = min(n, max_steps_per_epoch) if max_steps_per_epoch else n
        self.optimizer = (
            optimizer if isinstance(optimizer, torch.optim.Optimizer) else build_optimizer(self.model, optimizer)
        )
        self.scheduler = build_scheduler(
            self.optimizer, schedule or {"name": "constant"}, self.steps_per_epoch, default_epochs=epochs
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.device.type == "cuda")
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.elapsed = 0.0  # epoch seconds over all sessions (resume adds up)
        self.session_elapsed = 0.0  # epoch seconds of this process only
        self._kill_at = _debug_kill_step(name)
        self.replicas: Optional[Dict[str, Any]] = None  # the last check_replicas result (DDP runs)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        state = {
            "stage": self.name,
            "epoch": self.epoch,
            "epochs": self.epochs,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": list(self.history),
            "best_metric": self.best_metric,  # eval top-1 of best_epoch (nan without eval data)
            "best_epoch": self.best_epoch,
            "elapsed": self.elapsed,
            "seed": self.seed,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world_size,
            "rng": rng_state(),
            "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in self.hooks],
            "complete": self.epoch >= self.epochs,
        }
        if self.checkpoint_extra is not None:
            state.update(self.checkpoint_extra())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("stage") != self.name:
            raise ValueError(f"checkpoint is for stage {state.get('stage')!r}, not {self.name!r}")
        if state.get("epochs") != self.epochs:
            raise ValueError(
                f"stage {self.name!r}: the checkpoint was written for "
                f"{state.get('epochs')} epochs, this run has {self.epochs}; resume with "
                "the same settings"
            )
        if int(state.get("world_size", 1)) != self.world_size:
            raise ValueError(
                f"stage {self.name!r}: the checkpoint was written by a run of {state.get('world_size', 1)} "
                f"process(es), this run has {self.world_size}; the global batch would change. Resume with "
                f"the same number of processes (torchrun --nproc_per_node)"
            )
        for key, now in (("seed", self.seed), ("steps_per_epoch", self.steps_per_epoch)):
            if key in state and state[key] != now:
                raise ValueError(
                    f"stage {self.name!r}: the checkpoint was written with {key} "
                    f"{state[key]}, this run has {now} (a different seed, batch size "
                    "or dataset); resume with the same settings"
                )
        for h in self.hooks:
            if hasattr(h, "before_load"):
                h.before_load(self, state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.elapsed = float(state.get("elapsed", 0.0))
        for h, hs in zip(self.hooks, state.get("hooks") or []):
            if hs is not None and hasattr(h, "load_state_dict"):
                h.load_state_dict(hs)

    def _path(self, name: str) -> Optional[str]:
        return os.path.join(self.out_dir, name) if self.out_dir else None

    def try_resume(self) -> bool:
        """Load ``checkpoint.pt`` from ``out_dir`` if there is one. Returns whether it did."""
        path = self._path("checkpoint.pt")
        if path is None or not os.path.exists(path):
            return False
        self.load_state_dict(load_checkpoint(path, map_location=self.device))
        self.log(f"[{self.name}] resumed from {path} after epoch {self.epoch}/{self.epochs}")
        return True

    # ----------------------------------------------------------------------------- loop
    def _seed_epoch(self, epoch: int) -> None:
        s = epoch_seed(self.seed, self.name, epoch)
        # Process r of a DDP run draws its own augmentation and dropout (process 0 as one process
        # would); the loader's generator, the epoch's data permutation, is the same on all.
        seed_everything((s + self.rank * 104_729) % (2**63))
        gen = getattr(self.train_loader, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(s)

    def _loss(self, x: torch.Tensor, y: torch.Tensor):
        with _autocast(self.device, self.amp):
            if self.distiller is not None:
                t = self.distiller.teacher_outputs(x)
                out = self._student()(x)
                loss = self.distiller.loss(out.float(), t.float(), y)
            else:
                out = self._student()(x)
                loss = F.cross_entropy(out.float(), y)
        for h in self.hooks:
            extra = h.extra_loss(self) if hasattr(h, "extra_loss") else None
            if extra is not None:
                loss = loss + extra
        return loss, out

    def _student(self) -> nn.Module:
        """The module the training step calls: the model, its DistributedDataParallel wrapper under
        torchrun, or their torch.compile wrapper (same parameters and state)."""
        net = self.model
        if self.world_size > 1:
            if self._ddp is None:
                from torch.nn.parallel import DistributedDataParallel as DDP

                # broadcast_buffers off: pruning adds and replaces mask / shadow buffers mid-stage,
                # which DDP would keep broadcasting stale; BN statistics are synced every epoch.
                self._ddp = DDP(
                    self.model,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    find_unused_parameters=self.find_unused_parameters,
                    **_no_buffer_broadcast(),
                )
            net = self._ddp
        if self.compile is None:
            return net
        if self._compiled is None:
            self._compiled = torch.compile(net, **self.compile)
        return self._compiled

    def train_epoch(self) -> Dict[str, float]:
        self.model.train()
        for m in self.eval_modules:
            m.eval()
        if self.distiller is not None:
            self.distiller.train()  # keeps the teacher in eval mode
        loss_avg = Average()
        c1 = c5 = n = 0
        it = _progress(
            self.train_loader, self.steps_per_epoch, f"{self.name} {self.epoch + 1}/{self.epochs}", self.progress
        )
        for i, batch in enumerate(it):
            if i >= self.steps_per_epoch:
                break
            x, y = _split_batch(batch)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            first_compiled = self.compile is not None and self.graph_breaks is None
            if first_compiled:
                breaks0, t_compile = _graph_break_count(), time.perf_counter()
            loss, out = self._loss(x, y)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                last = self._path("checkpoint.pt")
                keep = (
                    f"; the last good checkpoint is {last}"
                    if last and os.path.exists(last)
                    else "; no checkpoint of this stage was written yet"
                )
                raise TrainingDiverged(
                    f"stage {self.name!r}: loss is {lv} at epoch {self.epoch + 1}, iteration {i + 1} "
                    f"(lr {self.optimizer.param_groups[0]['lr']:.3g}){keep}. Lower the learning rate "
                    "or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            for h in self.hooks:
                if hasattr(h, "before_step"):
                    h.before_step(self)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if first_compiled:
                self.compile_seconds = time.perf_counter() - t_compile
                self.graph_breaks = _graph_break_count() - breaks0
                self.log(
                    f"[{self.name}] torch.compile: first step {self.compile_seconds:.1f} s (compilation included), "
                    f"{self.graph_breaks} graph break{'' if self.graph_breaks == 1 else 's'}"
                )
            for h in self.hooks:
                if hasattr(h, "after_step"):
                    h.after_step(self)
            self.global_step += 1
            bs = y.numel()
            loss_avg.add(lv, bs)
            a1, a5 = topk_correct(out.detach().float(), y, (1, 5))
            c1, c5, n = c1 + a1, c5 + a5, n + bs
            if hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{loss_avg.mean:.4f}", top1=f"{100.0 * c1 / n:.2f}", refresh=False)
            if self._kill_at is not None and self.global_step == self._kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: simulate a crash mid-stage
        if self.world_size > 1:  # the epoch's metrics over every process's samples
            total, c1, c5, n = D.all_reduce_sum([loss_avg.total, c1, c5, n], self.device)
            loss_avg.total, loss_avg.count = total, int(n)
        return {"train_loss": loss_avg.mean, "train_top1": 100.0 * c1 / max(n, 1), "train_top5": 100.0 * c5 / max(n, 1)}

    def fit(self, resume: bool = False) -> Dict[str, Any]:
        """Run the remaining epochs. With ``resume`` a ``checkpoint.pt`` in ``out_dir`` is loaded
        first. Returns a summary: best/final eval metrics, epochs, elapsed seconds."""
        if resume:
            self.try_resume()
        for h in self.hooks:
            if hasattr(h, "on_fit_start"):
                h.on_fit_start(self)
        while self.epoch < self.epochs:
            self._seed_epoch(self.epoch)
            lr = self.optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            row: Dict[str, Any] = {"epoch": self.epoch + 1, "lr": lr}
            row.update(self.train_epoch())
            train_time = time.perf_counter() - t0
            if self.world_size > 1:
                D.broadcast_bn_buffers(self.model)  # each process updated them from its own data
            if self.eval_loader is not None:
                ev = evaluate(self.model, self.eval_loader, self.device, amp=self.amp, distributed=self.world_size > 1)
                row.update({"eval_loss": ev["loss"], "eval_top1": ev["top1"], "eval_top5": ev["top5"]})
                row["eval_samples"] = ev["samples"]
            row["time_s"] = time.perf_counter() - t0
            row["train_time_s"] = train_time
            self.elapsed += row["time_s"]
            self.session_elapsed += row["time_s"]
            for h in self.hooks:
                if hasattr(h, "on_epoch_end"):
                    h.on_epoch_end(self, row)
            self.history.append(row)
            self.epoch += 1
            if "eval_top1" in row:
                metric = row["eval_top1"]
                improved = metric > self.best_metric or self.best_epoch < 0
            else:  # no held-out data: train accuracy is no basis for model selection
                metric, improved = math.nan, True
            if improved:
                self.best_metric, self.best_epoch = metric, self.epoch
            if self.world_size > 1:
                self.replicas = D.check_replicas(self.model, f"stage {self.name!r} after epoch {self.epoch}")
            self._save(improved)
            self.log(self._line(row, improved))
        return self.summary()

    def _line(self, row: Dict[str, Any], improved: bool) -> str:
        parts = [
            f"[{self.name}] epoch {row['epoch']}/{self.epochs}",
            f"lr {row['lr']:.3g}",
            f"train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f}",
        ]
        if "eval_top1" in row:
            parts.append(
                f"eval loss {row['eval_loss']:.4f} top1 {row['eval_top1']:.2f} "
                f"top5 {row['eval_top5']:.2f}" + (" *" if improved else "")
            )
        parts.append(f"{row['time_s']:.1f}s")
        return " | ".join(parts)

    def _save(self, improved: bool) -> None:
        if not self.out_dir:
            return
        if not D.is_main():  # process 0 alone writes; the others wait until the files are complete
            D.barrier()
            return
        try:
            self._write(improved)
        finally:
            D.barrier()

    def _write(self, improved: bool) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        state = self.state_dict()
        save_checkpoint(self._path("checkpoint.pt"), state)
        if improved:
            save_checkpoint(self._path("best.pt"), state)
        ext = "csv" if self.log_format == "csv" else "jsonl"
        write_metrics(self._path(f"metrics.{ext}"), self.history, self.log_format)
        plot_curves(self._path("curves.png"), self.history, title=self.name)

    def summary(self) -> Dict[str, Any]:
        last = self.history[-1] if self.history else {}
        best = self.history[self.best_epoch - 1] if self.best_epoch >= 1 and self.history else {}
        return {
            "stage": self.name,
            "epochs": self.epoch,
            "steps": self.global_step,
            "best_epoch": self.best_epoch,
            "best_top1": best.get("eval_top1"),
            "best_top5": best.get("eval_top5"),
            "final_top1": last.get("eval_top1"),
            "final_train_top1": last.get("train_top1"),
            "train_seconds": self.elapsed,
            **({"distributed": dict(self.replicas or {}, sync_bn=self.sync_bn)} if self.world_size > 1 else {}),
            **(
                {"compile_seconds": self.compile_seconds, "graph_breaks": self.graph_breaks}
                if self.compile is not None
                else {}
            ),
        }


def freeze_except(model: nn.Module, patterns: Sequence[str]) -> Dict[str, Any]:
    """Train only the modules whose qualified name matches one of ``patterns`` (``re.search``; a
    match covers the module's whole subtree, its quantizers and masks included): every other
    parameter gets ``requires_grad=False``. Returns ``trainable`` (the matched module names),
    ``frozen`` (the frozen parameter names), ``trainable_params`` (their element count) and
    ``eval_modules``: every module outside the matched subtrees that does not contain one, to be
    kept in eval mode (BatchNorm statistics and dropout fixed; ``Trainer(eval_modules=...)``).
    Raises ValueError, listing the model's layers, when nothing matches or nothing would train."""
    import re

    regs = [re.compile(p) for p in patterns]
    names = [n for n, _ in model.named_modules() if n]
    matched = [n for n in names if any(r.search(n) for r in regs)]
    # a match inside another match adds nothing
    matched = [n for n in matched if not any(n.startswith(o + ".") for o in matched if o != n)]
    if not matched:
        tops = [n for n in names if "." not in n]
        raise ValueError(f"train_only {list(patterns)}: no module of the model matches; its top-level modules: {tops}")
    inside, ancestors = set(), {id(model)}
    for n in matched:
        sub = model.get_submodule(n)
        inside.update(id(m) for m in sub.modules())
        parts = n.split(".")
        for i in range(1, len(parts)):
            ancestors.add(id(model.get_submodule(".".join(parts[:i]))))
    keep = {id(p) for n in matched for p in model.get_submodule(n).parameters()}
    frozen, trainable = [], 0
    for name, p in model.named_parameters():
        if id(p) in keep:
            trainable += p.numel() if p.requires_grad else 0
        else:
            p.requires_grad_(False)
            frozen.append(name)
    if trainable == 0:
        raise ValueError(f"train_only {list(patterns)}: the matched modules {matched} have no trainable parameter")
    eval_modules = [m for m in model.modules() if id(m) not in inside and id(m) not in ancestors]
    return {"trainable": matched, "frozen": frozen, "trainable_params": trainable, "eval_modules": eval_modules}


def _no_buffer_broadcast() -> Dict[str, bool]:
    """DDP's keyword that turns off the buffer broadcast before every forward: forward_sync_buffers
    in newer torch (broadcast_buffers is deprecated there), broadcast_buffers before."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _graph_break_count() -> int:
    """Graph breaks dynamo has counted in this process (torch._dynamo's counters: torch has no
    public counter of them)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def _debug_kill_step(stage: str) -> Optional[int]:
    """``PYCOMPRESS_DEBUG_KILL_AT=STAGE:STEP`` makes the process SIGKILL itself right after global
    step STEP of stage STAGE: the crash the resume tests simulate."""
    spec = os.environ.get("PYCOMPRESS_DEBUG_KILL_AT")
    if not spec or ":" not in spec:
        return None
    name, _, step = spec.rpartition(":")
    return int(step) if name == stage and step.isdigit() else None
