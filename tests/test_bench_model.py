"""pycompress.bench.model: the fp32 baseline built from an artifact, the benchmark rows, the table
and the JSON file."""

import json

import pytest
import torch

from pycompress import export, models, prune, quant
from pycompress.bench import model as bm
from pycompress.export import QuantizedConv2d, QuantizedLinear
from pycompress.nn import DepthwiseConv2d

SIZE = 16


@pytest.fixture(scope="module")
def artifact_path(tmp_path_factory):
    torch.manual_seed(0)
    m = models.build("mobilenet_student", in_channels=1, num_classes=10)
    prune.prune_model(m, {"criterion": "global_magnitude", "sparsity": 0.5})
    quant.prepare_qat(m, {"weight_bits": 4, "act_bits": 8, "first": {"weight_bits": 8}, "last": {"weight_bits": 8}})
    quant.calibrate(m, [torch.randn(8, 1, SIZE, SIZE)], 1)
    m.eval()
    path = str(tmp_path_factory.mktemp("bench") / "tiny.pcz")
    export.save(m, path, data={"dataset": "synthetic", "in_channels": 1, "image_size": [SIZE, SIZE]})
    return path


def test_fp32_model_is_the_artifact_without_quantization(artifact_path):
    art = export.load(artifact_path)
    f = bm.fp32_model(art)
    assert not any(isinstance(m, (QuantizedConv2d, QuantizedLinear)) for m in f.modules())
    assert any(isinstance(m, QuantizedConv2d) for m in art.modules())  # the artifact is untouched
    assert any(type(m) is DepthwiseConv2d for m in f.modules())
    qa = {n: m for n, m in art.named_modules() if isinstance(m, (QuantizedConv2d, QuantizedLinear))}
    fm = dict(f.named_modules())
    for name, q in qa.items():
        assert torch.equal(fm[name].weight, q.weight) and torch.equal(fm[name].bias, q.bias)
        assert not hasattr(fm[name], "act_scale")
    assert (
        sum(isinstance(m, torch.nn.Identity) for m in f.modules())
        == sum(isinstance(m, torch.nn.Identity) for m in art.modules())
        > 0
    )  # folded BatchNorms stay folded
    x = torch.randn(64, 1, SIZE, SIZE)
    with torch.no_grad():
        ya, yf = art(x), f(x)
    assert not torch.equal(ya, yf)  # no activation fake-quantization...
    assert (ya.argmax(1) == yf.argmax(1)).float().mean() >= 0.9  # ...but the same network


def test_input_shape_of():
    man = {"data": {"in_channels": 3, "image_size": [32, 28]}, "arch": {"in_channels": 3}}
    assert bm.input_shape_of(man) == (3, 32, 28)
    assert bm.input_shape_of({"data": None, "arch": {"in_channels": 1}}, (20, 24)) == (1, 20, 24)
    assert bm.input_shape_of({"arch": {"in_channels": 1}}, (1, 20, 24)) == (1, 20, 24)
    with pytest.raises(ValueError, match="input_shape"):
        bm.input_shape_of({"data": None, "arch": {"in_channels": 1}})
    with pytest.raises(ValueError, match="channels"):
        bm.input_shape_of({"arch": {"in_channels": 1}}, (3, 20, 24))


def _check_rows(rows, ort_expected):
    keys = {"variant", "device", "batch", "ms", "ms_min", "images_per_s", "speedup", "agree", "note"}
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for v in bm.VARIANTS for b in (1, 4)]
    for r in rows:
        assert set(r) == keys and r["device"] == "cpu"
        timed = r["variant"].startswith("torch") or ort_expected
        if timed:
            assert r["ms"] > 0 and r["ms_min"] > 0 and r["ms_min"] <= r["ms"]
            assert r["images_per_s"] == pytest.approx(r["batch"] / r["ms"] * 1e3)
            assert r["speedup"] > 0
        else:
            assert r["ms"] is None and r["speedup"] is None and r["note"].startswith("skipped")
    for r in rows:
        if r["variant"] == "torch fp32":
            assert r["speedup"] == pytest.approx(1.0)


def test_run_times_every_variant(artifact_path, tmp_path):
    pytest.importorskip("onnxruntime", reason="the ORT rows need the onnx extra (pip install 'pycompress[onnx]')")
    pytest.importorskip("onnx", reason="the ORT rows need the onnx extra (pip install 'pycompress[onnx]')")
    meta = {}
    rows = bm.run(artifact_path, batch_sizes=(1, 4), warmup=1, repeats=2, threads=1, meta=meta)
    _check_rows(rows, ort_expected=True)
    for r in rows:
        if r["variant"].startswith("ort"):
            assert r["agree"] >= 0.75  # a tiny batch of random inputs: near-ties may flip
    assert "QLinearConv" in [r for r in rows if r["variant"] == "ort int8"][0]["note"]
    assert meta["input_shape"] == [1, SIZE, SIZE] and meta["threads"] == 1
    assert meta["ort_int8"]["onnx_bytes"] < meta["ort_fp32"]["onnx_bytes"]
    table = bm.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and "images/s" in lines[0] and "speed-up" in lines[0]
    assert len({len(line) for line in lines}) == 1  # aligned
    out = tmp_path / "bench.json"
    bm.write_json(str(out), rows, meta)
    data = json.loads(out.read_text())
    assert data["rows"] == rows and data["meta"]["threads"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_run_without_the_onnx_extra_skips_ort_rows(artifact_path, monkeypatch):
    from pycompress.export import onnx as ponnx

    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(ponnx, "_import", missing)
    rows = bm.run(artifact_path, batch_sizes=(1, 4), warmup=0, repeats=1)
    _check_rows(rows, ort_expected=False)
    assert all("pycompress[onnx]" in r["note"] for r in rows if r["variant"].startswith("ort"))
    assert "-" in bm.format_table(rows)


def test_run_bad_arguments(artifact_path):
    with pytest.raises(ValueError, match="device"):
        bm.run(artifact_path, device="tpu")
    with pytest.raises(ValueError, match="batch_sizes"):
        bm.run(artifact_path, batch_sizes=(0,))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            bm.run(artifact_path, device="cuda")


@pytest.mark.gpu
def test_run_on_cuda_adds_torch_gpu_rows(artifact_path):
    rows = bm.run(artifact_path, batch_sizes=(1, 4), warmup=1, repeats=2, device="cuda", onnx=False)
    gpu = [r for r in rows if r["device"] == "cuda"]
    assert [r["variant"] for r in gpu] == ["torch fp32"] * 2 + ["torch artifact"] * 2
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in gpu)
