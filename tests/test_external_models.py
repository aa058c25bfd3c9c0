"""Models from outside the zoo (issue 19): torchvision:, timm: and import: names, weights files with
strict / non-strict loading, every stage on such models (KD, pruning, QAT, slimming, export), the
report's per-layer treatment, and clear errors at validation and at run start."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pycompress import export, models
from pycompress.models.weights import (
    WeightsError,
    load_weights,
    read_safetensors,
    read_state_dict,
    write_safetensors,
)
from pycompress.recipe import RecipeError, RunError, load_model, run_recipe, validate
from tests.helpers import run_cli

OPT = {"name": "adamw", "lr": 1e-3}
SHORT = {"epochs": 1, "optimizer": OPT, "max_steps_per_epoch": 1, "eval_batches": 1}
KD = {"kind": "hinton", "alpha": 0.5, "temperature": 4}


def _data(in_channels=3, size=32, length=16):
    return {
        "dataset": "synthetic",
        "batch_size": 8,
        "eval_batch_size": 16,
        "options": {"num_classes": 4, "image_size": size, "in_channels": in_channels, "length": length},
    }


def _recipe(model, stages, teacher=None, **data):
    raw = {"name": "ext", "seed": 0, "device": "cpu", "data": _data(**data), "model": model, "stages": stages}
    if teacher is not None:
        raw["teacher"] = teacher
    return raw


def _run(raw, out):
    lines = []
    report = run_recipe(validate(raw), str(out), progress=False, log=lines.append)
    return report, lines


# ------------------------------------------------------------------------------ names and building
def test_torchvision_models_build_without_downloading_and_adapt_the_stem():
    m = models.build("torchvision:mobilenet_v2", in_channels=1, num_classes=4, width_mult=0.5)
    assert m.features[0][0].in_channels == 1 and m.classifier[-1].out_features == 4
    assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 4)
    assert m._pycompress_build == {
        "model": "torchvision:mobilenet_v2",
        "args": {"width_mult": 0.5},
        "in_channels": 1,
        "num_classes": 4,
    }
    r = models.build("torchvision:resnet18", in_channels=3, num_classes=7)
    assert r.conv1.in_channels == 3 and r.fc.out_features == 7
    with pytest.raises(ValueError, match="did you mean 'torchvision:resnet18'"):
        models.check_name("torchvision:resnet19")
    with pytest.raises(ValueError, match="weights are never downloaded"):
        models.build("torchvision:resnet18", in_channels=3, num_classes=4, weights="DEFAULT")
    with pytest.raises(TypeError, match="torchvision:resnet18"):
        models.build("torchvision:resnet18", in_channels=3, num_classes=4, no_such_arg=1)


def _write_module(tmp_path, monkeypatch, body: str) -> str:
    """A module of the user's own, importable for this test only; returns its name."""
    name = "usernets_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_import_factory_gets_in_channels_and_num_classes_only_when_its_signature_names_them(tmp_path, monkeypatch):
    mod = _write_module(
        tmp_path,
        monkeypatch,
        """
        import torch.nn as nn
        seen = []

        def both(in_channels, num_classes, width=4):
            seen.append(("both", in_channels, num_classes, width))
            return nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.Flatten(), nn.LazyLinear(num_classes))

        def classes_only(num_classes, **kwargs):
            seen.append(("classes_only", num_classes, sorted(kwargs)))
            return nn.Linear(3, num_classes)

        def neither():
            seen.append(("neither",))
            return nn.Linear(3, 10)
        """,
    )
    models.build(f"import:{mod}:both", in_channels=2, num_classes=5, width=6)
    models.build(f"import:{mod}:classes_only", in_channels=2, num_classes=5, depth=1)
    m = models.build(f"import:{mod}:neither", in_channels=2, num_classes=5)
    seen = sys.modules[mod].seen
    assert seen == [("both", 2, 5, 6), ("classes_only", 5, ["depth"]), ("neither",)]
    assert m._pycompress_build["model"] == f"import:{mod}:neither"
    assert models.accepted_kwargs(f"import:{mod}:both") == {"width": 4}
    assert models.accepted_kwargs(f"import:{mod}:classes_only") is None  # **kwargs: the call decides
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['depth'\]; it accepts: width"):
        models.build(f"import:{mod}:both", in_channels=2, num_classes=5, depth=3)


