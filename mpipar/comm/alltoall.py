"""All-to-all of variable row counts: expert-parallel dispatch and combine.

What moves: ``send`` is [N, ...] rows grouped by destination rank, send_counts[j] rows
for rank j (sum = N). First every rank learns how many rows it will get from each
rank (an Alltoall of n int64 counts), then one ``Alltoallv`` moves the rows; rank i
gets [sum_j recv_counts[j], ...] rows, rank 0's rows first, then rank 1's, ...
Trailing dimensions are kept; ranks that send or receive nothing take part as usual.
A caller that already knows ``recv_counts`` (a combine returning the rows of a dispatch,
or a dispatch whose counts went in one earlier ``exchange_counts``) passes them and
the count exchange is skipped: one MPI call per ``alltoallv`` instead of two.

Cost (the seed's EP formula): a rank sends sum_{j != i} send_counts[j] * row_bytes and
receives sum_{j != i} recv_counts[j] * row_bytes; rows a rank keeps for itself never
cross the wire. The ledger records exactly that under ``kind`` (default
``group.kind("alltoall")``; self-to-self rows excluded), and the count exchange,
8 (n-1) bytes each way, under ``kind + "_counts"``.

bfloat16/float16 rows move as their 16 bits (see ``wire``).
"""

from __future__ import annotations

import time

import numpy as np

from .wire import buf_spec, recv_done


def _displs(counts) -> np.ndarray:
    d = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=d[1:])
    return d


def exchange_counts(group, send_counts, kind=None) -> np.ndarray:
    """recv_counts[j] = rows rank j sends to this rank (Alltoall of int64 counts)."""
    t = time.perf_counter()
    n = group.size
    sc = np.ascontiguousarray(send_counts, dtype=np.int64).reshape(-1)   # [n]
    if sc.size != n or (sc < 0).any():
        raise ValueError(f"send_counts must be {n} non-negative ints, got {send_counts}")
    rc = np.empty(n, np.int64)                                           # [n]
    group.comm.Alltoall(sc, rc)
    group.ledger.record(kind or group.kind("alltoall_counts"), 8 * (n - 1), 8 * (n - 1),
                        time.perf_counter() - t, t)
    return rc


def alltoallv(group, send, send_counts, kind=None, recv_counts=None):
    """Rows of ``send`` [N, ...] to their ranks; returns (recv [M, ...], recv_counts [n]).

    ``recv_counts``: rows this rank gets from each rank, when the caller knows them
    (no count exchange then)."""
    t = time.perf_counter()
    xp, me = group.xp, group.rank
    kind = kind or group.kind("alltoall")
    send = xp.ascontiguousarray(send)                        # [N, ...]
    sc = np.asarray(send_counts, dtype=np.int64).reshape(-1)
    if int(sc.sum()) != send.shape[0]:
        raise ValueError(f"send_counts sum to {int(sc.sum())}, send has {send.shape[0]} rows")
    if recv_counts is None:
        rc = exchange_counts(group, sc, kind=kind + "_counts")
    else:
        rc = np.asarray(recv_counts, dtype=np.int64).reshape(-1)
        if rc.size != group.size or (rc < 0).any():
            raise ValueError(f"recv_counts must be {group.size} non-negative ints, "
                             f"got {recv_counts}")
    row = int(np.prod(send.shape[1:], dtype=np.int64))       # items per row
    recv = xp.empty((int(rc.sum()),) + tuple(send.shape[1:]), dtype=send.dtype)  # [M, ...]
    s_items, r_items = sc * row, rc * row
    s_disp, r_disp = _displs(s_items), _displs(r_items)
    # This rank's rows for itself are copied here, not through MPI: MPICH's self-message
    # path is slow under MPIR_CVAR_ENABLE_HEAVY_YIELD=1 (8 MiB: 61 ms instead of 2.6 ms).
    s_mpi, r_mpi = s_items.copy(), r_items.copy()
    s_mpi[me] = r_mpi[me] = 0
    sspec, _ = buf_spec(group, send, counts=(s_mpi, s_disp))
    rspec, staged = buf_spec(group, recv, counts=(r_mpi, r_disp))
    group.comm.Alltoallv(sspec, rspec)
    recv_done(group, staged, recv)
    own, so, ro = int(sc[me]), int(sc[:me].sum()), int(rc[:me].sum())
    recv[ro:ro + own] = send[so:so + own]
    row_bytes = row * send.itemsize
    sent = (int(sc.sum()) - int(sc[me])) * row_bytes
    got = (int(rc.sum()) - int(rc[me])) * row_bytes
    group.ledger.record(kind, sent, got, time.perf_counter() - t, t)
    return recv, rc
