"""The `pycompress` command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


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

    info = sub.add_parser(
        "info", help="versions, extension and backends; with FILE: an artifact's manifest and per-layer table"
    )
    info.add_argument("file", nargs="?", help="a .pcz artifact to describe")
    info.add_argument("--json", metavar="FILE", help="with an artifact: write its manifest and table as JSON")
    info.set_defaults(func=_info)

    ex = sub.add_parser("export", help="write the compressed artifact of a run or checkpoint (.pcz, fp16, uint8, onnx)")
    ex.add_argument(
        "source",
        help="a run directory (its final student), a checkpoint (best.pt), or a .pcz artifact (for --format onnx)",
    )
    ex.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write")
    ex.add_argument(
        "--format",
        choices=["pcz", "fp16", "uint8", "onnx"],
        default="pcz",
        help="pcz: quantized weights as integer codes, other tensors fp32 (default); fp16 / uint8: "
        "other tensors as IEEE half / hw7's per-tensor min-max uint8; onnx: a QDQ ONNX graph",
    )
    ex.add_argument("--stage", metavar="NAME", help="with a run directory: export this stage's best model")
    ex.add_argument("--force", action="store_true", help="overwrite an existing output file")
    ex.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers instead of folding them")
    ex.add_argument("--no-eval", action="store_true", help="do not evaluate on the test set")
    ex.add_argument("--data-root", metavar="DIR")
    ex.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ex.add_argument("--input-size", metavar="CxHxW", help="input shape for ONNX when the source does not record it")
    ex.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    ex.set_defaults(func=_export)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    ops = bench_sub.add_parser("ops", help="microbenchmark every op in every available backend against torch")
    ops.add_argument("--op", help="only this op (default: all)")
    ops.add_argument("--backend", help="only this backend (default: every available one)")
    ops.add_argument(
        "--size", type=_positive_int, help="elements of the roofline cases (default: 16M on CPU, 268M on GPU)"
    )
    ops.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    ops.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="repeatable; default float32")
    ops.add_argument("--case", help="only cases whose name contains this text")
    ops.add_argument("--json", metavar="FILE", help="also write the rows and machine facts as JSON")
    ops.add_argument(
        "--cold-heap",
        action="store_true",
        help="CPU: leave glibc's allocator at its defaults (freed outputs go back to the kernel and the "
        "next call pays page faults); by default the heap is kept warm for every backend alike",
    )
    ops.set_defaults(func=_bench_ops)

    ov = bench_sub.add_parser(
        "overhead",
        help="fixed per-call cost of every op (tiny tensors, eager, CPU): argument "
        "checks, backend choice, dispatch and launch, against stock torch",
    )
    ov.add_argument("--op", action="append", help="only this op (repeatable; default: all)")
    ov.add_argument("--backend", action="append", help="repeatable; default: cpu and reference")
    ov.add_argument("--repeats", type=_positive_int, default=7, help="timed repeats per row (median reported)")
    ov.add_argument("--no-torch", action="store_true", help="skip the stock torch rows")
    ov.add_argument("--json", metavar="FILE", help="also write the rows and machine facts as JSON")
    ov.set_defaults(func=_bench_overhead)

    st = bench_sub.add_parser(
        "step",
        help="the training step of a recipe's stages (forward, KD, loss, backward, optimizer, mask and "
        "quantizer hooks) on synthetic batches, per backend, against the float student and plain torch",
    )
    st.add_argument("recipe", help="recipe file, e.g. recipes/quickstart.yaml")
    st.add_argument("--stage", action="append", metavar="NAME", help="repeatable; default: every training stage")
    st.add_argument(
        "--backend", action="append", help="repeatable; default: every available one (not the Triton interpreter)"
    )
    st.add_argument("--steps", type=_positive_int, default=10, help="steps per timed repeat (default 10)")
    st.add_argument("--repeats", type=_positive_int, default=3, help="timed repeats (median reported; default 3)")
    st.add_argument("--warmup", type=_positive_int, default=3, help="untimed steps first (default 3)")
    st.add_argument("--batch", type=_positive_int, metavar="N", help="batch size (default: the recipe's)")
    st.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides the recipe's device")
    st.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's)")
    st.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    st.add_argument("--data-root", metavar="DIR", help="only for datasets whose shape comes from their files")
    st.add_argument(
        "--compile",
        action="store_true",
        help="also a 'compiled' row per stage: the stage under torch.compile (its first step, compilation "
        "included, and when it pays are printed)",
    )
    st.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    st.set_defaults(func=_bench_step)

    bd = bench_sub.add_parser(
        "data", help="images/s of a recipe's training loader alone (its dataset, augmentation, batch, workers)"
    )
    bd.add_argument("recipe", help="recipe file")
    bd.add_argument("--workers", type=int, action="append", metavar="N", help="repeatable; default: the recipe's")
    bd.add_argument("--batches", type=_positive_int, default=20, help="timed batches per repeat (default 20)")
    bd.add_argument("--repeats", type=_positive_int, default=3, help="timed repeats (median reported; default 3)")
    bd.add_argument("--batch", type=_positive_int, metavar="N", help="batch size (default: the recipe's)")
    bd.add_argument("--device", choices=["auto", "cpu", "cuda"], help="cuda: pinned memory and the copy timed")
    bd.add_argument("--data-root", metavar="DIR")
    bd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bd.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    bd.set_defaults(func=_bench_data)

    bm = bench_sub.add_parser(
        "model",
        help="inference latency and throughput of a .pcz artifact: fp32 torch, the "
        "artifact module, ONNX Runtime fp32 and int8 (QDQ)",
    )
    bm.add_argument("file", help="a .pcz artifact")
    bm.add_argument(
        "--batch", type=_positive_int, action="append", metavar="N", help="batch size (repeatable; default 1 and 64)"
    )
    bm.add_argument("--threads", type=_positive_int, help="torch and ONNX Runtime threads (default: torch's)")
    bm.add_argument("--repeats", type=_positive_int, default=20, help="timed calls per row (median reported)")
    bm.add_argument("--warmup", type=_positive_int, default=5)
    bm.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="cuda: also the torch rows on the GPU; auto (default): cuda when a GPU is present",
    )
    bm.add_argument("--input-size", metavar="CxHxW", help="when the artifact records no dataset")
    bm.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    bm.add_argument("--json", metavar="FILE", help="also write the rows and machine facts as JSON")
    bm.set_defaults(func=_bench_model)

    tc = bench_sub.add_parser(
        "triton-compile",
        help="compile every Triton kernel (every launcher strategy, dtype and autotune config) for a GPU "
        "architecture on any machine, no GPU needed: compile errors, registers, spills, shared memory",
    )
    tc.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100 / H200)")
    tc.add_argument("--quick", action="store_true", help="a subset that still compiles every kernel (~20 s)")
    tc.add_argument(
        "--op", action="append", help="only this op's kernels (repeatable: sparse_mask, fake_quantize, depthwise)"
    )
    tc.add_argument("--case", help="only cases whose name contains this text")
    tc.add_argument("--json", metavar="FILE", help="also write the rows and facts as JSON")
    tc.set_defaults(func=_bench_triton_compile)

    from pycompress import profile as _profile

    pr = sub.add_parser(
        "profile",
        help="parameters, MACs and activation memory per layer, and inference latency, of a "
        "model name, checkpoint or .pcz artifact",
    )
    _profile.add_arguments(pr)
    pr.set_defaults(func=_profile.cli_main)

    from pycompress import plot as _plot

    pl = sub.add_parser("plot", help="plots of finished runs: pareto (top-1 against the shipped file's bytes)")
    _plot.add_arguments(pl)
    pl.set_defaults(func=_plot.cli_main)

    from pycompress import sweep as _sweep

    sw = sub.add_parser(
        "sweep",
        help="run a recipe over a grid of --set values (every combination), then tabulate and plot the results",
    )
    _sweep.add_arguments(sw)
    sw.set_defaults(func=_sweep.cli_main)

    from pycompress import score as _score

    sc = sub.add_parser(
        "score",
        help="MicroNet challenge count (parameters and math operations under the challenge's rules) and score "
        "of a model name, checkpoint or .pcz artifact",
    )
    _score.add_arguments(sc)
    sc.set_defaults(func=_score.cli_main)

    run = sub.add_parser("run", help="run a recipe (YAML) end to end into a run directory")
    run.add_argument("recipe", help="recipe file, e.g. recipes/quickstart.yaml")
    run.add_argument(
        "--data-root",
        metavar="DIR",
        help="where datasets are (default: the known places, "
        "e.g. /usr/share/datasets/fashion-mnist, and $PYCOMPRESS_DATA)",
    )
    run.add_argument("--out", metavar="DIR", help="run directory (default: runs/<recipe name>)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides the recipe's device")
    run.add_argument(
        "--backend",
        choices=["auto", "reference", "cpu", "triton", "cuda"],
        help="op backend for the whole run (overrides kernel_backend)",
    )
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    run.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the student's training step in every training stage (a stage's own 'compile' "
        "mapping gives the options)",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value: STAGE.key=value or a top-level key, e.g. "
        "--set qat4.epochs=2 --set data.batch_size=64 (repeatable)",
    )
    run.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_run)

    check = sub.add_parser("check", help="validate recipes without running anything")
    check.add_argument("recipes", nargs="+", help="recipe files")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.set_defaults(func=_check)

    ev = sub.add_parser(
        "eval", help="evaluate a checkpoint (best.pt / checkpoint.pt of a run) or a .pcz artifact on its test set"
    )
    ev.add_argument("checkpoint", help="a checkpoint or a .pcz artifact")
    ev.add_argument("--data-root", metavar="DIR")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ev.add_argument("--backend", choices=["auto", "reference", "cpu", "triton", "cuda"], default="auto")
    ev.add_argument("--batch-size", type=_positive_int, default=512)
    ev.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    ev.set_defaults(func=_eval)

    sp = sub.add_parser("sparsity", help="the per-tensor sparsity report of a checkpoint (best.pt / checkpoint.pt)")
    sp.add_argument("checkpoint")
    sp.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    sp.add_argument("--markdown", action="store_true", help="print a markdown table instead of text")
    sp.set_defaults(func=_sparsity)
    return p


def _sparsity(args) -> int:
    import json

    from pycompress.prune import masked_layers, sparsity_report
    from pycompress.recipe import load_model
    from pycompress.train import CheckpointError
    from pycompress.utils import atomic_write_text

    try:
        model, _ = load_model(args.checkpoint)
    except (CheckpointError, ValueError) as exc:
        return _err("sparsity", exc)
    # the layers a pruning stage masked are the selection; without masks every weight with >= 2 dims
    selected = [f"{n}.weight" for n in masked_layers(model)] or [
        n for n, p in model.named_parameters() if p.dim() >= 2 and n.endswith("weight")
    ]
    rep = sparsity_report(model, selected=selected)
    print(rep.to_markdown() if args.markdown else rep.format())
    if args.json:
        atomic_write_text(args.json, json.dumps(rep.to_dict(), indent=1) + "\n")
    return 0


def _err(cmd: str, exc: BaseException) -> int:
    print(f"pycompress {cmd}{_rank_tag()}: error: {exc}", file=sys.stderr)
    return 2


def _rank_tag() -> str:
    """ " [rank R]" in a process other than the first of a torchrun launch, else ""."""
    r = os.environ.get("RANK", "0")
    return f" [rank {r}]" if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and r != "0" else ""


def _run(args) -> int:
    import torch

    from pycompress.data import DatasetNotFoundError
    from pycompress.recipe import RecipeError, RunError, load_recipe, run_recipe
    from pycompress.train import CheckpointError, TrainingDiverged
    from pycompress.train.distributed import ReplicaMismatch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:
        return _err("run", exc)
    try:
        report = run_recipe(
            recipe,
            args.out,
            data_root=args.data_root,
            device=args.device,
            backend=args.backend,
            resume=args.resume,
            progress=False if args.no_progress else None,
            compile=args.compile,
        )
    except (RunError, RecipeError, DatasetNotFoundError, CheckpointError, ReplicaMismatch) as exc:
        return _err("run", exc)
    except TrainingDiverged as exc:
        print(f"pycompress run{_rank_tag()}: training diverged: {exc}", file=sys.stderr)
        return 3
    s = report.get("student")
    if s and not _rank_tag():
        print(
            f"student ({s['stage']}): top-1 {s['top1']:.2f}%, {s['params']:,} parameters, "
            f"{s['size_bytes']:,} bytes ({s['compression']:.1f}x smaller than fp32); "
            f"{report['total_seconds'] / 60:.1f} min"
        )
    return 0


def _check(args) -> int:
    from pycompress.recipe import RecipeError, load_recipe

    bad = 0
    for path in args.recipes:
        try:
            r = load_recipe(path, args.overrides)
        except RecipeError as exc:
            print(f"FAIL {exc}", file=sys.stderr)
            bad += 1
            continue
        stages = ", ".join(f"{s.name} ({s.kind}" + (f", {s.epochs} ep" if s.epochs else "") + ")" for s in r.stages)
        print(f"ok   {path}: {r.name}: {r.model.name} on {r.data.dataset}; stages: {stages}")
    return 1 if bad else 0


def _eval(args) -> int:
    import contextlib
    import json

    import torch

    from pycompress import backends
    from pycompress.data import DatasetNotFoundError, build_dataset, make_loader
    from pycompress.recipe import load_model
    from pycompress.train import CheckpointError, evaluate
    from pycompress.utils import atomic_write_text

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return _err("eval", "--device cuda but no CUDA device is available")
    if args.backend != "auto" and backends.status(args.backend) is not None:
        return _err("eval", f"backend {args.backend!r} unavailable: {backends.status(args.backend)}")
    from pycompress.export import ArtifactError, is_artifact
    from pycompress.export import load as load_artifact

    artifact = None
    try:
        if is_artifact(args.checkpoint):
            model = load_artifact(args.checkpoint)
            artifact = model.artifact
            man = artifact.manifest
            ckpt = {"data": man.get("data"), "stage": (man.get("source") or {}).get("stage"), "epoch": None}
        else:
            model, ckpt = load_model(args.checkpoint)
        data = ckpt.get("data")
        if not data:
            raise CheckpointError(f"{args.checkpoint!r} does not record its dataset")
        test_set, _ = build_dataset(
            data["dataset"], "test", data_root=args.data_root, augment=False, **data.get("options", {})
        )
        loader = make_loader(test_set, args.batch_size, shuffle=False)
        # "auto" keeps PYCOMPRESS_BACKEND in force, as `run` does
        with backends.use(args.backend) if args.backend != "auto" else contextlib.nullcontext():
            ev = evaluate(model, loader, device)
    except (CheckpointError, ArtifactError, DatasetNotFoundError, ValueError) as exc:
        return _err("eval", exc)
    if artifact is not None:
        sizes = artifact.manifest.get("size", {})
        size = {"bytes": (int(sizes.get("bits", 0)) + 7) // 8, "fp32_bytes": sizes.get("fp32_bytes")}
    else:
        from pycompress.quant import model_size

        size = model_size(model)
    res = {
        "checkpoint": args.checkpoint,
        "dataset": data["dataset"],
        "top1": ev["top1"],
        "top5": ev["top5"],
        "loss": ev["loss"],
        "samples": ev["samples"],
        "size_bytes": int(size["bytes"]),
        "fp32_bytes": None if size["fp32_bytes"] is None else int(size["fp32_bytes"]),
        "stage": ckpt.get("stage"),
        "epoch": ckpt.get("epoch"),
    }
    if artifact is not None:
        res["file_bytes"] = artifact.facts["file_bytes"]
        res["artifact"] = True
        recorded = artifact.manifest.get("eval") or {}
        if recorded.get("top1") is not None:
            res["recorded_top1"] = recorded["top1"]
    what = (
        f"file {res['file_bytes']:,} bytes (counted {res['size_bytes']:,})"
        if artifact is not None
        else f"size {res['size_bytes']:,} bytes"
    )
    print(
        f"{args.checkpoint}: {data['dataset']} test, {ev['samples']} images: top-1 {ev['top1']:.2f}%  "
        f"top-5 {ev['top5']:.2f}%  loss {ev['loss']:.4f}  {what}"
        + (f" (fp32 {res['fp32_bytes']:,})" if res["fp32_bytes"] else "")
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2))
    return 0


def _info(args) -> int:
    if args.file:
        return _info_file(args)
    import torch

    import pycompress
    from pycompress import _ext, backends

    print(
        f"pycompress {pycompress.__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
    )
    print(
        f"extension pycompress._C: {'loaded' if _ext.loaded() else _ext.missing_reason()}"
        + (f", CUDA kernels {'built' if _ext.cuda_built() else 'not built'}" if _ext.loaded() else "")
    )
    for name in backends.BACKENDS:
        reason = backends.status(name)
        print(f"  backend {name:9s} {'available' if reason is None else 'unavailable: ' + reason}")
    for op in backends.ops():
        print(f"  op {op}: {', '.join(backends.available(op))}")
    return 0


def _info_file(args) -> int:
    import json

    from pycompress.export import ArtifactError, layer_table, read
    from pycompress.utils import atomic_write_text

    try:
        art = read(args.file)
    except ArtifactError as exc:
        return _err("info", exc)
    m, f = art.manifest, art.facts
    arch = m.get("arch", {})
    print(f"{args.file}: pycompress artifact, format version {f['format_version']}, encoding {m.get('encoding')}")
    print(f"  written by pycompress {m.get('pycompress')} with torch {m.get('torch')}")
    print(
        f"  model: {arch.get('model')} {arch.get('args') or {}} (in_channels {arch.get('in_channels')}, "
        f"num_classes {arch.get('num_classes')})"
    )
    data = m.get("data") or {}
    if data:
        print(
            f"  data: {data.get('dataset')} {data.get('options') or {}}, input {data.get('in_channels')}x"
            f"{'x'.join(str(v) for v in data.get('image_size') or [])}"
        )
    src = m.get("source") or {}
    if src:
        print("  source: " + ", ".join(f"{k} {v}" for k, v in src.items() if v is not None))
    ev = m.get("eval") or {}
    if ev:
        print(
            f"  evaluation at export: top-1 {ev.get('top1'):.2f}%, top-5 {ev.get('top5'):.2f}% on "
            f"{ev.get('samples')} {ev.get('dataset')} {ev.get('split')} images"
        )
    bn = m.get("bn_folding") or {}
    print(f"  BatchNorm folded: {bn.get('folded', 0)}" + (f" ({bn['note']})" if bn.get("note") else ""))
    counted = (int(m.get("size", {}).get("bits", 0)) + 7) // 8
    print(
        f"  file {f['file_bytes']:,} bytes = payload {f['payload_bytes']:,} + manifest {f['manifest_bytes']:,} "
        f"+ header/trailer 56; counted bits {counted:,} bytes; sha256 {f['sha256']}"
    )
    rows = layer_table(m)
    w = max([len(r["name"]) for r in rows] + [6])
    print(f"\n{'tensor':{w}s}  {'shape':18s} {'encoding':12s} {'bits':>4s} {'sparsity':>8s} {'bytes':>9s}")
    for r in rows:
        sp = "-" if r["sparsity"] is None else f"{100 * r['sparsity']:.1f}%"
        shape = "x".join(str(v) for v in r["shape"]) or "scalar"
        print(f"{r['name']:{w}s}  {shape:18s} {r['encoding']:12s} {r['bits']:4d} {sp:>8s} {r['bytes']:9,d}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"manifest": m, "facts": f, "tensors": rows}, indent=1) + "\n")
    return 0


def _resolve_source(source: str, stage: str = None):
    """(model, checkpoint path, checkpoint dict) for a run directory or a checkpoint file."""
    import json
    import os

    from pycompress.recipe import load_model
    from pycompress.train import CheckpointError

    if os.path.isdir(source):
        run_json = os.path.join(source, "run.json")
        if not os.path.isfile(run_json):
            raise CheckpointError(f"{source!r} is a directory without run.json: not a pycompress run directory")
        with open(run_json, encoding="utf-8") as f:
            state = json.load(f)
        stages = state.get("stages", {})
        done = [
            (st.get("index", 0), name, st)
            for name, st in stages.items()
            if st.get("status") == "done" and (st.get("result") or {}).get("best")
        ]
        if stage is not None:
            pick = [d for d in done if d[1] == stage]
            if not pick:
                raise CheckpointError(
                    f"{source}: no finished stage {stage!r} with a model (finished: "
                    f"{', '.join(d[1] for d in sorted(done)) or 'none'})"
                )
        else:
            pick = [d for d in sorted(done) if d[2].get("target", "student") == "student"][-1:]
            if not pick:
                raise CheckpointError(f"{source}: no finished student stage with a model yet")
        path = os.path.join(source, pick[0][2]["result"]["best"])
    else:
        if stage is not None:
            raise CheckpointError("--stage applies to a run directory, not to a checkpoint file")
        path = source
    model, ckpt = load_model(path)
    return model, path, ckpt


def _export(args) -> int:
    import json
    import os

    import torch

    from pycompress.data import DatasetNotFoundError, build_dataset, make_loader
    from pycompress.export import ArtifactError, ExportError, is_artifact
    from pycompress.export.pipeline import export_formats
    from pycompress.train import CheckpointError
    from pycompress.utils import atomic_write_text

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if os.path.exists(args.output) and not args.force:
        return _err("export", f"{args.output} already exists; pass --force to overwrite it")
    try:
        if os.path.isfile(args.source) and is_artifact(args.source):
            return _export_artifact(args)
        model, path, ckpt = _resolve_source(args.source, args.stage)
        arch = {k: v for k, v in ckpt["arch"].items() if k != "qat"}
        data = ckpt.get("data")
        if args.input_size:
            c, h, w = _parse_shape(args.input_size)
            data = dict(data or {}, in_channels=c, image_size=[h, w])
        loader = None
        if not args.no_eval:
            if not data or not data.get("dataset"):
                print(
                    "pycompress export: note: the checkpoint records no dataset; exporting without evaluation",
                    file=sys.stderr,
                )
            else:
                try:
                    test_set, _ = build_dataset(
                        data["dataset"], "test", data_root=args.data_root, augment=False, **data.get("options", {})
                    )
                    loader = make_loader(test_set, 500, shuffle=False)
                except DatasetNotFoundError as exc:
                    print(f"pycompress export: note: no evaluation, the test set is missing: {exc}", file=sys.stderr)
        source = {
            "checkpoint": os.path.abspath(path),
            "stage": ckpt.get("stage"),
            "epoch": ckpt.get("epoch"),
            "recipe": ckpt.get("recipe"),
        }
        res = export_formats(
            model,
            {args.format: args.output},
            arch=arch,
            data=data,
            source=source,
            loader=loader,
            device=device,
            fold_bn=not args.no_fold_bn,
            force=args.force,
            log=lambda line: print(line),
        )
    except (CheckpointError, ArtifactError, ExportError, ValueError, FileExistsError, ImportError) as exc:
        return _err("export", exc)
    row = res["artifacts"][0]
    if args.format != "onnx":
        print(
            f"wrote {args.output}: {row['file_bytes']:,} bytes (payload {row['payload_bytes']:,}, manifest "
            f"{row['manifest_bytes']:,}, header and checksum 56); the payload encodes "
            f"{(row['counted_bits'] + 7) // 8:,} bytes of information (fp32 model: {res['fp32_bytes']:,} bytes)"
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2, default=str) + "\n")
    return 0


def _parse_shape(text: str):
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError(f"--input-size must look like 1x32x32 (channels x height x width), got {text!r}")
    return parts


def _export_artifact(args) -> int:
    """An artifact as the source: only ONNX can be made from it (its codes are final)."""
    from pycompress.export import load
    from pycompress.export.pipeline import input_shape_of

    if args.format != "onnx":
        raise ValueError(
            f"{args.source} is already a .pcz artifact; re-encoding it as {args.format} needs the "
            f"checkpoint it came from (only --format onnx works from an artifact)"
        )
    from pycompress.export import onnx as onnx_export

    model = load(args.source)
    man = model.artifact.manifest
    shape = _parse_shape(args.input_size) if args.input_size else input_shape_of(man.get("data"), man["arch"])
    if shape is None:
        raise ValueError("the artifact records no input shape; pass --input-size CxHxW")
    facts = onnx_export.export_onnx(model, args.output, shape, force=args.force)
    print(f"wrote {args.output}: {facts['file_bytes']:,} bytes")
    return 0


def _bench_triton_compile(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Triton decorates its kernels (and its own library's) for the interpreter when it is imported:
        # the compiler needs a process started without the variable.
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = ["bench", "triton-compile", "--arch", str(args.arch)] + (["--quick"] if args.quick else [])
        argv += [a for op in args.op or () for a in ("--op", op)]
        argv += (["--case", args.case] if args.case else []) + (["--json", args.json] if args.json else [])
        return subprocess.run([sys.executable, "-m", "pycompress.cli", *argv], env=env).returncode
    from pycompress.bench import triton_compile

    print(triton_compile.HEADER, flush=True)
    try:
        rows, facts = triton_compile.run(
            args.arch, args.quick, args.case, args.op, printer=lambda line: print(line, flush=True)
        )
    except (ValueError, RuntimeError) as exc:
        print(f"pycompress bench triton-compile: {exc}", file=sys.stderr)
        return 2
    print()
    print(triton_compile.summary(rows, facts))
    if args.json:
        triton_compile.write_json(args.json, rows, facts)
        print(f"wrote {args.json}")
    if not rows:
        print("pycompress bench triton-compile: no case matched", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.status != "ok"]
    missing = triton_compile.missing_kernels(rows, facts)
    return 1 if failed or missing else 0


def _bench_model(args) -> int:
    import torch

    from pycompress.bench import model as bench_model
    from pycompress.export import ArtifactError

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        shape = _parse_shape(args.input_size) if args.input_size else None
        meta: dict = {}
        rows = bench_model.run(
            args.file,
            batch_sizes=args.batch or (1, 64),
            threads=args.threads,
            warmup=args.warmup,
            repeats=args.repeats,
            device=device,
            input_shape=shape,
            onnx=not args.no_onnx,
            meta=meta,
        )
    except (ArtifactError, ValueError, RuntimeError, ImportError) as exc:
        return _err("bench model", exc)
    print(bench_model.format_table(rows))
    if args.json:
        bench_model.write_json(args.json, rows, meta)
        print(f"\nwrote {args.json}")
    return 0


def _bench_overhead(args) -> int:
    import dataclasses
    import json

    from pycompress.bench import overhead

    try:
        rows = overhead.run(
            args.op,
            args.backend,
            repeats=args.repeats,
            torch_rows=not args.no_torch,
            printer=lambda s: print(s, file=sys.stderr),
        )
    except ValueError as exc:
        print(f"pycompress bench overhead: {exc}", file=sys.stderr)
        return 2
    print(f"per-call overhead, microseconds ({overhead.machine()})\n")
    print(overhead.format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": overhead.machine(), "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def _bench_data(args) -> int:
    import dataclasses
    import json

    from pycompress.bench import data as bench_data
    from pycompress.data import DatasetNotFoundError
    from pycompress.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        rows = bench_data.run(
            recipe,
            workers=args.workers,
            batches=args.batches,
            repeats=args.repeats,
            batch=args.batch,
            device=args.device,
            data_root=args.data_root,
            printer=lambda s: print(s, file=sys.stderr),
        )
    except (RecipeError, DatasetNotFoundError, ValueError) as exc:
        return _err("bench data", exc)
    print(bench_data.format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def _bench_step(args) -> int:
    import torch

    from pycompress.bench import step
    from pycompress.recipe import RecipeError, load_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:
        return _err("bench step", exc)
    meta: dict = {}
    try:
        rows = step.run(
            recipe,
            args.stage,
            args.backend,
            steps=args.steps,
            repeats=args.repeats,
            warmup=args.warmup,
            batch=args.batch,
            device=args.device,
            data_root=args.data_root,
            compiled_rows=args.compile,
            printer=lambda s: print(s, file=sys.stderr),
            meta=meta,
        )
    except step.BenchStepError as exc:
        return _err("bench step", exc)
    print(
        f"training step of {recipe.name!r}, synthetic data, {args.steps} steps x {args.repeats} repeats after "
        f"{args.warmup} warm-up steps ({meta['device']}; {meta['machine']}; torch {meta['torch']})\n"
    )
    print(step.format_table(rows))
    if args.json:
        step.write_json(args.json, rows)
        print(f"\nwrote {args.json}")
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
        rows, meta = bench_ops.run(
            args.op, args.backend, args.size, args.device, dtypes, args.case, warm_heap=not args.cold_heap
        )
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
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `pycompress info model.pcz | head`: the reader left, not an error
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
