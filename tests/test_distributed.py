"""Multi-process training (torchrun, DDP on gloo, 2 CPU processes): a tiny KD + prune + QAT recipe
run by 2 processes keeps the processes bit-identical, writes its files once, evaluates every test
image exactly once, resumes exactly after a kill, and equals a 1-process run with the same global
batch within floating-point reduction noise. Plus the pieces: the shard sampler, the all-reduced
evaluation and calibration, the replica check, errors raised on every process."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from pycompress.recipe import RecipeError, dump_recipe, validate
from pycompress.train import distributed as D
from tests.helpers import run_cli, run_torchrun, write_recipe

LENGTH = 201  # train and test images: an odd count, so the evaluation shards differ in length
TINY = {
    "name": "tiny-ddp",
    "seed": 3,
    "device": "cpu",
    "data": {
        "dataset": "synthetic",
        "batch_size": 8,  # per process
        "eval_batch_size": 16,
        "augment": False,
        "options": {"num_classes": 4, "image_size": 16, "in_channels": 1, "length": LENGTH},
    },
    # no BatchNorm in the student: its batch statistics would differ between 2 x 8 and 1 x 16
    "model": {"name": "lenet5", "args": {"input_size": 16}},
    "teacher": {"name": "lenet300", "args": {"input_size": 16}},
    "stages": [
        {
            "name": "teacher",
            "kind": "train",
            "target": "teacher",
            "epochs": 1,
            "optimizer": {"name": "sgd", "lr": 0.05},
        },
        {
            "name": "kd",
            "kind": "distill",
            "epochs": 1,
            "optimizer": {"name": "adamw", "lr": 2e-3},
            "distill": "kldiv:1",
        },
        {
            "name": "prune",
            "kind": "prune",
            "epochs": 2,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "distill": "kldiv:1",
            "prune": {"criterion": "global_magnitude", "sparsity": 0.5, "schedule": "regrow", "update_interval": 3},
        },
        {
            "name": "qat",
            "kind": "quantize",
            "epochs": 2,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "distill": "kldiv:1",
            "quantize": {"weight_bits": 4, "act_bits": 8, "calib_batches": 2},
        },
        {"name": "export", "kind": "export", "formats": ["pcz"]},
    ],
}
TRAINING = ("00-teacher", "01-kd", "02-prune", "03-qat")


def _state(out, stage, name="checkpoint.pt"):
    return torch.load(os.path.join(out, "stages", stage, name), map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The tiny recipe by 2 processes, and by 1 process with the same global batch (2 x 8 = 16)."""
    d = tmp_path_factory.mktemp("ddp")
    path = write_recipe(d, TINY)
    out2, out1 = str(d / "two"), str(d / "one")
    two = run_torchrun(2, ["run", path, "--out", out2, "--no-progress"])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = run_cli(
        ["run", path, "--out", out1, "--no-progress", "--set", "data.batch_size=16", "--set", "data.eval_batch_size=32"]
    )
    assert one.returncode == 0, one.stderr[-3000:]
    return path, out2, two, out1


def test_two_processes_agree_write_once_and_count_every_test_image_once(ddp_run):
    _, out, proc, _ = ddp_run
    state = json.load(open(os.path.join(out, "run.json")))
    assert state["world_size"] == 2
    for name in ("teacher", "kd", "prune", "qat"):
        res = state["stages"][name]["result"]
        # every process held a bit-identical model (masks, shadows, quantizer scales included) after every epoch
        assert res["distributed"]["world_size"] == 2 and res["distributed"]["identical"] is True, name
        assert res["distributed"]["tensors"] >= 6
    assert (
        state["stages"]["qat"]["result"]["distributed"]["tensors"]
        > state["stages"]["kd"]["result"]["distributed"]["tensors"]
    )  # masks and quantizer state were compared too
    for stage, epochs in zip(TRAINING, (1, 1, 2, 2)):
        rows = open(os.path.join(out, "stages", stage, "metrics.csv")).read().strip().splitlines()
        assert len(rows) == 1 + epochs, stage  # one writer: no row twice
        head = rows[0].split(",")
        for r in rows[1:]:
            assert int(float(r.split(",")[head.index("eval_samples")])) == LENGTH, stage  # no padded duplicates
    # the log was written by process 0 alone
    assert proc.stdout.count("[qat] epoch 2/2") == 1 and proc.stdout.count("report: ") == 1
    assert "2 processes (gloo)" in proc.stdout and "global batch = 2 x" in proc.stdout
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp") or ".tmp" in f]
    assert not leftovers
    md = open(os.path.join(out, "report.md")).read()
    assert "2 processes (torchrun, DistributedDataParallel)" in md
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["world_size"] == 2 and os.path.getsize(os.path.join(out, "model.pcz")) > 0
    # the evaluation stage inside export (process 0, the full test set) saw every image too
    assert f"on {LENGTH} test images" in proc.stdout


