"""Checkpoints are weights-only: they load with ``torch.load(weights_only=True)``, and a file whose
pickle would run code is refused (a CheckpointError naming it) without running anything."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from pycompress import cli
from pycompress.prune import Pruner, build_masked_optimizer
from pycompress.recipe import load_model
from pycompress.train import CheckpointError, Trainer, load_checkpoint, save_checkpoint
from pycompress.train import checkpoint as ckpt_mod
from pycompress.train.checkpoint import rng_state, set_rng_state


class _System:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _Open:
    """Unpickling this creates ``marker`` with ``open``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _evil(tmp_path, payload):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    # everything a pycompress checkpoint has, plus the payload
    torch.save(
        {
            "format": ckpt_mod.FORMAT,
            "version": ckpt_mod.VERSION,
            "arch": {"model": "lenet5", "args": {}, "in_channels": 1, "num_classes": 10, "qat": None},
            "model": {"w": torch.zeros(2)},
            "payload": payload(marker),
        },
        str(path),
    )
    return str(path), marker


PAYLOADS = [_System, _Open]


@pytest.mark.parametrize("payload", PAYLOADS, ids=["os.system", "open"])
def test_payload_would_run_with_a_full_unpickle(tmp_path, payload):
    """The test files are real exploits: an unrestricted load creates the marker."""
    path, marker = _evil(tmp_path, payload)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS, ids=["os.system", "open"])
def test_load_checkpoint_refuses_code(tmp_path, payload):
    path, marker = _evil(tmp_path, payload)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert path in msg and "weights-only load refuses" in msg and "not loaded" in msg
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS, ids=["os.system", "open"])
def test_load_model_refuses_code(tmp_path, payload):
    path, marker = _evil(tmp_path, payload)
    with pytest.raises(CheckpointError, match="weights-only load refuses") as err:
        load_model(path)
    assert path in str(err.value)
    assert not marker.exists()


def test_legacy_format_file_refused(tmp_path):
    """The same with torch's old (non-zip) serialization format."""
    marker = tmp_path / "PWNED"
    path = str(tmp_path / "evil_legacy.pt")
    torch.save({"format": ckpt_mod.FORMAT, "payload": _System(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="weights-only load refuses") as err:
        load_checkpoint(path)
    assert path in str(err.value)
    assert not marker.exists()


def test_cli_eval_refuses_code(tmp_path, capsys):
    path, marker = _evil(tmp_path, _System)
    assert cli.main(["eval", path]) == 2
    err = capsys.readouterr().err
    assert path in err and "weights-only load refuses" in err
    assert not marker.exists()


def test_unreadable_files_still_say_cannot_be_read(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 2)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(str(junk))


# ----------------------------------------------------------------------------- RNG state
def _draws():
    return (
        [random.random() for _ in range(5)] + [random.gauss(0, 1)],
        np.random.standard_normal(7).tolist() + np.random.randint(0, 1000, 5).tolist(),
        torch.rand(5).tolist() + torch.randn(3).tolist(),
    )


def _scramble():
    random.seed(12345)
    np.random.seed(999)
    torch.manual_seed(4321)


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()  # an odd number of gaussians: numpy caches one (has_gauss, cached_gaussian)
    random.gauss(0, 1)  # python caches the second gaussian (gauss_next)
    np_state = np.random.get_state()
    state = rng_state()
    assert isinstance(state["numpy"], dict)
    want = _draws()
    path = str(tmp_path / "rng.pt")
    save_checkpoint(path, {"rng": state})
    _scramble()
    assert _draws() != want
    # the file is weights-only-safe on its own
    torch.load(path, weights_only=True)
    set_rng_state(load_checkpoint(path)["rng"])
    assert _draws() == want
    # the numpy state is restored exactly, the cached gaussian included
    set_rng_state(load_checkpoint(path)["rng"])
    got = np.random.get_state()
    assert got[0] == np_state[0] and got[1].dtype == np.uint32
    assert np.array_equal(got[1], np_state[1]) and got[2:] == np_state[2:] and got[3] == 1


def test_old_style_checkpoint_still_loads(tmp_path):
    """Checkpoints of older pycompress versions hold ``np.random.get_state()`` (a uint32 array)."""
    random.seed(7)
    np.random.seed(8)
    torch.manual_seed(9)
    np.random.standard_normal()
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    want = _draws()
    path = str(tmp_path / "old.pt")
    torch.save(
        {
            "format": ckpt_mod.FORMAT,
            "version": 1,
            "model": {"w": torch.ones(3)},
            "history": [{"epoch": 1, "lr": 0.1}],
            "rng": old_rng,
        },
        path,
    )
    # a plain weights-only load refuses the numpy array: the file really is old-style
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    _scramble()
    c = load_checkpoint(path)
    assert torch.equal(c["model"]["w"], torch.ones(3))
    assert isinstance(c["rng"]["numpy"][1], np.ndarray)
    set_rng_state(c["rng"])
    assert _draws() == want
    # the numpy globals were allowed only for that load
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------- whole trainer
@pytest.mark.parametrize(
    "optimizer,schedule",
    [
        ({"name": "sgd", "lr": 0.1, "momentum": 0.9}, {"name": "warmup_cosine", "warmup_epochs": 1}),
        ({"name": "adamw", "lr": 1e-3}, {"name": "multistep", "milestones": [1]}),
    ],
)
def test_trainer_checkpoint_is_weights_only(tmp_path, optimizer, schedule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.arange(32) % 4
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    pruner = Pruner(
        model, {"criterion": "global_magnitude", "sparsity": 0.5, "schedule": "regrow", "update_interval": 2}
    )
    t = Trainer(
        model,
        train,
        DataLoader(TensorDataset(x, y), batch_size=8),
        epochs=2,
        optimizer=build_masked_optimizer(model, optimizer),
        schedule=schedule,
        hooks=[pruner],
        out_dir=str(tmp_path),
        progress=False,
        log=lambda s: None,
        checkpoint_extra=lambda: {"arch": {"model": "tiny", "args": {"k": (1, 2)}}},
    )
    t.fit()
    for name in ("checkpoint.pt", "best.pt"):
        path = str(tmp_path / name)
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        c = torch.load(path, weights_only=True)
        assert c["format"] == ckpt_mod.FORMAT
        assert c["hooks"][0]["selected"] is True
        assert c["scheduler"]["last_epoch"] == 8
        assert len(c["optimizer"]["state"]) > 0
        assert isinstance(c["rng"]["numpy"], dict)
        assert load_checkpoint(path)["epoch"] == 2
