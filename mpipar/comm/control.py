"""Small control-plane messages: gathering reports, agreeing on errors, step plans.

``gather_object``, ``barrier`` and ``agree`` move Python objects (pickled) and are not
part of the model's traffic, so they are not in the ledger. ``agree`` is how a job fails
together: every rank says whether its step worked; if any failed, every rank learns the
first failing rank's message and raises the same error, so rank 0 can print it once and
all ranks exit.

Messages of the serving loop (``Outbox.post`` / ``wait_object``): a pickled object as one
message of bytes, counted in the ledger under its own kind (``control`` for the Step
that world rank 0 sends every rank, ``result`` for the tokens coming back): a Step over
W ranks costs (W-1) * its pickled size at the root. Sends are
non-blocking (a root never waits for a busy rank to take its Step, and two ranks sending
each other never deadlock); a receiver waits by probing with growing sleeps (10 us up to
20 ms), so idle workers of a server sleep instead of spinning on the cores. A sleep is at
most SLEEP_SHARE of the time waited so far, so a message is taken at most about 5% late
(a decode step's waits are a few ms: a 30% later wake-up showed in its time per token).
"""

from __future__ import annotations

import pickle
import time

from .tags import STEP

SLEEP_FIRST_S, SLEEP_MAX_S, SLEEP_GROWTH, SLEEP_SHARE = 1e-5, 0.02, 1.3, 0.05
BUSY_SLEEP_MAX_S = 2e-4  # while a rank's own transfers are pending


class RemoteError(RuntimeError):
    """A step failed on some rank; the message is that rank's."""


def gather_object(group, obj, root: int = 0):
    """List of every rank's ``obj`` on ``root`` (None elsewhere)."""
    return group.comm.gather(obj, root=root)


def barrier(group) -> None:
    group.comm.Barrier()


def agree(group, error: BaseException | None) -> None:
    """Collective: raise RemoteError on every rank if ``error`` is set on any rank."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = group.comm.allgather(message)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, first = failed[0]
        where = "" if len(failed) == group.size else f" (on rank {rank})"
        raise RemoteError(first + where)


class Outbox:
    """Pending non-blocking object sends of one rank; ``flush`` completes them."""

    def __init__(self):
        self._pending = []  # (request, buffer kept alive until the send completes)

    def post(self, group, obj, dest: int, tag: int, kind: str) -> None:
        self.post_to(group, obj, [dest], tag, kind)

    def post_to(self, group, obj, dests, tag: int, kind: str) -> None:
        """``obj`` to each rank of ``dests``, pickled once (not at all for no rank)."""
        from mpi4py import MPI
        if not dests:
            return
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        for dest in dests:
            t = time.perf_counter()
            self._pending.append((group.comm.Isend([data, MPI.BYTE], dest, tag), data))
            group.ledger.record(kind, len(data), 0, time.perf_counter() - t, t)
        self._pending = [(r, d) for r, d in self._pending if not r.Test()]

    def flush(self) -> None:
        for request, _ in self._pending:
            request.Wait()
        self._pending.clear()


def poll_object(group, source: int, tag: int, kind: str):
    """(True, obj) if a message from ``source`` is waiting (then received), else (False, None)."""
    from mpi4py import MPI
    status = MPI.Status()
    if not group.comm.Iprobe(source, tag, status):
        return False, None
    t = time.perf_counter()
    data = bytearray(status.Get_count(MPI.BYTE))
    group.comm.Recv([data, MPI.BYTE], source, tag)
    group.ledger.record(kind, 0, len(data), time.perf_counter() - t, t)
    return True, pickle.loads(data)


def wait_object(group, source: int, tag: int = STEP, kind: str = "control", progress=None):
    """Receive one object from ``source``, sleeping between probes (never spinning).
    ``progress()``, if given, runs before every probe (a rank's own transfers move on);
    while it returns True (still busy) a sleep lasts at most BUSY_SLEEP_MAX_S."""
    delay, t0 = SLEEP_FIRST_S, time.monotonic()
    while True:
        busy = progress() if progress is not None else False
        ok, obj = poll_object(group, source, tag, kind)
        if ok:
            return obj
        time.sleep(min(delay, BUSY_SLEEP_MAX_S) if busy else delay)
        waited = time.monotonic() - t0
        delay = min(delay * SLEEP_GROWTH, SLEEP_MAX_S, max(SLEEP_FIRST_S, SLEEP_SHARE * waited))
