"""The parallel engine against the transformers-made fixtures, in every layout of this world.

Runs under any world size W: every (tp, pp, dp) with tp*pp*dp = W and every valid ep, with
one and with several prefill chunks, on both checkpoints, with a batch of two prompts of
unequal lengths (so dp = 4 has replicas without prompts). Rank 0 checks tokens and logits
against the fixtures; every rank's ledger must equal the cost model's prediction.
"""

import itertools
import json
import os

import numpy as np
import pytest

from mpipar.cost.traffic import predict_rank
from mpipar.layout import Layout, LayoutError, make_comms
from mpipar.model.checkpoint import CheckpointReader
from mpipar.model.init import RandomWeights
from mpipar.model.reference import ReferenceModel, generate
from mpipar.model.sampling import Sampler
from mpipar.parallel.rank_model import ParallelModel
from mpipar.parallel.shard import check_layout
from mpipar.serve import offline

TOL = 1e-4


def layouts(world_size, n_experts):
    for tp, pp in itertools.product(range(1, world_size + 1), repeat=2):
        if world_size % (tp * pp):
            continue
        dp = world_size // (tp * pp)
        for ep in range(1, tp * dp + 1):
            if (tp * dp) % ep == 0 and (ep == 1 or (n_experts and n_experts % ep == 0)):
                yield Layout(tp=tp, pp=pp, dp=dp, ep=ep)


def load_refs(folder):
    ref = json.load(open(os.path.join(folder, "ref.json")))
    return {
        "prompts": [ref["prompt_a"], ref["prompt_b"]],
        "tokens": np.array(ref["greedy_generate_batch"]),
        "logits_a": np.load(os.path.join(folder, "ref_logits.npy"))[0],
        "logits_b": np.load(os.path.join(folder, "ref_logits_b.npy"))[0],
        "decode_a": np.load(os.path.join(folder, "ref_decode_logits.npy")),
        "long": ref["prompt_long"], "tokens_long": ref["greedy_generate_long"],
        "logits_long": os.path.join(folder, "ref_logits_long.npy"),
    }


def on_rank0(world, check, *args):
    """Run ``check`` on rank 0 and fail on every rank if it fails, so that the ranks stop
    together instead of the others going on into the next layout's collectives."""
    error = None
    if world.Get_rank() == 0:
        try:
            check(*args)
        except AssertionError as e:
            error = repr(e)
    error = world.bcast(error, root=0)
    assert error is None, error


def check_ledger(per_rank, layout, config):
    """Measured bytes == predicted bytes for every predicted kind, every rank."""
    for r in per_rank:
        for kind, want in predict_rank(config, layout, r).items():
            got = r["ledger"].get(kind, {}).get("sent_bytes", 0)
            assert got == want, (layout, r["rank"], kind, got, want)


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3-moe-tiny"])
def test_every_layout_matches_transformers(world, fixtures_dir, name):
    folder = os.path.join(fixtures_dir, name)
    source = CheckpointReader(folder)
    refs = load_refs(folder)
    config = source.config
    for layout in layouts(world.Get_size(), config.num_experts):
        for chunks in (1, 3):
            comms = make_comms(layout, world)
            model = ParallelModel(comms, source)
            # decode micro-batches: 1 chunk: none; 3 chunks: two
            gen = offline.generate(model, refs["prompts"], 8, prefill_chunks=chunks,
                                   keep_logits=True, decode_microbatches=chunks - 1)
            on_rank0(world, check_ledger, model.report(), layout, config)
            on_rank0(world, check_generation, gen, refs, config,
                     f"{name} {layout} chunks={chunks}")


def check_generation(gen, refs, config, where):
    assert np.array_equal(gen.tokens, refs["tokens"]), where
    pl = gen.prompt_logits
    na, nb = len(refs["prompts"][0]), len(refs["prompts"][1])
    assert pl.shape == (2, max(na, nb), config.vocab_size), where
    assert np.abs(pl[0, :na] - refs["logits_a"]).max() < TOL, where
    assert np.abs(pl[1, :nb] - refs["logits_b"]).max() < TOL, where
    assert np.isnan(pl[1, nb:]).all(), where
    assert np.abs(gen.decode_logits[0] - refs["decode_a"]).max() < TOL, where


# MQA + tied + bf16 + 5 layers + odd vocab; MoE top-3 with dense layers between, sharded;
# Llama (biases everywhere, llama3 RoPE, no head_dim, 6/2 heads: tp 1, 2, 6); Qwen2 (q/k/v
# biases, linear RoPE, tied, 8/2 heads: kv replicated at tp=4, 3 layers: uneven pp=2).
MORE_SHAPES = ["qwen3-mqa-bf16-tied", "qwen3-moe-mixed-sharded", "qwen3-chat",
               "llama-bias-llama3", "qwen2-bias-linear-tied"]


