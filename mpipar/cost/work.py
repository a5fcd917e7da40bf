"""Work of one forward on one rank: the matrix products (FLOPs, weight bytes read) and
causal attention (FLOPs, KV bytes read) -- the time model's inputs.

A product of activations [M, k] with a weight [out, k] is 2*M*k*out FLOPs and reads its
k*out*b weight bytes once. Per rank of a stage, in a forward of N tokens of its replica:
attention and dense MLP weights (``memory.rank_params``) with M = N; router with M = N
(ep = 1) or the TP share ceil(N/t) (ep > 1); lm_head with M = the rows whose logits are
taken.

Experts: a MoE layer's T routed tokens pick k of E experts each, so under uniform
routing an expert is hit by at least one token with probability 1 - (1 - k/E)**T
(``experts_hit``) and gets T*k/E rows on average; only hit experts run (and are read).
With ep = l > 1 a rank holds E/l experts and serves the T = l*N/t tokens of its EP group;
the layer waits for the rank with the most hit experts (``experts_hit_busiest``).

Causal attention of q new tokens after c cached ones, queries in blocks of B rows
(``model.layers.causal_gqa_attention``, B = ``model.layers.ATTENTION_BLOCK``): the block
ending at query i1 scores c + i1 keys, so FLOPs = 4 * Hq_l * d * sum_blocks rows *
(c + i1) (QK^T and PV); the KV cache read is memory.kv_bytes(1 layer, Hkv_l, d, c + q).
"""

from __future__ import annotations

from math import comb

from ..model.layers import ATTENTION_BLOCK
from ..parallel.shard import kv_heads_per_rank, split, stage_layers
from .memory import kv_bytes, rank_params


def experts_hit(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected experts (of E) picked by at least one of ``tokens`` tokens, uniform routing."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens) if tokens > 0 else 0.0


def experts_hit_busiest(num_experts: int, top_k: int, tokens: float, ranks: int) -> float:
    """Expected experts hit on the busiest of ``ranks`` ranks of E/ranks experts each:
    every expert is hit with probability q = 1 - (1 - k/E)**T (taken independently), so
    a rank's count is Binomial(n = E/ranks, q) and E[max of l] = sum_{x<n} 1 - F(x)**l."""
    n = num_experts // ranks
    q = experts_hit(num_experts, top_k, tokens) / num_experts
    cdf, out = 0.0, 0.0
    for x in range(n):
        cdf += comb(n, x) * q ** x * (1 - q) ** (n - x)
        out += 1 - min(cdf, 1.0) ** ranks
    return out


def forward_matmuls(config, layout, stage: int, tokens: int, logit_rows: int = 0) -> dict:
    """{name: (rows M, weight params P, count)} of the products one rank of ``stage`` does
    in a forward of ``tokens`` tokens (module docstring); FLOPs 2*M*P, weights read P*b
    each. Names: layers (attention + dense MLP), router, experts, lm_head."""
    c, t, n = config, layout.tp, tokens
    p = rank_params(config, layout, stage)
    out = {"layers": (n, p["attention"] + p["dense_mlp"], 1)}
    n_moe = sum(1 for i in stage_layers(c.num_layers, layout.pp)[stage] if c.is_moe_layer(i))
    if n_moe:
        share = len(split(n, t, 0)) if layout.ep > 1 else n
        out["router"] = (share, p["router"], 1)
        held = c.num_experts // layout.ep if layout.ep > 1 else c.num_experts
        routed = n * layout.ep / t if layout.ep > 1 else n  # tokens the experts serve
        hit = experts_hit(c.num_experts, c.num_experts_per_tok, routed)  # of all E
        if hit:
            rows = routed * c.num_experts_per_tok / hit  # per hit expert, mean
            busiest = experts_hit_busiest(c.num_experts, c.num_experts_per_tok, routed,
                                          layout.ep) if layout.ep > 1 else hit
            out["experts"] = (rows, p["experts"] // (n_moe * held), busiest * n_moe)
    if logit_rows and p["lm_head"]:
        out["lm_head"] = (logit_rows, p["lm_head"], 1)
    return {name: x for name, x in out.items() if x[0] and x[1] and x[2]}


def attention_work(config, layout, new: int, cached: int, dtype_bytes,
                   block: int = ATTENTION_BLOCK) -> tuple[float, float]:
    """(FLOPs, KV bytes read) of one layer's causal attention of ``new`` tokens of one
    sequence after ``cached`` ones, on one TP rank, queries in blocks of ``block``."""
    hq, hkv = config.num_heads // layout.tp, kv_heads_per_rank(config, layout.tp)
    d = config.head_dim
    scored = sum((min(new, i0 + block) - i0) * (cached + min(new, i0 + block))
                 for i0 in range(0, new, block))
    return 4.0 * hq * d * scored, kv_bytes(1, hkv, d, cached + new, dtype_bytes)
