"""pycompress.export.onnx: the QDQ graph of a loaded artifact (int8 weight codes, activation Q/DQ),
ONNX Runtime against the torch module, the exporters, the lazy optional dependencies."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pycompress import export, models, prune, quant
from pycompress.export import onnx as ponnx
from pycompress.nn import DepthwiseConv2d, DepthwiseConvBNAct, swap_depthwise

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'pycompress[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'pycompress[onnx]')")
from onnx import numpy_helper  # noqa: E402

SIZE = 16
SHAPE = (1, SIZE, SIZE)
N_CONVS = 15  # mobilenet_student: 1 stem conv + 7 x (depthwise, pointwise)


def _randomize_bn(m, negative=True):
    """A trained-like float net: fan-in (He) initialized weights, BatchNorm running statistics
    measured on data (so the logits depend on the input and the folded gains stay moderate), gamma
    of both signs (folded: negative per-channel scales), small betas."""
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = mod.weight[0].numel()
            mod.weight.data.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            mod.bias.data.copy_(torch.randn(mod.bias.shape, generator=g) * 0.05)
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    m.train()
    with torch.no_grad():
        m(torch.randn(64, *SHAPE, generator=g))
    m.eval()
    for bn in bns:
        # no near-dead channels (a variance far below the layer's typical one): their huge folded
        # gains would make ORT's integer bias (in units of x_scale * w_scale) coarser than the
        # output's quantization step (see _compare and integer_bias_reference)
        bn.running_var.clamp_(min=float(bn.running_var.median()) / 4)
        c = bn.num_features
        gamma = torch.rand(c, generator=g) + 0.5
        if negative:
            gamma = gamma * torch.where(torch.rand(c, generator=g) < 0.3, -1.0, 1.0)
        bn.weight.data.copy_(gamma)
        bn.bias.data.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)


def _qat_student(weight_bits=4, act_bits=8, sparsity=0.75, negative_bn=True, seed=0):
    torch.manual_seed(seed)
    m = models.build("mobilenet_student", in_channels=1, num_classes=10)
    _randomize_bn(m, negative_bn)
    if sparsity:
        prune.prune_model(m, {"criterion": "global_magnitude", "sparsity": sparsity})
    quant.prepare_qat(
        m, {"weight_bits": weight_bits, "act_bits": act_bits, "first": {"weight_bits": 8}, "last": {"weight_bits": 8}}
    )
    quant.calibrate(m, [torch.randn(16, *SHAPE)], 1)
    return m.eval()


def _artifact(**kw):
    manifest, payload = export.encode(_qat_student(**kw))
    return export.decode(manifest, payload)


@pytest.fixture(scope="module")
def student4():
    """The pruned 4-bit-weight (8-bit first / last), 8-bit-activation student, BN folded."""
    return _artifact()


@pytest.fixture(scope="module")
def student4_onnx(student4, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("onnx") / "student4.onnx")
    return ponnx.export_onnx(student4, path, SHAPE)


def _inputs(n=256, seed=3):
    return torch.randn((n,) + SHAPE, generator=torch.Generator().manual_seed(seed))


def _act_unit(art):
    """One activation quantization step at the classifier's input, in logits."""
    fc = art.fc[0]
    return float(fc.act_scale) * float(fc.weight.abs().max())


def _compare(art, path, x=None, integer_kernels=True):
    """ORT against the torch module on a few hundred random inputs.

    * ``ORT_DISABLE_ALL`` runs the graph as written: the same values as torch up to float rounding,
      so almost every row is identical and the rare rounding tie that flips one activation step
      moves the logits by a few classifier-input steps at most.
    * The default level rounds each QDQ conv's bias to int32 units of x_scale * w_scale before it
      fuses QLinearConv (ORT's WeightBiasQuantization): its argmax agrees on >= 99% of the inputs
      with the same artifact whose biases are rounded that way (``integer_bias_reference``);
      against the float-bias module it agrees less on random inputs (near-ties: the re-rounded
      activations cascade), which is bounded below loosely and returned.
    * ``integer_kernels=False`` (4-bit activations: nothing fuses): the default level with that
      bias rounding disabled must agree with torch itself."""
    x = _inputs(400) if x is None else x
    with torch.no_grad():
        want = art(x).numpy()
        ref = ponnx.integer_bias_reference(art)(x).numpy()
    assert len(np.unique(want.argmax(1))) >= 3 and want.std(0).min() > 0  # a test that can fail
    got0 = ponnx.ort_run(ponnx.ort_session(path, optimize=False), x)
    d0 = np.abs(got0 - want).max(1)
    assert (d0 <= 1e-4 * np.abs(want).max()).mean() >= 0.98, d0
    assert d0.max() <= 16 * _act_unit(art), (d0.max(), _act_unit(art))
    if integer_kernels:
        got1 = ponnx.ort_run(ponnx.ort_session(path), x)
        agree_ref = (got1.argmax(1) == ref.argmax(1)).mean()
        assert agree_ref >= 0.99, agree_ref
    else:
        got1 = ponnx.ort_run(ponnx.ort_session(path, disabled_optimizers=["WeightBiasQuantization"]), x)
    agree = (got1.argmax(1) == want.argmax(1)).mean()
    assert agree >= (0.8 if integer_kernels else 0.99), agree
    return agree


