"""Checkpoint reading (safetensors, sliced, f32/f16/bf16, sharded, tied), its errors, and
the deterministic random weights. Compared with safetensors' own loader and with
ml_dtypes' rounding. Not an MPI test: every rank runs it on its own (tmp_path per process)."""

from __future__ import annotations

import dataclasses
import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from mpipar.model import (
    CheckpointError,
    CheckpointReader,
    ModelConfig,
    RandomWeights,
    expected_shapes,
    get_preset,
    open_model,
    save_checkpoint,
)
from mpipar.model.init import BLOCK_VALUES

FIXTURES = ["qwen3-tiny", "qwen3-moe-tiny"]
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _fixture(fixtures_dir, name):
    d = os.path.join(fixtures_dir, name)
    return d, load_file(os.path.join(d, "model.safetensors"))


@pytest.mark.parametrize("name", FIXTURES)
def test_reader_returns_the_safetensors_tensors(fixtures_dir, name):
    d, want = _fixture(fixtures_dir, name)
    with CheckpointReader(d) as r:
        assert set(r.names()) == set(want) == set(expected_shapes(r.config))
        for n, a in want.items():
            got = r.read(n)
            assert got.dtype == np.float32 and got.shape == a.shape == r.shape(n)
            np.testing.assert_array_equal(got, a)
            assert r.read(n, dtype=None).dtype == a.dtype
        got[...] = 0  # a fresh writable copy, not a view of the file
        np.testing.assert_array_equal(r.read(n), a)


INDEXES = [(slice(0, 1),), (slice(37, 101),), slice(5, 6), (slice(None), slice(3, 29)),
           (slice(11, 120, 3), slice(1, 64, 5)), (slice(121, None),), (17,), (17, slice(2, 9)),
           (slice(13, 13),), None, ()]


@pytest.mark.parametrize("index", INDEXES, ids=str)
def test_slices_equal_slices_of_the_full_tensor(fixtures_dir, index):
    d, want = _fixture(fixtures_dir, "qwen3-moe-tiny")
    r = CheckpointReader(d)
    for n in (EMBED, LM_HEAD, "model.layers.2.self_attn.q_proj.weight"):
        idx = index if isinstance(index, tuple) or index is None else (index,)
        exp = want[n][idx] if idx is not None else want[n]
        np.testing.assert_array_equal(r.read(n, index), exp)
    rw = RandomWeights(r.config, seed=3)
    full = rw.read(EMBED)
    idx = index if index is not None else ()
    np.testing.assert_array_equal(rw.read(EMBED, index), full[idx])


@pytest.mark.parametrize("bad", [(slice(0, 257),), (slice(-4, None),), (slice(9, 3),),
                                 (256,), (slice(None), slice(0, 65)), (0, 0, 0),
                                 (slice(0, 4, -1),)], ids=str)
def test_out_of_range_index_is_refused(fixtures_dir, bad):
    r = CheckpointReader(os.path.join(fixtures_dir, "qwen3-tiny"))
    for src in (r, RandomWeights(r.config)):
        with pytest.raises(IndexError, match=EMBED):
            src.read(EMBED, bad)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shards", [1, 3])
def test_16bit_and_sharded_checkpoints(fixtures_dir, tmp_path, dtype, shards):
    d, want = _fixture(fixtures_dir, "qwen3-moe-tiny")
    cfg = CheckpointReader(d).config
    paths = save_checkpoint(tmp_path, cfg, want, dtype=dtype, shards=shards)
    assert len(paths) == shards
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    assert hf["torch_dtype"] == dtype and hf["rope_theta"] == 1e6
    if shards > 1:
        with open(tmp_path / "model.safetensors.index.json") as f:
            wmap = json.load(f)["weight_map"]
        assert set(wmap) == set(want) and len(set(wmap.values())) == 3
    npdt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    seen = set()
    for p in paths:  # the files are valid safetensors, by safetensors' own reader
        with safe_open(p, framework="numpy") as f:
            for n in f.keys():
                assert list(f.get_slice(n).get_shape()) == list(want[n].shape)
                assert f.get_slice(n).get_dtype() == ("BF16" if dtype == "bfloat16" else "F16")
                seen.add(n)
                if dtype == "float16":
                    np.testing.assert_array_equal(f.get_tensor(n), want[n].astype(npdt))
    assert seen == set(want)
    r = CheckpointReader(tmp_path)
    assert r.config == cfg.__class__(**{**cfg.to_dict(), "dtype": dtype, "name": r.config.name})
    for n, a in want.items():
        rounded = a.astype(npdt)  # ml_dtypes / numpy round-to-nearest-even
        stored = r.read(n, dtype=None)
        assert stored.dtype == npdt
        np.testing.assert_array_equal(stored.view(np.uint16), rounded.view(np.uint16))
        np.testing.assert_array_equal(r.read(n), rounded.astype(np.float32))
        if a.ndim == 2:
            np.testing.assert_array_equal(r.read(n, (slice(3, 7), slice(1, 30, 4))),
                                          rounded.astype(np.float32)[3:7, 1:30:4])
    assert np.abs(r.read(EMBED) - want[EMBED]).max() > 0  # 16-bit really rounded


