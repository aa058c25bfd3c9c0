import math

import pytest
import torch

from pycompress.prune import criteria as C
from pycompress.prune.criteria import (
    CRITERIA,
    channel_norm,
    filter_norm,
    global_magnitude,
    layer_magnitude,
    mask_sparsity,
    random,
    select_masks,
    std_ratio,
    threshold,
)


def _rand_weights():
    return {
        "conv1.weight": torch.randn(4, 3, 3, 3),
        "conv2.weight": torch.randn(8, 4, 3, 3),
        "fc.weight": torch.randn(10, 8),
    }


def _topk_reference(weights, sparsity):
    flat = torch.cat([w.abs().reshape(-1) for w in weights.values()])
    n = flat.numel()
    k_keep = n - int(math.floor(sparsity * n + 0.5))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.topk(flat, k_keep).indices] = True
    out, off = {}, 0
    for name, w in weights.items():
        out[name] = keep[off : off + w.numel()].reshape(w.shape)
        off += w.numel()
    return out


def _assert_masks_equal(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == torch.bool
        assert a[name].shape == b[name].shape
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------ global magnitude
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.75, 0.9, 0.333])
def test_global_matches_topk(sparsity):
    w = _rand_weights()
    before = {k: v.clone() for k, v in w.items()}
    masks = global_magnitude(w, sparsity)
    _assert_masks_equal(masks, _topk_reference(w, sparsity))
    n = sum(v.numel() for v in w.values())
    assert mask_sparsity(masks) == math.floor(sparsity * n + 0.5) / n
    for k in w:  # inputs untouched
        assert torch.equal(w[k], before[k])


def test_global_ties_are_pruned():
    w = {"a": torch.tensor([1.0, -2.0, 2.0, 3.0]), "b": torch.tensor([[2.0, -0.5], [4.0, 2.0]])}
    # |w| sorted: 0.5 1 2 2 2 2 3 4; n = 8, sparsity 0.3 -> k = floor(2.9) = 2, t = 1.0: exact
    m = global_magnitude(w, 0.3)
    assert m["a"].tolist() == [False, True, True, True]
    assert m["b"].tolist() == [[True, False], [True, True]]
    # sparsity 0.4 -> k = floor(3.7) = 3, t = 2 -> all four 2s pruned: achieved 6/8 >= 0.4
    m = global_magnitude(w, 0.4)
    assert m["a"].tolist() == [False, False, False, True]
    assert m["b"].tolist() == [[False, False], [True, False]]
    assert mask_sparsity(m) == 6 / 8 >= 0.4


def test_global_rounding_half_up():
    w = {"a": torch.arange(1.0, 11.0)}  # n = 10
    assert (~global_magnitude(w, 0.25)["a"]).sum() == 3  # 2.5 -> 3 (Python round would give 2)
    assert (~global_magnitude(w, 0.04)["a"]).sum() == 0  # 0.4 -> 0
    assert (~global_magnitude(w, 0.05)["a"]).sum() == 1  # 0.5 -> 1


def test_global_sparsity_zero_and_one():
    w = _rand_weights()
    w["fc.weight"][0, 0] = 0.0
    m0 = global_magnitude(w, 0)
    assert all(m.all() for m in m0.values())  # zeros kept too at sparsity 0
    m1 = global_magnitude(w, 1)
    assert not any(m.any() for m in m1.values())
    assert mask_sparsity(m1) == 1.0


def test_global_empty_and_empty_tensor():
    assert global_magnitude({}, 0.5) == {}
    m = global_magnitude({"e": torch.empty(0, 3), "a": torch.tensor([1.0, 2.0])}, 0.5)
    assert m["e"].shape == (0, 3) and m["e"].dtype == torch.bool
    assert m["a"].tolist() == [False, True]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_global_dtypes(dtype):
    w = {k: v.to(dtype) for k, v in _rand_weights().items()}
    masks = global_magnitude(w, 0.6)
    ref = global_magnitude({k: v.double() for k, v in w.items()}, 0.6)  # values exact in float64
    _assert_masks_equal(masks, ref)
    assert mask_sparsity(masks) >= 0.6 - 1e-12


