"""Point-to-point send/receive of arrays whose shape and dtype the receiver does not know.

What moves: a fixed-size header, then the payload.
  header  = int64[2 + MAX_NDIM]: [dtype id, ndim, shape..., 0 padding]  (80 bytes)
  payload = the array's bytes, C order (bfloat16 and float16 move as their 16 bits).
Both go on the same (source, tag); MPI keeps their order, so a receiver matches a
header and then the payload right behind it.

Ledger: the payload bytes are recorded under ``kind`` (default ``group.kind("send")``
on the sender, ``group.kind("recv")`` on the receiver): one array of S bytes across a
pipeline boundary counts S, the seed's "one activation per stage boundary". The header
is recorded apart, under ``kind + "_header"``, so it never inflates that figure.

Non-blocking: ``isend_array`` returns a handle whose ``wait()`` completes both messages
(keep the array unchanged until then). ``irecv_array`` posts the header receive at once
and ``wait()`` then receives the payload (blocking) and returns the array; two pending
``irecv_array`` on the same (source, tag) must be waited in the order they were posted.
``irecv_into`` (the receiver knows shape and dtype) posts both receives at once, so
``test()`` can complete it while the receiver keeps computing; ``SendHandle.test()``
likewise completes a send without blocking.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from .tags import P2P_DEFAULT
from .wire import BFLOAT16, buf_spec, recv_done

MAX_NDIM = 8
HEADER_LEN = 2 + MAX_NDIM
DTYPES = [np.dtype(t) for t in (np.float32, np.float64, np.float16, np.int8, np.int16,
                                np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                np.uint64, np.bool_)] + ([BFLOAT16] if BFLOAT16 else [])


def _header(x) -> np.ndarray:
    if x.ndim > MAX_NDIM:
        raise ValueError(f"arrays of at most {MAX_NDIM} dimensions, not {x.ndim}")
    try:
        code = DTYPES.index(np.dtype(x.dtype))
    except ValueError:
        raise TypeError(f"cannot send dtype {x.dtype}") from None
    head = np.zeros(HEADER_LEN, np.int64)               # [dtype id, ndim, shape...]
    head[0], head[1] = code, x.ndim
    head[2:2 + x.ndim] = x.shape
    return head


def _unpack(head) -> tuple[tuple, np.dtype]:
    ndim = int(head[1])
    return tuple(int(s) for s in head[2:2 + ndim]), DTYPES[int(head[0])]


class SendHandle:
    """A pending ``isend_array``: ``wait()`` completes it and records it in the ledger."""

    def __init__(self, group, reqs, keep, nbytes, kind, t):
        self.group, self.reqs, self.keep = group, reqs, keep
        self.nbytes, self.kind, self.t = nbytes, kind, t
        self.done = False

    def test(self) -> bool:
        """Complete the send if MPI has finished it (never blocks); -> done."""
        if not self.done and MPI.Request.Testall(self.reqs):
            self.wait()
        return self.done

    def wait(self) -> None:
        if self.done:
            return
        MPI.Request.Waitall(self.reqs)
        self.done, self.keep = True, None
        seconds = time.perf_counter() - self.t
        self.group.ledger.record(self.kind + "_header", 8 * HEADER_LEN, 0, 0.0)
        self.group.ledger.record(self.kind, self.nbytes, 0, seconds, self.t)


class RecvHandle:
    """A pending ``irecv_array``: ``wait()`` receives the payload and returns the array."""

    def __init__(self, group, source, tag, kind):
        self.group, self.source, self.tag, self.kind = group, source, tag, kind
        self.head = np.empty(HEADER_LEN, np.int64)
        self.t = time.perf_counter()
        self.req = group.comm.Irecv(self.head, source, tag)
        self.result = None

    def wait(self):
        if self.result is not None:
            return self.result
        status = MPI.Status()
        self.req.Wait(status)
        shape, dtype = _unpack(self.head)
        out = self.group.xp.empty(shape, dtype=dtype)
        spec, staged = buf_spec(self.group, out)
        self.group.comm.Recv(spec, status.Get_source(), status.Get_tag())
        recv_done(self.group, staged, out)
        self.result = out
        ledger = self.group.ledger
        ledger.record(self.kind + "_header", 0, 8 * HEADER_LEN, 0.0)
        ledger.record(self.kind, 0, out.nbytes, time.perf_counter() - self.t, self.t)
        return out


class RecvIntoHandle:
    """A pending ``irecv_into``: header and payload receives both posted; ``test()``
    completes it without blocking, ``wait()`` blocks; both check the header."""

    def __init__(self, group, out, source, tag, kind):
        self.group, self.out, self.source, self.kind = group, out, source, kind
        self.head = np.empty(HEADER_LEN, np.int64)
        self.t = time.perf_counter()
        self.spec, self.staged = buf_spec(group, out)
        self.reqs = [group.comm.Irecv(self.head, source, tag),
                     group.comm.Irecv(self.spec, source, tag)]
        self.done = False

    def _finish(self):
        shape, dtype = _unpack(self.head)
        if shape != tuple(self.out.shape) or dtype != np.dtype(self.out.dtype):
            raise ValueError(f"expected {tuple(self.out.shape)} {self.out.dtype} from rank "
                             f"{self.source}, got {shape} {dtype}")
        recv_done(self.group, self.staged, self.out)
        self.done, self.spec, self.staged = True, None, None
        ledger = self.group.ledger
        ledger.record(self.kind + "_header", 0, 8 * HEADER_LEN, 0.0)
        ledger.record(self.kind, 0, self.out.nbytes, time.perf_counter() - self.t, self.t)

    def test(self) -> bool:
        if not self.done and MPI.Request.Testall(self.reqs):
            self._finish()
        return self.done

    def wait(self):
        if not self.done:
            MPI.Request.Waitall(self.reqs)
            self._finish()
        return self.out


def irecv_into(group, out, source: int, tag: int = P2P_DEFAULT, kind=None) -> RecvIntoHandle:
    """Start receiving an ``isend_array`` whose shape and dtype the receiver knows into
    ``out`` (C-contiguous); the handle's ``test()`` lets the receiver go on working."""
    return RecvIntoHandle(group, out, source, tag, kind or group.kind("recv"))


def isend_array(group, x, dest: int, tag: int = P2P_DEFAULT, kind=None) -> SendHandle:
    """Start sending array x (any shape, supported dtype) to ``dest``; returns a handle."""
    t = time.perf_counter()
    if not x.flags.c_contiguous:
        x = group.xp.ascontiguousarray(x)        # (never for 0-d: it would make it 1-d)
    head = _header(x)
    spec, staged = buf_spec(group, x)
    reqs = [group.comm.Isend(head, dest, tag), group.comm.Isend(spec, dest, tag)]
    return SendHandle(group, reqs, (head, x, staged), x.nbytes,
                      kind or group.kind("send"), t)


def send_array(group, x, dest: int, tag: int = P2P_DEFAULT, kind=None) -> None:
    """Send array x to ``dest`` (blocking until the buffers may be reused)."""
    isend_array(group, x, dest, tag, kind).wait()


def irecv_array(group, source: int = MPI.ANY_SOURCE, tag: int = P2P_DEFAULT,
                kind=None) -> RecvHandle:
    """Start receiving an array of unknown shape/dtype; ``handle.wait()`` returns it."""
    return RecvHandle(group, source, tag, kind or group.kind("recv"))


def recv_array(group, source: int = MPI.ANY_SOURCE, tag: int = P2P_DEFAULT, kind=None):
    """Receive an array of unknown shape and dtype from ``source``."""
    return irecv_array(group, source, tag, kind).wait()