def _float_inits(model_proto):
    return {i.name: numpy_helper.to_array(i) for i in model_proto.graph.initializer}


# ------------------------------------------------------------------------------------ graph
def test_qdq_graph_holds_int8_weight_codes_and_activation_pairs(student4, student4_onnx):
    facts = student4_onnx
    g = onnx.load(facts["path"]).graph
    inits = _float_inits(onnx.load(facts["path"]))
    ops = [n.op_type for n in g.node]
    assert facts["qdq_nodes"] == {
        "QuantizeLinear": ops.count("QuantizeLinear"),
        "DequantizeLinear": ops.count("DequantizeLinear"),
    }
    n_layers = N_CONVS + 1
    assert facts["weight_int8_initializers"] == n_layers and facts["activation_qdq"] == n_layers
    assert ops.count("QuantizeLinear") == n_layers and ops.count("DequantizeLinear") == 2 * n_layers
    assert facts["int4_as_int8"] is True and facts["weight_bits"] == [4, 8] and facts["opset"] == 17
    meta = {p.key: p.value for p in onnx.load(facts["path"]).metadata_props}
    assert meta["pycompress.int4_as_int8"].startswith("true")

    codes = dict(student4.named_buffers())
    weight_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == n_layers
    for n in weight_dq:
        axis = [a.i for a in n.attribute if a.name == "axis"]
        assert axis == [0]
        q, scale, zp = (inits[i] for i in n.input[:3])
        assert q.dtype == np.int8 and zp.dtype == np.int8 and not zp.any()
        assert scale.dtype == np.float32 and scale.shape == (q.shape[0],) and (scale > 0).all()
        layer = n.input[0][: -len(".weight_codes")]
        want = codes[layer + ".weight_codes"].numpy().astype(np.int64)
        sign = np.sign(codes[layer + ".weight_scale"].numpy()).reshape((-1,) + (1,) * (want.ndim - 1))
        np.testing.assert_array_equal(q.astype(np.int64), want * sign)  # the codes, sign of folded BN moved
        if layer.startswith(("cnn.0.", "fc.")):
            assert np.abs(q).max() <= 127
        else:
            assert np.abs(q).max() <= 8  # 4-bit codes in the int8 range
    # no fp32 copy of a quantized weight: every float initializer is small (bias, scales)
    assert all(v.ndim <= 1 for v in inits.values() if v.dtype == np.float32)
    # activation pairs: dynamic input, scalar scale, explicit scalar zero point, one consumer each
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    act_q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    for n in act_q:
        assert n.input[0] not in inits
        assert inits[n.input[1]].shape == () and inits[n.input[2]].shape == ()
        assert inits[n.input[2]].dtype in (np.uint8, np.int8)
        (dq,) = consumers[n.output[0]]
        assert dq.op_type == "DequantizeLinear" and list(dq.input[1:]) == list(n.input[1:])
    signed = [inits[n.input[2]].dtype == np.int8 for n in act_q]
    assert signed[0] and not all(signed)  # the normalized image is signed, post-ReLU6 inputs unsigned


def test_file_is_much_smaller_than_fp32_export(student4, student4_onnx, tmp_path):
    from pycompress.bench.model import fp32_model

    f32 = ponnx.export_onnx(fp32_model(student4), str(tmp_path / "fp32.onnx"), SHAPE)
    assert f32["weight_int8_initializers"] == 0 and f32["qdq_nodes"]["QuantizeLinear"] == 0
    assert student4_onnx["file_bytes"] < 0.35 * f32["file_bytes"]
    assert student4_onnx["file_bytes"] == os.path.getsize(student4_onnx["path"])


