"""The `pycompress` command line."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pycompress", description="Compress CNNs: distillation, pruning, quantization.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command")

    info = sub.add_parser("info", help="versions, the compiled extension and which op backends run here")
    info.set_defaults(func=_info)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    ops = bench_sub.add_parser("ops", help="microbenchmark every op in every available backend against torch")
    ops.add_argument("--op", help="only this op (default: all)")
    ops.add_argument("--backend", help="only this backend (default: every available one)")
    ops.add_argument("--size", type=_positive_int, help="elements of the roofline cases (default: 16M on CPU, 268M on GPU)")
    ops.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    ops.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="repeatable; default float32")
    ops.add_argument("--case", help="only cases whose name contains this text")
    ops.add_argument("--json", metavar="FILE", help="also write the rows and machine facts as JSON")
    ops.set_defaults(func=_bench_ops)
    return p


def _info(args) -> int:
    import torch

    import pycompress
    from pycompress import _ext, backends

    print(f"pycompress {pycompress.__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"extension pycompress._C: {'loaded' if _ext.loaded() else _ext.missing_reason()}"
          + (f", CUDA kernels {'built' if _ext.cuda_built() else 'not built'}" if _ext.loaded() else ""))
    for name in backends.BACKENDS:
        reason = backends.status(name)
        print(f"  backend {name:9s} {'available' if reason is None else 'unavailable: ' + reason}")
    for op in backends.ops():
        print(f"  op {op}: {', '.join(backends.available(op))}")
    return 0


def _bench_ops(args) -> int:
    import torch

    from pycompress import backends
    from pycompress.bench import ops as bench_ops

    if args.device == "cuda" and not torch.cuda.is_available():
        print("pycompress bench ops: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.backend:
        try:
            backends._check_name(args.backend, "--backend")
        except ValueError as exc:
            print(f"pycompress bench ops: {exc}", file=sys.stderr)
            return 2
    dtypes = tuple(getattr(torch, _DTYPES[d]) for d in (args.dtype or ["float32"]))
    try:
        rows, meta = bench_ops.run(args.op, args.backend, args.size, args.device, dtypes, args.case)
    except ValueError as exc:
        print(f"pycompress bench ops: {exc}", file=sys.stderr)
        return 2
    if args.json:
        bench_ops.write_json(args.json, rows, meta)
        print(f"\nwrote {args.json}")
    failed = [r for r in rows if r.check.startswith("FAILED")]
    for r in failed:
        print(f"MISMATCH {r.op} {r.case} {r.backend}: {r.check}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        import pycompress

        print(pycompress.__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
