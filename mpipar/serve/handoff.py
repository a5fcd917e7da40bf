"""The KV handoff: world rank 0 reserves decode blocks and plans each transfer
(``HandoffQueue``); a prefill rank packs and sends its pieces of a prompt's keys and
values (``KVSender``); a decode rank receives them into the reserved blocks (``KVReceiver``).

Once the prefill group has sampled a request's first token (serve/disagg.py), the request
waits in rank 0's queue, in order, holding its prefill blocks, until a decode replica
has free blocks for prompt + max_tokens (then the decode side never preempts it); rank
0 allocates them and sends a ``step.KVOrder`` (on the step tag, in order with the Steps)

    to every sender    KVOrder(send=True,  xfer, prefill table, length, pieces)
    to every receiver  KVOrder(send=False, xfer, decode table,  length, pieces)

with the ``parallel/reshard.Piece``s that concern the rank (src, dst, layers, heads).
A piece is one array

    [2 (k, v), layers of the stage, P positions, heads, D]     ledger kind "kv_transfer"

A sender gathers it from its pool through the request's prefill block table (a copy)
and starts a non-blocking send (comm/p2p.isend_array): the rank goes on with the next
prompt's prefill while it travels, and completes the send (``progress``) between
steps. A receiver posts both receives at once (comm/p2p.irecv_into) and tests them
between its decode steps; when all pieces of a transfer are in, it scatters them into
its pool at the decode block table (positions 0..P-1) and tells world rank 0
(tags.KV_ACK), which only then frees the prefill blocks and schedules the request's
decode. Both sides take plans in the order rank 0 sent them, so the messages of one
(sender, receiver) pair match in order on one tag.
"""

from __future__ import annotations

import time

import numpy as np

from ..comm.control import Outbox, poll_object
from ..comm.p2p import irecv_into, isend_array
from ..comm.tags import KV_ACK, KV_PIECE, STEP
from ..cost.traffic import piece_bytes_by_rank
from ..parallel.reshard import kv_pieces
from .request import FINISH_ABORT, RequestOutput
from .step import KVOrder

KIND = "kv_transfer"