def test_refuses_to_overwrite_and_writes_atomically(student4, student4_onnx, tmp_path):
    with pytest.raises(FileExistsError, match="force"):
        ponnx.export_onnx(student4, student4_onnx["path"], SHAPE)
    p = tmp_path / "m.onnx"
    p.write_bytes(b"old")
    ponnx.export_onnx(student4, str(p), SHAPE, force=True)
    onnx.checker.check_model(onnx.load(str(p)))
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temp file left


# ------------------------------------------------------------------------------------ ORT vs torch
def test_ort_matches_torch_legacy_exporter(student4, student4_onnx):
    _compare(student4, student4_onnx["path"])


def test_ort_matches_torch_dynamo_exporter(student4, tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (pip install 'pycompress[onnx]')")
    facts = ponnx.export_onnx(student4, str(tmp_path / "d.onnx"), SHAPE, dynamo=True)  # opset 17 -> 18
    assert facts["exporter"] == "dynamo" and facts["opset"] == 18
    assert facts["weight_int8_initializers"] == N_CONVS + 1 and facts["activation_qdq"] == N_CONVS + 1
    _compare(student4, facts["path"])
    # the batch axis stays dynamic
    sess = ponnx.ort_session(facts["path"])
    for n in (1, 5):
        assert ponnx.ort_run(sess, _inputs(n)).shape == (n, 10)


def test_ort_fuses_quantized_convs(student4_onnx):
    fused = ponnx.count_fused(student4_onnx["path"])
    assert set(ponnx.FUSED_OPS) <= set(fused)
    # every conv whose output is re-quantized runs as QLinearConv; the last pointwise conv feeds the
    # global average pool (fp32), so it stays a Conv on dequantized weights
    assert fused["QLinearConv"] >= N_CONVS // 2, fused
    assert fused["QLinearConv"] + fused["Conv"] == N_CONVS, fused
    plain = ponnx.count_fused(student4_onnx["path"], optimize=False)
    assert plain["QLinearConv"] == 0 and plain["Conv"] == N_CONVS


@pytest.mark.parametrize("weight_bits,act_bits", [(2, 8), (8, 8), (4, 4)])
def test_other_bit_widths_agree_with_torch(weight_bits, act_bits, tmp_path):
    art = _artifact(weight_bits=weight_bits, act_bits=act_bits, sparsity=0.5, seed=weight_bits + act_bits)
    facts = ponnx.export_onnx(art, str(tmp_path / "m.onnx"), SHAPE)
    assert facts["int4_as_int8"] is (weight_bits < 8)
    assert facts["act_bits"] == [act_bits]
    if act_bits < 8:  # narrower activation grids clamp first; the Clip keeps ORT from fusing
        assert facts["ops"].get("Clip", 0) > 8
        assert ponnx.count_fused(facts["path"])["QLinearConv"] == 0
    _compare(art, facts["path"], integer_kernels=act_bits == 8)


def test_negative_folded_scales_agree_with_torch(tmp_path):
    art = _artifact(weight_bits=8, sparsity=0.0, negative_bn=True, seed=5)
    scales = torch.cat([m.weight_scale for m in art.modules() if isinstance(m, export.QUANTIZED_LAYERS)])
    assert (scales < 0).any() and (scales > 0).any()
    facts = ponnx.export_onnx(art, str(tmp_path / "m.onnx"), SHAPE)
    _compare(art, facts["path"])


def test_negative_scale_with_code_minus_128_is_refused(tmp_path):
    art = _artifact(weight_bits=8, sparsity=0.0, negative_bn=True, seed=5)
    layer = next(m for m in art.modules() if isinstance(m, export.QuantizedConv2d) and (m.weight_scale < 0).any())
    c = int((layer.weight_scale < 0).nonzero()[0])
    layer.weight_codes[c].view(-1)[0] = -128  # -(-128) does not fit int8
    layer.refresh_weight()
    with pytest.raises(ValueError, match="fold_bn=False"):
        ponnx.export_onnx(art, str(tmp_path / "m.onnx"), SHAPE)
    assert not os.listdir(tmp_path)


def test_int32_biases_option(student4, student4_onnx, tmp_path):
    facts = ponnx.export_onnx(student4, str(tmp_path / "b.onnx"), SHAPE, bias_int32=True)
    assert facts["bias_int32"] >= N_CONVS
    inits = _float_inits(onnx.load(facts["path"]))
    assert sum(v.dtype == np.int32 for v in inits.values()) >= N_CONVS
    assert facts["bias_rounding_max"] > 0
    # written that way, even ORT_DISABLE_ALL computes the integer-bias reference
    x = _inputs(200)
    with torch.no_grad():
        ref = ponnx.integer_bias_reference(student4)(x).numpy()
    got = ponnx.ort_run(ponnx.ort_session(facts["path"], optimize=False), x)
    assert (np.abs(got - ref).max(1) <= 1e-4 * np.abs(ref).max()).mean() >= 0.98
    # measured: ORT fuses the same convs with or without int32 biases (so it is off by default)
    assert ponnx.count_fused(facts["path"])["QLinearConv"] == ponnx.count_fused(student4_onnx["path"])["QLinearConv"]


def test_qat_model_is_encoded_first(tmp_path):
    qat = _qat_student(weight_bits=4, sparsity=0.5, seed=7)
    facts = ponnx.export_onnx(qat, str(tmp_path / "m.onnx"), SHAPE)
    assert facts["converted_from_qat"] is True and facts["weight_int8_initializers"] == N_CONVS + 1
    _compare(export.decode(*export.encode(qat)), facts["path"])


def test_float_models_export_without_pycompress_ops(tmp_path):
    torch.manual_seed(0)
    m = models.build("mobilenet_student", in_channels=1, num_classes=10).eval()
    _randomize_bn(m)
    assert any(type(x) is DepthwiseConv2d for x in m.modules())
    x = _inputs(64)
    for name, model in (("dw", m), ("fused", _fused(m))):
        facts = ponnx.export_onnx(model, str(tmp_path / f"{name}.onnx"), SHAPE)
        assert facts["qdq_nodes"] == {"QuantizeLinear": 0, "DequantizeLinear": 0}
        assert facts["ops"]["Conv"] == N_CONVS and facts["int4_as_int8"] is False
        with torch.no_grad():
            want = model(x).numpy()
        for opt in (False, True):
            got = ponnx.ort_run(ponnx.ort_session(facts["path"], optimize=opt), x)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert type(m.cnn[1][0]) is DepthwiseConv2d  # the model itself is untouched


def _fused(m):
    import copy

    f = copy.deepcopy(m)
    swap_depthwise(f, fuse=True)
    assert any(isinstance(x, DepthwiseConvBNAct) for x in f.modules())
    return f


def test_ort_predict(student4, student4_onnx):
    x = _inputs(40)
    pred = torch.from_numpy(ponnx.ort_run(ponnx.ort_session(student4_onnx["path"]), x)).argmax(1)
    y = pred.clone()
    y[:10] = (y[:10] + 1) % 10
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]
    res = ponnx.ort_predict(student4_onnx["path"], loader, logits=True)
    assert res["samples"] == 40 and res["predictions"].dtype == torch.long
    assert torch.equal(res["predictions"], pred)
    assert res["top1"] == pytest.approx(100.0 * float((res["predictions"] == y).float().mean()))
    assert res["top5"] >= res["top1"] and res["logits"].shape == (40, 10)
    sess = ponnx.ort_session(student4_onnx["path"], threads=1)
    assert ponnx.ort_predict(sess, [x[:8]])["top1"] is None  # unlabelled batches


