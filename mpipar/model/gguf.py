"""GGUF checkpoints (llama.cpp's single-file format), read with the ``gguf`` package.

``GGUFSource(path)`` is a WeightSource: the ModelConfig comes from the file's metadata,
tensors are served under the Hugging Face names the rest of mpipar uses, dequantized to
float32 (then cast to the asked dtype) by ``gguf.quants.dequantize``, ggml's own reference
dequantizers. Nothing here parses GGUF bytes: ``gguf.GGUFReader`` memory-maps the file and
gives each tensor as a numpy view, and a read dequantizes only the rows it needs.

Names (GGUF -> Hugging Face), N a layer, e an expert:
  token_embd.weight -> model.embed_tokens.weight     output_norm -> model.norm
  output.weight -> lm_head.weight (absent: tied)     blk.N.attn_norm -> ...input_layernorm
  blk.N.attn_{q,k,v}.{weight,bias} -> model.layers.N.self_attn.{q,k,v}_proj.*
  blk.N.attn_output -> self_attn.o_proj              blk.N.attn_{q,k}_norm -> self_attn.{q,k}_norm
  blk.N.ffn_norm -> post_attention_layernorm         blk.N.ffn_{gate,up,down} -> mlp.*_proj
  blk.N.ffn_gate_inp -> mlp.gate (router)            blk.N.ffn_{gate,up,down}_exps [E, out, in]
                                                       -> mlp.experts.e.{gate,up,down}_proj
Config: ``{arch}.block_count``, ``.embedding_length``, ``.feed_forward_length``,
``.attention.head_count(_kv)``, ``.attention.layer_norm_rms_epsilon``, ``.rope.freq_base``,
``.context_length``, ``.attention.key_length`` (head_dim), ``.expert_count``,
``.expert_used_count``, ``.expert_feed_forward_length``; vocab = the token list's length;
tied when there is no ``output.weight``; a MoE layer is one with ``ffn_gate_inp`` (the others
are ``mlp_only_layers``). The dict is written in the Hugging Face key style and parsed by
``load_config``, the same path as a config.json: an architecture ModelConfig does not know
yet fails there, with the file named.

q/k rows: llama.cpp's convert_hf_to_gguf.py (LlamaModel.modify_tensors) permutes the rows of
``q_proj`` / ``k_proj`` (weights and biases) of ``llama`` models, per head, from the
Hugging Face "rotate half" order to ggml's interleaved pairs:
    w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)
(n_head = heads for q, kv heads for k). It is undone here exactly (a permutation of rows):
    w.reshape(n_head, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
qwen2 / qwen3 / qwen3moe are converted without the permutation.

Slices and what they cost: ggml blocks (32 or 256 values) run along a row, the last numpy
axis, the input dimension of an [out, in] weight. A slice of rows (a column-parallel TP
shard: q/k/v, gate/up, the vocab-parallel embedding and lm_head) dequantizes just those rows.
A slice of columns (a row-parallel shard: o_proj, down_proj) cannot be cut inside the blocks:
the rows asked for (all of them for ``[:, c0:c1]``) are dequantized whole and the columns
cut afterwards, so a rank holding 1/tp of o_proj / down_proj dequantizes the whole tensor
(tp times its share, in float32: ``rows*cols*4`` bytes transiently) while keeping only its
share. A permuted q/k slice is widened to whole heads. Reads are lazy, one tensor (slice)
at a time: the whole model is never held dequantized. Dequantized float32 weights take
4-8x the file's bytes of a 4/8-bit type.

The tokenizer and chat template of the metadata: gguf_tokenizer.py; a writer (tests,
fixtures): gguf_writer.py.
"""

from __future__ import annotations

import os
import re

import numpy as np

from .checkpoint import (
    EMBED,
    LM_HEAD,
    CheckpointError,
    WeightSource,
    as_dtype,
    expected_shapes,
    row_window,
)
from .config import ConfigError, ModelConfig, load_config

