"""Expert parallelism: a MoE layer whose X experts are spread over the E ranks of an EP group.

Rank e of the EP group holds experts ``[e*X/E, (e+1)*X/E)`` whole. One MoE layer:

1. Share: the T ranks of a TP group hold the same N tokens (after the attention
   all-reduce), so TP rank t takes the disjoint share ``chunk t of N`` and nobody
   computes a token twice.
2. Route: softmax router, top-k experts per token -> n_share*k (token, expert) pairs,
   sorted by expert, hence by owner rank.
3. Dispatch: the per-expert counts are exchanged (kind ``ep_counts``), then one
   ``Alltoallv`` carries each pair's token row [h] to its expert's owner
   (kind ``ep_alltoall``). A rank that receives nothing still takes part.
4. Compute: each held expert runs its SwiGLU on the rows it received.
5. Combine: a second ``Alltoallv`` returns the rows in the order they came; each token
   sums its k rows weighted by the router.
6. Gather: the TP group all-gathers the shares back into [N, h] (kind ``tp_allgather``),
   which replaces the block's second all-reduce.

Cost (per rank, per layer): dispatch sends the rows whose expert lives on another rank,
``k*h*itemsize`` per token of its share times the fraction of pairs leaving the rank
(``(E-1)/E`` under uniform routing: the seed's top_k*h/l per token and target rank);
combine sends the same number of rows back. Load: rows received per EP rank and pairs
per expert are counted (``RoutingStats``); max/mean shows the imbalance.
"""

from __future__ import annotations

import numpy as np

from ..backend import to_host
from ..comm.alltoall import alltoallv
from ..comm.ring import ring_allgather
from ..model import layers as L
from .shard import split


class RoutingStats:
    """Pairs routed per expert per layer, rows received per rank (this rank's view).

    The pair counts stay where the router ran (a device array on a GPU) and are added
    there; they cross to the host only in ``per_expert``, not once per layer."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.expert_pairs = {}  # layer -> pairs per expert [X], on the router's device
        self.rows_received = 0  # (token, expert) rows this rank's experts computed
        self.rows_from_others = 0  # of those, rows that came from other ranks
        self.rows_sent_away = 0  # rows dispatched to other ranks

    def count_routing(self, layer, experts, share_of=None, xp=np):
        """experts [n, k] (an ``xp`` array); with ``share_of`` (a group holding identical
        tokens) only its rank 0 counts, so every token is counted once."""
        if share_of is not None and share_of.rank != 0:
            return
        counts = L.count_per_expert(xp, xp.sort(experts.ravel()), self.num_experts)  # [X]
        if layer in self.expert_pairs:
            self.expert_pairs[layer] += counts
        else:
            self.expert_pairs[layer] = counts

    def per_expert(self) -> np.ndarray:
        return sum((to_host(c).astype(np.int64) for c in self.expert_pairs.values()),
                   np.zeros(self.num_experts, dtype=np.int64))


def moe_forward(block, x, stats: RoutingStats):
    """x [N, h] (identical over the TP group) -> MoE output [N, h] (whole, not partial)."""
    c, xp, comms = block.config, block.xp, block.comms
    tp, ep = comms.tp, comms.ep
    n, h, k = x.shape[0], x.shape[1], c.num_experts_per_tok
    share = split(n, tp.size, tp.rank)
    xs = x[share.start:share.stop]  # [n_s, h]
    n_s = xs.shape[0]

    experts, weights = L.router_topk(xp, xs, block.router, k, c.norm_topk_prob)  # [n_s, k]
    stats.count_routing(block.layer, experts, xp=xp)
    flat_expert = experts.ravel()  # pair p = token p // k, slot p % k
    order = xp.argsort(flat_expert, kind="stable")  # pairs sorted by expert, then token
    per_expert = L.count_per_expert(xp, flat_expert[order], c.num_experts)  # [X]
    per_rank_experts = c.num_experts // ep.size
    send_counts = to_host(per_expert.reshape(ep.size, per_rank_experts).sum(axis=1))
    rows = xs[order // k]  # [n_s*k, h], grouped by owner rank

    # Dispatch: how many rows of each of my experts come from each source, then the rows.
    counts_in, _ = alltoallv(ep, per_expert.reshape(ep.size, per_rank_experts),
                             np.ones(ep.size, dtype=np.int64), kind="ep_counts")
    recv, recv_counts = alltoallv(ep, rows, send_counts, kind="ep_alltoall")  # [R, h]
    counts_in = to_host(counts_in)  # [E sources, X/E experts]
    stats.rows_received += int(recv.shape[0])
    stats.rows_from_others += int(recv.shape[0] - to_host(recv_counts)[ep.rank])
    stats.rows_sent_away += int(send_counts.sum() - send_counts[ep.rank])

    # Compute: rows from each source arrive sorted by expert; regroup them by expert
    # with an order made on the host from the counts (no device sync per expert).
    local_expert = np.repeat(np.tile(np.arange(per_rank_experts), ep.size), counts_in.ravel())
    by_expert = xp.asarray(np.argsort(local_expert, kind="stable"))  # [R]
    out_rows = xp.empty_like(recv)
    out_rows[by_expert] = L.grouped_experts(xp, recv[by_expert], counts_in.sum(axis=0),
                                            block.experts)

    # Combine: rows come back in the order they were sent; a token's k rows are summed
    # with its router weights in float32 and rounded once.
    back, _ = alltoallv(ep, out_rows, recv_counts, kind="ep_alltoall")  # [n_s*k, h]
    unsorted = xp.empty_like(back)
    unsorted[order] = back
    ys = (unsorted.reshape(n_s, k, h).astype(np.float32, copy=False)
          * weights[:, :, None]).sum(axis=1).astype(x.dtype, copy=False)  # [n_s, h]

    if tp.size == 1:
        return ys
    counts = [len(split(n, tp.size, t)) * h for t in range(tp.size)]
    return ring_allgather(tp, xp.ascontiguousarray(ys).ravel(), counts=counts,
                          kind="tp_allgather").reshape(n, h)

