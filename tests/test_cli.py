"""The command line: info, bench ops and bench overhead."""

import json
import subprocess
import sys

import pytest

from pycompress import backends
from pycompress.cli import main


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in backends.BACKENDS:
        assert f"backend {name}" in out
    assert "op fake_quantize" in out


def test_bench_ops_checks_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    # --cold-heap: the default (warm heap) would change glibc's settings for the rest of this process
    assert (
        main(
            [
                "bench",
                "ops",
                "--op",
                "fake_quantize",
                "--size",
                "8192",
                "--device",
                "cpu",
                "--json",
                str(path),
                "--cold-heap",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "# CPU allocator: default" in out
    assert "| backend | shape | dtype | median ms | GB/s | % of copy | vs torch | check |" in out
    data = json.loads(path.read_text())
    rows = data["rows"]
    cases = {r["case"] for r in rows}
    assert {"fwd per-tensor", "fwd+bwd learnable per-tensor"} <= cases
    timed = [r for r in rows if r["backend"] not in ("torch", "copy")]
    assert {r["backend"] for r in timed} >= {"reference"}
    assert all(r["check"] == "ok" for r in timed)
    assert all(r["median_ms"] > 0 for r in rows if r["backend"] != "torch" or r["speedup_vs_torch"])
    assert data["machine"]["torch"]
    assert data["machine"]["allocator"] == "default"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_bench_warm_heap_is_set_in_a_fresh_process():
    """The bench's default keeps glibc's heap warm (mallopt accepted); run in a child process so the
    setting does not leak into this test session."""
    code = "from pycompress.bench.ops import _warm_heap; print(_warm_heap())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("glibc heap kept warm"), out


def test_bench_ops_reports_a_mismatch(monkeypatch, capsys):
    import pycompress.bench.ops as bench_ops

    real = bench_ops._fq_cases

    def broken(device, n, dtype):
        cases = real(device, n, dtype)[:1]
        run = cases[0].run
        cases[0].run = lambda inp, b: run(inp, b) + (1.0 if b != "reference" else 0.0)
        return cases

    monkeypatch.setitem(bench_ops.OPS, "fake_quantize", broken)
    code = main(["bench", "ops", "--size", "4096", "--device", "cpu", "--backend", "reference"])
    assert code == 0  # reference vs itself cannot mismatch
    if "cpu" in backends.available("fake_quantize"):
        assert main(["bench", "ops", "--size", "4096", "--device", "cpu", "--backend", "cpu"]) == 1
        assert "MISMATCH" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,words",
    [
        (["bench", "ops", "--op", "nope", "--size", "64"], "unknown op"),
        (["bench", "ops", "--backend", "fastest"], "--backend"),
        (["bench", "ops", "--size", "0"], "positive integer"),
    ],
)
def test_bench_ops_bad_arguments(argv, words, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    assert code == 2
    assert words in capsys.readouterr().err


def test_bench_explicit_backend_that_cannot_run_is_skipped_with_reason(capsys):
    assert (
        main(["bench", "ops", "--size", "4096", "--device", "cpu", "--backend", "cuda", "--case", "fwd per-tensor"])
        == 0
    )
    assert "skip cuda: backend 'cuda' cannot run fake_quantize" in capsys.readouterr().out


def test_bench_ops_depthwise_cases_build_and_check(capsys):
    """Every depthwise bench case builds its inputs and passes the reference check (the cpu backend
    on the channels_last cases, the ones whose kernels changed most recently)."""
    import torch

    from pycompress.bench import ops as bench_ops

    cases = bench_ops._dw_cases(torch.device("cpu"), 0, torch.float32)
    names = [c.name for c in cases]
    assert {"3x3 fwd NCHW", "3x3 fwd channels_last", "3x3 fwd+bwd channels_last", "5x5 fwd channels_last"} <= set(names)
    backend = "cpu" if "cpu" in backends.available("depthwise_conv2d") else "reference"
    assert (
        main(
            [
                "bench",
                "ops",
                "--op",
                "depthwise",
                "--case",
                "channels_last",
                "--device",
                "cpu",
                "--backend",
                backend,
                "--cold-heap",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count(f"| {backend} | 32x128x28x28 | float32 |") == 3 and "FAILED" not in out


def test_bench_overhead_prints_a_row_per_backend_and_writes_json(tmp_path, capsys):
    path = tmp_path / "overhead.json"
    assert (
        main(
            ["bench", "overhead", "--op", "apply_mask", "--backend", "reference", "--repeats", "1", "--json", str(path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| apply_mask | 8x8 | reference | fwd+bwd |" in out and "| apply_mask | 8x8 | torch |" in out
    rows = json.loads(path.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["reference", "torch"]
    assert all(r["median_us"] > 0 and r["min_us"] <= r["median_us"] for r in rows)
    assert main(["bench", "overhead", "--op", "no_such_op"]) == 2
    assert main(["bench", "overhead", "--backend", "gpu"]) == 2
