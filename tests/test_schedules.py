"""Tests for pycompress.train.schedules: per-iteration LRs vs independent formulas, resume via
state_dict, per-param-group LRs, the build_scheduler factory and input validation."""

import copy
import io
import math

import pytest
import torch

from pycompress.train import (
    Constant,
    MultiStep,
    Step,
    WarmupCosine,
    WarmupStep,
    build_scheduler,
)
from pycompress.train.schedules import WarmupLRScheduler

LRS = (0.1, 0.02)  # two param groups with different LRs


def make_opt(lrs=LRS):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=1.0, momentum=0.9)


def flat(seq):
    return [x for row in seq for x in row]


def run(sched, n):
    """LRs (per group) at iterations 0..n-1, stepping like a training loop."""
    opt = sched.optimizer
    out = []
    for _ in range(n):
        lrs = [float(g["lr"]) for g in opt.param_groups]
        assert lrs == [float(x) for x in sched.get_last_lr()]
        out.append(lrs)
        opt.step()
        sched.step()
    return out


# independent formulas ------------------------------------------------------------------------
def warmup(i, W, base, lr):
    return base + (lr - base) * i / W


def ref_cosine(i, lr, T, W=0, base=0.0):
    if i < W:
        return warmup(i, W, base, lr)
    i = min(i, T)
    return 0.5 * (1 + math.cos(math.pi * (i - W) / (T - W))) * lr


def ref_multistep(i, lr, milestones, gamma, W=0, base=0.0):
    if i < W:
        return warmup(i, W, base, lr)
    return lr * gamma ** len([m for m in milestones if m <= i])


def ref_step(i, lr, size, gamma):
    return lr * gamma ** math.floor(i / size)


def check(seq, fn, n):
    assert len(seq) == n
    for i, lrs in enumerate(seq):
        for g, lr in enumerate(LRS):
            assert lrs[g] == pytest.approx(fn(i, lr, g), rel=1e-12, abs=1e-15), (i, g)


# formulas -------------------------------------------------------------------------------------
def test_warmup_cosine_formula():
    T, W, base = 50, 7, 0.001
    seq = run(WarmupCosine(make_opt(), total_iters=T, warmup_iters=W, base_lr=base), T + 10)
    check(seq, lambda i, lr, g: ref_cosine(i, lr, T, W, base), T + 10)
    # spot values: start = base, peak at W, half way = lr/2, end 0 and stays 0
    assert seq[0] == pytest.approx([base, base])
    assert seq[W] == pytest.approx(list(LRS))
    T2, W2 = 30, 10  # (T2 - W2) even: exactly half way the LR is lr / 2
    seq2 = run(WarmupCosine(make_opt(), total_iters=T2, warmup_iters=W2), T2)
    assert seq2[W2 + (T2 - W2) // 2] == pytest.approx([lr / 2 for lr in LRS], rel=1e-12)
    assert seq[T] == pytest.approx([0.0, 0.0], abs=1e-18) and seq[T + 9] == pytest.approx([0.0, 0.0], abs=1e-18)


def test_cosine_without_warmup_matches_torch_cosine():
    T = 40
    a = run(WarmupCosine(make_opt(), total_iters=T), T + 1)
    opt = make_opt()
    b = run(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T, eta_min=0.0), T + 1)
    assert flat(a) == pytest.approx(flat(b), rel=1e-9, abs=1e-15)


def test_warmup_step_formula():
    ms, gamma, W, base = [10, 25, 26], 0.2, 6, 0.0
    seq = run(WarmupStep(make_opt(), milestones=ms, gamma=gamma, warmup_iters=W, base_lr=base), 40)
    check(seq, lambda i, lr, g: ref_multistep(i, lr, ms, gamma, W, base), 40)
    assert seq[9] == pytest.approx(list(LRS)) and seq[10] == pytest.approx([0.02, 0.004])


def test_multistep_and_step_formulas_and_match_torch():
    ms = [3, 8, 20]
    seq = run(MultiStep(make_opt(), milestones=ms, gamma=0.5), 30)
    check(seq, lambda i, lr, g: ref_multistep(i, lr, ms, 0.5), 30)
    opt = make_opt()
    assert flat(seq) == pytest.approx(flat(run(torch.optim.lr_scheduler.MultiStepLR(opt, ms, 0.5), 30)), rel=1e-12)

    seq = run(Step(make_opt(), step_size=7, gamma=0.3), 30)
    check(seq, lambda i, lr, g: ref_step(i, lr, 7, 0.3), 30)
    opt = make_opt()
    assert flat(seq) == pytest.approx(flat(run(torch.optim.lr_scheduler.StepLR(opt, 7, 0.3), 30)), rel=1e-12)


