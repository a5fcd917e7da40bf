"""A Mixture-of-Experts layer: router, dispatch, local experts, combine.

ep = 1: every rank holds every expert, its intermediate dimension TP-split like a dense
MLP; the router picks top-k per token, each rank runs its slice of the chosen experts
and one all-reduce (kind ``tp_allreduce``) sums the partial outputs.

ep = l > 1: the EP group holds P = X + R physical expert slots, S = P/l per rank, whole
(slot p on rank p // S holds logical expert ``slot_expert[p]``; R redundant copies and
where they go: eplb.py). One layer:

1. Share: the T ranks of a TP group hold the same N tokens, so TP rank t routes only the
   disjoint share ``chunk t of N`` (n_s tokens) and nobody computes a token twice.
2. Route: softmax router, top-k logical experts per token; each (token, expert) pair
   picks one copy: the i-th pair of expert e on EP rank r (in token order) takes copy
   ``(i + r) mod c_e`` of its c_e copies, so a hot expert's tokens spread evenly over
   its copies, deterministically.
3. Rows: a token goes once to each rank that holds at least one of its k chosen copies
   (DeepEP's rule), not once per pair. A row is the token [h] plus, for each of its k
   slots, the local slot index on that rank (or -1) and the router weight: h*b + 8k
   bytes (int32 + float32 per slot), packed as bytes so one Alltoallv carries them.
4. Three collectives: row counts per destination (kind ``ep_counts``, one int64 to each
   peer), dispatch (kind ``ep_dispatch``) and combine (kind ``ep_combine``, the counts
   known from the dispatch). Rows a rank keeps for itself are copied, not sent.
5. Compute: the receiver applies each of its local slots to the rows that name it and
   sums them weighted: one output row [h] per received row.
6. Combine: the rows return in the order they came; a token adds its rows (one per rank
   it visited). Then the TP group all-gathers the shares back to [N, h] (kind
   ``tp_allgather``), which replaces the block's second all-reduce.

Cost per rank and layer: dispatch sends ``rows_to_others * (h*b + 8k)``, combine
``rows_from_others * h*b``; counts ``8(l-1)``. The seed's top_k*h/l per group token
counts k rows per token; dedupe sends min(k, ranks hit) rows per token instead.
Load: pairs per logical expert (``RoutingStats``, and the EPLB window) and pairs
computed per rank.
"""

from __future__ import annotations

import numpy as np

from ..backend import to_host
from ..comm.allreduce import ring_allreduce
from ..comm.alltoall import alltoallv, exchange_counts
from ..comm.ring import ring_allgather
from ..model import layers as L
from ..model.layers import layer_prefix
from .eplb import copies_of
from .shard import split

EXPERT_TENSORS = ("gate_proj", "up_proj", "down_proj")