# ------------------------------------------------------------------------------ validation errors
def _fails(raw, *fragments):
    with pytest.raises(RecipeError) as e:
        validate(raw, "bad.yaml")
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))
    return str(e.value)


def test_validation_errors_before_anything_trains(tmp_path, monkeypatch):
    mod = _write_module(
        tmp_path,
        monkeypatch,
        """
        def not_a_model(num_classes):
            return {"classes": num_classes}

        NUMBER = 3
        """,
    )
    stages = [{"name": "s", "kind": "train", **SHORT}]
    _fails(
        _recipe({"name": "import:no_such_pkg_19.nets:make"}, stages),
        "bad.yaml: model: 'name'",
        "cannot import module 'no_such_pkg_19.nets'",
        "PYTHONPATH",
    )
    _fails(_recipe({"name": f"import:{mod}:missing"}, stages), f"module {mod!r} has no attribute 'missing'")
    _fails(_recipe({"name": f"import:{mod}:NUMBER"}, stages), "not a callable factory")
    _fails(_recipe({"name": f"import:{mod}:not_a_model"}, stages), "returned dict", "not a torch.nn.Module")
    _fails(_recipe({"name": "import:just_a_module"}, stages), "expected import:<package.module>:<function>")
    _fails(_recipe({"name": "torchvision:resnet19"}, stages), "unknown model 'torchvision:resnet19'")
    _fails(
        _recipe({"name": "torchvision:resnet18", "args": {"weights": "IMAGENET1K_V1"}}, stages),
        "model.args",
        "weights are never downloaded",
    )
    _fails(_recipe({"name": "torchvision:resnet18", "args": {"depth": 3}}, stages), "model.args", "depth")
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed (whatever this machine has)
    _fails(
        _recipe({"name": "resnet20"}, stages, teacher={"name": "timm:resnet18"}),
        "teacher: 'name'",
        "needs timm",
        "pip install 'pycompress[timm]'",
    )
    _fails(
        _recipe({"name": "torchvision:resnet18", "weights": str(tmp_path / "nope.pt")}, stages),
        "model: 'weights': file",
        "nope.pt' not found",
    )
    _fails(_recipe({"name": "resnet20", "strict": False}, stages), "'strict' applies to a 'weights' file")
    _fails(_recipe({"name": "mobilenet_student"}, stages, teacher={"name": "torchvision:resnet"}), "teacher: 'name'")


