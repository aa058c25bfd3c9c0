"""Tests for the training core (pycompress.train.trainer / checkpoint / metrics): optimizer groups
and spec validation, top-k and evaluate, the Trainer loop (schedule per iteration, logs, curves,
best.pt, checkpoint contents), in-process exact resume, NaN handling, atomic checkpoints, CPU AMP
and hooks. Everything runs on tiny models and data on the CPU."""

import copy
import csv
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pycompress.train import (
    CheckpointError,
    Hook,
    Trainer,
    TrainingDiverged,
    build_optimizer,
    evaluate,
    load_checkpoint,
    param_groups,
    save_checkpoint,
    topk_correct,
    validate_optimizer_spec,
)
from pycompress.train import checkpoint as ckpt_mod
from pycompress.train import trainer as trainer_mod
from pycompress.train.schedules import WarmupCosine
from pycompress.train.trainer import _debug_kill_step

IN, CLS = 8, 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIME_KEYS = ("time_s", "train_time_s")
ROW_KEYS = {"epoch", "lr", "train_loss", "train_top1", "train_top5", "time_s", "train_time_s"}
EVAL_KEYS = {"eval_loss", "eval_top1", "eval_top5", "eval_samples"}


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: intra-op threads only add contention on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, CLS))


def make_data(n, seed):
    """An easy, balanced 4-class problem: class c has mean 3 * e_c."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLS
    centers = torch.zeros(CLS, IN)
    centers[torch.arange(CLS), torch.arange(CLS)] = 3.0
    return centers[y] + 0.5 * torch.randn(n, IN, generator=g), y


def make_loaders(n=32, batch=8, eval_n=16, gen_seed=0):
    x, y = make_data(n, 0)
    xe, ye = make_data(eval_n, 1)
    train = DataLoader(
        TensorDataset(x, y), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(gen_seed)
    )
    ev = DataLoader(TensorDataset(xe, ye), batch_size=8) if eval_n else None
    return train, ev


SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


def make_trainer(model=None, out_dir=None, *, epochs=2, optimizer=SGD, n=32, batch=8, eval_n=16, gen_seed=0, **kw):
    train, ev = make_loaders(n, batch, eval_n, gen_seed)
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda line: None)
    return Trainer(
        model if model is not None else make_model(),
        train,
        ev,
        epochs=epochs,
        optimizer=dict(optimizer) if isinstance(optimizer, dict) else optimizer,
        out_dir=None if out_dir is None else str(out_dir),
        **kw,
    )


@pytest.fixture
def no_plots(monkeypatch):
    """Skip curves.png (matplotlib is the slowest part of a tiny epoch) where a test does not
    look at it."""
    monkeypatch.setattr(trainer_mod, "plot_curves", lambda *a, **k: False)


def no_time(rows):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def tmp_files(d):
    return [f for f in os.listdir(d) if f.startswith(".tmp-")]


def conv_bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def ids(params):
    return {id(p) for p in params}


class Interrupt(Exception):
    pass


class Counter(Hook):
    """Counts optimizer steps; its count goes through the checkpoint."""

    def __init__(self):
        self.n = 0
        self.loaded = None
        self.fit_starts = 0

    def on_fit_start(self, trainer):
        self.fit_starts += 1

    def after_step(self, trainer):
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.n = state["n"]


class Bomb(Hook):
    """Raises Interrupt at the first step of (0-based) epoch ``at``; None: never."""

    def __init__(self, at=None):
        self.at = at

    def extra_loss(self, trainer):
        if self.at is not None and trainer.epoch == self.at:
            raise Interrupt
        return None


class Sabotage(Hook):
    """From (0-based) epoch ``start`` on, the model predicts class 0 for everything (train and
    eval): a later epoch that is worse than an earlier one."""

    def __init__(self, start=1):
        self.start = start

    def on_fit_start(self, trainer):
        bias = torch.tensor([10.0] + [0.0] * (CLS - 1))

        def fwd(module, inp, out):
            if trainer.epoch >= self.start:
                return out * 0 + bias
            return out

        trainer.model.register_forward_hook(fwd)


# ------------------------------------------------------------------ 1. param groups, optimizers
def test_param_groups_no_bias_decay_splits_by_dimension():
    m = conv_bn_model()
    groups = param_groups(m, 0.5, no_bias_decay=True)
    assert len(groups) == 2
    decay = next(g for g in groups if g["weight_decay"] == 0.5)
    nodecay = next(g for g in groups if g["weight_decay"] == 0.0)
    assert ids(decay["params"]) == ids([m[0].weight, m[4].weight])
    assert ids(nodecay["params"]) == ids([m[0].bias, m[1].weight, m[1].bias, m[4].bias])
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in nodecay["params"])


def test_param_groups_other_1d_params_go_to_no_decay():
    m = nn.Sequential(nn.Linear(3, 3))
    m.scale = nn.Parameter(torch.ones(()))  # 0-d, e.g. a learned quantizer scale
    m.vec = nn.Parameter(torch.ones(5))
    groups = param_groups(m, 0.1)
    nodecay = next(g for g in groups if g["weight_decay"] == 0.0)
    assert ids(nodecay["params"]) == ids([m[0].bias, m.scale, m.vec])


def test_param_groups_without_no_bias_decay_everything_decays():
    m = conv_bn_model()
    groups = param_groups(m, 0.5, no_bias_decay=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.5
    assert ids(groups[0]["params"]) == ids(m.parameters())


def test_param_groups_exclude_frozen_and_need_trainable():
    m = conv_bn_model()
    m[0].weight.requires_grad_(False)
    m[1].bias.requires_grad_(False)
    groups = param_groups(m, 0.1)
    got = set().union(*(ids(g["params"]) for g in groups))
    assert id(m[0].weight) not in got and id(m[1].bias) not in got
    assert got == ids(p for p in m.parameters() if p.requires_grad)
    # only 1-D params trainable: a single no-decay group
    m2 = conv_bn_model()
    for p in m2.parameters():
        p.requires_grad_(p.dim() < 2)
    groups = param_groups(m2, 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    for p in m2.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(m2, 0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(m2, {"name": "sgd", "lr": 0.1})


def test_build_optimizer_sgd():
    m = conv_bn_model()
    opt = build_optimizer(m, {"name": "SGD", "lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 5e-4})
    assert type(opt) is torch.optim.SGD
    assert len(opt.param_groups) == 2
    for g in opt.param_groups:
        assert g["lr"] == 0.05 and g["momentum"] == 0.8 and g["nesterov"] is True
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 5e-4]
    # defaults: momentum 0.9, weight decay 1e-4
    opt = build_optimizer(m, {"name": "sgd", "lr": 0.1})
    assert {g["momentum"] for g in opt.param_groups} == {0.9}
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-4]
    assert all(g["nesterov"] is False for g in opt.param_groups)
    # no_bias_decay False: one group
    opt = build_optimizer(m, {"name": "sgd", "lr": 0.1, "no_bias_decay": False})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4


def test_build_optimizer_adam_and_adamw():
    m = conv_bn_model()
    opt = build_optimizer(m, {"name": "adam", "lr": 1e-3, "betas": [0.8, 0.95], "eps": 1e-6, "amsgrad": True})
    assert type(opt) is torch.optim.Adam
    for g in opt.param_groups:
        assert g["lr"] == 1e-3 and tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-6
        assert g["amsgrad"] is True and g["weight_decay"] == 0.0  # adam default wd 0
    opt = build_optimizer(m, {"name": "AdamW", "lr": 2e-3})
    assert type(opt) is torch.optim.AdamW
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-2]
    assert all(tuple(g["betas"]) == (0.9, 0.999) for g in opt.param_groups)
    opt.zero_grad()
    m(torch.randn(2, 1, 6, 6)).sum().backward()
    opt.step()  # betas are a tuple the optimizer accepts


@pytest.mark.parametrize("no_bias_decay", [True, False])
def test_weight_decay_with_zero_gradient_spares_biases(no_bias_decay):
    m = conv_bn_model()
    lr, wd, steps = 0.1, 0.5, 4
    opt = build_optimizer(
        m, {"name": "sgd", "lr": lr, "momentum": 0.0, "weight_decay": wd, "no_bias_decay": no_bias_decay}
    )
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    x = torch.randn(4, 1, 6, 6)
    for _ in range(steps):
        opt.zero_grad()
        (0 * m(x).sum()).backward()
        opt.step()
    factor = (1 - lr * wd) ** steps
    for k, p in m.named_parameters():
        assert p.grad is not None and not p.grad.any()
        if p.dim() >= 2 or not no_bias_decay:
            torch.testing.assert_close(p.detach(), before[k] * factor)
        else:
            assert torch.equal(p.detach(), before[k]), k
    if no_bias_decay:
        assert torch.equal(m[0].bias, before["0.bias"])
        assert not torch.equal(m[0].weight, before["0.weight"])


# ------------------------------------------------------------------ 2. validate_optimizer_spec
def test_validate_optimizer_spec_fills_defaults():
    s = validate_optimizer_spec({"name": "SGD", "lr": 1})
    assert s == {"name": "sgd", "lr": 1.0, "momentum": 0.9, "weight_decay": 1e-4, "no_bias_decay": True}
    assert isinstance(s["lr"], float)
    s = validate_optimizer_spec({"name": "adam", "lr": 0.01, "betas": (0.5, 0.6)})
    assert s["betas"] == [0.5, 0.6] and s["weight_decay"] == 0.0
    # nesterov with the default momentum is fine
    assert validate_optimizer_spec({"name": "sgd", "lr": 0.1, "nesterov": True})["nesterov"]


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "sgd", "lr": 0.1, "lrr": 1}, r"unknown key 'lrr'"),
        ({"name": "adam", "lr": 0.1, "momentum": 0.9}, r"unknown key 'momentum' for adam"),
        ({"name": "sgd", "lr": 0.1, "betas": [0.9, 0.99]}, r"unknown key 'betas' for sgd"),
        ({"name": "sgd"}, r"missing required key 'lr'"),
        ({"name": "adamw", "weight_decay": 0.1}, r"missing required key 'lr'"),
        ({"name": "sgd", "lr": 0}, r"'lr' must be > 0"),
        ({"name": "sgd", "lr": -0.1}, r"'lr' must be > 0"),
        ({"name": "sgd", "lr": float("nan")}, r"'lr' must be a finite number"),
        ({"name": "sgd", "lr": "0.1"}, r"'lr' must be a finite number"),
        ({"name": "sgd", "lr": True}, r"'lr' must be a finite number"),
        ({"name": "rmsprop", "lr": 0.1}, r"'name' must be one of"),
        ({"lr": 0.1}, r"'name' must be one of"),
        ({"name": 3, "lr": 0.1}, r"'name' must be one of"),
        ({"name": "sgd", "lr": 0.1, "nesterov": True, "momentum": 0}, r"'nesterov' needs momentum > 0"),
        ({"name": "sgd", "lr": 0.1, "nesterov": True, "dampening": 0.1}, r"'nesterov' needs"),
        ({"name": "sgd", "lr": 0.1, "nesterov": 1}, r"'nesterov' must be true or false"),
        ({"name": "sgd", "lr": 0.1, "momentum": -0.5}, r"'momentum' must be >= 0"),
        ({"name": "sgd", "lr": 0.1, "weight_decay": -1e-4}, r"'weight_decay' must be >= 0"),
        ({"name": "adam", "lr": 0.1, "betas": [0.9, 1.0]}, r"'betas' must be two numbers in \[0, 1\)"),
        ({"name": "adam", "lr": 0.1, "betas": [-0.1, 0.9]}, r"'betas' must be two numbers"),
        ({"name": "adam", "lr": 0.1, "betas": [0.9]}, r"'betas' must be two numbers"),
        ({"name": "adam", "lr": 0.1, "betas": "ab"}, r"'betas' must be two numbers"),
        ({"name": "adamw", "lr": 0.1, "betas": [True, 0.9]}, r"'betas' must be two numbers"),
        ({"name": "adam", "lr": 0.1, "eps": 0}, r"'eps' must be > 0"),
        ({"name": "adam", "lr": 0.1, "amsgrad": "yes"}, r"'amsgrad' must be true or false"),
    ],
)
def test_validate_optimizer_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        validate_optimizer_spec(spec)


def test_validate_optimizer_spec_rejects_non_mapping():
    with pytest.raises(ValueError, match="expected a mapping"):
        validate_optimizer_spec(["sgd", 0.1])


# ------------------------------------------------------------------ 3. topk_correct, evaluate
def test_topk_correct_hand_computed():
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.2],  # order 1, 2, 3, 0
            [0.9, 0.1, 0.0, 0.05],  # order 0, 1, 3, 2
            [0.2, 0.3, 0.4, 0.1],
        ]
    )  # order 2, 1, 0, 3
    targets = torch.tensor([2, 0, 3])
    # sample 0 hit from k=2, sample 1 from k=1, sample 2 from k=4; k > 4 classes is capped
    assert topk_correct(logits, targets, (1, 2, 3, 4, 5, 10)) == [1, 2, 2, 3, 3, 3]
    assert topk_correct(logits, targets) == [1, 3]
    assert topk_correct(logits, torch.tensor([1, 0, 2]), (1, 5)) == [3, 3]
    # a single class: everything is a hit
    assert topk_correct(torch.randn(5, 1), torch.zeros(5, dtype=torch.long), (1, 5)) == [5, 5]


def test_topk_correct_needs_2d_logits():
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        topk_correct(torch.randn(4), torch.zeros(4, dtype=torch.long))


def _eval_setup():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 7))
    model.train()
    for _ in range(3):  # give BN some running statistics
        model(torch.randn(16, 5) + 1.0)
    x = torch.randn(10, 5)
    y = torch.randint(0, 7, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches of 4, 4, 2
    return model, x, y, loader


def test_evaluate_matches_manual_computation_and_restores_mode():
    model, x, y, loader = _eval_setup()
    model.train()
    res = evaluate(model, loader)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        logits = model(x)
    ref_loss = float(F.cross_entropy(logits, y))
    ref_top1 = 100.0 * float((logits.argmax(1) == y).float().mean())
    ref_top5 = 100.0 * float((logits.topk(5, 1).indices == y[:, None]).any(1).float().mean())
    assert res["samples"] == 10
    assert res["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert res["top1"] == pytest.approx(ref_top1)
    assert res["top5"] == pytest.approx(ref_top5)
    assert 0 < res["top5"] and res["top1"] <= res["top5"]
    # eval mode stays eval mode
    assert not model.training
    assert evaluate(model, loader) == res
    assert not model.training
    # max_batches
    assert evaluate(model, loader, max_batches=1)["samples"] == 4


def test_evaluate_errors_restore_mode():
    model, x, y, _ = _eval_setup()
    model.train()
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, empty)
    assert model.training
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, DataLoader(TensorDataset(x, y), batch_size=4), max_batches=0)
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pair"):
        evaluate(model, [x])
    assert model.training


# ------------------------------------------------------------------ 4. Trainer
def test_trainer_argument_validation():
    train, _ = make_loaders()
    m = make_model()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="epochs must be an integer"):
            Trainer(m, train, epochs=bad, optimizer=SGD)
    with pytest.raises(ValueError, match="max_steps_per_epoch"):
        Trainer(m, train, epochs=1, optimizer=SGD, max_steps_per_epoch=0)
    with pytest.raises(ValueError, match="log_format"):
        Trainer(m, train, epochs=1, optimizer=SGD, log_format="xml")
    empty = DataLoader(TensorDataset(torch.zeros(0, IN), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="training loader is empty"):
        Trainer(m, empty, epochs=1, optimizer=SGD)


def test_one_epoch_reduces_the_loss_registry_model_and_synthetic_data():
    from pycompress.data import make_loaders as data_loaders
    from pycompress.models import build

    train, test, _ = data_loaders("synthetic", batch_size=8, length=32, image_size=8, in_channels=1, num_classes=4)
    model = build("lenet300", in_channels=1, num_classes=4, input_size=8)
    before = evaluate(model, train)["loss"]
    t = Trainer(
        model,
        train,
        test,
        epochs=1,
        progress=False,
        log=lambda s: None,
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
    )
    summary = t.fit()
    after = evaluate(model, train)["loss"]
    assert after < before
    assert summary["epochs"] == 1 and summary["steps"] == len(train) == 4
    assert math.isfinite(t.history[0]["train_loss"])


def test_max_steps_per_epoch_rejects_bool():
    # (was a bug: True passed the check as an int and failed later in the scheduler)
    train, _ = make_loaders()
    for bad in (True, False, 1.0, "2"):
        with pytest.raises(ValueError, match="max_steps_per_epoch must be an integer"):
            Trainer(make_model(), train, epochs=1, optimizer=SGD, max_steps_per_epoch=bad)


def test_trainer_learns_easy_problem():
    t = make_trainer(epochs=2)
    before = evaluate(t.model, t.eval_loader)
    t.fit()
    after = evaluate(t.model, t.eval_loader)
    assert after["loss"] < before["loss"]
    assert after["top1"] > 90.0
    assert t.history[-1]["eval_top1"] == after["top1"]


def test_max_steps_per_epoch_caps_steps():
    c = Counter()
    t = make_trainer(epochs=2, n=64, max_steps_per_epoch=3, hooks=[c])
    assert len(t.train_loader) == 8 and t.steps_per_epoch == 3
    s = t.fit()
    assert t.global_step == s["steps"] == 6 == c.n
    assert t.scheduler.last_epoch == 6
    # a cap above the loader length changes nothing
    t = make_trainer(epochs=1, n=16, max_steps_per_epoch=100)
    t.fit()
    assert t.global_step == 2


class LRRecorder(Hook):
    """The group LRs seen before each step and, for plain SGD (no momentum, no weight decay), the
    LR the step really used: ``(p_before - p_after) . g / |g|^2`` for every parameter."""

    def __init__(self):
        self.lrs = []
        self.effective = []

    def before_step(self, trainer):
        self.lrs.append([g["lr"] for g in trainer.optimizer.param_groups])
        self._saved = [(p, p.detach().clone(), p.grad.detach().clone()) for p in trainer.model.parameters()]

    def after_step(self, trainer):
        row = []
        for p, before, g in self._saved:
            if g.norm() > 1e-3:  # (the bias of a Linear feeding a BatchNorm has ~0 grad)
                row.append(float(((before - p.detach()) * g).sum() / (g * g).sum()))
        self.effective.append(row)


def test_lr_follows_warmup_cosine_per_iteration():
    rec = LRRecorder()
    lr, base, S, E = 0.1, 0.01, 3, 3
    t = make_trainer(
        epochs=E,
        n=64,
        max_steps_per_epoch=S,
        hooks=[rec],
        optimizer={"name": "sgd", "lr": lr, "momentum": 0.0, "weight_decay": 0.0},
        schedule={"name": "warmup_cosine", "warmup_epochs": 1, "base_lr": base},
    )
    assert isinstance(t.scheduler, WarmupCosine)
    assert t.scheduler.total_iters == E * S  # epochs defaults to the trainer's, capped steps
    t.fit()
    W, T = S, E * S

    def ref(i):
        if i < W:
            return base + (lr - base) * i / W
        return 0.5 * (1 + math.cos(math.pi * (min(i, T) - W) / (T - W))) * lr

    assert len(rec.lrs) == T
    for i, lrs in enumerate(rec.lrs):
        assert len(lrs) == 2  # decay and no-decay groups follow the same schedule
        for v in lrs:
            assert v == pytest.approx(ref(i), rel=1e-12, abs=1e-15), i
    # the optimizer step of iteration i really used ref(i) (scheduler stepped after the optimizer)
    assert len(rec.effective) == T
    for i, row in enumerate(rec.effective):
        assert len(row) >= 3
        assert row == pytest.approx([ref(i)] * len(row), rel=1e-3), i
    for g in t.optimizer.param_groups:
        assert g["lr"] == pytest.approx(ref(T), abs=1e-15)  # the final iteration: 0
    # the logged LR of an epoch is the LR of its first iteration
    assert [r["lr"] for r in t.history] == pytest.approx([ref(e * S) for e in range(E)])


def test_lr_follows_step_schedule_and_final_lr():
    rec = LRRecorder()
    t = make_trainer(
        epochs=3,
        n=16,
        hooks=[rec],
        optimizer={"name": "adam", "lr": 0.08},
        schedule={"name": "step", "step_size": 1, "gamma": 0.5},
    )
    t.fit()
    assert [lrs[0] for lrs in rec.lrs] == pytest.approx([0.08] * 2 + [0.04] * 2 + [0.02] * 2)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_constant_lr_without_schedule():
    rec = LRRecorder()
    t = make_trainer(epochs=1, hooks=[rec])
    t.fit()
    assert {v for lrs in rec.lrs for v in lrs} == {0.1}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_history_logs_and_curves(tmp_path, fmt):
    t = make_trainer(None, tmp_path, epochs=2, log_format=fmt)
    lines = []
    t.log = lines.append
    t.fit()
    assert len(t.history) == 2
    assert [r["epoch"] for r in t.history] == [1, 2]
    for r in t.history:
        assert set(r) == ROW_KEYS | EVAL_KEYS
        assert all(math.isfinite(r[k]) for k in r)
    assert len(lines) == 2 and lines[0].startswith("[train] epoch 1/2")
    other = "jsonl" if fmt == "csv" else "csv"
    assert os.path.exists(tmp_path / f"metrics.{fmt}")
    assert not os.path.exists(tmp_path / f"metrics.{other}")
    if fmt == "csv":
        with open(tmp_path / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 2
        assert set(rows[0]) == ROW_KEYS | EVAL_KEYS
        for got, want in zip(rows, t.history):
            assert int(got["epoch"]) == want["epoch"]
            assert float(got["train_loss"]) == pytest.approx(want["train_loss"])
            assert float(got["eval_top1"]) == pytest.approx(want["eval_top1"])
    else:
        with open(tmp_path / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        assert len(rows) == 2
        assert [set(r) for r in rows] == [ROW_KEYS | EVAL_KEYS] * 2
        assert no_time(rows) == no_time(t.history)  # floats round-trip through JSON
    with open(tmp_path / "curves.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(tmp_path / "curves.png") > 1000
    assert not tmp_files(tmp_path)


def test_history_without_eval_loader(tmp_path):
    t = make_trainer(None, tmp_path, epochs=1, eval_n=0)
    assert t.eval_loader is None
    s = t.fit()
    assert set(t.history[0]) == ROW_KEYS
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and set(rows[0]) == ROW_KEYS
    assert s["best_top1"] is None and s["final_top1"] is None
    assert s["final_train_top1"] == t.history[0]["train_top1"]
    assert os.path.exists(tmp_path / "best.pt") and os.path.exists(tmp_path / "curves.png")


def test_best_checkpoint_tracks_best_eval_top1(tmp_path, no_plots):
    t = make_trainer(None, tmp_path, epochs=3, hooks=[Sabotage(start=1)])
    s = t.fit()
    top1 = [r["eval_top1"] for r in t.history]
    assert top1[0] > 25.0 and top1[1] == top1[2] == 25.0  # later epochs are worse
    assert t.best_epoch == s["best_epoch"] == 1
    assert t.best_metric == s["best_top1"] == top1[0]
    assert s["final_top1"] == 25.0
    best = load_checkpoint(str(tmp_path / "best.pt"))
    last = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert best["epoch"] == 1 and best["complete"] is False
    assert last["epoch"] == 3 and last["complete"] is True
    assert best["best_epoch"] == last["best_epoch"] == 1
    assert best["best_metric"] == last["best_metric"] == top1[0]
    # best.pt holds the epoch-1 model: evaluated without the sabotage it scores epoch 1's top-1
    fresh = make_model(seed=7)
    fresh.load_state_dict(best["model"])
    assert evaluate(fresh, t.eval_loader)["top1"] == top1[0]
    assert not torch.equal(best["model"]["4.weight"], last["model"]["4.weight"])


def test_best_checkpoint_equal_metric_keeps_the_first(tmp_path, no_plots):
    # Sabotage from epoch 0: every epoch scores exactly 25%; ties do not move best.pt
    t = make_trainer(None, tmp_path, epochs=2, hooks=[Sabotage(start=0)])
    t.fit()
    assert [r["eval_top1"] for r in t.history] == [25.0, 25.0]
    assert t.best_epoch == 1
    assert load_checkpoint(str(tmp_path / "best.pt"))["epoch"] == 1


def test_best_checkpoint_without_eval_loader_is_last_epoch(tmp_path, no_plots):
    # (was a bug: best.pt used to follow the best train top-1)
    t = make_trainer(None, tmp_path, epochs=2, n=64, eval_n=0, hooks=[Sabotage(start=1)])
    s = t.fit()
    tr = [r["train_top1"] for r in t.history]
    assert tr[0] > tr[1] == 25.0  # the last epoch is worse on train top-1
    best = load_checkpoint(str(tmp_path / "best.pt"))
    assert best["epoch"] == 2 and t.best_epoch == s["best_epoch"] == 2
    assert math.isnan(best["best_metric"]) and math.isnan(t.best_metric)
    assert s["best_top1"] is None


def test_checkpoint_contents(tmp_path):
    h = Counter()
    t = make_trainer(
        None,
        tmp_path,
        epochs=2,
        hooks=[h, Hook()],
        name="stageA",
        schedule={"name": "warmup_cosine", "warmup_epochs": 1},
        checkpoint_extra=lambda: {"arch": {"name": "tiny"}},
    )
    t.fit()
    c = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "rng",
        "history",
        "best_metric",
        "epoch",
        "complete",
        "epochs",
        "global_step",
        "scaler",
        "best_epoch",
        "stage",
        "seed",
        "hooks",
        "elapsed",
        "format",
        "version",
    ):
        assert key in c, key
    assert c["format"] == ckpt_mod.FORMAT and c["version"] == ckpt_mod.VERSION
    assert c["stage"] == "stageA" and c["epoch"] == 2 and c["epochs"] == 2
    assert c["complete"] is True and c["global_step"] == t.global_step == 8
    assert c["arch"] == {"name": "tiny"}
    assert c["hooks"] == [{"n": 8}, None]
    assert no_time(c["history"]) == no_time(t.history)
    assert c["best_metric"] == t.best_metric and c["best_epoch"] == t.best_epoch
    assert c["scheduler"]["last_epoch"] == 8
    assert set(c["rng"]) >= {"python", "numpy", "torch"}
    sd = t.model.state_dict()
    assert set(c["model"]) == set(sd) and all(torch.equal(c["model"][k], sd[k]) for k in sd)
    assert len(c["optimizer"]["param_groups"]) == 2 and len(c["optimizer"]["state"]) > 0
    assert c["elapsed"] > 0
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "checkpoint.pt", "curves.png", "metrics.csv"]


def test_no_out_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = make_trainer(epochs=1)
    t.fit(resume=True)  # no out_dir: nothing to resume from, nothing written
    assert t.epoch == 1 and os.listdir(tmp_path) == []


# ------------------------------------------------------------------ 5. resume in-process
RESUME = dict(
    epochs=3,
    n=32,
    gen_seed=0,
    seed=5,
    name="res",
    schedule={"name": "warmup_cosine", "warmup_epochs": 1, "base_lr": 0.01},
)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(trainer_mod, "plot_curves", lambda *a, **k: False)
    try:
        yield _resumed(tmp_path_factory)
    finally:
        mp.undo()


def _resumed(tmp_path_factory):
    ref_dir = tmp_path_factory.mktemp("ref")
    out = tmp_path_factory.mktemp("resumed")
    ref_counter = Counter()
    ref = make_trainer(make_model(0, dropout=0.3), ref_dir, hooks=[ref_counter, Bomb()], **RESUME)
    ref.fit()

    first_counter = Counter()
    first = make_trainer(make_model(0, dropout=0.3), out, hooks=[first_counter, Bomb(at=1)], **RESUME)
    with pytest.raises(Interrupt):
        first.fit()
    after_first = load_checkpoint(str(out / "checkpoint.pt"))

    # a new model (different init), a new loader generator in another state, a new optimizer
    counter = Counter()
    lines = []
    kw = dict(RESUME, gen_seed=1234)
    second = make_trainer(make_model(99, dropout=0.3), out, hooks=[counter, Bomb()], log=lines.append, **kw)
    torch.rand(17)  # disturb the global RNG too
    second.fit(resume=True)
    return dict(
        ref=ref,
        ref_counter=ref_counter,
        first_counter=first_counter,
        after_first=after_first,
        second=second,
        counter=counter,
        lines=lines,
        out=out,
        ref_dir=ref_dir,
    )


def test_interrupted_run_left_epoch_1_checkpoint(resumed):
    c = resumed["after_first"]
    assert c["epoch"] == 1 and c["complete"] is False and c["global_step"] == 4
    assert len(c["history"]) == 1


def test_resume_is_bit_exact(resumed):
    ref, second = resumed["ref"], resumed["second"]
    assert any("resumed from" in line and "after epoch 1/3" in line for line in resumed["lines"])
    a, b = ref.model.state_dict(), second.model.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = ref.optimizer.state_dict(), second.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for i in oa["state"]:
        for key, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][key]) if torch.is_tensor(v) else v == ob["state"][i][key]
    assert ref.scheduler.state_dict() == second.scheduler.state_dict()
    assert ref.global_step == second.global_step == 12
    assert no_time(ref.history) == no_time(second.history)
    assert (ref.best_epoch, ref.best_metric) == (second.best_epoch, second.best_metric)
    with open(resumed["out"] / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    fa = load_checkpoint(str(resumed["ref_dir"] / "checkpoint.pt"))
    fb = load_checkpoint(str(resumed["out"] / "checkpoint.pt"))
    assert all(torch.equal(fa["model"][k], fb["model"][k]) for k in fa["model"])


def test_resume_adds_up_elapsed_time(resumed):
    second, first = resumed["second"], resumed["after_first"]
    assert 0 < first["elapsed"] < second.elapsed
    assert 0 < second.session_elapsed < second.elapsed
    assert second.elapsed == pytest.approx(first["elapsed"] + second.session_elapsed)
    assert resumed["ref"].elapsed == pytest.approx(resumed["ref"].session_elapsed)


def test_hook_state_round_trips_through_checkpoint(resumed):
    assert resumed["first_counter"].n == 4  # epoch 1 only (4 steps)
    assert resumed["counter"].loaded == {"n": 4}  # loaded from the epoch-1 checkpoint
    assert resumed["counter"].n == resumed["ref_counter"].n == 12
    assert resumed["counter"].fit_starts == 1


def test_resume_with_different_epochs_or_stage_raises(resumed, no_plots):
    out = resumed["out"]
    before = open(out / "checkpoint.pt", "rb").read()
    t = make_trainer(make_model(0, dropout=0.3), out, **dict(RESUME, epochs=4))
    with pytest.raises(ValueError, match=r"written for 3 epochs, this run has 4"):
        t.fit(resume=True)
    t = make_trainer(make_model(0, dropout=0.3), out, **dict(RESUME, name="other"))
    with pytest.raises(ValueError, match=r"checkpoint is for stage 'res', not 'other'"):
        t.fit(resume=True)
    assert open(out / "checkpoint.pt", "rb").read() == before


def test_resume_of_a_complete_run_trains_nothing(resumed, no_plots):
    c = Counter()
    t = make_trainer(make_model(42, dropout=0.3), resumed["ref_dir"], hooks=[c, Bomb()], **RESUME)
    before = os.path.getmtime(resumed["ref_dir"] / "checkpoint.pt")
    s = t.fit(resume=True)
    assert s["epochs"] == 3 and s["steps"] == 12 and c.n == 12
    ref = resumed["ref"].model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in t.model.state_dict().items())
    assert os.path.getmtime(resumed["ref_dir"] / "checkpoint.pt") == before


def test_per_epoch_seeding_depends_only_on_seed_name_epoch():
    t = make_trainer(epochs=3, seed=1, name="a")

    def order_and_draw(epoch):
        t._seed_epoch(epoch)
        return [y.tolist() for _, y in t.train_loader], torch.rand(3)

    o1, r1 = order_and_draw(1)
    torch.rand(100)
    t.train_loader.generator.manual_seed(777)
    list(t.train_loader)
    o1b, r1b = order_and_draw(1)
    assert o1 == o1b and torch.equal(r1, r1b)
    o2, r2 = order_and_draw(2)
    assert not torch.equal(r1, r2)
    other = make_trainer(epochs=3, seed=1, name="b")
    other._seed_epoch(1)
    assert not torch.equal(torch.rand(3), r1)


def test_debug_kill_at_parsing(monkeypatch):
    monkeypatch.delenv("PYCOMPRESS_DEBUG_KILL_AT", raising=False)
    assert _debug_kill_step("s") is None
    monkeypatch.setenv("PYCOMPRESS_DEBUG_KILL_AT", "s:7")
    assert _debug_kill_step("s") == 7 and _debug_kill_step("t") is None
    monkeypatch.setenv("PYCOMPRESS_DEBUG_KILL_AT", "a:b:12")  # stage names may hold a colon
    assert _debug_kill_step("a:b") == 12
    for bad in ("s", "s:x", "s:-1", ""):
        monkeypatch.setenv("PYCOMPRESS_DEBUG_KILL_AT", bad)
        assert _debug_kill_step("s") is None
    monkeypatch.setenv("PYCOMPRESS_DEBUG_KILL_AT", "other:1")
    t = make_trainer(epochs=1)  # a kill spec for another stage does nothing
    assert t._kill_at is None
    t.fit()
    assert t.global_step == 4


# ------------------------------------------------------------------ 6. NaN loss
class NaNFrom(Hook):
    def __init__(self, epoch, step=0, value=float("nan")):
        self.epoch, self.step, self.value = epoch, step, value
        self.i = 0
        self.snapshot = None

    def extra_loss(self, trainer):
        if trainer.epoch >= self.epoch:
            self.i += 1
            if self.i > self.step:
                return torch.tensor(self.value)
        return None

    def on_epoch_end(self, trainer, row):
        self.snapshot = copy.deepcopy(trainer.model.state_dict())


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path, no_plots):
    h = NaNFrom(epoch=1)
    t = make_trainer(None, tmp_path, epochs=3, hooks=[h], name="boom")
    with pytest.raises(TrainingDiverged) as ei:
        t.fit()
    msg = str(ei.value)
    assert "stage 'boom'" in msg and "loss is nan" in msg
    assert "epoch 2, iteration 1" in msg
    assert f"the last good checkpoint is {tmp_path / 'checkpoint.pt'}" in msg
    assert isinstance(ei.value, RuntimeError)
    c = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert c["epoch"] == 1 and c["complete"] is False and len(c["history"]) == 1
    assert all(torch.equal(c["model"][k], v) for k, v in h.snapshot.items())
    assert all(torch.isfinite(v.float()).all() for v in c["model"].values())
    assert not tmp_files(tmp_path)
    # the last good checkpoint can be resumed (here with the NaN gone)
    t2 = make_trainer(make_model(5), tmp_path, epochs=3, name="boom")
    t2.fit(resume=True)
    assert t2.epoch == 3 and t2.global_step == 12


def test_inf_loss_mid_epoch_before_any_checkpoint(tmp_path, no_plots):
    t = make_trainer(None, tmp_path, epochs=2, hooks=[NaNFrom(epoch=0, step=2, value=float("inf"))], name="early")
    with pytest.raises(
        TrainingDiverged,
        match=r"stage 'early': loss is inf at epoch 1, iteration 3 "
        r".*no checkpoint of this stage was written yet",
    ):
        t.fit()
    assert not os.path.exists(tmp_path / "checkpoint.pt")
    assert t.global_step == 2


# ------------------------------------------------------------------ 7. atomic checkpoints
def test_save_checkpoint_round_trip_leaves_no_temp_files(tmp_path):
    p = tmp_path / "sub" / "c.pt"
    save_checkpoint(str(p), {"a": torch.arange(3), "b": (1, "x")})
    c = load_checkpoint(str(p))
    assert torch.equal(c["a"], torch.arange(3)) and c["b"] == (1, "x")
    assert c["format"] == ckpt_mod.FORMAT
    save_checkpoint(str(p), {"a": torch.arange(4)})  # overwrite
    assert torch.equal(load_checkpoint(str(p))["a"], torch.arange(4))
    assert os.listdir(tmp_path / "sub") == ["c.pt"]


def _failing_replace(*args, **kwargs):
    raise OSError("disk on fire")


def test_failed_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    save_checkpoint(str(p), {"v": 1})
    before = p.read_bytes()
    monkeypatch.setattr(os, "replace", _failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        save_checkpoint(str(p), {"v": 2, "big": torch.zeros(1000)})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert load_checkpoint(str(p))["v"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


def test_failed_write_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    save_checkpoint(str(p), {"v": 1})
    before = p.read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError("no space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="no space left"):
        save_checkpoint(str(p), {"v": 2, "big": torch.ones(1000)})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert load_checkpoint(str(p))["v"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


def test_failed_checkpoint_in_trainer_keeps_previous(tmp_path, no_plots, monkeypatch):
    t = make_trainer(None, tmp_path, epochs=2)
    t.epochs = 1
    t.fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    t.epochs = 2
    monkeypatch.setattr(os, "replace", _failing_replace)
    with pytest.raises(OSError):
        t.fit()
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["epoch"] == 1
    assert not tmp_files(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_honours_umask(tmp_path, umask):
    # (was a bug: the tempfile.mkstemp mode 0600 leaked into every checkpoint, log and plot)
    old = os.umask(umask)
    try:
        save_checkpoint(str(tmp_path / "c.pt"), {"v": 1})
        save_checkpoint(str(tmp_path / "c.pt"), {"v": 2})  # replacing keeps the umask mode
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        assert os.umask(umask) == umask  # the process umask is left as it was
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert os.stat(tmp_path / "plain.txt").st_mode & 0o777 == want
    assert os.stat(tmp_path / "c.pt").st_mode & 0o777 == want


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path))  # a directory
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(str(junk))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(str(empty))
    plain = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, str(plain))
    with pytest.raises(CheckpointError, match="not a pycompress checkpoint"):
        load_checkpoint(str(plain))
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), str(tensor))
    with pytest.raises(CheckpointError, match="not a pycompress checkpoint"):
        load_checkpoint(str(tensor))
    newer = tmp_path / "newer.pt"
    save_checkpoint(str(newer), {"version": ckpt_mod.VERSION + 1})
    with pytest.raises(CheckpointError, match="newer pycompress"):
        load_checkpoint(str(newer))
    # a truncated checkpoint
    good = tmp_path / "good.pt"
    save_checkpoint(str(good), {"w": torch.zeros(100)})
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(str(good))


# ------------------------------------------------------------------ 8. AMP on CPU
def test_amp_on_cpu_uses_bf16_and_stays_finite():
    dtypes = []
    t = make_trainer(epochs=1, amp=True)
    t.model[-1].register_forward_hook(lambda m, i, o: dtypes.append((m.training, o.dtype)))
    t.fit()
    assert (True, torch.bfloat16) in dtypes and (False, torch.bfloat16) in dtypes
    r = t.history[0]
    assert math.isfinite(r["train_loss"]) and math.isfinite(r["eval_loss"])
    assert not t.scaler.is_enabled()
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in t.model.parameters())
    ev = evaluate(t.model, t.eval_loader, amp=True)
    assert math.isfinite(ev["loss"])


# ------------------------------------------------------------------ 9. hooks
class FreezeByGrad(Hook):
    """Zeroes one parameter's gradient before the step; checks every gradient is there."""

    def __init__(self, param):
        self.param = param
        self.calls = 0

    def before_step(self, trainer):
        self.calls += 1
        for p in trainer.model.parameters():
            assert p.grad is not None
        assert self.param.grad.abs().sum() > 0  # a real gradient was computed
        self.param.grad.zero_()