def test_bad_arguments(student4, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        ponnx.export_onnx(student4, str(tmp_path / "a.onnx"), SHAPE, opset=12)
    with pytest.raises(ValueError, match="input_shape"):
        ponnx.export_onnx(student4, str(tmp_path / "a.onnx"), (SIZE, SIZE))
    with pytest.raises(ValueError, match="optimize"):
        ponnx.ort_session("x.onnx", optimize="fast")
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------ optional deps
@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_missing_extra_raises_a_clear_import_error(missing, monkeypatch, student4_onnx, tmp_path):
    real = ponnx._import

    def fake(name):
        if name == missing:
            raise ImportError(f"No module named {name!r}")
        return real(name)

    monkeypatch.setattr(ponnx, "_import", fake)
    with pytest.raises(ImportError, match=rf"'{missing}'.*pip install 'pycompress\[onnx\]'"):
        if missing == "onnx":
            ponnx.export_onnx(torch.nn.Linear(2, 2), str(tmp_path / "a.onnx"), (1, 2, 2))
        else:
            ponnx.ort_session(student4_onnx["path"])


def test_module_imports_without_onnx():
    code = (
        "import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None; "
        "sys.modules['onnxscript'] = None; import pycompress.export.onnx as m; "
        "from pycompress.bench import model\n"
        "try:\n    m.count_fused('x.onnx')\nexcept ImportError as e:\n    print('ERR', e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pycompress[onnx]" in out.stdout
