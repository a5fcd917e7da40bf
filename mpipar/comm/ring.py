"""The ring: all-reduce (textbook and fast), reduce-scatter and all-gather on point-to-point
messages.

The math (the seed's): an all-reduce (SUM) of an array of S bytes over n ranks is
  1. reduce-scatter: the array is cut into n chunks (``chunk_bounds``); in n-1 steps
     every rank sends one chunk to its right neighbour, receives one from its left and
     adds it to its own copy of that chunk. After the last step rank r holds chunk r
     summed over all ranks.
  2. all-gather: in n-1 more steps every rank forwards the last complete chunk it got,
     so all ranks end with every summed chunk.
Each rank sends (and receives) one chunk per step, 2(n-1) chunks of S/n bytes:
  bytes sent per rank = 2 (n-1)/n * S   (``ring_bytes`` gives the exact figure with the
  chunk rounding: chunks of an uneven split differ by one element).
Time ~ 2(n-1) (alpha + S/(n B)): bandwidth-optimal, but 2(n-1) latencies alpha, which is
why small messages take recursive doubling instead (comm/recursive_doubling.py; the
choice by size is comm/allreduce.py's ``ring_allreduce``). ``ring_reduce_scatter`` and
``ring_allgather`` are the two halves alone, (n-1)/n * S per rank each.
The textbook ring (``_textbook``) is exactly these two loops, one blocking Sendrecv a
step, as a reader writes it from the seed; the fast ring (``_ring``) is the same ring
made fast (below), with the same chunks and the same order of additions, so the two
agree bitwise. Every rank of the group ends with the bitwise same result: each chunk is
summed on one rank and then copied.

Dtypes: float32/64 and integers (wrap-around, like MPI) move as themselves; bool sums
as logical OR. float16/bfloat16 move as their 16 bits, so the bytes are those of the
16-bit array (the cost model's S). Each addition (``add_into``, also recursive doubling's)
widens both operands to float32 (``wire.acc_dtype``), adds, and rounds once to 16 bits,
on every backend (CuPy's native float16 add included); since a partial sum crosses the
wire as 16 bits, a result is rounded once per hop: n-1 times in the ring. A float32
wire would round once in all but double the bytes of the reduce-scatter.

The fast ring (host arrays; measured against MPICH's Allreduce by
programs/bench_allreduce.py, results in the README): no copy of the input is made and
no per-step buffers: all receives of a pass are posted up front straight into the output
(a reduce-scatter chunk lands in ``out``, gets the local contribution added in place
(``add_into``) and moves on), the step-0 send goes out before any wait, each piece is
forwarded as soon as it lands, and the all-gather starts with the first finished piece
of the reduce-scatter. Chunks longer than ``SEGMENT_BYTES`` go in pieces, so the next
rank starts on the first piece while the rest still arrive: a pipeline of n-1 + pieces
steps instead of n-1 chunk-long ones. Each piece is a message, with its rendezvous and
wait, so pieces are large (the README's results say why not cache-sized ones).
"""

from __future__ import annotations

import time

from .chunks import chunk_bounds  # noqa: F401  (part of this module's API)
from .tags import RING
from .wire import acc_dtype, buf_spec, recv_done

SEGMENT_BYTES = 8 << 20        # ring pipeline piece (longer chunks go in pieces)


def _bounds_from_counts(counts) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + int(c)))
        start += int(c)
    return bounds


def ring_bytes(n_elems: int, itemsize: int, n_ranks: int, rank: int) -> tuple[int, int]:
    """(sent, recv) bytes of ``rank`` in a ring all-reduce of n_elems items."""
    if n_ranks == 1:
        return 0, 0
    size = [b - a for a, b in chunk_bounds(n_elems, n_ranks)]
    n, r = n_ranks, rank
    sent = sum(size[(r - k - 1) % n] + size[(r - k) % n] for k in range(n - 1))
    recv = sum(size[(r - k - 2) % n] + size[(r - k - 1) % n] for k in range(n - 1))
    return sent * itemsize, recv * itemsize


def add_into(xp, a, b, out):
    """out = a + b (out may be a or b); 16-bit floats add in float32, rounded once."""
    wide = acc_dtype(out.dtype)
    if wide == out.dtype:
        return xp.add(a, b, out=out)
    out[...] = (a.astype(wide) + b.astype(wide)).astype(out.dtype)
    return out


