"""mpipar/parallel/tp.py on its own: TPBlock and VocabParallelHead against whole matrices.

Each rank builds its TP slice of a random model with odd sizes (hidden 27, intermediate
37 and vocab 83 split unevenly over 2 and 4 ranks) and checks it against the
single-process math of the same weights (model/reference.py, model/layers.py):

- TPBlock: the slices it holds are the rows / columns of its heads and of its chunk of
  the intermediate dimension (column- then row-parallel); a prefill of two sequences and
  a decode step give the reference block's output; its KV cache holds exactly its kv
  heads' keys and values, including kv heads replicated when tp > kv heads; two
  all-reduces per forward. A dense layer and a MoE layer with ep = 1 (experts TP-sliced).
- VocabParallelHead: the embedding of ids on every chunk boundary equals rows of the
  whole table; local logits are this rank's columns of the whole logits; full_logits
  gathers them back exactly; argmax equals numpy's argmax of the whole row, ties to the
  lowest id across ranks.

Every layout fills the world with DP replicas (tp=2 on 4 ranks: dp=2), each replica
with its own data, so a collective on the wrong group shows. Mismatches are collected and
shared by all ranks before any assertion, so a failure cannot leave ranks waiting.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpipar.layout import Layout, make_comms
from mpipar.model import layers as L
from mpipar.model.config import ModelConfig
from mpipar.model.init import RandomWeights
from mpipar.model.reference import ReferenceModel
from mpipar.parallel.moe import RoutingStats
from mpipar.parallel.shard import rank_shard
from mpipar.parallel.tp import TPBlock, VocabParallelHead, allreduce

pytestmark = pytest.mark.timeout(120)

TOL = 2e-5  # float32, the partial sums added in another order


def sizes(*values):
    """tp values as parameters, each needing that many ranks (pytest-mpi skips otherwise)."""
    return [pytest.param(v, marks=pytest.mark.mpi(min_size=v)) if v > 1 else v
            for v in values]


def layout_for(world, tp=1, pp=1, ep=1) -> Layout:
    """tp, pp, ep as given and dp filling the world, or a skip naming why not."""
    n = world.Get_size()
    if n % (tp * pp):
        pytest.skip(f"tp*pp = {tp * pp} does not divide a world of {n}")
    dp = n // (tp * pp)
    if (tp * dp) % ep:
        pytest.skip(f"ep = {ep} does not divide tp*dp = {tp * dp}")
    return Layout(tp=tp, pp=pp, dp=dp, ep=ep)


def settle(world, problems):
    """Every rank's mismatches, shared: all ranks fail together, with the whole story."""
    everyone = world.allgather(problems)
    lines = [f"rank {r}: {p}" for r, ps in enumerate(everyone) for p in ps]
    assert not lines, "\n".join(lines)