def test_two_processes_equal_one_process_with_the_same_global_batch(ddp_run):
    _, out2, _, out1 = ddp_run
    for stage in TRAINING:
        a, b = _state(out2, stage), _state(out1, stage)
        assert set(a) == set(b), stage
        for k in a:
            if a[k].dtype in (torch.bool, torch.uint8) or not a[k].is_floating_point():
                assert torch.equal(a[k], b[k]), (stage, k)  # masks, flags: exactly
            else:
                # float sums in another order (gradients all-reduced over 2 x 8 instead of one batch of 16)
                assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4), (stage, k, (a[k] - b[k]).abs().max())
    qat = _state(out2, "03-qat")
    assert any(k.endswith("mask") for k in qat) and any("act_quant.scale" in k for k in qat)


def test_killed_two_process_run_resumes_exactly(ddp_run, tmp_path):
    path, ref, _, _ = ddp_run
    out = str(tmp_path / "killed")
    # 100 samples per process / 8 = 12 steps per epoch: step 20 is in the prune stage's second epoch
    killed = run_torchrun(2, ["run", path, "--out", out, "--no-progress"], {"PYCOMPRESS_DEBUG_KILL_AT": "prune:20"})
    assert killed.returncode != 0
    assert json.load(open(os.path.join(out, "run.json")))["stages"]["prune"]["status"] == "running"
    again = run_torchrun(2, ["run", path, "--out", out, "--no-progress", "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[prune] resumed from" in again.stdout and "[kd] already done, skipped" in again.stdout
    for stage in TRAINING:
        a, b = _state(ref, stage), _state(out, stage)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), stage


def test_resume_with_another_number_of_processes_is_refused(ddp_run):
    path, out, _, _ = ddp_run
    res = run_cli(["run", path, "--out", out, "--resume", "--no-progress"])
    assert res.returncode == 2
    assert "started with 2 process(es)" in res.stderr and "torchrun --nproc_per_node 2" in res.stderr


# ------------------------------------------------------------------------------ the pieces
def test_shard_sampler_matches_one_process_order():
    n, b = 23, 4
    ds = TensorDataset(torch.arange(n))

    def order(loader):
        loader.generator.manual_seed(7)
        return [int(v) for (x,) in loader for v in x]

    g = torch.Generator()
    one = order(DataLoader(ds, batch_size=2 * b, shuffle=True, generator=g, drop_last=True))
    ref = order(DataLoader(ds, batch_size=1, sampler=D.ShardSampler(n, 0, 1, shuffle=True, generator=g), generator=g))
    assert ref == order(DataLoader(ds, batch_size=1, shuffle=True, generator=g))  # world 1: RandomSampler's order
    shards = []
    for r in range(2):
        s = D.ShardSampler(n, r, 2, shuffle=True, generator=g)
        shards.append(order(DataLoader(ds, batch_size=b, sampler=s, generator=g, drop_last=True)))
        assert len(s) == n // 2
    # global batch k of 2 processes = batch k of one process with twice the batch
    for k in range(len(one) // (2 * b)):
        assert sorted(shards[0][k * b : (k + 1) * b] + shards[1][k * b : (k + 1) * b]) == sorted(
            one[2 * b * k : 2 * b * (k + 1)]
        )
    ev = [list(D.ShardSampler(n, r, 3, shuffle=False)) for r in range(3)]
    assert sorted(i for e in ev for i in e) == list(range(n)) and [len(e) for e in ev] == [8, 8, 7]
    with pytest.raises(ValueError, match="rank 2 is not in"):
        D.ShardSampler(n, 2, 2, shuffle=False)
    with pytest.raises(ValueError, match="needs the generator"):
        D.ShardSampler(n, 0, 2, shuffle=True)


def test_alone_nothing_changes():
    loader = DataLoader(TensorDataset(torch.arange(4)), batch_size=2)
    assert D.shard_loader(loader) is loader and D.world_size() == 1 and D.is_main()
    assert D.all_reduce_sum([1.5, 2]) == [1.5, 2.0] and D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.on_main(lambda: 5) == 5
    m = nn.Linear(3, 2)
    assert D.check_replicas(m) == {"world_size": 1, "tensors": 2, "identical": True}
    d0 = D.state_digests(m)
    with torch.no_grad():
        m.weight[0, 0] += 1e-6
    assert D.state_digests(m)["weight"] != d0["weight"] and D.state_digests(m)["bias"] == d0["bias"]
    assert (D.lr_factor("none", 4), D.lr_factor("linear", 4), D.lr_factor("sqrt", 4)) == (1.0, 4.0, 2.0)
    with pytest.raises(ValueError, match="lr_scale"):
        D.lr_factor("cubic", 2)


def test_recipe_distributed_section():
    r = validate({**TINY, "distributed": {"lr_scale": "linear", "sync_bn": True}})
    assert r.distributed.lr_scale == "linear" and r.distributed.sync_bn and not r.distributed.find_unused_parameters
    assert "distributed" in dump_recipe(r)
    assert "distributed" not in dump_recipe(validate(TINY))  # default: left out, older runs still resume
    with pytest.raises(RecipeError, match="distributed: 'lr_scale'"):
        validate({**TINY, "distributed": {"lr_scale": "cubic"}})
    with pytest.raises(RecipeError, match="unknown key 'sync_batchnorm'"):
        validate({**TINY, "distributed": {"sync_batchnorm": True}})


def _worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    """Process ``rank`` of a gloo group: exercises evaluation, calibration, the replica check, BN
    buffer sync, SyncBatchNorm on CPU and error propagation; rank 0 writes what it saw."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from pycompress.quant import QuantSpec, calibrate, prepare_qat
    from pycompress.train import Trainer, evaluate

    out = {}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(11, 1, 8, 8), torch.randint(0, 3, (11,))
    full = DataLoader(TensorDataset(x, y), batch_size=4)
    mine = evaluate(model, D.shard_loader(full, shuffle=False), distributed=True)
    alone = evaluate(model, full)
    out["eval"] = (
        mine["samples"],
        alone["samples"],
        abs(mine["top1"] - alone["top1"]),
        abs(mine["loss"] - alone["loss"]),
    )
    # calibration: each process sees different data; the scales come from all of it
    for observer in ("minmax", "percentile"):
        spec = QuantSpec.from_dict({"weight_bits": 8, "act_bits": 8, "act_observer": observer})
        q = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
        prepare_qat(q, spec)
        torch.manual_seed(1)
        batches = [torch.randn(2, 1, 8, 8) * (1 + 3 * r) for r in range(world)]
        calibrate(q, [batches[rank]], num_batches=1)
        qs = {
            n: m.scale.clone() for n, m in q.named_modules() if type(m).__name__ == "FakeQuantizer" and m.kind == "act"
        }
        ref = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
        prepare_qat(ref, spec)
        ref.load_state_dict(q.state_dict())  # same weights; now calibrate alone on both batches
        with _alone():
            calibrate(ref, batches, num_batches=world)
        rs = {n: m.scale for n, m in ref.named_modules() if type(m).__name__ == "FakeQuantizer" and m.kind == "act"}
        out[observer] = max(float((qs[n] - rs[n]).abs().max()) for n in qs) if qs else None
        out[observer + "_n"] = len(qs)
    # a Trainer: BN statistics synced at the epoch's end, sync_bn ignored on the CPU with a note
    lines = []
    tr = Trainer(
        model,
        DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True, generator=torch.Generator()),
        full,
        epochs=1,
        optimizer={"name": "sgd", "lr": 0.1},
        distributed={"sync_bn": True},
        log=lines.append,
        progress=False,
    )
    s = tr.fit()
    out["trainer"] = (s["distributed"], tr.history[0]["eval_samples"], any("sync_bn ignored" in ln for ln in lines))
    # a model that differs on process 1 is caught, naming the tensor
    with torch.no_grad():
        if rank == 1:
            model[4].bias.add_(1.0)
    try:
        D.check_replicas(model, "test")
        out["mismatch"] = None
    except D.ReplicaMismatch as exc:
        out["mismatch"] = str(exc)
    # an error on process 0 is raised on every process
    try:
        D.on_main(lambda: (_ for _ in ()).throw(KeyError("boom")))
        out["on_main"] = None
    except KeyError as exc:
        out["on_main"] = repr(exc)
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


class _alone:
    """Make the distributed helpers see one process (a reference computed inside a group)."""

    def __enter__(self):
        self._orig = D.is_distributed
        D.is_distributed = lambda: False

    def __exit__(self, *exc):
        D.is_distributed = self._orig


def test_pieces_in_a_two_process_gloo_group(tmp_path):
    init = tempfile.mktemp(dir=tmp_path)
    res = str(tmp_path / "res.json")
    mp.spawn(_worker, args=(2, init, res), nprocs=2, join=True)
    out = json.load(open(res))
    samples, alone_samples, dtop1, dloss = out["eval"]
    assert samples == alone_samples == 11 and dtop1 == 0 and dloss < 1e-6
    assert out["minmax_n"] >= 1 and out["minmax"] == 0.0  # min of minima, max of maxima: exact
    assert out["percentile"] < 1e-6  # the mean of every process's per-batch percentiles
    dist_info, eval_samples, note = out["trainer"]
    assert dist_info["identical"] and dist_info["world_size"] == 2 and not dist_info["sync_bn"]
    assert eval_samples == 11 and note
    assert out["mismatch"] and "4.bias" in out["mismatch"] and "4.weight" not in out["mismatch"]
    assert out["on_main"] and "boom" in out["on_main"]
