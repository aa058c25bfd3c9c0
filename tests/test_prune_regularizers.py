import math

import pytest
import torch

from pycompress.prune.regularizers import (
    REGULARIZERS,
    group_hoyer,
    group_hs,
    group_lasso,
    hoyer,
    hoyer_square,
    is_group,
    l1,
    regularization,
    transformed_l1,
)

ELEMENTWISE = ["l1", "hoyer", "hoyer_square", "transformed_l1"]
GROUP = ["group_lasso", "group_hoyer", "group_hs"]

# FC (2, 3): W = [[3, -4, 0], [0, 0, 12]]
#   sum|w| = 19, sum w^2 = 169 (||W||_F = 13)
#   rows (filters): 5, 12 -> 17 ; columns (input channels): 3, 4, 12 -> 19
FC = [[3.0, -4.0, 0.0], [0.0, 0.0, 12.0]]
FC_VALUES = {
    "l1": 19.0,
    "hoyer": 19.0 / 13.0,
    "hoyer_square": 361.0 / 169.0,
    "transformed_l1": 2 * 3 / 4 + 2 * 4 / 5 + 2 * 12 / 13,
    "group_lasso": 19.0 + 17.0,
    "group_hoyer": 36.0 / 13.0,
    "group_hs": (19.0**2 + 17.0**2) / 169.0,
}

# conv (2, 2, 1, 1): W[f, c] = [[0, 3], [4, 0]]
#   sum|w| = 7, ||W||_F = 5 ; filters 3, 4 -> 7 ; input channels (0,4) -> 4, (3,0) -> 3 -> 7
CONV = [[0.0, 3.0], [4.0, 0.0]]
CONV_VALUES = {
    "l1": 7.0,
    "hoyer": 7.0 / 5.0,
    "hoyer_square": 49.0 / 25.0,
    "transformed_l1": 2 * 3 / 4 + 2 * 4 / 5,
    "group_lasso": 14.0,
    "group_hoyer": 14.0 / 5.0,
    "group_hs": (49.0 + 49.0) / 25.0,
}

# conv (2, 1, 1, 2): filters (3, 4) -> 5 and (0, 12) -> 12 ; one input channel: ||W||_F = 13
CONV2 = [[[[3.0, 4.0]]], [[[0.0, 12.0]]]]
CONV2_VALUES = {"group_lasso": 5.0 + 12.0 + 13.0, "group_hoyer": 30.0 / 13.0, "group_hs": (13.0**2 + 17.0**2) / 169.0}


def _naive(kind, w):
    """The textbook formulas (undefined at zero groups / zero tensors)."""
    a = w.abs()
    if kind == "l1":
        return a.sum()
    if kind == "hoyer":
        return a.sum() / torch.sqrt((w * w).sum())
    if kind == "hoyer_square":
        return a.sum() ** 2 / (w * w).sum()
    if kind == "transformed_l1":
        return (2 * a / (1 + a)).sum()
    c = torch.stack([torch.sqrt((w[:, i] ** 2).sum()) for i in range(w.shape[1])]).sum()
    f = torch.stack([torch.sqrt((w[i] ** 2).sum()) for i in range(w.shape[0])]).sum()
    fro2 = (w * w).sum()
    if kind == "group_lasso":
        return c + f
    if kind == "group_hoyer":
        return (c + f) / torch.sqrt(fro2)
    return (c**2 + f**2) / fro2


@pytest.mark.parametrize("kind", ELEMENTWISE + GROUP)
def test_hand_values(kind):
    fn = REGULARIZERS[kind]
    fc = torch.tensor(FC, dtype=torch.float64)
    conv = torch.tensor(CONV, dtype=torch.float64).reshape(2, 2, 1, 1)
    assert fn(fc).item() == pytest.approx(FC_VALUES[kind], rel=1e-12)
    assert fn(conv).item() == pytest.approx(CONV_VALUES[kind], rel=1e-12)
    r = fn(torch.tensor(FC))
    assert r.dim() == 0 and r.dtype == torch.float32
    assert r.item() == pytest.approx(FC_VALUES[kind], rel=1e-6)
    if kind in CONV2_VALUES:
        assert fn(torch.tensor(CONV2, dtype=torch.float64)).item() == pytest.approx(CONV2_VALUES[kind], rel=1e-12)


def test_elementwise_on_1d_and_group_rejects_1d():
    v = torch.tensor([3.0, -4.0])
    assert l1(v).item() == 7.0
    assert hoyer(v).item() == pytest.approx(7 / 5)
    assert hoyer_square(v).item() == pytest.approx(49 / 25)
    assert transformed_l1(v).item() == pytest.approx(1.5 + 1.6)
    for fn in (group_lasso, group_hoyer, group_hs):
        with pytest.raises(ValueError, match=">= 2 dims"):
            fn(v)


@pytest.mark.parametrize("kind", ELEMENTWISE + GROUP)
@pytest.mark.parametrize("shape", [(3, 4), (3, 2, 2, 2)])
def test_gradcheck_and_naive_grad(kind, shape):
    fn = REGULARIZERS[kind]
    w = (torch.rand(shape, dtype=torch.float64) + 0.2) * torch.where(torch.rand(shape) > 0.5, 1.0, -1.0).double()
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (w,))
    (g,) = torch.autograd.grad(fn(w), w)
    (g_ref,) = torch.autograd.grad(_naive(kind, w), w)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert fn(w).item() == pytest.approx(_naive(kind, w).item(), rel=1e-12)


