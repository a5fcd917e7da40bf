"""Recursive doubling all-reduce: few messages, for small arrays.

log2(p) exchanges of the whole array with partner rank ^ 2^k, p the largest power of two
<= n; after exchange k each rank holds the sum over its block of 2^(k+1) ranks. For n not
a power of two the first 2(n-p) ranks pair up first (the even rank sends its array to
the odd one, which adds) and the odd ones send the result back at the end. Bytes
(``recursive_doubling_bytes``): a rank in the power-of-two set sends and receives
log2(p) S, an odd pair member one S more each way, a rank that sits out sends S and
receives S -- against the ring's 2(n-1)/n S (comm/ring.py). Time ~ (log2 p (+2))
(alpha + S/B): fewer latencies than the ring's 2(n-1), more bytes from n = 4 on; which
one runs at which size is comm/allreduce.py's choice. Each exchange is one Sendrecv: at
these sizes the cost is the number of MPI calls.

Both partners of an exchange add the same two operands (IEEE addition commutes), so every
rank ends with the bitwise same result. 16-bit floats add in float32 (``ring.add_into``) and
cross the wire as 16 bits: a result is rounded log2(p) (+1) times. Tags:
``tags.RECURSIVE_DOUBLING`` (fold in, exchange, unfold).
"""

from __future__ import annotations

from .ring import add_into, exchange
from .tags import RECURSIVE_DOUBLING
from .wire import buf_spec, recv_done


def recursive_doubling_bytes(n_elems: int, itemsize: int, n_ranks: int,
                             rank: int) -> tuple[int, int]:
    """(sent, recv) bytes of ``rank`` in the recursive-doubling all-reduce."""
    if n_ranks == 1:
        return 0, 0
    nbytes = n_elems * itemsize
    p = 1 << (n_ranks.bit_length() - 1)
    steps = p.bit_length() - 1
    if rank < 2 * (n_ranks - p):
        return (nbytes, nbytes) if rank % 2 == 0 else ((steps + 1) * nbytes, (steps + 1) * nbytes)
    return steps * nbytes, steps * nbytes


def recursive_doubling_into(group, src, out) -> tuple[int, int]:
    """Recursive doubling of flat ``src`` [N] into flat ``out`` [N] (group size > 1);
    (sent, recv) elements. ``cur`` is this rank's partial sum: ``src`` until the first
    addition writes ``out`` (no copy of src is made)."""
    xp, n, r = group.xp, group.comm.Get_size(), group.comm.Get_rank()
    tmp = xp.empty_like(out)                      # [N] partner's partial sum
    p = 1 << (n.bit_length() - 1)
    rem = n - p
    sent = recv = 0
    cur = src
    newrank = r - rem if r >= 2 * rem else (r // 2 if r % 2 else -1)
    if r < 2 * rem:                               # pair up to reach a power of two
        if r % 2 == 0:
            spec, _ = buf_spec(group, src)
            group.comm.Send(spec, r + 1, RECURSIVE_DOUBLING[0])
            sent += src.size
        else:
            spec, staged = buf_spec(group, tmp)
            group.comm.Recv(spec, r - 1, RECURSIVE_DOUBLING[0])
            recv_done(group, staged, tmp)
            recv += tmp.size
            cur = add_into(xp, tmp, src, out)
    mask = 1
    while newrank >= 0 and mask < p:
        peer_new = newrank ^ mask
        peer = peer_new * 2 + 1 if peer_new < rem else peer_new + rem
        exchange(group, cur, peer, tmp, peer, RECURSIVE_DOUBLING[1])
        sent, recv = sent + cur.size, recv + tmp.size
        cur = add_into(xp, cur, tmp, out)
        mask <<= 1
    if r < 2 * rem:                               # give the sat-out ranks the result
        if r % 2 == 0:
            spec, staged = buf_spec(group, out)
            group.comm.Recv(spec, r + 1, RECURSIVE_DOUBLING[2])
            recv_done(group, staged, out)
            recv += out.size
        else:
            spec, _ = buf_spec(group, out)
            group.comm.Send(spec, r - 1, RECURSIVE_DOUBLING[2])
            sent += out.size
    return sent, recv
