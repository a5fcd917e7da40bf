"""mpipar.cost.memory (and the dtype table) against hand arithmetic (written out below).

Pure functions: every rank runs the same checks (any world size).
"""

from __future__ import annotations

import pytest

from mpipar.comm.dtypes import dtype_size
from mpipar.cost import memory as cm
from mpipar.layout import Layout
from mpipar.model.config import ModelConfig, get_preset
from mpipar.parallel.shard import kv_heads_per_rank, kv_replication, stage_layers

# Small dense model: V=100, h=12, L=5, H=4, KV=2, d=6, I=20, untied.
DENSE = ModelConfig(vocab_size=100, hidden_size=12, num_layers=5, num_heads=4,
                    num_kv_heads=2, head_dim=6, intermediate_size=20)
# Small MoE: V=50, h=8, L=3, H=4, KV=2, d=4, E=6, k=2, m=5; layer 1 dense (I=16).
MOE = ModelConfig(vocab_size=50, hidden_size=8, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=4, intermediate_size=16, model_type="qwen3_moe", num_experts=6,
                  num_experts_per_tok=2, moe_intermediate_size=5, mlp_only_layers=(1,))
Q235 = get_preset("qwen3-235b-a22b")


def test_param_counts_small_dense():
    p = cm.param_counts(DENSE)
    # attention: q 12*4*6=288, k+v 2*12*2*6=288, o 4*6*12=288, q/k norm 2*6=12 -> 876
    assert p.attention == 876
    assert p.dense_mlp == 3 * 12 * 20 == 720
    # layer: 876 + 720 + norms 24 = 1620; 5 layers = 8100; emb 1200 + head 1200 + norm 12
    assert p.per_layer == (1620,) * 5
    assert p.total == 8100 + 1200 + 1200 + 12 == 10512 == cm.param_counts(DENSE).total
    assert p.active == p.total and p.non_embedding == 8112


def test_param_counts_small_moe():
    p = cm.param_counts(MOE)
    # attention 8*4*4 + 2*8*2*4 + 4*4*8 + 2*4 = 128+128+128+8 = 392; norms 16
    # MoE layer: 392 + 16 + router 6*8=48 + 6 experts * 3*8*5=120 -> 1176; dense: 392+16+384
    assert (p.attention, p.expert, p.router) == (392, 120, 48)
    assert p.per_layer == (1176, 792, 1176)
    assert p.experts == 2 * 6 * 120
    assert p.total == 2 * 1176 + 792 + 2 * 50 * 8 + 8 == 3952 == cm.param_counts(MOE).total
    # active: 4 of the 6 experts idle in each of the 2 MoE layers: 3952 - 2*4*120 = 2992
    assert p.active == 2992 == cm.param_counts(MOE).active


def test_param_counts_presets():
    p = cm.param_counts(get_preset("qwen3-0.6b"))
    # published "0.6B, 0.44B non-embedding": tied embedding 151936*1024 = 155,582,464
    assert p.total == 596_049_920 and abs(p.non_embedding / 0.44e9 - 1) < 0.01
    assert p.lm_head == 0 and p.embedding == 155_582_464
    # a checkpoint that stores the tied lm_head as its own tensor holds 0.75e9 numbers
    assert abs((p.total + p.embedding) / 0.75e9 - 1) < 0.01
    p = cm.param_counts(Q235)
    assert abs(p.total / 235e9 - 1) < 0.01 and abs(p.active / 22e9 - 1) < 0.01
    assert (p.total, p.active) == (235_093_634_560, 22_190_763_520)
    p = cm.param_counts(get_preset("qwen3-30b-a3b"))
    assert abs(p.total / 30.5e9 - 1) < 0.01 and abs(p.active / 3.3e9 - 1) < 0.02


def test_stage_layers():
    assert [len(r) for r in stage_layers(94, 4)] == [24, 24, 23, 23]
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    for L, p in ((94, 4), (7, 3), (16, 16), (3, 1)):
        rs = stage_layers(L, p)
        assert [i for r in rs for i in r] == list(range(L))
    with pytest.raises(ValueError, match="pp=5"):
        stage_layers(4, 5)


