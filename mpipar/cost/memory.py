"""Memory per rank: parameters, weight bytes and KV-cache bytes, as pure functions.

Notation: h hidden size, b bytes per element, L layers, H query heads, KV kv heads, d
head_dim, V vocab, I dense intermediate, E experts, k experts per token (top_k), m
moe_intermediate; layout tp = t, pp = p, dp, ep = l.  "GB" is 1e9 bytes (the seed's
80 - 235*2/8 = 21.25 uses decimal units throughout).

Parameters (biases and q/k norms only where the config's switches say: model/config.py):
  attention/layer = h*H*d (q) + 2*h*KV*d (k, v) + H*d*h (o) + 2*d (q_norm, k_norm: qk_norm)
                    + (H + 2*KV)*d (q, k, v biases: qkv_bias) + h (o bias: o_bias)
  dense MLP/layer = 3*h*I (+ 2*I + h: mlp_bias)        MoE/layer = E*3*h*m (experts) + E*h (router)
  norms/layer = 2*h;  embedding = V*h;  lm_head = V*h unless tied;  final norm = h
  active per token: the same with k instead of E experts (router, embedding included).

Weights per rank (the stage's layers; the tp rank holding the most):
  layers: contiguous stages, the first L % p stages get one more (``shard.stage_layers``);
  q, o: H/t heads; k, v: max(KV/t, 1) heads (``shard.kv_heads_per_rank``) -- when t > KV
  each kv head is replicated on t/KV ranks (``shard.kv_replication``); dense MLP:
  ceil(I/t) columns; experts: l > 1: E/l whole experts; l = 1: all E, each with
  ceil(m/t) columns; q/k/v and gate/up biases: sliced with their rows (H/t, max(KV/t, 1)
  heads, ceil(I/t)); o and down biases [h], router, norms, q/k norms: replicated;
  embedding (stage 0) and lm_head (last stage): vocab-parallel, ceil(V/t) rows; a tied
  lm_head costs a second copy only when p > 1.

KV bytes of ``layers`` layers, ``kv_heads`` heads and ``tokens`` positions (``kv_bytes``,
the one formula: the cache, the handoff, attention's read):
  2 (k and v) * layers * kv_heads * d * tokens * b
KV cache per rank per token: kv_bytes(layers of the stage, max(KV/t, 1), tokens=1).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..comm.dtypes import dtype_size
from ..parallel.shard import check_layout, kv_heads_per_rank, split, stage_layers


@dataclass(frozen=True)
class ParamCounts:
    attention: int  # one layer: q, k, v, o (+ biases, q_norm, k_norm where present)
    layer_norms: int  # one layer: input + post-attention RMSNorm
    dense_mlp: int  # one dense layer: gate, up, down (+ their biases)
    expert: int  # one expert: gate, up, down
    router: int  # one MoE layer: gate [E, h]
    per_layer: tuple  # total of each layer
    embedding: int
    lm_head: int  # 0 when tied (shares the embedding)
    final_norm: int
    experts: int  # all experts of all layers
    total: int
    active: int  # per token: k experts per MoE layer instead of E

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.lm_head


def param_counts(config) -> ParamCounts:
    """Parameter counts of a config (formulas in the module docstring)."""
    c = config
    h, d = c.hidden_size, c.head_dim
    attn = (h * c.num_heads * d + 2 * h * c.num_kv_heads * d + c.num_heads * d * h
            + 2 * d * c.qk_norm + (c.num_heads + 2 * c.num_kv_heads) * d * c.qkv_bias
            + h * c.o_bias)
    dense = 3 * h * c.intermediate_size + (2 * c.intermediate_size + h) * c.mlp_bias
    expert = 3 * h * c.moe_intermediate_size
    router = c.num_experts * h
    per_layer, experts, inactive = [], 0, 0
    for i in range(c.num_layers):
        if c.is_moe_layer(i):
            per_layer.append(attn + 2 * h + router + c.num_experts * expert)
            experts += c.num_experts * expert
            inactive += (c.num_experts - c.num_experts_per_tok) * expert
        else:
            per_layer.append(attn + 2 * h + dense)
    emb = c.vocab_size * h
    head = 0 if c.tie_word_embeddings else emb
    total = sum(per_layer) + emb + head + h
    return ParamCounts(attn, 2 * h, dense, expert, router, tuple(per_layer), emb, head, h,
                       experts, total, total - inactive)


def _ceil(a: int, b: int) -> int:
    """Items of the fullest of b parts (part 0 of ``split``, the one chunking rule)."""
    return len(split(a, b, 0))


def rank_params(config, layout, stage: int) -> dict:
    """Parameters held by the fullest rank of ``stage``, by component (module docstring)."""
    c, t = config, layout.tp
    h, d = c.hidden_size, c.head_dim
    check_layout(c, layout)
    layers = stage_layers(c.num_layers, layout.pp)[stage]
    last = stage == layout.pp - 1
    hq, hkv = c.num_heads // t, kv_heads_per_rank(c, t)
    out = dict(attention=0, norms=0, dense_mlp=0, router=0, experts=0, embedding=0,
               lm_head=0)
    for i in layers:
        out["attention"] += (2 * h * hq * d + 2 * h * hkv * d
                             + (hq + 2 * hkv) * d * c.qkv_bias + h * c.o_bias)
        out["norms"] += 2 * h + 2 * d * c.qk_norm
        if c.is_moe_layer(i):
            out["router"] += c.num_experts * h
            if layout.ep > 1:
                out["experts"] += c.num_experts // layout.ep * 3 * h * c.moe_intermediate_size
            else:
                out["experts"] += c.num_experts * 3 * h * _ceil(c.moe_intermediate_size, t)
        else:
            inter = _ceil(c.intermediate_size, t)
            out["dense_mlp"] += 3 * h * inter + (2 * inter + h) * c.mlp_bias
    rows = _ceil(c.vocab_size, t) * h
    if stage == 0:
        out["embedding"] = rows
    if last:
        out["norms"] += h
        if not c.tie_word_embeddings or layout.pp > 1:
            out["lm_head"] = rows
    return out


def weight_bytes_per_rank(config, layout, dtype_bytes, stage: int | None = None) -> int:
    """Weight bytes of the fullest rank of ``stage`` (None: of the fullest stage)."""
    b = dtype_size(dtype_bytes)
    stages = range(layout.pp) if stage is None else [stage]
    return max(sum(rank_params(config, layout, s).values()) for s in stages) * b


def kv_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, itemsize) -> int:
    """Bytes of keys and values of ``layers`` layers, ``kv_heads`` heads, ``tokens``
    positions: 2 * layers * kv_heads * head_dim * tokens * b (a rank's cache, a
    request's KV handoff in total with L and KV, or one sender/receiver piece of it)."""
    return 2 * layers * kv_heads * head_dim * tokens * dtype_size(itemsize)


def kv_cache_bytes_per_token(config, layout, dtype_bytes, stage: int | None = None) -> int:
    """KV-cache bytes per token on one rank: layers * 2 * max(KV/tp, 1) * d * b.

    ``stage`` None: the stage with most layers (stage 0). Replicated kv heads count in full.
    """
    s = 0 if stage is None else stage
    n_layers = len(stage_layers(config.num_layers, layout.pp)[s])
    return kv_bytes(n_layers, kv_heads_per_rank(config, layout.tp), config.head_dim, 1,
                    dtype_bytes)
