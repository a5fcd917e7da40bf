"""Test harness for ``mpirun -n N python -m pytest`` (any N >= 1) that cannot hang.

Every rank collects and runs the same tests in the same order; the ranks agree twice per
test, on a communicator of the harness's own (a duplicate of the world, so its messages
never meet a test's):

1. after setup: did setup pass, skip or fail here? The same everywhere: go on (or skip).
   Different (one rank skipped, another did not): the test fails on every rank, with
   the reason, before any rank enters the test body.
2. after the call: passed, failed or skipped here? One failure fails the test on every
   rank (the others say which rank and why); a skip on some ranks only is a failure too.

A rank that failed or skipped may have left a collective the others are still inside.
It waits ``RANK_WAIT_S`` seconds for them (``$MPIPAR_RANK_WAIT_S``, default 20); if they
do not come it prints its failure once, past pytest's capture, and aborts the job: a
non-zero exit within seconds, never a hang. A rank that passed waits as long as the
test may take (pytest-timeout ends a test that hangs; mpirun then ends the job). The
waits poll a non-blocking collective with short sleeps, so idle ranks leave the cores
to the working ones. The collected test ids are agreed once at the start: ranks that
collected different tests stop at once, all of them.

Run/skip decisions must be the same on every rank: make them from facts that cannot
differ (the world size, markers, the installed packages), or decide once and share
(``fixtures_dir``: rank 0 looks, everyone follows; a missing fixtures folder fails the
tests that need it, never skips them: the repository carries it). Tests that need
several ranks use pytest-mpi's marker, ``@pytest.mark.mpi(min_size=2)`` (``--with-mpi``
is in addopts).
``@pytest.mark.launcher`` tests (they start mpirun or sbatch themselves) and
``@pytest.mark.rank0`` tests (pure, costly) run on world rank 0 only; the other ranks
wait, sleeping. Ranks other than 0 print their own failures in full and, for a
failure on another rank, one line that points to rank 0's report.

The harness's own test (tests/test_harness.py) runs the scenarios in
tests/harness_scenarios/ under mpirun and checks that each ends in seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib

import mpipar

mpipar.pin_threads()           # before numpy and MPI load: one BLAS thread per rank

import numpy as np
import pytest
from mpi4py import MPI

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
RANK_WAIT_S = float(os.environ.get("MPIPAR_RANK_WAIT_S", "20"))
LONG_WAIT_S = 24 * 3600.0       # a rank that passed: pytest-timeout bounds the wait
MSG_BYTES = 2048                # one rank's word in an agreement (utf-8 JSON, cut)
FIXTURES = os.environ.get("MPIPAR_FIXTURES", os.path.join(os.path.dirname(__file__), "fixtures"))
_HARNESS: dict = {}             # "comm": the harness's communicator, "fixtures": agreed


def _gather_words(word: dict, deadline_s: float) -> list[dict] | None:
    """Every rank's ``word`` (rank order), or None if the others did not come in time."""
    send = np.zeros(MSG_BYTES, np.uint8)
    raw = json.dumps(word).encode()[:MSG_BYTES]
    send[:len(raw)] = np.frombuffer(raw, np.uint8)
    recv = np.zeros((SIZE, MSG_BYTES), np.uint8)
    req = _HARNESS["comm"].Iallgather([send, MPI.BYTE], [recv, MPI.BYTE])
    t_end = time.monotonic() + deadline_s
    delay = 1e-4
    while not req.Test():
        if time.monotonic() > t_end:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    words = []
    for row in recv:
        text = row.tobytes().rstrip(b"\0").decode(errors="replace")
        try:
            words.append(json.loads(text))
        except ValueError:                    # cut mid-way: keep what there is
            words.append({"outcome": "failed", "msg": text})
    return words


def _print_past_capture(config, text: str) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=False)
    sys.stderr.write(text)
    sys.stderr.flush()


def _abort(item, rep, why: str) -> None:
    """The others did not come: print this rank's story once and end the whole job."""
    text = f"[rank {RANK}] {rep.outcome.upper()} {item.nodeid} ({rep.when})\n"
    if rep.longrepr is not None:
        text += f"{_long_text(rep)}\n"
    _print_past_capture(item.config, text + f"[rank {RANK}] {why}; aborting the job\n")
    WORLD.Abort(1)


def _long_text(rep) -> str:
    if isinstance(rep.longrepr, tuple):       # a skip: (path, line, reason)
        return str(rep.longrepr[2])
    return rep.longreprtext


def _short(rep) -> str:
    text = _long_text(rep).strip().splitlines()
    errors = [line for line in text if line.startswith("E ")]
    return (errors[0][2:].strip() if errors else (text[-1] if text else ""))[:300]


def _rank0_only(item) -> bool:
    return "launcher" in item.keywords or "rank0" in item.keywords