class RoutingStats:
    """Pairs routed per expert per layer, rows and pairs per rank (this rank's view).

    The pair counts stay where the router ran (a device array on a GPU) and are added
    there; they cross to the host only in ``per_expert``, not once per layer."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.expert_pairs = {}  # layer -> pairs per expert [X], on the router's device
        self.rows_received = 0  # token rows this rank's experts got (dedupe: one per token)
        self.rows_from_others = 0  # of those, rows that came from other ranks
        self.rows_sent_away = 0  # rows dispatched to other ranks
        self.pairs_computed = 0  # (token, expert) pairs this rank's slots computed
        self.rebalances = 0  # EPLB windows closed (each: one eplb_load all-reduce)
        self.copies_sent = 0  # expert copies this rank sent in rebalances
        self.copy_bytes = 0  # bytes of one expert copy (3*h*m*b)

    def count_routing(self, layer, per_expert) -> None:
        """per_expert [X] (an xp array): pairs of one batch, counted once over the job."""
        if layer in self.expert_pairs:
            self.expert_pairs[layer] = self.expert_pairs[layer] + per_expert
        else:
            self.expert_pairs[layer] = per_expert

    def per_expert(self) -> np.ndarray:
        return sum((to_host(c).astype(np.int64) for c in self.expert_pairs.values()),
                   np.zeros(self.num_experts, dtype=np.int64))

    def report(self) -> dict:
        return {"expert_pairs": self.per_expert().tolist(), "rows_received": self.rows_received,
                "rows_from_others": self.rows_from_others,
                "rows_sent_away": self.rows_sent_away, "pairs_computed": self.pairs_computed,
                "eplb_rebalances": self.rebalances, "eplb_copies_sent": self.copies_sent,
                "eplb_copy_bytes": self.copy_bytes}


def read_expert(xp, source, layer, e, inter=slice(None), dtype=np.float32):
    """(gate [I, h], up [I, h], down [h, I]) of expert e, I = ``inter`` of its rows."""
    p = f"{layer_prefix(layer)}mlp.experts.{e}."
    gate, up, down = (p + t + ".weight" for t in EXPERT_TENSORS)
    return (L.linear_weight(xp, source.read(gate, (inter, slice(None)), dtype=dtype)),
            L.linear_weight(xp, source.read(up, (inter, slice(None)), dtype=dtype)),
            L.linear_weight(xp, source.read(down, (slice(None), inter), dtype=dtype)))


def pick_copies(xp, experts, start, slots, ep_rank):
    """experts [n, k] logical -> physical slot [n, k] (module docstring, step 2)."""
    flat = experts.ravel()
    order = xp.argsort(flat, kind="stable")  # pairs grouped by expert, token order inside
    per_expert = L.count_per_expert(xp, flat[order], start.shape[0] - 1)  # [X], no sync
    first = xp.cumsum(per_expert) - per_expert  # first sorted pair of each expert
    occ = xp.empty_like(flat)
    occ[order] = xp.arange(flat.shape[0]) - first[flat[order]]  # i of each pair
    start, slots = xp.asarray(start), xp.asarray(slots)
    n_copies = start[flat + 1] - start[flat]
    return slots[start[flat] + (occ + ep_rank) % n_copies].reshape(experts.shape)


def route_rows(xp, phys, slots_per_rank: int, ep: int, dedupe: bool = True):
    """phys [n, k] -> (token of each row [M], local slot per pair of each row [M, k] or
    -1, rows per destination rank [ep]); rows grouped by destination, token order."""
    n, k = phys.shape
    dest = phys // slots_per_rank  # [n, k]
    if dedupe:  # one row per (token, destination rank)
        keys = xp.unique((dest * n + xp.arange(n)[:, None]).ravel())
        row_dest, row_token = keys // n, keys % n
        slot = xp.where(dest[row_token] == row_dest[:, None], phys[row_token] % slots_per_rank, -1)
    else:  # one row per (token, expert) pair
        pair = xp.argsort((dest * n * k + xp.arange(n * k).reshape(n, k)).ravel())
        row_token, row_dest = pair // k, dest.ravel()[pair]
        slot = xp.full((pair.shape[0], k), -1, dtype=phys.dtype)
        slot[xp.arange(pair.shape[0]), pair % k] = phys.ravel()[pair] % slots_per_rank
    counts = np.bincount(to_host(row_dest), minlength=ep).astype(np.int64)
    return row_token, slot.astype(xp.int32), counts


def pack_rows(xp, x, slot, weight):
    """x [M, h], slot [M, k] int32, weight [M, k] float32 -> bytes [M, h*b + 8k]."""
    m = x.shape[0]
    parts = (x, slot.astype(xp.int32), weight.astype(xp.float32))
    return xp.concatenate([xp.ascontiguousarray(a).view(xp.uint8).reshape(
        m, a.shape[1] * a.itemsize) for a in parts], axis=1)


def unpack_rows(xp, rows, h, k, dtype):
    """The inverse of ``pack_rows`` -> (x [M, h], slot [M, k], weight [M, k])."""
    hb = h * np.dtype(dtype).itemsize
    cut = (hb, hb + 4 * k)
    x = xp.ascontiguousarray(rows[:, :cut[0]]).view(dtype)
    slot = xp.ascontiguousarray(rows[:, cut[0]:cut[1]]).view(xp.int32)
    weight = xp.ascontiguousarray(rows[:, cut[1]:]).view(xp.float32)
    return x, slot, weight


def dispatch_combine(group, xs, phys, weights, slots_per_rank, apply, dedupe=True,
                     stats=None):
    """xs [n, h], phys / weights [n, k] -> [n, h] = sum_j weights_j * expert_j(x).

    ``apply(slot, rows [r, h]) -> [r, h]`` runs local slot ``slot``; steps 3-6 of the
    module docstring on the EP group ``group`` (three collectives)."""
    xp, me = group.xp, group.rank
    n, h = xs.shape
    k = phys.shape[1]
    row_token, slot, send_counts = route_rows(xp, phys, slots_per_rank, group.size, dedupe)
    recv_counts = exchange_counts(group, send_counts, kind="ep_counts")
    w = xp.where(slot >= 0, weights[row_token], 0).astype(xp.float32)
    packed = pack_rows(xp, xs[row_token], slot, w)
    recv, _ = alltoallv(group, packed, send_counts, "ep_dispatch", recv_counts=recv_counts)
    x_in, slot_in, w_in = unpack_rows(xp, recv, h, k, xs.dtype)  # [R, h], [R, k], [R, k]
    # Weighted sums in float32, rounded to the compute dtype once per row before combine.
    out = xp.zeros(x_in.shape, dtype=np.float32)  # [R, h]
    for s in range(slots_per_rank):
        rows, j = xp.nonzero(slot_in == s)
        if rows.shape[0]:
            out[rows] += apply(s, x_in[rows]).astype(np.float32) * w_in[rows, j][:, None]
    back, _ = alltoallv(group, out.astype(xs.dtype, copy=False), recv_counts, "ep_combine",
                        recv_counts=send_counts)
    back = back.astype(np.float32, copy=False)
    ys = xp.zeros(xs.shape, dtype=np.float32)  # [n, h]
    if not dedupe:  # a token's rows may repeat within a destination
        xp.add.at(ys, row_token, back)
    start = 0
    for c in send_counts.tolist() if dedupe else []:  # a token once per destination
        ys[row_token[start:start + c]] += back[start:start + c]
        start += c
    ys = ys.astype(xs.dtype, copy=False)
    if stats is not None:
        stats.rows_received += int(recv.shape[0])
        stats.rows_from_others += int(recv.shape[0] - recv_counts[me])
        stats.rows_sent_away += int(send_counts.sum() - send_counts[me])
        stats.pairs_computed += int(to_host(xp.count_nonzero(slot_in >= 0)))
    return ys


class MoE:
    """One sparse layer of this rank: router (replicated) and its expert slots."""

    def __init__(self, source, config, shard, layer: int, comms, xp, slot_expert=None,
                 dtype=np.float32):
        self.config, self.layer, self.comms, self.xp = config, layer, comms, xp
        self.router = L.linear_weight(xp, source.read(layer_prefix(layer) + "mlp.gate.weight",
                                                      dtype=dtype))
        self.ep = comms.layout.ep
        if self.ep == 1:  # every expert, TP-sliced
            inter = slice(shard.expert_inter.start, shard.expert_inter.stop)
            self.slots = [read_expert(xp, source, layer, e, inter, dtype) for e in shard.experts]
            return
        if slot_expert is None:
            slot_expert = np.arange(config.num_experts)
        self.slots = []
        self.set_placement(slot_expert, lambda p, e: read_expert(xp, source, layer, e,
                                                                 dtype=dtype))

    def set_placement(self, slot_expert, weights_of) -> None:
        """Install a placement; ``weights_of(global slot, expert)`` gives each local
        slot's (gate, up, down) (read, reused or received)."""
        self.slot_expert = np.asarray(slot_expert, dtype=np.int64)
        self.slots_per_rank = self.slot_expert.shape[0] // self.ep
        first = self.comms.coords.ep * self.slots_per_rank
        self.slots = [weights_of(p, int(self.slot_expert[p]))
                      for p in range(first, first + self.slots_per_rank)]
        # on the device once per placement, not once per layer and step (pick_copies)
        self.copy_start, self.copy_slots = (self.xp.asarray(a) for a in
                                            copies_of(self.slot_expert, self.config.num_experts))
        self.window_load = self.xp.zeros(self.config.num_experts, dtype=np.int64)  # [X]

    def local_experts(self) -> list[int]:
        """Logical expert of each of this rank's slots."""
        if self.ep == 1:
            return list(range(len(self.slots)))
        first = self.comms.coords.ep * self.slots_per_rank
        return self.slot_expert[first:first + self.slots_per_rank].tolist()

    def forward(self, h, stats):
        """h [N, h] (normed, identical over the TP group) -> MoE output [N, h], whole."""
        c, xp, tp = self.config, self.xp, self.comms.tp
        k = c.num_experts_per_tok
        if self.ep == 1:
            experts, weights = L.router_topk(xp, h, self.router, k, c.norm_topk_prob)
            if tp.rank == 0:  # identical tokens on every TP rank: count them once
                stats.count_routing(self.layer, self._count(experts))
            y = L.experts_forward(xp, h, experts, weights, self.slots)
            return y if tp.size == 1 else ring_allreduce(tp, y)
        n = h.shape[0]
        share = split(n, tp.size, tp.rank)
        xs = h[share.start:share.stop]  # [n_s, h]
        experts, weights = L.router_topk(xp, xs, self.router, k, c.norm_topk_prob)  # [n_s, k]
        per_expert = self._count(experts)  # [X], on the device
        stats.count_routing(self.layer, per_expert)
        self.window_load += per_expert
        phys = pick_copies(xp, experts, self.copy_start, self.copy_slots, self.comms.coords.ep)
        ys = dispatch_combine(self.comms.ep, xs, phys, weights, self.slots_per_rank,
                              lambda s, rows: L.swiglu(xp, rows, *self.slots[s]), True, stats)
        if tp.size == 1:
            return ys
        counts = [len(split(n, tp.size, t)) * h.shape[1] for t in range(tp.size)]
        return ring_allgather(tp, xp.ascontiguousarray(ys).ravel(), counts=counts,
                              kind="tp_allgather").reshape(n, h.shape[1])

    def _count(self, experts):
        """experts [n, k] -> pairs per logical expert [X], without a host round-trip."""
        return L.count_per_expert(self.xp, self.xp.sort(experts.ravel()),
                                  self.config.num_experts)
