"""The bytes each rank should send in a run, from the cost model and the run's workload.

The workload of a rank is the list of its stage forwards (tokens N in each), its
sequences, and for EP the routing it saw. The engine's schedule per forward of N tokens
on a rank of stage s, TP rank t (h = hidden, b = bytes per element):

    tp_allreduce  2 per layer of N*h elements (1 in MoE layers with ep > 1)
    tp_allgather  1 per MoE layer with ep > 1: token shares split(N, T) * h
    tp_embed      stage 0: 1 all-reduce of N*h (vocab-parallel embedding)
    pp_send       stage s < P-1: N*h*b (one activation per boundary)
    ep_alltoall   (rows dispatched to other ranks + rows returned to other ranks) * h*b

Each collective's bytes come from the algorithm's exact formula (``comm.ring``:
2(T-1)/T of the buffer for the ring, up to chunk rounding). Kinds the seed's model does
not cover (tp_argmax, tp_logits, ep_counts, and the serving loop's step plans and
sampled tokens: control, result) are not predicted. The sampled tokens reach stage 0
inside the next step's plan, so no token traffic runs inside a PP group.
"""

from __future__ import annotations

from ..comm.ring import allreduce_bytes
from .shard import split

PREDICTED_KINDS = ("tp_allreduce", "tp_allgather", "tp_embed", "pp_send", "ep_alltoall")
ITEMSIZE = 4  # activations travel as float32


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
    co, h, b = r["coords"], config.hidden_size, ITEMSIZE
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
    if layout.ep > 1:
        out["ep_alltoall"] = (r["rows_sent_away"] + r["rows_from_others"]) * h * b
    return out
