"""tests/helpers.py itself: run_isolated (the scalar-path tests rely on it noticing a test that
failed, was skipped or never ran) and the synthetic quadrant task."""

import textwrap

import pytest
import torch

from tests.helpers import quadrant_data, run_isolated

PROBE = textwrap.dedent(
    """
    import os

    import pytest


    def test_env():
        assert os.environ["HELPERS_PROBE"] == "42"


    def test_fails():
        assert 1 == 2, "deliberately"


    def test_skipped():
        pytest.skip("deliberately")


    @pytest.mark.parametrize("case", ["xq1", "zw2"])
    def test_param(case):
        assert case in ("xq1", "zw2")
    """
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "test_probe.py"
    path.write_text(PROBE)
    return str(path)


def test_run_isolated_reports_every_outcome(probe):
    run = run_isolated(
        probe, ["test_env", "test_fails", "test_skipped", "test_param", "test_env"], {"HELPERS_PROBE": "42"}
    )
    assert run.returncode == 1
    assert {cid: outcome for cid, (outcome, _) in run.cases.items()} == {
        "test_env": "passed",
        "test_fails": "failed",
        "test_skipped": "skipped",
        "test_param[xq1]": "passed",
        "test_param[zw2]": "passed",
    }
    run.assert_passed(["test_env", "test_param"])
    with pytest.raises(AssertionError, match="test_fails: failed") as info:
        run.assert_passed(["test_env", "test_fails"])
    assert "deliberately" in str(info.value) and "HELPERS_PROBE" in str(info.value)
    with pytest.raises(AssertionError, match="test_skipped: skipped"):
        run.assert_passed("test_skipped")
    with pytest.raises(AssertionError, match="test_other: no case ran"):
        run.assert_passed("test_other")


def test_run_isolated_sets_the_environment_of_the_fresh_interpreter(probe):
    run_isolated(probe, "test_env", {"HELPERS_PROBE": "42"}).assert_passed("test_env")
    with pytest.raises(AssertionError, match="test_env: failed"):
        run_isolated(probe, "test_env", {"HELPERS_PROBE": "7"}).assert_passed("test_env")


def test_run_isolated_keyword_selects_cases(probe):
    run = run_isolated(probe, "test_param", {}, keyword="zw2")
    assert list(run.cases) == ["test_param[zw2]"]


def test_run_isolated_refuses_a_run_pytest_could_not_complete(probe):
    with pytest.raises(AssertionError, match="pytest exited with"):
        run_isolated(probe, "test_no_such_test", {})
    with pytest.raises(AssertionError, match="pytest exited with"):
        run_isolated(probe, "test_param", {}, keyword="no_such_case")


def test_quadrant_data_is_seeded_and_labelled_by_the_bright_quadrant():
    x, y = quadrant_data(256, 3, noise=0.0)
    assert x.shape == (256, 1, 12, 12) and y.shape == (256,) and set(y.tolist()) <= {0, 1, 2, 3}
    x2, y2 = quadrant_data(256, 3, noise=0.0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(quadrant_data(256, 4)[1], y)
    quadrant_sums = torch.stack(
        [x[:, 0, 6 * (c // 2) : 6 * (c // 2) + 6, 6 * (c % 2) : 6 * (c % 2) + 6].sum((1, 2)) for c in range(4)], 1
    )
    assert torch.equal(quadrant_sums.argmax(1), y)
