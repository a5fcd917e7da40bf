"""The single-process reference (mpipar.model.reference) against the transformers-made
fixtures: prompt logits, each layer's output, KV-cache decode logits, greedy tokens, a
no-cache forward over prompt + generated tokens, a batch of unequal prompts, both
config.json key styles, and the same model re-saved as bfloat16 / float16 / 3 shards /
tied embeddings. Also the seeded temperature / top-p sampler.

Not an MPI test: every rank runs it on its own (tmp_path per process).
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from mpipar.model import CheckpointReader, expected_shapes, open_model, save_checkpoint
from mpipar.model.layers import flatten_batch
from mpipar.model.reference import ReferenceModel, generate
from mpipar.model.sampling import Sampler

FIXTURES = ["qwen3-tiny", "qwen3-moe-tiny"]
TOL = 1e-4
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


class Fixture:
    def __init__(self, path):
        self.path = path
        with open(os.path.join(path, "ref.json"), encoding="utf-8") as f:
            self.ref = json.load(f)
        self.prompt_a, self.prompt_b = self.ref["prompt_a"], self.ref["prompt_b"]
        self.n_new = self.ref["n_new"]

    def npy(self, name):
        return np.load(os.path.join(self.path, name))


@functools.cache
def _loaded(path):
    source = CheckpointReader(path)
    return source, ReferenceModel(source)


@pytest.fixture(params=FIXTURES)
def fx(request, fixtures_dir):
    return Fixture(os.path.join(fixtures_dir, request.param))


def model_of(path):
    return _loaded(path)[1]


def forward(model, ids):
    """No-cache forward of one sequence: ids [T] -> logits [T, V]."""
    caches = model.new_caches(1, len(ids))
    flat, segments = flatten_batch([ids])
    return model.logits(model.hidden(flat, segments, caches))


def weights_of(path):
    src = _loaded(path)[0]
    return {n: src.read(n) for n in expected_shapes(src.config)}


def maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---- the fixture numbers --------------------------------------------------------------
def test_prompt_logits(fx):
    got = forward(model_of(fx.path), fx.prompt_a)
    want = fx.npy("ref_logits.npy")[0]
    assert got.shape == want.shape == (12, 256) and got.dtype == np.float32
    assert maxdiff(got, want) < TOL


def test_layer_outputs(fx):
    model = model_of(fx.path)
    outs = []
    flat, segments = flatten_batch([fx.prompt_a])
    model.hidden(flat, segments, model.new_caches(1, len(flat)), layer_outputs=outs)
    want = fx.npy("ref_layer_outputs.npy")
    assert len(outs) == model.config.num_layers == want.shape[0]
    got = np.stack(outs)
    assert got.shape == want.shape
    for i in range(want.shape[0]):  # per layer, so a failure names the first bad layer
        assert maxdiff(got[i], want[i]) < TOL, f"layer {i}"


def test_greedy_decode_tokens_and_logits(fx):
    gen = generate(model_of(fx.path), [fx.prompt_a], fx.n_new)
    assert gen.tokens.dtype == np.int64 and gen.tokens.shape == (1, fx.n_new)
    assert gen.tokens[0].tolist() == fx.ref["greedy_generate"]
    want = fx.npy("ref_decode_logits.npy")
    assert gen.decode_logits.shape == (1, *want.shape)
    assert maxdiff(gen.decode_logits[0], want) < TOL
    assert gen.prompt_logits.shape == (1, 12, 256)
    assert maxdiff(gen.prompt_logits[0], fx.npy("ref_logits.npy")[0]) < TOL
    # the first decode row is the last prompt row; every token is its row's argmax
    np.testing.assert_array_equal(gen.decode_logits[0, 0], gen.prompt_logits[0, -1])
    np.testing.assert_array_equal(gen.tokens[0], np.argmax(gen.decode_logits[0], axis=-1))
    assert gen.ttft_s > 0 and gen.decode_s > 0 and gen.tpot_s > 0 and gen.tokens_per_s > 0


def test_full_forward_over_prompt_and_generated(fx):
    ids = fx.prompt_a + fx.ref["greedy_generate"]
    got = forward(model_of(fx.path), ids)
    want = fx.npy("ref_full_logits.npy")[0]
    assert got.shape == want.shape == (20, 256)
    assert maxdiff(got, want) < TOL


def test_batch_of_unequal_prompts(fx):
    gen = generate(model_of(fx.path), [fx.prompt_a, fx.prompt_b], fx.n_new)
    assert gen.tokens.tolist() == fx.ref["greedy_generate_batch"]
    pl = gen.prompt_logits
    assert pl.shape == (2, 12, 256) and pl.dtype == np.float32
    assert maxdiff(pl[0], fx.npy("ref_logits.npy")[0]) < TOL
    nb = len(fx.prompt_b)
    assert maxdiff(pl[1, :nb], fx.npy("ref_logits_b.npy")[0]) < TOL
    assert np.all(np.isnan(pl[1, nb:])) and not np.any(np.isnan(pl[:, :nb]))
    assert gen.decode_logits.shape == (2, fx.n_new, 256)
    # row 0 of the batch decodes exactly as prompt A alone
    alone = generate(model_of(fx.path), [fx.prompt_a], fx.n_new)
    assert maxdiff(gen.decode_logits[0], alone.decode_logits[0]) < 1e-5


def test_generate_refuses_empty_prompts(fx):
    with pytest.raises(ValueError):
        generate(model_of(fx.path), [fx.prompt_a, []], 2)
    with pytest.raises(ValueError):
        generate(model_of(fx.path), [], 2)


def test_both_config_styles_give_the_same_logits(fx, tmp_path):
    d = tmp_path / "v4"
    d.mkdir()
    shutil.copy(os.path.join(fx.path, "model.safetensors"), d)
    shutil.copy(os.path.join(fx.path, "config_v4style.json"), d / "config.json")
    src = open_model(str(d))
    base = model_of(fx.path).config
    assert src.config.to_dict() | {"name": ""} == base.to_dict() | {"name": ""}
    got = forward(ReferenceModel(src), fx.prompt_a)
    np.testing.assert_array_equal(got, forward(model_of(fx.path), fx.prompt_a))


# ---- re-saved checkpoints ---------------------------------------------------------------
class DictSource:
    """A weight source over an in-memory dict of float32 arrays (the test's own oracle)."""

    def __init__(self, config, tensors):
        self.config, self.tensors = config, tensors

    def read(self, name, index=None, dtype="float32"):
        from mpipar.model.checkpoint import as_dtype
        return np.array(self.tensors[name], dtype=as_dtype(dtype))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint(fx, tmp_path, dtype):
    base = model_of(fx.path).config
    w = weights_of(fx.path)
    save_checkpoint(str(tmp_path), base, w, dtype=dtype)
    src = open_model(str(tmp_path))
    assert src.config.dtype == dtype
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    assert src.stored_dtype(EMBED) == np.dtype(np_dtype)
    rounded = {n: a.astype(np_dtype).astype(np.float32) for n, a in w.items()}
    oracle = ReferenceModel(DictSource(base, rounded))
    got = generate(ReferenceModel(src), [fx.prompt_a], fx.n_new)
    want = generate(oracle, [fx.prompt_a], fx.n_new)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert maxdiff(got.prompt_logits, want.prompt_logits) < TOL
    assert maxdiff(got.decode_logits, want.decode_logits) < TOL
    # the rounding is visible but small next to the float32 model
    drift = maxdiff(got.prompt_logits[0], fx.npy("ref_logits.npy")[0])
    assert 0 < drift < (0.25 if dtype == "bfloat16" else 0.02)


def test_sharded_checkpoint(fx, tmp_path):
    paths = save_checkpoint(str(tmp_path), model_of(fx.path).config, weights_of(fx.path),
                            shards=3)
    assert len(paths) == 3 and all(os.path.isfile(p) for p in paths)
    assert not os.path.exists(tmp_path / "model.safetensors")
    with open(tmp_path / "model.safetensors.index.json", encoding="utf-8") as f:
        assert set(json.load(f)["weight_map"].values()) == {os.path.basename(p) for p in paths}
    gen = generate(ReferenceModel(open_model(str(tmp_path))), [fx.prompt_a], fx.n_new)
    assert gen.tokens[0].tolist() == fx.ref["greedy_generate"]
    assert maxdiff(gen.decode_logits[0], fx.npy("ref_decode_logits.npy")) < TOL
    assert maxdiff(gen.prompt_logits[0], fx.npy("ref_logits.npy")[0]) < TOL


def test_tied_embeddings(fx, tmp_path):
    base = model_of(fx.path).config
    w = weights_of(fx.path)
    w[LM_HEAD] = w[EMBED].copy()
    save_checkpoint(str(tmp_path / "untied"), base, w)
    save_checkpoint(str(tmp_path / "tied"), base, w, tied=True)
    tied = open_model(str(tmp_path / "tied"))
    assert tied.config.tie_word_embeddings
    assert LM_HEAD not in CheckpointReader(str(tmp_path / "tied")).files[0].entries
    untied = open_model(str(tmp_path / "untied"))
    assert not untied.config.tie_word_embeddings
    a = generate(ReferenceModel(tied), [fx.prompt_a, fx.prompt_b], fx.n_new)
    b = generate(ReferenceModel(untied), [fx.prompt_a, fx.prompt_b], fx.n_new)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.decode_logits, b.decode_logits)
    np.testing.assert_array_equal(a.prompt_logits, b.prompt_logits)
    # and the head is really the embedding, not the fixture's own lm_head
    assert maxdiff(a.prompt_logits[0], fx.npy("ref_logits.npy")[0]) > 0.1


