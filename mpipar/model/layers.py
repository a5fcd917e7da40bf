"""The math of one decoder block (Qwen3, Llama, Qwen2), written once against an array module
``xp``.

The single-process reference and the parallel engine both call these functions; the
parallel versions differ only in which slice of the weights they hold (fewer heads,
a slice of the intermediate dimension, some experts) and which collective follows.

Conventions (as transformers computes them):
- RMSNorm: ``w * x / sqrt(mean(x^2) + eps)``, in float32.
- Linear: ``x @ W.T + b``; a bias that is None (the family has none) is skipped.
- q_norm / k_norm (Qwen3): RMSNorm over head_dim, per head, after the projections,
  BEFORE RoPE; skipped when None (Llama, Qwen2).
- RoPE "rotate half": dimension i pairs with i + head_dim/2, inv_freq = theta^(-2i/d),
  scaled by ``rope_scaling`` where the config has one (``rope_inv_freq``).
- GQA: query head h reads kv head ``h // (n_heads / n_kv_heads)``.
- MLP: ``down(silu(gate(x)) * up(x))``; linear weights are [out, in] (x @ W.T).
- MoE router: softmax over all experts, top-k, optionally renormalised to sum to 1.

Tokens of several sequences are packed: activations are [N, hidden] for N tokens of
all sequences together; attention walks the sequences one by one through their caches.

Compute dtype (float32, bfloat16 or float16): weights, activations, the residual stream
and the KV cache are all in the model's dtype; these islands are computed in float32
and cast back, as transformers does: RMSNorm (the mean of squares), RoPE, the attention
softmax, the router's softmax and top-k weights, silu(gate)*up, and the weighted sum of
a token's experts. For float32 the casts are no-ops and the numbers are unchanged.
Matrix products go through ``matmul``: 16-bit inputs, float32 accumulation, the output
rounded to the compute dtype (see there for the NumPy and CuPy paths).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..backend import native_16bit_matmul, to_host

FLOAT32 = np.dtype(np.float32)


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def flatten_batch(token_lists, seq_ids=None):
    """[[ids of seq 0], [ids of seq 1], ...] -> ids [N], segments [(seq, start, rows)].

    ``seq_ids`` names the sequences of the lists (default 0, 1, ...): a segment's seq
    indexes the caches."""
    ids, segments, start = [], [], 0
    for seq, toks in zip(seq_ids or range(len(token_lists)), token_lists, strict=True):
        if len(toks):
            segments.append((seq, start, len(toks)))
            ids.extend(int(t) for t in toks)
            start += len(toks)
    return np.asarray(ids, dtype=np.int64), segments


def linear_weight(xp, w):
    """A [out, in] weight kept column-major: ``x @ w.T`` is then a plain row-major GEMM
    over a contiguous [in, out] matrix (about 3% faster prefill with OpenBLAS)."""
    w = xp.asarray(w)
    return xp.ascontiguousarray(w.T).T if w.ndim == 2 else w


def matmul(xp, a, b):
    """a @ b in the compute dtype: 16-bit operands, float32 accumulation, output rounded
    to the operands' dtype once (what cuBLAS does for a bf16/fp16 GEMM).

    Where the array module has no such GEMM (``backend.native_16bit_matmul``: NumPy never,
    its 16-bit matmul is an unblocked element loop; CuPy for batched products) the
    operands are widened to float32 for this product only, multiplied by the float32
    GEMM and the result rounded back: the same numbers up to summation order, the
    weights stay 16-bit in memory, the temporaries cost time and memory traffic."""
    if a.dtype != FLOAT32 and not native_16bit_matmul(xp, a.dtype, max(a.ndim, b.ndim)):
        return (a.astype(FLOAT32) @ b.astype(FLOAT32)).astype(a.dtype)
    return a @ b


def rms_norm(xp, x, w, eps):
    """x [..., d], w [d] -> [..., d]: normalised in float32, cast back, times w (in x's
    dtype, as transformers' Qwen3RMSNorm)."""
    xf = x.astype(FLOAT32, copy=False)
    var = xp.mean(xf * xf, axis=-1, keepdims=True)
    return (xf / xp.sqrt(var + eps)).astype(x.dtype, copy=False) * w


def silu(xp, x):
    return x / (1.0 + xp.exp(-x))


def softmax(xp, x, axis=-1):
    x = x - xp.max(x, axis=axis, keepdims=True)
    e = xp.exp(x)
    return e / xp.sum(e, axis=axis, keepdims=True)


def linear(xp, x, w, b=None):
    """x [N, in] @ w [out, in].T (+ b [out]) in the compute dtype."""
    y = matmul(xp, x, w.T)
    if b is not None:
        y += b
    return y


def rope_inv_freq(xp, head_dim, theta, scaling=None):
    """``_rope_inv_freq`` for a scaling dict (or None), computed once per model shape: the
    attention of every layer and sequence asks for it at every step."""
    items = tuple(sorted(scaling.items())) if scaling else ()
    return _rope_inv_freq(xp, head_dim, float(theta), items)


@functools.lru_cache(maxsize=32)
def _rope_inv_freq(xp, head_dim, theta, scaling_items):
    """The rotary frequencies [head_dim/2] (float64): theta^(-2i/d), then scaled.

    ``scaling`` None: plain RoPE. ``{"rope_type": "linear", "factor": f}``: every
    frequency / f (position p rotates as p/f). ``{"rope_type": "llama3", "factor": f,
    "low_freq_factor": lo, "high_freq_factor": hi, "original_max_position_embeddings": n}``
    (transformers' _compute_llama3_parameters): with wavelength w = 2*pi/freq, w < n/hi
    keeps freq, w > n/lo takes freq/f, and between them
    s = (n/w - lo)/(hi - lo) blends: (1 - s)*freq/f + s*freq."""
    scaling = dict(scaling_items)
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (xp.arange(0, half, dtype=xp.float64) * 2.0 / head_dim))
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        n = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv_freq
        scaled = xp.where(wavelen > n / lo, inv_freq / f, inv_freq)
        smooth = (n / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= n / hi) & (wavelen <= n / lo)
        return xp.where(medium, blended, scaled)
    if kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported")
    return inv_freq


