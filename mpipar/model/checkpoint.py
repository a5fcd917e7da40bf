"""Hugging Face checkpoints (safetensors): tensor names, sliced reads, a test writer.

Tensor names and shapes (linear weights are [out, in]; q = heads*head_dim, kv = kv_heads*head_dim):
  model.embed_tokens.weight                                 [vocab, hidden]
  model.layers.{i}.input_layernorm.weight                   [hidden]
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight          [q, hidden] [kv, hidden] x2 [hidden, q]
  model.layers.{i}.self_attn.{q,k}_norm.weight              [head_dim]   (qk_norm: Qwen3)
  model.layers.{i}.self_attn.{q,k,v}_proj.bias              [q] [kv] [kv] (qkv_bias)
  model.layers.{i}.self_attn.o_proj.bias                    [hidden]     (o_bias)
  model.layers.{i}.post_attention_layernorm.weight          [hidden]
  dense layer:  model.layers.{i}.mlp.{gate,up}_proj.weight  [inter, hidden]
                model.layers.{i}.mlp.down_proj.weight     [hidden, inter]
                model.layers.{i}.mlp.{gate,up,down}_proj.bias [inter] [inter] [hidden] (mlp_bias)
  MoE layer:    model.layers.{i}.mlp.gate.weight            [experts, hidden]   (router)
                model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight [moe_inter, hidden];
                ...down_proj.weight [hidden, moe_inter]
  model.norm.weight [hidden];  lm_head.weight [vocab, hidden] (absent when tied: embed_tokens)

safetensors file = u64 little-endian header length N | N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}} | the data; tensor bytes lie at
8 + N + begin .. 8 + N + end, row-major. One reader serves every dtype (F32, F16, BF16
through ml_dtypes, which safetensors' numpy API cannot give): the file is memory-mapped
and a read touches only the pages of the rows it asks for. A slice of the first dimension
is one contiguous byte range (rows r0..r1 of a [R, C] tensor: bytes (r0*C .. r1*C)*itemsize);
slices of later dimensions touch the same row range and are cut in memory. So a TP rank
that loads [vocab/tp, hidden] of the embedding reads 1/tp of its bytes from disk.

Everything is checked when a checkpoint is opened (headers only, no tensor data): every
tensor the config implies is present with its shape, and no tensor's bytes run past the
end of its file; errors name the tensor, the shapes and the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import numpy as np

from ..comm.dtypes import BFLOAT16, FLOAT_DTYPES
from .config import ModelConfig, load_config


class CheckpointError(Exception):
    """A checkpoint that cannot be read as the config says; the message names tensor/file."""


ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
             "F16": np.dtype(np.float16), "BF16": BFLOAT16,
             "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
             "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def as_dtype(dtype) -> np.dtype:
    """'float32' | 'float16' | 'bfloat16' | a numpy dtype -> numpy dtype."""
    if isinstance(dtype, str) and dtype in FLOAT_DTYPES:
        return FLOAT_DTYPES[dtype]
    return np.dtype(dtype)


def layer_shapes(config: ModelConfig, i: int) -> dict[str, tuple]:
    """Names -> shapes of decoder layer ``i``'s tensors."""
    c, h, p = config, config.hidden_size, f"model.layers.{i}."
    s = {p + "input_layernorm.weight": (h,),
         p + "self_attn.q_proj.weight": (c.q_size, h),
         p + "self_attn.k_proj.weight": (c.kv_size, h),
         p + "self_attn.v_proj.weight": (c.kv_size, h),
         p + "self_attn.o_proj.weight": (h, c.q_size)}
    if c.qkv_bias:
        s.update({p + "self_attn.q_proj.bias": (c.q_size,),
                  p + "self_attn.k_proj.bias": (c.kv_size,),
                  p + "self_attn.v_proj.bias": (c.kv_size,)})
    if c.o_bias:
        s[p + "self_attn.o_proj.bias"] = (h,)
    if c.qk_norm:
        s.update({p + "self_attn.q_norm.weight": (c.head_dim,),
                  p + "self_attn.k_norm.weight": (c.head_dim,)})
    s[p + "post_attention_layernorm.weight"] = (h,)
    if c.is_moe_layer(i):
        m = c.moe_intermediate_size
        s[p + "mlp.gate.weight"] = (c.num_experts, h)
        for e in range(c.num_experts):
            q = f"{p}mlp.experts.{e}."
            s.update({q + "gate_proj.weight": (m, h), q + "up_proj.weight": (m, h),
                      q + "down_proj.weight": (h, m)})
    else:
        m = c.intermediate_size
        s.update({p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                  p + "mlp.down_proj.weight": (h, m)})
        if c.mlp_bias:
            s.update({p + "mlp.gate_proj.bias": (m,), p + "mlp.up_proj.bias": (m,),
                      p + "mlp.down_proj.bias": (h,)})
    return s


def expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Every stored tensor of the model -> shape, in file order (lm_head only when untied)."""
    s = {EMBED: (config.vocab_size, config.hidden_size)}
    for i in range(config.num_layers):
        s.update(layer_shapes(config, i))
    s["model.norm.weight"] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        s[LM_HEAD] = (config.vocab_size, config.hidden_size)
    return s


def check_index(name: str, shape: tuple, index) -> tuple:
    """Normalise ``index`` (None, a slice/int, or a tuple of them for the leading dims)
    and refuse anything out of range rather than letting numpy clip it silently."""
    if index is None:
        return ()
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise IndexError(f"{name}: index {index} has more entries than shape {list(shape)}")
    for ix, n in zip(index, shape[:len(index)], strict=True):
        if isinstance(ix, slice):
            ok = ((ix.step is None or (isinstance(ix.step, int) and ix.step > 0))
                  and all(v is None or (isinstance(v, int) and 0 <= v <= n)
                          for v in (ix.start, ix.stop))
                  and (ix.start or 0) <= (n if ix.stop is None else ix.stop))
        else:
            ok = isinstance(ix, (int, np.integer)) and not isinstance(ix, bool) and 0 <= ix < n
        if not ok:
            raise IndexError(f"{name}: index {index} is out of range for shape {list(shape)} "
                             "(slices need 0 <= start <= stop <= dim and step > 0)")
    return index


def row_window(name: str, shape: tuple, index) -> tuple:
    """``index`` as the rows a reader must produce and what to take from them:
    -> (start, stop, local, rest): rows start..stop-1 of the first dim, then
    ``[(local, *rest)]`` of that block is the answer (checked by ``check_index``)."""
    idx = check_index(name, shape, index)
    first, rest = (idx[0], idx[1:]) if idx else (slice(None), ())
    if isinstance(first, slice):
        start, stop, step = first.indices(shape[0])
        stop = max(stop, start)
        return start, stop, slice(0, stop - start, step), rest
    return int(first), int(first) + 1, 0, rest


class WeightSource:
    """Named weights, read one (slice of a) tensor at a time. ``read`` returns a fresh
    host numpy array, float32 unless ``dtype`` says otherwise (None: the stored dtype)."""

    config: ModelConfig

    def names(self) -> list[str]:
        return list(expected_shapes(self.config))

    def resolve(self, name: str) -> str:
        """lm_head of a tied model is the embedding; unknown names raise KeyError."""
        if name == LM_HEAD and self.config.tie_word_embeddings:
            return EMBED
        if name not in self._shapes:
            raise KeyError(f"no tensor {name!r} in {self.describe()}")
        return name

    def shape(self, name: str) -> tuple:
        return tuple(self._shapes[self.resolve(name)])

    def __contains__(self, name: str) -> bool:
        try:
            self.resolve(name)
            return True
        except KeyError:
            return False

    def describe(self) -> str:
        return type(self).__name__

    def read(self, name: str, index=None, dtype="float32") -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _File:
    """One safetensors file: parsed header, memory map opened on first read."""

    def __init__(self, path: str):
        self.path, self._mm = path, None
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                if n is None or n > size - 8:
                    raise CheckpointError(f"{path}: truncated or not a safetensors file "
                                          f"({size} bytes, header length {n})")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"missing checkpoint file {path}") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from None
        self.start = 8 + n
        self.meta = header.pop("__metadata__", None) or {}
        self.entries = {}  # name -> (code, shape, begin, end)
        for name, e in header.items():
            try:
                code, shape, (b, t) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
                numel = int(np.prod(shape, dtype=np.int64))
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: bad header entry for {name}: {e!r}") from None
            item = ST_DTYPES[code].itemsize if code in ST_DTYPES else None
            if not 0 <= b <= t or (item is not None and t - b != numel * item):
                raise CheckpointError(f"{path}: tensor {name} has data_offsets {[b, t]} "
                                      f"for shape {list(shape)} {code}")
            if self.start + t > size:
                raise CheckpointError(f"{path}: truncated: tensor {name} needs bytes up to "
                                      f"{self.start + t}, the file has {size}")
            self.entries[name] = (code, shape, b, t)

    def view(self, name: str) -> np.ndarray:
        code, shape, b, t = self.entries[name]
        if code not in ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self.start + b:self.start + t]
        return raw.view(ST_DTYPES[code]).reshape(shape)

    def close(self):
        self._mm = None


def checkpoint_files(model_dir: str) -> tuple[list[str], dict]:
    """The safetensors files of a model directory and the index's weight_map (or {})."""
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single], {}
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                wmap = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: cannot read weight_map: {e!r}") from None
        return [os.path.join(model_dir, fn) for fn in sorted(set(wmap.values()))], wmap
    found = sorted(fn for fn in os.listdir(model_dir) if fn.endswith(".safetensors"))
    if not found:
        raise CheckpointError(f"{model_dir}: no model.safetensors, "
                              "model.safetensors.index.json or *.safetensors file")
    return [os.path.join(model_dir, fn) for fn in found], {}