def close(problems, what, got, want, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        problems.append(f"{what}: shape {got.shape} != {want.shape}")
        return
    err = float(np.max(np.abs(got - want), initial=0.0))
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    if not err <= tol * scale:
        problems.append(f"{what}: max |diff| {err:.3g} (scale {scale:.3g})")


def same(problems, what, got, want):
    if np.shape(got) != np.shape(want) or not np.array_equal(got, want):
        problems.append(f"{what}: not equal")


def make_config(kv_heads, tied=False):
    """Layer 0 dense, layer 1 MoE (8 experts, top 3); odd sizes everywhere but the heads."""
    return ModelConfig(vocab_size=83, hidden_size=27, num_layers=2, num_heads=4,
                       num_kv_heads=kv_heads, head_dim=6, intermediate_size=37,
                       rope_theta=1e4, tie_word_embeddings=tied, model_type="qwen3_moe",
                       num_experts=8, num_experts_per_tok=3, moe_intermediate_size=13,
                       mlp_only_layers=(0,))


def check_slices(problems, block, source, shard, layer, d, ep):
    """The weights held: rows of its heads / intermediate (column-parallel), columns of
    them (row-parallel), read from the whole tensors here."""
    p = f"model.layers.{layer}."

    def full(name):
        return source.read(p + name)
    q = slice(shard.q_heads.start * d, shard.q_heads.stop * d)
    kv = slice(shard.kv_heads.start * d, shard.kv_heads.stop * d)
    same(problems, f"layer {layer} q rows", block.attn.q, full("self_attn.q_proj.weight")[q])
    same(problems, f"layer {layer} k rows", block.attn.k, full("self_attn.k_proj.weight")[kv])
    same(problems, f"layer {layer} v rows", block.attn.v, full("self_attn.v_proj.weight")[kv])
    same(problems, f"layer {layer} o columns", block.attn.o,
         full("self_attn.o_proj.weight")[:, q])
    if block.moe is None:
        i = slice(shard.inter.start, shard.inter.stop)
        gate, up, down = block.mlp
        same(problems, "gate rows", gate, full("mlp.gate_proj.weight")[i])
        same(problems, "up rows", up, full("mlp.up_proj.weight")[i])
        same(problems, "down columns", down, full("mlp.down_proj.weight")[:, i])
    elif ep == 1:  # (ep > 1: whole experts by placement, checked in test_moe.py)
        i = slice(shard.expert_inter.start, shard.expert_inter.stop)
        for e, (gate, up, down) in enumerate(block.moe.slots):
            x = f"mlp.experts.{e}."
            same(problems, f"expert {e} gate rows", gate, full(x + "gate_proj.weight")[i])
            same(problems, f"expert {e} up rows", up, full(x + "up_proj.weight")[i])
            same(problems, f"expert {e} down columns", down, full(x + "down_proj.weight")[:, i])


def tp_ep(*pairs):
    return [pytest.param(tp, ep, marks=[pytest.mark.mpi(min_size=tp)] if tp > 1 else [],
                         id=f"tp{tp}-ep{ep}") for tp, ep in pairs]


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("tp, ep", tp_ep((1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (4, 4)))
def test_tp_block_matches_the_reference_block(world, tp, ep, kv_heads):
    """Prefill of two sequences (5 and 8 tokens), then one decode token each (packed in
    the other order), through the dense layer and the MoE layer (ep = 1: experts
    TP-sliced, two all-reduces; ep > 1: whole experts, an all-gather in place of the
    second all-reduce); kv heads split (tp <= kv) or replicated on tp/kv ranks (tp > kv)."""
    layout = layout_for(world, tp=tp, ep=ep)
    cfg = make_config(kv_heads)
    source = RandomWeights(cfg, seed=17)
    ref = ReferenceModel(source)
    comms = make_comms(layout, world)
    co, d = comms.coords, cfg.head_dim
    shard = rank_shard(cfg, layout, co.world)
    rep = max(1, tp // kv_heads)
    problems = []
    if list(shard.kv_heads) != ([co.tp // rep] if tp > kv_heads else
                               list(range(co.tp * kv_heads // tp, (co.tp + 1) * kv_heads // tp))):
        problems.append(f"shard kv heads {list(shard.kv_heads)}")
    rng = np.random.default_rng(100 + co.dp)  # each DP replica its own tokens
    for layer in (0, 1):
        slots = np.arange(cfg.num_experts) if ep > 1 else None  # moe.py's placements: test_moe
        block = TPBlock(source, cfg, shard, layer, comms, np, slot_expert=slots)
        if (block.moe is None) != (layer == 0):
            problems.append(f"layer {layer}: moe is {block.moe}")
        check_slices(problems, block, source, shard, layer, d, ep)
        caches = [block.new_cache(16) for _ in range(2)]
        ref_caches = [L.KVCache(np, 16, kv_heads, d) for _ in range(2)]
        before = {k: e.calls for k, e in comms.ledger.entries.items()}
        for step, (n, segments) in enumerate([(13, [(0, 0, 5), (1, 5, 8)]),
                                              (2, [(1, 0, 1), (0, 1, 1)])]):
            x = (rng.standard_normal((n, cfg.hidden_size)) * 1.5).astype(np.float32)
            got = block.forward(x.copy(), caches, segments, RoutingStats(cfg.num_experts))
            want = ref.block(layer, x, ref_caches, segments)
            close(problems, f"layer {layer} step {step} output", got, want)
        for s in range(2):
            mine = slice(shard.kv_heads.start, shard.kv_heads.stop)
            if caches[s].length != ref_caches[s].length:
                problems.append(f"cache {s} length {caches[s].length}")
            n = ref_caches[s].length
            close(problems, f"layer {layer} cache {s} keys", caches[s].k[:n],
                  ref_caches[s].k[:n, mine])
            close(problems, f"layer {layer} cache {s} values", caches[s].v[:n],
                  ref_caches[s].v[:n, mine])
        # two forwards: two all-reduces each, or one and an all-gather (MoE, ep > 1)
        gathers = 2 if (layer == 1 and ep > 1) else 0
        want = {"tp_allreduce": 4 - gathers, "tp_allgather": gathers} if tp > 1 else {}
        for kind in ("tp_allreduce", "tp_allgather"):
            e = comms.ledger.entries
            got_calls = (e[kind].calls if kind in e else 0) - before.get(kind, 0)
            if got_calls != want.get(kind, 0):
                problems.append(f"layer {layer}: {got_calls} {kind}, not {want.get(kind, 0)}")
    settle(world, problems)


def test_allreduce_of_one_rank_is_the_array_itself():
    comms = make_comms(Layout(), MPI.COMM_SELF)
    x = np.arange(5.0)
    assert allreduce(comms.tp, x) is x
    assert "tp_allreduce" not in comms.ledger.entries


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tp", sizes(1, 2, 4))
def test_vocab_parallel_head_against_the_whole_matrices(world, tp, tied):
    layout = layout_for(world, tp=tp)
    cfg = make_config(2, tied=tied)
    source = RandomWeights(cfg, seed=23)
    comms = make_comms(layout, world)
    shard = rank_shard(cfg, layout, comms.coords.world)
    head = VocabParallelHead(source, cfg, shard, comms, np, embed=True, head=True)
    embed = source.read("model.embed_tokens.weight")  # [V, h]
    lm_head = source.read("lm_head.weight")  # the embedding when tied
    norm = source.read("model.norm.weight")
    problems = []
    v = cfg.vocab_size
    rng = np.random.default_rng(7 + comms.coords.dp)
    edges = [0, 1, 20, 21, 22, 41, 42, 43, 62, 63, 64, v - 2, v - 1]  # chunks of 2 and 4
    ids = np.array([*edges, *rng.integers(0, v, 9)], dtype=np.int64)
    same(problems, "embedding rows", head.embed_tokens(ids), embed[ids])

    x = (rng.standard_normal((len(ids), cfg.hidden_size)) * 2).astype(np.float32)
    whole = L.rms_norm(np, x, norm, cfg.rms_norm_eps).astype(np.float64) @ \
        lm_head.astype(np.float64).T  # [N, V]
    mine = slice(shard.vocab.start, shard.vocab.stop)
    local = head.local_logits(x)
    close(problems, "local logits", local, whole[:, mine])
    full = head.full_logits(local)
    close(problems, "full logits", full, whole)
    same(problems, "full logits keep this rank's columns", full[:, mine], local)
    same(problems, "argmax", head.argmax(local), np.argmax(full, axis=1))
    if tp > 1:
        kinds = comms.ledger.entries
        for kind in ("tp_embed", "tp_logits", "tp_argmax"):
            if kind not in kinds or kinds[kind].sent_bytes == 0:
                problems.append(f"no {kind} traffic in the ledger")
    settle(world, problems)


@pytest.mark.parametrize("tp", sizes(1, 2, 4))
def test_argmax_ties_go_to_the_lowest_id_across_ranks(world, tp):
    """Given logits (not computed): maxima tied within a chunk, across chunks and on a
    chunk boundary, all-negative rows; full_logits gives the given matrix back exactly."""
    layout = layout_for(world, tp=tp)
    cfg = make_config(2)
    comms = make_comms(layout, world)
    shard = rank_shard(cfg, layout, comms.coords.world)
    head = VocabParallelHead(RandomWeights(cfg), cfg, shard, comms, np, embed=False, head=True)
    v = cfg.vocab_size
    g = np.random.default_rng(3).uniform(-5, 1, size=(6, v)).astype(np.float32)
    want = []
    for row, tied in enumerate([(3, 70), (20, 21), (30, 35), (82,), (62, 63), (0, 41, 82)]):
        if row == 3:
            g[row] -= 10  # every logit negative
        g[row, list(tied)] = g[row].max() + 1
        want.append(tied[0])
    local = g[:, shard.vocab.start:shard.vocab.stop].copy()
    problems = []
    same(problems, "argmax with ties", head.argmax(local), np.array(want))
    same(problems, "full logits", head.full_logits(local), g)
    settle(world, problems)


def make_bias_config(kv_heads, family):
    """Dense, no q/k norm, the biases and RoPE scaling of Llama or Qwen2; odd sizes."""
    switches = {"llama": dict(qkv_bias=True, o_bias=True, mlp_bias=True, rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=8.0,
        original_max_position_embeddings=64)),
        "qwen2": dict(qkv_bias=True, rope_scaling=dict(rope_type="linear", factor=3.0))}
    return ModelConfig(vocab_size=83, hidden_size=27, num_layers=1, num_heads=4,
                       num_kv_heads=kv_heads, head_dim=6, intermediate_size=37,
                       rope_theta=1e4, model_type=family, qk_norm=False, **switches[family])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("tp", sizes(1, 2, 4))
def test_tp_block_slices_each_bias_with_its_weight(world, tp, kv_heads, family):
    """q/k/v biases sliced like their rows (k/v replicated with their kv head when
    tp > kv heads), gate/up biases like the intermediate rows; the o_proj / down_proj
    bias added once after the all-reduce; prefill + decode equal the reference block."""
    layout = layout_for(world, tp=tp)
    cfg = make_bias_config(kv_heads, family)
    source = RandomWeights(cfg, seed=29)
    ref = ReferenceModel(source)
    comms = make_comms(layout, world)
    d = cfg.head_dim
    shard = rank_shard(cfg, layout, comms.coords.world)
    block = TPBlock(source, cfg, shard, 0, comms, np)
    problems = []
    check_slices(problems, block, source, shard, 0, d, 1)

    def full(name):
        return source.read("model.layers.0." + name)
    q = slice(shard.q_heads.start * d, shard.q_heads.stop * d)
    kv = slice(shard.kv_heads.start * d, shard.kv_heads.stop * d)
    a = block.attn
    same(problems, "q bias", a.q_bias, full("self_attn.q_proj.bias")[q])
    same(problems, "k bias", a.k_bias, full("self_attn.k_proj.bias")[kv])
    same(problems, "v bias", a.v_bias, full("self_attn.v_proj.bias")[kv])
    if a.q_norm is not None or a.k_norm is not None or a.o_bias is not None:
        problems.append("q/k norm held, or o bias inside the partial sum")
    if family == "llama":
        i = slice(shard.inter.start, shard.inter.stop)
        same(problems, "o bias (whole)", block.o_bias, full("self_attn.o_proj.bias"))
        same(problems, "gate bias", block.mlp_bias[0], full("mlp.gate_proj.bias")[i])
        same(problems, "up bias", block.mlp_bias[1], full("mlp.up_proj.bias")[i])
        same(problems, "down bias (whole)", block.down_bias, full("mlp.down_proj.bias"))
    elif block.o_bias is not None or block.mlp_bias is not None:
        problems.append("qwen2 holds an o or MLP bias")
    rng = np.random.default_rng(200 + comms.coords.dp)
    caches = [block.new_cache(80) for _ in range(2)]
    ref_caches = [L.KVCache(np, 80, kv_heads, d) for _ in range(2)]
    for step, (n, segments) in enumerate([(70, [(0, 0, 5), (1, 5, 65)]),
                                          (2, [(1, 0, 1), (0, 1, 1)])]):
        x = (rng.standard_normal((n, cfg.hidden_size)) * 1.5).astype(np.float32)
        got = block.forward(x.copy(), caches, segments, None)
        close(problems, f"step {step} output", got, ref.block(0, x, ref_caches, segments))
    settle(world, problems)