def rope_cos_sin(xp, positions, head_dim, theta, scaling=None):
    """positions [T] int -> cos, sin [T, head_dim] (rotate-half layout, halves repeated)."""
    inv_freq = rope_inv_freq(xp, head_dim, theta, scaling)
    ang = xp.asarray(positions, dtype=xp.float64)[:, None] * inv_freq[None, :]  # [T, half]
    ang = xp.concatenate([ang, ang], axis=-1)
    return xp.cos(ang).astype(xp.float32), xp.sin(ang).astype(xp.float32)


def apply_rope(xp, x, cos, sin):
    """x [T, H, D]; cos, sin [T, D] float32 -> [T, H, D] in x's dtype (rotated in float32)."""
    half = x.shape[-1] // 2
    xf = x.astype(FLOAT32, copy=False)
    rotated = xp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype, copy=False)


def swiglu(xp, x, w_gate, w_up, w_down, biases=None):
    """x [N, h]; w_gate, w_up [I, h]; w_down [h, I] -> [N, h] (partial sum if I is a slice).
    silu(gate) * up in float32, rounded once to x's dtype. ``biases``: None or
    (b_gate [I], b_up [I], b_down [h] or None) -- a row-parallel caller passes None for
    b_down and adds it once after its all-reduce."""
    bg, bu, bd = biases or (None, None, None)
    gate = linear(xp, x, w_gate, bg).astype(FLOAT32, copy=False)  # [N, I]
    act = silu(xp, gate)
    act *= linear(xp, x, w_up, bu)
    return linear(xp, act.astype(x.dtype, copy=False), w_down, bd)


def router_topk(xp, x, w_router, top_k, norm_topk_prob):
    """x [N, h], w_router [E, h] -> experts [N, k] int64, weights [N, k] float32.

    Softmax over all experts, then the k largest (ties: lower expert id first, as a
    stable sort of -p gives), renormalised when norm_topk_prob.
    """
    probs = softmax(xp, matmul(xp, x, w_router.T).astype(FLOAT32))  # [N, E] float32
    experts = xp.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = xp.take_along_axis(probs, experts, axis=-1)
    if norm_topk_prob:
        weights = weights / xp.sum(weights, axis=-1, keepdims=True)
    return experts.astype(xp.int64), weights.astype(xp.float32)