# GGUF general.architecture -> Hugging Face model_type
ARCHITECTURES = {"qwen3": "qwen3", "qwen3moe": "qwen3_moe", "llama": "llama", "qwen2": "qwen2"}
PERMUTED_QK = ("llama",)  # architectures whose q/k rows llama.cpp's converter permutes
SUPPORTED_TYPES = ("F32", "F16", "BF16", "F64", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
TOP_NAMES = {"token_embd.weight": EMBED, "output_norm.weight": "model.norm.weight",
        "output.weight": LM_HEAD}
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "ffn_gate_inp": "mlp.gate"}
EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj",
                "ffn_down_exps": "down_proj"}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_path(model: str) -> str | None:
    """``model`` if it is a .gguf file, the one .gguf of a folder without config.json,
    else None (a Hugging Face folder). A folder with several .gguf files is refused."""
    path = os.fspath(model)
    if os.path.isfile(path):
        return path if path.lower().endswith(".gguf") else None
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds {len(found)} .gguf files ({', '.join(found)}); "
                              "name one with --model FILE.gguf")
    return os.path.join(path, found[0]) if found else None


def open_gguf(path: str):
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF needs the gguf package "
                              "(pip install 'gguf>=0.17')") from None
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # truncated or corrupt: numpy/struct/enum errors from the reader
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None


