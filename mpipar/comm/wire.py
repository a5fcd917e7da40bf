"""The wire protocol: numpy dtype -> MPI datatype, 16-bit floats as their bits, buffer specs.

What moves:
  * float32/64, float16, int8..int64, uint8..uint64, bool move as their own MPI type.
  * float16 and bfloat16 (``ml_dtypes.bfloat16``, which has no MPI type; the names of
    the float dtypes and their sizes: dtypes.py, the one table) move as their
    16 bits: ``mpi_type`` gives UINT16 over the array's own buffer, 2 bytes an element.
    MPI never reduces them: every reduction in ``mpipar.comm`` is done by the array
    module on this side of the wire.
  * Reductions of 16-bit floats add in float32 (``acc_dtype``; ``ring.add_into``): both
    operands are widened, added, and the sum rounded to 16 bits once, before it goes on
    the wire or is the result. The wire stays 16-bit, so the bytes a reduction moves
    are those of the 16-bit array (what the cost model counts).

How arrays reach MPI (one place, ``buf_spec``/``recv_done``):
  ``group.transport`` is None for host (NumPy) arrays: they are passed straight to MPI.
  Otherwise it is an object with two methods (the GPU backend supplies one that stages
  device arrays through host memory, or passes them through when MPI is CUDA-aware)::

      transport.to_mpi(arr)        -> host-or-device array MPI can read/write, same dtype
                                      and size as arr; for a send it holds arr's data
      transport.from_mpi(buf, arr) -> None: after a receive into buf = to_mpi(arr),
                                      make arr hold buf's data (no-op if buf is arr)

  Every MPI buffer in ``comm/`` is made by ``buf_spec`` and every receive ends with
  ``recv_done``, so staging is added in one place.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .dtypes import BFLOAT16

_MPI_TYPES = {
    np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE,
    np.dtype(np.int8): MPI.INT8_T, np.dtype(np.int16): MPI.INT16_T,
    np.dtype(np.int32): MPI.INT32_T, np.dtype(np.int64): MPI.INT64_T,
    np.dtype(np.uint8): MPI.UINT8_T, np.dtype(np.uint16): MPI.UINT16_T,
    np.dtype(np.uint32): MPI.UINT32_T, np.dtype(np.uint64): MPI.UINT64_T,
    np.dtype(np.bool_): MPI.C_BOOL,
    np.dtype(np.float16): MPI.UINT16_T,  # bits only: MPI never reduces 16-bit floats here
    BFLOAT16: MPI.UINT16_T,
}


def acc_dtype(dtype) -> np.dtype:
    """The dtype a sum of ``dtype`` values is accumulated in (float32 for 16-bit floats)."""
    dtype = np.dtype(dtype)
    half = dtype == np.float16 or dtype == BFLOAT16
    return np.dtype(np.float32) if half else dtype


def mpi_type(dtype):
    """MPI datatype that carries ``dtype`` (16-bit floats: their 16 bits as UINT16)."""
    try:
        return _MPI_TYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no MPI datatype for {np.dtype(dtype)}") from None


def buf_spec(group, arr, counts=None):
    """``[buffer, count, datatype]`` for MPI; ``arr`` must be C-contiguous.

    ``counts``: instead of the element count, a (counts, displacements) pair in
    elements for the v-collectives. Returns (spec, staged): ``staged`` is what MPI
    reads/writes (``arr`` itself without a transport); pass it to ``recv_done``.
    """
    transport = getattr(group, "transport", None)
    staged = arr if transport is None else transport.to_mpi(arr)
    count = staged.size if counts is None else counts
    return [staged, count, mpi_type(staged.dtype)], staged


def recv_done(group, staged, arr) -> None:
    """Finish a receive into ``staged`` (from ``buf_spec(group, arr)``)."""
    transport = getattr(group, "transport", None)
    if transport is not None:
        transport.from_mpi(staged, arr)
