"""The harness itself (tests/conftest.py): ``mpirun -n 4 python -m pytest`` on scenarios
where the ranks disagree ends in seconds, non-zero, with the failing rank's message once.

Launcher tests (rank 0 only): each starts its own 4-rank pytest on a file in
tests/harness_scenarios/ (not collected by the suite: their names do not start with
``test_``).
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from mpipar.launch import clean_env, mpi_command

pytestmark = pytest.mark.launcher
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LIMIT_S = 60.0


def run_scenario(name):
    path = os.path.join(ROOT, "tests", "harness_scenarios", name)
    # pytest prints its summary lines whole (not cut to the terminal width) where CI or
    # BUILD_NUMBER is set; the counts below are of the cut form, as a person sees it.
    env = {k: v for k, v in clean_env().items() if k not in ("CI", "BUILD_NUMBER")}
    t = time.monotonic()
    proc = subprocess.run(mpi_command(4, ["-m", "pytest", path, "-q"]), capture_output=True,
                          text=True, timeout=2 * LIMIT_S, env=env, cwd=ROOT)
    return proc, proc.stdout + proc.stderr, time.monotonic() - t


@pytest.mark.parametrize("name, message", [
    ("scenario_skip.py", "rank 1 skips on its own"),
    ("scenario_raise.py", "rank 2 raises before the collective"),
])
def test_a_rank_that_leaves_a_collective_ends_the_job(name, message):
    proc, out, wall = run_scenario(name)
    assert proc.returncode != 0, out[-3000:]
    assert wall < LIMIT_S, f"took {wall:.0f} s\n{out[-3000:]}"
    assert out.count(message) == 1, out[-3000:]
    assert "aborting the job" in out, out[-3000:]


def test_disagreement_without_a_stuck_rank_fails_every_rank_and_goes_on():
    proc, out, wall = run_scenario("scenario_disagree.py")
    assert proc.returncode != 0 and wall < LIMIT_S, out[-3000:]
    assert "aborting the job" not in out, out[-3000:]
    # Rank 0's summary: the setup disagreement is an error, the one failing rank fails the
    # test on every rank, and the next test still ran and passed.
    assert re.search(r"\b1 failed, 1 passed, 1 error\b", out), out[-3000:]
    assert "ranks disagree: setup skipped on ranks [3]" in out, out[-3000:]
    assert "call failed on rank 1" in out, out[-3000:]
    assert out.count("assertion fails on rank 1") == 2, out[-3000:]   # rank 1 and rank 0
