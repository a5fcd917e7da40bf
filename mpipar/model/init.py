"""Deterministic random weights, and ``open_model``: a checkpoint directory or a preset.

RandomWeights gives every tensor a value fixed by (seed, tensor name) alone, so every rank
of every layout, and the single-process reference, see the same model while each rank
generates only its own shard. A tensor [R, ...] is cut into blocks of B rows (B*row_size
about 2^20 values); block b is drawn from a generator seeded with (seed, crc32(name), b).
A read of rows r0..r1 draws only the blocks that cover them, so a slice equals the same
slice of the full tensor whatever slicing produced it, and a TP rank holding 1/tp of the
embedding draws about 1/tp of it. Slices of later dimensions draw the row range and cut.

Scale: linear and embedding matrices [out, in] are N(0, 1/in) (fan-in scaling; 0.02 at
in = 2500 like the usual initializer_range, but wider at small test widths so that
activations stay O(1) at every width); norm weights (input/post-attention/final norm,
q_norm, k_norm) are 1 + 0.1*N(0, 1) and biases 0.1*N(0, 1), so an implementation that
drops a norm weight or a bias gives different numbers. With pre-norm blocks each sublayer
adds an O(1) term to the residual stream (its rms grows like sqrt(layers), no blow-up),
the router's logits are O(1) (tokens spread over experts), and the logits are O(1): on
builtin-moe the top-1 / top-2 margin of greedy decoding is far above float32 noise (see
tests/test_checkpoint.py).
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from .checkpoint import (
    CheckpointError,
    CheckpointReader,
    WeightSource,
    as_dtype,
    expected_shapes,
    row_window,
)
from .config import ModelConfig, get_preset
from .gguf import GGUFSource, gguf_path

BLOCK_VALUES = 1 << 20  # values per generated block (4 MB of float32)
NORM_STD = 0.1


class RandomWeights(WeightSource):
    """Random weights of ``config``, deterministic per (seed, tensor name), slice-exact."""

    def __init__(self, config: ModelConfig, seed: int = 0):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
        self.config, self.seed = config, int(seed)
        self._shapes = expected_shapes(config)

    def describe(self) -> str:
        name = self.config.name or "config"
        return f"random weights of {name} (seed {self.seed})"

    def stored_dtype(self, name: str) -> np.dtype:
        self.resolve(name)
        return np.dtype(np.float32)

    def _block(self, name: str, shape: tuple, b: int, rows: int) -> np.ndarray:
        """Block b ([rows, *shape[1:]] float32) of tensor ``name``."""
        ss = np.random.SeedSequence([self.seed, zlib.crc32(name.encode()), b])
        z = np.random.default_rng(ss).standard_normal((rows, *shape[1:]), dtype=np.float32)
        if name.endswith(".bias"):
            return np.float32(NORM_STD) * z
        if len(shape) == 1:  # a norm weight
            return 1.0 + np.float32(NORM_STD) * z
        return z * np.float32(1.0 / np.sqrt(shape[-1]))

    def _rows(self, name: str, shape: tuple, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of the full tensor, drawing only the blocks that cover them."""
        row = int(np.prod(shape[1:], dtype=np.int64))
        per = max(1, BLOCK_VALUES // max(row, 1))
        parts = []
        for b in range(r0 // per, -(-r1 // per)):
            lo, hi = b * per, min((b + 1) * per, shape[0])
            blk = self._block(name, shape, b, hi - lo)
            parts.append(blk[max(r0, lo) - lo:min(r1, hi) - lo])
        if not parts:
            return np.zeros((0, *shape[1:]), np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read(self, name: str, index=None, dtype="float32") -> np.ndarray:
        key = self.resolve(name)
        shape = tuple(self._shapes[key])
        start, stop, local, rest = row_window(name, shape, index)
        out = self._rows(key, shape, start, stop)[(local, *rest)]
        return np.array(out, dtype=np.float32 if dtype is None else as_dtype(dtype))


def open_model(model=None, preset=None, seed: int = 0) -> WeightSource:
    """``model``: a .gguf file, or a folder holding one -> GGUFSource; a checkpoint
    directory -> CheckpointReader (or a preset name);
    otherwise RandomWeights of ``preset`` (a name or a ModelConfig; default builtin-moe)."""
    if model is not None and preset is not None:
        raise ValueError("give a model directory or a preset, not both")
    if model is not None:
        path = os.fspath(model)
        gguf_file = gguf_path(path)
        if gguf_file is not None:
            return GGUFSource(gguf_file)
        if os.path.isdir(path):
            return CheckpointReader(path)
        if os.path.exists(path) or os.sep in path:
            raise CheckpointError(f"--model {path}: not a checkpoint directory")
        preset = path  # a bare name: a preset
    cfg = preset if isinstance(preset, ModelConfig) else get_preset(preset or "builtin-moe")
    return RandomWeights(cfg, seed=seed)