def test_timm_models_through_an_installed_timm(monkeypatch):
    calls = []

    def create_model(name, pretrained=True, num_classes=1000, in_chans=3, **kwargs):
        calls.append((name, pretrained, num_classes, in_chans, kwargs))
        width = kwargs.get("width", 4)
        return nn.Sequential(
            nn.Conv2d(in_chans, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
        )

    fake = types.SimpleNamespace(
        __version__="0.9.fake",
        create_model=create_model,
        is_model=lambda n: n == "tiny_net",
        list_models=lambda: ["tiny_net"],
    )
    monkeypatch.setitem(sys.modules, "timm", fake)
    m = models.build("timm:tiny_net", in_channels=1, num_classes=4, width=6)
    assert calls[-1] == ("tiny_net", False, 4, 1, {"width": 6})  # pretrained=False: nothing downloaded
    assert m._pycompress_build["model"] == "timm:tiny_net"
    r = validate(_recipe({"name": "timm:tiny_net", "args": {"width": 6}}, [{"name": "s", "kind": "train", **SHORT}]))
    assert r.model.name == "timm:tiny_net"
    _fails(_recipe({"name": "timm:huge_net"}, [{"name": "s", "kind": "train", **SHORT}]), "timm 0.9.fake has no model")
    _fails(
        _recipe({"name": "timm:tiny_net", "args": {"pretrained": True}}, [{"name": "s", "kind": "train", **SHORT}]),
        "weights are never downloaded",
    )


def test_resolved_recipe_leaves_out_unused_weights_keys(tmp_path):
    stages = [{"name": "s", "kind": "train", **SHORT}]
    d = validate(_recipe({"name": "resnet20"}, stages)).to_dict()
    assert d["model"] == {"name": "resnet20", "args": {}}  # as before weights existed: old runs resume
    path = tmp_path / "w.pt"
    torch.save(models.build("resnet20", in_channels=3, num_classes=4).state_dict(), path)
    r = validate(_recipe({"name": "resnet20", "weights": str(path), "strict": False}, stages))
    d = r.to_dict()
    assert d["model"] == {"name": "resnet20", "args": {}, "weights": str(path), "strict": False}
    assert validate(d).to_dict() == d


# ------------------------------------------------------------------------------ weights files
def test_safetensors_round_trip_and_a_corrupt_file(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).half(), "g": torch.tensor(3.5)}
    write_safetensors(t, str(tmp_path / "x.safetensors"))
    r = read_safetensors(str(tmp_path / "x.safetensors"))
    assert set(r) == set(t) and all(r[k].dtype == t[k].dtype and torch.equal(r[k], t[k]) for k in t)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="bad.safetensors: not a readable safetensors file"):
        read_safetensors(str(bad))


def test_weights_file_formats(tmp_path):
    src = models.build("resnet20", in_channels=3, num_classes=4)
    state = src.state_dict()
    write_safetensors(state, str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pt")
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pth")
    for f in ("w.safetensors", "ckpt.pt", "ddp.pth"):
        dst = models.build("resnet20", in_channels=3, num_classes=4)
        res = load_weights(dst, str(tmp_path / f))
        assert not res["missing"] and not res["unexpected"] and not res["shape"], f
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in state.items()), f
    (tmp_path / "junk.pt").write_bytes(b"not a file torch reads")
    with pytest.raises(WeightsError, match="junk.pt' is not a safetensors file"):
        read_state_dict(str(tmp_path / "junk.pt"))


