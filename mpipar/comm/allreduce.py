"""The all-reduce that mpipar calls: ring or recursive doubling, picked by size.

``ring_allreduce(group, x)`` sums x over the ranks of ``group``. ``algorithm="auto"``
takes recursive doubling (comm/recursive_doubling.py: log2(p) exchanges of all S bytes)
up to ``RECURSIVE_DOUBLING_MAX_BYTES`` and the ring above (comm/ring.py: 2(n-1) steps of
S/n). The crossover: at n = 2 both send S per rank and recursive doubling has one latency
instead of two; at n = 4 it sends 2S against the ring's 1.5S and saves 4 latencies
alpha, so it wins while S/(2B) < 4 alpha, i.e. S < 8 alpha B (B the link bandwidth).
The threshold is that product on the machine it was measured on (README, results); a
decode step's all-reduce (one token a sequence, a few KiB) is below it and sends
log2(T) S per rank, not 2(T-1)/T S.

``allreduce_bytes`` is the (sent, recv) of the same choice for any rank: the ledger's
prediction (cost/traffic.py) and the time model use it, so they pick
the path the run takes.
"""

from __future__ import annotations

import time

from .recursive_doubling import recursive_doubling_bytes, recursive_doubling_into
from .ring import flat_buffer, ring_allreduce_into, ring_bytes

RECURSIVE_DOUBLING_MAX_BYTES = 256 * 1024   # auto: recursive doubling up to this size
ALGORITHMS = ("ring", "recursive_doubling", "textbook")


def allreduce_bytes(n_elems: int, itemsize: int, n_ranks: int, rank: int,
                    algorithm: str = "auto") -> tuple[int, int]:
    """(sent, recv) of ``ring_allreduce(..., algorithm)`` for this rank."""
    if pick_algorithm(algorithm, n_elems * itemsize) == "recursive_doubling":
        return recursive_doubling_bytes(n_elems, itemsize, n_ranks, rank)
    return ring_bytes(n_elems, itemsize, n_ranks, rank)     # the fast and the textbook ring


def pick_algorithm(algorithm: str, nbytes: int) -> str:
    """The path an all-reduce of ``nbytes`` takes: ``algorithm``, or for "auto" recursive
    doubling up to RECURSIVE_DOUBLING_MAX_BYTES and the ring above."""
    if algorithm == "auto":
        return "recursive_doubling" if nbytes <= RECURSIVE_DOUBLING_MAX_BYTES else "ring"
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be auto or one of {ALGORITHMS}, not {algorithm!r}")
    return algorithm


def ring_allreduce(group, x, kind=None, algorithm: str = "auto", out=None):
    """SUM of x over the ranks of ``group``: same shape and dtype as x; x is not modified.

    ``algorithm``: "ring" (reduce-scatter + all-gather), "recursive_doubling", "auto"
    (recursive doubling up to RECURSIVE_DOUBLING_MAX_BYTES, else the ring) or "textbook"
    (the seed's two loops, comm/ring.py). ``out``: optional contiguous array of x's shape and dtype
    to write into (may be x itself); returned.
    """
    t = time.perf_counter()
    xp = group.xp
    src = flat_buffer(group, x)
    if out is None:
        out = xp.empty(x.shape, dtype=src.dtype)
    elif out.shape != x.shape or out.dtype != src.dtype or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous array of x's shape and dtype")
    flat = out.reshape(-1)                        # [N] view of out
    sent = recv = 0
    picked = pick_algorithm(algorithm, src.nbytes)
    if group.size == 1 or src.size == 0:
        flat[...] = src
    elif picked == "recursive_doubling":
        sent, recv = recursive_doubling_into(group, src, flat)
    else:
        sent, recv = ring_allreduce_into(group, src, flat, textbook=picked == "textbook")
    group.ledger.record(kind or group.kind("allreduce"), sent * src.itemsize,
                        recv * src.itemsize, time.perf_counter() - t, t)
    return out
