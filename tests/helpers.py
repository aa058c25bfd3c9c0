"""Helpers shared by test modules (conftest.py keeps only fixtures and hooks): the device a backend's
tensors live on, running the CLI and writing recipes, a small synthetic classification task with a
trained model, and running tests in a fresh interpreter with a given environment."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- backends


def device_for(backend: str) -> torch.device:
    """The device a backend's tensors live on in tests."""
    if backend == "cuda" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
        return torch.device("cuda")
    return torch.device("cpu")


# ----------------------------------------------------------------------------- recipes and the CLI


def write_recipe(directory, raw: dict, name: str = "tiny.yaml") -> str:
    """`raw` written as YAML to directory / name (a pathlib.Path, e.g. tmp_path); returns the path."""
    p = directory / name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(p)


def run_cli(
    args: List[str], env_extra: Optional[Dict[str, str]] = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`pycompress ARGS` in a fresh interpreter (one thread, cwd = the repository root)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.update(env_extra or {})
    code = "import sys, torch; torch.set_num_threads(1); from pycompress.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def run_torchrun(
    nproc: int, args: List[str], env_extra: Optional[Dict[str, str]] = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC -m pycompress ARGS` (a free port, one thread per
    process, cwd = the repository root)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*cmd, "-m", "pycompress", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


# ----------------------------------------------------------------------------- a small trained model


def quadrant_data(n: int, seed: int, noise: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """4 classes of 1x12x12 images: a brighter quadrant per class under Gaussian noise of std
    `noise` (hard enough that a tiny CNN stays below 100%, so a change of accuracy can show)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = noise * torch.randn(n, 1, 12, 12, generator=g)
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, 6 * r : 6 * r + 6, 6 * q : 6 * q + 6] += 0.5
    return x, y


def train_on_quadrants(make_model: Callable[[], nn.Module], steps: int, n_test: int, noise: float = 1.0):
    """(model, batches, test): a model built by make_model() after torch.manual_seed(0), trained with
    Adam (lr 0.02) for `steps` batches of 64 of quadrant_data(512, 0, noise) and left in eval mode; the
    8 training batches as (x, y) pairs; and n_test held-out examples quadrant_data(n_test, 1, noise)."""
    torch.manual_seed(0)
    model = make_model()
    x, y = quadrant_data(512, 0, noise)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for step in range(steps):
        i = (step * 64) % 512
        loss = nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    return model, batches, quadrant_data(n_test, 1, noise)


def accuracy(model: nn.Module, data) -> float:
    """Top-1 accuracy in percent of `model` on data = (x, y)."""
    x, y = data
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


# ----------------------------------------------------------------------------- isolated runs


@dataclasses.dataclass
class IsolatedRun:
    """The outcome of run_isolated: every test case that ran, by id ("test_name[params]")."""

    command: List[str]
    env: Dict[str, str]
    returncode: int
    output: str
    cases: Dict[str, Tuple[str, str]]  # id -> (outcome: passed | failed | error | skipped, details)

    def assert_passed(self, names: Union[str, Iterable[str]]) -> None:
        """Every case of the test functions `names` ran and passed (and at least one of each ran)."""
        names = [names] if isinstance(names, str) else list(names)
        problems = []
        for name in names:
            mine = {cid: out for cid, out in self.cases.items() if cid.split("[", 1)[0] == name}
            if not mine:
                problems.append(f"{name}: no case ran")
            problems += [
                f"{cid}: {outcome}\n{details}" for cid, (outcome, details) in mine.items() if outcome != "passed"
            ]
        if problems:
            raise AssertionError(
                f"in a fresh interpreter with {self.env} ({' '.join(self.command)}):\n"
                + "\n".join(problems)
                + "\n--- output (tail) ---\n"
                + self.output[-4000:]
            )


def run_isolated(
    path: str,
    tests: Union[str, Iterable[str]],
    env: Dict[str, str],
    keyword: Optional[str] = None,
    timeout: float = 600,
) -> IsolatedRun:
    """Run the test functions `tests` of the test file `path` in a fresh interpreter
    (`python -m pytest path::test ...`) whose environment is this one updated with `env`, so the
    variables are set before torch or pycompress is imported (for settings read once per process,
    such as the C++ kernels' PYCOMPRESS_CPU_SCALAR). `keyword` is passed as `-k` to select cases
    (e.g. "cpu": the cpu-backend parametrizations). Each function runs once even if named twice.
    Returns the outcome of every case; IsolatedRun.assert_passed checks them. A run that pytest
    could not complete (a collection error, nothing selected, a crash) raises AssertionError."""
    tests = [tests] if isinstance(tests, str) else list(dict.fromkeys(tests))
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    full_env = {**os.environ, **env}
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            *[f"{rel}::{t}" for t in tests],
        ]
        if keyword:
            command += ["-k", keyword]
        res = subprocess.run(command, env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output = res.stdout + res.stderr
        if res.returncode not in (0, 1) or not os.path.exists(report):
            raise AssertionError(
                f"pytest exited with {res.returncode} in a fresh interpreter with {env} "
                f"({' '.join(command)}):\n{output[-4000:]}"
            )
        cases = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, details = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    details = (el.get("message") or "") + "\n" + (el.text or "")
                    break
            cases[case.get("name")] = (outcome, details.strip()[-3000:])
    return IsolatedRun(command, env, res.returncode, output, cases)


def scalar_path_tests(path: str, scalar_path: Dict[str, List[str]], kernels, enabled: bool):
    """The three tests of a CPU kernel family's portable scalar path, for a test module to bind:

        test_scalar_path_covers_every_kernel, scalar_path_run, test_cpu_scalar_path_matches_reference = \
            scalar_path_tests(__file__, SCALAR_PATH, KERNELS, "cpu" in BACKENDS)

    `scalar_path` maps each kernel of the op's kernel table (`KERNELS`, pycompress.ops.registry) to
    the tests of `path` that exercise it; those tests' cpu cases rerun once in a fresh interpreter
    with PYCOMPRESS_CPU_SCALAR=1 (run_isolated), and each kernel's tests must pass there. A kernel
    of the table without an entry fails the coverage test."""
    import dataclasses

    import pytest

    def test_scalar_path_covers_every_kernel():
        assert list(scalar_path) == [f.name for f in dataclasses.fields(kernels.table("reference"))]

    @pytest.fixture(scope="module")
    def scalar_path_run():
        tests = [t for names in scalar_path.values() for t in names]
        return run_isolated(path, tests, {"PYCOMPRESS_CPU_SCALAR": "1"}, keyword="cpu")

    @pytest.mark.skipif(not enabled, reason="extension not built")
    @pytest.mark.parametrize("kernel", list(scalar_path))
    def test_cpu_scalar_path_matches_reference(scalar_path_run, kernel):
        scalar_path_run.assert_passed(scalar_path[kernel])

    return test_scalar_path_covers_every_kernel, scalar_path_run, test_cpu_scalar_path_matches_reference
