"""Tensor parallelism (Megatron): one decoder block split over the T ranks of a TP group.

What is split (rank t holds):
    q_proj, k_proj, v_proj   rows of its heads          [Hq_l*D, h], [Hkv_l*D, h]  column-parallel
    o_proj                   columns of its heads       [h, Hq_l*D]                row-parallel
    gate_proj, up_proj       rows of its intermediate   [I_l, h]                   column-parallel
    down_proj                columns of it              [h, I_l]                   row-parallel
    norms, router            whole (replicated)
    biases                   sliced with their weight's output rows: q/k/v biases like
                             q/k/v rows (a replicated kv head's k/v bias is replicated
                             with it), gate/up biases like gate/up rows; the o_proj and
                             down_proj biases [h] whole on every rank

Biases of the row-parallel o_proj and down_proj are added ONCE, after the all-reduce,
on every rank: each rank's partial sum leaves ``layers.attention`` / ``layers.swiglu``
without it (they skip a bias that is None), the all-reduce makes the sum whole and
identical on every rank, and every rank adds the same bias to it. Added before the
all-reduce it would be counted T times; added on one rank only it would make ranks'
code differ for nothing. Every rank keeping its replica of the residual stream
identical is what the next layer's column-parallel input needs.

What moves: the row-parallel o_proj and down_proj each leave a partial sum [N, h] on
every rank; one all-reduce each makes it whole. Two all-reduces per block, each of
S = N*h*itemsize bytes. A prefill's (S above 256 KiB) takes the ring: a rank sends
2(T-1)/T * S. A decode step's (one token a sequence: a few KiB) takes recursive doubling,
latency-bound: a rank sends log2(T) * S for T a power of two, not 2(T-1)/T * S
(``comm.allreduce``: ``auto`` and ``allreduce_bytes``).

A sparse layer's MLP is an ``MoE`` (moe.py: router, experts, dispatch, combine); with
expert parallelism (ep > 1) it ends with an all-gather of token shares instead of the
second all-reduce.

Vocab-parallel embedding and lm_head: rank t holds rows ``vocab chunk t``. Embedding:
look up the ids it holds, zeros elsewhere, one all-reduce (kind ``tp_embed``). Head:
each rank computes logits of its rows; greedy decoding needs only the (max, argmax) of
each rank (kind ``tp_argmax``); full logits are all-gathered only when asked
(kind ``tp_logits``).
"""

from __future__ import annotations

import numpy as np

from ..backend import to_host
from ..comm.allreduce import ring_allreduce
from ..comm.ring import ring_allgather
from ..model import layers as L
from ..model.layers import layer_prefix
from .moe import MoE
from .shard import split


def allreduce(tp, x, kind=None):
    """Sum partial results over the TP group (a no-op for one rank)."""
    if tp.size == 1:
        return x
    return ring_allreduce(tp, x, kind=kind)


def add_bias(x, b):
    """x + b once the row-parallel sum is whole (b None: no bias)."""
    return x if b is None else x + b


class TPBlock:
    """One decoder layer, holding this rank's slice (see RankShard)."""

    def __init__(self, source, config, shard, layer: int, comms, xp, dtype=np.float32,
                 slot_expert=None):
        """``slot_expert``: the layer's first expert placement when ep > 1 (eplb.py)."""
        self.config, self.shard, self.layer, self.comms, self.xp = config, shard, layer, comms, xp
        self.dtype = dtype  # weights, activations and KV cache (model/layers.py)
        d, p = config.head_dim, layer_prefix(layer)

        def read(name, index=None):
            return L.linear_weight(xp, source.read(p + name, index, dtype=dtype))

        def maybe(name, present, index=None):
            return read(name, index) if present else None

        all_cols = slice(None)
        q = slice(shard.q_heads.start * d, shard.q_heads.stop * d)
        kv = slice(shard.kv_heads.start * d, shard.kv_heads.stop * d)
        self.norm1 = read("input_layernorm.weight")
        self.norm2 = read("post_attention_layernorm.weight")
        a = "self_attn."
        self.attn = L.AttentionWeights(
            read(a + "q_proj.weight", (q, all_cols)),
            read(a + "k_proj.weight", (kv, all_cols)),
            read(a + "v_proj.weight", (kv, all_cols)),
            read(a + "o_proj.weight", (all_cols, q)),
            q_norm=maybe(a + "q_norm.weight", config.qk_norm),
            k_norm=maybe(a + "k_norm.weight", config.qk_norm),
            q_bias=maybe(a + "q_proj.bias", config.qkv_bias, q),
            k_bias=maybe(a + "k_proj.bias", config.qkv_bias, kv),
            v_bias=maybe(a + "v_proj.bias", config.qkv_bias, kv))  # o_bias: after all-reduce
        self.o_bias = maybe(a + "o_proj.bias", config.o_bias)
        self.moe = MoE(source, config, shard, layer, comms, xp, slot_expert, dtype) \
            if config.is_moe_layer(layer) else None
        if self.moe is None:
            i = slice(shard.inter.start, shard.inter.stop)
            self.mlp = (read("mlp.gate_proj.weight", (i, all_cols)),
                        read("mlp.up_proj.weight", (i, all_cols)),
                        read("mlp.down_proj.weight", (all_cols, i)))
            self.mlp_bias = (read("mlp.gate_proj.bias", i), read("mlp.up_proj.bias", i),
                             None) if config.mlp_bias else None  # down: after all-reduce
            self.down_bias = maybe("mlp.down_proj.bias", config.mlp_bias)

    def new_cache(self, capacity: int):
        return L.KVCache(self.xp, capacity, len(self.shard.kv_heads), self.config.head_dim,
                         self.dtype)

    def forward(self, x, caches, segments, stats):
        """x [N, h] (identical on every TP rank) -> [N, h]; appends to caches."""
        c, xp, tp = self.config, self.xp, self.comms.tp
        ledger = self.comms.ledger
        with ledger.span("attention"):
            h = L.rms_norm(xp, x, self.norm1, c.rms_norm_eps)
            a = L.attention(xp, h, self.attn, caches, segments, c.head_dim, c.rms_norm_eps,
                            c.rope_theta, c.rope_scaling_dict)  # [N, h] partial over heads
        x = x + add_bias(allreduce(tp, a), self.o_bias)
        with ledger.span("mlp"):
            h = L.rms_norm(xp, x, self.norm2, c.rms_norm_eps)
            if self.moe is None:
                y = allreduce(tp, L.swiglu(xp, h, *self.mlp, self.mlp_bias))
                return x + add_bias(y, self.down_bias)
            return x + self.moe.forward(h, stats)


