"""Traffic: the bytes between ranks -- the seed's formulas, and the exact per-rank
prediction of a run that the ledger is checked against.

Notation as in memory.py (h hidden, b bytes per element, L layers, KV kv heads, d
head_dim, k experts per token; tp = t, pp = p, ep = l).

Seed formulas (ring algorithms; every rank sends and receives the same amount):
  all-reduce of S bytes over n ranks: reduce-scatter + all-gather, each rank sends
  2(n-1)/n*S and receives as much, 4(n-1)/n*S in all (``allreduce_bytes_seed``).
  TP: two all-reduces of the activation [tokens, h] per layer (after o_proj and after
  down_proj), so per token over k layers: sent = recv = 4k(n-1)h*b/n, the seed's
  8k(n-1)h/n elements of traffic (sent + received). (mpipar's all-reduce sends small
  messages, such as one decode token, by recursive doubling instead: log2(n)*S per rank;
  ``exact_allreduce_sent(..., algorithm="auto")`` gives what it really moves.)
  PP: one activation [tokens, h] per stage boundary: (p-1)*h*b per token for the whole
  pipeline; a rank of stage s sends h*b (s < p-1) and receives h*b (s > 0).
  EP, the seed's "top_k*h/l per token": the T tokens of an EP group spread evenly over
  its l ranks; each rank dispatches its T/l tokens, each copied to k experts: k*h*b/l
  per group token per rank in dispatch, the same back in combine
  (``ep_bytes_per_token_seed``, self-copies included, one row per (token, expert)).

What the engine's EP really sends (parallel/moe.py): a token goes ONCE to each rank
that holds at least one of its k chosen experts, as one row of h*b + 8k bytes (the
activation plus k (slot int32, weight float32) pairs); combine returns h*b per row;
rows a rank keeps for itself move nothing (``ep_row_bytes``, ``ep_alltoall_bytes``).
Under uniform routing each of a token's k picks lands on a given rank with probability
1/l (taken independently), so a token is sent to (l-1) * (1 - (1 - 1/l)**k) other
ranks on average (``ep_rows_sent_away``); 0 at l = 1.

KV handoff (prefill/decode disaggregation, kind ``kv_transfer``): every layer's keys and
values of the P prompt tokens move once from the prefill group to each decode rank that
holds them: memory.kv_bytes(L, KV, d, P, b) = 2 * L * KV * d * P * b per request (times
max(1, t_decode/KV) when the decode TP replicates kv heads); ``parallel/reshard.py``
splits it into sender/receiver pieces, ``piece_bytes_by_rank`` adds them up.

The exact prediction (``predict_rank``) of one rank's run, from its workload (its stage
forwards of N tokens each, its sequences, and for EP the rows it measured), per forward
on a rank of stage s, TP rank t (b: the run's compute dtype, 16-bit floats travel as 16
bits):

    tp_allreduce  2 per layer of N*h elements (1 in MoE layers with ep > 1)
    tp_allgather  1 per MoE layer with ep > 1: token shares split(N, t) * h
    tp_embed      stage 0: 1 all-reduce of N*h (vocab-parallel embedding)
    pp_send       stage s < p-1: N*h*b (one activation per boundary)
    ep_counts     8(l-1) per MoE layer (ep > 1) and forward: one int64 row count per peer
    ep_dispatch   rows sent to other EP ranks * (h*b + 8k)
    ep_combine    rows returned to other ranks * h*b
    eplb_load     per rebalance: an all-reduce of [L_moe, E] int64 over the EP group
    eplb_weights  expert copies sent in rebalances * 3*h*m*b_weights (eplb.py)

Each collective's bytes come from the exact formula of the algorithm it takes
(``comm.allreduce.allreduce_bytes``): a prefill's all-reduce of S bytes goes by the ring,
2(t-1)/t * S up to chunk rounding; a decode step's (a few KiB, up to
``comm.allreduce.RECURSIVE_DOUBLING_MAX_BYTES``) by recursive doubling, log2(t) * S for t a
power of two. Kinds the seed's model does not cover (tp_argmax, tp_logits, and the
serving loop's Steps and sampled tokens: control, result) are not predicted. The
sampled tokens reach stage 0 inside the next Step, so no token traffic runs
inside a PP group. (comm.allreduce is imported where it is used: the planner starts no MPI.)
"""

from __future__ import annotations

from typing import NamedTuple

from ..comm.dtypes import dtype_size
from ..parallel.shard import split, stage_layers
from .memory import kv_bytes


