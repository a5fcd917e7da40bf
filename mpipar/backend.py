"""Array backend: numpy on CPU or cupy on GPU, chosen once per process.

- ``select_device(flag)``: ``--device cpu|gpu|auto``; ``MPIPAR_DEVICE`` overrides the
  default; auto means gpu when CuPy imports and sees a GPU, else cpu.
- ``bind_gpu(world_comm)``: a rank takes GPU ``local_rank % n_gpus``, local_rank from a
  shared-memory sub-communicator (``Split_type(COMM_TYPE_SHARED)``), before any CUDA
  work; more ranks than GPUs share them round-robin.
- ``cuda_aware()``: whether MPI can read GPU memory: ``MPIPAR_CUDA_AWARE=0|1`` if set,
  else ``MPIX_Query_cuda_support`` from libmpi through ctypes, else False.
- ``Transport``: how a device array reaches MPI. CUDA-aware: the array itself, after
  the producing stream is synchronised. Otherwise: copied through pinned host buffers,
  reused per size, and counted in the ledger as ``staging_d2h`` / ``staging_h2d``.
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np


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


def local_rank(world_comm) -> tuple[int, int]:
    """(rank among the ranks of this node, ranks on this node)."""
    from mpi4py import MPI
    node = world_comm.Split_type(MPI.COMM_TYPE_SHARED, key=world_comm.Get_rank())
    out = node.Get_rank(), node.Get_size()
    node.Free()
    return out


def bind_gpu(world_comm):
    """Pick this rank's GPU; returns (cupy, gpu index, node ranks, gpus on the node)."""
    cupy = _cupy()
    if cupy is None:
        raise DeviceError("no GPU visible to CuPy")
    lrank, lsize = local_rank(world_comm)
    n_gpus = cupy.cuda.runtime.getDeviceCount()
    gpu = lrank % n_gpus
    cupy.cuda.Device(gpu).use()
    return cupy, gpu, lsize, n_gpus


def cuda_aware() -> bool:
    env = os.environ.get("MPIPAR_CUDA_AWARE")
    if env in ("0", "1"):
        return env == "1"
    try:
        from mpi4py import MPI  # noqa: F401  (loads libmpi into the process)
        query = ctypes.CDLL(None).MPIX_Query_cuda_support
        query.restype = ctypes.c_int
        return bool(query())
    except (AttributeError, OSError):
        return False


class Transport:
    """Hands device arrays to MPI (see module docstring); host arrays pass through."""

    def __init__(self, xp, aware: bool, ledger=None):
        self.xp, self.aware, self.ledger = xp, aware, ledger
        self._pinned = {}  # nbytes -> pinned host numpy buffer

    def _host_buffer(self, nbytes: int, dtype, shape):
        buf = self._pinned.get(nbytes)
        if buf is None:
            mem = self.xp.cuda.alloc_pinned_memory(max(nbytes, 1))
            buf = np.frombuffer(mem, dtype=np.uint8, count=max(nbytes, 1))
            self._pinned[nbytes] = buf
        return buf[:nbytes].view(dtype).reshape(shape)

    def to_mpi(self, a):
        """An array MPI can read: the device array (aware) or a staged host copy."""
        if isinstance(a, np.ndarray):
            return a
        if self.aware:
            self.xp.cuda.get_current_stream().synchronize()
            return a
        t = time.perf_counter()
        host = self._host_buffer(a.nbytes, a.dtype, a.shape)
        a.get(out=host)
        if self.ledger is not None:
            self.ledger.record("staging_d2h", 0, 0, time.perf_counter() - t, t)
        return host

    def empty(self, shape, dtype):
        """A receive buffer MPI can write: device (aware) or host (staged)."""
        if self.aware:
            return self.xp.empty(shape, dtype=dtype)
        return np.empty(shape, dtype=dtype)

    def from_mpi(self, a):
        """A received buffer -> a device array."""
        if not isinstance(a, np.ndarray):
            return a
        t = time.perf_counter()
        out = self.xp.asarray(a)
        if self.ledger is not None:
            self.ledger.record("staging_h2d", 0, 0, time.perf_counter() - t, t)
        return out
