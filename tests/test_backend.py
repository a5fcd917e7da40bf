"""Backend pieces that run without a GPU: device choice, GPU binding, CUDA-awareness
detection, and the host-staging transport (with a stand-in "device" array type)."""

import numpy as np
import pytest

from mpipar import backend
from mpipar.comm.allreduce import ring_allreduce
from mpipar.comm.group import Group
from mpipar.comm.ledger import Ledger
from mpipar.comm.p2p import recv_array, send_array


class DeviceArray(np.ndarray):
    """Stands in for a cupy array: has .get(out=) and .set(host) like cupy."""

    def get(self, out=None):
        if out is None:
            return np.array(self)
        out[...] = self
        return out

    def set(self, host):
        self[...] = host


def on_device(a):
    return np.ascontiguousarray(a).view(DeviceArray)


def test_device_choice(monkeypatch):
    monkeypatch.delenv("MPIPAR_DEVICE", raising=False)
    monkeypatch.setattr(backend, "_cupy", lambda: None)
    assert backend.select_device(None) == "cpu"
    assert backend.select_device("cpu") == "cpu"
    with pytest.raises(backend.DeviceError, match="CuPy"):
        backend.select_device("gpu")
    with pytest.raises(backend.DeviceError, match="cpu, gpu or auto"):
        backend.select_device("tpu")
    monkeypatch.setenv("MPIPAR_DEVICE", "cpu")
    assert backend.select_device(None) == "cpu"
    monkeypatch.setattr(backend, "_cupy", lambda: object())
    monkeypatch.delenv("MPIPAR_DEVICE")
    assert backend.select_device(None) == "gpu"


def test_round_robin_binding():
    assert [backend.gpu_for(r, 1) for r in range(4)] == [0, 0, 0, 0]
    assert [backend.gpu_for(r, 8) for r in range(16)] == list(range(8)) * 2
    assert [backend.gpu_for(r, 3) for r in range(5)] == [0, 1, 2, 0, 1]


def test_local_rank_is_node_rank(world):
    local, size = backend.local_rank(world)
    assert size == world.Get_size()  # one node here
    assert local == world.Get_rank()


def test_cuda_aware_detection(monkeypatch):
    monkeypatch.setenv("MPIPAR_CUDA_AWARE", "1")
    assert backend.cuda_aware() is True
    monkeypatch.setenv("MPIPAR_CUDA_AWARE", "0")
    assert backend.cuda_aware() is False
    monkeypatch.delenv("MPIPAR_CUDA_AWARE")
    # The PyPI MPICH wheel exports MPIX_Query_cuda_support and is not CUDA-aware.
    assert backend.cuda_aware() is False


def test_staging_transport_copies_and_counts():
    ledger = Ledger()
    t = backend.Transport(np, aware=False, ledger=ledger, alloc_host=lambda n: bytearray(n))
    host = np.arange(6, dtype=np.float32)
    assert t.to_mpi(host) is host  # host arrays pass through
    dev = on_device(np.arange(12, dtype=np.float32).reshape(3, 4))
    staged = t.to_mpi(dev)
    assert type(staged) is np.ndarray and staged.shape == (3, 4)
    assert np.array_equal(staged, dev)
    staged[...] = 7
    t.from_mpi(staged, dev)
    assert (np.asarray(dev) == 7).all()
    tot = ledger.totals()
    assert tot["staging_d2h"]["recv_bytes"] == 48 and tot["staging_h2d"]["recv_bytes"] == 48


def test_aware_transport_passes_device_arrays(monkeypatch):
    class FakeCupy:
        class cuda:  # noqa: N801  (mirrors cupy.cuda)
            synced = 0

            @staticmethod
            def get_current_stream():
                class S:
                    def synchronize(self):
                        FakeCupy.cuda.synced += 1
                return S()

    t = backend.Transport(FakeCupy, aware=True)
    dev = on_device(np.ones(4, np.float32))
    assert t.to_mpi(dev) is dev and FakeCupy.cuda.synced == 1
    t.from_mpi(dev, dev)


def test_collectives_through_staging(world):
    """p2p and the ring all-reduce give the same results with a staging transport."""
    ledger = Ledger()
    transport = backend.Transport(np, aware=False, ledger=ledger,
                                  alloc_host=lambda n: bytearray(n))
    g = Group(world, "tp", ledger, np, transport)
    rng = np.random.default_rng(world.Get_rank())
    x = rng.standard_normal(1001).astype(np.float32)
    want = np.empty_like(x)
    world.Allreduce(x, want)
    got = ring_allreduce(g, on_device(x))
    assert np.allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    n = world.Get_size()
    if n > 1:
        right, left = (world.Get_rank() + 1) % n, (world.Get_rank() - 1) % n
        payload = on_device(rng.standard_normal((3, 5)).astype(np.float32))
        if world.Get_rank() % 2 == 0:
            send_array(g, payload, right, tag=3)
            back = recv_array(g, left, tag=3)
        else:
            back = recv_array(g, left, tag=3)
            send_array(g, payload, right, tag=3)
        assert back.shape == (3, 5)
        assert ledger.totals()["staging_d2h"]["calls"] >= 1