class Traffic(NamedTuple):
    """Bytes one rank sends and receives (per token, per call: as the function says)."""
    sent: float
    recv: float

    @property
    def total(self) -> float:
        return self.sent + self.recv

    def __add__(self, other):  # element-wise, unlike tuple concatenation
        return Traffic(self.sent + other.sent, self.recv + other.recv)

    def scale(self, f: float) -> Traffic:
        return Traffic(self.sent * f, self.recv * f)


# ---- the seed's formulas ------------------------------------------------------------------
def allreduce_bytes_seed(nbytes: float, n: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``nbytes``: 2(n-1)/n * S (recv equal)."""
    return 2 * (n - 1) / n * nbytes


def allgather_bytes_seed(nbytes: float, n: int) -> float:
    """Bytes one rank sends in a ring all-gather whose result is ``nbytes``: (n-1)/n * S."""
    return (n - 1) / n * nbytes


def tp_bytes_per_token(hidden: int, tp: int, layers: int, dtype_bytes,
                       allreduces_per_layer: int = 2) -> Traffic:
    """Per token per TP rank over ``layers`` layers: 2 all-reduces of h each per layer,
    sent = recv = 2*layers*2(tp-1)/tp*h*b; sent + recv = 8*layers*(tp-1)*h*b/tp."""
    s = allreduces_per_layer * layers * allreduce_bytes_seed(hidden * dtype_size(dtype_bytes),
                                                             tp)
    return Traffic(s, s)


def pp_bytes_per_token(hidden: int, pp: int, dtype_bytes, stage: int | None = None) -> Traffic:
    """Activation bytes per token. ``stage`` None: the seed's whole-pipeline total
    (pp-1)*h*b sent (and received); stage s: one rank of it, sends h*b unless last,
    receives h*b unless first. (Decode's token id travelling back is not counted.)"""
    a = hidden * dtype_size(dtype_bytes)
    if stage is None:
        return Traffic((pp - 1) * a, (pp - 1) * a)
    return Traffic(a if stage < pp - 1 else 0, a if stage > 0 else 0)


def ep_bytes_per_token_seed(top_k: int, hidden: int, ep: int, dtype_bytes) -> Traffic:
    """The seed's top_k*h*b/l: bytes one rank sends (and receives) in ONE all-to-all
    (dispatch; combine is the same again) per token of its EP group, self-copies included.
    0 when ep == 1 (no all-to-all)."""
    if ep == 1:
        return Traffic(0, 0)
    s = top_k * hidden * dtype_size(dtype_bytes) / ep
    return Traffic(s, s)


def seed_bytes_by_kind(config, layout, dtype_bytes, stage: int) -> dict:
    """The seed's bytes SENT per token of this rank's attention (DP) replica, one rank of
    ``stage``, by ledger kind (received: the same, but pp: see ``pp_bytes_per_token``).

    tp_allreduce: 2 all-reduces per layer; on an MoE layer with ep > 1 the experts' output
    is not all-reduced: each TP rank dispatches a disjoint 1/tp share of the (replicated)
    tokens and the shares are all-gathered back (tp_allgather, (tp-1)/tp*h*b sent).
    pp_send: ``pp_bytes_per_token``. ep_dispatch and ep_combine: per MoE layer,
    top_k*h*b/tp each (= top_k*h*b/l per token of the EP group, which holds l/tp
    replicas' worth of tokens; one row per (token, expert) pair, before dedupe).
    """
    c, t = config, layout.tp
    a = c.hidden_size * dtype_size(dtype_bytes)
    layers = stage_layers(c.num_layers, layout.pp)[stage]
    n_moe = sum(1 for i in layers if c.is_moe_layer(i)) if layout.ep > 1 else 0
    out = {"tp_allreduce": (2 * len(layers) - n_moe) * allreduce_bytes_seed(a, t),
           "tp_allgather": n_moe * allgather_bytes_seed(a, t),
           "pp_send": pp_bytes_per_token(c.hidden_size, layout.pp, dtype_bytes, stage).sent,
           "ep_dispatch": 0.0, "ep_combine": 0.0}
    if n_moe:
        per = ep_bytes_per_token_seed(c.num_experts_per_tok, c.hidden_size, layout.ep,
                                      dtype_bytes).sent
        out["ep_dispatch"] = out["ep_combine"] = n_moe * per * layout.ep / t
    return out


def comm_per_token(config, layout, dtype_bytes, stage: int) -> dict:
    """Seed traffic per token, one rank of ``stage``: {"tp", "pp", "ep": Traffic}
    (``seed_bytes_by_kind``, tp all-reduce and all-gather together)."""
    k = seed_bytes_by_kind(config, layout, dtype_bytes, stage)
    tp = k["tp_allreduce"] + k["tp_allgather"]
    return {"tp": Traffic(tp, tp),
            "pp": pp_bytes_per_token(config.hidden_size, layout.pp, dtype_bytes, stage),
            "ep": Traffic(*(2 * [k["ep_dispatch"] + k["ep_combine"]]))}


# ---- what the engine sends ----------------------------------------------------------------
def exact_allreduce_sent(n_elems: int, itemsize: int, n: int, rank: int,
                         algorithm: str = "ring") -> Traffic:
    """Bytes ``rank`` sends/receives in mpipar's all-reduce of n_elems, exactly.

    "ring" (default, the seed's algorithm): chunk rounding included, equal to
    ``allreduce_bytes_seed`` when n divides n_elems. "auto" / "recursive_doubling": what
    ``ring_allreduce(algorithm=...)`` really does -- messages up to
    ``comm.allreduce.RECURSIVE_DOUBLING_MAX_BYTES`` (one decode token's activation) go by
    recursive doubling, log2(n)*S per rank for n a power of two, not 2(n-1)/n*S.
    Delegates to mpipar.comm.ring.
    """
    from ..comm.allreduce import allreduce_bytes
    sent, recv = allreduce_bytes(n_elems, itemsize, n, rank, algorithm)
    return Traffic(sent, recv)


def allgather_bytes(chunk_bytes: list, rank: int) -> tuple[int, int]:
    """(sent, recv) of a ring all-gather: a rank forwards every chunk but its successor's
    (which it is the last to receive) and receives every chunk but its own."""
    n = len(chunk_bytes)
    if n == 1:
        return 0, 0
    total = sum(chunk_bytes)
    return total - chunk_bytes[(rank + 1) % n], total - chunk_bytes[rank]


def ep_row_bytes(hidden: int, itemsize, top_k: int) -> tuple[int, int]:
    """(dispatch, combine) bytes of one EP row: h*b + 8k (k slot/weight pairs), h*b."""
    a = hidden * dtype_size(itemsize)
    return a + 8 * top_k, a


def ep_rows_sent_away(tokens: float, top_k: int, ep: int) -> float:
    """Expected rows a rank dispatches to other EP ranks for ``tokens`` tokens of its own
    under uniform routing: tokens * (l-1) * (1 - (1 - 1/l)**k) (module docstring)."""
    return tokens * (ep - 1) * (1 - (1 - 1 / ep) ** top_k)


def ep_alltoall_bytes(counts, rank: int, hidden: int, itemsize, top_k: int) -> dict:
    """Exact bytes of one rank's dispatch and combine from measured routing.

    ``counts[src][dst]``: rows (tokens, once per destination rank) rank src sends rank
    dst in dispatch. Dispatch: sent = sum_{dst != rank} counts[rank][dst] * (h*b + 8k),
    recv = sum_{src != rank} counts[src][rank] * (h*b + 8k); combine returns each row as
    h*b, the other way. Rows a rank keeps for itself move nothing.
    """
    n = len(counts)
    out = sum(int(counts[rank][j]) for j in range(n) if j != rank)
    inc = sum(int(counts[i][rank]) for i in range(n) if i != rank)
    disp, comb = ep_row_bytes(hidden, itemsize, top_k)
    return {"dispatch": Traffic(out * disp, inc * disp),
            "combine": Traffic(inc * comb, out * comb)}


PREDICTED_KINDS = ("tp_allreduce", "tp_allgather", "tp_embed", "pp_send",
                   "ep_counts", "ep_dispatch", "ep_combine", "eplb_load", "eplb_weights")


def predict_rank(config, layout, r: dict) -> dict:
    """r: one rank's entry of ParallelModel.report() -> {kind: predicted sent bytes}."""
    from ..comm.allreduce import allreduce_bytes
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
        disp, comb = ep_row_bytes(h, b, k)
        out["ep_counts"] = 8 * (e - 1) * moe_ep * len(r["forward_tokens"])
        out["ep_dispatch"] = r["rows_sent_away"] * disp
        out["ep_combine"] = r["rows_from_others"] * comb
        out["eplb_load"] = r["eplb_rebalances"] * allreduce_bytes(
            moe_ep * config.num_experts, 8, e, co["ep"])[0]
        out["eplb_weights"] = r["eplb_copies_sent"] * r["eplb_copy_bytes"]
    return out


def piece_bytes_by_rank(pieces, config, prompt_tokens: int, itemsize) -> dict:
    """{world rank: [sent, received]} of one request's KV handoff pieces
    (``parallel.reshard.kv_pieces``): each moves kv_bytes of its layers and heads."""
    out: dict[int, list[int]] = {}
    for p in pieces:
        n = kv_bytes(len(p.layers), len(p.heads), config.head_dim, prompt_tokens, itemsize)
        out.setdefault(p.src, [0, 0])[0] += n
        out.setdefault(p.dst, [0, 0])[1] += n
    return out
