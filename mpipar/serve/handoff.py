"""The KV handoff on every rank: a prefill rank packs and sends its pieces of a prompt's
keys and values, a decode rank receives them into the blocks world rank 0 reserved.

World rank 0 plans a transfer (serve/disagg.py) once the prefill group has sampled a
request's first token and the decode replica has blocks for it, and sends

    to every sender    {"op": "kv_send", "xfer", "table", "length", "pieces"}
    to every receiver  {"op": "kv_recv", "xfer", "table", "length", "pieces"}

with the pieces of ``parallel/reshard.py`` that concern the rank, as
(peer, layer start, layer stop, head start, head stop). A piece is one array

    [2 (k, v), layers of the stage, P positions, heads, D]     ledger kind "kv_transfer"

A sender gathers it from its pool through the request's prefill block table (a copy)
and starts a non-blocking send (comm/p2p.isend_array): the rank goes on with the next
prompt's prefill while it travels, and completes the send (``progress``) between
steps. A receiver posts both receives at once (comm/p2p.irecv_into) and tests them
between its decode steps; when all pieces of a transfer are in, it scatters them into
its pool at the decode block table (positions 0..P-1) and tells world rank 0
(TAG_KV_ACK), which only then frees the prefill blocks and schedules the request's
decode. Both sides take plans in the order rank 0 sent them, so the messages of one
(sender, receiver) pair match in order on one tag.
"""

from __future__ import annotations

import numpy as np

from ..comm.control import Outbox
from ..comm.p2p import irecv_into, isend_array

TAG_KV = 33
TAG_KV_ACK = 34
KIND = "kv_transfer"


def _positions(xp, table, length: int, block_size: int):
    """Block and offset index arrays [P] of positions 0..length-1 of a block table."""
    pos = np.arange(length)
    blocks = np.asarray(table, dtype=np.int64)[pos // block_size]
    return xp.asarray(blocks), xp.asarray(pos % block_size)


class KVSender:
    """A prefill rank's side: pieces out of its pool, sends in flight."""

    def __init__(self, link, pool, plan):
        self.link, self.pool, self.plan = link, pool, plan  # link: world Group
        self.pending = []

    def send(self, msg: dict) -> None:
        xp, pool = self.pool.xp, self.pool
        blocks, offsets = _positions(xp, msg["table"], msg["length"], pool.block_size)
        l_base, h_base = self.plan.layers.start, self.plan.kv_heads.start
        for dst, l0, l1, h0, h1 in msg["pieces"]:
            layers = range(l0 - l_base, l1 - l_base)
            heads = slice(h0 - h_base, h1 - h_base)
            piece = xp.stack([xp.stack([side[i][blocks, offsets, heads] for i in layers])
                              for side in (pool.k, pool.v)])  # [2, layers, P, heads, D]
            self.pending.append(isend_array(self.link, piece, dst, TAG_KV, kind=KIND))
        self.progress()

    def progress(self) -> None:
        self.pending = [h for h in self.pending if not h.test()]

    def flush(self) -> None:
        for h in self.pending:
            h.wait()
        self.pending.clear()


class KVReceiver:
    """A decode rank's side: receives posted, pieces into its pool, acks to rank 0."""

    def __init__(self, link, pool, plan, dtype):
        self.link, self.pool, self.plan, self.dtype = link, pool, plan, dtype
        self.pending = []  # (msg, [(handle, piece bounds)])
        self.outbox = Outbox()

    def post(self, msg: dict) -> None:
        xp, d = self.pool.xp, self.pool.k[0].shape[-1]
        handles = []
        for src, l0, l1, h0, h1 in msg["pieces"]:
            out = xp.empty((2, l1 - l0, msg["length"], h1 - h0, d), dtype=self.dtype)
            handles.append((irecv_into(self.link, out, src, TAG_KV, kind=KIND),
                            (l0, l1, h0, h1)))
        self.pending.append((msg, handles))

    def progress(self) -> list[int]:
        """Transfers whose pieces are all in (now in the pool): their ids, oldest first.
        Every rank but world rank 0 also sends rank 0 the acks."""
        done, still = [], []
        for msg, handles in self.pending:
            if all(h.test() for h, _ in handles):
                self._store(msg, handles)
                done.append(msg["xfer"])
            else:
                still.append((msg, handles))
        self.pending = still
        if done and self.link.rank != 0:
            self.outbox.post(self.link, done, 0, TAG_KV_ACK, "control")
        return done

    def _store(self, msg, handles) -> None:
        pool, xp = self.pool, self.pool.xp
        blocks, offsets = _positions(xp, msg["table"], msg["length"], pool.block_size)
        l_base, h_base = self.plan.layers.start, self.plan.kv_heads.start
        for h, (l0, l1, h0, h1) in handles:
            piece = h.out  # [2, layers, P, heads, D]
            heads = slice(h0 - h_base, h1 - h_base)
            for j, layer in enumerate(range(l0 - l_base, l1 - l_base)):
                pool.k[layer][blocks, offsets, heads] = piece[0, j]
                pool.v[layer][blocks, offsets, heads] = piece[1, j]

    def flush(self) -> None:
        for _, handles in self.pending:
            for h, _ in handles:
                h.wait()
        self.progress()
        self.outbox.flush()