class CheckpointReader(WeightSource):
    """A Hugging Face model directory: config.json + model.safetensors, or a sharded set
    with model.safetensors.index.json. F32, F16 and BF16 tensors, read by slices."""

    def __init__(self, model_dir: str, config: ModelConfig | None = None):
        self.dir = os.fspath(model_dir)
        if not os.path.isdir(self.dir):
            raise CheckpointError(f"checkpoint directory not found: {self.dir}")
        if config is None and not os.path.isfile(os.path.join(self.dir, "config.json")):
            raise CheckpointError(f"missing file {os.path.join(self.dir, 'config.json')}")
        self.config = config or load_config(self.dir)
        paths, wmap = checkpoint_files(self.dir)
        self.files = [_File(p) for p in paths]
        self._where = {}
        for f in self.files:
            for name in f.entries:
                self._where.setdefault(name, f)
        for name, fn in wmap.items():
            f = self._where.get(name)
            if f is None or os.path.basename(f.path) != fn:
                raise CheckpointError(f"{self.dir}: the index puts {name} in {fn}, "
                                      f"which does not hold it")
        self._shapes = {n: f.entries[n][1] for n, f in self._where.items()}
        self._validate()

    def describe(self) -> str:
        return f"checkpoint {self.dir}"

    def _validate(self):
        problems = []
        for name, shape in expected_shapes(self.config).items():
            f = self._where.get(name)
            if f is None:
                hint = (" (or set tie_word_embeddings true in config.json)"
                        if name == LM_HEAD else "")
                files = ", ".join(os.path.basename(g.path) for g in self.files)
                problems.append(f"missing tensor {name} (expected shape {list(shape)}) in "
                                f"{self.dir} [{files}]{hint}")
                continue
            code, found, _, _ = f.entries[name]
            if found != tuple(shape):
                problems.append(f"tensor {name} in {f.path} has shape {list(found)}, "
                                f"expected {list(shape)}")
            elif code not in FLOAT_CODES:
                problems.append(f"tensor {name} in {f.path} has dtype {code}; "
                                f"supported: {', '.join(FLOAT_CODES)}")
        if problems:
            more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise CheckpointError(f"checkpoint {self.dir} does not match its config "
                                  f"({len(problems)} problem(s)):\n  "
                                  + "\n  ".join(problems[:8]) + more)

    def stored_dtype(self, name: str) -> np.dtype:
        key = self.resolve(name)
        return ST_DTYPES[self._where[key].entries[key][0]]

    def read(self, name: str, index=None, dtype="float32") -> np.ndarray:
        key = self.resolve(name)
        view = self._where[key].view(key)
        sub = view[check_index(name, view.shape, index)]
        if dtype is None:
            return np.array(sub)  # a copy: the caller may keep it after close()
        return np.array(sub, dtype=as_dtype(dtype))

    def close(self):
        for f in self.files:
            f.close()


# ---- writer (tests, and turning random weights into a checkpoint) ----------------------
def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> int:
    """Write arrays (any ST_DTYPES dtype) as one safetensors file; returns data bytes."""
    header, off, arrays = {}, 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in ST_CODES:
            raise ValueError(f"{name}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": ST_CODES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8).data)
    return off


def save_checkpoint(model_dir: str, config: ModelConfig, tensors, dtype: str = "float32",
                    shards: int = 1, tied: bool = False) -> list[str]:
    """Write config.json (older key style) and the weights as ``dtype``, in one
    model.safetensors or ``shards`` files + model.safetensors.index.json. ``tensors``:
    a dict name -> array, or a WeightSource (its expected tensors are read). ``tied`` (or
    config.tie_word_embeddings): lm_head.weight is left out and the config says tied.
    Returns the paths of the safetensors files."""
    tied = tied or config.tie_word_embeddings
    dt = as_dtype(dtype)
    cfg = dataclasses.replace(config, tie_word_embeddings=tied, dtype=dt.name)
    if isinstance(tensors, WeightSource):
        tensors = {n: tensors.read(n) for n in expected_shapes(cfg)}
    items = [(n, np.asarray(a).astype(dt)) for n, a in tensors.items()
             if not (tied and n == LM_HEAD)]
    if not 1 <= shards <= max(1, len(items)):
        raise ValueError(f"shards = {shards}: need 1..{len(items)}")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_hf("v4"), f, indent=2)
    meta = {"format": "pt"}
    if shards == 1:
        path = os.path.join(model_dir, "model.safetensors")
        write_safetensors(path, dict(items), meta)
        return [path]
    total = sum(a.nbytes for _, a in items)
    before = np.cumsum([0] + [a.nbytes for _, a in items])  # bytes before item k
    cuts = [0]  # contiguous groups of about total/shards bytes, none empty
    for s in range(1, shards):
        k = int(np.searchsorted(before, s * total / shards))
        cuts.append(min(max(k, cuts[-1] + 1), len(items) - (shards - s)))
    cuts.append(len(items))
    groups = [items[cuts[g]:cuts[g + 1]] for g in range(shards)]
    paths, wmap = [], {}
    for g, group in enumerate(groups):
        fn = f"model-{g + 1:05d}-of-{shards:05d}.safetensors"
        paths.append(os.path.join(model_dir, fn))
        write_safetensors(paths[-1], dict(group), meta)
        wmap.update({n: fn for n, _ in group})
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w",
              encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f, indent=2)
    return paths