# ------------------------------------------------------------------------------- layer magnitude
def test_layer_magnitude_per_tensor():
    w = _rand_weights()
    m = layer_magnitude(w, 0.5)
    for name, t in w.items():
        ref = _topk_reference({name: t}, 0.5)[name]
        assert torch.equal(m[name], ref)
    m2 = layer_magnitude(w, {"conv1.weight": 0.0, "conv2.weight": 1.0, "fc.weight": 0.25})
    assert m2["conv1.weight"].all()
    assert not m2["conv2.weight"].any()
    assert (~m2["fc.weight"]).sum() == 20
    assert torch.equal(m2["fc.weight"], _topk_reference({"f": w["fc.weight"]}, 0.25)["f"])


def test_layer_magnitude_ties():
    m = layer_magnitude({"a": torch.tensor([1.0, 1.0, 1.0, 2.0])}, 0.25)  # k = 1, t = 1
    assert m["a"].tolist() == [False, False, False, True]


def test_layer_magnitude_mapping_errors():
    w = _rand_weights()
    with pytest.raises(ValueError, match="fc.weight"):
        layer_magnitude(w, {"conv1.weight": 0.5, "conv2.weight": 0.5})
    with pytest.raises(ValueError, match="typo"):
        layer_magnitude(w, {"conv1.weight": 0.5, "conv2.weight": 0.5, "fc.weight": 0.5, "typo": 0.1})
    with pytest.raises(ValueError, match=r"sparsity\['fc.weight'\]"):
        layer_magnitude(w, {"conv1.weight": 0.5, "conv2.weight": 0.5, "fc.weight": 2.0})


# ------------------------------------------------------------------------------------ thresholds
def test_threshold_by_hand():
    w = {"a": torch.tensor([[0.1, -0.2], [0.3, -0.05]]), "b": torch.tensor([0.2, 0.0])}
    m = threshold(w, 0.2)
    assert m["a"].tolist() == [[False, True], [True, False]]  # |w| == value is kept
    assert m["b"].tolist() == [True, False]
    assert all(v.all() for v in threshold(w, 0).values())


def test_std_ratio_by_hand():
    w = {"a": torch.tensor([1.0, -2.0, 3.0, -4.0]), "one": torch.tensor([1e-9])}
    std = torch.tensor([1.0, -2.0, 3.0, -4.0]).std().item()  # unbiased: sqrt(29 / 3) = 3.1091
    assert std == pytest.approx(3.1091263510296048, rel=1e-6)
    m = std_ratio(w, ratio=0.7)  # t = 2.1764
    assert m["a"].tolist() == [False, False, True, True]
    assert m["one"].tolist() == [True]  # 1 element: std 0 -> kept
    m = std_ratio(w)  # default 0.25 -> t = 0.777: all kept
    assert m["a"].all()
    m = std_ratio({"a": torch.tensor([0.0, 0.0, 1.0, -1.0])})  # std = 0.8165, t = 0.204
    assert m["a"].tolist() == [False, False, True, True]


# ---------------------------------------------------------------------------------------- random
def test_random_exact_count_and_reproducible():
    w = _rand_weights()
    g1 = torch.Generator().manual_seed(123)
    g2 = torch.Generator().manual_seed(123)
    m1 = random(w, 0.3, generator=g1)
    m2 = random(w, 0.3, generator=g2)
    _assert_masks_equal(m1, m2)
    for name, t in w.items():
        assert int((~m1[name]).sum()) == math.floor(0.3 * t.numel() + 0.5)
        assert m1[name].shape == t.shape
    m3 = random(w, 0.3, generator=torch.Generator().manual_seed(7))
    assert any(not torch.equal(m1[k], m3[k]) for k in w)
    assert all(v.all() for v in random(w, 0.0).values())
    assert not any(v.any() for v in random(w, 1.0).values())
    with pytest.raises(TypeError, match="generator"):
        random(w, 0.3, generator=123)