def test_before_step_sees_gradients():
    model = make_model()
    frozen = model[0].weight
    before = frozen.detach().clone()
    other = model[4].weight.detach().clone()
    h = FreezeByGrad(frozen)
    c = Counter()
    t = make_trainer(
        model, epochs=2, hooks=[h, c], optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    )
    t.fit()
    assert torch.equal(frozen.detach(), before)
    assert not torch.equal(model[4].weight.detach(), other)
    assert h.calls == c.n == t.global_step == 8  # before_step and after_step once per step
    assert c.fit_starts == 1


def test_hook_order_extra_loss_and_epoch_end():
    events = []

    class Rec(Hook):
        def on_fit_start(self, trainer):
            events.append("start")

        def extra_loss(self, trainer):
            events.append("loss")
            return 0.0 * sum(p.sum() for p in trainer.model.parameters())

        def before_step(self, trainer):
            events.append("before")

        def after_step(self, trainer):
            events.append("after")

        def on_epoch_end(self, trainer, row):
            assert EVAL_KEYS <= set(row) and row["epoch"] == trainer.epoch + 1
            row["custom"] = 1.0
            events.append("end")

    t = make_trainer(epochs=1, n=16, hooks=[Rec()])
    t.fit()
    assert events == ["start"] + ["loss", "before", "after"] * 2 + ["end"]
    assert t.history[0]["custom"] == 1.0  # rows can be extended by hooks


