"""A WeightSource written as a GGUF file with the gguf package (tests and fixtures): the
inverse of model/gguf.py's names, llama.cpp's q/k permutation for ``llama``, weights
quantized by ``gguf.quants.quantize`` (or raw blocks for types it cannot write)."""

from __future__ import annotations

import re

import numpy as np

from .checkpoint import WeightSource
from .gguf import ARCHITECTURES, EXPERT_NAMES, LAYER_NAMES, PERMUTED_QK, TOP_NAMES, permute_rows


def gguf_name(name: str) -> tuple[str, int | None]:
    """Hugging Face name -> (GGUF name, expert index or None); the inverse of the reader's."""
    top = {v: k for k, v in TOP_NAMES.items()}
    if name in top:
        return top[name], None
    m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.(weight|bias)$", name)
    if m:
        exps = {v: k for k, v in EXPERT_NAMES.items()}
        return f"blk.{m.group(1)}.{exps[m.group(3)]}.{m.group(4)}", int(m.group(2))
    m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    layer = {v: k for k, v in LAYER_NAMES.items()}
    if not m or m.group(2) not in layer:
        raise KeyError(f"no GGUF name for {name}")
    return f"blk.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}", None


def write_gguf(path: str, source: WeightSource, qtype: str = "F32", arch: str | None = None,
               tokens=None, merges=None, token_types=None, meta: dict | None = None,
               raw: dict | None = None) -> None:
    """Write ``source``'s tensors as a GGUF file the way llama.cpp's converter does: 2-D and
    3-D weights as ``qtype`` (quantized by gguf.quants), 1-D tensors (norms, biases) F32,
    experts stacked [E, out, in], q/k rows permuted for PERMUTED_QK architectures, config
    metadata under ``arch`` (default: from model_type), an optional gpt2 tokenizer.
    ``raw``: HF name -> (uint8 block bytes [rows, row_bytes], ggml type name) written as
    they are (a type gguf.quants cannot quantize: K-quants)."""
    import gguf
    c = source.config
    arch = arch or {v: k for k, v in ARCHITECTURES.items()}[c.model_type]
    qt = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    if c.is_moe:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if tokens is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_merges(merges or [])
        w.add_token_types(token_types or [1] * len(tokens))
    for key, value in (meta or {}).items():
        w.add_key_value(key, value[0], value[1])
    stacked: dict[str, list] = {}
    for name in source.names():
        g, e = gguf_name(name)
        if raw and name in raw:
            data, kind = raw[name]
            w.add_tensor(g, data, raw_dtype=gguf.GGMLQuantizationType[kind])
            continue
        a = source.read(name, dtype="float32")
        heads = {"q_proj": c.num_heads, "k_proj": c.num_kv_heads}.get(name.split(".")[-2])
        if arch in PERMUTED_QK and heads and "self_attn" in name:
            a = permute_rows(a, heads)
        if e is not None:
            stacked.setdefault(g, []).append(a)
            if len(stacked[g]) < c.num_experts:
                continue
            a = np.stack(stacked.pop(g))
        if a.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(g, np.ascontiguousarray(a, dtype=np.float32))
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(g, a.astype(np.float16))
        else:
            w.add_tensor(g, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
