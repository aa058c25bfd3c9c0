import json
import math

import pytest
import torch
import torch.nn as nn

from pycompress.prune.report import SparsityReport, TensorRow, sparsity_report


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, 4)


def _tiny():
    m = Tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1.0)
        m.bn.bias.zero_()  # 0 / 3
        m.conv.weight[1] = 0.0  # a whole filter: 18 zeros
        m.conv.weight[:, 0] = 0.0  # a whole input channel: 18 more (filter 1 already zero)
        m.conv.weight[0, 1, 0, 0] = 0.0  # one single element -> 37 zeros, 17 nonzero
        m.conv.bias[1] = 0.0  # 2 / 3
        m.fc.weight[3] = 0.0  # a whole row: 12 zeros
        m.fc.weight[:, 5] = 0.0  # a whole column: 3 more
        m.fc.weight[0, 0] = 0.0
        m.fc.weight[1, 1] = -0.0  # negative zero counts as zero -> 17 zeros, 31 nonzero
    return m


EXPECTED = {
    # name: (shape, total, nonzero, alive_in, total_in, alive_out, total_out)
    "conv.weight": ((3, 2, 3, 3), 54, 17, 1, 2, 2, 3),
    "conv.bias": ((3,), 3, 2, None, None, None, None),
    "bn.weight": ((3,), 3, 3, None, None, None, None),
    "bn.bias": ((3,), 3, 0, None, None, None, None),
    "fc.weight": ((4, 12), 48, 31, 11, 12, 3, 4),
    "fc.bias": ((4,), 4, 4, None, None, None, None),
}


def test_rows_by_hand():
    rep = sparsity_report(_tiny())
    assert isinstance(rep, SparsityReport)
    assert [r.name for r in rep.rows] == list(EXPECTED)  # parameters only, no BN buffers
    for r in rep.rows:
        assert isinstance(r, TensorRow)
        shape, total, nonzero, a_in, t_in, a_out, t_out = EXPECTED[r.name]
        assert r.shape == shape
        assert (r.total, r.nonzero, r.pruned) == (total, nonzero, total - nonzero)
        assert r.density == nonzero / total
        assert (r.alive_in, r.total_in, r.alive_out, r.total_out) == (a_in, t_in, a_out, t_out)
        assert r.selected is False


def test_totals_by_hand():
    rep = sparsity_report(_tiny())
    assert rep.total == 115
    assert rep.alive == 57
    assert rep.pruned == 58
    assert rep.sparsity == 58 / 115
    assert rep.compression_rate == 115 / 57
    assert rep.selected_total is None and rep.selected_sparsity is None and not rep.has_selection


def test_selected_by_hand():
    rep = sparsity_report(_tiny(), selected=["conv.weight", "fc.weight"])
    assert [r.name for r in rep.rows if r.selected] == ["conv.weight", "fc.weight"]
    assert rep.selected_total == 102
    assert rep.selected_alive == 48
    assert rep.selected_pruned == 54
    assert rep.selected_sparsity == 54 / 102
    assert rep.selected_compression_rate == 102 / 48
    assert rep.total == 115 and rep.alive == 57  # overall totals unchanged
    empty_sel = sparsity_report(_tiny(), selected=[])
    assert empty_sel.selected_total == 0 and empty_sel.selected_sparsity == 0.0


def test_format_footer():
    text = sparsity_report(_tiny()).format()
    assert "alive: 57, pruned: 58, total: 115, compression rate: 2.02x (50.43% pruned)" in text
    assert "selected" not in text
    lines = text.splitlines()
    assert len(lines) == 2 + 6 + 1
    assert len({len(ln) for ln in lines[:-1]}) == 1  # fixed width table
    conv_line = next(ln for ln in lines if ln.startswith("conv.weight"))
    assert "17 / 54" in conv_line and "31.48%" in conv_line and "37" in conv_line
    assert "(3, 2, 3, 3)" in conv_line and "1/2" in conv_line and "2/3" in conv_line

    text = sparsity_report(_tiny(), selected=["conv.weight", "fc.weight"]).format()
    assert "conv.weight *" in text
    assert text.splitlines()[-1] == (
        "selected (2 tensors): alive: 48, pruned: 54, total: 102, compression rate: 2.12x (52.94% pruned)"
    )
    assert str(sparsity_report(_tiny())) == sparsity_report(_tiny()).format()


