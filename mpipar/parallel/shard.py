"""What one rank holds: its slice of the model (``RankShard``, made by ``rank_shard``).

For a rank at (tp t of T, pp stage s of P, ep e of E):

- layers: stage s holds a contiguous range; the first ``L % P`` stages get one more.
- attention: query heads ``[t*Hq/T, (t+1)*Hq/T)`` (Hq % T == 0). KV heads: when
  T <= Hkv they are split the same way (Hkv % T == 0); when T > Hkv (Hq8/Hkv4 on 8
  GPUs, say) each kv head is replicated on ``T/Hkv`` ranks and rank t holds kv head
  ``t // (T/Hkv)`` with its KV cache: ``T/Hkv`` times the KV memory of a split.
- dense MLP: intermediate slice ``chunk t of T`` (any size; column-parallel gate/up,
  row-parallel down).
- MoE, E == 1: every expert, its intermediate sliced by TP like a dense MLP.
  MoE, E > 1: experts ``[e*X/E, (e+1)*X/E)`` whole (X % E == 0).
- vocab (embedding rows and lm_head rows): chunk t of T (vocab-parallel).

Chunks follow ``split(n, parts)``: the first ``n % parts`` parts are one larger.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..comm.chunks import chunk_bounds
from ..layout import Layout, LayoutError


def split(n: int, parts: int, i: int) -> range:
    """Part i of n items split into ``parts`` contiguous pieces (first n%parts one larger):
    the ring all-reduce's chunking, so shards and chunks agree."""
    return range(*chunk_bounds(n, parts)[i])


def stage_layers(num_layers: int, pp: int) -> list[range]:
    if num_layers < pp:
        raise LayoutError(f"pp={pp} stages need at least {pp} layers; the model has "
                          f"{num_layers}")
    return [split(num_layers, pp, s) for s in range(pp)]


@dataclass(frozen=True)
class RankShard:
    layers: range
    q_heads: range
    kv_heads: range
    kv_replication: int  # TP ranks holding each kv head (1: split, no duplication)
    inter: range  # dense MLP intermediate slice
    vocab: range  # embedding / lm_head rows
    experts: range  # experts held (all of them when ep == 1)
    expert_inter: range  # intermediate slice of each held expert
    first_stage: bool
    last_stage: bool


MAX_TP_LISTED = 64  # the TP sizes a refusal lists go up to here


def tp_fits(config, tp: int) -> bool:
    """Whether ``tp`` can split the attention: it divides the query heads, and it divides
    the kv heads (split) or they divide it (replicated). The MLP's intermediate
    dimension (dense and experts) and the vocab split unevenly (``split``): any tp."""
    return (tp >= 1 and config.num_heads % tp == 0
            and (config.num_kv_heads % tp == 0 or tp % config.num_kv_heads == 0))


def valid_tp_sizes(config, limit: int = MAX_TP_LISTED) -> list[int]:
    """Every tp in 1..limit that ``tp_fits`` the model."""
    return [t for t in range(1, limit + 1) if tp_fits(config, t)]


def _tp_refusal(config, tp: int) -> str:
    c, sizes = config, valid_tp_sizes(config)
    names = [f"tp={t}" for t in sizes]
    would = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if c.num_heads % tp:
        why = f"tp={tp} does not divide the {c.num_heads} attention heads"
    else:
        why = (f"tp={tp} and the {c.num_kv_heads} kv heads: neither divides the other, so "
               "kv heads can be neither split nor replicated")
    return (f"{why}; tp must divide the {c.num_heads} attention heads and divide or be a "
            f"multiple of the {c.num_kv_heads} kv heads: {would} would")


def check_layout(config, layout: Layout) -> None:
    """Refuse layouts that cannot split this model (one clear message; a tp that does not
    fit lists the tp sizes up to MAX_TP_LISTED that do)."""
    c, tp = config, layout.tp
    if not tp_fits(c, tp):
        raise LayoutError(_tp_refusal(c, tp))
    stage_layers(c.num_layers, layout.pp)
    if layout.ep > 1:
        if not c.is_moe:
            raise LayoutError(f"ep={layout.ep} needs a Mixture-of-Experts model; this one "
                              "is dense")
        if c.num_experts % layout.ep:
            raise LayoutError(f"ep={layout.ep} does not divide the {c.num_experts} experts")


def kv_heads_per_rank(config, tp: int) -> int:
    """kv heads a TP rank holds: Hkv/T, or 1 (replicated) when T > Hkv."""
    check_layout(config, Layout(tp=tp))
    return max(config.num_kv_heads // tp, 1)


def kv_replication(config, tp: int) -> int:
    """How many TP ranks hold each kv head (and its cache): T/Hkv when T > Hkv, else 1."""
    return tp * kv_heads_per_rank(config, tp) // config.num_kv_heads


def rank_shard(config, layout: Layout, rank: int) -> RankShard:
    check_layout(config, layout)
    c, co, tp = config, layout.coords(rank), layout.tp
    rep = kv_replication(c, tp)
    if rep == 1:
        kv_heads = split(c.num_kv_heads, tp, co.tp)
    else:
        kv_heads = range(co.tp // rep, co.tp // rep + 1)
    if layout.ep > 1:
        experts = split(c.num_experts, layout.ep, co.ep)
        expert_inter = range(c.moe_intermediate_size)
    else:
        experts = range(c.num_experts)
        expert_inter = split(c.moe_intermediate_size, tp, co.tp)
    return RankShard(
        layers=stage_layers(c.num_layers, layout.pp)[co.pp],
        q_heads=split(c.num_heads, tp, co.tp),
        kv_heads=kv_heads,
        kv_replication=rep,
        inter=split(c.intermediate_size, tp, co.tp),
        vocab=split(c.vocab_size, tp, co.tp),
        experts=experts,
        expert_inter=expert_inter,
        first_stage=co.pp == 0,
        last_stage=co.pp == layout.pp - 1,
    )