def test_constant_and_warmup_on_other_kinds():
    seq = run(Constant(make_opt()), 10)
    assert seq == [list(LRS)] * 10
    seq = run(Constant(make_opt(), warmup_iters=4, base_lr=0.01), 10)
    check(seq, lambda i, lr, g: warmup(i, 4, 0.01, lr) if i < 4 else lr, 10)
    seq = run(Step(make_opt(), step_size=5, gamma=0.1, warmup_iters=3, base_lr=0.0), 12)
    check(seq, lambda i, lr, g: warmup(i, 3, 0.0, lr) if i < 3 else ref_step(i, lr, 5, 0.1), 12)


def test_per_group_base_lr():
    bases = [0.01, 0.0]
    seq = run(WarmupCosine(make_opt(), total_iters=20, warmup_iters=5, base_lr=bases), 20)
    check(seq, lambda i, lr, g: ref_cosine(i, lr, 20, 5, bases[g]), 20)


def test_tensor_lr_supported():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.1))
    s = WarmupCosine(opt, total_iters=10, warmup_iters=2)
    for i, (lr,) in enumerate(run(s, 10)):
        assert lr == pytest.approx(ref_cosine(i, 0.1, 10, 2), rel=1e-6)


# resume ---------------------------------------------------------------------------------------
FACTORIES = {
    "cosine": lambda o: WarmupCosine(o, total_iters=60, warmup_iters=8, base_lr=0.005),
    "warmup_step": lambda o: WarmupStep(o, milestones=[15, 30, 31], gamma=0.1, warmup_iters=5, base_lr=0.0),
    "multistep": lambda o: MultiStep(o, milestones=[4, 22], gamma=0.5),
    "step": lambda o: Step(o, step_size=9, gamma=0.7),
    "constant": lambda o: Constant(o, warmup_iters=3, base_lr=0.01),
}


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("cut", [1, 6, 17, 45])
@pytest.mark.parametrize("load_optimizer", [False, True])
def test_state_dict_resume_identical(name, cut, load_optimizer):
    n = 70
    factory = FACTORIES[name]
    full = run(factory(make_opt()), n)

    opt1 = make_opt()
    s1 = factory(opt1)
    first = run(s1, cut)  # interrupted after `cut` iterations
    sched_sd = _roundtrip(s1.state_dict())  # through torch.save / torch.load(weights_only=True)
    opt_sd = copy.deepcopy(opt1.state_dict())
    del s1, opt1

    opt2 = make_opt()  # fresh optimizer
    s2 = factory(opt2)  # a fresh scheduler sets LR(0)...
    if load_optimizer:
        opt2.load_state_dict(opt_sd)
    s2.load_state_dict(sched_sd)  # ...and the restore writes LR(cut) into the optimizer
    assert s2.last_epoch == cut
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(full[cut], rel=1e-12)
    rest = run(s2, n - cut)
    assert first + rest == full  # exactly the same LR sequence


# factory --------------------------------------------------------------------------------------
def lrs_of(sched, n):
    return run(sched, n)


def test_build_scheduler_converts_epochs():
    ipe = 10
    a = build_scheduler(make_opt(), {"name": "warmup_cosine", "epochs": 6, "warmup_epochs": 0.5, "base_lr": 0.001}, ipe)
    assert isinstance(a, WarmupCosine) and a.total_iters == 60 and a.warmup_iters == 5
    b = WarmupCosine(make_opt(), total_iters=60, warmup_iters=5, base_lr=0.001)
    assert lrs_of(a, 65) == lrs_of(b, 65)

    c = build_scheduler(make_opt(), {"name": "WarmupStep", "milestones": [2, 4], "gamma": 0.1, "warmup_epochs": 1}, ipe)
    assert isinstance(c, WarmupStep) and c.milestones == [20, 40] and c.warmup_iters == 10
    d = build_scheduler(make_opt(), {"name": "multistep", "milestone_iters": [20, 40]}, ipe)
    assert type(d) is MultiStep and d.milestones == [20, 40] and d.gamma == 0.1
    e = build_scheduler(make_opt(), {"name": "step", "step_size": 3, "gamma": 0.5}, ipe)
    assert isinstance(e, Step) and e.step_size == 30
    f = build_scheduler(make_opt(), {"name": "step", "step_size_iters": 7}, ipe)
    assert f.step_size == 7
    g = build_scheduler(make_opt(), {"name": "constant"}, ipe)
    assert isinstance(g, Constant) and isinstance(g, WarmupLRScheduler)
    h = build_scheduler(make_opt(), {"name": "cosine", "total_iters": 100, "warmup_iters": 3}, ipe)
    assert h.total_iters == 100 and h.warmup_iters == 3


