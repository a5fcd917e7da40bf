"""Time model: seconds of a forward, TTFT, TPOT and decode throughput of a layout.

Inputs: the work of one forward (``work.forward_matmuls``, ``work.attention_work``), the
exact bytes each rank sends (``traffic.predict_rank``, the ledger's own prediction, with
the EP rows of ``traffic.ep_rows_sent_away``) and a machine (``machine.Machine``:
machines/*.json, or this machine as ``mpipar.bench.machine.machine_figures`` measures it).
One rank of stage s, a forward of N tokens (its DP replica's):

  products   each (M rows, P weights): max(2*M*P / rate(M), P*b / read_bw) -- compute
             or weight read, whichever is slower (rate(M): the machine's matrix rate at
             M rows; a published machine has one peak rate for every M)
  attention  per sequence and layer: max(FLOPs / rate(rows), KV bytes / read_bw)
  all-reduce one of S bytes over n ranks (``comm.allreduce``): the ring sends 2(n-1)
             messages of S/n, recursive doubling (S <= RECURSIVE_DOUBLING_MAX_BYTES)
             log2(n) of S; time = messages * latency + bytes sent / bandwidth of the TP
             link (intra-node when the group is inside a node)
  EP         per MoE layer a count exchange and two Alltoallv of the predicted rows
             (each posts all its messages at once): 3 latencies + bytes / link;
             the layer waits for the busiest rank: its expected most hit experts
             (``work.experts_hit_busiest``) with rows * ``ep_imbalance``
  PP         a boundary carries N*h*b: latency + bytes / link (inter-node when the two
             stages sit on different nodes)

A stage's forward is the sum of its products, attention and collectives (a stage waits
for its all-reduces). Requests go to DP replicas by the placement rule
(``layout.offline_replicas``: all arrive at t=0); a replica's batch is its share.
Prefill in K chunks over P stages: chunk c finishes on stage s at
F[s][c] = max(F[s-1][c] + send, F[s][c-1]) + t[s][c]; TTFT = F[P-1][K-1] + the head's
logits of the last token. A decode step runs the stages in turn: TPOT = sum_s t[s] +
sends + the token ids back to stage 0. Throughput at the largest batch B the KV memory
allows keeps the pipeline full with P micro-batches of B/P: step = max(P * max_s t_s,
one micro-batch's round trip); tokens/s = dp * B / step.

Where ranks share a machine's memory, the figures depend on how many ranks work at once
(``Machine.at``): a decode step or an unchunked prefill keeps one stage's tp*dp ranks
busy, chunks or micro-batches all of them.
"""

from __future__ import annotations

import math
from collections import Counter

from ..comm import allreduce
from ..layout import offline_replicas
from ..parallel.shard import split, stage_layers
from .machine import Link, Machine
from .memory import rank_params
from .traffic import ep_rows_sent_away, predict_rank
from .work import attention_work, forward_matmuls


# ---- pieces -------------------------------------------------------------------------
def products_time(machine: Machine, products, itemsize: int) -> float:
    """Sum over (M, P, count) of count * max(2*M*P / rate(M), P*b / read bandwidth)."""
    return sum(k * max(2 * m * p / machine.rate(m), p * itemsize / machine.mem_read_Bps)
               for m, p, k in products)


def attention_time(machine: Machine, config, layout, new: int, cached: int,
                   itemsize: int) -> float:
    """One sequence, one layer: max(FLOPs / rate(query rows), KV bytes / read bw)."""
    if new <= 0:
        return 0.0
    flops, kv = attention_work(config, layout, new, cached, itemsize)
    return max(flops / machine.rate(new), kv / machine.mem_read_Bps)


def allreduce_time(link: Link, nbytes: int, n: int) -> float:
    """mpipar's all-reduce of ``nbytes`` over n ranks (comm/allreduce.py's choice of path)."""
    if n == 1 or nbytes == 0:
        return 0.0
    sent = allreduce.allreduce_bytes(nbytes, 1, n, 0)[0]
    small = allreduce.pick_algorithm("auto", nbytes) == "recursive_doubling"
    messages = sent / nbytes if small else 2 * (n - 1)
    return link.message(sent, messages)


def _node(layout, machine: Machine, pp: int) -> int:
    return layout.rank_of(tp=0, dp=0, pp=pp) // machine.gpus_per_node


def tp_link(layout, machine: Machine) -> Link:
    return machine.intra if layout.tp <= machine.gpus_per_node else machine.inter


def ep_link(layout, machine: Machine) -> Link:
    return machine.intra if layout.ep <= machine.gpus_per_node else machine.inter