class _Pipe:
    """The non-blocking messages of one pass, with their element counts."""

    def __init__(self, group):
        self.group, self.sends, self.recvs = group, [], []
        self.sent = self.recv = 0                  # elements

    def isend(self, arr, dest, tag=RING) -> None:
        spec, staged = buf_spec(self.group, arr)
        self.sends.append((self.group.comm.Isend(spec, dest, tag), staged))
        self.sent += arr.size

    def irecv(self, arr, source, tag=RING) -> None:
        spec, staged = buf_spec(self.group, arr)
        self.recvs.append((self.group.comm.Irecv(spec, source, tag), staged, arr))
        self.recv += arr.size

    def wait_recv(self, i: int) -> None:
        if self.recvs[i] is None:                  # waited already
            return
        req, staged, arr = self.recvs[i]
        req.Wait()
        recv_done(self.group, staged, arr)
        self.recvs[i] = None

    def wait_all(self) -> None:
        for i in range(len(self.recvs)):
            self.wait_recv(i)
        for req, _ in self.sends:
            req.Wait()
        self.sends, self.recvs = [], []


def _pieces(bounds, c, seg, nseg):
    """The nseg (start, stop) pieces of chunk c (pieces past its end are empty)."""
    c0, c1 = bounds[c]
    return [(min(c1, c0 + j * seg), min(c1, c0 + (j + 1) * seg)) for j in range(nseg)]