def test_extra_loss_changes_training():
    class L2(Hook):
        def extra_loss(self, trainer):
            return 10.0 * sum((p**2).sum() for p in trainer.model.parameters())

    plain = make_trainer(make_model(0), epochs=1)
    plain.fit()
    reg = make_trainer(make_model(0), epochs=1, hooks=[L2()])
    reg.fit()
    n_plain = sum(float(p.detach().norm()) for p in plain.model.parameters())
    n_reg = sum(float(p.detach().norm()) for p in reg.model.parameters())
    assert n_reg < n_plain
    assert reg.history[0]["train_loss"] > plain.history[0]["train_loss"]


def test_grad_clip_bounds_the_update():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    t = make_trainer(
        model, epochs=1, n=8, grad_clip=1e-3, optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}
    )
    t.fit()
    assert t.global_step == 1
    delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < float(delta) <= 1e-3 * (1 + 1e-4)


def test_ready_optimizer_instance_is_used():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    t = make_trainer(model, epochs=1, optimizer=opt)
    assert t.optimizer is opt
    t.fit()
    assert t.global_step == 4 and opt.param_groups[0]["lr"] == 0.05


def test_resume_refuses_a_different_seed_or_batch_count(tmp_path):
    from pycompress.data import make_loaders

    tr, te, _ = make_loaders("synthetic", batch_size=8, length=32, image_size=8, in_channels=1, num_classes=4)

    def trainer(seed, loader):
        m = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
        return Trainer(
            m,
            loader,
            None,
            epochs=2,
            optimizer={"name": "sgd", "lr": 0.1},
            seed=seed,
            out_dir=str(tmp_path),
            progress=False,
            log=lambda s: None,
        )

    trainer(0, tr).fit()
    with pytest.raises(ValueError, match="seed 0, this run has 1"):
        trainer(1, tr).try_resume()
    tr16, _, _ = make_loaders("synthetic", batch_size=16, length=32, image_size=8, in_channels=1, num_classes=4)
    with pytest.raises(ValueError, match="steps_per_epoch 4, this run has 2"):
        trainer(0, tr16).try_resume()


def test_evaluate_records_no_autograd_graph():
    seen = []
    model = nn.Linear(4, 3)
    model.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.requires_grad)))
    evaluate(model, [(torch.randn(5, 4), torch.arange(5) % 3)])
    assert seen == [(False, False)]