# ------------------------------------------------------------------------------------ structured
def test_filter_norm_by_hand():
    # 4 filters of a (4, 2, 1, 1) conv: L2 norms 5, 1, 3, 1 -> prune 2 -> filters 1 and 3
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -3.0], [0.0, 1.0]]).reshape(4, 2, 1, 1)
    m = filter_norm({"c": w}, 0.5)["c"]
    assert m.shape == w.shape
    assert m.reshape(4, 2).tolist() == [[True, True], [False, False], [True, True], [False, False]]
    # 0.25 -> 1 filter: tie between 1 and 3 -> lower index pruned
    m = filter_norm({"c": w}, 0.25)["c"]
    assert m.reshape(4, 2).all(dim=1).tolist() == [True, False, True, True]
    # p = 1: norms 7, 1, 3, 1 ; p = inf: 4, 1, 3, 1
    m = filter_norm({"c": w}, 0.75, p=1)["c"]
    assert m.reshape(4, 2).all(dim=1).tolist() == [True, False, False, False]
    m = filter_norm({"c": w}, 0.75, p=float("inf"))["c"]
    assert m.reshape(4, 2).all(dim=1).tolist() == [True, False, False, False]


def test_channel_norm_by_hand():
    # FC (2, 3): column L2 norms 1, 5, 0.5 -> prune 1 (sparsity 0.3 -> floor(1.4) = 1): column 2
    w = torch.tensor([[1.0, 3.0, 0.5], [0.0, -4.0, 0.0]])
    m = channel_norm({"fc": w}, 0.3)["fc"]
    assert m.tolist() == [[True, True, False], [True, True, False]]
    m = channel_norm({"fc": w}, 0.5)["fc"]  # floor(2.0) = 2: columns 2 and 0
    assert m.tolist() == [[False, True, False], [False, True, False]]


def test_structured_whole_slices_random():
    w = {"conv": torch.randn(8, 6, 3, 3), "fc": torch.randn(5, 7)}
    fm = filter_norm(w, 0.5)
    cm = channel_norm(w, 0.5)
    for name, t in w.items():
        f = fm[name].flatten(1)
        assert (f.all(dim=1) | ~f.any(dim=1)).all()  # each filter all kept or all pruned
        assert int((~f.all(dim=1)).sum()) == math.floor(0.5 * t.shape[0] + 0.5)
        c = cm[name].transpose(0, 1).flatten(1)
        assert (c.all(dim=1) | ~c.any(dim=1)).all()
        assert int((~c.all(dim=1)).sum()) == math.floor(0.5 * t.shape[1] + 0.5)
        norms = t.transpose(0, 1).flatten(1).norm(dim=1)
        pruned = ~c.all(dim=1)
        assert norms[pruned].max() <= norms[~pruned].min()


def test_structured_rejects_1d():
    with pytest.raises(ValueError, match="bias"):
        filter_norm({"w": torch.randn(3, 3), "bias": torch.randn(3)}, 0.5)
    with pytest.raises(ValueError, match="bias"):
        channel_norm({"bias": torch.randn(3)}, 0.5)
    with pytest.raises(ValueError, match="p must be > 0"):
        filter_norm({"w": torch.randn(3, 3)}, 0.5, p=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["layer_magnitude", "threshold", "std_ratio", "filter_norm", "channel_norm"])
def test_dtypes_match_float64(dtype, name):
    params = {"threshold": {"value": 0.5}}.get(name, {"sparsity": 0.5} if name != "std_ratio" else {})
    w = {k: v.to(dtype) for k, v in _rand_weights().items()}
    masks = select_masks(w, name, **params)
    ref = select_masks({k: v.double() for k, v in w.items()}, name, **params)
    if name == "std_ratio" and dtype != torch.float64:
        # std is computed in float32 vs float64: compare away from the threshold only
        for k, v in w.items():
            t = 0.25 * v.double().std()
            far = (v.double().abs() - t).abs() > 1e-5
            assert torch.equal(masks[k][far], ref[k][far])
    else:
        _assert_masks_equal(masks, ref)
    for k, v in w.items():
        assert masks[k].dtype == torch.bool and masks[k].device == v.device