def _bad_resnet18_weights(path):
    """A resnet18 state_dict (4 classes) with a key missing, one extra and one of another shape."""
    state = models.build("torchvision:resnet18", in_channels=3, num_classes=4).state_dict()
    del state["layer1.0.conv2.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(10, 512)
    torch.save(state, path)


def test_weights_that_do_not_fit_fail_at_run_start_naming_every_key(tmp_path):
    path = tmp_path / "bad.pt"
    _bad_resnet18_weights(path)
    raw = _recipe({"name": "torchvision:resnet18", "weights": str(path)}, [{"name": "s", "kind": "train", **SHORT}])
    out = tmp_path / "run"
    with pytest.raises(RunError) as e:
        _run(raw, out)
    msg = str(e.value)
    assert "bad.pt' does not fit the student (torchvision:resnet18):" in msg
    assert "missing from the file (1): layer1.0.conv2.weight" in msg
    assert "in the file but not in the model (1): extra.weight" in msg
    assert "shape differs (1): fc.weight (file (10, 512), model (4, 512))" in msg
    assert "strict: false" in msg and "Nothing was loaded" in msg
    assert not os.path.exists(out / "stages")  # before the first stage trained

    # strict: false loads what fits and says what it skipped
    raw["model"]["strict"] = False
    raw["stages"] = [{"name": "eval", "kind": "evaluate"}]
    _, lines = _run(raw, tmp_path / "run2")
    log = "\n".join(lines)
    fits = len(models.build("torchvision:resnet18", in_channels=3, num_classes=4).state_dict()) - 2
    assert f"loaded {fits} tensors from {path}" in log and "(strict: false; skipped:" in log
    assert "layer1.0.conv2.weight" in log and "extra.weight" in log and "fc.weight (file (10, 512)" in log


def test_strict_false_weights_reach_the_model(tmp_path):
    path = tmp_path / "w.safetensors"
    src = models.build("torchvision:resnet18", in_channels=3, num_classes=10)
    write_safetensors(src.state_dict(), str(path))  # another number of classes: a new classifier
    dst = models.build("torchvision:resnet18", in_channels=3, num_classes=4)
    fc_before = dst.fc.weight.detach().clone()
    lines = []
    res = load_weights(dst, str(path), strict=False, log=lines.append)
    assert [k for k, _, _ in res["shape"]] == ["fc.weight", "fc.bias"]
    assert torch.equal(dst.conv1.weight, src.conv1.weight) and torch.equal(dst.fc.weight, fc_before)
    assert "shape differs (2): fc.weight (file (10, 512), model (4, 512)), fc.bias" in lines[0]
    with pytest.raises(WeightsError, match="none of its"):
        load_weights(models.build("lenet5", in_channels=1, num_classes=4), str(path), strict=False)


# ------------------------------------------------------------------------------ end to end
PRUNE = {"criterion": "layer_magnitude", "sparsity": 0.5}
QUANT = {"weight_bits": 4, "act_bits": 8, "calib_batches": 1, "last": {"weight_bits": 8}}


@pytest.mark.parametrize(
    "student,args,teacher,in_channels",
    [
        ("mobilenet_v2", {"width_mult": 0.35}, "resnet18", 1),
        ("resnet18", {}, "mobilenet_v2", 3),
    ],
)
def test_torchvision_kd_prune_qat_export_end_to_end(tmp_path, student, args, teacher, in_channels):
    # the teacher starts from a weights file (safetensors for one, a torch state_dict for the other)
    t = models.build(f"torchvision:{teacher}", in_channels=in_channels, num_classes=4)
    tpath = str(tmp_path / ("teacher.safetensors" if in_channels == 1 else "teacher.pt"))
    write_safetensors(t.state_dict(), tpath) if tpath.endswith(".safetensors") else torch.save(t.state_dict(), tpath)
    if student == "mobilenet_v2":  # KD, pruning and QAT one stage after the other
        stages = [
            {"name": "kd", "kind": "distill", **SHORT, "distill": KD},
            {"name": "prune", "kind": "prune", **SHORT, "distill": KD, "prune": PRUNE},
            {"name": "qat", "kind": "quantize", **SHORT, "distill": KD, "quantize": QUANT},
        ]
    else:  # resnet18's 11M parameters: the three in one stage (each stage writes its checkpoints)
        stages = [{"name": "qat", "kind": "quantize", **SHORT, "distill": KD, "prune": PRUNE, "quantize": QUANT}]
    raw = _recipe(
        {"name": f"torchvision:{student}", "args": args},
        stages + [{"name": "export", "kind": "export", "formats": ["pcz"]}],
        teacher={"name": f"torchvision:{teacher}", "weights": tpath},
        in_channels=in_channels,
    )
    out = tmp_path / "run"
    report, lines = _run(raw, out)
    assert [s["status"] for s in report["stages"]] == ["done"] * len(raw["stages"])
    assert any(f"loaded {len(t.state_dict())} tensors from {tpath}" in line for line in lines)
    # every layer of the final student, with its treatment
    final, _ = load_model(str(out / "stages" / f"{len(stages) - 1:02d}-qat" / "best.pt"))
    rows = {r["layer"]: r for r in report["layers"]["rows"]}
    convs = [n for n, m in final.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert convs and all(rows[n]["weight_bits"] in (4, 8) and rows[n]["act_bits"] == 8 for n in convs)
    assert all(rows[n]["sparsity"] == pytest.approx(0.5, abs=0.02) for n in convs)
    assert rows[convs[-1]]["weight_bits"] == 8
    bns = [n for n, m in final.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(rows[n]["float"].startswith("BatchNorm: float") for n in bns)
    assert set(rows) == set(convs) | set(bns)
    md = (out / "report.md").read_text()
    assert "## Layers" in md and md.index("## Layers") < md.index("## Stages")
    assert f"| `{convs[0]}` | QuantConv2d |" in md and "quantized: 4-bit weights (per channel), 8-bit input" in md
    assert "pruned: 50.0% of the weights are 0" in md
    # the artifact records the torchvision name and loads back
    art = export.load(str(out / "model.pcz"))
    assert art.artifact.manifest["arch"]["model"] == f"torchvision:{student}"
    x = torch.randn(4, in_channels, 32, 32)
    pcz = {a["format"]: a for a in report["artifacts"]}["pcz"]
    assert pcz["agreement"] == 1.0
    assert art(x).shape == (4, 4)


def test_import_model_through_every_stage_and_its_artifact(tmp_path, monkeypatch):
    pytest.importorskip("torch_pruning", reason="the slim stage needs torch-pruning (installed by scripts/setup.sh)")
    mod = _write_module(
        tmp_path,
        monkeypatch,
        """
        import torch
        import torch.nn as nn


        class Gain(nn.Module):  # a layer the engine does not know, with a weight
            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.ones(1))

            def forward(self, x):
                return x * self.weight


        class HalfConv(nn.Conv2d):  # a Conv2d subclass with its own forward
            def forward(self, x):
                return super().forward(x) * 0.5


        def make_net(in_channels, num_classes, width=16):
            return nn.Sequential(
                nn.ConvTranspose2d(in_channels, 4, 1),
                nn.Conv2d(4, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                HalfConv(width, width, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=2, dilation=2, groups=2, bias=False),  # grouped, dilated
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                Gain(),
                nn.Linear(width, num_classes),
            )
        """,
    )
    name = f"import:{mod}:make_net"
    teach = {"name": "teacher", "kind": "train", "target": "teacher", **SHORT}
    raw = _recipe(
        {"name": name},
        [
            teach,
            {
                "name": "slim",
                "kind": "slim",
                **SHORT,
                "distill": KD,
                # the groups of the Conv2d subclass and of the grouped conv keep their channels
                "slim": {"criterion": "l1", "ratio": 0.5, "round_to": 2, "exclude": ["^4$", "^6$"]},
            },
            {
                "name": "prune",
                "kind": "prune",
                **SHORT,
                "distill": KD,
                "prune": {"criterion": "layer_magnitude", "sparsity": 0.5},
            },
            {
                "name": "qat",
                "kind": "quantize",
                **SHORT,
                "quantize": {"weight_bits": 4, "act_bits": 8, "calib_batches": 1},
            },
        ],
        teacher={"name": name, "args": {"width": 8}},
        in_channels=1,
        size=16,
    )
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report, _ = _run(raw, out)
    assert any("left float: '4'" in str(w.message) and "HalfConv" in str(w.message) for w in caught)
    assert [s["status"] for s in report["stages"]] == ["done"] * 5
    assert report["stages"][1]["slim"]["params_ratio"] < 0.8  # slimming removed channels
    rows = {r["layer"]: r for r in report["layers"]["rows"]}
    assert all(rows[n]["weight_bits"] == 4 and rows[n]["sparsity"] is not None for n in ("1", "6", "12"))
    assert rows["4"]["weight_bits"] is None and rows["4"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert "HalfConv (a subclass of nn.Conv2d with its own forward)" in rows["4"]["float"]
    assert rows["0"]["type"] == "ConvTranspose2d" and "not a layer type the engine quantizes" in rows["0"]["float"]
    assert rows["0"]["sparsity"] is None
    assert rows["11"]["type"] == "Gain" and rows["11"]["float"].startswith("left float")
    final, _ = load_model(str(out / "stages" / "03-qat" / "best.pt"))
    assert final[1].out_channels == 8  # slimmed
    assert (final[6].groups, final[6].dilation) == (2, (2, 2)) and type(final[6]).__name__ == "QuantConv2d"
    assert type(final[4]).__name__ == "HalfConv" and type(final[0]) is nn.ConvTranspose2d
    # the artifact records the import path; it loads where the module imports, and elsewhere the
    # error names the module
    art_path = str(out / "model.pcz")
    art = export.load(art_path)
    assert art.artifact.manifest["arch"]["model"] == name and art.artifact.manifest["arch"]["slim"]
    with torch.no_grad():
        assert torch.equal(art(torch.zeros(2, 1, 16, 16)).argmax(1), final.eval()(torch.zeros(2, 1, 16, 16)).argmax(1))
    res = run_cli(["eval", art_path])
    assert res.returncode != 0
    assert f"cannot import module {mod!r}" in res.stderr and "PYTHONPATH" in res.stderr, res.stderr[-2000:]


def test_import_model_with_the_wrong_number_of_outputs_fails_at_run_start(tmp_path, monkeypatch):
    mod = _write_module(
        tmp_path,
        monkeypatch,
        """
        import torch.nn as nn

        def fixed(in_channels):  # ignores the dataset's classes
            return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
        """,
    )
    raw = _recipe({"name": f"import:{mod}:fixed"}, [{"name": "s", "kind": "train", **SHORT}], size=8)
    with pytest.raises(RunError, match=r"gives \(2, 10\) for a batch of 2 images; the dataset has 4 classes"):
        _run(raw, tmp_path / "run")
    assert not os.path.exists(tmp_path / "run" / "stages")


# ------------------------------------------------------------------------------ QAT leaves unknown layers float
class _Attention(nn.Module):
    """Uses its Linear's weight directly (as torchvision's Swin does): the Linear's forward never runs."""

    def __init__(self, c):
        super().__init__()
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.attn = _Attention(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.attn(self.pool(self.conv(x)).flatten(1)))


@pytest.mark.filterwarnings("ignore:calibrate. activation quantizer")
def test_layers_whose_forward_does_not_run_stay_float():
    from pycompress.quant import prepare_qat, qat_modules, quantize_post_training
    from pycompress.quant.qat import unquantizable_layers

    x = torch.randn(8, 1, 6, 6)
    assert "attn.proj" in unquantizable_layers(_Net(), x)
    net = _Net()
    with pytest.warns(UserWarning, match="left float: 'attn.proj'"):
        plan = prepare_qat(net, {"weight_bits": 4, "act_bits": 8}, example_input=x)
    assert set(plan) == {"conv", "fc"} and type(net.attn.proj) is nn.Linear
    net = _Net()  # without a probe batch, PTQ finds it during calibration and puts it back to float
    with pytest.warns(UserWarning, match=r"left float: \['attn.proj'\]"):
        res = quantize_post_training(net, {"weight_bits": 4, "act_bits": 8}, [x], num_batches=1)
    assert set(res["plan"]) == set(qat_modules(net)) == {"conv", "fc"} and type(net.attn.proj) is nn.Linear


def test_report_json_has_layers(tmp_path):
    """The zoo path too: report.json's layers and report.md's section for a plain float run."""
    raw = _recipe(
        {"name": "mobilenet_student", "args": {"width_mult": 0.5}},
        [{"name": "s", "kind": "train", **SHORT}],
        in_channels=1,
        size=16,
    )
    report, _ = _run(raw, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["layers"]["rows"] == report["layers"]["rows"]
    floats = {r["type"]: r["float"] for r in report["layers"]["rows"]}
    assert floats["Conv2d"] == floats["Linear"] == "no quantization stage"
    assert floats["BatchNorm2d"].startswith("BatchNorm: float")
