"""The Qwen3 block math of mpipar.model.layers against direct formulas written here.

Each reference below is written independently of layers.py, in float64 with explicit
loops: per-row RMSNorm, RoPE as per-pair 2x2 rotations (and as a complex rotation), an
attention loop over heads and positions with the GQA head map h -> h // (Hq/Hkv) and a
causal mask, SwiGLU, the router as an explicit sort of softmax probabilities, and the MoE
as a loop over tokens and their chosen experts. Random data, odd sizes. Not an MPI test:
every rank runs it on its own.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpipar.model import layers as L

xp = np


def rng(seed):
    return np.random.default_rng(1000 + seed)


def f32(a):
    return np.asarray(a, dtype=np.float32)


# ---- independent formulas ------------------------------------------------------------
def ref_rms_norm(x, w, eps):
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        out[idx] = np.asarray(w, np.float64) * row / math.sqrt(sum(v * v for v in row) /
                                                             len(row) + eps)
    return out


def ref_rope_pairs(x, positions, theta):
    """x [T, H, D]: dimension i (< D/2) pairs with i + D/2, rotated by pos * theta^(-2i/D)."""
    x = np.asarray(x, np.float64)
    t, h, d = x.shape
    half = d // 2
    out = np.empty_like(x)
    for a in range(t):
        for i in range(half):
            ang = positions[a] * theta ** (-2.0 * i / d)
            rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
            for hh in range(h):
                out[a, hh, i], out[a, hh, i + half] = rot @ [x[a, hh, i], x[a, hh, i + half]]
    return out


def ref_rope_complex(x, positions, theta):
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    half = d // 2
    z = x[..., :half] + 1j * x[..., half:]
    freq = theta ** (-np.arange(half) * 2.0 / d)
    z = z * np.exp(1j * np.asarray(positions, np.float64)[:, None, None] * freq)
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_attention(q, k, v):
    """q [t, Hq, D], k/v [S, Hkv, D]; query a sits at position S - t + a."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    out = np.zeros((t, hq, d))
    for h in range(hq):
        kv = h // (hq // hkv)
        for a in range(t):
            pos = s - t + a
            scores = [float(q[a, h] @ k[j, kv]) / math.sqrt(d) for j in range(pos + 1)]
            m = max(scores)
            e = [math.exp(sc - m) for sc in scores]
            z = sum(e)
            for j in range(pos + 1):
                out[a, h] += e[j] / z * v[j, kv]
    return out


def ref_silu(x):
    x = np.asarray(x, np.float64)
    return x / (1.0 + np.exp(-x))


def ref_swiglu(x, wg, wu, wd):
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    out = np.zeros((x.shape[0], wd.shape[0]))
    for n in range(x.shape[0]):
        hidden = [ref_silu(wg[i] @ x[n]) * (wu[i] @ x[n]) for i in range(wg.shape[0])]
        out[n] = wd @ np.array(hidden)
    return out


def ref_router(x, w, k, renorm):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    experts, weights = [], []
    for n in range(x.shape[0]):
        logit = [float(w[e] @ x[n]) for e in range(w.shape[0])]
        m = max(logit)
        z = sum(math.exp(v - m) for v in logit)
        p = [math.exp(v - m) / z for v in logit]
        chosen = sorted(range(len(p)), key=lambda e: (-p[e], e))[:k]
        ws = [p[e] for e in chosen]
        if renorm:
            ws = [v / sum(ws) for v in ws]
        experts.append(chosen)
        weights.append(ws)
    return np.array(experts), np.array(weights)


# ---- tests ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 22), (1, 1)])
def test_rms_norm(shape):
    r = rng(1)
    x = f32(r.normal(size=shape) * 3 + 0.5)
    w = f32(1 + 0.3 * r.normal(size=shape[-1]))
    got = L.rms_norm(xp, x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_rms_norm(x, w, 1e-6), rtol=2e-5, atol=2e-6)


def test_rms_norm_eps_matters():
    x = f32([[1e-3, -2e-3, 3e-3]])
    w = f32([1.0, 2.0, 0.5])
    np.testing.assert_allclose(L.rms_norm(xp, x, w, 1e-4), ref_rms_norm(x, w, 1e-4), rtol=1e-5)