def _segmenting(bounds, itemsize):
    longest = max(b - a for a, b in bounds)
    seg = max(1, SEGMENT_BYTES // itemsize)
    return seg, max(1, -(-longest // seg))      # same on every rank: messages match


def _ring(group, src, out, bounds, reduce: bool, gather: bool) -> tuple[int, int]:
    """One ring pass over flat arrays: reduce-scatter, all-gather, or both (all-reduce).

    reduce: src [N] -> out[bounds[r]] = sum over ranks (other chunks of ``out`` are left
    holding partial sums; ``out`` must not overlap ``src``). gather (``out[bounds[r]]``
    holds this rank's chunk): fills every chunk of ``out``. Returns (sent, recv) elements.

    Receives are posted up front, straight into ``out``: in the reduce-scatter, the
    chunk of step k is received once, gets the local contribution added in place and
    is sent on at step k+1. Each piece moves on as soon as it is ready; the all-gather
    starts with the first finished piece of chunk r, its step-0 receive (chunk r-1,
    which the reduce-scatter never writes) posted from the start too. Its later
    receives overwrite chunks the reduce-scatter sent from, so they are posted once
    those sends are done.
    """
    xp, n, r = group.xp, group.size, group.rank
    right, left = (r + 1) % n, (r - 1) % n
    seg, nseg = _segmenting(bounds, out.itemsize)
    pipe = _Pipe(group)

    def pieces(c):
        return _pieces(bounds, c % n, seg, nseg)

    if reduce:
        for k in range(n - 1):                   # reduce-scatter step k: chunk r-k-2
            for a, b in pieces(r - k - 2):
                pipe.irecv(out[a:b], left)
    gathered = len(pipe.recvs)                   # index of the all-gather's receives
    if gather:
        for a, b in pieces(r - 1):               # all-gather step 0: chunk r-1
            pipe.irecv(out[a:b], left)
    if reduce:
        for a, b in pieces(r - 1):
            pipe.isend(src[a:b], right)          # step 0 sends its raw chunk r-1
        for k in range(n - 1):
            for j, (a, b) in enumerate(pieces(r - k - 2)):
                pipe.wait_recv(k * nseg + j)
                add_into(xp, out[a:b], src[a:b], out[a:b])
                if k < n - 2 or gather:          # partial sum on; last step: chunk r done
                    pipe.isend(out[a:b], right)
        for req, _ in pipe.sends[:(n - 1) * nseg]:
            req.Wait()                           # the reduce-scatter's sends are out
    else:
        for a, b in pieces(r):
            pipe.isend(out[a:b], right)
    if gather:
        for k in range(1, n - 1):                # all-gather step k: chunk r-k-1
            for a, b in pieces(r - k - 1):
                pipe.irecv(out[a:b], left)
        for k in range(n - 2):
            for j, (a, b) in enumerate(pieces(r - k - 1)):
                pipe.wait_recv(gathered + k * nseg + j)
                pipe.isend(out[a:b], right)
    pipe.wait_all()
    return pipe.sent, pipe.recv


def flat_buffer(group, x):
    """Contiguous 1-D view of x (a copy only if x is not contiguous)."""
    return group.xp.ascontiguousarray(x).reshape(-1)


def ring_reduce_scatter(group, x, kind=None):
    """SUM over ranks of x (any shape, flattened); rank r returns chunk r [len of bounds[r]]."""
    t = time.perf_counter()
    src = flat_buffer(group, x)
    bounds = chunk_bounds(src.size, group.size)
    a, b = bounds[group.rank]
    if group.size == 1 or src.size == 0:
        result = src[a:b].copy()
        group.ledger.record(kind or group.kind("reduce_scatter"), 0, 0,
                            time.perf_counter() - t, t)
        return result
    out = group.xp.empty_like(src)
    sent, recv = _ring(group, src, out, bounds, reduce=True, gather=False)
    group.ledger.record(kind or group.kind("reduce_scatter"), sent * src.itemsize,
                        recv * src.itemsize, time.perf_counter() - t, t)
    return out[a:b].copy()


def ring_allgather(group, chunk, counts=None, kind=None):
    """Concatenation over ranks of each rank's 1-D ``chunk`` (counts[i]: rank i's length)."""
    t = time.perf_counter()
    xp, n = group.xp, group.size
    chunk = flat_buffer(group, chunk)
    counts = [chunk.size] * n if counts is None else [int(c) for c in counts]
    if counts[group.rank] != chunk.size:
        raise ValueError(f"chunk has {chunk.size} items, counts says {counts[group.rank]}")
    bounds = _bounds_from_counts(counts)
    out = xp.empty(sum(counts), dtype=chunk.dtype)     # [sum(counts)]
    a, b = bounds[group.rank]
    out[a:b] = chunk
    sent = recv = 0
    if n > 1 and out.size:
        sent, recv = _ring(group, out, out, bounds, reduce=False, gather=True)
    group.ledger.record(kind or group.kind("allgather"), sent * out.itemsize,
                        recv * out.itemsize, time.perf_counter() - t, t)
    return out


def exchange(group, send, dest, recv, source, tag=RING) -> None:
    """One blocking Sendrecv: ``send`` to dest while ``recv`` arrives from source."""
    sspec, _ = buf_spec(group, send)
    rspec, staged = buf_spec(group, recv)
    group.comm.Sendrecv(sspec, dest, tag, rspec, source, tag)
    recv_done(group, staged, recv)


def _textbook(group, out) -> tuple[int, int]:
    """The seed's ring on ``out`` [N] (this rank's array, summed in place); elements.

    Reduce-scatter: at step k rank r sends chunk r-k-1 to its right and adds the chunk
    r-k-2 that arrives from its left; after n-1 steps chunk r is the full sum. All-gather:
    at step k it sends chunk r-k (complete) and stores chunk r-k-1 from its left.
    """
    xp, n, r = group.xp, group.size, group.rank
    right, left = (r + 1) % n, (r - 1) % n
    bounds = chunk_bounds(out.size, n)

    def chunk(c):
        a, b = bounds[c % n]
        return out[a:b]

    got = xp.empty(max(b - a for a, b in bounds), out.dtype)    # [N/n] the left's chunk
    sent = recv = 0
    for k in range(n - 1):                          # reduce-scatter
        send, mine = chunk(r - k - 1), chunk(r - k - 2)
        exchange(group, send, right, got[:mine.size], left)
        add_into(xp, got[:mine.size], mine, mine)       # partial sum from the left + my part
        sent, recv = sent + send.size, recv + mine.size
    for k in range(n - 1):                          # all-gather
        send, into = chunk(r - k), chunk(r - k - 1)
        exchange(group, send, right, into, left)
        sent, recv = sent + send.size, recv + into.size
    return sent, recv


def ring_allreduce_into(group, src, out, textbook: bool = False) -> tuple[int, int]:
    """The ring all-reduce of flat ``src`` [N] into flat ``out`` [N] (may be src; group
    size > 1, N > 0): the fast ring, or with ``textbook`` the seed's two loops. Returns
    (sent, recv) elements."""
    if textbook:
        out[...] = src
        return _textbook(group, out)
    if group.xp.may_share_memory(out, src):
        src = src.copy()                          # out is x: the ring reads x after writing
    return _ring(group, src, out, chunk_bounds(src.size, group.size), reduce=True,
                 gather=True)
