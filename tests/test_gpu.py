"""CuPy runs of the same code: layers, reference, collectives and the engine on the GPU.

Skipped, with the reason, where CuPy or a GPU is missing (CI never has one). The GPU
check program (programs/gpu_check.py) runs this file on the device machine.
"""

import json
import os

import numpy as np
import pytest

from mpipar import backend

cupy = backend._cupy()
pytestmark = pytest.mark.skipif(cupy is None, reason="needs CuPy and a visible GPU")
TOL = 1e-4


def _transport_group(world, name="tp"):
    from mpipar.comm.group import Group
    from mpipar.comm.ledger import Ledger
    ledger = Ledger()
    backend.bind_gpu(world)
    t = backend.Transport(cupy, backend.cuda_aware(), ledger)
    return Group(world, name, ledger, cupy, t), ledger


def test_layers_match_numpy():
    from mpipar.model import layers as L
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5, 16)).astype(np.float32)
    k = rng.standard_normal((9, 5, 16)).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    for f, args in ((L.rms_norm, (x, w, 1e-6)),):
        want = f(np, *args)
        got = f(cupy, *[cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args])
        assert np.abs(cupy.asnumpy(got) - want).max() < 1e-5
    q = rng.standard_normal((3, 10, 16)).astype(np.float32)
    want = L.causal_gqa_attention(np, q, k, k)
    got = L.causal_gqa_attention(cupy, cupy.asarray(q), cupy.asarray(k), cupy.asarray(k))
    assert np.abs(cupy.asnumpy(got) - want).max() < 1e-5


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3-moe-tiny"])
def test_reference_on_gpu_matches_fixtures(fixtures_dir, name):
    from mpipar.model.checkpoint import CheckpointReader
    from mpipar.model.reference import ReferenceModel, generate
    folder = os.path.join(fixtures_dir, name)
    ref = json.load(open(os.path.join(folder, "ref.json")))
    gen = generate(ReferenceModel(CheckpointReader(folder), xp=cupy), [ref["prompt_a"]], 8)
    assert gen.tokens[0].tolist() == ref["greedy_generate"]
    logits = np.load(os.path.join(folder, "ref_logits.npy"))[0]
    assert np.abs(gen.prompt_logits[0] - logits).max() < TOL


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ring_allreduce_cupy_buffers(world, dtype):
    from mpipar.comm.ring import ring_allreduce
    group, ledger = _transport_group(world)
    rng = np.random.default_rng(world.Get_rank())
    for n in (0, 1, 1000, (1 << 20) + 7):
        x = rng.standard_normal(n).astype(dtype)
        want = np.empty(n, np.float32)
        world.Allreduce(x.astype(np.float32), want)
        got = cupy.asnumpy(ring_allreduce(group, cupy.asarray(x))).astype(np.float32)
        tol = 1e-4 if dtype == "float32" else 2e-2 * max(1, world.Get_size())
        assert np.allclose(got, want, rtol=tol, atol=tol), (n, dtype)


def test_engine_on_gpu_matches_fixture(world, fixtures_dir):
    from mpipar.layout import Layout, make_comms
    from mpipar.model.checkpoint import CheckpointReader
    from mpipar.parallel.engine import ParallelModel
    folder = os.path.join(fixtures_dir, "qwen3-moe-tiny")
    ref = json.load(open(os.path.join(folder, "ref.json")))
    n = world.Get_size()
    layout = Layout(tp=n, ep=n) if n in (1, 2, 4, 8) else Layout(pp=n)
    backend.bind_gpu(world)
    transport = backend.Transport(cupy, backend.cuda_aware())
    comms = make_comms(layout, world, xp=cupy, transport=transport)
    transport.ledger = comms.ledger
    model = ParallelModel(comms, CheckpointReader(folder), xp=cupy)
    gen = model.generate([ref["prompt_a"]], 8, prefill_chunks=2, keep_logits=True)
    if world.Get_rank() == 0:
        assert gen.tokens[0].tolist() == ref["greedy_generate"]
        dec = np.load(os.path.join(folder, "ref_decode_logits.npy"))
        assert np.abs(gen.decode_logits[0] - dec).max() < TOL