class KVCache:
    """Keys and values of one sequence for one layer: [capacity, n_kv_heads, head_dim]."""

    def __init__(self, xp, capacity, n_kv_heads, head_dim, dtype=FLOAT32):
        self.k = xp.zeros((capacity, n_kv_heads, head_dim), dtype=dtype)
        self.v = xp.zeros((capacity, n_kv_heads, head_dim), dtype=dtype)
        self.length = 0

    def append(self, k, v):
        """k, v [t, Hkv, D]; returns views of the whole cache so far [S, Hkv, D]."""
        t = k.shape[0]
        end = self.length + t
        if end > self.k.shape[0]:
            raise ValueError(f"KV cache full: {end} > capacity {self.k.shape[0]}")
        self.k[self.length:end] = k
        self.v[self.length:end] = v
        self.length = end
        return self.k[:end], self.v[:end]

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes


ATTENTION_BLOCK = 128  # query rows per block of causal_gqa_attention (the cost model's too)


def causal_gqa_attention(xp, q, k, v, block: int = ATTENTION_BLOCK):
    """Attention of the last t positions of a sequence over all S cached positions.

    q [t, Hq, D]; k, v [S, Hkv, D] with Hq % Hkv == 0 -> [t, Hq, D]. Query i sits at
    position S - t + i and sees keys 0 .. S - t + i (causal).

    Queries go in blocks of ``block``: a block scores only the keys up to its last
    query, so a long prefill computes about half of the [t, S] square instead of all of
    it, and masks only the block's own diagonal part. In place from the scores on: at
    long prompts they are the biggest array of a layer.

    Scores come out of ``matmul`` in the compute dtype (as in transformers); the scaling,
    mask and softmax run in float32 and the probabilities are rounded back for P @ V.
    """
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    g = hq // hkv
    qg = q.reshape(t, hkv, g, d).transpose(1, 2, 0, 3)  # [Hkv, g, t, D]
    kt = k.transpose(1, 2, 0)[:, None]  # [Hkv, 1, D, S]
    vt = v.transpose(1, 0, 2)[:, None]  # [Hkv, 1, S, D]
    out = xp.empty((hkv, g, t, d), dtype=q.dtype)  # [Hkv, g, t, D]
    for i0 in range(0, t, block):
        i1 = min(t, i0 + block)
        end = s - t + i1  # keys 0 .. end-1 are visible to some query of the block
        scores = matmul(xp, qg[:, :, i0:i1], kt[..., :end]).astype(FLOAT32, copy=False)
        scores *= 1.0 / float(d) ** 0.5  # [Hkv, g, b, end] float32
        if i1 - i0 > 1:
            future = xp.arange(end)[None, :] > xp.arange(s - t + i0, end)[:, None]  # [b, end]
            xp.copyto(scores, -xp.inf, where=future)
        scores -= xp.max(scores, axis=-1, keepdims=True)
        xp.exp(scores, out=scores)
        scores /= xp.sum(scores, axis=-1, keepdims=True)
        out[:, :, i0:i1] = matmul(xp, scores.astype(q.dtype, copy=False),
                                  vt[:, :, :end])  # [Hkv, g, b, D]
    return out.transpose(2, 0, 1, 3).reshape(t, hq, d)


@dataclass
class AttentionWeights:
    """One rank's slice of a block's attention: local heads Hq_l, local kv heads Hkv_l."""
    q: object  # [Hq_l*D, h]
    k: object  # [Hkv_l*D, h]
    v: object  # [Hkv_l*D, h]
    o: object  # [h, Hq_l*D]
    q_norm: object = None  # [D], or None: no q/k norm (Llama, Qwen2)
    k_norm: object = None  # [D]
    q_bias: object = None  # [Hq_l*D], or None: no bias
    k_bias: object = None  # [Hkv_l*D]
    v_bias: object = None  # [Hkv_l*D]
    o_bias: object = None  # [h]; None on a TP rank, which adds it after the all-reduce