def test_weights_small_dense():
    # tp=2: q 12*2*6=144, o 144, k+v one head each 2*12*6=144, q/k norm 12, norms 24,
    # MLP 3*12*10=360 -> 828 per layer. pp=2: stage 0 = layers 0-2 + embedding 50*12,
    # stage 1 = layers 3-4 + lm_head 50*12 + final norm 12.
    lay = Layout(tp=2, pp=2)
    assert sum(cm.rank_params(DENSE, lay, 0).values()) == 3 * 828 + 600 == 3084
    assert sum(cm.rank_params(DENSE, lay, 1).values()) == 2 * 828 + 600 + 12 == 2268
    assert cm.weight_bytes_per_rank(DENSE, lay, "bf16") == 3084 * 2
    assert cm.weight_bytes_per_rank(DENSE, lay, 4, stage=1) == 2268 * 4
    # tp=4 > 2 kv heads: q, o 72 each, k+v still one head 144 (replicated on 2 ranks),
    # MLP 3*12*5=180, norms 36 -> 504 per layer; pp=1: 5*504 + emb 300 + head 300 + 12
    lay = Layout(tp=4)
    assert cm.weight_bytes_per_rank(DENSE, lay, "fp32") == (5 * 504 + 612) * 4
    # vocab 100 over tp=8 is not even: the fullest rank holds ceil(100/8)=13 rows
    c = ModelConfig(vocab_size=100, hidden_size=12, num_layers=1, num_heads=8,
                    num_kv_heads=8, head_dim=6, intermediate_size=24)
    assert cm.rank_params(c, Layout(tp=8), 0)["embedding"] == 13 * 12


def test_weights_small_moe_ep():
    # ep=1, tp=2: experts split by columns, ceil(5/2)=3 -> 6*3*8*3 = 432 per MoE layer
    p = cm.rank_params(MOE, Layout(tp=2), 0)
    assert p["experts"] == 2 * 432 and p["router"] == 2 * 48 and p["dense_mlp"] == 3 * 8 * 8
    # ep=2 (tp=2): 3 whole experts per rank per MoE layer: 2 * 3*120
    p = cm.rank_params(MOE, Layout(tp=2, ep=2), 0)
    assert p["experts"] == 2 * 3 * 120
    # ep=3 over tp=1, dp=3: 2 experts each
    assert cm.rank_params(MOE, Layout(dp=3, ep=3), 0)["experts"] == 2 * 2 * 120
    # tied embedding, pp=2: the last stage needs its own copy of the head
    c = ModelConfig(vocab_size=10, hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=2,
                    head_dim=2, intermediate_size=4, tie_word_embeddings=True)
    assert cm.rank_params(c, Layout(), 0)["lm_head"] == 0
    assert cm.rank_params(c, Layout(pp=2), 1)["lm_head"] == 40


def test_kv_cache_and_duplication():
    # 5 layers * 2 (k, v) * kv heads per rank * d=6 * 2 bytes
    assert cm.kv_cache_bytes_per_token(DENSE, Layout(), "bf16") == 5 * 2 * 2 * 6 * 2 == 240
    assert cm.kv_cache_bytes_per_token(DENSE, Layout(tp=2), "bf16") == 120
    assert cm.kv_cache_bytes_per_token(DENSE, Layout(tp=4), "bf16") == 120  # 1 head, replicated
    assert cm.kv_cache_bytes_per_token(DENSE, Layout(tp=4, pp=2), "bf16", stage=1) == 48
    assert [kv_replication(DENSE, t) for t in (1, 2, 4)] == [1, 1, 2]
    # across a TP group the cache costs dup times the unsplit one
    for t in (1, 2, 4):
        total = t * cm.kv_cache_bytes_per_token(DENSE, Layout(tp=t), 2)
        assert total == kv_replication(DENSE, t) * 240
    assert kv_replication(Q235, 8) == 2 and kv_replication(Q235, 16) == 4
    with pytest.raises(ValueError, match="neither divides"):
        kv_heads_per_rank(ModelConfig(vocab_size=8, hidden_size=8, num_layers=1,
                                         num_heads=6, num_kv_heads=3, head_dim=2,
                                         intermediate_size=8), 2)