def test_tied_checkpoint(fixtures_dir, tmp_path):
    d, want = _fixture(fixtures_dir, "qwen3-tiny")
    cfg = CheckpointReader(d).config
    save_checkpoint(tmp_path, cfg, want, tied=True)
    assert LM_HEAD not in load_file(tmp_path / "model.safetensors")
    r = CheckpointReader(tmp_path)
    assert r.config.tie_word_embeddings and LM_HEAD in r and LM_HEAD not in r.names()
    assert r.shape(LM_HEAD) == (256, 64)
    np.testing.assert_array_equal(r.read(LM_HEAD), want[EMBED])
    np.testing.assert_array_equal(r.read(LM_HEAD, (slice(64, 128),)), want[EMBED][64:128])
    rw = RandomWeights(r.config, seed=1)
    np.testing.assert_array_equal(rw.read(LM_HEAD), rw.read(EMBED))


def _expect_error(path, *words):
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(path)
    for w in words:
        assert str(w) in str(e.value), (w, str(e.value))


def test_errors_name_the_tensor_and_the_file(fixtures_dir, tmp_path):
    d, want = _fixture(fixtures_dir, "qwen3-moe-tiny")
    cfg = CheckpointReader(d).config
    gone = "model.layers.3.mlp.experts.5.up_proj.weight"
    save_checkpoint(tmp_path / "missing", cfg, {n: a for n, a in want.items() if n != gone})
    _expect_error(tmp_path / "missing", f"missing tensor {gone}", "[32, 64]")
    save_checkpoint(tmp_path / "nohead", cfg, {n: a for n, a in want.items() if n != LM_HEAD})
    _expect_error(tmp_path / "nohead", f"missing tensor {LM_HEAD}", "tie_word_embeddings")
    bad = "model.layers.1.self_attn.k_proj.weight"
    save_checkpoint(tmp_path / "shape", cfg, {**want, bad: want[bad][:, :60]}, shards=3)
    shard = json.loads((tmp_path / "shape/model.safetensors.index.json").read_text())
    _expect_error(tmp_path / "shape", bad, "[32, 60]", "expected [32, 64]",
                  tmp_path / "shape" / shard["weight_map"][bad])
    paths = save_checkpoint(tmp_path / "file", cfg, want, shards=3)
    os.remove(paths[1])
    _expect_error(tmp_path / "file", "missing checkpoint file", paths[1])
    paths = save_checkpoint(tmp_path / "trunc", cfg, want)
    size = os.path.getsize(paths[0])
    with open(paths[0], "r+b") as f:
        f.truncate(size - 100)
    _expect_error(tmp_path / "trunc", paths[0], "truncated")
    with open(paths[0], "r+b") as f:
        f.truncate(5)
    _expect_error(tmp_path / "trunc", paths[0], "truncated")
    os.remove(tmp_path / "trunc" / "config.json")
    _expect_error(tmp_path / "trunc", "config.json")
    _expect_error(tmp_path / "nowhere", "not found", "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg.to_hf()))
    _expect_error(tmp_path / "empty", "no model.safetensors")


def test_random_weights_deterministic_and_slice_exact():
    # vocab rows span several generated blocks, so slices cross block boundaries
    cfg = ModelConfig(vocab_size=2501, hidden_size=1024, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, intermediate_size=96, num_experts=3,
                      num_experts_per_tok=2, moe_intermediate_size=40, mlp_only_layers=[0])
    per = BLOCK_VALUES // cfg.hidden_size
    a, b, c = RandomWeights(cfg, 7), RandomWeights(cfg, 7), RandomWeights(cfg, 8)
    full = a.read(EMBED)
    np.testing.assert_array_equal(full, b.read(EMBED))
    assert not np.array_equal(full, c.read(EMBED))
    for idx in [(slice(per - 3, per + 5),), (slice(1, 2 * per + 7, 3), slice(100, 110)),
                (slice(2 * per + 1, None),), (per,), (slice(0, 2501),)]:
        np.testing.assert_array_equal(b.read(EMBED, idx), full[idx])
    names = a.names()
    assert names == list(expected_shapes(cfg))
    vals = {n: a.read(n) for n in names}
    assert len({v.tobytes() for v in vals.values()}) == len(names)  # every tensor its own
    for n, v in vals.items():
        assert v.shape == a.shape(n) and v.dtype == np.float32
        np.testing.assert_array_equal(v, b.read(n))
        if v.ndim == 1:  # norms: 1 + 0.1 N(0, 1)
            assert abs(v.mean() - 1) < 0.1 and 0.03 < v.std() < 0.2, n
        elif v.size > 4000:  # fan-in scaled: std 1/sqrt(in)
            assert abs(v.std() * np.sqrt(v.shape[1]) - 1) < 0.1, n
    assert "model.layers.0.mlp.gate_proj.weight" in vals  # dense layer 0
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in vals
    assert a.read(EMBED, (slice(0, 4),), dtype="bfloat16").dtype == ml_dtypes.bfloat16


def test_random_weights_to_checkpoint_round_trip(tmp_path):
    cfg = get_preset("builtin-moe")
    rw = RandomWeights(cfg, seed=5)
    save_checkpoint(tmp_path, cfg, rw, shards=2)
    r = open_model(tmp_path)
    assert isinstance(r, CheckpointReader) and r.config == cfg.__class__(
        **{**cfg.to_dict(), "name": r.config.name})
    for n in r.names():
        np.testing.assert_array_equal(r.read(n), rw.read(n))


def test_open_model():
    w = open_model()
    assert isinstance(w, RandomWeights) and w.config == get_preset("builtin-moe")
    assert open_model(preset="bench-166m", seed=2).config.name == "bench-166m"
    assert open_model("qwen3-0.6b").config.tie_word_embeddings
    with pytest.raises(CheckpointError, match="no/such/dir"):
        open_model("no/such/dir")
    with pytest.raises(ValueError):
        open_model("x", preset="builtin-moe")


def test_random_model_is_not_degenerate():
    """Activations O(1) and greedy margins far above float32 noise (so parallel runs
    reproduce the tokens), checked with the single-process reference."""
    from mpipar.model import reference as ref
    for seed in (0, 1):
        m = ref.ReferenceModel(RandomWeights(get_preset("builtin-moe"), seed=seed))
        prompt = np.random.default_rng(seed).integers(0, 512, 12)
        outs = []
        ids, seg = ref.flatten_batch([prompt])
        logits = m.logits(m.hidden(ids, seg, m.new_caches(1, 16), outs))
        rms = [float(np.sqrt((o ** 2).mean())) for o in outs]
        assert all(0.3 < x < 5 for x in rms), rms
        top2 = np.sort(logits, axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        assert 0.5 < logits.std() < 3 and margin.min() > 1e-3 and np.median(margin) > 0.05
        assert len(set(np.argmax(logits, -1).tolist())) > 3  # not one token everywhere


def test_llama_and_qwen2_shapes_know_biases_and_no_qk_norm(fixtures_dir, tmp_path):
    """expected_shapes follows the switches: Llama's biases (q, k, v, o, gate, up, down),
    Qwen2's (q, k, v), neither has q_norm/k_norm; a missing bias or a wrong bias shape is
    named; save_checkpoint + reader round-trip a Llama folder."""
    d, want = _fixture(fixtures_dir, "llama-bias-llama3")
    cfg = CheckpointReader(d).config
    shapes = expected_shapes(cfg)
    assert set(shapes) == set(want)  # exactly the tensors transformers wrote
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (16,)
    assert shapes["model.layers.0.mlp.down_proj.bias"] == (48,)
    assert not any("_norm.weight" in n and "self_attn" in n for n in shapes)
    q2 = CheckpointReader(os.path.join(fixtures_dir, "qwen2-bias-linear-tied")).config
    names = set(expected_shapes(q2))
    assert "model.layers.2.self_attn.v_proj.bias" in names
    assert not any(n.endswith(("o_proj.bias", "gate_proj.bias")) or "q_norm" in n
                   for n in names)
    gone = "model.layers.4.self_attn.k_proj.bias"
    save_checkpoint(tmp_path / "missing", cfg, {n: a for n, a in want.items() if n != gone})
    _expect_error(tmp_path / "missing", f"missing tensor {gone}", "[16]")
    bad = "model.layers.1.mlp.up_proj.bias"
    save_checkpoint(tmp_path / "shape", cfg, {**want, bad: want[bad][:70]})
    _expect_error(tmp_path / "shape", bad, "[70]", "expected [77]")
    save_checkpoint(tmp_path / "ok", cfg, want)
    again = CheckpointReader(tmp_path / "ok")
    assert again.config == dataclasses.replace(cfg, name="ok")
    np.testing.assert_array_equal(again.read(gone), want[gone])