def _positions(xp, table, length: int, block_size: int):
    """Block and offset index arrays [P] of positions 0..length-1 of a block table."""
    pos = np.arange(length)
    blocks = np.asarray(table, dtype=np.int64)[pos // block_size]
    return xp.asarray(blocks), xp.asarray(pos % block_size)


class KVSender:
    """A prefill rank's side: pieces out of its pool, sends in flight."""

    def __init__(self, link, pool, shard):
        self.link, self.pool, self.shard = link, pool, shard  # link: world Group
        self.pending = []

    def take(self, order: KVOrder) -> None:
        xp, pool = self.pool.xp, self.pool
        blocks, offsets = _positions(xp, order.table, order.length, pool.block_size)
        l_base, h_base = self.shard.layers.start, self.shard.kv_heads.start
        for p in order.pieces:
            layers = range(p.layers.start - l_base, p.layers.stop - l_base)
            heads = slice(p.heads.start - h_base, p.heads.stop - h_base)
            piece = xp.stack([xp.stack([side[i][blocks, offsets, heads] for i in layers])
                              for side in (pool.k, pool.v)])  # [2, layers, P, heads, D]
            self.pending.append(isend_array(self.link, piece, p.dst, KV_PIECE, kind=KIND))
        self.progress()

    def progress(self) -> None:
        self.pending = [h for h in self.pending if not h.test()]

    def flush(self) -> None:
        for h in self.pending:
            h.wait()
        self.pending.clear()


class KVReceiver:
    """A decode rank's side: receives posted, pieces into its pool, acks to rank 0."""

    def __init__(self, link, pool, shard, dtype):
        self.link, self.pool, self.shard, self.dtype = link, pool, shard, dtype
        self.pending = []  # (KVOrder, [(handle, Piece)])
        self.outbox = Outbox()

    def take(self, order: KVOrder) -> None:
        """Post the receives of every piece of ``order`` at once."""
        xp, d = self.pool.xp, self.pool.k[0].shape[-1]
        handles = []
        for p in order.pieces:
            out = xp.empty((2, len(p.layers), order.length, len(p.heads), d), dtype=self.dtype)
            handles.append((irecv_into(self.link, out, p.src, KV_PIECE, kind=KIND), p))
        self.pending.append((order, handles))

    def progress(self) -> list[int]:
        """Transfers whose pieces are all in (now in the pool): their ids, oldest first.
        Every rank but world rank 0 also sends rank 0 the acks."""
        done, still = [], []
        for order, handles in self.pending:
            if all(h.test() for h, _ in handles):
                self._store(order, handles)
                done.append(order.xfer)
            else:
                still.append((order, handles))
        self.pending = still
        if done and self.link.rank != 0:
            self.outbox.post(self.link, done, 0, KV_ACK, "control")
        return done

    def _store(self, order: KVOrder, handles) -> None:
        pool, xp = self.pool, self.pool.xp
        blocks, offsets = _positions(xp, order.table, order.length, pool.block_size)
        l_base, h_base = self.shard.layers.start, self.shard.kv_heads.start
        for h, p in handles:
            piece = h.out  # [2, layers, P, heads, D]
            heads = slice(p.heads.start - h_base, p.heads.stop - h_base)
            for j, layer in enumerate(range(p.layers.start - l_base, p.layers.stop - l_base)):
                pool.k[layer][blocks, offsets, heads] = piece[0, j]
                pool.v[layer][blocks, offsets, heads] = piece[1, j]

    def flush(self) -> None:
        for _, handles in self.pending:
            for h, _ in handles:
                h.wait()
        self.progress()
        self.outbox.flush()


class HandoffQueue:
    """World rank 0: requests with a first token, waiting for decode blocks or moving."""

    def __init__(self, link, layout, config, itemsize, outbox, receiver, prefill_sched,
                 decode_sched, need_blocks, times):
        self.link, self.layout, self.config, self.itemsize = link, layout, config, itemsize
        self.outbox, self.receiver = outbox, receiver  # rank 0's own KVReceiver
        self.prefill, self.decode, self.need_blocks = prefill_sched, decode_sched, need_blocks
        self.times = times  # request id -> {event: perf_counter}, shared with the engine
        self.queue = []  # Seqs in arrival order, holding their prefill blocks
        self.transfers = {}  # xfer id -> [seq, replica, decode table, receivers left]
        self.kv_bytes = {}  # world rank -> [sent, recv] predicted kv_transfer bytes
        self.next_xfer = self.admissions = self.num_transfers = 0
        self._waited = set()  # seqs_by_id that found every decode pool full at least once

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.transfers)

    def stats(self) -> dict:
        e = self.link.ledger.entries
        return {"kv_transfers": self.num_transfers,
                "kv_transfers_in_flight": len(self.transfers),
                "handoff_waiting": len(self.queue), "handoff_waits": len(self._waited),
                "kv_transfer_bytes_predicted": sum(s for s, _ in self.kv_bytes.values()),
                "kv_transfer_recv_bytes_rank0_predicted": self.kv_bytes.get(0, [0, 0])[1],
                "kv_transfer_recv_bytes_rank0": e[KIND].recv_bytes if KIND in e else 0}

    def abort(self, request_id: str) -> None:
        for seq in self.queue + [t[0] for t in self.transfers.values()]:
            if seq.request.request_id == request_id:
                seq.aborted = True

    def finish_aborted(self) -> list:
        """Aborted requests still waiting for decode blocks: free them, finish them."""
        out = []
        for seq in [s for s in self.queue if s.aborted]:
            self.queue.remove(seq)
            self.prefill.pools[0].release(seq.table)
            out.append(RequestOutput(seq.request.request_id, [], True, FINISH_ABORT,
                                     seq.prompt_len, seq.generated))
        return out

    def start(self) -> None:
        """Reserve decode blocks for waiting requests in order and post their transfers;
        the first that fits no decode replica waits (and so do the ones behind it)."""
        while self.queue:
            seq = self.queue[0]
            need, pools, running = self.need_blocks(seq), self.decode.pools, self.decode.running
            load = [len(running[d]) + sum(1 for t in self.transfers.values() if t[1] == d)
                    for d in range(len(pools))]
            fits = [d for d, p in enumerate(pools) if p.num_free >= need
                    and load[d] < self.decode.max_seqs]
            if not fits:
                self._waited.add(seq.seq_id)
                return
            self.queue.pop(0)
            d = min(fits, key=lambda r: load[r])
            self._post(seq, d, pools[d].allocate(need))

    def _post(self, seq, replica: int, table: list) -> None:
        lay = self.layout
        pieces = kv_pieces(self.config, lay.prefill, lay.decode, replica, lay.prefill_base,
                           lay.decode_base)
        xfer, self.next_xfer = self.next_xfer, self.next_xfer + 1
        for src in sorted({p.src for p in pieces}):
            order = KVOrder(True, xfer, list(seq.table), seq.prompt_len,
                            [p for p in pieces if p.src == src])
            self.outbox.post(self.link, order, src, STEP, "control")
        receivers = sorted({p.dst for p in pieces})
        for dst in receivers:
            order = KVOrder(False, xfer, table, seq.prompt_len,
                            [p for p in pieces if p.dst == dst])
            if dst == 0:
                self.receiver.take(order)
            else:
                self.outbox.post(self.link, order, dst, STEP, "control")
        for r, (sent, recv) in piece_bytes_by_rank(pieces, self.config, seq.prompt_len,
                                                    self.itemsize).items():
            acc = self.kv_bytes.setdefault(r, [0, 0])
            acc[0] += sent
            acc[1] += recv
        self.transfers[xfer] = [seq, replica, table, set(receivers)]
        self.times[seq.request.request_id]["reserved"] = time.perf_counter()
        self.num_transfers += 1

    def take_acks(self) -> None:
        """Receivers that have their pieces; a transfer all receivers have ends: the
        prefill blocks are freed and the request joins the decode scheduler."""
        acks = [(0, x) for x in self.receiver.progress()]
        for r in range(1, self.layout.decode.world):
            while True:
                ok, ids = poll_object(self.link, r, KV_ACK, "control")
                if not ok:
                    break
                acks += [(r, x) for x in ids]
        for r, xfer in acks:
            t = self.transfers[xfer]
            t[3].discard(r)
            if t[3]:
                continue
            seq, d, table, _ = self.transfers.pop(xfer)
            self.prefill.pools[0].release(seq.table)  # the decode side has it now
            self.times[seq.request.request_id]["transferred"] = time.perf_counter()
            self.decode.attach(seq, d, table, self.admissions)
            self.admissions += 1
            if seq.aborted:
                self.decode.abort(seq.request.request_id)