def test_235b_on_8_gpus_tp8():
    # The seed: 80 - 235*2/8 = 21.25 GB. Exact count: 235,093,634,560*2/8 = 58,773,408,640
    # bytes -> 21.2266 GB. tp=8 also replicates, per GPU, beyond an even 1/8 share:
    #   kv heads: 94 layers * (k, v) 2*4096*128 * (1 - 4/8)            = 49,283,072 params
    #   router:   94 * 128*4096 * 7/8                                   = 43,122,688
    #   norms:    (94*(2*4096 + 2*128) + 4096) * 7/8                    =    698,432
    total = 235_093_634_560
    kv_extra = 94 * 2 * 4096 * 128 // 2
    router_extra = 94 * 128 * 4096 * 7 // 8
    norm_extra = (94 * (2 * 4096 + 2 * 128) + 4096) * 7 // 8
    assert (kv_extra, router_extra, norm_extra) == (49_283_072, 43_122_688, 698_432)
    w = cm.weight_bytes_per_rank(Q235, Layout(tp=8), "bf16")
    assert w == (total // 8 + kv_extra + router_extra + norm_extra) * 2 == 58_959_617_024
    assert 80 - 235 * 2 / 8 == 21.25
    assert abs((80e9 - total * 2 / 8) / 1e9 - 21.2266) < 1e-4
    assert abs((80e9 - w) / 1e9 - 21.04) < 0.005


def test_235b_on_16_gpus_tp4_pp4():
    # stage 0 holds layers 0-23 and the embedding; per layer per rank (tp=4, 1 kv head):
    #   attention 2*4096*16*128 + 2*4096*1*128 = 17,825,792; norms 2*4096 + 2*128 = 8,448
    #   router 128*4096 = 524,288; experts 128 * 3*4096*(1536/4) = 603,979,776
    per_layer = 17_825_792 + 8_448 + 524_288 + 603_979_776
    emb = 151936 // 4 * 4096
    w = (24 * per_layer + emb) * 2
    assert w == 30_183_403_520 == cm.weight_bytes_per_rank(Q235, Layout(tp=4, pp=4), "bf16")
    kv = cm.kv_cache_bytes_per_token(Q235, Layout(tp=4, pp=4), "bf16")
    assert kv == 24 * 2 * 1 * 128 * 2 == 12288


def test_dtype_size():
    assert [dtype_size(x) for x in ("bf16", "float16", "fp32", "BFLOAT16", 2)] == [
        2, 2, 4, 2, 2]
    with pytest.raises(ValueError, match="int8"):
        dtype_size("int8")


def test_one_kv_formula_and_one_dtype_table():
    # the cache per token, the handoff and attention's read are one formula
    assert cm.kv_bytes(5, 2, 6, 1, "bf16") == 240 == cm.kv_cache_bytes_per_token(
        DENSE, Layout(), "bf16")
    assert cm.kv_bytes(94, 4, 128, 37, 2) == 2 * 94 * 4 * 128 * 37 * 2
    from mpipar.backend import COMPUTE_DTYPES, compute_dtype
    from mpipar.comm.dtypes import FLOAT_NAMES, float_dtype
    from mpipar.model import config
    assert COMPUTE_DTYPES == ("auto", "float32", "bfloat16", "float16")
    assert set(config.DTYPES) == set(FLOAT_NAMES)
    for name in FLOAT_NAMES:
        assert compute_dtype(name, None) == float_dtype(name)
        assert dtype_size(name) == float_dtype(name).itemsize


FIXTURES = ["qwen3-tiny", "qwen3-moe-tiny", "qwen3-mqa-bf16-tied", "qwen3-moe-mixed-sharded",
            "llama-bias-llama3", "qwen2-bias-linear-tied"]


@pytest.mark.parametrize("name", FIXTURES)
def test_param_counts_equal_the_checkpoint_tensors(fixtures_dir, name):
    """Every value stored (biases, q/k norms where the family has them) is counted, and a
    rank of tp=1, pp=1 holds all of them."""
    import math
    import os

    from mpipar.model import CheckpointReader
    reader = CheckpointReader(os.path.join(fixtures_dir, name))
    stored = sum(math.prod(shape) for f in reader.files
                 for _code, shape, _b, _e in f.entries.values())
    c = reader.config
    assert cm.param_counts(c).total == stored
    assert sum(cm.rank_params(c, Layout(), 0).values()) == stored


def test_rank_params_slice_the_biases():
    """Llama biases at tp=2: q/k/v and gate/up biases halve, o/down biases stay whole."""
    kw = dict(vocab_size=64, hidden_size=24, num_layers=1, num_heads=4, num_kv_heads=2,
              head_dim=6, intermediate_size=40, model_type="llama", qk_norm=False)
    plain = ModelConfig(**kw)
    bias = ModelConfig(**kw, qkv_bias=True, o_bias=True, mlp_bias=True)
    one, two = (cm.rank_params(bias, Layout(tp=t), 0) for t in (1, 2))
    base1, base2 = (cm.rank_params(plain, Layout(tp=t), 0) for t in (1, 2))
    assert one["attention"] - base1["attention"] == (4 + 2 * 2) * 6 + 24
    assert two["attention"] - base2["attention"] == (2 + 2 * 1) * 6 + 24
    assert two["dense_mlp"] - base2["dense_mlp"] == 2 * 20 + 24
    assert one["norms"] == 2 * 24 + 24  # no q/k norm; final norm
    assert cm.param_counts(bias).total - cm.param_counts(plain).total == \
        (4 + 2 * 2) * 6 + 24 + 2 * 40 + 24