# ------------------------------------------------------------------------------ registry & errors
def test_registry_and_dispatch():
    assert set(CRITERIA) == {
        "global_magnitude",
        "layer_magnitude",
        "threshold",
        "std_ratio",
        "random",
        "filter_norm",
        "channel_norm",
    }
    w = _rand_weights()
    _assert_masks_equal(select_masks(w, "global_magnitude", sparsity=0.5), global_magnitude(w, 0.5))
    _assert_masks_equal(select_masks(w, "std_ratio"), std_ratio(w))
    g = torch.Generator().manual_seed(0)
    _assert_masks_equal(
        select_masks(w, "random", sparsity=0.5, generator=g), random(w, 0.5, torch.Generator().manual_seed(0))
    )
    with pytest.raises(ValueError, match="unknown criterion 'magnitude'.*global_magnitude"):
        select_masks(w, "magnitude", sparsity=0.5)
    with pytest.raises(TypeError, match="value"):
        select_masks(w, "threshold")
    with pytest.raises(TypeError, match="sparsity"):
        select_masks(w, "threshold", value=0.1, sparsity=0.5)
    with pytest.raises(TypeError, match="criterion must be a str"):
        select_masks(w, None)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_sparsity_value(bad):
    w = _rand_weights()
    for fn in (global_magnitude, layer_magnitude, random, filter_norm, channel_norm):
        with pytest.raises(ValueError, match="sparsity"):
            fn(w, bad)


@pytest.mark.parametrize("bad", [True, "0.5", None, torch.tensor(0.5), 1j])
def test_bad_sparsity_type(bad):
    with pytest.raises(TypeError, match="sparsity"):
        global_magnitude(_rand_weights(), bad)


def test_bad_other_inputs():
    with pytest.raises(TypeError, match=r"weights\['b'\] must be a torch.Tensor"):
        global_magnitude({"a": torch.randn(3), "b": [1.0, 2.0]}, 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        threshold({"a": torch.arange(3)}, 0.5)
    with pytest.raises(TypeError, match="Mapping"):
        global_magnitude([torch.randn(3)], 0.5)
    with pytest.raises(ValueError, match="value"):
        threshold(_rand_weights(), -1.0)
    with pytest.raises(ValueError, match="ratio"):
        std_ratio(_rand_weights(), float("nan"))
    for fn in CRITERIA.values():  # empty mapping is fine
        assert fn({}, **({"value": 0.1} if fn is threshold else {} if fn is std_ratio else {"sparsity": 0.5})) == {}


def test_mask_sparsity():
    assert mask_sparsity({}) == 0.0
    assert mask_sparsity({"e": torch.ones(0, dtype=torch.bool)}) == 0.0
    m = {"a": torch.tensor([True, False, False, True]), "b": torch.tensor([[False, True]])}
    assert mask_sparsity(m) == 3 / 6
    assert mask_sparsity({"f": torch.tensor([1.0, 0.0])}) == 0.5
    with pytest.raises(TypeError):
        mask_sparsity({"a": 1})


def test_n_prune_half_up():
    assert C.n_prune(0.5, 5) == 3
    assert C.n_prune(0.25, 10) == 3
    assert C.n_prune(0.0, 10) == 0 and C.n_prune(1.0, 10) == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_cuda_matches_cpu(name):
    params = {"threshold": {"value": 0.5}, "std_ratio": {}}.get(name, {"sparsity": 0.7})
    w = _rand_weights()
    wc = {k: v.cuda() for k, v in w.items()}
    if name == "random":
        mc = random(wc, 0.7, generator=torch.Generator().manual_seed(1))
        ref = random(w, 0.7, generator=torch.Generator().manual_seed(1))
    else:
        mc = select_masks(wc, name, **params)
        ref = select_masks(w, name, **params)
    for k in w:
        assert mc[k].device.type == "cuda" and mc[k].dtype == torch.bool
    if name == "std_ratio":
        for k, v in w.items():  # std may differ in the last bit between devices
            far = (v.abs() - 0.25 * v.std()).abs() > 1e-5
            assert torch.equal(mc[k].cpu()[far], ref[k][far])
    else:
        _assert_masks_equal({k: v.cpu() for k, v in mc.items()}, ref)