class VocabParallelHead:
    """Embedding rows and lm_head rows of this rank's vocab chunk."""

    def __init__(self, source, config, shard, comms, xp, embed: bool, head: bool,
                 dtype=np.float32):
        self.config, self.shard, self.comms, self.xp = config, shard, comms, xp
        rows = (slice(shard.vocab.start, shard.vocab.stop), slice(None))
        self.embed = (xp.asarray(source.read("model.embed_tokens.weight", rows, dtype=dtype))
                      if embed else None)
        if head:
            self.norm = xp.asarray(source.read("model.norm.weight", dtype=dtype))
            self.lm_head = L.linear_weight(
                xp, source.read("lm_head.weight", rows, dtype=dtype))  # [V_l, h]
        self.counts = [len(split(config.vocab_size, comms.tp.size, t))  # V_t of each rank
                       for t in range(comms.tp.size)]

    def embed_tokens(self, ids):
        """ids [N] int (host) -> [N, h], summed over the TP group."""
        xp, v = self.xp, self.shard.vocab
        ids = xp.asarray(ids)
        mine = (ids >= v.start) & (ids < v.stop)
        local = xp.where(mine, ids - v.start, 0)
        x = self.embed[local] * mine[:, None].astype(self.embed.dtype)
        return allreduce(self.comms.tp, x, kind="tp_embed")

    def local_logits(self, x):
        """x [N, h] (pre final norm) -> this rank's logits [N, V_l] in the model's dtype."""
        h = L.rms_norm(self.xp, x, self.norm, self.config.rms_norm_eps)
        return L.matmul(self.xp, h, self.lm_head.T)

    def full_logits(self, local):
        """[N, V_l] -> [N, V] on every TP rank (host float32)."""
        tp, xp = self.comms.tp, self.xp
        n = local.shape[0]
        if tp.size == 1:
            return to_host(local).astype(np.float32, copy=False)
        flat = ring_allgather(tp, xp.ascontiguousarray(local).ravel(),
                              counts=[n * c for c in self.counts], kind="tp_logits")
        flat = to_host(flat).astype(np.float32, copy=False)
        parts, start = [], 0
        for c in self.counts:
            parts.append(flat[start:start + n * c].reshape(n, c))
            start += n * c
        return np.concatenate(parts, axis=1)

    def argmax(self, local):
        """Greedy token of each row [N] without gathering the logits (lowest id on ties)."""
        tp, xp = self.comms.tp, self.xp
        local = local.astype(np.float32, copy=False)  # exact: 16-bit values fit float32
        idx = xp.argmax(local, axis=1)
        best = to_host(xp.take_along_axis(local, idx[:, None], axis=1)[:, 0]).astype(np.float32)
        ids = to_host(idx).astype(np.int64) + self.shard.vocab.start
        if tp.size == 1:
            return ids
        n = best.shape[0]
        vals = to_host(ring_allgather(tp, xp.asarray(best), kind="tp_argmax")).reshape(tp.size, n)
        cand = to_host(ring_allgather(tp, xp.asarray(ids), kind="tp_argmax")).reshape(tp.size, n)
        winner = np.argmax(vals, axis=0)  # first rank with the max: lowest vocab id
        return cand[winner, np.arange(n)]

