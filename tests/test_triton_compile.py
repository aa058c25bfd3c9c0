"""`pycompress bench triton-compile`: the Triton kernels compiled for sm_90 without a GPU.

The command runs in its own process (Triton decorates kernels for the interpreter or the compiler
when it is imported, and the suite runs under TRITON_INTERPRET=1)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

from pycompress import cli  # noqa: E402
from pycompress.bench import triton_compile as tc  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:
        return False


needs_nvidia = pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton without its CUDA backend")


def _without_interpreter() -> dict:
    """This process's environment less TRITON_INTERPRET (the compiler needs a process without it)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _command(*args, timeout=900, env=None):
    return subprocess.run(
        [sys.executable, "-m", "pycompress.cli", "bench", "triton-compile", *args],
        env=env or os.environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_programs_per_sm_counts_registers_warps_and_shared_memory():
    # registers are allocated per warp in units of 256: 255 -> 256 per thread, 8192 per warp
    assert tc.programs_per_sm(90, 255, 4, 0) == 2
    assert tc.programs_per_sm(90, 64, 8, 0) == 4
    assert tc.programs_per_sm(90, 57, 8, 0) == 4  # rounded up to 64
    assert tc.programs_per_sm(90, 32, 4, 0) == 16  # 64 warps per SM
    assert tc.programs_per_sm(90, 16, 1, 0) == 32  # 32 blocks per SM
    assert tc.programs_per_sm(86, 32, 4, 0) == 12  # 48 warps per SM
    assert tc.programs_per_sm(90, 32, 4, 100_000) == 2
    assert tc.programs_per_sm(80, 32, 4, 100_000) == 1
    assert tc.programs_per_sm(90, 32, 4, 240_000) == 0  # more shared memory than a block may have
    assert tc.programs_per_sm(90, 256, 1, 0) == 0  # more than 255 registers


@needs_nvidia
def test_quick_compiles_every_kernel_for_sm90(tmp_path):
    out = tmp_path / "quick.json"
    # under TRITON_INTERPRET=1 (as the suite runs) the command restarts itself without it
    r = _command("--quick", "--json", str(out), env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    rows, facts = data["rows"], data["facts"]
    assert facts["arch"] == "sm_90" and facts["triton"] == triton.__version__
    expected = set(facts["kernels_expected"])
    assert len(expected) == 16  # 4 sparse-mask, 6 fake-quantize, 6 depthwise kernels
    assert {r["kernel"] for r in rows} == expected
    assert all(r["status"] == "ok" for r in rows)
    assert all(1 <= r["regs"] <= 255 and r["programs_per_sm"] >= 1 and r["local_bytes"] is not None for r in rows)
    # the compiled path, not the interpreter's: native bf16 conversions, the GPU's autotune configs
    assert all("SOFT_BF16=1" not in r["config"] for r in rows)
    from pycompress.kernels import depthwise

    fwd = [r for r in rows if r["kernel"].endswith(":_depthwise_fwd_kernel)")]
    assert len({(r["config"], r["num_warps"]) for r in fwd}) == len(depthwise._GPU_CONFIGS)
    # the int64-offset paths (tensors past 2**31 elements, as meta tensors)
    i64 = {r["kernel"].split(":")[1].rstrip(")") for r in rows if "I64=1" in r["config"]}
    assert {"_pack_mask_kernel", "_apply_mask_kernel", "_masked_sgd_step_kernel", "_fake_quantize_fwd_kernel"} <= i64
    assert "0 failed; 16 kernels" in r.stdout
    # the bandwidth-bound kernels' full tiles move 16 bytes per load and store (LDG.E.128 /
    # STG.E.128 in the SASS), as copy speed on the GPU needs
    for name in (
        "_apply_mask_kernel",
        "_masked_sgd_step_kernel",
        "_fake_quantize_fwd_kernel",
        "_fake_quantize_fwd_cols_kernel",
        "_fake_quantize_bwd_kernel",
        "_fake_quantize_bwd_learnable_kernel",
    ):
        kernel_rows = [r for r in rows if r["kernel"].endswith(f":{name})")]
        assert kernel_rows, name
        for r in kernel_rows:
            assert r["loads_16b"] > 0 and r["stores_16b"] > 0, (name, r["case"], r["config"])


@needs_nvidia
def test_a_kernel_the_compiler_rejects_is_reported(tmp_path):
    """The interpreter runs tl.arange over 48 elements; the compiler requires a power of two."""
    script = tmp_path / "bad_kernel.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch, triton, triton.language as tl
            from pycompress.bench import triton_compile as tc
            from triton.runtime.jit import JITFunction

            @triton.jit
            def good(x_ptr, BLOCK: tl.constexpr):
                i = tl.arange(0, BLOCK)
                tl.store(x_ptr + i, tl.load(x_ptr + i) * 2)

            @triton.jit
            def bad(x_ptr, BLOCK: tl.constexpr):
                i = tl.arange(0, BLOCK)
                tl.store(x_ptr + i, tl.load(x_ptr + i) * 2)

            original = JITFunction.run
            x = torch.empty(64, device="meta")
            with tc.compile_only(90) as records:
                good[(1,)](x, BLOCK=64)
                try:
                    bad[(1,)](x, BLOCK=48)
                except Exception as exc:
                    print("raised", type(exc).__name__)
            assert JITFunction.run is original  # restored
            (g, *_, gk, _), (b, *_, bk, _) = records
            assert "good" in g and not isinstance(gk, Exception) and gk.asm["cubin"]
            assert "bad" in b and isinstance(bk, Exception)
            print("error:", tc._error_text(bk))

            # through run(): the kernel's row fails, and so does a launcher that raises by itself
            def raises():
                raise ValueError("bad shape")

            tc.CASE_GROUPS["broken"] = lambda: [
                tc.Case("bad kernel", lambda: bad[(1,)](x, BLOCK=24)),
                tc.Case("bad launcher", raises),
                tc.Case("good kernel", lambda: good[(1,)](x, BLOCK=32)),
            ]
            rows, facts = tc.run(ops=["broken"])
            by_case = {r.case: r for r in rows}
            assert by_case["bad kernel"].status.startswith("FAILED (CompilationError"), by_case
            assert by_case["bad launcher"].kernel == "(launcher)"
            assert by_case["bad launcher"].status == "FAILED (ValueError: bad shape)"
            assert by_case["good kernel"].status == "ok" and by_case["good kernel"].regs > 0
            """
        )
    )
    env = _without_interpreter()
    # the checkout first: pycompress importable from the script's directory without an install too
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "raised CompilationError" in r.stdout
    assert "power of 2" in r.stdout


def test_compile_only_refuses_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the suite runs under TRITON_INTERPRET=1; this checks the refusal there")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with tc.compile_only(90):
            pass


def test_bad_arguments_are_usage_errors(capsys):
    env = _without_interpreter()
    r = _command("--arch", "75", env=env, timeout=300)
    assert r.returncode == 2 and "--arch 75" in r.stderr
    r = _command("--op", "conv", env=env, timeout=300)
    assert r.returncode == 2 and "unknown op 'conv'" in r.stderr
    assert cli.main(["bench", "triton-compile", "--case", "no such case", "--op", "sparse_mask"]) == 2


@needs_nvidia
@pytest.mark.slow
def test_every_case_compiles_for_sm90(tmp_path):
    """Every launcher strategy, dtype, geometry and autotune config (about 250 specializations, about 3
    minutes on two cores)."""
    out = tmp_path / "full.json"
    env = _without_interpreter()
    r = _command("--json", str(out), env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 200 and all(r["status"] == "ok" for r in rows)
    assert {r["dtypes"].split(",")[0] for r in rows} >= {"float32", "float16", "bfloat16"}
