"""The all-reduce (comm/allreduce.py: the ring of comm/ring.py, recursive doubling of
comm/recursive_doubling.py, the choice between them), reduce-scatter and all-gather
against MPI's own collectives.

Runs on the world communicator and on 2- and 3-rank sub-communicators split from it
(ranks outside a sub-communicator pass through; rank 0 is in all of them). On a world
too small for a communicator the test is skipped (pytest-mpi's ``min_size``): one rank
runs no collective, so it proves nothing about the ring. Random data, odd lengths, every dtype;
16-bit floats are compared with a float32 MPI reduction (tolerance: one 16-bit rounding
per ring hop); integers exactly. The ledger must hold exactly ``ring_bytes``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from mpi4py import MPI

from mpipar.comm import allreduce, ring
from mpipar.comm.group import Group
from mpipar.comm.ledger import Ledger
from mpipar.comm.recursive_doubling import recursive_doubling_bytes
from mpipar.comm.wire import mpi_type

WORLD = MPI.COMM_WORLD
BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = [np.dtype(np.float32), np.dtype(np.float64)]
HALFS = [np.dtype(np.float16), BF16]
INTS = [np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                              np.uint32, np.uint64)]
LENGTHS = [0, 1, 2, 3, 5, 7, 1000, 4099]
BIG = 2**20 + 7
# A one-rank world runs no collective: these tests need 2 (3) ranks (pytest-mpi's marker).
COMMS = [pytest.param("world", marks=pytest.mark.mpi(min_size=2)),
         pytest.param("two", marks=pytest.mark.mpi(min_size=2)),
         pytest.param("three", marks=pytest.mark.mpi(min_size=3))]


@pytest.fixture(scope="module")
def comms():
    """{"world": comm, "two": pairs of ranks, "three": ranks 0..2} (None: not a member)."""
    n, r = WORLD.Get_size(), WORLD.Get_rank()
    two = WORLD.Split(r // 2 if n >= 2 else MPI.UNDEFINED, r)
    three = WORLD.Split(0 if n >= 3 and r < 3 else MPI.UNDEFINED, r)
    made = {"world": WORLD, "two": two if two != MPI.COMM_NULL else None,
            "three": three if three != MPI.COMM_NULL else None}
    if n >= 2 and made["two"] is not None and made["two"].Get_size() < 2:
        made["two"] = None                            # odd world: the last rank is alone
    yield made
    for c in (two, three):
        if c != MPI.COMM_NULL:
            c.Free()


def get_group(comms, which):
    comm = comms[which]
    return None if comm is None else Group(comm, "tp", Ledger())


def rand(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.3
    if dtype.kind in "iu":
        lo, hi = (0, 60) if dtype.kind == "u" else (-30, 30)
        return rng.integers(lo, hi, size=shape).astype(dtype)
    return (rng.standard_normal(shape) * 3).astype(dtype)


def mpi_reference(comm, x, op="allreduce"):
    """MPI's result; 16-bit floats reduced in float32. Returns (reference, tolerance)."""
    half = x.dtype in HALFS
    send = np.ascontiguousarray(x.astype(np.float32) if half else x).reshape(-1)
    mop = MPI.LOR if x.dtype == np.bool_ else MPI.SUM
    dt = mpi_type(send.dtype)
    if op == "allreduce":
        ref = np.empty_like(send)
        comm.Allreduce([send, dt], [ref, dt], op=mop)
    else:
        counts = [b - a for a, b in ring.chunk_bounds(send.size, comm.Get_size())]
        ref = np.empty(counts[comm.Get_rank()], send.dtype)
        comm.Reduce_scatter([send, dt], [ref, dt], counts, op=mop)
    if half:
        eps = 2.0**-8 if x.dtype == BF16 else 2.0**-11
        big = comm.allreduce(float(np.abs(send).max(initial=0.0)), op=MPI.MAX)
        return ref, comm.Get_size() ** 2 * big * eps   # <= n roundings of sums <= n*big
    if x.dtype in FLOATS:
        return ref, 1e-5 if x.dtype == np.float32 else 1e-12
    return ref, 0.0


def check_close(got, ref, tol):
    if tol == 0.0:
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64),
                                   rtol=tol, atol=tol)


def same_on_all_ranks(comm, arr):
    digests = comm.allgather(np.ascontiguousarray(arr).tobytes())
    assert all(d == digests[0] for d in digests), "ranks disagree bitwise"


