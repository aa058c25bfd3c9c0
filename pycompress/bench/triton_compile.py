"""`pycompress bench triton-compile`: every Triton kernel compiled for an NVIDIA GPU, without one.

The Triton interpreter (how the test suite runs the Triton backend on a CPU) executes the kernels'
Python, not what the GPU runs: it never meets Triton's compiler (its type rules, layouts and
constexpr-only shapes), LLVM or ptxas, and it runs its own block sizes (depthwise has a single
interpreter config). This command closes that gap on any machine with Triton's CUDA backend
installed (it brings its own ptxas): it calls every launcher of ``pycompress.kernels`` with the
arguments a GPU run would get, on meta tensors (no memory, so the int64-offset paths of tensors
past 2**31 elements are covered too), while a stand-in driver reports the target GPU (compute
capability 9.0, the H100 / H200, unless --arch says otherwise) and the JIT compiles down to a cubin
instead of launching. Autotuned kernels compile every config (the stand-in benchmark times them all
equal), so every tile shape a GPU could pick has passed ptxas.

For each compiled specialization the table gives the kernel, the case that reached it, its constexpr
meta-parameters, warps, registers per thread, local-memory (spill) and stack bytes (from the cubin,
via cuobjdump), shared memory, how many programs fit one SM by registers, warps and shared memory,
how many of its global loads and stores in the SASS move 16 bytes, and the compile time. A
specialization fails the check when it does not compile or would not launch (more registers or
shared memory than one block may have); the command then exits non-zero.

Not checked: results (only a GPU runs the kernels: ``scripts/gpu_check.sh``), occupancy limits other
than the three above, and Triton versions other than the installed one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import traceback
from typing import Callable, Iterator, Optional

import torch

# Per-SM limits by compute capability: (32-bit registers, resident warps, resident blocks, shared
# memory one block may use in bytes). CUDA C Programming Guide, "Compute Capabilities".
ARCH_LIMITS = {
    80: (65536, 64, 32, 166912),
    86: (65536, 48, 16, 101376),
    89: (65536, 48, 24, 101376),
    90: (65536, 64, 32, 232448),
    100: (65536, 64, 32, 232448),
    120: (65536, 48, 32, 101376),
}
MAX_REGS_PER_THREAD = 255

# Launch options that are not meta-parameters of the kernel (left out of the table's config column).
_OPTION_KEYS = {"debug", "instrumentation_mode", "enable_fp_fusion", "num_warps", "num_stages", "num_ctas"}


@dataclasses.dataclass
class Row:
    kernel: str  # module:function
    case: str
    config: str  # the constexpr meta-parameters, key=value
    dtypes: str  # the dtypes of the tensor arguments, in order
    num_warps: int
    regs: Optional[int]  # registers per thread (None: no cuobjdump)
    local_bytes: Optional[int]  # local memory per thread: spills and stack-allocated arrays
    stack_bytes: Optional[int]
    shared_bytes: int
    programs_per_sm: Optional[int]
    compile_s: float
    status: str  # "ok" or what failed
    # global-memory instructions in the SASS (static counts, every path of the kernel: full tiles and
    # edges): loads / stores in all, and how many move 16 bytes (LDG.E.128 / STG.E.128)
    loads: Optional[int] = None
    loads_16b: Optional[int] = None
    stores: Optional[int] = None
    stores_16b: Optional[int] = None


@dataclasses.dataclass
class Case:
    name: str
    call: Callable[[], object]
    quick: bool = False  # in the --quick subset (every kernel at least once)


# ---------------------------------------------------------------------------------------------
# the stand-in driver and the compile-only JIT


class _CompileOnlyDriver:
    """What JITFunction.run and the autotuner ask of the active driver, for a GPU that is not there:
    the target, a device and stream number, and a benchmarker that only calls the kernel (which
    compiles it) and reports every config equally fast."""

    def __init__(self, arch: int, warp_size: int = 32):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, warp_size)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kw):
            kernel_call()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench


def _describe_args(fn, args, kwargs) -> tuple[str, str]:
    names = list(getattr(fn, "arg_names", []))
    bound = dict(zip(names, args))
    bound.update(kwargs)
    dtypes = [str(v.dtype).replace("torch.", "") for v in bound.values() if isinstance(v, torch.Tensor)]
    params = {p.name: p for p in getattr(fn, "params", [])}
    config = [
        f"{k}={int(v) if isinstance(v, bool) else v}"
        for k, v in bound.items()
        if k in params and params[k].is_constexpr and isinstance(v, (bool, int, str)) and k not in _OPTION_KEYS
    ]
    return " ".join(config), ",".join(dtypes)


@contextlib.contextmanager
def compile_only(arch: int, seen: Optional[set] = None) -> Iterator[list]:
    """Within the block, launches of @triton.jit kernels compile for `arch` and do not run. Yields
    the list that collects one (kernel, config, dtypes, num_warps, compiled kernel or exception,
    seconds) per specialization not in `seen` (ids of compiled kernels, updated)."""
    from triton.language import standard
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") == "1" or not isinstance(standard.cdiv, JITFunction):
        raise RuntimeError(
            "triton-compile needs Triton's compiler, not its interpreter: run it in a process started "
            "without TRITON_INTERPRET=1 (Triton decorates its kernels when it is imported)"
        )
    records: list = []
    seen = set() if seen is None else seen
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        config, dtypes = _describe_args(self, args, kwargs)
        t0 = time.perf_counter()
        try:
            kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # recorded, then raised to the caller (the autotuner may swallow it)
            records.append((repr(self), config, dtypes, kwargs.get("num_warps", 4), exc, time.perf_counter() - t0))
            raise
        if id(kernel) not in seen:
            seen.add(id(kernel))
            records.append((repr(self), config, dtypes, kernel.metadata.num_warps, kernel, time.perf_counter() - t0))
        return kernel

    previous = getattr(driver, "_active", None)  # None on a machine without a GPU driver
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = run
    try:
        yield records
    finally:
        JITFunction.run = original
        driver._active = previous


# ---------------------------------------------------------------------------------------------
# resources of a cubin


def _cuobjdump() -> Optional[str]:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for path in (bundled, os.path.join(cuda_home, "bin", "cuobjdump"), shutil.which("cuobjdump")):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_GLOBAL_ACCESS = re.compile(r"\b(LDG|STG)\.E(\.[\w.]*)?")


def cubin_facts(cubin: bytes, tool: Optional[str]) -> Optional[dict]:
    """What the cubin's one kernel uses, read with one cuobjdump call (None without cuobjdump):
    registers, stack and local bytes, and its global-memory instructions in the SASS: loads and
    stores in all, and how many move 16 bytes (LDG.E.128 / STG.E.128). A bandwidth-bound kernel
    reaches copy speed only with 16-byte accesses on its full tiles."""
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = _RES.search(out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{out}")
    counts = {"LDG": [0, 0], "STG": [0, 0]}
    for g in _GLOBAL_ACCESS.finditer(out):
        counts[g.group(1)][0] += 1
        counts[g.group(1)][1] += ".128" in (g.group(2) or "")
    return {
        "regs": int(m.group(1)),
        "stack_bytes": int(m.group(2)),
        "local_bytes": int(m.group(4)),
        "loads": counts["LDG"][0],
        "loads_16b": counts["LDG"][1],
        "stores": counts["STG"][0],
        "stores_16b": counts["STG"][1],
    }


def programs_per_sm(arch: int, regs: int, num_warps: int, shared: int) -> int:
    """Resident programs (CTAs) per SM by registers (allocated per warp in units of 256), warps and
    shared memory; 0 when one program does not fit."""
    regfile, max_warps, max_blocks, max_shared = ARCH_LIMITS[arch]
    if regs > MAX_REGS_PER_THREAD or shared > max_shared:
        return 0
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = regfile // (per_warp * num_warps)
    by_warps = max_warps // num_warps
    by_shared = max_shared // shared if shared else max_blocks
    return min(by_regs, by_warps, by_shared, max_blocks)


# ---------------------------------------------------------------------------------------------
# the cases: every launcher, every strategy it can pick, the dtypes it takes

_BIG = 2**31 + 4096  # elements: past int32 offsets


def _meta(*shape, dtype=torch.float32, cl=False):
    t = torch.empty(*shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _packed(n: int):
    return torch.empty(((n + 31) // 32) * 4, dtype=torch.uint8, device="meta")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _short(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _sparse_mask_cases() -> list[Case]:
    from ..kernels import sparse_mask as k

    cases = [
        Case("pack n=1000", lambda: k.pack_mask(_meta(1000, dtype=torch.bool)), quick=True),
        Case("pack n>2^31 (int64)", lambda: k.pack_mask(_meta(_BIG, dtype=torch.bool)), quick=True),
        Case("unpack n=1000", lambda: k.unpack_mask(_packed(1000), 1000), quick=True),
        Case("unpack n>2^31 (int64)", lambda: k.unpack_mask(_packed(_BIG), _BIG)),
        Case("apply n>2^31 fp32 (int64)", lambda: k.apply_mask(_meta(_BIG), _packed(_BIG)), quick=True),
    ]
    for dt in _FLOATS:
        cases.append(
            Case(f"apply {_short(dt)}", lambda dt=dt: k.apply_mask(_meta(1000, dtype=dt), _packed(1000)), quick=True)
        )

    def sgd(dt, momentum, wd, nesterov, first, n=1000):
        p, g, b = _meta(n, dtype=dt), _meta(n, dtype=dt), _meta(n if momentum else 0, dtype=dt)
        return k.masked_sgd_step(p, g, b, _packed(n), 0.1, momentum, wd, 0.0, nesterov, first)

    for momentum, first in ((0.0, False), (0.9, True), (0.9, False)):
        for wd in (0.0, 5e-4):
            for nesterov in (False, True) if momentum else (False,):
                name = f"sgd fp32 momentum={momentum} first={first} wd={wd} nesterov={nesterov}"
                cases.append(Case(name, lambda m=momentum, w=wd, ne=nesterov, f=first: sgd(torch.float32, m, w, ne, f)))
    cases[-1].quick = True
    for dt in (torch.float16, torch.bfloat16):
        cases.append(Case(f"sgd {_short(dt)} momentum nesterov wd", lambda dt=dt: sgd(dt, 0.9, 5e-4, True, False)))
    cases[-1].quick = True
    cases.append(
        Case("sgd fp32 n>2^31 (int64)", lambda: sgd(torch.float32, 0.9, 5e-4, False, False, n=_BIG), quick=True)
    )
    return cases


def _fake_quantize_cases() -> list[Case]:
    from ..kernels import fake_quantize as k

    def params(C):
        return _meta(C), _meta(C), _meta(C)

    def fwd(shape, C, inner, dt, with_mask):
        inv, scale, zp = params(C)
        return k.fake_quantize_fwd(_meta(*shape, dtype=dt), inv, scale, zp, -8, 7, inner, with_mask)

    def lrn(shape, C, inner, dt):
        inv, scale, zp = params(C)
        x, g = _meta(*shape, dtype=dt), _meta(*shape, dtype=dt)
        return k.fake_quantize_bwd_learnable(g, x, inv, scale, zp, -8, 7, inner, 0.01)

    # (label, x shape, C, inner): the launcher's four forward strategies
    layouts = (
        ("per-tensor", (64, 1000), 1, 1),
        ("per-channel gather (inner < block)", (8, 48, 9, 9), 48, 81),
        ("per-channel rows (inner >= block)", (2, 8, 64, 128), 8, 8192),
        ("per-channel columns (channels-last)", (512, 64), 64, 1),
    )
    cases = []
    for label, shape, C, inner in layouts:
        for dt in _FLOATS:
            for with_mask in (True, False):
                quick = with_mask and dt != torch.float16
                name = f"fwd {label} {_short(dt)}{' +mask' if with_mask else ''}"
                cases.append(
                    Case(name, lambda s=shape, c=C, i=inner, d=dt, m=with_mask: fwd(s, c, i, d, m), quick=quick)
                )
    cases.append(
        Case("fwd per-tensor n>2^31 fp32 +mask (int64)", lambda: fwd((_BIG,), 1, 1, torch.float32, True), quick=True)
    )
    for dt in _FLOATS:
        n = 64 * 1000
        cases.append(
            Case(
                f"bwd (straight-through) {_short(dt)}",
                lambda dt=dt, n=n: k.fake_quantize_bwd(_meta(n, dtype=dt), _packed(n)),
            )
        )
    cases[-1].quick = True
    learnable = (
        ("per-tensor", (64, 1000), 1, 1),
        ("per-channel rows", (4, 16, 64, 64), 16, 4096),
        ("per-channel rows, partial tiles", (3, 12, 30, 30), 12, 900),
        ("per-channel columns (channels-last)", (1024, 64), 64, 1),
    )
    for label, shape, C, inner in learnable:
        for dt in _FLOATS:
            name = f"LSQ bwd {label} {_short(dt)}"
            cases.append(Case(name, lambda s=shape, c=C, i=inner, d=dt: lrn(s, c, i, d), quick=dt != torch.float16))
    return cases


def _depthwise_cases() -> list[Case]:
    from ..kernels import depthwise as k

    def geometry(kk, s, d):
        return kk, s, d * (kk - 1) // 2, d

    # (label, kernel size, stride, dilation, dtypes)
    shapes = (
        ("3x3 s1", 3, 1, 1, _FLOATS),
        ("3x3 s2", 3, 2, 1, (torch.float32,)),
        ("5x5 s1", 5, 1, 1, (torch.float32,)),
        ("7x7 s2 d2", 7, 2, 2, (torch.float32,)),
    )
    cases = []
    N, C, H, W = 2, 32, 56, 56
    for label, kk, s, d, dtypes in shapes:
        kk, s, p, d = geometry(kk, s, d)
        Ho = (H + 2 * p - d * (kk - 1) - 1) // s + 1
        for dt in dtypes:
            for cl in (False, True):
                quick = label == "3x3 s1" and dt == torch.float32
                tag = f"{label} {_short(dt)} {'channels_last' if cl else 'NCHW'}"
                bn = label == "3x3 s1"  # the fused conv + BN + ReLU6 epilogue

                def fwd(dt=dt, cl=cl, kk=kk, s=s, p=p, d=d, bn=bn):
                    x, w = _meta(N, C, H, W, dtype=dt, cl=cl), _meta(C, 1, kk, kk, dtype=dt)
                    scale = _meta(C) if bn else _meta(0)
                    return k.depthwise_fwd(x, w, scale, scale, s, s, p, p, d, d, 2 if bn else 0)

                def bwd_in(dt=dt, cl=cl, kk=kk, s=s, p=p, d=d):
                    g, w = _meta(N, C, Ho, Ho, dtype=dt, cl=cl), _meta(C, 1, kk, kk, dtype=dt)
                    return k.depthwise_bwd_input(g, w, H, W, s, s, p, p, d, d)

                def bwd_w(dt=dt, cl=cl, kk=kk, s=s, p=p, d=d):
                    g, x = _meta(N, C, Ho, Ho, dtype=dt, cl=cl), _meta(N, C, H, W, dtype=dt, cl=cl)
                    return k.depthwise_bwd_weight(g, x, kk, kk, s, s, p, p, d, d, True)

                cases += [
                    Case(f"fwd {tag}{' +BN+ReLU6' if bn else ''}", fwd, quick=quick),
                    Case(f"bwd input {tag}", bwd_in, quick=quick),
                    Case(f"bwd weight {tag}", bwd_w, quick=quick),
                ]
    return cases


CASE_GROUPS = {"sparse_mask": _sparse_mask_cases, "fake_quantize": _fake_quantize_cases, "depthwise": _depthwise_cases}


def all_kernels() -> list[str]:
    """repr of every launchable @triton.jit kernel (its name ends in ``_kernel``) in pycompress.kernels."""
    import importlib

    from triton.runtime.jit import JITFunction

    found = []
    for mod in CASE_GROUPS:
        m = importlib.import_module(f"pycompress.kernels.{mod}")
        for name, v in vars(m).items():
            fn = v
            while fn is not None and not isinstance(fn, JITFunction):  # through autotune / heuristics
                fn = getattr(fn, "fn", None)
            if fn is not None and name.endswith("_kernel") and fn.__module__ == m.__name__:
                found.append(repr(fn))
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------
# run


def _error_text(exc: BaseException) -> str:
    """The exception's type and the last line of its message (Triton's compile errors end with the
    offending line), or the innermost frame when the message is empty."""
    text = str(exc).strip()
    if text:
        return f"{type(exc).__name__}: {text.splitlines()[-1]}"
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}{where}"


def run(
    arch: int = 90,
    quick: bool = False,
    case_filter: Optional[str] = None,
    ops: Optional[list[str]] = None,
    printer: Optional[Callable[[str], None]] = None,
    cache_dir: Optional[str] = None,
) -> tuple[list[Row], dict]:
    """Compile the cases; returns (rows, facts). cache_dir: Triton's cache for this run (default: a
    fresh temporary directory, so every compile is real and timed)."""
    try:
        import triton
        from triton.backends import backends as triton_backends
    except ImportError as exc:
        raise RuntimeError(f"Triton is not installed ({exc}); it comes with torch's CUDA builds") from exc
    if "nvidia" not in triton_backends:
        raise RuntimeError(f"this Triton has no CUDA backend (it has: {', '.join(sorted(triton_backends)) or 'none'})")
    if arch not in ARCH_LIMITS:
        raise ValueError(f"--arch {arch}: one of {sorted(ARCH_LIMITS)} (compute capability x 10)")
    for op in ops or ():
        if op not in CASE_GROUPS:
            raise ValueError(f"unknown op {op!r}: one of {sorted(CASE_GROUPS)}")
    tool = _cuobjdump()
    rows: list[Row] = []
    tmp = None
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pycompress-triton-cache-")
        cache_dir = tmp.name
    old_cache = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    t_start = time.perf_counter()
    seen: set = set()
    # cuobjdump's disassembly (~0.3 s for a large kernel) runs beside the next compiles; rows are
    # completed and printed in order
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    pending: collections.deque = collections.deque()

    def flush(wait: bool) -> None:
        while pending and (wait or pending[0][1] is None or pending[0][1].done()):
            row, future = pending.popleft()
            used = future.result() if future is not None else None
            if used is not None:
                for key, value in used.items():
                    setattr(row, key, value)
                row.programs_per_sm = programs_per_sm(arch, row.regs, row.num_warps, row.shared_bytes)
                if row.programs_per_sm == 0:
                    row.status = (
                        f"FAILED (does not launch: {row.regs} registers x {row.num_warps * 32} threads, "
                        f"{row.shared_bytes} B shared)"
                    )
            if printer:
                printer(_format_row(row))

    try:
        for group in ops or list(CASE_GROUPS):
            for case in CASE_GROUPS[group]():
                if quick and not case.quick:
                    continue
                if case_filter and case_filter not in f"{group} {case.name}":
                    continue
                with compile_only(arch, seen) as records:
                    try:
                        case.call()
                        error = None
                    except Exception as exc:
                        error = exc
                for kname, config, dtypes, warps, kernel, secs in records:
                    row = Row(kname, case.name, config, dtypes, warps, None, None, None, 0, None, secs, "ok")
                    rows.append(row)
                    if isinstance(kernel, Exception):
                        row.status = f"FAILED ({_error_text(kernel)})"
                        pending.append((row, None))
                    else:
                        row.shared_bytes = int(kernel.metadata.shared)
                        pending.append((row, pool.submit(cubin_facts, kernel.asm["cubin"], tool)))
                if error is not None and not any(isinstance(r[4], Exception) for r in records):
                    # the launcher failed before or after its kernels compiled (a check, a host-side bug)
                    row = Row("(launcher)", case.name, "", "", 0, None, None, None, 0, None, 0.0, "")
                    row.status = f"FAILED ({_error_text(error)})"
                    rows.append(row)
                    pending.append((row, None))
                flush(wait=False)
        flush(wait=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if old_cache is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old_cache
        if tmp is not None:
            tmp.cleanup()
    facts = {
        "arch": f"sm_{arch}",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "cuobjdump": tool,
        "quick": quick,
        "seconds": round(time.perf_counter() - t_start, 1),
        "kernels_expected": all_kernels() if not case_filter and not ops else None,
    }
    return rows, facts


def missing_kernels(rows: list[Row], facts: dict) -> list[str]:
    """Launchable kernels no case compiled (only meaningful for a run over every op)."""
    if not facts.get("kernels_expected"):
        return []
    done = {r.kernel for r in rows if r.status == "ok"}
    return [k for k in facts["kernels_expected"] if k not in done]


def _short_kernel(name: str) -> str:
    return name.replace("JITFunction(pycompress.kernels.", "").rstrip(")")


def _format_row(r: Row) -> str:
    def v(x):
        return "-" if x is None else str(x)

    wide = "-" if r.loads is None else f"{r.loads_16b}/{r.loads} {r.stores_16b}/{r.stores}"
    return (
        f"| {_short_kernel(r.kernel)} | {r.case} | {r.config} | {r.dtypes} | {r.num_warps} | {v(r.regs)} | "
        f"{v(r.local_bytes)} | {r.shared_bytes} | {v(r.programs_per_sm)} | {wide} | {r.compile_s:.2f} | "
        f"{r.status} |"
    )


HEADER = (
    "| kernel | case | meta-parameters | dtypes | warps | regs | local B | shared B | programs/SM "
    "| 16-B loads, stores | compile s | status |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def summary(rows: list[Row], facts: dict) -> str:
    ok = [r for r in rows if r.status == "ok"]
    failed = [r for r in rows if r.status != "ok"]
    spills = [r for r in ok if r.local_bytes]
    lines = [
        f"{len(ok)} specializations compiled for {facts['arch']} (Triton {facts['triton']}) in {facts['seconds']} s, "
        f"{len(failed)} failed; {len({r.kernel for r in ok})} kernels.",
    ]
    if ok and ok[0].regs is not None:
        worst = max(ok, key=lambda r: r.regs)
        lines.append(f"most registers: {worst.regs} ({_short_kernel(worst.kernel)}, {worst.case}, {worst.config})")
        lines.append(
            f"with local memory (spills): {len(spills)}"
            + "".join(f"\n  {_short_kernel(r.kernel)} {r.config}: {r.local_bytes} B" for r in spills)
        )
    else:
        lines.append("no cuobjdump: registers and spills not read")
    for r in failed:
        lines.append(f"FAILED {_short_kernel(r.kernel)} [{r.case}] {r.config}: {r.status}")
    missing = missing_kernels(rows, facts)
    if missing:
        lines.append("kernels no case compiled: " + ", ".join(_short_kernel(k) for k in missing))
    return "\n".join(lines)


def write_json(path: str, rows: list[Row], facts: dict) -> None:
    from ..utils import atomic_write_text

    atomic_write_text(path, json.dumps({"facts": facts, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
