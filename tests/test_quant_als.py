"""pycompress.quant weight_scale "als": MicroNet's alternating-least-squares per-channel scale
against a hand-written loop, all-zero (fully pruned) rows, training with refits once per epoch
(refit_als, the ALSRefit trainer hook), state dicts, QuantSpec, weight_codes and export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from pycompress import backends, export, models, prune
from pycompress.ops import quant_range
from pycompress.quant import (
    ALS_ITERS,
    ALSRefit,
    FakeQuantizer,
    QuantConv2d,
    QuantSpec,
    als_scale,
    apply_plan,
    calibrate,
    prepare_qat,
    qat_modules,
    qat_plan,
    refit_als,
)
from pycompress.quant.quantizer import ZERO_SCALE_STANDIN, kernel_scale
from pycompress.train import Trainer

BACKENDS = backends.available("fake_quantize")


# ------------------------------------------------------------------------------ references
def _round_half_even(v: float) -> float:
    return float(round(v))  # Python's round() is round-half-to-even, as torch.round / rint


def _als_python(row: list, bits: int, iters: int = ALS_ITERS) -> float:
    """MicroNet's ALS on one row, in plain Python floats (double)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    m = max(abs(v) for v in row)
    if m == 0:
        return 0.0
    a = m / 2 ** (bits - 1)
    for _ in range(iters):
        b = [min(max(_round_half_even(v / a), qmin), qmax) for v in row]
        den = sum(x * x for x in b)
        if den == 0:
            break  # degenerate: keep a
        a = sum(v * x for v, x in zip(row, b)) / den
    return a


