"""ModelConfig: both Hugging Face key styles, presets against published sizes, clear errors.

Not an MPI test: every rank runs it on its own (any world size)."""

from __future__ import annotations

import json
import os

import pytest

from mpipar.cost.memory import param_counts
from mpipar.model.config import PRESETS, ConfigError, ModelConfig, get_preset, load_config

TINY = dict(vocab_size=256, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=2,
            head_dim=16, intermediate_size=128, rms_norm_eps=1e-6, rope_theta=1e6,
            tie_word_embeddings=False, dtype="float32", max_position_embeddings=512)


@pytest.mark.parametrize("fixture", ["qwen3-tiny", "qwen3-moe-tiny"])
def test_both_key_styles_give_the_same_config(fixtures_dir, fixture):
    d = os.path.join(fixtures_dir, fixture)
    v5 = load_config(d)  # directory -> config.json (transformers 5 style)
    v4 = ModelConfig.from_hf(os.path.join(d, "config_v4style.json"))
    with open(os.path.join(d, "config_v4style.json")) as f:
        from_dict = ModelConfig.from_hf(json.load(f), name=fixture)
    assert v5 == v4 == from_dict
    assert v5.name == fixture
    for k, v in TINY.items():
        assert getattr(v5, k) == v, k
    if fixture == "qwen3-moe-tiny":
        assert (v5.model_type, v5.num_experts, v5.num_experts_per_tok,
                v5.moe_intermediate_size, v5.norm_topk_prob, v5.decoder_sparse_step,
                v5.mlp_only_layers) == ("qwen3_moe", 8, 2, 32, True, 1, ())
        assert all(v5.is_moe_layer(i) for i in range(4))
    else:
        assert (v5.model_type, v5.num_experts, v5.is_moe) == ("qwen3", 0, False)


PUBLISHED = {  # name: (hidden, layers, heads, kv, head_dim, inter, vocab, tied, experts,
    #                  top-k, moe_inter, total params, active params)
    "qwen3-0.6b": (1024, 28, 16, 8, 128, 3072, 151936, True, 0, 0, 0, 0.60e9, 0.60e9),
    "qwen3-30b-a3b": (2048, 48, 32, 4, 128, 6144, 151936, False, 128, 8, 768, 30.5e9, 3.3e9),
    "qwen3-235b-a22b": (4096, 94, 64, 4, 128, 12288, 151936, False, 128, 8, 1536,
                        235e9, 22e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_shapes(name):
    c = get_preset(name)
    (h, n, q, kv, hd, inter, v, tied, e, k, mi, total, active) = PUBLISHED[name]
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
            c.intermediate_size, c.vocab_size, c.tie_word_embeddings, c.num_experts,
            c.num_experts_per_tok, c.moe_intermediate_size) == (h, n, q, kv, hd, inter, v,
                                                                tied, e, k, mi)
    assert c.rope_theta == 1e6 and c.rms_norm_eps == 1e-6 and c.dtype == "bfloat16"
    # the published parameter counts follow from the shapes (0.6B: 0.44B non-embedding)
    assert abs(param_counts(c).total / total - 1) < 0.02
    assert abs(param_counts(c).active / active - 1) < 0.03
    if name == "qwen3-0.6b":
        assert abs((param_counts(c).total - c.vocab_size * c.hidden_size) / 0.44e9 - 1) < 0.02


def test_small_presets():
    b = get_preset("builtin-moe")
    assert b.is_moe and all(b.is_moe_layer(i) for i in range(b.num_layers))
    for tp in (1, 2, 4, 8):
        for size in (b.num_heads, b.num_kv_heads, b.moe_intermediate_size,
                     b.intermediate_size, b.vocab_size, b.hidden_size):
            assert size % tp == 0
    assert all(b.num_layers % pp == 0 for pp in (1, 2, 4))
    assert all(b.num_experts % ep == 0 for ep in (1, 2, 4, 8))
    s = get_preset("bench-166m")
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim,
            s.intermediate_size, s.vocab_size, s.is_moe, s.tie_word_embeddings) == (
        1024, 8, 16, 8, 64, 3072, 32000, False, False)
    assert abs(param_counts(s).total / 166e6 - 1) < 0.01
    m = get_preset("bench-dense-300m")
    assert not m.is_moe and 250e6 < param_counts(m).total < 350e6
    for c in (s, m):
        assert all(x % 8 == 0 for x in (c.num_heads, c.num_kv_heads, c.intermediate_size))
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*builtin-moe"):
        get_preset("nope")


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("style", ["v4", "v5"])
def test_to_hf_round_trip(name, style):
    c = PRESETS[name]
    d = c.to_hf(style)
    assert ("rope_theta" in d) == (style == "v4")
    assert json.loads(json.dumps(d)) == d
    assert load_config(d, name=name) == c
    r = c.to_dict()
    assert ModelConfig.from_dict(json.loads(json.dumps(r))) == c


def test_head_dim_and_defaults():
    base = get_preset("qwen3-0.6b").to_hf()
    assert load_config(base).head_dim == 128  # != hidden/heads = 64
    del base["head_dim"], base["num_key_value_heads"], base["rope_theta"]
    c = load_config(base)
    assert (c.head_dim, c.num_kv_heads, c.rope_theta) == (64, 16, 10000.0)
    moe = get_preset("builtin-moe").to_hf()
    del moe["norm_topk_prob"], moe["decoder_sparse_step"], moe["mlp_only_layers"]
    c = load_config(moe)
    assert (c.norm_topk_prob, c.decoder_sparse_step, c.mlp_only_layers) == (False, 1, ())
    moe.update(decoder_sparse_step=2, mlp_only_layers=[3])
    c = load_config(moe)
    assert [c.is_moe_layer(i) for i in range(4)] == [False, True, False, False]