def metadata(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    if isinstance(v, float):  # stored as float32: its shortest decimal (1e-05, not 9.99e-06)
        v = float(str(np.float32(v)))
    return v


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation on whole heads: rows of ``w`` are n_head heads."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (for tests and writers)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_config_dict(reader, path: str, tensor_names) -> dict:
    """The GGUF metadata as a Hugging Face config.json dict (older key style)."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")

    def get(key, default=None, required=False):
        v = metadata(reader, f"{arch}.{key}", default)
        if v is None and required:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else get("vocab_size")
    if vocab is None and "token_embd.weight" in tensor_names:
        vocab = tensor_names["token_embd.weight"][-1]  # ggml order: [hidden, vocab]
    layers = get("block_count", required=True)
    d = {"model_type": ARCHITECTURES[arch], "vocab_size": vocab,
         "hidden_size": get("embedding_length", required=True), "num_hidden_layers": layers,
         "num_attention_heads": get("attention.head_count", required=True),
         "num_key_value_heads": get("attention.head_count_kv"),
         "intermediate_size": get("feed_forward_length"),
         "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
         "rope_theta": get("rope.freq_base", 10000.0),
         "max_position_embeddings": get("context_length"),
         "tie_word_embeddings": "output.weight" not in tensor_names,
         "torch_dtype": "float32", "hidden_act": "silu"}
    if get("attention.key_length") is not None:
        d["head_dim"] = get("attention.key_length")
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        d["rope_scaling"] = {"rope_type": scaling, "type": scaling,
                             "factor": get("rope.scaling.factor", 1.0)}
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{path}: rope_freqs.weight (llama3 rope scaling stored as "
                              "frequency factors) is not supported")
    if any(n.endswith((".attn_q.bias", ".attn_k.bias", ".attn_v.bias"))
           for n in tensor_names):
        d["attention_bias"] = True
    if any(n.endswith(".ffn_down.bias") for n in tensor_names):
        d["mlp_bias"] = True
    if get("expert_count"):
        moe = {int(m.group(1)) for n in tensor_names
               if (m := _BLK.match(n)) and m.group(2) == "ffn_gate_inp"}
        d.update(num_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
                 moe_intermediate_size=get("expert_feed_forward_length"),
                 norm_topk_prob=bool(get("expert_weights_norm", True)),
                 decoder_sparse_step=1,
                 mlp_only_layers=[i for i in range(layers) if i not in moe])
    return {k: v for k, v in d.items() if v is not None}


class GGUFSource(WeightSource):
    """A .gguf file as a WeightSource (see the module docstring)."""

    def __init__(self, path: str, config: ModelConfig | None = None):
        self.path = os.fspath(path)
        self.reader = r = open_gguf(self.path)
        import gguf
        self._types = gguf.GGMLQuantizationType
        self._entries = {}  # HF name -> (ReaderTensor, expert index or None)
        self._shapes = {}
        ggml_shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
        self.arch = metadata(r, "general.architecture")
        if config is None:
            d = hf_config_dict(r, self.path, ggml_shapes)
            try:
                config = load_config(d, name=os.path.splitext(os.path.basename(self.path))[0])
            except ConfigError as e:
                raise CheckpointError(f"{self.path}: GGUF architecture {self.arch!r} "
                                      f"(model_type {d['model_type']}): {e}") from None
        self.config = config
        eos = metadata(r, "tokenizer.ggml.eos_token_id")
        self.eos_token_ids = [] if eos is None else [int(eos)]
        self.permuted = self.arch in PERMUTED_QK
        unknown = []
        for t in r.tensors:
            shape = tuple(int(x) for x in reversed(t.shape))  # numpy order
            if t.name in TOP_NAMES:
                self._add(TOP_NAMES[t.name], t, None, shape)
                continue
            m = _BLK.match(t.name)
            if m and m.group(2) in LAYER_NAMES:
                i, what, kind = m.groups()
                self._add(f"model.layers.{i}.{LAYER_NAMES[what]}.{kind}", t, None, shape)
            elif m and m.group(2) in EXPERT_NAMES and len(shape) == 3:
                i, what, kind = m.groups()
                for e in range(shape[0]):
                    self._add(f"model.layers.{i}.mlp.experts.{e}.{EXPERT_NAMES[what]}.{kind}",
                              t, e, shape[1:])
            else:
                unknown.append(t.name)
        if unknown:
            raise CheckpointError(f"{self.path}: tensor(s) with no mapping for architecture "
                                  f"{self.arch!r}: {', '.join(unknown[:8])}")
        self._validate()

    def _add(self, name, tensor, expert, shape):
        self._entries[name] = (tensor, expert)
        self._shapes[name] = shape

    def describe(self) -> str:
        return f"GGUF file {self.path}"

    def _validate(self):
        problems = []
        for name, shape in expected_shapes(self.config).items():
            if name not in self._shapes:
                problems.append(f"missing tensor {name} (expected shape {list(shape)})")
            elif self._shapes[name] != tuple(shape):
                problems.append(f"tensor {name} has shape {list(self._shapes[name])}, "
                                f"expected {list(shape)}")
        for t in self.reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                problems.append(f"tensor {t.name} has type {t.tensor_type.name}; supported: "
                                f"{', '.join(SUPPORTED_TYPES)}")
        if problems:
            problems = list(dict.fromkeys(problems))
            raise CheckpointError(f"GGUF file {self.path} does not match its metadata "
                                  f"({len(problems)} problem(s)):\n  "
                                  + "\n  ".join(problems[:8]))

    def stored_type(self, name: str) -> str:
        """The ggml type name (Q4_1, F32, ...) of a tensor."""
        return self._entries[self.resolve(name)][0].tensor_type.name

    def stored_dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float32)  # every type dequantizes to float32

    def _rows(self, key: str, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 (first axis of the HF shape) of tensor ``key``, float32."""
        from gguf.quants import dequantize
        t, e = self._entries[key]
        data = t.data if e is None else t.data[e]
        part = data[r0:r1]
        try:
            out = dequantize(np.asarray(part), t.tensor_type)
        except Exception as err:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {t.name} "
                                  f"({t.tensor_type.name}): {err}") from None
        return np.asarray(out, dtype=np.float32).reshape((r1 - r0, *self._shapes[key][1:]))

    def _qk_heads(self, key: str) -> int | None:
        """Heads of a permuted q/k weight or bias, else None."""
        if not self.permuted:
            return None
        if key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return self.config.num_heads
        if key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return self.config.num_kv_heads
        return None

    def read(self, name: str, index=None, dtype="float32") -> np.ndarray:
        key = self.resolve(name)
        shape = self._shapes[key]
        start, stop, local, rest = row_window(name, shape, index)
        heads = self._qk_heads(key)
        if heads is not None:  # widen to whole heads, undo the permutation, cut
            hd = shape[0] // heads
            h0, h1 = start // hd, -(-stop // hd)
            rows = unpermute_rows(self._rows(key, h0 * hd, h1 * hd), h1 - h0)
            rows = rows[start - h0 * hd:stop - h0 * hd]
        else:
            rows = self._rows(key, start, stop)
        out = rows[(local, *rest)]
        return np.array(out, dtype=np.float32 if dtype is None else as_dtype(dtype))

    def close(self):
        self.reader = None
