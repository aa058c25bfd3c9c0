"""Pruning library: masks on layers, PruneSpec, the Pruner's schedules, masked optimizers, QAT and
size accounting, resume."""

from __future__ import annotations

import copy
import io
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pycompress import backends
from pycompress.ops import pack_mask
from pycompress.prune import (
    MaskedAdam,
    MaskedAdamW,
    MaskedSGD,
    Pruner,
    PruneSpec,
    apply_masks,
    attach_masks,
    build_masked_optimizer,
    drop_shadows,
    get_mask,
    gradual_sparsity,
    has_masks,
    masked_layers,
    prepare_state_dict,
    prune_model,
    remove_masks,
    select_masks,
)
from pycompress.prune import masks as M
from pycompress.train import Trainer


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )


def batches(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def drive(model, pruner, opt, data, epochs=1):
    """The trainer's step sequence, without a Trainer (hooks called in the same order)."""
    tr = types.SimpleNamespace(optimizer=opt, global_step=0, epochs=epochs, steps_per_epoch=len(data), name="t")
    pruner.on_fit_start(tr)
    for _ in range(epochs):
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            extra = pruner.extra_loss(tr)
            if extra is not None:
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            pruner.before_step(tr)
            opt.step()
            pruner.after_step(tr)
            tr.global_step += 1
    return tr


def pruned_zero(model):
    """Every pruned weight is exactly +0.0 (bit pattern), for every masked layer."""
    for n, m in masked_layers(model).items():
        keep = get_mask(m)
        w = m.weight.detach()
        assert torch.equal(w[~keep].view(torch.int32), torch.zeros_like(w[~keep]).view(torch.int32)), n
    return True


# ------------------------------------------------------------------------------ masks on layers
def test_attach_masks_zero_weights_and_keep_classes():
    m = net()
    classes = [type(x) for x in m.modules()]
    mask = torch.rand(6, 1, 3, 3) > 0.5
    attach_masks(m, {"0": mask})
    assert [type(x) for x in m.modules()] == classes
    assert torch.equal(get_mask(m[0]), mask)
    assert m[0].weight_mask.dtype == torch.uint8 and m[0].weight_mask.numel() == 8  # 54 bits -> 2 words
    assert pruned_zero(m) and bool((m[0].weight.detach()[mask] != 0).all())
    assert list(masked_layers(m)) == ["0"] and has_masks(m)
    with pytest.raises(ValueError, match="has shape"):
        attach_masks(m, {"3": mask})
    with pytest.raises(ValueError, match="no layer"):
        attach_masks(m, {"nope": mask})
    with pytest.raises(TypeError, match="bool"):
        attach_masks(m, {"0": mask.float()})
    with pytest.raises(ValueError, match="no weight"):
        attach_masks(m, {"2": mask})


def test_masks_survive_state_dict_deepcopy_and_compile():
    m = net()
    prune_model(m, {"criterion": "global_magnitude", "sparsity": 0.6})
    sd = m.state_dict()
    assert {"0.weight_mask", "3.weight_mask", "6.weight_mask"} <= set(sd)
    fresh = net()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(sd)
    prepare_state_dict(fresh, sd)
    fresh.load_state_dict(sd)
    for n in ("0", "3", "6"):
        assert torch.equal(get_mask(fresh[int(n)]), get_mask(m[int(n)]))
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    again = net()
    sd2 = torch.load(buf, weights_only=True)
    prepare_state_dict(again, sd2)
    again.load_state_dict(sd2)
    dc = copy.deepcopy(m)
    assert torch.equal(get_mask(dc[3]), get_mask(m[3])) and dc[3].weight_mask.data_ptr() != m[3].weight_mask.data_ptr()
    x = torch.randn(2, 1, 8, 8)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x))
    bad = dict(sd)
    bad["0.weight_mask"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a packed mask"):
        prepare_state_dict(net(), bad)


def test_remove_and_drop():
    m = net()
    prune_model(m, {"criterion": "layer_magnitude", "sparsity": 0.5})
    M.set_shadow(m[0], torch.ones_like(m[0].weight))
    assert drop_shadows(m) == 1 and "weight_shadow" not in m[0]._buffers
    zeros = int((m[3].weight == 0).sum())
    assert remove_masks(m) == 3 and not has_masks(m)
    assert int((m[3].weight == 0).sum()) == zeros  # weights keep their zeros


def test_prune_model_global_matches_topk_and_reports():
    m = net()
    ws = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    rep = prune_model(m, {"criterion": "global_magnitude", "sparsity": 0.75, "types": ["conv"]})
    flat = torch.cat([ws["0"].abs().flatten(), ws["3"].abs().flatten()])
    keep = flat.numel() - int(0.75 * flat.numel() + 0.5)  # round half up, as criteria.n_prune
    idx = torch.topk(flat, keep).indices
    want = torch.zeros_like(flat, dtype=torch.bool)
    want[idx] = True
    got = torch.cat([get_mask(m[0]).flatten(), get_mask(m[3]).flatten()])
    assert torch.equal(got, want)
    assert not has_masks(m[6]) and "6" not in masked_layers(m)
    assert rep.selected_sparsity == pytest.approx(1 - keep / flat.numel())
    assert rep.selected_total == flat.numel()


# ------------------------------------------------------------------------------ spec
@pytest.mark.parametrize(
    "spec,msg",
    [
        ({"criterion": "global_magnitude"}, "sparsity: criterion 'global_magnitude' needs"),
        ({"criterion": "magnitude", "sparsity": 0.5}, "criterion: must be one of"),
        ({"criterion": "threshold"}, "threshold: criterion 'threshold' needs"),
        ({"criterion": "threshold", "threshold": 0.1, "sparsity": 0.5}, "does not take a target sparsity"),
        ({"criterion": "global_magnitude", "sparsity": 1.5}, "sparsity: must be <= 1.0"),
        ({"criterion": "random", "sparsity": 0.5, "schedule": "regrow"}, "schedule: 'regrow'"),
        ({"criterion": "std_ratio", "schedule": "gradual"}, "schedule: 'gradual'"),
        ({"criterion": "random", "sparsity": 0.5, "schedule": "gradual"}, "schedule: 'gradual'"),
        ({"criterion": "global_magnitude", "sparsity": 0.5, "update_interval": 5}, "only the regrow and gradual"),
        (
            {"criterion": "global_magnitude", "sparsity": 0.5, "schedule": "gradual", "update_stop": 5},
            "only the regrow schedule",
        ),
        ({"criterion": "global_magnitude", "sparsity": 0.5, "end_step": 5}, "end_step: only the gradual"),
        (
            {"criterion": "global_magnitude", "sparsity": 0.5, "schedule": "gradual", "start_step": 10, "end_step": 5},
            "must be after start_step",
        ),
        (
            {"criterion": "global_magnitude", "sparsity": 0.5, "schedule": "gradual", "initial_sparsity": 0.7},
            "must not exceed sparsity",
        ),
        ({"criterion": "global_magnitude", "sparsity": 0.5, "types": ["bn"]}, "types[0]: must be one of"),
        ({"criterion": "global_magnitude", "sparsity": 0.5, "include": ["("]}, "not a valid regular expression"),
        ({"criterion": "global_magnitude", "sparsity": 0.5, "first": "no"}, "first: must be true"),
        ({"regularizer": "hoyer"}, "needs a strength > 0"),
        ({"regularizer": "hoyerr", "strength": 1.0}, "regularizer: must be one of"),
        ({"strength": 1.0}, "no regularizer is named"),
        ({}, "needs a criterion"),
        ({"criterion": "global_magnitude", "sparsity": 0.5, "sparsty": 0.5}, "sparsty: unknown key"),
    ],
)
def test_spec_errors_name_the_key(spec, msg):
    with pytest.raises(ValueError) as exc:
        PruneSpec.from_dict(spec)
    assert msg in str(exc.value)


def test_spec_selection_and_round_trip():
    m = net()
    assert PruneSpec(criterion="threshold", threshold=0.1).select_layers(m) == ["0", "3", "6"]
    assert PruneSpec(criterion="threshold", threshold=0.1, first=False).select_layers(m) == ["3", "6"]
    assert PruneSpec(criterion="threshold", threshold=0.1, last=False, types=["conv"]).select_layers(m) == ["0"]
    assert PruneSpec(criterion="threshold", threshold=0.1, types=["linear"]).select_layers(m) == ["6"]
    assert PruneSpec(criterion="threshold", threshold=0.1, exclude=["^0$"]).select_layers(m) == ["3", "6"]
    s = PruneSpec(criterion="global_magnitude", sparsity=0.5, schedule="regrow")
    assert s.update_interval == 50
    assert PruneSpec.from_dict(s.to_dict()) == s


def test_gradual_sparsity_formula():
    assert gradual_sparsity(0, 10, 110, 0.0, 0.8) == 0.0
    assert gradual_sparsity(110, 10, 110, 0.0, 0.8) == 0.8
    assert gradual_sparsity(60, 10, 110, 0.1, 0.8) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5**3)
    assert gradual_sparsity(500, 10, 110, 0.1, 0.8) == 0.8


