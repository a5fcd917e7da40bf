"""send/recv of arrays of unknown shape and dtype around a ring of ranks (1 rank: to itself).

Each rank rebuilds the array its left neighbour sent from the same seed, so the check is
independent of the code under test. The ledger counts payload bytes only; the header
goes under its own kind.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from mpi4py import MPI

from mpipar.comm.group import Group
from mpipar.comm.ledger import Ledger
from mpipar.comm.p2p import HEADER_LEN, irecv_array, isend_array, recv_array, send_array

WORLD = MPI.COMM_WORLD
DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int8, np.int16,
          np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]
SHAPES = [(), (0,), (3, 0, 2), (1,), (5,), (2, 3, 4), (17, 33), (1, 2, 1, 3, 1, 2, 1, 2),
          (64, 1025)]


def make(seed, case):
    """The array rank ``seed`` sends in ``case``: shape and dtype vary with both."""
    rng = np.random.default_rng(1000 * seed + case)
    shape = SHAPES[(case + seed) % len(SHAPES)]
    dtype = np.dtype(DTYPES[(case * 5 + seed) % len(DTYPES)])
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.ascontiguousarray(a).view(np.uint8),
                                  np.ascontiguousarray(b).view(np.uint8))


@pytest.fixture
def group():
    return Group(WORLD, "pp", Ledger())


def test_ring_of_sends_every_shape_and_dtype(group):
    n, r = group.size, group.rank
    right, left = (r + 1) % n, (r - 1) % n
    sent = got = 0
    for case in range(3 * len(DTYPES)):
        x = make(r, case)
        h = isend_array(group, x, right, tag=case)           # non-blocking: also to self
        y = recv_array(group, left, tag=case)
        h.wait()
        same(y, make(left, case))
        sent += x.nbytes
        got += y.nbytes
    t = group.ledger.totals()
    assert t["pp_send"]["sent_bytes"] == sent and t["pp_recv"]["recv_bytes"] == got
    assert t["pp_send_header"]["sent_bytes"] == 8 * HEADER_LEN * 3 * len(DTYPES)
    assert t["pp_send"]["recv_bytes"] == 0 and t["pp_recv"]["sent_bytes"] == 0


def test_blocking_pairs_and_nonblocking_receive(group):
    n, r = group.size, group.rank
    if n == 1:
        for case in range(len(SHAPES)):                      # to itself, non-blocking
            x = make(0, case)
            rh = irecv_array(group, 0, tag=case)
            sh = isend_array(group, x, 0, tag=case)
            same(rh.wait(), x)
            sh.wait()
        return
    peer = r ^ 1
    if peer >= n:                                            # odd world: last rank idles
        return
    for case in range(len(SHAPES)):
        x = make(r, case)
        if r % 2 == 0:
            send_array(group, x, peer, tag=case, kind="act")
            y = recv_array(group, peer, tag=case, kind="act")
        else:
            h = irecv_array(group, peer, tag=case, kind="act")
            y = h.wait()
            send_array(group, x, peer, tag=case, kind="act")
        same(y, make(peer, case))
    assert group.ledger.totals()["act"]["sent_bytes"] == sum(
        make(r, c).nbytes for c in range(len(SHAPES)))


def test_any_source_and_large_bfloat16(group):
    n, r = group.size, group.rank
    x = (np.random.default_rng(r).standard_normal((300, 257)) * 10).astype(ml_dtypes.bfloat16)
    h = isend_array(group, x, 0, tag=5)
    if r == 0:
        seen = set()
        for _ in range(n):
            y = recv_array(group, MPI.ANY_SOURCE, tag=5)
            src = [s for s in range(n) if s not in seen and np.array_equal(
                y.view(np.uint16),
                (np.random.default_rng(s).standard_normal((300, 257)) * 10)
                .astype(ml_dtypes.bfloat16).view(np.uint16))]
            assert src, "received an array no rank sent"
            seen.add(src[0])
        assert seen == set(range(n))
    h.wait()
    h.wait()                                                 # a second wait is harmless
    group.comm.Barrier()


def test_transport_hooks():
    class CopyTransport:
        calls = 0

        def to_mpi(self, arr):
            CopyTransport.calls += 1
            return np.array(arr, copy=True)

        def from_mpi(self, buf, arr):
            arr[...] = buf

    g = Group(WORLD, "pp", Ledger(), transport=CopyTransport())
    n, r = g.size, g.rank
    x = make(r, 4)
    h = isend_array(g, x, (r + 1) % n, tag=77)
    same(recv_array(g, (r - 1) % n, tag=77), make((r - 1) % n, 4))
    h.wait()
    assert CopyTransport.calls == 2