def test_to_dict_json():
    rep = sparsity_report(_tiny(), selected={"conv.weight"})
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["total"] == 115 and d["alive"] == 57 and d["pruned"] == 58
    assert d["compression_rate"] == pytest.approx(115 / 57)
    assert d["selected"] == {
        "names": ["conv.weight"],
        "total": 54,
        "alive": 17,
        "pruned": 37,
        "sparsity": 37 / 54,
        "compression_rate": 54 / 17,
    }
    row = d["rows"][0]
    assert row == {
        "name": "conv.weight",
        "shape": [3, 2, 3, 3],
        "total": 54,
        "nonzero": 17,
        "pruned": 37,
        "density": 17 / 54,
        "alive_in": 1,
        "total_in": 2,
        "alive_out": 2,
        "total_out": 3,
        "selected": True,
    }
    assert d["rows"][1]["alive_in"] is None
    assert sparsity_report(_tiny()).to_dict()["selected"] is None


def test_all_zero_model():
    m = _tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    rep = sparsity_report(m, selected=["fc.weight"])
    assert rep.alive == 0 and rep.pruned == 115 and rep.sparsity == 1.0
    assert math.isinf(rep.compression_rate) and math.isinf(rep.selected_compression_rate)
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["compression_rate"] is None and d["selected"]["compression_rate"] is None
    assert d["rows"][0]["alive_in"] == 0 and d["rows"][0]["alive_out"] == 0
    assert "compression rate: inf (100.00% pruned)" in rep.format()


def test_markdown():
    md = sparsity_report(_tiny(), selected=["fc.weight"]).to_markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| name |") and lines[1].startswith("|---|")
    assert sum(ln.startswith("| ") for ln in lines) == 1 + 6
    assert all(ln.count("|") == 8 for ln in lines[:8])
    assert "| fc.weight * | 31 / 48 |" in md
    assert "alive: 57, pruned: 58, total: 115" in md
    assert "selected (1 tensor): alive: 31, pruned: 17, total: 48" in md
    assert "| (4,) |" in md


def test_errors_and_options():
    with pytest.raises(ValueError, match=r"\['bn.running_mean', 'nope'\]"):
        sparsity_report(_tiny(), selected=["conv.weight", "nope", "bn.running_mean"])
    with pytest.raises(TypeError, match="single str"):
        sparsity_report(_tiny(), selected="conv.weight")
    with pytest.raises(TypeError, match="nn.Module"):
        sparsity_report({"w": torch.ones(2)})
    rep = sparsity_report(_tiny(), selected=["bn.running_mean"], params_only=False)
    names = [r.name for r in rep.rows]
    assert "bn.running_mean" in names and "bn.running_var" in names
    assert "bn.num_batches_tracked" not in names  # integer buffer
    assert rep.total == 115 + 6 and rep.selected_total == 3 and rep.selected_alive == 0  # running_mean = 0


def test_empty_model_and_empty_tensor():
    rep = sparsity_report(nn.Module())
    assert rep.rows == [] and rep.total == 0 and rep.compression_rate == 1.0 and rep.sparsity == 0.0
    json.dumps(rep.to_dict(), allow_nan=False)
    rep.format()
    m = nn.Module()
    m.w = nn.Parameter(torch.empty(0, 3))
    rep = sparsity_report(m)
    r = rep.rows[0]
    assert (r.total, r.nonzero, r.density, r.alive_in, r.total_in, r.alive_out, r.total_out) == (0, 0, 1.0, 0, 3, 0, 0)