def pp_link(layout, machine: Machine, stage: int) -> Link:
    """Link from ``stage`` to the next one."""
    same = _node(layout, machine, stage) == _node(layout, machine, stage + 1)
    return machine.intra if same else machine.inter


# ---- one forward on one rank ------------------------------------------------------------
def forward_time(machine: Machine, config, layout, stage: int, pieces: list, cached: list,
                 itemsize: int, logit_rows: int = 0, ep_imbalance: float = 1.0) -> dict:
    """Seconds of one stage's forward, by term. ``pieces[i]``: new tokens of sequence
    i (this replica's), ``cached[i]``: its tokens already in the KV cache."""
    n, h, t = sum(pieces), config.hidden_size, layout.tp
    layers = stage_layers(config.num_layers, layout.pp)[stage]
    prods = forward_matmuls(config, layout, stage, n, logit_rows)
    if layout.ep > 1 and "experts" in prods:  # the EP step waits for the most loaded rank
        m, p, k = prods["experts"]
        prods["experts"] = (m * ep_imbalance, p, k)
    out = {"products": products_time(machine, prods.values(), itemsize),
           "attention": len(layers) * sum(
               times * attention_time(machine, config, layout, q, c, itemsize)
               for (q, c), times in Counter(zip(pieces, cached, strict=True)).items()),
           "tp": 0.0, "ep": 0.0}
    moe = sum(1 for i in layers if config.is_moe_layer(i)) if layout.ep > 1 else 0
    if n == 0:
        out["total"] = sum(out.values())
        return out
    # Communication: the ledger's own prediction of this forward's bytes per kind, with
    # the rows EP sends away under uniform routing (each token once per rank it visits).
    rows = ep_rows_sent_away(len(split(n, t, 0)), config.num_experts_per_tok, layout.ep)
    pred = predict_rank(config, layout, {
        "coords": {"tp": 0, "pp": stage, "ep": 0}, "layers": [layers.start, layers.stop],
        "forward_tokens": [n], "n_seqs": 0, "decode_steps": 0, "dtype": itemsize,
        "rows_sent_away": rows * moe, "rows_from_others": rows * moe,
        "eplb_rebalances": 0, "eplb_copies_sent": 0, "eplb_copy_bytes": 0})
    if t > 1:
        per_call = allreduce.allreduce_bytes(n * h, itemsize, t, 0)[0]
        calls = (pred["tp_allreduce"] + pred["tp_embed"]) / per_call
        link = tp_link(layout, machine)
        out["tp"] = calls * allreduce_time(link, n * h * itemsize, t)
        if pred["tp_allgather"]:  # ring all-gather of the token shares: t-1 messages
            out["tp"] += link.message(pred["tp_allgather"], (t - 1) * moe)
    if moe:  # count exchange + dispatch + combine per layer (all peers at once)
        out["ep"] = ep_link(layout, machine).message(
            (pred["ep_dispatch"] + pred["ep_combine"]) / 2 * ep_imbalance, 3 * moe)
    out["total"] = sum(out.values())
    return out


def head_time(machine: Machine, config, layout, rows: int, itemsize: int) -> float:
    """Last stage: logits of ``rows`` rows on the vocab slice, and the argmax exchange
    (two ring all-gathers of ``rows`` values: 2(t-1) messages)."""
    p = rank_params(config, layout, layout.pp - 1)["lm_head"]
    comm = tp_link(layout, machine).message(2 * rows * 12 * (layout.tp - 1),
                                            2 * (layout.tp - 1)) if layout.tp > 1 else 0.0
    return products_time(machine, [(rows, p, 1)], itemsize) + comm


def pp_send_time(machine: Machine, config, layout, stage: int, tokens: int,
                 itemsize: int) -> float:
    if stage >= layout.pp - 1:
        return 0.0
    return pp_link(layout, machine, stage).message(tokens * config.hidden_size * itemsize)


# ---- TTFT, TPOT, throughput -----------------------------------------------------------
def replica_batch(batch: int, dp: int) -> int:
    """Sequences of the fullest DP replica when ``batch`` requests arrive at once
    (``layout.offline_replicas``, the placement rule)."""
    return max(Counter(offline_replicas(batch, dp)).values(), default=0)