@pytest.mark.parametrize("name", MORE_SHAPES)
def test_more_checkpoint_shapes_in_every_layout(world, fixtures_dir, name):
    """Every layout of this world, 3 prefill chunks, against transformers' numbers."""
    folder = os.path.join(fixtures_dir, name)
    source = CheckpointReader(folder)
    refs, config = load_refs(folder), source.config
    for layout in layouts(world.Get_size(), config.num_experts):
        try:
            check_layout(config, layout)
        except LayoutError:
            continue  # e.g. 4 query heads cannot split over tp=3; same on every rank
        model = ParallelModel(make_comms(layout, world), source)
        gen = offline.generate(model, refs["prompts"], 8, prefill_chunks=3, keep_logits=True)
        on_rank0(world, check_ledger, model.report(), layout, config)
        on_rank0(world, check_generation, gen, refs, config, f"{name} {layout}")


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3-moe-tiny"])
def test_long_prompt_with_chunk_boundaries_inside_attention_blocks(world, fixtures_dir, name):
    """300 tokens in 2 chunks of 150: each chunk runs two query blocks of up to 128, and
    the second chunk's blocks see keys from the first chunk's cache and from their own."""
    folder = os.path.join(fixtures_dir, name)
    source = CheckpointReader(folder)
    refs = load_refs(folder)
    n = world.Get_size()
    layout = Layout(tp=2, pp=n // 2) if n % 2 == 0 else Layout(pp=n)
    if source.config.is_moe and n % 2 == 0:
        layout = Layout(tp=2, pp=n // 2, ep=2)
    model = ParallelModel(make_comms(layout, world), source)
    gen = offline.generate(model, [refs["long"]], 8, prefill_chunks=2, keep_logits=True)

    def check():
        assert gen.tokens[0].tolist() == refs["tokens_long"], layout
        err = np.abs(gen.prompt_logits[0] - np.load(refs["logits_long"])[0]).max()
        assert err < TOL, (layout, err)
    on_rank0(world, check)


def test_random_model_matches_reference_with_sampling(world):
    """Built-in preset, random weights, uneven prompts, temperature sampling: same draws."""
    from mpipar.model.config import get_preset
    source = RandomWeights(get_preset("builtin-moe"), seed=3)
    prompts = [[5, 9, 200, 31, 7], [1, 2, 3], [400, 17, 17, 17, 90, 91, 92, 93, 94]]
    sampler = Sampler(temperature=0.8, top_p=0.9, seed=11)
    ref = None
    if world.Get_rank() == 0:
        ref = generate(ReferenceModel(source), prompts, 5, sampler)
    n = world.Get_size()
    lay = Layout(tp=n, ep=n) if n in (1, 2, 4, 8) else Layout(pp=n)
    model = ParallelModel(make_comms(lay, world), source)
    gen = offline.generate(model, prompts, 5, sampler, prefill_chunks=2, keep_logits=True)
    if world.Get_rank() == 0:
        assert np.array_equal(gen.tokens, ref.tokens)
        assert np.nanmax(np.abs(gen.prompt_logits - ref.prompt_logits)) < TOL
        assert np.abs(gen.decode_logits - ref.decode_logits).max() < TOL


def test_kv_heads_replicated_when_tp_exceeds_them():
    """tp > kv heads: each kv head lives on tp/kv ranks (qwen3-tiny has 2 kv heads)."""
    from mpipar.model.config import ModelConfig
    from mpipar.parallel.shard import rank_shard
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=2,
                      head_dim=8, intermediate_size=48)
    plans = [rank_shard(cfg, Layout(tp=4), r) for r in range(4)]
    assert [list(p.kv_heads) for p in plans] == [[0], [0], [1], [1]]
    assert [p.kv_replication for p in plans] == [2, 2, 2, 2]
    assert [list(p.q_heads) for p in plans] == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("kwargs, cfg_kw, words", [
    ({"tp": 3}, {}, ["tp=3", "8 attention heads", "tp=1, tp=2, tp=4 or tp=8 would"]),
    # SmolLM2-135M's shape: 9 heads, 3 kv heads, FFN 1536 (split unevenly where it must)
    ({"tp": 2}, {"num_heads": 9, "num_kv_heads": 3, "hidden_size": 576, "head_dim": 64,
                 "intermediate_size": 1536},
     ["tp=2 does not divide the 9 attention heads", "tp=1, tp=3 or tp=9 would"]),
    ({"tp": 6}, {"num_heads": 12, "num_kv_heads": 4}, ["tp=6", "4 kv heads",
                                                      "tp=1, tp=2, tp=4 or tp=12 would"]),
    ({"tp": 8}, {"num_kv_heads": 3, "num_heads": 24}, ["tp=8", "3 kv heads"]),
    ({"pp": 5}, {}, ["pp=5", "4"]),
    ({"tp": 2, "ep": 2}, {}, ["ep=2", "dense"]),
    ({"tp": 4, "ep": 4}, {"num_experts": 6, "num_experts_per_tok": 2,
                          "moe_intermediate_size": 8}, ["ep=4", "6 experts"]),
])
def test_layouts_the_model_cannot_split_are_refused(kwargs, cfg_kw, words):
    from mpipar.model.config import ModelConfig
    base = dict(vocab_size=64, hidden_size=32, num_layers=4, num_heads=8, num_kv_heads=2,
                head_dim=8, intermediate_size=48)
    base.update(cfg_kw)
    with pytest.raises(LayoutError) as e:
        check_layout(ModelConfig(**base), Layout(**kwargs))
    for w in words:
        assert w in str(e.value)
