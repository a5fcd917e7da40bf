"""ModelConfig: the shape of a decoder (qwen3, qwen3_moe, llama, qwen2), from a Hugging Face
config or a preset.

One description for every family: the families differ only in switches, read here in
``_parse`` and nowhere else (the layers take the switches, never the model_type):

  model_type   qk_norm   qkv_bias             o_bias               mlp_bias
  qwen3(_moe)  true      attention_bias       attention_bias       false
  llama        false     attention_bias       attention_bias       mlp_bias
  qwen2        false     true                 false                false

(``attention_bias`` and ``mlp_bias`` are the config.json keys, default false.) Every
family reads ``rope_scaling`` (None or a dict with ``rope_type`` and its parameters,
from ``rope_parameters`` or the older ``rope_scaling`` key), which changes the
rotary frequencies once, in ``layers.rope_inv_freq``: ``linear`` divides them by
``factor`` (positions / factor); ``llama3`` divides the low frequencies by ``factor``,
keeps the high ones and interpolates between (transformers' _compute_llama3_parameters).

Two key styles of ``config.json`` are read (both name the same model):

  field (here)            transformers 5 style                older style (most Hub checkpoints)
  rope_theta              rope_parameters.rope_theta           rope_theta (top level)
  dtype                   dtype                                torch_dtype
  num_experts             num_local_experts                    num_experts

Other keys are common: vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
num_key_value_heads (default: num_attention_heads), head_dim (default hidden/heads; Qwen3
often has heads*head_dim != hidden, e.g. 0.6B: 16*128 = 2048 vs hidden 1024),
intermediate_size, rms_norm_eps, tie_word_embeddings, and for qwen3_moe
num_experts_per_tok, moe_intermediate_size, norm_topk_prob, decoder_sparse_step,
mlp_only_layers. Layer ``i`` is sparse (MoE) when ``i not in mlp_only_layers`` and
``(i+1) % decoder_sparse_step == 0``; otherwise it has a dense MLP of ``intermediate_size``.

Parameter count (cost/memory.py param_counts; biases and q/k norms where the switches say):
  attention  = hidden*(heads + 2*kv)*head_dim + heads*head_dim*hidden
               + 2*head_dim (qk_norm) + (heads + 2*kv)*head_dim (qkv_bias) + hidden (o_bias)
  dense MLP  = 3*hidden*intermediate (+ 2*intermediate + hidden with mlp_bias)
  MoE        = experts*3*hidden*moe_inter + experts*hidden
  total      = vocab*hidden*(1 if tied else 2) + hidden + layers*(attention + mlp + 2*hidden)
The presets' totals match the published sizes (0.6B: 0.60e9; 30B-A3B: 30.5e9, 3.3e9 active;
235B-A22B: 235e9, 22e9 active); tests/test_config.py checks this.

Every ModelConfig is validated when built: an impossible shape raises ConfigError naming
the field and its value.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from ..comm.dtypes import FLOAT_NAMES


class ConfigError(ValueError):
    """A config that cannot describe a supported model; the message names the field."""


MODEL_TYPES = ("qwen3", "qwen3_moe", "llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
# rope_type -> the parameters it needs (besides rope_theta)
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")}
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DTYPES = FLOAT_NAMES  # the one dtype table: comm/dtypes.py
# ModelConfig field -> Hugging Face key (for messages and for writing config.json)
HF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
           "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
           "intermediate_size": "intermediate_size", "rms_norm_eps": "rms_norm_eps",
           "rope_theta": "rope_theta", "tie_word_embeddings": "tie_word_embeddings",
           "num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
           "moe_intermediate_size": "moe_intermediate_size",
           "norm_topk_prob": "norm_topk_prob", "decoder_sparse_step": "decoder_sparse_step",
           "mlp_only_layers": "mlp_only_layers", "model_type": "model_type",
           "dtype": "torch_dtype", "max_position_embeddings": "max_position_embeddings"}


def _bad(name: str, value, why: str) -> ConfigError:
    hf = HF_KEYS.get(name, name)
    label = name if hf == name else f"{name} ({hf})"
    return ConfigError(f"{label} = {value!r}: {why}")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    # MoE (num_experts == 0: dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = field(default_factory=tuple)
    model_type: str = "qwen3"
    dtype: str = "float32"  # checkpoint dtype as declared (float32 | float16 | bfloat16)
    name: str = ""
    max_position_embeddings: int = 40960
    # family switches (module docstring); Qwen3 defaults
    qk_norm: bool = True  # RMSNorm of q and k per head before RoPE
    qkv_bias: bool = False  # biases of q_proj, k_proj, v_proj
    o_bias: bool = False  # bias of o_proj
    mlp_bias: bool = False  # biases of gate_proj, up_proj, down_proj (dense MLP)
    rope_scaling: tuple = ()  # () or sorted (key, value) pairs; see rope_scaling_dict

    def __post_init__(self):
        rs = self.rope_scaling
        if isinstance(rs, dict):
            rs = tuple(sorted(rs.items()))
        elif rs is None:
            rs = ()
        else:
            try:
                rs = tuple(sorted((str(k), v) for k, v in rs))
            except (TypeError, ValueError):
                raise _bad("rope_scaling", rs, "must be a dict of parameters") from None
        if rs and dict(rs).get("rope_type", "default") == "default":
            rs = ()
        object.__setattr__(self, "rope_scaling", rs)
        try:
            if isinstance(self.mlp_only_layers, (str, bytes)):
                raise TypeError
            layers = tuple(int(i) for i in (self.mlp_only_layers or ()))
        except (TypeError, ValueError):
            raise _bad("mlp_only_layers", self.mlp_only_layers,
                       "must be a list of layer indices") from None
        object.__setattr__(self, "mlp_only_layers", layers)
        if self.model_type == "qwen3" and self.num_experts > 0:
            object.__setattr__(self, "model_type", "qwen3_moe")
        self.validate()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen3-MoE rule: sparse when not in mlp_only_layers and (layer+1) % step == 0."""
        return (self.is_moe and layer not in self.mlp_only_layers
                and self.decoder_sparse_step > 0 and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def rope_scaling_dict(self) -> dict | None:
        """None (plain RoPE) or {"rope_type": "linear" | "llama3", parameters...}."""
        return dict(self.rope_scaling) or None

    # ---- derived sizes -------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise _bad("model_type", self.model_type, f"not supported (supported: "
                       f"{', '.join(MODEL_TYPES)})")
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise _bad(f, v, "must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise _bad("num_kv_heads", self.num_kv_heads, f"num_heads = {self.num_heads} is "
                       "not a multiple of it (GQA groups must be whole)")
        if self.head_dim % 2:
            raise _bad("head_dim", self.head_dim, "must be even (RoPE rotates half pairs)")
        for f in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise _bad(f, v, "must be a positive number")
        if self.rope_scaling:
            rs = dict(self.rope_scaling)
            kind = rs.get("rope_type")
            if kind not in ROPE_TYPES:
                raise _bad("rope_scaling.rope_type", kind,
                           f"not supported (supported: {', '.join(ROPE_TYPES)})")
            for k in ROPE_KEYS[kind]:
                v = rs.get(k)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                    raise _bad(f"rope_scaling.{k}", v, f"{kind} RoPE scaling needs a "
                               "positive number")
            if kind == "llama3" and rs["high_freq_factor"] <= rs["low_freq_factor"]:
                raise _bad("rope_scaling.high_freq_factor", rs["high_freq_factor"],
                           f"must exceed low_freq_factor = {rs['low_freq_factor']}")
        for f in ("tie_word_embeddings", "norm_topk_prob", "qk_norm", "qkv_bias", "o_bias",
                  "mlp_bias"):
            if not isinstance(getattr(self, f), bool):
                raise _bad(f, getattr(self, f), "must be true or false")
        if self.dtype not in DTYPES:
            raise _bad("dtype", self.dtype, f"not one of {', '.join(DTYPES)}")
        for f in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "intermediate_size", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise _bad(f, v, "must be a non-negative integer")
        if self.model_type == "qwen3_moe":
            if self.num_experts <= 0:
                raise _bad("num_experts", self.num_experts, "a qwen3_moe model needs experts")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise _bad("num_experts_per_tok", self.num_experts_per_tok,
                           f"must be in 1..num_experts = {self.num_experts}")
            if self.moe_intermediate_size <= 0:
                raise _bad("moe_intermediate_size", self.moe_intermediate_size,
                           "must be a positive integer")
            if self.decoder_sparse_step <= 0:
                raise _bad("decoder_sparse_step", self.decoder_sparse_step,
                           "must be a positive integer")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
            if bad:
                raise _bad("mlp_only_layers", list(self.mlp_only_layers),
                           f"layer(s) {bad} outside 0..{self.num_layers - 1}")
        if (any(not self.is_moe_layer(i) for i in range(self.num_layers))
                and self.intermediate_size <= 0):
            raise _bad("intermediate_size", self.intermediate_size,
                       "must be a positive integer (the model has dense MLP layers)")

    # ---- conversions ---------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-able dict of the fields (for reports); ModelConfig(**d) rebuilds it."""
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["rope_scaling"] = self.rope_scaling_dict
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)

    def to_hf(self, style: str = "v4") -> dict:
        """A Hugging Face config.json dict; style "v4" (rope_theta, torch_dtype,
        num_experts) or "v5" (rope_parameters, dtype, num_local_experts)."""
        d = {"architectures": [ARCHITECTURES[self.model_type]],
             "model_type": self.model_type, "hidden_act": "silu", "use_sliding_window": False}
        if self.model_type != "qwen2":  # qwen2: q, k, v biases always, none on o
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        moe_only = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                    "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")
        for f, key in HF_KEYS.items():
            if f not in ("model_type", "dtype", "rope_theta") and (self.is_moe
                                                                   or f not in moe_only):
                d[key] = getattr(self, f)
        if self.is_moe:
            d["mlp_only_layers"] = list(self.mlp_only_layers)
        if style == "v4":
            d.update(rope_theta=self.rope_theta, rope_scaling=self.rope_scaling_dict,
                     torch_dtype=self.dtype)
        elif style == "v5":
            rope = self.rope_scaling_dict or {"rope_type": "default"}
            d.update(rope_parameters={"rope_theta": self.rope_theta, **rope}, dtype=self.dtype)
            if self.is_moe:
                d["num_local_experts"] = d.pop("num_experts")
        else:
            raise ValueError(f"style must be 'v4' or 'v5', not {style!r}")
        return dict(sorted(d.items()))

    @classmethod
    def from_hf(cls, path_or_dict, name: str | None = None) -> ModelConfig:
        """From a config.json path, a model directory, or an already-parsed dict."""
        return load_config(path_or_dict, name=name)


