"""KV re-shard rule of the prefill -> decode handoff: who sends whom which layers and heads.

A prefill group (layout tp=T1, pp=P1, world ranks ``prefill_base + r``) holds a prompt's
keys and values split by layer over its stages and by kv head over its TP ranks
(shard.py). A decode replica d of the decode group (layout tp=T2, dp=D2, pp=1, world
ranks ``decode_base + r``) holds every layer and, on TP rank t2, the kv heads of its
slice. The rule, for every decode rank t2 of replica d, every prefill stage s and every
kv head h that t2 holds:

    the sender is the prefill rank of stage s that holds h; when T1 > Hkv, h lives on
    T1/Hkv TP ranks and only the first of them (tp = h * T1/Hkv) sends: a replicated
    head moves once, not once per replica.

Consecutive heads from one sender to one receiver form one ``Piece`` (one message): the
layers of stage s, heads [h0, h1). A decode rank that replicates a head (T2 > Hkv) gets
its own copy, so the bytes of one request of P prompt tokens are, over all pieces,

    2 * L * Hkv * D * P * b * dup2        dup2 = max(1, T2/Hkv)

and a piece moves the KV bytes of its layers and heads (``cost.memory.kv_bytes``; the
bytes per rank of a request: ``cost.traffic.piece_bytes_by_rank``). This module holds
the geometry only. A pure module: no MPI.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layout import Layout
from .shard import kv_replication, rank_shard, split, stage_layers


@dataclass(frozen=True)
class Piece:
    src: int  # world rank of the prefill sender
    dst: int  # world rank of the decode receiver
    layers: range  # global layer indices (one prefill stage)
    heads: range  # global kv heads


def holder_tp(config, tp: int, head: int) -> int:
    """The first TP rank of a tp-way split that holds kv ``head`` (shard.rank_shard's rule)."""
    rep = kv_replication(config, tp)
    if rep > 1:
        return head * rep
    return next(t for t in range(tp) if head in split(config.num_kv_heads, tp, t))


def kv_pieces(config, prefill, decode, replica: int, prefill_base: int,
              decode_base: int) -> list[Piece]:
    """Every Piece of one request handed from the prefill group to decode ``replica``."""
    pieces = []
    for t2 in range(decode.tp):
        dst = decode_base + decode.rank_of(tp=t2, dp=replica)
        mine = rank_shard(config, Layout(tp=decode.tp), t2).kv_heads
        for s, layers in enumerate(stage_layers(config.num_layers, prefill.pp)):
            runs: list[list] = []  # [src, first head, last head]
            for h in mine:
                src = prefill_base + prefill.rank_of(tp=holder_tp(config, prefill.tp, h), pp=s)
                if runs and runs[-1][0] == src and runs[-1][2] == h - 1:
                    runs[-1][2] = h
                else:
                    runs.append([src, h, h])
            pieces += [Piece(src, dst, layers, range(a, b + 1)) for src, a, b in runs]
    return pieces

