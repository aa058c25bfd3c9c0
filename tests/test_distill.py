"""Tests for pycompress.distill: loss values vs hand-computed formulas, gradients, stability,
frozen teacher, spec parsing and validation."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pycompress.distill import KINDS, CombinedLoss, Distiller, DistillLoss, build_loss

# --------------------------------------------------------------------------------------------
# independent reference implementation with Python floats / math
# --------------------------------------------------------------------------------------------
S = [[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]]
T_ = [[0.5, 1.5, 2.0], [2.0, -0.5, 1.0]]
Y = [1, 0]


def softmax(v, temp=1.0):
    z = [x / temp for x in v]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    tot = sum(e)
    return [x / tot for x in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def xent(p, q):  # -sum p log q
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q))


def js(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def hard_ce(logits, y):
    return -math.log(softmax(logits)[y])


def ref(kind, s, t, y, temp=1.0, label_weight=0.0, alpha=0.5, t2=False):
    vals = []
    for si, ti, yi in zip(s, t, y):
        ps, pt = softmax(si, temp), softmax(ti, temp)
        if kind == "hinton":
            vals.append((1 - alpha) * hard_ce(si, yi) + alpha * temp**2 * kl(pt, ps))
            continue
        d = {
            "kl_student_teacher": kl(ps, pt),
            "kl_teacher_student": kl(pt, ps),
            "ce": xent(pt, ps),
            "js": js(ps, pt),
            "symmetric_kl": kl(ps, pt) + kl(pt, ps),
        }[kind]
        vals.append((temp**2 if t2 else 1.0) * d + label_weight * hard_ce(si, yi))
    return sum(vals) / len(vals)


def tensors(dtype=torch.float64):
    return torch.tensor(S, dtype=dtype), torch.tensor(T_, dtype=dtype), torch.tensor(Y)


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "hinton"])
@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_probability_kinds_match_formula(kind, temp):
    s, t, y = tensors()
    got = build_loss({"kind": kind, "temperature": temp})(s, t)
    assert got.item() == pytest.approx(ref(kind, S, T_, Y, temp), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "hinton"])
def test_label_weight_and_t2_scale(kind):
    s, t, y = tensors()
    loss = build_loss({"kind": kind, "temperature": 3.0, "label_weight": 0.3, "t2_scale": True, "weight": 2.0})
    expected = 2.0 * ref(kind, S, T_, Y, 3.0, label_weight=0.3, t2=True)
    assert loss(s, t, y).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("alpha,temp", [(0.5, 20.0), (0.0, 4.0), (1.0, 2.0), (0.3, 1.0)])
def test_hinton_matches_formula(alpha, temp):
    s, t, y = tensors()
    loss = build_loss({"kind": "hinton", "alpha": alpha, "temperature": temp})
    assert loss(s, t, y).item() == pytest.approx(ref("hinton", S, T_, Y, temp, alpha=alpha), rel=1e-12)


def test_hinton_defaults_and_homework_formula():
    # defaults are the homework's T = 20, alpha = 0.5; compare with the homework's own expression
    s, t, y = tensors()
    loss = build_loss("hinton")
    assert loss.temperature == 20.0 and loss.alpha == 0.5
    T, a = 20.0, 0.5
    hw = (1 - a) * F.cross_entropy(s, y) + a * T * T * nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s / T, 1), F.softmax(t / T, 1)
    )
    assert loss(s, t, y).item() == pytest.approx(hw.item(), rel=1e-10)


def test_known_relations():
    s, t, _ = tensors()
    # KL(p||p) = 0, JS symmetric, ce = KL(p_t||p_s) + H(p_t)
    for kind in ("kl_student_teacher", "kl_teacher_student", "js", "symmetric_kl"):
        assert build_loss(kind)(s, s).abs().item() < 1e-12
    assert build_loss("js")(s, t).item() == pytest.approx(build_loss("js")(t, s).item(), rel=1e-12)
    h_t = sum(-sum(p * math.log(p) for p in softmax(row)) for row in T_) / 2
    assert build_loss("ce")(s, t).item() == pytest.approx(build_loss("kl_ts")(s, t).item() + h_t, rel=1e-12)


def test_string_specs():
    s, t, y = tensors()
    a = build_loss("kldiv:1")
    assert isinstance(a, DistillLoss) and a.kind == "kl_student_teacher"
    assert a.weight == 1.0 and a.temperature == 1.0 and a.label_weight == 0.0
    assert a(s, t).item() == pytest.approx(ref("kl_student_teacher", S, T_, Y), rel=1e-12)
    b = build_loss("kl_teacher_student:0.5:4")
    assert b(s, t).item() == pytest.approx(0.5 * ref("kl_teacher_student", S, T_, Y, 4.0), rel=1e-12)
    c = build_loss("kldiv:1, ce:0.25")
    assert isinstance(c, CombinedLoss)
    expected = ref("kl_student_teacher", S, T_, Y) + 0.25 * ref("ce", S, T_, Y)
    assert c(s, t).item() == pytest.approx(expected, rel=1e-12)
    d = build_loss([{"kind": "js", "weight": 2.0}, "skl"])
    assert d(s, t).item() == pytest.approx(2 * ref("js", S, T_, Y) + ref("symmetric_kl", S, T_, Y), rel=1e-12)
    assert build_loss("KLDIV").kind == "kl_student_teacher"  # case-insensitive


def test_half_precision_inputs_computed_in_float32():
    s, t, y = tensors(torch.float16)
    out = build_loss({"kind": "hinton", "temperature": 4.0})(s, t, y)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref("hinton", S, T_, Y, 4.0), rel=1e-3)


# --------------------------------------------------------------------------------------------
# numerical stability
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temp", [1.0, 20.0])
def test_extreme_logits_finite(kind, temp):
    s = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [3.0, -1e4, 1e4]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], requires_grad=True)
    y = torch.tensor([0, 1, 2])
    spec = {"kind": kind, "temperature": temp}
    if kind != "hinton":
        spec["label_weight"] = 0.5
    loss = build_loss(spec)(s, t, y)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


def test_extreme_logits_values():
    # p_s = [1, 0], p_t = [0, 1] (up to e^-20000): KL(p_s||p_t) = log p_s - log p_t = 2e4,
    # the soft CE is also 2e4, JS = log 2, identical one-hot distributions give exactly 0.
    s = torch.tensor([[1e4, -1e4]])
    t = torch.tensor([[-1e4, 1e4]])
    assert build_loss("kldiv")(s, t).item() == pytest.approx(2e4, rel=1e-6)
    assert build_loss("kl_ts")(s, t).item() == pytest.approx(2e4, rel=1e-6)
    assert build_loss("ce")(s, t).item() == pytest.approx(2e4, rel=1e-6)
    assert build_loss("skl")(s, t).item() == pytest.approx(4e4, rel=1e-6)
    assert build_loss("js")(s, t).item() == pytest.approx(math.log(2), rel=1e-6)
    for kind in ("kldiv", "kl_ts", "js", "skl"):
        assert build_loss(kind)(s, s).item() == 0.0


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 3, 1])
    spec = {"kind": kind, "temperature": 2.0}
    spec.update({"alpha": 0.3} if kind == "hinton" else {"label_weight": 0.4, "t2_scale": True})
    loss = build_loss(spec)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, y), (s, t))


# --------------------------------------------------------------------------------------------
# teacher handling
# --------------------------------------------------------------------------------------------
def _teacher():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4))


def test_teacher_frozen_eval_untracked():
    teacher = _teacher()
    teacher.train()
    bn = teacher[1]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = nn.Linear(6, 4)
    d = Distiller(teacher, loss={"kind": "hinton", "alpha": 0.5, "temperature": 4}, student=student)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    d.train()
    assert d.training and student.training and not teacher.training
    assert all(not m.training for m in teacher.modules())
    teacher.train()  # even a direct train() call is undone before the teacher forward
    x = torch.randn(16, 6, requires_grad=True)
    y = torch.randint(0, 4, (16,))
    with torch.enable_grad():
        t_logits = d.teacher_outputs(x)
    assert not t_logits.requires_grad and t_logits.grad_fn is None
    # deterministic (eval mode: no dropout, running stats)
    assert torch.equal(t_logits, d.teacher_outputs(x))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert bn.num_batches_tracked.item() == 0
    loss = d.loss(student(x), t_logits, y)
    loss.backward()
    assert student.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    # convenience forward with the student
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    assert {id(p) for g in opt.param_groups for p in g["params"] if p.requires_grad} == {
        id(p) for p in student.parameters()
    }
    loss2, s_logits = d(x, y)
    assert s_logits.shape == (16, 4) and loss2.requires_grad
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_distiller_default_and_string_loss():
    d = Distiller(_teacher(), loss="kldiv:1")
    assert isinstance(d.criterion, DistillLoss) and d.criterion.kind == "kl_student_teacher"
    x = torch.randn(5, 6)
    t = d.teacher_outputs(x)
    s = torch.randn(5, 4, requires_grad=True)
    assert d.loss(s, t).requires_grad
    with pytest.raises(RuntimeError):
        d(x)  # no student given
    assert Distiller(_teacher()).criterion.kind == "hinton"


# --------------------------------------------------------------------------------------------
# bad specs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,key",
    [
        ({"kind": "nope"}, "kind"),
        ("nope:1", "kind"),
        ({"kind": 3}, "kind"),
        ({"temperature": 2.0}, "kind"),
        ({"kind": "hinton", "temperature": -1.0}, "temperature"),
        ({"kind": "kldiv", "temperature": 0}, "temperature"),
        ("kldiv:1:-2", "temperature"),
        ({"kind": "hinton", "alpha": 1.5}, "alpha"),
        ({"kind": "hinton", "alpha": -0.1}, "alpha"),
        ({"kind": "hinton", "alpha": "x"}, "alpha"),
        ({"kind": "kldiv", "alpha": 0.5}, "alpha"),
        ({"kind": "hinton", "label_weight": 0.5}, "label_weight"),
        ({"kind": "js", "label_weight": -1}, "label_weight"),
        ({"kind": "js", "weight": -1}, "weight"),
        ("js:abc", "weight"),
        ({"kind": "js", "t2_scale": 1}, "t2_scale"),
        ({"kind": "js", "temprature": 2}, "temprature"),
        ({"kind": "hinton", "t2_scale": True}, "t2_scale"),
    ],
)
def test_bad_specs_raise_value_error_naming_key(spec, key):
    with pytest.raises(ValueError, match=key):
        build_loss(spec)


def test_bad_calls():
    s, t, _ = tensors()
    with pytest.raises(ValueError, match="targets"):
        build_loss("hinton")(s, t)
    with pytest.raises(ValueError, match="shape"):
        build_loss("js")(s, t[:, :2])
    for bad in ("", "kldiv:1:2:3", "kldiv,,ce", 42, None):
        with pytest.raises(ValueError):
            build_loss(bad)