def test_silu_and_softmax():
    r = rng(2)
    x = f32(r.normal(size=(5, 11)) * 4)
    np.testing.assert_allclose(L.silu(xp, x), ref_silu(x), rtol=1e-5, atol=1e-6)
    big = x + f32(300)  # exp(300) overflows float32: the max must be subtracted first
    p = L.softmax(xp, big)
    assert np.all(np.isfinite(p))
    e = np.exp(big.astype(np.float64) - 300)
    np.testing.assert_allclose(p, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    p0 = L.softmax(xp, x, axis=0)
    e0 = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(p0, e0 / e0.sum(0, keepdims=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("d,theta", [(16, 1e6), (6, 10000.0), (34, 500.0)])
def test_rope_matches_pair_rotations(d, theta):
    r = rng(3)
    positions = np.array([0, 1, 2, 9, 31, 200, 4099])
    x = f32(r.normal(size=(len(positions), 3, d)))
    cos, sin = L.rope_cos_sin(xp, positions, d, theta)
    assert cos.shape == sin.shape == (len(positions), d) and cos.dtype == np.float32
    got = L.apply_rope(xp, x, cos, sin)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, ref_rope_pairs(x, positions, theta), atol=2e-5)
    np.testing.assert_allclose(got, ref_rope_complex(x, positions, theta), atol=2e-5)
    # position 0 is the identity; rotations keep each pair's norm
    np.testing.assert_allclose(got[0], x[0], atol=1e-7)
    h = d // 2
    np.testing.assert_allclose(got[..., :h] ** 2 + got[..., h:] ** 2,
                               x[..., :h] ** 2 + x[..., h:] ** 2, rtol=1e-4, atol=1e-6)


def test_rope_relative_position():
    """q.k after RoPE depends only on the distance between the two positions."""
    r = rng(4)
    d = 10
    q, k = f32(r.normal(size=(1, 1, d))), f32(r.normal(size=(1, 1, d)))

    def dot(pq, pk):
        cq, sq = L.rope_cos_sin(xp, np.array([pq]), d, 1e4)
        ck, sk = L.rope_cos_sin(xp, np.array([pk]), d, 1e4)
        return float(np.sum(L.apply_rope(xp, q, cq, sq) * L.apply_rope(xp, k, ck, sk)))

    assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-4)
    assert dot(7, 3) != pytest.approx(dot(8, 3), abs=1e-3)


@pytest.mark.parametrize("t,s,hq,hkv,d", [
    (9, 9, 6, 2, 8),     # prefill, groups of 3
    (1, 13, 4, 1, 6),    # decode: one query over a longer cache (MQA)
    (3, 11, 5, 5, 4),    # chunk of 3 queries against 11 keys, MHA
    (5, 7, 8, 2, 10),    # chunk, groups of 4
])
def test_causal_gqa_attention(t, s, hq, hkv, d):
    r = rng(5 + t)
    q = f32(r.normal(size=(t, hq, d)) * 1.5)
    k = f32(r.normal(size=(s, hkv, d)) * 1.5)
    v = f32(r.normal(size=(s, hkv, d)))
    got = L.causal_gqa_attention(xp, q, k, v)
    assert got.shape == (t, hq, d) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_attention(q, k, v), rtol=1e-4, atol=2e-6)


