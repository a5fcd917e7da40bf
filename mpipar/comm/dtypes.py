"""The one dtype table: every name of a floating-point compute/storage dtype -> numpy dtype.

A name a flag, a config, the cost model or the planner gives (float32, bfloat16,
float16 and the aliases fp32, f32, bf16, fp16, f16) maps to its numpy dtype here and
nowhere else; the bytes an element takes in memory and on the wire are that dtype's
``itemsize`` (``dtype_size``), so a name and its size are written once. bfloat16 is
``ml_dtypes.bfloat16`` (16 bits; it moves as its bits: wire.py). No MPI here, so the
planner (mpipar.cost) reads the table without starting MPI.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_F32, _F16 = np.dtype(np.float32), np.dtype(np.float16)
FLOAT_DTYPES = {"float32": _F32, "fp32": _F32, "f32": _F32, "float16": _F16, "fp16": _F16,
                "f16": _F16, "bfloat16": BFLOAT16, "bf16": BFLOAT16}
FLOAT_NAMES = ("float32", "bfloat16", "float16")  # the long names (configs, --dtype)


def float_dtype(name) -> np.dtype:
    """A name of ``FLOAT_DTYPES`` (any case) -> numpy dtype; ValueError naming the known."""
    try:
        return FLOAT_DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(FLOAT_DTYPES)})") from None


def dtype_size(name) -> int:
    """Bytes per element of a dtype name (bf16, fp16, fp32 and their long names); a
    positive int is taken as the byte count itself."""
    if isinstance(name, int) and not isinstance(name, bool) and name > 0:
        return name
    return float_dtype(name).itemsize