# ---- sampling ---------------------------------------------------------------------------
def test_sampling_is_seeded(fx):
    model = model_of(fx.path)
    prompts = [fx.prompt_a, fx.prompt_b]

    def run(seed, temperature=1.5, top_p=0.9):
        return generate(model, prompts, 6, Sampler(temperature, top_p, seed)).tokens

    first = run(7)
    np.testing.assert_array_equal(first, run(7))
    assert not np.array_equal(first, run(8))
    assert not np.array_equal(first[0], first[1])
    greedy = np.array(fx.ref["greedy_generate_batch"])[:, :6]
    assert not np.array_equal(first, greedy)
    # a tiny nucleus keeps only the top token: greedy whatever the seed or temperature
    np.testing.assert_array_equal(run(3, 2.0, 1e-6), greedy)


def test_sampler_draws_from_the_nucleus():
    logits = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15]], np.float32))
    draws = np.array([Sampler(1.0, 1.0, seed).sample(logits, [0], 0)[0]
                      for seed in range(3000)])
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, [0.05, 0.4, 0.1, 0.3, 0.15], atol=0.03)
    # top_p 0.75: the smallest set of top tokens reaching 0.75 is {1, 3, 4} (0.85)
    draws = np.array([Sampler(1.0, 0.75, seed).sample(logits, [0], 0)[0]
                      for seed in range(1500)])
    assert set(draws.tolist()) == {1, 3, 4}
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq[[1, 3, 4]], np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.04)
    # a low temperature sharpens towards the argmax
    cold = [Sampler(0.02, 1.0, seed).sample(logits, [0], 0)[0] for seed in range(200)]
    assert set(cold) == {1}
    # greedy: argmax per row, lowest id on a tie
    two = np.array([[0.0, 2.0, 2.0], [5.0, 1.0, 5.0]], np.float32)
    assert Sampler().sample(two, [0, 1], 0).tolist() == [1, 0]