# ------------------------------------------------------------------------------ schedules
OPTIMIZERS = {
    "masked_sgd": lambda m: build_masked_optimizer(
        m, {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": True}
    ),
    "masked_adamw": lambda m: build_masked_optimizer(m, {"name": "adamw", "lr": 1e-2, "weight_decay": 1e-2}),
    "plain_sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
    "plain_adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-3),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_oneshot_keeps_pruned_weights_exactly_zero(opt_name):
    m = net()
    opt = OPTIMIZERS[opt_name](m)
    pr = Pruner(m, {"criterion": "global_magnitude", "sparsity": 0.75})
    tr = drive(m, pr, opt, batches(), epochs=2)
    before = {n: get_mask(l).clone() for n, l in masked_layers(m).items()}
    assert pr.state["sparsity"] == pytest.approx(0.75, abs=1e-3) and pruned_zero(m)
    assert tr.global_step == 24
    drive(m, pr, opt, batches(seed=2))  # already selected: the masks do not change
    assert all(torch.equal(before[n], get_mask(l)) for n, l in masked_layers(m).items()) and pruned_zero(m)
    if isinstance(opt, MaskedSGD):
        assert opt.num_masked == 3
        for l in masked_layers(m).values():  # momentum of pruned weights is 0 too
            buf = opt.state[l.weight]["momentum_buffer"]
            assert bool((buf[~get_mask(l)] == 0).all())


def test_masked_sgd_equals_sgd_then_remask():
    m1, m2 = net(), net()
    spec = {"criterion": "layer_magnitude", "sparsity": 0.5}
    prune_model(m1, spec)
    prune_model(m2, spec)
    o1 = build_masked_optimizer(m1, {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3})
    o1.set_masks({l.weight: l.weight_mask for l in masked_layers(m1).values()})
    o2 = torch.optim.SGD(
        [
            {"params": [p for p in m2.parameters() if p.dim() >= 2], "weight_decay": 1e-3},
            {"params": [p for p in m2.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=0.05,
        momentum=0.9,
    )
    for x, y in batches(6):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        for l in masked_layers(m2).values():
            l.weight.grad.mul_(get_mask(l))
        o1.step()
        o2.step()
        apply_masks(m2)
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_set_masks_rejects_foreign_tensors():
    m = net()
    opt = MaskedSGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not a parameter"):
        opt.set_masks({torch.zeros(3): pack_mask(torch.ones(3, dtype=torch.bool))})
    assert isinstance(MaskedAdam(m.parameters()), torch.optim.Adam)
    assert isinstance(MaskedAdamW(m.parameters()), torch.optim.AdamW)


def test_regrow_matches_a_hand_written_micronet_loop():
    """Dense shadows with straight-through gradients, masks re-selected every 3 steps until step 7."""
    data = batches(10)
    m = net()
    ref = copy.deepcopy(m)
    LR = 0.5
    opt = build_masked_optimizer(
        m, {"name": "sgd", "lr": LR, "momentum": 0.0, "weight_decay": 0.0, "no_bias_decay": False}
    )
    pr = Pruner(
        m,
        {
            "criterion": "global_magnitude",
            "sparsity": 0.7,
            "schedule": "regrow",
            "update_interval": 3,
            "update_stop": 7,
        },
    )
    drive(m, pr, opt, data)
    # the reference: weight = shadow * mask in the forward pass, the shadow takes the dense step
    layers = ["0", "3", "6"]
    mods = dict(ref.named_modules())
    shadow = {n: mods[n].weight.detach().clone() for n in layers}

    def select():
        return select_masks({n: shadow[n] for n in layers}, "global_magnitude", sparsity=0.7)

    masks = select()
    changed = 0
    for t, (x, y) in enumerate(data, start=1):
        with torch.no_grad():
            for n in layers:
                mods[n].weight.copy_(shadow[n] * masks[n])
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for n in layers:  # straight-through: the gradient at shadow * mask steps the dense shadow
                shadow[n] = shadow[n] - LR * mods[n].weight.grad
            for p in ref.parameters():
                p -= LR * p.grad
        if t % 3 == 0 and t < 7:
            new = select()
            changed += sum(int((new[n] != masks[n]).sum()) for n in layers)
            masks = new
    with torch.no_grad():
        for n in layers:
            mods[n].weight.copy_(shadow[n] * masks[n])
    assert changed > 0, "the test should exercise regrowth"
    got = dict(m.named_modules())
    for n in layers:
        assert torch.equal(get_mask(got[n]), masks[n]), n
        torch.testing.assert_close(got[n].weight, mods[n].weight, rtol=1e-5, atol=1e-6)
    assert pr.state["frozen"] and not M.shadowed_layers(m) and pruned_zero(m)
    assert pr.state["updates"] == 3  # start + steps 3 and 6


def test_regrow_without_stop_keeps_shadows_until_the_last_step():
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    pr = Pruner(m, {"criterion": "layer_magnitude", "sparsity": 0.5, "schedule": "regrow", "update_interval": 2})
    data = batches(5)
    tr = types.SimpleNamespace(optimizer=opt, global_step=0, epochs=2, steps_per_epoch=5, name="t")
    pr.on_fit_start(tr)
    assert len(M.shadowed_layers(m)) == 3
    drive(m, pr, opt, data, epochs=2)  # total 10 steps: frozen after the last one
    assert pr.state["frozen"] and not M.shadowed_layers(m) and pruned_zero(m)


def test_gradual_reaches_the_target_on_schedule():
    m = net()
    opt = build_masked_optimizer(m, {"name": "sgd", "lr": 0.05})
    pr = Pruner(
        m,
        {
            "criterion": "global_magnitude",
            "sparsity": 0.8,
            "schedule": "gradual",
            "update_interval": 2,
            "start_step": 2,
            "end_step": 8,
        },
    )
    seen = []
    orig = pr.after_step

    def spy(tr):
        orig(tr)
        seen.append(pr.state["sparsity"])

    pr.after_step = spy
    drive(m, pr, opt, batches(12))
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(0.8, abs=1e-3)
    assert seen[3] == pytest.approx(gradual_sparsity(4, 2, 8, 0.0, 0.8), abs=2e-3)
    assert all(b >= a - 1e-9 for a, b in zip(seen, seen[1:]))
    assert pruned_zero(m)


def test_regularizer_only_adds_loss_and_no_masks():
    m = net()
    pr = Pruner(m, {"regularizer": "hoyer_square", "strength": 1e-3, "types": ["linear"]})
    tr = types.SimpleNamespace(optimizer=None, global_step=0, epochs=1, steps_per_epoch=1, name="t")
    pr.on_fit_start(tr)
    w = m[6].weight
    want = 1e-3 * w.abs().sum() ** 2 / (w**2).sum()
    torch.testing.assert_close(pr.extra_loss(tr), want)
    assert not has_masks(m)


def test_pruner_without_spec_keeps_existing_masks():
    m = net()
    prune_model(m, {"criterion": "global_magnitude", "sparsity": 0.5})
    pr = Pruner(m)
    assert pr.layers == ["0", "3", "6"]
    drive(m, pr, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), batches(4))
    assert pruned_zero(m)


def test_no_layer_matched_is_an_error():
    with pytest.raises(ValueError, match="no layer matched"):
        Pruner(net(), {"criterion": "global_magnitude", "sparsity": 0.5, "include": ["nothing"]})


# ------------------------------------------------------------------------------ with the Trainer
def _loader():
    x = torch.randn(48, 1, 8, 8)
    y = torch.randint(0, 5, (48,))
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator()
    )


@pytest.mark.parametrize(
    "schedule",
    [
        {"criterion": "global_magnitude", "sparsity": 0.75, "schedule": "regrow", "update_interval": 2},
        {"criterion": "layer_magnitude", "sparsity": 0.6, "schedule": "gradual", "update_interval": 2},
    ],
)
def test_trainer_resume_is_bit_identical(tmp_path, schedule):
    loader = _loader()

    class Crash(Exception):
        pass

    class CrashInThirdEpoch:
        def on_epoch_end(self, trainer, row):
            if trainer.epoch == 2:  # before epoch 3's checkpoint is written
                raise Crash()

    def make(out, extra=()):
        m = net()
        opt = build_masked_optimizer(m, {"name": "sgd", "lr": 0.05, "momentum": 0.9})
        return Trainer(
            m,
            loader,
            loader,
            epochs=3,
            optimizer=opt,
            hooks=[Pruner(m, schedule), *extra],
            out_dir=out,
            progress=False,
            log=lambda s: None,
            name="p",
        ), m

    full, m_full = make(str(tmp_path / "a"))
    full.fit()
    crashing, _ = make(str(tmp_path / "b"), [CrashInThirdEpoch()])
    with pytest.raises(Crash):
        crashing.fit()
    again, m_again = make(str(tmp_path / "b"))
    again.fit(resume=True)
    assert again.epoch == 3 and len(again.history) == 3
    a, b = m_full.state_dict(), m_again.state_dict()
    assert a.keys() == b.keys() and any(k.endswith("weight_mask") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.history[-1]["sparsity"] == again.history[-1]["sparsity"]


# ------------------------------------------------------------------------------ QAT and size
def test_pruning_composes_with_qat_and_size_counts_masks():
    from pycompress.quant import calibrate, model_size, prepare_qat

    m = net()
    prune_model(m, {"criterion": "global_magnitude", "sparsity": 0.75})
    dense_bits = model_size(net())["bits"]
    size = model_size(m)
    assert size["bits"] < dense_bits
    nz = int((m[3].weight != 0).sum())
    assert size["layers"]["3"]["bits"] == m[3].weight.numel() + 32 * nz + 32 * m[3].bias.numel()
    prepare_qat(m, {"weight_bits": 4, "act_bits": 8})
    assert has_masks(m) and type(m[3]).__name__ == "QuantConv2d"
    calibrate(m, [(x, y) for x, y in batches(2)], num_batches=2)
    wq = m[3].quantized_weight()
    assert bool((wq[~get_mask(m[3])] == 0).all())
    q = model_size(m)["layers"]["3"]
    nz_codes = int(torch.count_nonzero(m[3].weight_codes()[0]))  # a kept weight may round to code 0
    assert 0 < nz_codes <= nz
    assert q["bits"] == m[3].weight.numel() + 4 * nz_codes + 32 * 8 + 32 + 32 * 8  # mask + codes + scales + act + bias
    pr = Pruner(m)  # a QAT stage of a pruned model keeps the masks
    opt = build_masked_optimizer(m, {"name": "sgd", "lr": 0.05})
    drive(m, pr, opt, batches(3))
    assert pruned_zero(m)


def test_backend_reference_and_auto_give_the_same_training():
    outs = []
    for b in ("reference", "auto"):
        m = net()
        with backends.use(b):
            opt = build_masked_optimizer(m, {"name": "sgd", "lr": 0.05, "momentum": 0.9})
            drive(m, Pruner(m, {"criterion": "global_magnitude", "sparsity": 0.5}), opt, batches(4))
        outs.append(m.state_dict())
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-6)