def check_allreduce(g, dtype, n_elems, algorithm):
    x = rand(dtype, n_elems, seed=1000 * g.rank + n_elems)
    x_before = x.copy()
    g.ledger.reset()
    y = allreduce.ring_allreduce(g, x, algorithm=algorithm)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(x, x_before)        # input untouched
    ref, tol = mpi_reference(g.comm, x)
    check_close(y.astype(ref.dtype), ref, tol)
    same_on_all_ranks(g.comm, y)
    e = g.ledger.totals()["tp_allreduce"]
    want = allreduce.allreduce_bytes(n_elems, x.itemsize, g.size, g.rank, algorithm)
    assert (e["sent_bytes"], e["recv_bytes"]) == want, (dtype, n_elems)
    if g.size == 1 or n_elems == 0:
        assert want == (0, 0)


@pytest.mark.parametrize("which", COMMS)
@pytest.mark.parametrize("algorithm", ["ring", "recursive_doubling", "textbook"])
def test_allreduce_matches_mpi(comms, which, algorithm):
    """Every dtype, odd lengths; 2**20+7 for float32, bfloat16 and int32."""
    g = get_group(comms, which)
    if g is None:
        return
    for dtype in FLOATS + HALFS + INTS + [np.dtype(np.bool_)]:
        big = [BIG] if dtype in (np.float32, BF16, np.int32) and algorithm == "ring" else []
        for n_elems in LENGTHS + big:
            check_allreduce(g, dtype, n_elems, algorithm)


@pytest.mark.parametrize("which", COMMS)
def test_allreduce_auto(comms, which):
    """auto: recursive doubling up to RECURSIVE_DOUBLING_MAX_BYTES, the ring above; bytes follow."""
    g = get_group(comms, which)
    if g is None:
        return
    edge = allreduce.RECURSIVE_DOUBLING_MAX_BYTES // 4
    for dtype in (np.dtype(np.float32), BF16):
        for n_elems in (0, 5, edge, edge + 1, 3 * edge + 7):
            check_allreduce(g, dtype, n_elems, "auto")


@pytest.mark.parametrize("which", COMMS)
def test_allreduce_shapes_out_and_kind(comms, which):
    g = get_group(comms, which)
    if g is None:
        return
    x = rand(np.float32, (7, 3, 5), seed=g.rank)
    ref, tol = mpi_reference(g.comm, x)
    y = allreduce.ring_allreduce(g, x, kind="custom")
    assert y.shape == (7, 3, 5)
    check_close(y.reshape(-1), ref, tol)
    assert g.ledger.totals()["custom"]["calls"] == 1
    xt = rand(np.float64, (40, 31), seed=g.rank).T     # not contiguous
    ref, tol = mpi_reference(g.comm, xt)
    check_close(allreduce.ring_allreduce(g, xt, algorithm="ring").reshape(-1), ref, tol)
    out = np.empty_like(x)
    assert allreduce.ring_allreduce(g, x, out=out) is out
    big = rand(np.float32, 10007, seed=g.rank)
    ref, tol = mpi_reference(g.comm, big)
    for algorithm in ("ring", "recursive_doubling"):
        inplace = big.copy()
        allreduce.ring_allreduce(g, inplace, out=inplace, algorithm=algorithm)   # out is x
        check_close(inplace, ref, tol)


@pytest.mark.parametrize("which", COMMS)
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.int64), BF16,
                                   np.dtype(np.float16)], ids=str)
def test_reduce_scatter_matches_mpi(comms, which, dtype):
    g = get_group(comms, which)
    if g is None:
        return
    for n_elems in [0, 1, 3, 1000, 4097] + ([BIG] if dtype == np.float32 else []):
        x = rand(dtype, n_elems, seed=77 * g.rank + n_elems)
        g.ledger.reset()
        got = ring.ring_reduce_scatter(g, x)
        a, b = ring.chunk_bounds(n_elems, g.size)[g.rank]
        assert got.shape == (b - a,) and got.dtype == x.dtype
        ref, tol = mpi_reference(g.comm, x, op="reduce_scatter")
        check_close(got.astype(ref.dtype), ref, tol)
        e = g.ledger.totals()["tp_reduce_scatter"]
        half = ring.ring_bytes(n_elems, x.itemsize, g.size, g.rank)
        if g.size > 1:   # the reduce-scatter is the first n-1 steps of the ring
            sent = sum(b - a for a, b in (ring.chunk_bounds(n_elems, g.size)[(g.rank - k - 1)
                       % g.size] for k in range(g.size - 1))) * x.itemsize
            assert e["sent_bytes"] == sent and sent <= half[0]
        else:
            assert e["sent_bytes"] == 0