def _err(d: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(d)
    return str(e.value)


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_hidden_layers",
                                 "num_attention_heads", "intermediate_size"])
def test_missing_required_field(key):
    d = get_preset("bench-166m").to_hf()
    del d[key]
    assert f"missing required field {key}" in _err(d)


@pytest.mark.parametrize("key", ["num_experts", "num_experts_per_tok", "moe_intermediate_size"])
def test_missing_moe_field(key):
    d = get_preset("builtin-moe").to_hf()
    del d[key]
    assert key in _err(d)


@pytest.mark.parametrize("change, words", [
    ({"model_type": "gemma3"}, ["model_type", "'gemma3'", "qwen3, qwen3_moe, llama, qwen2"]),
    ({"num_key_value_heads": 3}, ["num_key_value_heads", "3", "16"]),
    ({"num_experts_per_tok": 9}, ["num_experts_per_tok", "9", "8"]),
    ({"hidden_size": 0}, ["hidden_size", "0", "positive"]),
    ({"num_hidden_layers": -2}, ["num_hidden_layers", "-2"]),
    ({"vocab_size": 12.5}, ["vocab_size", "12.5"]),
    ({"moe_intermediate_size": 0}, ["moe_intermediate_size", "0"]),
    ({"head_dim": 15}, ["head_dim", "15", "even"]),
    ({"mlp_only_layers": [7]}, ["mlp_only_layers", "[7]"]),
    ({"rms_norm_eps": 0}, ["rms_norm_eps", "0"]),
    ({"torch_dtype": "int8"}, ["torch_dtype", "int8"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope_type", "yarn"]),
    ({"attention_bias": "yes"}, ["attention_bias", "true or false"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     ["rope_scaling.low_freq_factor", "llama3"]),
    ({"rope_scaling": {"type": "linear"}}, ["rope_scaling.factor", "linear"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
    ({"quantization_config": {"quant_method": "fp8"}}, ["quantization_config", "fp8"]),
    ({"layer_types": ["full_attention", "sliding_attention"]}, ["layer_types", "sliding"]),
])
def test_bad_config_names_field_and_value(change, words):
    d = get_preset("builtin-moe").to_hf()
    d.update(change)
    msg = _err(d)
    for w in words:
        assert w in msg, (w, msg)


def test_bad_config_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found.*config.json"):
        load_config(tmp_path)
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match=str(p)):
        load_config(tmp_path)
    d = get_preset("builtin-moe").to_hf()
    d["num_attention_heads"] = 12
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=f"{p}.*num_key_value_heads"):
        load_config(p)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig(**{**TINY, "num_kv_heads": 3})
    c = ModelConfig(**{**TINY, "num_experts": 4, "num_experts_per_tok": 2,
                       "moe_intermediate_size": 8, "mlp_only_layers": [0]})
    assert c.model_type == "qwen3_moe" and c.mlp_only_layers == (0,)
    assert [c.is_moe_layer(i) for i in range(4)] == [False, True, True, True]


@pytest.mark.parametrize("fixture", ["llama-bias-llama3", "qwen2-bias-linear-tied"])
def test_llama_and_qwen2_switches_from_both_key_styles(fixtures_dir, fixture):
    """One description, switches read in one place: q/k norm, biases, RoPE scaling."""
    d = os.path.join(fixtures_dir, fixture)
    v5 = load_config(d)
    v4 = ModelConfig.from_hf(os.path.join(d, "config_v4style.json"), name=fixture)
    assert v5 == v4
    if fixture.startswith("llama"):
        with open(os.path.join(d, "config.json")) as f:
            assert "head_dim" not in json.load(f)
        assert (v5.model_type, v5.head_dim, v5.qk_norm, v5.qkv_bias, v5.o_bias,
                v5.mlp_bias, v5.tie_word_embeddings) == ("llama", 8, False, True, True, True,
                                                         False)
        assert v5.rope_scaling_dict == dict(
            rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=8.0,
            original_max_position_embeddings=256)
    else:
        assert (v5.model_type, v5.qk_norm, v5.qkv_bias, v5.o_bias, v5.mlp_bias,
                v5.tie_word_embeddings) == ("qwen2", False, True, False, False, True)
        assert v5.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    assert v5.rope_theta == 1e4


@pytest.mark.parametrize("style", ["v4", "v5"])
@pytest.mark.parametrize("family, switches", [
    ("llama", dict(qkv_bias=True, o_bias=True, mlp_bias=True,
                   rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("llama", dict()),
    ("qwen2", dict(qkv_bias=True)),
    ("qwen3", dict(qkv_bias=True, o_bias=True, qk_norm=True)),
])
def test_families_round_trip_through_hf_config(style, family, switches):
    qk = dict(qk_norm=False) if family != "qwen3" else {}
    c = ModelConfig(**TINY, model_type=family, **{**qk, **switches})
    back = ModelConfig.from_hf(c.to_hf(style))
    assert back == c and hash(back) == hash(c)
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_qwen3_and_llama_defaults_differ_only_in_switches():
    base = get_preset("qwen3-0.6b").to_hf()
    llama = dict(base, model_type="llama")
    c3, cl = ModelConfig.from_hf(base), ModelConfig.from_hf(llama)
    assert c3.qk_norm and not cl.qk_norm
    assert (c3.qkv_bias, c3.o_bias, cl.qkv_bias, cl.o_bias, cl.mlp_bias) == (False,) * 5
    assert ModelConfig.from_hf(dict(base, model_type="qwen2")).qkv_bias
