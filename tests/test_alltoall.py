"""alltoallv against a direct computation: every rank rebuilds every rank's send buffer.

Row values encode (source, destination, row) so misplaced rows show. Cases include
a rank that sends nothing, a rank that receives nothing, 1-D rows, trailing dims and
bfloat16. The ledger counts payload bytes to and from other ranks only.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from mpi4py import MPI

from mpipar.comm.alltoall import alltoallv, exchange_counts
from mpipar.comm.group import Group
from mpipar.comm.ledger import Ledger

WORLD = MPI.COMM_WORLD


def plan(src, n, case):
    """send_counts of rank ``src``: random, rank 0 sends nothing in case 1, nobody
    sends to the last rank in case 2."""
    rng = np.random.default_rng(100 * case + src)
    counts = rng.integers(0, 7, size=n)
    if case == 1 and src == 0:
        counts[:] = 0
    if case == 2:
        counts[n - 1] = 0
    return counts


def rows(src, n, case, tail, dtype):
    """send buffer of rank ``src`` [sum(counts), *tail]: value = src*1e4 + dest*1e2 + i."""
    counts = plan(src, n, case)
    dest = np.repeat(np.arange(n), counts)
    idx = np.concatenate([np.arange(c) for c in counts]) if counts.sum() else np.zeros(0)
    base = src * 1e4 + dest * 1e2 + idx
    width = int(np.prod(tail)) if tail else 1
    x = base[:, None] + np.arange(width)[None, :] / 8     # [rows, width]
    x = x.reshape((len(base),) + tuple(tail))              # [rows, *tail]
    return x.astype(dtype), counts


@pytest.mark.parametrize("case", [0, 1, 2, 3])
@pytest.mark.parametrize("tail,dtype", [((), np.float32), ((3, 2), np.float64),
                                        ((5,), ml_dtypes.bfloat16), ((4,), np.int32)],
                         ids=["1d-f32", "3x2-f64", "5-bf16", "4-i32"])
def test_alltoallv_matches_direct(case, tail, dtype):
    g = Group(WORLD, "ep", Ledger())
    n, r = g.size, g.rank
    send, counts = rows(r, n, case, tail, dtype)
    recv, rc = alltoallv(g, send, counts)
    expect_counts = [int(plan(s, n, case)[r]) for s in range(n)]
    assert list(rc) == expect_counts
    parts = []
    for s in range(n):
        sx, sc = rows(s, n, case, tail, dtype)
        start = int(sc[:r].sum())
        parts.append(sx[start:start + sc[r]])
    expect = np.concatenate(parts)
    assert recv.shape == expect.shape and recv.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(recv.view(np.uint8), expect.view(np.uint8))
    row_bytes = send.itemsize * (int(np.prod(tail)) if tail else 1)
    t = g.ledger.totals()
    assert t["ep_alltoall"]["sent_bytes"] == (int(counts.sum()) - int(counts[r])) * row_bytes
    assert t["ep_alltoall"]["recv_bytes"] == (sum(expect_counts) - expect_counts[r]) * row_bytes
    assert t["ep_alltoall_counts"]["sent_bytes"] == 8 * (n - 1)


def test_counts_exchange_and_errors():
    g = Group(WORLD, "ep", Ledger())
    n, r = g.size, g.rank
    rc = exchange_counts(g, [r * 10 + j for j in range(n)])
    assert list(rc) == [s * 10 + r for s in range(n)]
    with pytest.raises(ValueError):
        alltoallv(g, np.zeros((3, 2)), [1] * n if n != 3 else [2] * n)
    with pytest.raises(ValueError):
        exchange_counts(g, [1] * (n + 1))


def test_known_recv_counts_skip_the_count_exchange():
    """A combine passes the dispatch's counts back: one MPI call, no ``_counts`` entry."""
    g = Group(WORLD, "ep", Ledger())
    n, r = g.size, g.rank
    send, counts = rows(r, n, 0, (3,), np.float32)
    recv, rc = alltoallv(g, send, counts)
    g.ledger.reset()
    back, rc2 = alltoallv(g, recv, rc, recv_counts=counts)
    np.testing.assert_array_equal(back, send)
    assert list(rc2) == list(counts)
    assert "ep_alltoall_counts" not in g.ledger.totals()
    with pytest.raises(ValueError):
        alltoallv(g, recv, rc, recv_counts=[1] * (n + 1))