@pytest.mark.parametrize("which", COMMS)
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.int16), BF16], ids=str)
def test_allgather_matches_mpi(comms, which, dtype):
    g = get_group(comms, which)
    if g is None:
        return
    n, r = g.size, g.rank
    mt = mpi_type(dtype)
    for per in [0, 1, 5, 3001]:                       # equal counts
        chunk = rand(dtype, per, seed=r + per)
        got = ring.ring_allgather(g, chunk)
        ref = np.empty(per * n, dtype)
        g.comm.Allgather([chunk, mt], [ref, mt])
        np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))
    rng = np.random.default_rng(5)
    for trial in range(4):                            # variable counts, zeros included
        counts = rng.integers(0, 2000, size=n)
        counts[trial % n] = 0
        g.ledger.reset()
        chunk = rand(dtype, int(counts[r]), seed=10 * r + trial)
        got = ring.ring_allgather(g, chunk, counts=counts)
        ref = np.empty(int(counts.sum()), dtype)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        g.comm.Allgatherv([chunk, mt], [ref, (counts, displs), mt])
        np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))
        e = g.ledger.totals()["tp_allgather"]
        assert e["recv_bytes"] == (int(counts.sum()) - int(counts[r])) * chunk.itemsize
        assert e["sent_bytes"] == sum(int(counts[(r - k) % n]) for k in range(n - 1)) \
            * chunk.itemsize


@pytest.mark.parametrize("which", COMMS)
def test_textbook_ring_equals_fast_ring(comms, which, monkeypatch):
    """The seed's two loops and the fast ring: the same sums to the bit, the same bytes
    (the fast one in pieces too), for float32, 16-bit floats (added in float32) and ints."""
    g = get_group(comms, which)
    if g is None:
        return
    monkeypatch.setattr(ring, "SEGMENT_BYTES", 64)
    for dtype in (np.dtype(np.float32), np.dtype(np.float16), BF16, np.dtype(np.int32)):
        for n_elems in (1, 7, 1001):
            x = rand(dtype, n_elems, seed=11 * g.rank + n_elems)
            g.ledger.reset()
            fast = allreduce.ring_allreduce(g, x, algorithm="ring", kind="fast")
            slow = allreduce.ring_allreduce(g, x, algorithm="textbook", kind="textbook")
            np.testing.assert_array_equal(fast.view(np.uint8), slow.view(np.uint8))
            t = g.ledger.totals()
            assert [t[k]["sent_bytes"] for k in ("fast", "textbook")] == \
                [ring.ring_bytes(n_elems, x.itemsize, g.size, g.rank)[0]] * 2


class NoHalfAdd:
    """numpy, except that its add refuses 16-bit operands (stands in for a backend whose
    native 16-bit add would round differently, as CuPy's float16 may)."""

    def __getattr__(self, name):
        return getattr(np, name)

    def add(self, a, b, out=None):
        assert np.dtype(a.dtype) not in HALFS and np.dtype(b.dtype) not in HALFS, "16-bit add"
        return np.add(a, b, out=out)


def test_16_bit_sums_add_in_float32():
    """Each 16-bit addition widens to float32 and rounds once, never a 16-bit add:
    a + b == round16(f32(a) + f32(b)), in place too."""
    rng = np.random.default_rng(3)
    for dtype in HALFS:
        a, b = (rng.standard_normal(999) * 50).astype(dtype), rng.standard_normal(999).astype(dtype)
        want = (a.astype(np.float32) + b.astype(np.float32)).astype(dtype)
        out = np.empty_like(a)
        assert ring.add_into(NoHalfAdd(), a, b, out) is out
        np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
        ring.add_into(NoHalfAdd(), out, b, out)           # in place
        want = (want.astype(np.float32) + b.astype(np.float32)).astype(dtype)
        np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(ring.add_into(NoHalfAdd(), x, x, np.empty_like(x)), 2 * x)