def _als_rowwise_torch(row: torch.Tensor, bits: int, iters: int = ALS_ITERS) -> torch.Tensor:
    """The same loop one row at a time with torch ops: fp32 codes w * (1/a), fp64 sums, fp32 a."""
    qmin, qmax = quant_range(bits, True)
    row = row.float()
    m = row.abs().max()
    if float(m) == 0:
        return torch.zeros((), dtype=torch.float32)
    a = (m / 2 ** (bits - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    for _ in range(iters):
        b = torch.round(row * torch.reciprocal(a)).clamp(qmin, qmax).double()
        den = (b * b).sum()
        if float(den) == 0:
            break
        a = ((row.double() * b).sum() / den).float().clamp_min(torch.finfo(torch.float32).tiny)
    return a


def _sq_error(row: torch.Tensor, a: float, bits: int) -> float:
    qmin, qmax = quant_range(bits, True)
    r = row.double()
    if a == 0:
        return float((r * r).sum())
    b = torch.round(r / a).clamp(qmin, qmax)
    return float(((r - a * b) ** 2).sum())


def _rows(seed: int, c: int = 6, k: int = 27, pruned: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, k, generator=g) * (torch.rand(c, 1, generator=g) + 0.1)
    if pruned:
        w = w * (torch.rand(c, k, generator=g) > 0.6)
    return w


# ------------------------------------------------------------------------------ als_scale
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("pruned", [False, True])
def test_als_scale_matches_hand_written_loops(bits, pruned):
    w = _rows(bits * 10 + pruned, pruned=pruned)
    a = als_scale(w, bits)
    assert a.dtype == torch.float32 and a.shape == (w.shape[0],)
    for c in range(w.shape[0]):
        ref_t = _als_rowwise_torch(w[c], bits)
        torch.testing.assert_close(a[c], ref_t, rtol=1e-6, atol=0)
        ref_py = _als_python(w[c].tolist(), bits)
        assert math.isclose(float(a[c]), ref_py, rel_tol=1e-5), (c, float(a[c]), ref_py)
    # a 4-d conv weight: one scale per output channel (row of w.reshape(C, -1))
    w4 = w.reshape(w.shape[0], 3, 3, 3)
    assert torch.equal(als_scale(w4, bits), a)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_als_error_never_exceeds_the_init(bits):
    for pruned in (False, True):
        w = _rows(100 + bits, c=16, k=64, pruned=pruned)
        a = als_scale(w, bits)
        a0 = als_scale(w, bits, iters=0)
        torch.testing.assert_close(a0, w.abs().amax(1) / 2 ** (bits - 1))  # MicroNet's init
        for c in range(w.shape[0]):
            e, e0 = _sq_error(w[c], float(a[c]), bits), _sq_error(w[c], float(a0[c]), bits)
            assert e <= e0 * (1 + 1e-6), (c, e, e0)


def test_als_scale_zero_rows_iters_and_errors():
    w = _rows(7)
    w[2] = 0
    a = als_scale(w, 4)
    assert a[2] == 0 and bool(torch.isfinite(a).all()) and bool((a[[0, 1, 3, 4, 5]] > 0).all())
    assert torch.equal(als_scale(torch.zeros(3, 5), 4), torch.zeros(3))
    assert torch.equal(als_scale(torch.zeros(3, 0), 4), torch.zeros(3))
    # deterministic; more iterations than the fixed point needs change nothing
    assert torch.equal(als_scale(w, 4), a) and torch.equal(als_scale(w, 4, iters=1000), a)
    # 1 bit, a row without negative values: every code is 0 (<B, B> = 0), so the init is kept
    pos = torch.tensor([[0.5, 1.0, 0.25]])
    assert torch.equal(als_scale(pos, 1), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="inf or NaN"):
        als_scale(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(ValueError, match="bits"):
        als_scale(w, 0)
    with pytest.raises(ValueError, match="iters"):
        als_scale(w, 4, iters=-1)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        als_scale(torch.tensor(1.0), 4)


# ------------------------------------------------------------------------------ FakeQuantizer
def _wq(bits=4, c=4):
    return FakeQuantizer(bits, signed=True, axis=0, num_channels=c, mode="als", kind="weight")


def test_quantizer_config_checks():
    with pytest.raises(ValueError, match="kind='weight'"):
        FakeQuantizer(4, mode="als", kind="act")
    with pytest.raises(ValueError, match="signed=True"):
        FakeQuantizer(4, signed=False, axis=0, num_channels=2, mode="als", kind="weight")
    with pytest.raises(ValueError, match="observer"):
        FakeQuantizer(4, axis=0, num_channels=2, mode="als", kind="weight", observer="percentile")
    with pytest.raises(ValueError, match="mode 'als' only"):
        FakeQuantizer(4, axis=0, num_channels=2, mode="frozen", kind="weight").refit(torch.randn(2, 3))
    q = _wq()
    with pytest.raises(RuntimeError, match="not initialised"):
        q(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="inf or NaN"):
        q.refit(torch.tensor([[1.0], [2.0], [float("inf")], [0.0]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_row_scale_codes_output_and_gradient(backend):
    w = _rows(3, c=4, k=18).reshape(4, 2, 3, 3)
    w[1] = 0
    q = _wq(4).init_from(w)
    assert q.scale[1] == 0 and bool(torch.isfinite(q.scale).all())
    assert torch.equal(q.scale, als_scale(w, 4))
    wp = w.clone().requires_grad_(True)
    with backends.use(backend):
        y = q(wp)
    assert bool(torch.isfinite(y).all()) and torch.equal(y[1], torch.zeros_like(y[1]))
    (y * torch.randn_like(y)).sum().backward()
    assert bool(torch.isfinite(wp.grad).all())
    # the other rows: scale * clamp(rint(w / scale)), gradient straight through inside the range
    qmin, qmax = quant_range(4, True)
    s = q.scale.view(-1, 1, 1, 1)
    codes = torch.round(w * torch.reciprocal(s)).clamp(qmin, qmax)
    keep = [0, 2, 3]
    assert torch.equal(y[keep], (codes * s)[keep])
    # a scale-0 row is 0 whatever its weights become before the next refit (the a -> 0 limit)
    w2 = w.clone()
    w2[1] = torch.randn(2, 3, 3) * 100
    w2.requires_grad_(True)
    with backends.use(backend):
        y2 = q(w2)
    assert torch.equal(y2[1], torch.zeros_like(y2[1]))
    y2.sum().backward()
    assert torch.equal(w2.grad[1], torch.ones_like(w2.grad[1]))  # straight through: the row can revive


def test_kernel_scale():
    s = torch.tensor([0.0, 0.5, 2.0])
    assert torch.equal(kernel_scale(s), torch.tensor([ZERO_SCALE_STANDIN, 0.5, 2.0]))


def test_state_dict_keeps_the_loaded_scale_and_checks_it():
    w = _rows(5, c=4, k=9)
    w[3] = 0
    q = _wq(4).init_from(w)
    q2 = _wq(4)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.scale, q.scale) and q2.is_calibrated and q2.scale[3] == 0
    # loading never refits: a scale that is not the ALS fit of anything is kept as loaded
    sd = q.state_dict()
    sd["scale"] = torch.tensor([0.1, 0.2, 0.0, 0.3])
    q2.load_state_dict(sd)
    assert torch.equal(q2.scale, sd["scale"])
    for bad in (-0.1, float("nan"), float("inf")):
        sd["scale"] = torch.tensor([0.1, bad, 0.0, 0.3])
        with pytest.raises(ValueError, match=r"loaded scale.*scale\[1\]"):
            _wq(4).load_state_dict(sd)


# ------------------------------------------------------------------------------ layers and QAT
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _prepared(seed=0, zero_row=None):
    torch.manual_seed(seed)
    net = _Net()
    if zero_row is not None:
        keep = torch.ones_like(net.conv.weight, dtype=torch.bool)
        keep[zero_row] = False
        prune.attach_mask(net.conv, keep, "conv")  # a fully pruned output channel
    prepare_qat(net, QuantSpec(weight_bits=4, act_bits=8, weight_scale="als"))
    x = torch.randn(16, 2, 4, 4)
    calibrate(net, [x], 1)
    return net, x


def test_prepare_qat_with_als_initialises_from_the_weight():
    net, x = _prepared(zero_row=2)
    for name, m in qat_modules(net).items():
        assert m.weight_quant.mode == "als" and m.weight_scale == "als"
        assert torch.equal(m.weight_quant.scale, als_scale(m.weight, 4)), name
    assert net.conv.weight_quant.scale[2] == 0
    assert qat_plan(net)["conv"]["weight_scale"] == "als"
    with torch.no_grad():
        y = net(x)
    assert bool(torch.isfinite(y).all())


def test_weight_codes_contract_with_a_zero_row():
    net, _ = _prepared(zero_row=2)
    for m in qat_modules(net).values():
        codes, scale, bits, qmin = m.weight_codes()
        with torch.no_grad():
            qw = m.quantized_weight()
        c = codes.shape[0]
        assert torch.equal(codes.float() * scale.view((c,) + (1,) * (codes.dim() - 1)), qw)
        assert torch.equal(scale, m.weight_quant.scale)
    codes, scale, _, _ = net.conv.weight_codes()
    assert scale[2] == 0 and not bool(codes[2].any())
    # still 0 / 0 after the row's weights moved (before the next refit)
    with torch.no_grad():
        net.conv.weight[2] = 0.3
    codes, scale, _, _ = net.conv.weight_codes()
    assert scale[2] == 0 and not bool(codes[2].any())
    with torch.no_grad():
        assert torch.equal(net.conv.quantized_weight()[2], torch.zeros_like(codes[2], dtype=torch.float32))


def test_training_steps_move_the_weight_not_the_scale_until_refit():
    net, x = _prepared()
    y = torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    s0 = net.conv.weight_quant.scale.clone()
    w0 = net.conv.weight.detach().clone()
    assert not any(p is net.conv.weight_quant.scale for p in net.parameters())  # a buffer
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        g = net.conv.weight.grad
        assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
        opt.step()
        assert torch.equal(net.conv.weight_quant.scale, s0)  # frozen between refits
    assert not torch.equal(net.conv.weight.detach(), w0)
    assert refit_als(net) == 2
    assert not torch.equal(net.conv.weight_quant.scale, s0)
    assert torch.equal(net.conv.weight_quant.scale, als_scale(net.conv.weight, 4))
    assert torch.equal(net.head.weight_quant.scale, als_scale(net.head.weight, 4))


def test_layer_state_dict_round_trip_through_a_plan():
    net, x = _prepared(zero_row=1)
    net.eval()
    fresh = _Net()
    prune.prepare_state_dict(fresh, net.state_dict())
    apply_plan(fresh, qat_plan(net))
    with torch.no_grad():  # move the weight so that a refit on load would show
        fresh.conv.weight.mul_(2)
    fresh.load_state_dict(net.state_dict())
    fresh.eval()
    assert torch.equal(fresh.conv.weight_quant.scale, net.conv.weight_quant.scale)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


def test_quant_spec_round_trip():
    spec = QuantSpec(weight_bits=4, weight_scale="als")
    d = spec.to_dict()
    assert d["weight_scale"] == "als"
    assert QuantSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="weight_scale"):
        QuantSpec(weight_scale="alsx")


def test_refit_als_ignores_other_modes():
    torch.manual_seed(0)
    net = _Net()
    prepare_qat(net, {"weight_bits": 4, "act_bits": None, "weight_scale": "frozen"})
    assert refit_als(net) == 0


# ------------------------------------------------------------------------------ trainer hook
class _Probe:
    """Records the conv's ALS scale and weight at every epoch end (after ALSRefit)."""

    def __init__(self, layer):
        self.layer, self.seen = layer, []

    def on_epoch_end(self, trainer, row):
        self.seen.append((self.layer.weight_quant.scale.clone(), self.layer.weight.detach().clone()))


def _loader(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_als_refit_hook_in_a_trainer_run():
    net, _ = _prepared(zero_row=4)
    scale_at_start = net.conv.weight_quant.scale.clone()
    hook = ALSRefit()
    probe = _Probe(net.conv)
    evals = []

    class _EvalProbe:  # the scale the epoch's evaluation used (hooks run after evaluation)
        def on_epoch_end(self, trainer, row):
            evals.append(net.conv.weight_quant.scale.clone())

    trainer = Trainer(
        net,
        _loader(),
        _loader(1, 16),
        epochs=2,
        optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.9},
        hooks=[prune.Pruner(net, None), _EvalProbe(), hook, probe],
        progress=False,
        log=lambda line: None,
    )
    steps = []
    orig_after_step = hook.after_step

    def after_step(t):  # the scale must stay frozen during the epoch
        steps.append(net.conv.weight_quant.scale.clone())
        orig_after_step(t)

    hook.after_step = after_step
    trainer.fit()
    assert hook.refits == 3 and hook.last_count == 2  # fit start + once per epoch
    (s1, w1), (s2, w2) = probe.seen
    assert torch.equal(s1, als_scale(w1, 4)) and torch.equal(s2, als_scale(w2, 4))
    assert not torch.equal(s1, s2) and not torch.equal(s1, scale_at_start)
    assert s1[4] == 0 and s2[4] == 0 and not bool(w2[4].any())  # the pruned row stays 0 / 0
    # frozen within each epoch (4 steps each): epoch 1 trains with the start scale, epoch 2 with s1
    assert all(torch.equal(s, scale_at_start) for s in steps[:4])
    assert all(torch.equal(s, s1) for s in steps[4:])
    # refit at the epoch's last step, before its evaluation: the eval and the checkpoint agree
    assert torch.equal(evals[0], s1) and torch.equal(evals[1], s2)


def test_als_refit_hook_resume_keeps_the_checkpoint_scale(tmp_path):
    def run(epochs, net):
        return Trainer(
            net,
            _loader(),
            None,
            epochs=epochs,
            optimizer={"name": "sgd", "lr": 0.5},
            hooks=[ALSRefit()],
            progress=False,
            log=lambda line: None,
            out_dir=str(tmp_path),
        )

    net, _ = _prepared()
    t = run(2, net)
    t.fit()
    scale = net.conv.weight_quant.scale.clone()
    fresh, _ = _prepared(seed=1)
    t2 = run(2, fresh)
    hook = t2.hooks[0]
    t2.fit(resume=True)  # complete: nothing to train, nothing refit
    assert hook.refits == 0 and torch.equal(fresh.conv.weight_quant.scale, scale)


def test_als_refit_hook_without_als_layers_does_nothing():
    torch.manual_seed(0)
    net = _Net()
    prepare_qat(net, {"weight_bits": 4, "act_bits": None, "weight_scale": "frozen"})
    scale = net.conv.weight_quant.scale.clone()
    hook = ALSRefit()
    trainer = Trainer(
        net, _loader(), None, epochs=1, optimizer={"name": "sgd", "lr": 0.1}, hooks=[hook], progress=False
    )
    trainer.fit()
    assert hook.refits == 2 and hook.last_count == 0
    assert torch.equal(net.conv.weight_quant.scale, scale)


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_als_on_cuda():
    dev = torch.device("cuda")
    w = _rows(11, c=8, k=72)
    w[3] = 0
    a = als_scale(w.to(dev), 4)
    assert a.device.type == "cuda" and a[3] == 0
    torch.testing.assert_close(a.cpu(), als_scale(w, 4), rtol=1e-6, atol=0)
    w4 = w.reshape(8, 8, 3, 3).to(dev)
    q = _wq(4, c=8).to(dev).init_from(w4)
    assert torch.equal(q.scale, a)
    qmin, qmax = quant_range(4, True)
    s = a.view(-1, 1, 1, 1)
    expect = torch.round(w4 * torch.reciprocal(kernel_scale(s))).clamp(qmin, qmax) * s
    for name in ["auto"] + [b for b in backends.available("fake_quantize") if b in ("cuda", "triton")]:
        x = w4.clone().requires_grad_(True)
        with backends.use(name):
            y = q(x)
            y.sum().backward()
        assert torch.equal(y, expect), name
        assert bool(torch.isfinite(x.grad).all()) and torch.equal(x.grad[3], torch.ones_like(x.grad[3])), name


# ------------------------------------------------------------------------------ export
def _als_student():
    torch.manual_seed(0)
    m = models.build("mobilenet_student", in_channels=1, num_classes=10)
    prune.prune_model(m, {"criterion": "global_magnitude", "sparsity": 0.5})
    name, layer = next((n, mod) for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.groups == 1)
    keep = torch.ones_like(layer.weight, dtype=torch.bool)
    keep[0] = False
    prune.attach_mask(layer, keep & (layer.weight != 0), name)  # one output channel fully pruned
    x = torch.randn(8, 1, 32, 32)
    prepare_qat(m, {"weight_bits": 4, "act_bits": 8, "weight_scale": "als"})
    calibrate(m, [x], 1)
    return m.eval(), x, name


def test_export_round_trip_with_a_zero_scale():
    m, x, name = _als_student()
    layer = dict(m.named_modules())[name]
    assert isinstance(layer, QuantConv2d) and layer.weight_quant.scale[0] == 0
    manifest, payload = export.encode(m, fold_bn=False)
    art = export.decode(manifest, payload)
    loaded = dict(art.named_modules())[name]
    assert loaded.weight_scale[0] == 0 and not bool(loaded.weight_codes[0].any())
    with torch.no_grad():
        assert torch.equal(m(x), art(x))