def _fail(rep, message: str) -> None:
    """Fail ``rep`` for what happened on another rank: rank 0 prints the whole message,
    the other ranks a pointer to it (the failing rank prints its own traceback)."""
    rep.outcome = "failed"
    rep.longrepr = message if RANK == 0 else message.split(":")[0] + " (see rank 0)"


def _agree(item, rep, phase: str) -> None:
    """One agreement (see the module docstring); may turn ``rep`` into a failure."""
    neutral = phase == "setup" and _rank0_only(item) and RANK != 0
    mine = "rank0" if neutral else rep.outcome
    word = {"id": zlib.crc32(item.nodeid.encode()), "outcome": mine,
            "msg": "" if rep.passed else _short(rep)}
    wait = LONG_WAIT_S if mine in ("passed", "rank0") else RANK_WAIT_S
    words = _gather_words(word, wait)
    if words is None:
        _abort(item, rep, f"other ranks did not finish the {phase} of {item.nodeid} in "
                          f"{wait:.0f} s (stuck in a collective this rank left?)")
    if len({w.get("id") for w in words}) > 1:
        _abort(item, rep, "ranks are running different tests")
    if neutral:                               # rank 0 runs it; wait for its call
        words = _gather_words({"id": word["id"], "outcome": "rank0", "msg": ""}, LONG_WAIT_S)
        if words is None:
            _abort(item, rep, f"rank 0 did not finish {item.nodeid}")
        return
    by = {}
    for r, w in enumerate(words):
        if w["outcome"] != "rank0":
            by.setdefault(w["outcome"], []).append(r)
    if "failed" in by and not rep.failed:
        r = by["failed"][0]
        _fail(rep, f"{phase} failed on rank {r} (of ranks {by['failed']}): {words[r]['msg']}")
    elif "passed" in by and "skipped" in by:
        r = by["skipped"][0]
        _fail(rep, f"ranks disagree: {phase} skipped on ranks {by['skipped']} "
                   f"({words[r]['msg']}) but passed on ranks {by['passed']}; run/skip "
                   "decisions must be the same on every rank")
    if phase == "setup" and _rank0_only(item) and not rep.passed:
        # Rank 0 will not run the call: release the ranks waiting for it.
        _gather_words({"id": word["id"], "outcome": "rank0", "msg": ""}, LONG_WAIT_S)


@pytest.hookimpl(trylast=True)      # after pytest-mpi has registered its plugin
def pytest_configure(config):
    config.addinivalue_line("markers", "launcher: starts mpirun/sbatch; runs on rank 0 only")
    config.addinivalue_line("markers", "rank0: pure test run on world rank 0 only")
    _HARNESS["comm"] = WORLD.Dup()
    found = fixture_names(os.path.abspath(FIXTURES)) if RANK == 0 else None
    _HARNESS["fixtures"] = _HARNESS["comm"].bcast(found, root=0)
    if SIZE > 1 and RANK != 0:
        # Quiet progress on the other ranks; their own failures still print at the end.
        config.option.verbose = -1
        config.option.reportchars = "fE"
        for plugin in config.pluginmanager.get_plugins():
            if type(plugin).__name__ == "MPIPlugin":   # pytest-mpi: its MPI facts once
                plugin._is_testing_mpi = False


def pytest_collection_finish(session):
    if SIZE == 1:
        return
    ids = "\n".join(item.nodeid for item in session.items)
    word = {"id": zlib.crc32(ids.encode()), "n": len(session.items),
            "errors": session.testsfailed}
    words = _gather_words(word, LONG_WAIT_S)
    if any(w != words[0] for w in words):
        pytest.exit(f"ranks collected different tests: {words}", returncode=3)


def pytest_runtest_setup(item):
    if SIZE > 1 and RANK != 0 and _rank0_only(item):
        pytest.skip("runs on world rank 0 only")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if SIZE == 1 or call.when == "teardown":
        return
    if call.when == "setup":
        _agree(item, rep, "setup")
    elif not (_rank0_only(item) and RANK != 0):
        _agree(item, rep, "call")


@pytest.fixture
def world():
    return WORLD


def fixture_names(folder: str) -> list[str]:
    """The reference checkpoints in ``folder``: its subfolders with a ref.json."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, n, "ref.json")))


@pytest.fixture
def fixtures_dir():
    """The reference checkpoints' folder (rank 0 looked at the start; all ranks agree).

    The repository carries tests/fixtures, so a folder that is missing or holds no
    checkpoint is a broken checkout (or a wrong MPIPAR_FIXTURES): the test fails, it
    never skips."""
    path = os.path.abspath(FIXTURES)
    names = _HARNESS["fixtures"] if "fixtures" in _HARNESS else fixture_names(path)
    if not names:
        pytest.fail(f"no reference checkpoints in {path} (missing, or no */ref.json in it): "
                    "the repository carries them in tests/fixtures; MPIPAR_FIXTURES, where "
                    "set, must name a folder that holds them", pytrace=False)
    return path