def test_chunk_bounds_and_bytes():
    assert ring.chunk_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert ring.chunk_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert ring.chunk_bounds(0, 3) == [(0, 0)] * 3
    for n in (1, 2, 3, 4, 5, 8):
        for n_elems in (0, 1, 7, 1000, 1024):
            bounds = ring.chunk_bounds(n_elems, n)
            sizes = [b - a for a, b in bounds]
            assert sum(sizes) == n_elems and max(sizes) - min(sizes) <= 1
            per = [ring.ring_bytes(n_elems, 4, n, r) for r in range(n)]
            assert sum(s for s, _ in per) == sum(v for _, v in per)
            if n_elems % n == 0:   # the seed's formula: 2 (n-1)/n S per rank
                assert all(s == 2 * (n - 1) * n_elems * 4 // n for s, _ in per)
            small = [recursive_doubling_bytes(n_elems, 4, n, r) for r in range(n)]
            assert sum(s for s, _ in small) == sum(v for _, v in small)
    rd = recursive_doubling_bytes
    assert rd(10, 4, 4, 0) == (80, 80)             # log2(4) exchanges
    assert rd(10, 4, 3, 0) == (40, 40)             # sat out: send, get back
    assert rd(10, 4, 3, 1) == (80, 80)             # pair + 1 exchange + back
    assert allreduce.allreduce_bytes(8, 4, 4, 0) == recursive_doubling_bytes(8, 4, 4, 0)
    assert allreduce.allreduce_bytes(1 << 20, 4, 4, 0) == ring.ring_bytes(1 << 20, 4, 4, 0)
    assert allreduce.allreduce_bytes(8, 4, 4, 0, "textbook") == ring.ring_bytes(8, 4, 4, 0)
    with pytest.raises(ValueError):
        allreduce.allreduce_bytes(8, 4, 4, 0, "tree")


@pytest.mark.parametrize("which", COMMS)
def test_pieces_pipeline(comms, which, monkeypatch):
    """Chunks longer than SEGMENT_BYTES travel in pieces (uneven, some empty)."""
    g = get_group(comms, which)
    if g is None:
        return
    monkeypatch.setattr(ring, "SEGMENT_BYTES", 40)            # 10 float32 per piece
    for n_elems in (1, 9, 31, 101, 1003):
        for dtype in (np.dtype(np.float32), np.dtype(np.int64), BF16):
            x = rand(dtype, n_elems, seed=3 * g.rank + n_elems)
            g.ledger.reset()
            ref, tol = mpi_reference(g.comm, x)
            check_close(allreduce.ring_allreduce(g, x, algorithm="ring").astype(ref.dtype),
                        ref, tol)
            want = ring.ring_bytes(n_elems, x.itemsize, g.size, g.rank)
            e = g.ledger.totals()["tp_allreduce"]
            assert (e["sent_bytes"], e["recv_bytes"]) == want
            ref, tol = mpi_reference(g.comm, x, op="reduce_scatter")
            check_close(ring.ring_reduce_scatter(g, x).astype(ref.dtype), ref, tol)
    counts = [7 * (i % 3) + 1 for i in range(g.size)]
    chunk = rand(np.float32, counts[g.rank], seed=g.rank)
    ref = np.concatenate(g.comm.allgather(chunk))
    np.testing.assert_array_equal(ring.ring_allgather(g, chunk, counts=counts), ref)


class CopyTransport:
    """A stand-in for host staging: MPI only ever sees copies (checks the hook protocol)."""

    def __init__(self):
        self.to = self.back = 0

    def to_mpi(self, arr):
        self.to += 1
        return np.array(arr, copy=True)

    def from_mpi(self, buf, arr):
        self.back += 1
        arr[...] = buf


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["ring", "recursive_doubling", "textbook"])
def test_transport_hooks(comms, algorithm, monkeypatch):
    monkeypatch.setattr(ring, "SEGMENT_BYTES", 64)
    tr = CopyTransport()
    g = Group(WORLD, "tp", Ledger(), transport=tr)
    x = rand(np.float32, 1001, seed=g.rank)
    ref, tol = mpi_reference(WORLD, x)
    check_close(allreduce.ring_allreduce(g, x, algorithm=algorithm), ref, tol)
    ref, tol = mpi_reference(WORLD, x, op="reduce_scatter")
    check_close(ring.ring_reduce_scatter(g, x), ref, tol)
    np.testing.assert_array_equal(ring.ring_allgather(g, x), np.concatenate(WORLD.allgather(x)))
    assert (tr.to > 0 and tr.back > 0) == (g.size > 1)
