"""The single-process forward (qwen3, qwen3_moe, llama, qwen2): the oracle of every parallel run.

It holds every weight whole and calls the math of ``layers.py`` directly, with no
sharding and no communication. Every parallel result (tokens, logits) is checked
against it, and it is itself checked against the transformers-made fixtures.

    x = embed[ids]
    for each layer:  x += o_proj(attn(norm1(x)))
                     x += mlp(norm2(x))          (SwiGLU, or MoE: router top-k experts)
    logits = lm_head(norm(x))

``dtype`` (float32, bfloat16, float16, or "auto": see ``backend.compute_dtype``) is the
dtype of the weights, activations and KV cache; the logits leave as float32.
"""

from __future__ import annotations

import time

import numpy as np

from ..backend import compute_dtype, to_host
from . import layers as L
from .layers import flatten_batch, layer_prefix
from .sampling import Generation, Sampler, pad_prompt_logits


class ReferenceModel:
    def __init__(self, source, xp=np, dtype="float32"):
        self.config = cfg = source.config
        self.xp = xp
        self.dtype = dt = compute_dtype(dtype, xp, cfg.dtype)

        def read(name):
            return L.linear_weight(xp, source.read(name, dtype=dt))

        def maybe(name, present):
            return read(name) if present else None

        self.embed = xp.asarray(source.read("model.embed_tokens.weight", dtype=dt))  # [V, h]
        self.final_norm = read("model.norm.weight")
        self.lm_head = read("lm_head.weight")  # [V, h] (embed when tied)
        self.layers = []
        for i in range(cfg.num_layers):
            p = layer_prefix(i)
            a = p + "self_attn."
            layer = {
                "norm1": read(p + "input_layernorm.weight"),
                "norm2": read(p + "post_attention_layernorm.weight"),
                "attn": L.AttentionWeights(
                    read(a + "q_proj.weight"), read(a + "k_proj.weight"),
                    read(a + "v_proj.weight"), read(a + "o_proj.weight"),
                    q_norm=maybe(a + "q_norm.weight", cfg.qk_norm),
                    k_norm=maybe(a + "k_norm.weight", cfg.qk_norm),
                    q_bias=maybe(a + "q_proj.bias", cfg.qkv_bias),
                    k_bias=maybe(a + "k_proj.bias", cfg.qkv_bias),
                    v_bias=maybe(a + "v_proj.bias", cfg.qkv_bias),
                    o_bias=maybe(a + "o_proj.bias", cfg.o_bias)),
            }
            if cfg.is_moe_layer(i):
                layer["router"] = read(p + "mlp.gate.weight")
                layer["experts"] = [
                    tuple(read(f"{p}mlp.experts.{e}.{n}_proj.weight")
                          for n in ("gate", "up", "down"))
                    for e in range(cfg.num_experts)]
            else:
                layer["mlp"] = tuple(read(f"{p}mlp.{n}_proj.weight")
                                     for n in ("gate", "up", "down"))
                layer["mlp_bias"] = tuple(read(f"{p}mlp.{n}_proj.bias")
                                          for n in ("gate", "up", "down")) \
                    if cfg.mlp_bias else None
            self.layers.append(layer)

    def new_caches(self, n_seqs: int, capacity: int):
        """caches[layer][seq]."""
        c = self.config
        return [[L.KVCache(self.xp, capacity, c.num_kv_heads, c.head_dim, self.dtype)
                 for _ in range(n_seqs)] for _ in range(c.num_layers)]

    def mlp(self, i, x):
        layer, c, xp = self.layers[i], self.config, self.xp
        if "mlp" in layer:
            return L.swiglu(xp, x, *layer["mlp"], layer["mlp_bias"])
        experts, weights = L.router_topk(xp, x, layer["router"], c.num_experts_per_tok,
                                         c.norm_topk_prob)
        return L.experts_forward(xp, x, experts, weights, layer["experts"])

    def hidden(self, ids, segments, caches, layer_outputs=None):
        """ids [N] -> final-normed hidden [N, h]; appends to the caches."""
        c, xp = self.config, self.xp
        x = self.embed[xp.asarray(ids)]
        for i in range(len(self.layers)):
            x = self.block(i, x, caches[i], segments)
            if layer_outputs is not None:
                layer_outputs.append(x)
        return L.rms_norm(xp, x, self.final_norm, c.rms_norm_eps)

    def block(self, i, x, caches, segments):
        """Decoder layer i: x [N, h] -> [N, h]; caches: layer i's, one per sequence."""
        layer, c, xp = self.layers[i], self.config, self.xp
        h = L.rms_norm(xp, x, layer["norm1"], c.rms_norm_eps)
        x = x + L.attention(xp, h, layer["attn"], caches, segments, c.head_dim,
                            c.rms_norm_eps, c.rope_theta, c.rope_scaling_dict)
        return x + self.mlp(i, L.rms_norm(xp, x, layer["norm2"], c.rms_norm_eps))

    def logits(self, hidden):
        """[N, h] -> [N, V] float32 (computed in the model's dtype)."""
        return L.matmul(self.xp, hidden, self.lm_head.T).astype(np.float32, copy=False)


def generate(model: ReferenceModel, prompts, max_new_tokens: int,
             sampler: Sampler | None = None, keep_logits: bool = True) -> Generation:
    """Prefill every prompt, then decode one token at a time with the KV cache."""
    sampler = sampler or Sampler()
    n = len(prompts)
    if n == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    caches = model.new_caches(n, max(len(p) for p in prompts) + max_new_tokens)
    t0 = time.perf_counter()
    ids, segments = flatten_batch(prompts)
    logits = to_host(model.logits(model.hidden(ids, segments, caches)))
    last = np.array([start + rows - 1 for _, start, rows in segments])
    step_logits = logits[last]  # [B, V]
    prompt_logits = [logits[s:s + r] for _, s, r in segments] if keep_logits else None
    tokens = np.zeros((n, max_new_tokens), dtype=np.int64)
    decode_logits = []
    t_first = None
    for step in range(max_new_tokens):
        tokens[:, step] = sampler.sample(step_logits, range(n), step)
        if keep_logits:
            decode_logits.append(step_logits)
        if t_first is None:
            t_first = time.perf_counter()
        if step + 1 == max_new_tokens:
            break
        ids, segments = flatten_batch([[t] for t in tokens[:, step]])
        step_logits = to_host(model.logits(model.hidden(ids, segments, caches)))
    t_end = time.perf_counter()
    return Generation(
        tokens=tokens,
        prompt_logits=pad_prompt_logits(prompt_logits, model.config.vocab_size)
        if keep_logits else None,
        decode_logits=np.stack(decode_logits, axis=1) if keep_logits and decode_logits
        else None,
        ttft_s=(t_first or t_end) - t0,
        decode_s=t_end - (t_first or t_end))
