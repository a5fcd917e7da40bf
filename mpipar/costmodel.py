"""The seed's cost model: weights, KV cache and communication per rank, as pure functions.

Notation: h hidden size, b bytes per element, L layers, H query heads, KV kv heads, d
head_dim, V vocab, I dense intermediate, E experts, k experts per token (top_k), m
moe_intermediate; layout tp = t, pp = p, dp, ep = l.  "GB" is 1e9 bytes (the seed's
80 - 235*2/8 = 21.25 uses decimal units throughout).

Parameters (Qwen3 has no biases):
  attention/layer = h*H*d (q) + 2*h*KV*d (k, v) + H*d*h (o) + 2*d (q_norm, k_norm)
  dense MLP/layer = 3*h*I        MoE/layer = E*3*h*m (experts) + E*h (router)
  norms/layer = 2*h;  embedding = V*h;  lm_head = V*h unless tied;  final norm = h
  active per token: the same with k instead of E experts (router, embedding included).

Weights per rank (the stage's layers; the tp rank holding the most):
  layers: contiguous stages, the first L % p stages get one more (``stage_layers``);
  q, o: H/t heads; k, v: max(KV/t, 1) heads -- when t > KV each kv head is replicated
  on t/KV ranks (``kv_duplication_factor``); dense MLP: ceil(I/t) columns;
  experts: l > 1: E/l whole experts; l = 1: all E, each with ceil(m/t) columns;
  router, norms, q/k norms: replicated; embedding (stage 0) and lm_head (last stage):
  vocab-parallel, ceil(V/t) rows; a tied lm_head costs a second copy only when p > 1.

KV cache per rank per token = layers_of_stage * 2 (k and v) * max(KV/t, 1) * d * b.

KV handoff (prefill/decode disaggregation, kind ``kv_transfer``): every layer's keys and
values of the P prompt tokens move once from the prefill group to each decode rank that
holds them: 2 * L * KV * d * P * b per request (times max(1, t_decode/KV) when the decode
TP replicates kv heads); ``parallel/reshard.py`` splits it over sender/receiver pairs.

Communication (ring algorithms; every rank sends and receives the same amount):
  all-reduce of S bytes over n ranks: reduce-scatter + all-gather, each rank sends
  2(n-1)/n*S and receives as much, 4(n-1)/n*S in all (``allreduce_bytes_seed``).
  TP: two all-reduces of the activation [tokens, h] per layer (after o_proj and after
  down_proj), so per token over k layers: sent = recv = 4k(n-1)h*b/n, the seed's
  8k(n-1)h/n elements of traffic (sent + received). (mpipar's all-reduce sends small
  messages, such as one decode token, by recursive doubling instead: log2(n)*S per rank;
  ``exact_allreduce_sent(..., algorithm="auto")`` gives what it really moves.)
  PP: one activation [tokens, h] per stage boundary: (p-1)*h*b per token for the whole
  pipeline; a rank of stage s sends h*b (s < p-1) and receives h*b (s > 0).
  EP, the seed's "top_k*h/l per token": our reading -- the T tokens of an EP group are
  spread evenly over its l ranks; each rank dispatches its T/l tokens, each copied to k
  experts, so per token of the group each rank sends k*h*b/l in dispatch and the same
  back in combine. That count includes the copies whose expert lives on the sending rank;
  under uniform routing a share 1/l stays home, so the bytes that really move are
  k*h*b*(l-1)/l**2 per group token per rank (``ep_bytes_per_token_expected``; 0 at
  l = 1, where the seed's expression would still say k*h). For measured routing, see
  ``ep_alltoall_bytes``: bytes = rows sent to other ranks * h * b, combine mirrors it.
Work of one forward (the time model's inputs, ``forward_matmuls``, ``attention_work``):
  a product of activations [M, k] with a weight [out, k] is 2*M*k*out FLOPs and reads its
  k*out*b weight bytes once. Per rank of a stage, in a forward of N tokens of its replica:
  attention and dense MLP weights (``rank_params``) with M = N; router with M = N (ep = 1)
  or the TP share ceil(N/t) (ep > 1); lm_head with M = the rows whose logits are taken.
  Experts: a MoE layer's T routed tokens pick k of E experts each, so under uniform
  routing an expert is hit by at least one token with probability 1 - (1 - k/E)**T
  and gets T*k/E rows on average; only hit experts run (and are read). With ep > 1 a
  rank holds E/l experts and serves the T = l*N/t tokens of its EP group; the layer
  waits for the rank with the most hit experts (``experts_hit_busiest``).
  Causal attention of q new tokens after c cached ones, queries in blocks of B rows
  (``model.layers.causal_gqa_attention``): the block ending at query i1 scores c + i1
  keys, so FLOPs = 4 * Hq_l * d * sum_blocks rows * (c + i1) (QK^T and PV); the KV
  cache read is (c + q) * 2 * Hkv_l * d * b per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .layout import Layout
from .parallel.shard import check_layout, split, stage_layers

DTYPE_BYTES = {"float32": 4, "fp32": 4, "f32": 4, "float16": 2, "fp16": 2, "f16": 2,
               "bfloat16": 2, "bf16": 2}


def dtype_size(name) -> int:
    """Bytes per element of a dtype name (bf16, fp16, fp32 and their long names)."""
    if isinstance(name, int) and not isinstance(name, bool) and name > 0:
        return name
    try:
        return DTYPE_BYTES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(DTYPE_BYTES)})") from None


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


# ---- parameters -------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCounts:
    attention: int  # one layer: q, k, v, o + q_norm, k_norm
    layer_norms: int  # one layer: input + post-attention RMSNorm
    dense_mlp: int  # one dense layer: gate, up, down
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
    """Parameter counts of a Qwen3 / Qwen3-MoE config (formulas in the module docstring)."""
    c = config
    h, d = c.hidden_size, c.head_dim
    attn = h * c.num_heads * d + 2 * h * c.num_kv_heads * d + c.num_heads * d * h + 2 * d
    dense = 3 * h * c.intermediate_size
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


# ---- layout: stages (``stage_layers``, the engine's own), shards -------------------------
def kv_heads_per_rank(config, tp: int) -> int:
    """kv heads a TP rank holds: KV/tp, or 1 (replicated) when tp > KV."""
    check_layout(config, Layout(tp=tp))
    return max(config.num_kv_heads // tp, 1)


def kv_duplication_factor(config, tp: int) -> int:
    """How many TP ranks hold each kv head (and its cache): tp/KV when tp > KV, else 1."""
    return tp * kv_heads_per_rank(config, tp) // config.num_kv_heads


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
        out["attention"] += 2 * h * hq * d + 2 * h * hkv * d
        out["norms"] += 2 * h + 2 * d
        if c.is_moe_layer(i):
            out["router"] += c.num_experts * h
            if layout.ep > 1:
                out["experts"] += c.num_experts // layout.ep * 3 * h * c.moe_intermediate_size
            else:
                out["experts"] += c.num_experts * 3 * h * _ceil(c.moe_intermediate_size, t)
        else:
            out["dense_mlp"] += 3 * h * _ceil(c.intermediate_size, t)
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


def kv_cache_bytes_per_token(config, layout, dtype_bytes, stage: int | None = None) -> int:
    """KV-cache bytes per token on one rank: layers * 2 * max(KV/tp, 1) * d * b.

    ``stage`` None: the stage with most layers (stage 0). Replicated kv heads count in full.
    """
    b = dtype_size(dtype_bytes)
    s = 0 if stage is None else stage
    n_layers = len(stage_layers(config.num_layers, layout.pp)[s])
    return n_layers * 2 * kv_heads_per_rank(config, layout.tp) * config.head_dim * b


def kv_transfer_bytes(layers: int, kv_heads: int, head_dim: int, prompt_tokens: int,
                      itemsize) -> int:
    """Bytes of keys and values of ``layers`` layers, ``kv_heads`` heads, ``prompt_tokens``
    positions: 2 * layers * kv_heads * head_dim * prompt_tokens * itemsize (the handoff of
    one request in total with L and KV, or of one sender/receiver piece)."""
    return 2 * layers * kv_heads * head_dim * prompt_tokens * dtype_size(itemsize)


# ---- communication: the seed's formulas ---------------------------------------------------
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


def ep_bytes_per_token_expected(top_k: int, hidden: int, ep: int, dtype_bytes) -> Traffic:
    """Expected bytes that leave a rank in one all-to-all per group token under uniform
    routing: top_k*h*b*(l-1)/l**2 (the seed's figure times (l-1)/l)."""
    s = top_k * hidden * dtype_size(dtype_bytes) * (ep - 1) / ep ** 2
    return Traffic(s, s)


def ep_alltoall_bytes(counts, rank: int, hidden: int, itemsize: int) -> dict:
    """Exact bytes of one rank from measured routing.

    ``counts[src][dst]``: rows (token copies, [h] each) rank src sends rank dst in
    dispatch. Dispatch: sent = sum_{dst != rank} counts[rank][dst]*h*b, recv =
    sum_{src != rank} counts[src][rank]*h*b; combine returns every row: sent and recv
    swap. Rows a rank keeps for itself move nothing.
    """
    n = len(counts)
    out = sum(int(counts[rank][j]) for j in range(n) if j != rank) * hidden * itemsize
    inc = sum(int(counts[i][rank]) for i in range(n) if i != rank) * hidden * itemsize
    return {"dispatch": Traffic(out, inc), "combine": Traffic(inc, out)}


def exact_allreduce_sent(n_elems: int, itemsize: int, n: int, rank: int,
                         algorithm: str = "ring") -> Traffic:
    """Bytes ``rank`` sends/receives in mpipar's all-reduce of n_elems, exactly.

    "ring" (default, the seed's algorithm): chunk rounding included, equal to
    ``allreduce_bytes_seed`` when n divides n_elems. "auto" / "recursive_doubling": what
    ``ring_allreduce(algorithm=...)`` really does -- messages up to
    ``mpipar.comm.allreduce.RECURSIVE_DOUBLING_MAX_BYTES`` (one decode token's activation,
    e.g. 8 KB at h=4096 bf16) go by recursive doubling, log2(n)*S per rank for n a power of two,
    not 2(n-1)/n*S. Delegates to mpipar.comm.allreduce.
    """
    from .comm.allreduce import allreduce_bytes
    sent, recv = allreduce_bytes(n_elems, itemsize, n, rank, algorithm)
    return Traffic(sent, recv)


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


# ---- work of one forward: FLOPs and bytes read ----------------------------------------
def experts_hit(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected experts (of E) picked by at least one of ``tokens`` tokens, uniform routing."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens) if tokens > 0 else 0.0


def experts_hit_busiest(num_experts: int, top_k: int, tokens: float, ranks: int) -> float:
    """Expected experts hit on the busiest of ``ranks`` ranks of E/ranks experts each:
    every expert is hit with probability q = 1 - (1 - k/E)**T (taken independently), so
    a rank's count is Binomial(n = E/ranks, q) and E[max of l] = sum_{x<n} 1 - F(x)**l."""
    from math import comb
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
    from .parallel.shard import split
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


def attention_work(config, layout, new: int, cached: int, dtype_bytes) -> tuple[float, float]:
    """(FLOPs, KV bytes read) of one layer's causal attention of ``new`` tokens of one
    sequence after ``cached`` ones, on one TP rank (module docstring)."""
    import inspect

    from .model.layers import causal_gqa_attention
    block = inspect.signature(causal_gqa_attention).parameters["block"].default
    hq, hkv, d = config.num_heads // layout.tp, kv_heads_per_rank(config, layout.tp), \
        config.head_dim
    scored = sum((min(new, i0 + block) - i0) * (cached + min(new, i0 + block))
                 for i0 in range(0, new, block))
    return 4.0 * hq * d * scored, (cached + new) * 2 * hkv * d * dtype_size(dtype_bytes)