@pytest.mark.parametrize("kind", ELEMENTWISE + GROUP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_zero_tensor(kind, dtype):
    w = torch.zeros(3, 2, 2, 2, dtype=dtype, requires_grad=True)
    r = REGULARIZERS[kind](w)
    assert r.item() == 0.0
    r.backward()
    assert w.grad is not None and w.grad.dtype == dtype
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("kind", ELEMENTWISE + GROUP)
def test_zero_filter_and_channel_finite_grad(kind):
    w = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    w[1] = 0.0  # a zero filter
    w[:, 2] = 0.0  # a zero input channel
    w.requires_grad_(True)
    r = REGULARIZERS[kind](w)
    assert torch.isfinite(r)
    (g,) = torch.autograd.grad(r, w)
    assert torch.isfinite(g).all()
    if kind in GROUP:
        # value and gradient equal the naive formula over the nonzero groups only
        keep_f = [0, 2]
        keep_c = [0, 1, 3]
        wd = w.detach().clone().requires_grad_(True)
        c = torch.stack([wd[:, i].pow(2).sum().sqrt() for i in keep_c]).sum()
        f = torch.stack([wd[i].pow(2).sum().sqrt() for i in keep_f]).sum()
        fro2 = wd.pow(2).sum()
        ref = {"group_lasso": c + f, "group_hoyer": (c + f) / fro2.sqrt(), "group_hs": (c**2 + f**2) / fro2}[kind]
        assert r.item() == pytest.approx(ref.item(), rel=1e-12)
        (g_ref,) = torch.autograd.grad(ref, wd)
        if kind == "group_lasso":
            # at a zero group we use the subgradient 0 of its norm
            assert torch.equal(g[1], torch.zeros_like(g[1]))
            assert torch.equal(g[:, 2], torch.zeros_like(g[:, 2]))
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    w = torch.full((400, 400), 0.5, dtype=dtype, requires_grad=True)  # sum|w| = 80000 > fp16 max
    r = l1(w)
    assert r.dtype == torch.float32 and r.item() == 80000.0
    r.backward()
    assert w.grad.dtype == dtype and torch.equal(w.grad, torch.ones_like(w))
    assert hoyer(w).item() == pytest.approx(400.0)  # n / sqrt(n) for a constant tensor


def test_registry_and_is_group():
    # bn_l1 is L1 applied by the Pruner to BatchNorm scales (network slimming)
    assert set(REGULARIZERS) == set(ELEMENTWISE + GROUP) | {"bn_l1"}
    assert REGULARIZERS["bn_l1"] is REGULARIZERS["l1"] and not is_group("bn_l1")
    assert [is_group(k) for k in ELEMENTWISE] == [False] * 4
    assert [is_group(k) for k in GROUP] == [True] * 3
    with pytest.raises(ValueError, match="valid"):
        is_group("l2")


def test_regularization_sums_and_scales():
    conv = torch.tensor(CONV).reshape(2, 2, 1, 1).requires_grad_(True)
    bias = torch.tensor([1.0, -2.0], requires_grad=True)
    fc = torch.tensor(FC, requires_grad=True)
    r = regularization([conv, bias, fc], "l1", 0.5)
    assert r.dim() == 0 and r.item() == pytest.approx(0.5 * (7 + 3 + 19))
    r = regularization([conv, bias, fc], "hoyer", 2.0)
    assert r.item() == pytest.approx(2.0 * (7 / 5 + 3 / math.sqrt(5) + 19 / 13))
    r = regularization(iter([conv, bias, fc]), "group_lasso", 0.1)  # bias skipped
    assert r.item() == pytest.approx(0.1 * (14 + 36))
    r.backward()
    assert bias.grad is None and conv.grad is not None and fc.grad is not None
    r = regularization([conv, fc], "group_hs", 1.0)
    assert r.item() == pytest.approx(98 / 25 + 650 / 169)
    assert regularization([conv], "l1", 0.0).item() == 0.0


def test_regularization_empty():
    r = regularization([], "l1", 1.0)
    assert r.dim() == 0 and r.item() == 0.0 and r.dtype == torch.float32
    r = regularization([torch.ones(3)], "group_hoyer", 1.0)
    assert r.item() == 0.0


def test_regularization_errors():
    w = [torch.ones(2, 2)]
    with pytest.raises(ValueError, match=r"unknown regularizer kind 'hoyer_sq'.*'hoyer_square'"):
        regularization(w, "hoyer_sq", 1.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="strength"):
            regularization(w, "l1", bad)
    for bad in (True, "1", None, torch.tensor(1.0)):
        with pytest.raises(TypeError, match="strength"):
            regularization(w, "l1", bad)
    with pytest.raises(TypeError, match="iterable"):
        regularization(torch.ones(2, 2), "l1", 1.0)
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        regularization([torch.ones(2), 3.0], "l1", 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        l1(torch.ones(3, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ELEMENTWISE + GROUP)
def test_cuda_zero_safe(kind):
    w = torch.randn(3, 4, 2, 2, device="cuda")
    w[1] = 0.0
    w[:, 2] = 0.0
    ws = [w.requires_grad_(True), torch.zeros(4, 3, device="cuda", requires_grad=True), torch.ones(3, device="cuda")]
    r = regularization(ws, kind, 0.5)
    assert r.device.type == "cuda" and torch.isfinite(r)
    r.backward()
    assert torch.isfinite(ws[0].grad).all() and torch.equal(ws[1].grad, torch.zeros_like(ws[1]))
    ref = regularization([t.detach().cpu() for t in ws], kind, 0.5)
    torch.testing.assert_close(r.detach().cpu(), ref)
