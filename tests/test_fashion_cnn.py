"""fashion_cnn: the small VGG-style CNN of recipes/fashion_best.yaml (issue 17)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pycompress import export, models, prune, quant


def test_shapes_params_and_args():
    m = models.build("fashion_cnn", in_channels=1, num_classes=10)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64]
    assert all(c.bias is None for c in convs)
    # 3x3 convs 1-16-16-32-32-64-64, BN (2 per channel), linear 64 -> 10
    n_conv = 9 * (16 + 16 * 16 + 16 * 32 + 32 * 32 + 32 * 64 + 64 * 64)
    assert sum(p.numel() for p in m.parameters()) == n_conv + 2 * 224 + 650
    m2 = models.build("fashion_cnn", in_channels=3, num_classes=7, widths=[8, 12], depth=1, dropout=0.2)
    assert m2(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert any(isinstance(mod, nn.Dropout) for mod in m2.modules())
    for bad in ({"widths": []}, {"widths": [16, 0]}, {"widths": "16"}, {"depth": 0}, {"dropout": 1.0}):
        with pytest.raises(ValueError, match="fashion_cnn"):
            models.build("fashion_cnn", in_channels=1, num_classes=10, **bad)


def test_every_bn_folds_and_pruned_4bit_roundtrip():
    torch.manual_seed(0)
    m = models.build("fashion_cnn", in_channels=1, num_classes=10)
    pairs, why = export.bn_fold_pairs(m)
    assert why is None and len(pairs) == 6
    x = torch.randn(8, 1, 28, 28)
    m.train()
    with torch.no_grad():
        m(x)  # running statistics away from the defaults
    prune.prune_model(m, {"criterion": "global_magnitude", "sparsity": 0.7, "first": False})
    quant.prepare_qat(m, {"weight_bits": 4, "act_bits": 8, "first": {"weight_bits": 8}, "last": {"weight_bits": 8}})
    quant.calibrate(m, [x], 1)
    m.eval()
    manifest, payload = export.encode(m)
    assert manifest["bn_folding"]["folded"] == 6
    assert sum(1 for r in manifest["tensors"] if r.get("sparse")) >= 5
    art = export.decode(manifest, payload)
    with torch.no_grad():
        assert (m(x).argmax(1) == art(x).argmax(1)).float().mean() >= 0.75
