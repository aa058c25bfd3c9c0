"""The .pcz artifact: codecs, round trips per encoding and per zoo model, size accounting, bad files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn

from pycompress import export, models, prune, quant
from pycompress.export import format as fmt
from pycompress.ops import pack_mask, quant_range


# ------------------------------------------------------------------------------ helpers
def _randomize_bn(model: nn.Module, seed: int = 0, negative_gamma: bool = True) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            lo = -1.5 if negative_gamma else 0.5
            m.weight.data.copy_(torch.rand(c, generator=g) * (1.5 - lo) + lo)
            m.bias.data.copy_((torch.rand(c, generator=g) - 0.5) * 0.4)


def _student(qat=True, pruned=False, wbits=4, abits=8, seed=0, **spec):
    torch.manual_seed(seed)
    m = models.build("mobilenet_student", in_channels=1, num_classes=10)
    _randomize_bn(m, seed)
    if pruned:
        prune.prune_model(m, {"criterion": "global_magnitude", "sparsity": 0.75})
    x = torch.randn(16, 1, 32, 32)
    if qat:
        quant.prepare_qat(
            m,
            {"weight_bits": wbits, "act_bits": abits, "first": {"weight_bits": 8}, "last": {"weight_bits": 8}, **spec},
        )
        quant.calibrate(m, [x], 1)
    return m.eval(), x


def _roundtrip(model, **kw):
    manifest, payload = export.encode(model, **kw)
    return export.decode(manifest, payload), manifest, payload


def _write(tmp_path, model, name="m.pcz", **kw):
    path = str(tmp_path / name)
    export.save(model, path, **kw)
    return path


# ------------------------------------------------------------------------------ codecs
@pytest.mark.parametrize("bits", list(range(1, 17)))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [0, 1, 7, 33, 257])
def test_pack_codes_roundtrip(bits, signed, n):
    qmin, qmax = quant_range(bits, signed)
    rng = np.random.default_rng(bits * 100 + n)
    codes = rng.integers(qmin, qmax + 1, size=n)
    if n:
        codes[0], codes[-1] = qmin, qmax
    data = fmt.pack_codes(codes, bits, qmin)
    assert len(data) == fmt.code_bytes(n, bits)
    assert np.array_equal(fmt.unpack_codes(data, n, bits, qmin), codes)


def test_pack_codes_layout():
    # 4-bit: two per byte, low nibble first, offset by qmin; 8-bit: plain int8; 16-bit: int16 LE
    assert fmt.pack_codes(np.array([-8, 7, 0]), 4, -8) == bytes([0x0 | (15 << 4), 8])
    assert fmt.pack_codes(np.array([-128, 127, -1]), 8, -128) == struct.pack("<3b", -128, 127, -1)
    assert fmt.pack_codes(np.array([-300, 5]), 16, -32768) == struct.pack("<2h", -300, 5)
    # 3-bit: element i in bits [3i, 3i+3), least significant first
    assert fmt.pack_codes(np.array([1, 2, 3]), 3, 0) == bytes([0b11010001, 0b0])
    with pytest.raises(ValueError, match="outside"):
        fmt.pack_codes(np.array([8]), 4, -8)


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 1000])
def test_pack_bool_is_the_project_mask_layout(n):
    keep = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.6
    assert fmt.pack_bool(keep.numpy()) == pack_mask(keep).numpy().tobytes()
    assert np.array_equal(fmt.unpack_bool(fmt.pack_bool(keep.numpy()), n), keep.numpy())


# ------------------------------------------------------------------------------ QAT round trips
@pytest.mark.parametrize("encoding", ["pcz", "fp16", "uint8"])
def test_qat_student_unfolded_is_exact(encoding):
    m, x = _student()
    art, manifest, _ = _roundtrip(m, fold_bn=False, encoding=encoding)
    with torch.no_grad():
        y0, y1 = m(x), art(x)
    if encoding == "pcz":
        assert torch.equal(y0, y1)  # codes * scale is the QAT layer's own fp32 product
    else:
        assert (y0.argmax(1) == y1.argmax(1)).float().mean() >= 0.9
    assert manifest["bn_folding"]["folded"] == 0


def test_qat_codes_identical_to_the_layers_fake_quantization():
    m, x = _student(wbits=3)
    art, manifest, _ = _roundtrip(m)
    qat = quant.qat_modules(m)
    loaded = dict(art.named_modules())
    for name, layer in qat.items():
        wq = layer.weight_quant
        w = layer.weight.detach()
        with torch.no_grad():
            fq = wq(w)  # the forward's fake-quantized weight
        scale = wq.scale.detach()
        codes = torch.round(w.reshape(w.shape[0], -1) * torch.reciprocal(scale)[:, None]).reshape(w.shape)
        assert torch.equal(codes * scale.view(-1, *[1] * (w.dim() - 1)), fq)
        assert torch.equal(loaded[name].weight_codes.to(torch.float32), codes), name
        qmin, qmax = quant_range(wq.bits, True)
        assert int(loaded[name].weight_codes.min()) >= qmin and int(loaded[name].weight_codes.max()) <= qmax


def test_qat_folded_bn_close_and_smaller():
    m, x = _student()
    art, manifest, payload = _roundtrip(m)
    _, _, payload_unfolded = _roundtrip(m, fold_bn=False)
    assert manifest["bn_folding"]["folded"] == 8
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in art.modules())
    with torch.no_grad():
        y0, y1 = m(torch.randn(64, 1, 32, 32)), art(torch.randn(64, 1, 32, 32))
        x2 = torch.randn(64, 1, 32, 32)
        y0, y1 = m(x2), art(x2)
    assert torch.allclose(y0, y1, rtol=1e-3, atol=1e-3 * float(y0.abs().max()))
    assert (y0.argmax(1) == y1.argmax(1)).float().mean() >= 0.95
    # BN folded: 4 fp32 tensors per channel gone, a bias per folded conv kept (1024 BN channels)
    assert len(payload_unfolded) - len(payload) == 1024 * 16


@pytest.mark.parametrize("wbits", [1, 2, 8, 16])
def test_other_weight_widths(wbits):
    m, x = _student(wbits=wbits)
    art, manifest, _ = _roundtrip(m, fold_bn=False)
    with torch.no_grad():
        assert torch.equal(m(x), art(x))
    recs = {r["name"]: r for r in manifest["tensors"]}
    assert recs["cnn.2.3.weight_codes"]["bits"] == wbits


def test_lsq_and_frozen_scales_and_4bit_activations():
    for spec in ({"weight_scale": "lsq", "act_scale": "lsq"}, {"weight_scale": "frozen"}):
        m, x = _student(abits=4, **spec)
        with torch.no_grad():  # move LSQ scales off their initial values
            for mod in quant.qat_modules(m).values():
                if isinstance(mod.weight_quant.scale, nn.Parameter):
                    mod.weight_quant.scale.mul_(1.1)
        art, _, _ = _roundtrip(m, fold_bn=False)
        with torch.no_grad():
            assert torch.equal(m(x), art(x))


def test_pruned_4bit_is_sparse_and_matches_model_size():
    m, x = _student(pruned=True)
    art, manifest, payload = _roundtrip(m)
    recs = {r["name"]: r for r in manifest["tensors"]}
    sparse = [r for r in manifest["tensors"] if r.get("sparse")]
    assert len(sparse) >= 8
    for name, layer in quant.qat_modules(m).items():  # sparse exactly where a mask + nonzeros is smaller
        r, codes = recs[f"{name}.weight_codes"], dict(art.named_modules())[name].weight_codes
        n, nnz, b = codes.numel(), int(torch.count_nonzero(codes)), r["bits"]
        assert bool(r.get("sparse")) == (n + nnz * b < n * b), name
    r = next(r for r in sparse if r["bits"] == 4)
    n = int(np.prod(r["shape"]))
    assert r["len"] == fmt.mask_bytes(n) + fmt.code_bytes(r["nnz"], 4) and r["nnz"] < 0.75 * n
    with torch.no_grad():
        assert (m(x).argmax(1) == art(x).argmax(1)).float().mean() >= 0.9
    # the payload encodes exactly what model_size counts (BN folded), up to per-tensor rounding
    size = quant.model_size(m, fold_bn=True)
    assert manifest["size"]["bits"] == size["bits"]
    assert 0 <= len(payload) - size["bits"] / 8 <= 4 * len(manifest["tensors"])
    _, manifest_unfolded, _ = _roundtrip(m, fold_bn=False)
    assert manifest_unfolded["size"]["bits"] == quant.model_size(m)["bits"]


def test_file_bytes_accounting(tmp_path):
    m, _ = _student(pruned=True)
    path = _write(tmp_path, m)
    art = export.read(path)
    f = art.facts
    assert f["file_bytes"] == os.path.getsize(path) == 56 + f["manifest_bytes"] + f["payload_bytes"]
    assert f["overhead_bytes"] == 56 + f["manifest_bytes"]
    assert f["manifest_bytes"] < 4000  # the compressed manifest of the student


# ------------------------------------------------------------------------------ zoo models
ZOO = [
    ("lenet300", {}, (1, 28, 28)),
    ("lenet5", {"input_size": 28}, (1, 28, 28)),
    ("mobilenet_student", {}, (3, 32, 32)),
    ("resnet20", {}, (3, 32, 32)),
    ("preresnet", {"depth": 20}, (3, 32, 32)),
    ("densenet_bc", {"depth": 40, "growth_rate": 6}, (3, 32, 32)),
    ("wrn", {"depth": 10, "widen_factor": 1}, (3, 32, 32)),
    ("vgg11_bn", {}, (3, 32, 32)),
    ("resnet18", {}, (3, 32, 32)),
]


@pytest.mark.parametrize("name,kwargs,shape", ZOO, ids=[z[0] for z in ZOO])
@pytest.mark.parametrize("qat", [False, True], ids=["float", "qat4"])
def test_zoo_roundtrip(name, kwargs, shape, qat):
    m = models.build(name, in_channels=shape[0], num_classes=10, **kwargs)
    _randomize_bn(m, negative_gamma=False)
    x = torch.randn(4, *shape)
    if qat:
        quant.prepare_qat(m, {"weight_bits": 4, "act_bits": 8})
        quant.calibrate(m, [x], 1)
    m.eval()
    art, manifest, _ = _roundtrip(m)
    with torch.no_grad():
        y0, y1 = m(x), art(x)
    tol = 1e-4 * float(y0.abs().max()) + 1e-5
    if qat:  # a folded BN may move an activation across a rounding boundary: compare predictions
        assert (y0.argmax(1) == y1.argmax(1)).float().mean() >= 0.75
        art2, _, _ = _roundtrip(m, fold_bn=False)
        with torch.no_grad():
            assert torch.equal(art2(x), y0)
    else:
        assert torch.allclose(y0, y1, rtol=1e-4, atol=tol), float((y0 - y1).abs().max())
    has_bn = any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert (manifest["bn_folding"]["folded"] > 0) == has_bn


def test_fold_pairs_follow_the_graph():
    pairs, why = export.bn_fold_pairs(models.build("mobilenet_student", in_channels=1, num_classes=10))
    assert why is None and pairs == {f"cnn.{i}.1": f"cnn.{i}.0" for i in range(8)}
    # pre-activation: BN before conv, nothing to fold into except the bottleneck's inner conv
    pre, _ = export.bn_fold_pairs(models.build("preresnet", in_channels=3, num_classes=10, depth=20))
    resnet, _ = export.bn_fold_pairs(models.build("resnet20", in_channels=3, num_classes=10))
    assert len(resnet) == 21 and resnet["bn1"] == "conv1" and resnet["layer1.0.bn2"] == "layer1.0.conv2"
    assert len(pre) < len(resnet)


def test_untraceable_model_folds_nothing():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.bn(self.conv(x))
            return self.bn(self.conv(-x))

    pairs, why = export.bn_fold_pairs(Branchy())
    assert pairs == {} and "could not trace" in why


def test_hw7_uint8_formula_and_constant_tensor():
    w = export.artifact._Writer("u8mm")
    t = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    w.put_float("t", t)
    w.put_float("c", torch.full((5,), 0.25))
    rec_t, rec_c = w.records
    q = np.frombuffer(w.payload()[:4], dtype=np.uint8)
    assert list(q) == [round((v + 1) / 4 * 255) for v in (-1.0, 0.0, 0.5, 3.0)]
    assert (rec_t["min"], rec_t["max"]) == (-1.0, 3.0)
    dec = export.artifact._decode_tensor(rec_c, w.payload(), "x")
    assert torch.equal(dec, torch.full((5,), 0.25))  # no division by zero
    dec_t = export.artifact._decode_tensor(rec_t, w.payload(), "x")
    assert torch.allclose(dec_t, t, atol=4 / 255 / 2 + 1e-6)


def test_float_model_fp16_and_uint8_sizes(tmp_path):
    m = models.build("lenet5", in_channels=1, num_classes=10).eval()
    sizes = {}
    for enc in ("pcz", "fp16", "uint8"):
        path = _write(tmp_path, m, f"{enc}.pcz", encoding=enc)
        sizes[enc] = export.read(path).facts["payload_bytes"]
        net = export.load(path)
        x = torch.randn(8, 1, 28, 28)
        with torch.no_grad():
            assert torch.allclose(net(x), m(x), atol=0.05 if enc == "uint8" else 2e-3)
    assert sizes["pcz"] == 4 * quant.model_size(m)["fp32_bytes"] // 4
    assert sizes["fp16"] == sizes["pcz"] // 2
    assert sizes["uint8"] == sizes["pcz"] // 4


# ------------------------------------------------------------------------------ save / load
def test_save_load_file(tmp_path):
    m, x = _student(pruned=True)
    path = _write(tmp_path, m, data={"dataset": "synthetic"}, eval_result={"top1": 12.5})
    net = export.load(path)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.artifact.manifest["eval"] == {"top1": 12.5}
    assert net.artifact.manifest["arch"]["model"] == "mobilenet_student"
    with torch.no_grad():
        assert (net(x).argmax(1) == m(x).argmax(1)).float().mean() >= 0.9
    with pytest.raises(FileExistsError, match="--force"):
        export.save(m, path)
    before = export.read(path).facts["payload_bytes"]
    export.save(m, path, force=True)
    assert export.read(path).facts["payload_bytes"] == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_load_never_unpickles(tmp_path, monkeypatch):
    m, x = _student()
    path = _write(tmp_path, m)

    def boom(*a, **k):
        raise AssertionError("unpickling during artifact load")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    net = export.load(path)
    with torch.no_grad():
        net(x)


def test_model_without_recorded_arch_needs_arch(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(export.ExportError, match="pycompress.models.build"):
        export.encode(net)
    with pytest.raises(export.ExportError, match="already a loaded artifact"):
        m, _ = _student()
        export.encode(_roundtrip(m)[0])


def test_uncalibrated_activation_quantizer_refused():
    m = models.build("lenet5", in_channels=1, num_classes=10)
    quant.prepare_qat(m, {"weight_bits": 4, "act_bits": 8})
    with pytest.raises(export.ExportError, match="not calibrated"):
        export.encode(m)


# ------------------------------------------------------------------------------ bad files
def _rewrite(path, data: bytes, *, fix_sha: bool):
    if fix_sha:
        data = data[:-32] + hashlib.sha256(data[:-32]).digest()
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def good_file(tmp_path):
    m = models.build("lenet300", in_channels=1, num_classes=10)
    return _write(tmp_path, m)


def _expect(path, match):
    with pytest.raises(export.ArtifactError, match=match) as ei:
        export.load(path)
    assert path in str(ei.value)


@pytest.mark.parametrize("cut", [3, 20, 100, -33, -1])
def test_truncated(good_file, cut):
    data = open(good_file, "rb").read()
    _rewrite(good_file, data[:cut], fix_sha=False)
    _expect(good_file, "truncated")


@pytest.mark.parametrize("where", ["payload", "manifest", "version", "trailer"])
def test_changed_byte(good_file, where):
    data = bytearray(open(good_file, "rb").read())
    i = {"payload": len(data) - 100, "manifest": 30, "version": 8, "trailer": len(data) - 5}[where]
    data[i] ^= 0x01
    _rewrite(good_file, bytes(data), fix_sha=False)
    _expect(good_file, "checksum mismatch")


def test_appended_bytes(good_file):
    _rewrite(good_file, open(good_file, "rb").read() + b"x", fix_sha=False)
    _expect(good_file, "unexpected bytes")


def test_newer_format_version(good_file):
    data = bytearray(open(good_file, "rb").read())
    struct.pack_into("<H", data, 8, fmt.FORMAT_VERSION + 1)
    _rewrite(good_file, bytes(data), fix_sha=True)
    _expect(good_file, "newer")


def _with_manifest(path, edit):
    data = open(path, "rb").read()
    _, version, flags, m, p = struct.unpack_from("<8sHHIQ", data)
    manifest = json.loads(zlib.decompress(data[24 : 24 + m]))
    edit(manifest)
    _rewrite(path, fmt.container_bytes(manifest, data[24 + m : 24 + m + p]), fix_sha=False)


def test_unknown_model(good_file):
    _with_manifest(good_file, lambda mf: mf["arch"].update(model="lenet_9000"))
    _expect(good_file, "'lenet_9000' is not known")


def test_corrupt_manifest_records(good_file):
    _with_manifest(good_file, lambda mf: mf["tensors"][0].update(len=mf["tensors"][0]["len"] - 4))
    _expect(good_file, "corrupt manifest")


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"PK\x03\x04zipzipzip" * 4])
def test_not_an_artifact(tmp_path, content):
    p = str(tmp_path / "x.pcz")
    with open(p, "wb") as f:
        f.write(content)
    _expect(p, "not a pycompress artifact")


def test_torch_checkpoint_is_not_an_artifact(tmp_path):
    p = str(tmp_path / "best.pt")
    torch.save({"model": {}}, p)
    _expect(p, "zip archive")


def test_missing_and_directory(tmp_path):
    _expect(str(tmp_path / "nope.pcz"), "no such file")
    _expect(str(tmp_path), "directory")


def test_export_is_reproducible(tmp_path):
    m, _ = _student(pruned=True)
    a, b = _write(tmp_path, m, "a.pcz"), _write(tmp_path, m, "b.pcz")
    assert open(a, "rb").read() == open(b, "rb").read()  # same model, same bytes (no timestamps)


@pytest.mark.gpu
def test_export_and_load_on_cuda(tmp_path):
    m, x = _student(pruned=True)
    _, ref_payload = export.encode(m, fold_bn=False)
    m = m.cuda()
    _, payload = export.encode(m, fold_bn=False)
    assert payload == ref_payload  # the same codes and bytes whatever device the model is on
    # (folded scales go through rsqrt, whose CUDA version may differ from the CPU's in the last bit)
    path = str(tmp_path / "g.pcz")
    export.save(m, path)
    net = export.load(path, device="cuda")
    with torch.no_grad():
        y = net(x.cuda())
        y_cpu = export.load(path)(x)
    assert (y.argmax(1).cpu() == y_cpu.argmax(1)).float().mean() >= 0.95


def test_quantized_layer_checks_a_loaded_act_scale_once_and_skips_per_call_checks(monkeypatch):
    import sys

    from pycompress.export.modules import QuantizedConv2d

    fq_mod = sys.modules["pycompress.ops.fake_quantize"]
    calls = []
    real = fq_mod._check_scale_values
    monkeypatch.setattr(fq_mod, "_check_scale_values", lambda s: calls.append(1) or real(s))
    layer = QuantizedConv2d(2, 3, 3, padding=1, weight_bits=4, act_bits=8, act_signed=False)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["act_scale"] = torch.tensor([0.05])
    state["weight_codes"] = torch.randint(-7, 8, state["weight_codes"].shape, dtype=state["weight_codes"].dtype)
    layer.load_state_dict(state)
    y = layer(torch.rand(1, 2, 5, 5))
    assert y.shape == (1, 3, 5, 5) and calls == []
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        state["act_scale"] = torch.tensor([bad])
        with pytest.raises(ValueError, match="loaded act_scale must be positive and finite"):
            QuantizedConv2d(2, 3, 3, weight_bits=4, act_bits=8, act_signed=False).load_state_dict(state)