def test_attention_gqa_head_map():
    """Query head h reads kv head h // (Hq/Hkv): the consecutive-group layout, not h % Hkv."""
    hq, hkv, d, s = 6, 3, 4, 5
    q = np.zeros((1, hq, d), np.float32)
    k = np.zeros((s, hkv, d), np.float32)
    v = np.zeros((s, hkv, d), np.float32)
    v[:, :, 0] = np.arange(hkv)[None, :]  # each kv head's values carry its index
    got = L.causal_gqa_attention(xp, q, k, v)
    np.testing.assert_allclose(got[0, :, 0], [h // (hq // hkv) for h in range(hq)], atol=1e-6)


@pytest.mark.parametrize("s,hq,hkv,d,cuts", [
    (11, 4, 2, 6, (0, 4, 5, 11)),
    (300, 2, 1, 4, (0, 100, 250, 300)),   # boundaries inside the whole pass's 128-query blocks
])
def test_attention_chunks_equal_whole_prefill(s, hq, hkv, d, cuts):
    """Prefill in chunks through a KVCache equals one pass over the whole prompt, and both
    equal the loop over positions."""
    r = rng(6 + s)
    q = f32(r.normal(size=(s, hq, d)) * 2)
    k = f32(r.normal(size=(s, hkv, d)) * 2)
    v = f32(r.normal(size=(s, hkv, d)))
    whole = L.causal_gqa_attention(xp, q, k, v)
    cache = L.KVCache(xp, s, hkv, d)
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        kk, vv = cache.append(k[a:b], v[a:b])
        parts.append(L.causal_gqa_attention(xp, q[a:b], kk, vv))
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole, ref_attention(q, k, v), rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("t,s,block", [
    (300, 300, 128),   # a prompt of three query blocks: 128, 128, 44
    (200, 330, 128),   # a chunk after 130 cached positions: its blocks end mid-sequence
    (23, 29, 5),       # many small uneven blocks, offset by 6
])
def test_attention_query_blocks(t, s, block):
    """The query-block loop past its first block, against the loop over positions."""
    r = rng(40 + t)
    q = f32(r.normal(size=(t, 2, 4)) * 2)
    k = f32(r.normal(size=(s, 1, 4)) * 2)
    v = f32(r.normal(size=(s, 1, 4)))
    got = L.causal_gqa_attention(xp, q, k, v, block=block)
    np.testing.assert_allclose(got, ref_attention(q, k, v), rtol=1e-4, atol=2e-6)


def test_swiglu():
    r = rng(7)
    n, h, i = 5, 13, 21
    x = f32(r.normal(size=(n, h)))
    wg, wu = f32(r.normal(size=(i, h)) / 3), f32(r.normal(size=(i, h)) / 3)
    wd = f32(r.normal(size=(h, i)) / 4)
    got = L.swiglu(xp, x, wg, wu, wd)
    assert got.shape == (n, h)
    np.testing.assert_allclose(got, ref_swiglu(x, wg, wu, wd), rtol=1e-4, atol=1e-5)
    # an intermediate slice gives a partial sum: the slices add up to the whole
    cuts = [0, 6, 7, 21]
    parts = sum(L.swiglu(xp, x, wg[a:b], wu[a:b], wd[:, a:b])
                for a, b in zip(cuts[:-1], cuts[1:], strict=True))
    np.testing.assert_allclose(parts, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("n_exp,k", [(7, 2), (8, 3), (5, 1), (3, 3)])
def test_router_topk(renorm, n_exp, k):
    r = rng(8 + n_exp + k)
    x = f32(r.normal(size=(17, 9)))
    w = f32(r.normal(size=(n_exp, 9)))
    experts, weights = L.router_topk(xp, x, w, k, renorm)
    assert experts.shape == weights.shape == (17, k)
    assert experts.dtype == np.int64 and weights.dtype == np.float32
    want_e, want_w = ref_router(x, w, k, renorm)
    np.testing.assert_array_equal(experts, want_e)
    np.testing.assert_allclose(weights, want_w, rtol=1e-5, atol=1e-7)
    if renorm:
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    else:
        assert np.all(weights.sum(-1) <= 1.0 + 1e-6)


def test_router_ties_pick_the_lower_expert():
    x = f32([[1.0, 0.0]])
    w = f32([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [2.0, 0.0], [-1.0, 0.0]])  # logits 0,2,0,2,-1
    experts, weights = L.router_topk(xp, x, w, 3, False)
    np.testing.assert_array_equal(experts, [[1, 3, 0]])
    assert weights[0, 0] == weights[0, 1]


def ref_experts(x, experts, weights, expert_weights, first=0):
    out = np.zeros(x.shape, np.float64)
    for n in range(x.shape[0]):
        for slot in range(experts.shape[1]):
            e = int(experts[n, slot]) - first
            if 0 <= e < len(expert_weights):
                out[n] += weights[n, slot] * ref_swiglu(x[n:n + 1], *expert_weights[e])[0]
    return out


def test_experts_forward():
    r = rng(9)
    n, h, m, n_exp, k = 19, 11, 5, 7, 2
    x = f32(r.normal(size=(n, h)))
    ew = [(f32(r.normal(size=(m, h)) / 2), f32(r.normal(size=(m, h)) / 2),
           f32(r.normal(size=(h, m)) / 2)) for _ in range(n_exp)]
    router = f32(r.normal(size=(n_exp, h)) * 2)
    experts, weights = L.router_topk(xp, x, router, k, True)
    got = L.experts_forward(xp, x, experts, weights, ew)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_experts(x, experts, weights, ew), rtol=1e-4, atol=1e-5)
    # expert-parallel pieces (first_expert offsets, one empty) add up to the whole
    total = np.zeros_like(got)
    for a, b in ((0, 3), (3, 4), (4, 7)):
        part = L.experts_forward(xp, x, experts, weights, ew[a:b], first_expert=a)
        np.testing.assert_allclose(part, ref_experts(x, experts, weights, ew[a:b], a),
                                   rtol=1e-4, atol=1e-5)
        total += part
    np.testing.assert_allclose(total, got, rtol=1e-5, atol=1e-5)
    # experts this rank does not hold contribute nothing (and do not fail)
    elsewhere = np.full((n, k), n_exp + 5, np.int64)
    assert np.all(L.experts_forward(xp, x, elsewhere, weights, ew) == 0)


def test_kv_cache():
    r = rng(10)
    c = L.KVCache(xp, 6, 3, 4)
    assert c.length == 0 and c.k.shape == (6, 3, 4) and c.nbytes == 2 * 6 * 3 * 4 * 4
    k1, v1 = f32(r.normal(size=(4, 3, 4))), f32(r.normal(size=(4, 3, 4)))
    kk, vv = c.append(k1, v1)
    assert c.length == 4
    np.testing.assert_array_equal(kk, k1)
    np.testing.assert_array_equal(vv, v1)
    k2, v2 = f32(r.normal(size=(2, 3, 4))), f32(r.normal(size=(2, 3, 4)))
    kk, vv = c.append(k2, v2)
    assert c.length == 6 and kk.shape == (6, 3, 4)
    np.testing.assert_array_equal(kk, np.concatenate([k1, k2]))
    np.testing.assert_array_equal(vv, np.concatenate([v1, v2]))
    with pytest.raises(ValueError, match="full"):
        c.append(k2[:1], v2[:1])
    assert c.length == 6  # a refused append leaves the cache as it was


def test_kv_cache_overflow_in_one_append():
    c = L.KVCache(xp, 3, 1, 2)
    with pytest.raises(ValueError, match="capacity 3"):
        c.append(np.zeros((4, 1, 2), np.float32), np.zeros((4, 1, 2), np.float32))
    assert c.length == 0


def ref_attention_block(x, w, positions, eps, theta, cache_k=None, cache_v=None):
    """One sequence: x [t, h] at the given positions, earlier keys/values cached."""
    d = w.q_norm.shape[0]
    t = x.shape[0]
    q = (np.asarray(x, np.float64) @ np.asarray(w.q, np.float64).T).reshape(t, -1, d)
    k = (np.asarray(x, np.float64) @ np.asarray(w.k, np.float64).T).reshape(t, -1, d)
    v = (np.asarray(x, np.float64) @ np.asarray(w.v, np.float64).T).reshape(t, -1, d)
    q = ref_rope_complex(ref_rms_norm(q, w.q_norm, eps), positions, theta)
    k = ref_rope_complex(ref_rms_norm(k, w.k_norm, eps), positions, theta)
    if cache_k is not None:
        k, v = np.concatenate([cache_k, k]), np.concatenate([cache_v, v])
    o = ref_attention(q, k, v).reshape(t, -1)
    return o @ np.asarray(w.o, np.float64).T, k, v


def test_attention_packed_sequences_with_caches():
    """attention(): q/k norms before RoPE, per-sequence positions, packed segments."""
    r = rng(11)
    h, hq, hkv, d, eps, theta = 13, 6, 2, 8, 1e-6, 1e4
    w = L.AttentionWeights(
        q=f32(r.normal(size=(hq * d, h)) / 3), k=f32(r.normal(size=(hkv * d, h)) / 3),
        v=f32(r.normal(size=(hkv * d, h)) / 3), o=f32(r.normal(size=(h, hq * d)) / 5),
        q_norm=f32(1 + 0.3 * r.normal(size=d)), k_norm=f32(1 + 0.3 * r.normal(size=d)))
    caches = [L.KVCache(xp, 12, hkv, d) for _ in range(2)]
    lens = (5, 3)
    x = f32(r.normal(size=(sum(lens), h)))
    segs = [(0, 0, 5), (1, 5, 3)]
    got = L.attention(xp, x, w, caches, segs, d, eps, theta)
    assert got.shape == (8, h)
    ref_k, ref_v = [], []
    for _seq, start, rows in segs:
        want, kk, vv = ref_attention_block(x[start:start + rows], w, np.arange(rows), eps,
                                           theta)
        np.testing.assert_allclose(got[start:start + rows], want, rtol=2e-4, atol=2e-5)
        ref_k.append(kk)
        ref_v.append(vv)
    assert [c.length for c in caches] == list(lens)
    # decode: one new token per sequence (order swapped in the packing) at the next position
    x2 = f32(r.normal(size=(2, h)))
    got2 = L.attention(xp, x2, w, caches, [(1, 0, 1), (0, 1, 1)], d, eps, theta)
    for row, seq in ((0, 1), (1, 0)):
        want, _, _ = ref_attention_block(x2[row:row + 1], w, np.array([lens[seq]]), eps, theta,
                                         ref_k[seq], ref_v[seq])
        np.testing.assert_allclose(got2[row:row + 1], want, rtol=2e-4, atol=2e-5)
    assert [c.length for c in caches] == [6, 4]


def ref_llama3_freqs(d, theta, factor, lo, hi, old_len):
    """Meta's apply_scaling (llama3 RoPE), one frequency at a time in Python floats."""
    out = []
    for i in range(d // 2):
        freq = 1.0 / theta ** (2 * i / d)
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / hi:
            out.append(freq)
        elif wavelen > old_len / lo:
            out.append(freq / factor)
        else:
            smooth = (old_len / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def test_llama3_rope_scaling_in_each_regime():
    """High frequencies kept, low ones / factor, the middle blended: every regime occurs."""
    d, theta = 16, 1e4
    s = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=512)
    got = L.rope_inv_freq(xp, d, theta, s)
    plain = L.rope_inv_freq(xp, d, theta)
    np.testing.assert_allclose(got, ref_llama3_freqs(d, theta, 8.0, 1.0, 4.0, 512),
                               rtol=1e-12)
    ratio = plain / got
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(8.0)
    assert any(1.0 < r < 8.0 for r in ratio)  # a blended frequency
    np.testing.assert_array_equal(L.rope_inv_freq(xp, d, theta, None), plain)


def test_linear_rope_scaling_divides_positions():
    d, theta, f = 12, 1e4, 4.0
    positions = np.array([0, 3, 8, 100])
    cos, sin = L.rope_cos_sin(xp, positions, d, theta, {"rope_type": "linear", "factor": f})
    want_cos, want_sin = L.rope_cos_sin(xp, positions / f, d, theta)
    np.testing.assert_allclose(cos, want_cos, atol=1e-7)
    np.testing.assert_allclose(sin, want_sin, atol=1e-7)


def test_attention_with_biases_and_no_qk_norm():
    """Llama / Qwen2: x @ W.T + b for q, k, v (and o), no q/k norm, scaled RoPE."""
    r = rng(12)
    h, hq, hkv, d, eps, theta = 11, 4, 2, 6, 1e-6, 1e4
    scaling = {"rope_type": "linear", "factor": 2.0}
    w = L.AttentionWeights(
        q=f32(r.normal(size=(hq * d, h)) / 3), k=f32(r.normal(size=(hkv * d, h)) / 3),
        v=f32(r.normal(size=(hkv * d, h)) / 3), o=f32(r.normal(size=(h, hq * d)) / 5),
        q_bias=f32(r.normal(size=hq * d)), k_bias=f32(r.normal(size=hkv * d)),
        v_bias=f32(r.normal(size=hkv * d)), o_bias=f32(r.normal(size=h)))
    x = f32(r.normal(size=(7, h)))
    got = L.attention(xp, x, w, [L.KVCache(xp, 7, hkv, d)], [(0, 0, 7)], d, eps, theta,
                      scaling)
    x64 = np.asarray(x, np.float64)

    def proj(wt, b):
        return x64 @ np.asarray(wt, np.float64).T + b
    pos = np.arange(7) / 2.0  # linear scaling: positions / factor
    q = ref_rope_complex(proj(w.q, w.q_bias).reshape(7, hq, d), pos, theta)
    k = ref_rope_complex(proj(w.k, w.k_bias).reshape(7, hkv, d), pos, theta)
    v = proj(w.v, w.v_bias).reshape(7, hkv, d)
    want = ref_attention(q, k, v).reshape(7, -1) @ np.asarray(w.o, np.float64).T + w.o_bias
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_swiglu_with_biases():
    r = rng(13)
    h, i = 9, 14
    x = f32(r.normal(size=(5, h)))
    wg, wu, wd = (f32(r.normal(size=s) / 3) for s in ((i, h), (i, h), (h, i)))
    bg, bu, bd = f32(r.normal(size=i)), f32(r.normal(size=i)), f32(r.normal(size=h))
    g, u = x @ wg.T + bg, x @ wu.T + bu
    want = (g / (1 + np.exp(-g)) * u) @ wd.T + bd
    np.testing.assert_allclose(L.swiglu(xp, x, wg, wu, wd, (bg, bu, bd)), want, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(L.swiglu(xp, x, wg, wu, wd, (bg, bu, None)), want - bd,
                               rtol=1e-4, atol=1e-5)