def attention(xp, x, w: AttentionWeights, caches, segments, head_dim, eps, theta,
              rope_scaling=None):
    """Self-attention of packed tokens; returns o_proj output [N, h] (partial if sliced).

    x [N, h] (already normed); caches: one per sequence, anything with ``length`` and
    ``append(k, v) -> (K, V)`` (KVCache here, serve/kvpool.PagedKV); segments: list of
    (seq_index, start_row, n_rows) of x, in order. Each segment's tokens are the next
    positions of its sequence (appended to its cache).
    """
    n = x.shape[0]
    d = head_dim
    hq, hkv = w.q.shape[0] // d, w.k.shape[0] // d
    q = linear(xp, x, w.q, w.q_bias).reshape(n, hq, d)
    k = linear(xp, x, w.k, w.k_bias).reshape(n, hkv, d)
    v = linear(xp, x, w.v, w.v_bias).reshape(n, hkv, d)
    if w.q_norm is not None:
        q = rms_norm(xp, q, w.q_norm, eps)
    if w.k_norm is not None:
        k = rms_norm(xp, k, w.k_norm, eps)
    out = xp.empty_like(q)
    for seq, start, rows in segments:
        cache = caches[seq]
        pos = xp.arange(cache.length, cache.length + rows)
        cos, sin = rope_cos_sin(xp, pos, d, theta, rope_scaling)
        sl = slice(start, start + rows)
        kk, vv = cache.append(apply_rope(xp, k[sl], cos, sin), v[sl])
        out[sl] = causal_gqa_attention(xp, apply_rope(xp, q[sl], cos, sin), kk, vv)
    return linear(xp, out.reshape(n, hq * d), w.o, w.o_bias)


def count_per_expert(xp, sorted_experts, num_experts: int):
    """Expert ids sorted ascending [P] -> pairs per expert [num_experts] int, on the ids'
    device. Binary search of each expert's first pair: no host sync (cupy.bincount makes
    two, for its range checks)."""
    edges = xp.searchsorted(sorted_experts, xp.arange(num_experts + 1), side="left")
    return xp.diff(edges)


def grouped_experts(xp, rows, counts, expert_weights):
    """rows [R, h] sorted by expert, counts[e] (host ints) rows of held expert e -> [R, h].

    Only experts that received rows run; the slices come from the host counts, so the
    loop makes no device->host round-trip of its own."""
    out = xp.empty_like(rows)
    start = 0
    for n_rows, (wg, wu, wd) in zip(counts, expert_weights, strict=True):
        if n_rows:
            out[start:start + n_rows] = swiglu(xp, rows[start:start + n_rows], wg, wu, wd)
        start += int(n_rows)
    return out


def experts_forward(xp, x, experts, weights, expert_weights, first_expert=0):
    """Weighted sum of the chosen experts' SwiGLU MLPs, for the experts this rank holds.

    x [N, h]; experts, weights [N, k]; expert_weights: list of (gate, up, down) for experts
    first_expert .. first_expert+len-1 (whole or intermediate-sliced) -> [N, h].

    The N*k (token, expert) pairs are sorted by expert once; their counts per expert
    cross to the host (the layer's only sync), and each expert that got pairs runs on
    its rows. The
    k rows of a token are summed with the router weights in float32, rounded once.
    """
    n, k = experts.shape
    held = range(first_expert, first_expert + len(expert_weights))
    flat = experts.ravel()  # pair p = token p // k, slot p % k
    order = xp.argsort(flat, kind="stable")  # pairs sorted by expert, then token
    counts = to_host(count_per_expert(xp, flat[order], held.stop))  # [held.stop]
    first = int(counts[:held.start].sum())
    mine = order[first:first + int(counts[held.start:held.stop].sum())]
    y = grouped_experts(xp, x[mine // k], counts[held.start:held.stop], expert_weights)
    pair_out = xp.zeros((n * k, x.shape[1]), dtype=FLOAT32)  # [N*k, h]; other ranks' 0
    pair_out[mine] = y.astype(FLOAT32, copy=False) * weights.ravel()[mine][:, None]
    return pair_out.reshape(n, k, x.shape[1]).sum(axis=1).astype(x.dtype, copy=False)
