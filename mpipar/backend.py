"""Array backend: numpy on CPU or cupy on GPU, chosen once per process.

- ``select_device(flag)``: ``--device cpu|gpu|auto``; ``MPIPAR_DEVICE`` sets the default;
  auto means gpu when CuPy imports and sees a GPU, else cpu.
- ``bind_gpu(world_comm)``: a rank takes GPU ``local_rank % n_gpus``, local_rank from a
  shared-memory sub-communicator (``Split_type(COMM_TYPE_SHARED)``), before any CUDA
  work; more ranks than GPUs on a node share them round-robin.
- ``cuda_aware()``: whether MPI can read GPU memory: ``MPIPAR_CUDA_AWARE=0|1`` if set,
  else ``MPIX_Query_cuda_support()`` from libmpi through ctypes (MPICH and Open MPI
  export it), else False.
- ``Transport``: how a device array reaches MPI (the protocol of ``comm/wire.py``).
  CUDA-aware: the device array itself, once the stream that wrote it is synchronised.
  Otherwise: staged through pinned host buffers. They come from CuPy's pinned memory
  pool, so a buffer freed after a message is reused by the next one of its size rather
  than allocated again; each copy is counted in the ledger (``staging_d2h`` /
  ``staging_h2d``, bytes copied).
- ``compute_dtype(flag, xp, checkpoint_dtype)``: ``--dtype auto|float32|bfloat16|float16``
  -> the dtype of weights, activations and KV cache. auto: float32 on the CPU (NumPy
  has no fast 16-bit GEMM), the checkpoint's declared dtype on a GPU.
- ``native_16bit_matmul(xp, dtype, ndim)``: whether ``a @ b`` of 16-bit floats is a
  16-bit GEMM with float32 accumulation here (else ``layers.matmul`` widens the
  operands of that product to float32 and rounds the result back):
    NumPy: never. float16 and ml_dtypes' bfloat16 matmul are unblocked element loops
      (orders of magnitude slower than float32 BLAS), so the CPU path is float32 GEMM
      on the 16-bit values: exact products, float32 sums, one rounding at the end.
    CuPy, 2-D: yes, float16 and bfloat16 (``cupy.dot`` -> cublasGemmEx, compute 32F).
    CuPy, batched (attention's [heads, q, D] @ [heads, D, S]): no. CuPy 14 widens a
      batched float16 product to float32 itself, and a batched bfloat16 one is not
      supported (cupy/cupy#10317, open); attention is a small part of a decode step.
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np

from .comm.dtypes import FLOAT_NAMES, float_dtype


class DeviceError(RuntimeError):
    pass


def to_host(a) -> np.ndarray:
    """Any array (numpy or cupy) -> numpy."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _cupy():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # no cupy, no driver, no device: all mean "no GPU"
        return None
    return None


def select_device(flag: str | None = None) -> str:
    choice = (flag or os.environ.get("MPIPAR_DEVICE") or "auto").lower()
    if choice not in ("cpu", "gpu", "auto"):
        raise DeviceError(f"device must be cpu, gpu or auto, got {choice!r}")
    if choice == "auto":
        return "gpu" if _cupy() is not None else "cpu"
    if choice == "gpu" and _cupy() is None:
        raise DeviceError("--device gpu: CuPy with a visible GPU is needed "
                          "(pip install 'mpipar[gpu]')")
    return choice


COMPUTE_DTYPES = ("auto", *FLOAT_NAMES)


def _is_16bit_float(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype == np.float16 or dtype.name == "bfloat16"


def native_16bit_matmul(xp, dtype, ndim: int) -> bool:
    """See the module docstring; True for every dtype that is not a 16-bit float."""
    if not _is_16bit_float(dtype):
        return True
    return xp is not np and ndim <= 2


def compute_dtype(flag, xp, checkpoint_dtype="float32") -> np.dtype:
    """``flag`` (a COMPUTE_DTYPES name or a numpy dtype) -> numpy dtype; ``xp`` numpy
    means the CPU."""
    if not isinstance(flag, str):
        return np.dtype(flag)
    name = checkpoint_dtype if flag == "auto" and xp is not np else flag
    name = "float32" if name == "auto" else name
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {name!r}")
    return float_dtype(name)


def local_rank(world_comm) -> tuple[int, int]:
    """(rank among the ranks of this node, ranks on this node)."""
    from mpi4py import MPI
    node = world_comm.Split_type(MPI.COMM_TYPE_SHARED, key=world_comm.Get_rank())
    out = node.Get_rank(), node.Get_size()
    node.Free()
    return out


def gpu_for(local: int, n_gpus: int) -> int:
    """Round-robin: local rank -> GPU index."""
    return local % n_gpus


def bind_gpu(world_comm):
    """Pick this rank's GPU; returns (cupy, gpu index, ranks on the node, gpus on it)."""
    cupy = _cupy()
    if cupy is None:
        raise DeviceError("no GPU visible to CuPy")
    lrank, lsize = local_rank(world_comm)
    n_gpus = cupy.cuda.runtime.getDeviceCount()
    gpu = gpu_for(lrank, n_gpus)
    cupy.cuda.Device(gpu).use()
    return cupy, gpu, lsize, n_gpus


def cuda_aware() -> bool:
    env = os.environ.get("MPIPAR_CUDA_AWARE")
    if env in ("0", "1"):
        return env == "1"
    try:
        from mpi4py import MPI  # noqa: F401  (loads libmpi into the process)
        query = ctypes.CDLL(None).MPIX_Query_cuda_support
    except (AttributeError, OSError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


class Transport:
    """Device arrays <-> MPI buffers (see module docstring); host arrays pass through.

    ``xp`` is the device array module (cupy); ``alloc_host(nbytes)`` returns a buffer
    object for pinned host memory (default: ``xp.cuda.alloc_pinned_memory``).
    """

    def __init__(self, xp, aware: bool, ledger=None, alloc_host=None):
        self.xp, self.aware, self.ledger = xp, aware, ledger
        self.alloc_host = alloc_host or (lambda n: xp.cuda.alloc_pinned_memory(n))

    def _record(self, kind, nbytes, t):
        if self.ledger is not None:
            self.ledger.record(kind, 0, nbytes, time.perf_counter() - t, t)

    def to_mpi(self, arr):
        """An array MPI can read and write, holding ``arr``'s data."""
        if not hasattr(arr, "get"):  # a host array (cupy arrays have .get())
            return arr
        if self.aware:
            self.xp.cuda.get_current_stream().synchronize()
            return arr
        t = time.perf_counter()
        mem = self.alloc_host(max(arr.nbytes, 1))
        host = np.frombuffer(mem, dtype=arr.dtype, count=arr.size).reshape(arr.shape)
        arr.get(out=host)
        self._record("staging_d2h", arr.nbytes, t)
        return host

    def from_mpi(self, buf, arr) -> None:
        """After a receive into ``buf = to_mpi(arr)``: make ``arr`` hold the data."""
        if buf is arr:
            return
        t = time.perf_counter()
        arr.set(buf)
        self._record("staging_h2d", arr.nbytes, t)
