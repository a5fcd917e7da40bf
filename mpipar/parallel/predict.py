"""The bytes each rank should send in a run, from the cost model and the run's workload.

The workload of a rank is the list of its stage forwards (tokens N in each), its
sequences, and for EP the routing it saw. The engine's schedule per forward of N tokens
on a rank of stage s, TP rank t (h = hidden, b = bytes per element of the run's compute
dtype: 4 for float32, 2 for bfloat16/float16, which travel as 16 bits):

    tp_allreduce  2 per layer of N*h elements (1 in MoE layers with ep > 1)
    tp_allgather  1 per MoE layer with ep > 1: token shares split(N, T) * h
    tp_embed      stage 0: 1 all-reduce of N*h (vocab-parallel embedding)
    pp_send       stage s < P-1: N*h*b (one activation per boundary)
    ep_counts     8(E-1) per MoE layer (ep > 1) and forward: one int64 row count per peer
    ep_dispatch   token rows sent to other EP ranks * (h*b + 8k): one row per (token,
                  destination rank), with k (slot, weight) pairs (moe.py)
    ep_combine    rows returned to other ranks * h*b
    eplb_load     per rebalance: an all-reduce of [L_moe, X] int64 over the EP group
    eplb_weights  expert copies sent in rebalances * 3*h*m*b_weights (eplb.py)

Each collective's bytes come from the exact formula of the algorithm it takes
(``comm.allreduce.allreduce_bytes``): a prefill's all-reduce of S bytes goes by the ring,
2(T-1)/T * S up to chunk rounding; a decode step's (a few KiB, below
RECURSIVE_DOUBLING_MAX_BYTES) by recursive doubling, log2(T) * S for T a power of two.
Kinds the seed's model does not cover (tp_argmax, tp_logits, and the serving loop's step
plans and sampled tokens: control, result) are not predicted. The sampled tokens reach
stage 0 inside the next step's plan, so no token traffic runs inside a PP group.
"""

from __future__ import annotations

from ..comm.allreduce import allreduce_bytes
from ..costmodel import dtype_size
from .shard import split

PREDICTED_KINDS = ("tp_allreduce", "tp_allgather", "tp_embed", "pp_send",
                   "ep_counts", "ep_dispatch", "ep_combine", "eplb_load", "eplb_weights")


def allgather_bytes(chunk_bytes: list, rank: int) -> tuple[int, int]:
    """(sent, recv) of a ring all-gather: a rank forwards every chunk but its successor's
    (which it is the last to receive) and receives every chunk but its own."""
    n = len(chunk_bytes)
    if n == 1:
        return 0, 0
    total = sum(chunk_bytes)
    return total - chunk_bytes[(rank + 1) % n], total - chunk_bytes[rank]


def predict_rank(config, layout, r: dict) -> dict:
    """r: one rank's entry of ParallelModel.report() -> {kind: predicted sent bytes}."""
    co, h, b = r["coords"], config.hidden_size, dtype_size(r.get("dtype", "float32"))
    tp, t = layout.tp, co["tp"]
    layers = range(*r["layers"])
    moe_ep = sum(1 for i in layers if config.is_moe_layer(i)) if layout.ep > 1 else 0
    out = dict.fromkeys(PREDICTED_KINDS, 0)
    for n in r["forward_tokens"]:
        if tp > 1:
            ar = allreduce_bytes(n * h, b, tp, t)[0]
            out["tp_allreduce"] += (2 * len(layers) - moe_ep) * ar
            if co["pp"] == 0:
                out["tp_embed"] += ar
            shares = [len(split(n, tp, i)) * h * b for i in range(tp)]
            out["tp_allgather"] += moe_ep * allgather_bytes(shares, t)[0]
        if co["pp"] < layout.pp - 1:
            out["pp_send"] += n * h * b
    if moe_ep:
        e, k = layout.ep, config.num_experts_per_tok
        out["ep_counts"] = 8 * (e - 1) * moe_ep * len(r["forward_tokens"])
        out["ep_dispatch"] = r["rows_sent_away"] * (h * b + 8 * k)
        out["ep_combine"] = r["rows_from_others"] * h * b
        out["eplb_load"] = r["eplb_rebalances"] * allreduce_bytes(
            moe_ep * config.num_experts, 8, e, co["ep"])[0]
        out["eplb_weights"] = r["eplb_copies_sent"] * r["eplb_copy_bytes"]
    return out