@pytest.mark.parametrize(
    "spec,key",
    [
        ({"name": "warmup_cosine", "epochs": 5, "warmpu_epochs": 1}, "warmpu_epochs"),
        ({"name": "warmup_cosine", "epochs": 5, "milestones": [1]}, "milestones"),
        ({"name": "step", "step_size": 1, "epochs": 3}, "epochs"),
        ({"name": "nope"}, "name"),
        ({"epochs": 3}, "name"),
        ({"name": "warmup_cosine"}, "epochs"),
        ({"name": "warmup_cosine", "epochs": 5, "total_iters": 50}, "total_iters"),
        ({"name": "warmup_cosine", "epochs": 5, "warmup_epochs": 5}, "warmup_iters"),
        ({"name": "warmup_cosine", "epochs": -1}, "epochs"),
        ({"name": "warmup_cosine", "epochs": "10"}, "epochs"),
        ({"name": "warmup_cosine", "epochs": 5, "warmup_epochs": -1}, "warmup_epochs"),
        ({"name": "warmup_cosine", "epochs": 5, "base_lr": -0.1}, "base_lr"),
        ({"name": "warmup_cosine", "epochs": 5, "base_lr": [0.1]}, "base_lr"),
        ({"name": "warmup_step", "gamma": 0.1}, "milestones"),
        ({"name": "warmup_step", "milestones": [3, 2]}, "milestones"),
        ({"name": "warmup_step", "milestones": 3}, "milestones"),
        ({"name": "multistep", "milestones": [1], "gamma": 0}, "gamma"),
        ({"name": "multistep", "milestone_iters": [1.5]}, "milestone_iters"),
        ({"name": "step"}, "step_size"),
        ({"name": "step", "step_size": 0}, "step_size"),
        ({"name": "step", "step_size_iters": True}, "step_size_iters"),
    ],
)
def test_build_scheduler_bad_spec(spec, key):
    with pytest.raises(ValueError, match=key):
        build_scheduler(make_opt(), spec, 10)


def test_bad_constructor_args_and_iters_per_epoch():
    with pytest.raises(ValueError, match="iters_per_epoch"):
        build_scheduler(make_opt(), {"name": "constant"}, 0)
    with pytest.raises(ValueError):
        build_scheduler(make_opt(), "warmup_cosine", 10)
    with pytest.raises(ValueError, match="total_iters"):
        WarmupCosine(make_opt(), total_iters=0)
    with pytest.raises(ValueError, match="warmup_iters"):
        WarmupCosine(make_opt(), total_iters=10, warmup_iters=10)
    with pytest.raises(ValueError, match="warmup_iters"):
        Constant(make_opt(), warmup_iters=-2)
    with pytest.raises(ValueError, match="gamma"):
        Step(make_opt(), step_size=3, gamma=-0.1)
    with pytest.raises(ValueError, match="milestones"):
        MultiStep(make_opt(), milestones=[5, 5])
    with pytest.raises(ValueError, match="base_lr"):
        WarmupStep(make_opt(), milestones=[5], warmup_iters=2, base_lr=[0.1, 0.2, 0.3])
    with pytest.raises(TypeError):
        Constant(object())


def test_default_epochs_fills_only_a_missing_cosine_length():
    import pytest
    import torch

    from pycompress.train import build_scheduler

    def opt():
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)

    s = build_scheduler(opt(), {"name": " Cosine "}, iters_per_epoch=10, default_epochs=3)
    assert s.total_iters == 30
    s = build_scheduler(opt(), {"name": "cosine", "epochs": 2}, iters_per_epoch=10, default_epochs=3)
    assert s.total_iters == 20  # the spec's own length wins
    with pytest.raises(ValueError, match="missing 'epochs'"):
        build_scheduler(opt(), {"name": "cosine"}, iters_per_epoch=10)
    with pytest.raises(ValueError, match="unknown key 'epochs'"):  # not added to other kinds
        build_scheduler(opt(), {"name": "step", "step_size": 1, "epochs": 3}, iters_per_epoch=10)
    build_scheduler(opt(), {"name": "step", "step_size": 1}, iters_per_epoch=10, default_epochs=3)