def _read_json(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config {path}: top level is {type(d).__name__}, not an object")
    return d


def _rope(d: dict):
    """(rope_theta, rope_scaling dict or None) from either key style: transformers 5's
    ``rope_parameters`` {rope_theta, rope_type, ...} or the older top-level ``rope_theta``
    + ``rope_scaling`` {type | rope_type, ...}. Variants the math lacks (yarn, ...) are
    refused."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    found = None
    for key, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(p, dict):
            raise _bad(key, p, "must be an object")
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise _bad(f"{key}.rope_type", kind,
                       f"not supported (supported: {', '.join(ROPE_TYPES)})")
        if kind != "default" and found is None:
            found = {"rope_type": kind, **{k: p.get(k) for k in ROPE_KEYS[kind]}}
    if "rope_theta" in d:
        theta = d["rope_theta"]
    elif "rope_theta" in params:
        theta = params["rope_theta"]
    else:
        theta = 10000.0  # transformers' default (Qwen3Config, LlamaConfig, Qwen2Config)
    return theta, found


def _hf_get(d: dict, key: str, *alts, required=False, default=None):
    for k in (key, *alts):
        if d.get(k) is not None:
            return d[k]
    if required:
        names = " or ".join((key, *alts))
        raise ConfigError(f"missing required field {names}")
    return default


def load_config(path_or_dict, name: str | None = None) -> ModelConfig:
    """Parse a Hugging Face Qwen3 / Qwen3-MoE config (either key style) into ModelConfig."""
    where = ""
    if isinstance(path_or_dict, dict):
        d = path_or_dict
    else:
        path = os.fspath(path_or_dict)
        d = _read_json(path)
        where = path
        if name is None:
            base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
            name = os.path.basename(os.path.normpath(base))
    try:
        return _parse(d, name or "")
    except ConfigError as e:
        if where:
            raise ConfigError(f"config {where}: {e}") from None
        raise


def _parse(d: dict, name: str) -> ModelConfig:
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise _bad("model_type", mt, f"not supported (supported: {', '.join(MODEL_TYPES)})")
    if d.get("use_sliding_window", False) not in (False, None):
        raise _bad("use_sliding_window", d["use_sliding_window"], "only false is supported")
    for key in ("attention_bias", "mlp_bias"):
        if not isinstance(d.get(key, False), bool) and d.get(key) is not None:
            raise _bad(key, d[key], "must be true or false")
    if d.get("hidden_act", "silu") != "silu":
        raise _bad("hidden_act", d["hidden_act"], "only silu is supported")
    if d.get("quantization_config"):
        raise _bad("quantization_config", d["quantization_config"].get("quant_method"),
                   "quantized checkpoints are not supported (use the bf16 release)")
    kinds = set(d.get("layer_types") or ()) - {"full_attention"}
    if kinds:
        raise _bad("layer_types", sorted(kinds), "only full_attention is supported")
    # the family switches, here and nowhere else (module docstring's table)
    attention_bias = bool(d.get("attention_bias") or False)
    switches = {
        "qwen3": dict(qk_norm=True, qkv_bias=attention_bias, o_bias=attention_bias),
        "llama": dict(qk_norm=False, qkv_bias=attention_bias, o_bias=attention_bias,
                      mlp_bias=bool(d.get("mlp_bias") or False)),
        "qwen2": dict(qk_norm=False, qkv_bias=True, o_bias=False),
    }["qwen3" if mt == "qwen3_moe" else mt]
    theta, scaling = _rope(d)
    req = dict(required=True)
    hidden = _hf_get(d, "hidden_size", **req)
    heads = _hf_get(d, "num_attention_heads", **req)
    kw = dict(
        vocab_size=_hf_get(d, "vocab_size", **req), hidden_size=hidden,
        num_layers=_hf_get(d, "num_hidden_layers", **req), num_heads=heads,
        num_kv_heads=_hf_get(d, "num_key_value_heads", default=heads),
        rms_norm_eps=_hf_get(d, "rms_norm_eps", default=1e-6),
        rope_theta=theta, rope_scaling=scaling,
        tie_word_embeddings=_hf_get(d, "tie_word_embeddings", default=False),
        model_type=mt, dtype=_hf_get(d, "torch_dtype", "dtype", default="float32"),
        max_position_embeddings=_hf_get(d, "max_position_embeddings", default=40960),
        name=name, **switches)
    hd = d.get("head_dim")
    if hd is None:
        if not (isinstance(hidden, int) and isinstance(heads, int) and heads > 0
                and hidden % heads == 0):
            raise _bad("head_dim", None, f"absent, and hidden_size = {hidden!r} is not a "
                       f"multiple of num_attention_heads = {heads!r}")
        hd = hidden // heads
    kw["head_dim"] = hd
    if mt == "qwen3_moe":
        kw.update(
            num_experts=_hf_get(d, "num_experts", "num_local_experts", **req),
            num_experts_per_tok=_hf_get(d, "num_experts_per_tok", **req),
            moe_intermediate_size=_hf_get(d, "moe_intermediate_size", **req),
            norm_topk_prob=_hf_get(d, "norm_topk_prob", default=False),  # transformers' default
            decoder_sparse_step=_hf_get(d, "decoder_sparse_step", default=1),
            mlp_only_layers=_hf_get(d, "mlp_only_layers", default=()),
            intermediate_size=_hf_get(d, "intermediate_size", default=0))
    else:
        kw.update(intermediate_size=_hf_get(d, "intermediate_size", **req))
    return ModelConfig(**kw)


# ---- presets ---------------------------------------------------------------------------
# Published shapes (Hugging Face Qwen/<name>/config.json); all bfloat16, rope_theta 1e6,
# rms_norm_eps 1e-6, max_position_embeddings 40960, every MoE layer sparse, norm_topk_prob.
_QWEN = dict(vocab_size=151936, head_dim=128, rope_theta=1e6, dtype="bfloat16")
_MOE = dict(model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8,
            norm_topk_prob=True, decoder_sparse_step=1)
PRESETS: dict[str, ModelConfig] = {p.name: p for p in (
    ModelConfig(name="qwen3-0.6b", hidden_size=1024, num_layers=28, num_heads=16,
                num_kv_heads=8, intermediate_size=3072, tie_word_embeddings=True, **_QWEN),
    ModelConfig(name="qwen3-8b", hidden_size=4096, num_layers=36, num_heads=32,
                num_kv_heads=8, intermediate_size=12288, **_QWEN),
    ModelConfig(name="qwen3-30b-a3b", hidden_size=2048, num_layers=48, num_heads=32,
                num_kv_heads=4, intermediate_size=6144, moe_intermediate_size=768,
                **_QWEN, **_MOE),
    ModelConfig(name="qwen3-235b-a22b", hidden_size=4096, num_layers=94, num_heads=64,
                num_kv_heads=4, intermediate_size=12288, moe_intermediate_size=1536,
                **_QWEN, **_MOE),
    # Default model of programs/transformer.py (random weights). Every split divides it:
    # tp in {1,2,4,8} (16 q heads, 8 kv heads -> kv is split, not replicated, up to tp=8;
    # moe_inter 64, intermediate 256, vocab 512 all multiples of 8), pp in {1,2,4} (4 layers),
    # ep in {1,2,4,8} (8 experts). GQA (2 q heads per kv head) and heads*head_dim = 256 !=
    # hidden = 128 (as in real Qwen3) are exercised, so a slip in either shows up.
    ModelConfig(name="builtin-moe", vocab_size=512, hidden_size=128, num_layers=4,
                num_heads=16, num_kv_heads=8, head_dim=16, intermediate_size=256,
                model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=64, norm_topk_prob=True, max_position_embeddings=4096),
    # Dense benchmark shape compared against PyTorch: 166.2e6 weights (665 MB float32).
    ModelConfig(name="bench-166m", vocab_size=32000, hidden_size=1024, num_layers=8,
                num_heads=16, num_kv_heads=8, head_dim=64, intermediate_size=3072,
                max_position_embeddings=4096),
    # Mid-size dense model for TP benchmarks: 307e6 weights (1.23 GB float32, 614 MB bf16);
    # big enough matmuls (2048 x 5120) that TP compute dominates; divides tp up to 8.
    ModelConfig(name="bench-dense-300m", vocab_size=32000, hidden_size=2048, num_layers=4,
                num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=5120,
                max_position_embeddings=4096),
)}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
