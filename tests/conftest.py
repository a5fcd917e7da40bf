"""Test harness for running the suite under ``mpirun -n N python -m pytest`` (any N >= 1).

- Every test runs on every rank and must work for any world size (1, 2, 4, ...).
- After each test all ranks agree on the outcome: a test that failed on one rank fails
  (as a teardown error) on every rank. The agreement waits by polling a non-blocking
  all-reduce with short sleeps, so idle ranks do not spin on the two cores.
- If a rank failed and the others do not arrive within ``RANK_WAIT_S`` (they are stuck
  in a collective the failed rank left), the job is aborted: a non-zero exit, no hang.
- A test that hangs trips pytest-timeout (thread method), which exits that process;
  mpirun then ends the whole job.
- ``@pytest.mark.launcher`` tests (they start mpirun or sbatch themselves) and
  ``@pytest.mark.rank0`` tests (pure, costly, nothing to gain from running N times) run on
  world rank 0 only; the other ranks wait, sleeping.
- Ranks other than 0 print only their failures.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
from mpi4py import MPI

import mpipar  # noqa: F401  (sets one BLAS thread per rank before numpy/MPI load)

WORLD = MPI.COMM_WORLD
RANK_WAIT_S = 60.0
FIXTURES = os.environ.get("MPIPAR_FIXTURES", os.path.join(os.path.dirname(__file__), "fixtures"))


def sleepy_allreduce_max(value: int, deadline_s: float) -> int | None:
    """Max of ``value`` over the world, or None if the others did not come in time."""
    import numpy as np
    send = np.array([value], dtype=np.int64)
    recv = np.zeros(1, dtype=np.int64)
    req = WORLD.Iallreduce(send, recv, op=MPI.MAX)
    t_end = time.monotonic() + deadline_s
    delay = 1e-4
    while not req.Test():
        if time.monotonic() > t_end:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return int(recv[0])


def pytest_configure(config):
    config.addinivalue_line("markers", "launcher: starts mpirun/sbatch; runs on rank 0 only")
    config.addinivalue_line("markers", "rank0: pure test run on world rank 0 only")
    if WORLD.Get_size() > 1 and WORLD.Get_rank() != 0:
        # Quiet progress on the other ranks; their failures still print at the end.
        config.option.verbose = -1
        config.option.reportchars = "fE"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        item._mpipar_failed = True
        item._mpipar_report = rep


def _abort(request):
    # The abort ends pytest before its summary: print this rank's failure first, past
    # pytest's output capture (which would otherwise swallow it).
    node = request.node
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=False)
    rep = getattr(node, "_mpipar_report", None)
    if rep is not None:
        sys.stderr.write(f"[rank {WORLD.Get_rank()}] FAILED {node.nodeid}\n"
                         f"{rep.longreprtext}\n")
    sys.stderr.write(f"[rank {WORLD.Get_rank()}] other ranks did not finish {node.nodeid}; "
                     "aborting the job\n")
    sys.stderr.flush()
    WORLD.Abort(1)


@pytest.fixture(autouse=True)
def _ranks_agree(request):
    """After each test every rank takes part in one agreement (see module docstring)."""
    if WORLD.Get_size() == 1:
        yield
        return
    rank0_only = "launcher" in request.node.keywords or "rank0" in request.node.keywords
    if rank0_only and WORLD.Get_rank() != 0:
        # Wait (sleeping) for rank 0 to run it, join its agreement, then skip here.
        if sleepy_allreduce_max(0, 3600.0) is None:
            _abort(request)
        pytest.skip("runs on world rank 0 only")
    yield
    me_failed = getattr(request.node, "_mpipar_failed", False)
    wait = RANK_WAIT_S if me_failed else (3600.0 if rank0_only else 600.0)
    worst = sleepy_allreduce_max(int(me_failed), wait)
    if worst is None:
        _abort(request)
    if worst and not me_failed:
        pytest.fail("failed on another rank", pytrace=False)


@pytest.fixture
def world():
    return WORLD


@pytest.fixture
def fixtures_dir():
    path = os.path.abspath(FIXTURES)
    if not os.path.isdir(path):
        pytest.skip(f"fixtures folder not found: {path} (set MPIPAR_FIXTURES)")
    return path