def ttft(machine: Machine, config, layout, prompt_len: int, batch: int = 1, chunks: int = 1,
         itemsize: int = 2, ep_imbalance: float = 1.0) -> float:
    """Time to first token of ``batch`` prompts of ``prompt_len`` tokens in K chunks."""
    b = replica_batch(batch, layout.dp)
    P, K = layout.pp, chunks
    # In one piece the stages take turns; in chunks they work at once.
    machine = machine.at(layout.world if K > 1 else layout.tp * layout.dp)
    finish = [[0.0] * K for _ in range(P)]
    for c in range(K):
        part = split(prompt_len, K, c)
        pieces, cached = [len(part)] * b, [part.start] * b
        for s in range(P):
            t = forward_time(machine, config, layout, s, pieces, cached, itemsize,
                             ep_imbalance=ep_imbalance)["total"]
            ready = finish[s - 1][c] + pp_send_time(machine, config, layout, s - 1,
                                                    sum(pieces), itemsize) if s else 0.0
            finish[s][c] = max(ready, finish[s][c - 1] if c else 0.0) + t
    return finish[P - 1][K - 1] + head_time(machine, config, layout, b, itemsize)


def decode_step(machine: Machine, config, layout, batch: int, context: int,
                itemsize: int = 2, ep_imbalance: float = 1.0) -> dict:
    """One decode step of ``batch`` sequences (the replica's) at ``context`` cached
    tokens: per-stage times and the step's total (stages in turn, sends, ids back)."""
    stages = [forward_time(machine, config, layout, s, [1] * batch, [context] * batch,
                           itemsize, ep_imbalance=ep_imbalance)["total"]
              for s in range(layout.pp)]
    sends = sum(pp_send_time(machine, config, layout, s, batch, itemsize)
                for s in range(layout.pp - 1))
    back = 0.0
    if layout.pp > 1:  # the chosen ids, last stage -> stage 0
        same = _node(layout, machine, layout.pp - 1) == _node(layout, machine, 0)
        back = (machine.intra if same else machine.inter).message(8 * batch)
    head = head_time(machine, config, layout, batch, itemsize)
    return {"stages": stages, "total": sum(stages) + sends + back + head,
            "head": head, "comm": sends + back}


def tpot(machine: Machine, config, layout, batch: int, context: int, itemsize: int = 2,
         ep_imbalance: float = 1.0) -> float:
    """Time per output token; the stages take turns (one stage's ranks busy at once)."""
    return decode_step(machine.at(layout.tp * layout.dp), config, layout,
                       replica_batch(batch, layout.dp), context, itemsize,
                       ep_imbalance)["total"]


def throughput(machine: Machine, config, layout, batch: int, context: int,
               itemsize: int = 2, ep_imbalance: float = 1.0) -> float:
    """Decode tokens/s of the whole deployment at ``batch`` sequences per replica, the
    pipeline kept full by P micro-batches of batch/P (module docstring)."""
    if batch < 1:
        return 0.0
    P = layout.pp
    machine = machine.at(layout.world)
    micro = max(1, math.ceil(batch / P))
    one = decode_step(machine, config, layout, micro, context, itemsize, ep_imbalance)
    full = decode_step(machine, config, layout, batch, context, itemsize,
                       ep_imbalance)["total"]
    step = min(full, max(P * max(one["stages"]), one["total"])) if P > 1 else full
    return layout.dp * batch / step


def layout_times(machine: Machine, config, layout, kv_tokens: int, prompt_len: int,
                 batch: int, new_tokens: int, itemsize: int, chunks: int = 0,
                 ep_imbalance: float = 1.0) -> dict:
    """The planner's time columns of one layout: TTFT of ``batch`` prompts of
    ``prompt_len`` (in ``chunks`` chunks; 0: the best of 1, 2P, 4P, 8P), TPOT at
    ``batch`` (mean context prompt + new/2), the largest batch per replica whose KV
    cache (prompt + new tokens each) fits in ``kv_tokens``, and the tokens/s there."""
    P = layout.pp
    options = [chunks] if chunks else sorted({1, 2 * P, 4 * P, 8 * P} if P > 1 else {1})
    ttfts = {k: ttft(machine, config, layout, prompt_len, batch, k, itemsize, ep_imbalance)
             for k in options if k <= prompt_len}
    best = min(ttfts, key=ttfts.get)
    context = prompt_len + new_tokens
    max_batch = kv_tokens // context
    return {"ttft_s": ttfts[best], "prefill_chunks": best,
            "tpot_s": tpot(machine, config, layout, batch, prompt_len + new_tokens // 2,
                           itemsize, ep_imbalance),
            "max_batch": max_batch,
            "tokens_per_s": throughput(machine, config, layout, max_batch,
                                       prompt_len + new_tokens // 2, itemsize, ep_imbalance)}
