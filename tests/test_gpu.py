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


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_ring_allreduce_cupy_buffers(world, dtype):
    from mpipar.comm.allreduce import ring_allreduce
    from mpipar.model.checkpoint import as_dtype
    group, ledger = _transport_group(world)
    rng = np.random.default_rng(world.Get_rank())
    for n in (0, 1, 1000, (1 << 20) + 7):
        x = rng.standard_normal(n).astype(as_dtype(dtype))
        want = np.empty(n, np.float32)
        world.Allreduce(x.astype(np.float32), want)
        got = cupy.asnumpy(ring_allreduce(group, cupy.asarray(x))).astype(np.float32)
        # 16-bit: a rounding per hop; bfloat16 has 3 mantissa bits fewer than float16
        tol = 1e-4 if dtype == "float32" else (
            (2e-2 if dtype == "float16" else 1.6e-1) * max(1, world.Get_size()))
        assert np.allclose(got, want, rtol=tol, atol=tol), (n, dtype)


def test_engine_on_gpu_matches_fixture(world, fixtures_dir):
    from mpipar.layout import Layout, make_comms
    from mpipar.model.checkpoint import CheckpointReader
    from mpipar.parallel.rank_model import ParallelModel
    from mpipar.serve import offline
    folder = os.path.join(fixtures_dir, "qwen3-moe-tiny")
    ref = json.load(open(os.path.join(folder, "ref.json")))
    n = world.Get_size()
    layout = Layout(tp=n, ep=n) if n in (1, 2, 4, 8) else Layout(pp=n)
    backend.bind_gpu(world)
    transport = backend.Transport(cupy, backend.cuda_aware())
    comms = make_comms(layout, world, xp=cupy, transport=transport)
    transport.ledger = comms.ledger
    model = ParallelModel(comms, CheckpointReader(folder), xp=cupy)
    gen = offline.generate(model, [ref["prompt_a"]], 8, prefill_chunks=2, keep_logits=True)
    if world.Get_rank() == 0:
        assert gen.tokens[0].tolist() == ref["greedy_generate"]
        dec = np.load(os.path.join(folder, "ref_decode_logits.npy"))
        assert np.abs(gen.decode_logits[0] - dec).max() < TOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_matmul_16bit_on_gpu(dtype):
    """layers.matmul on CuPy: 2-D through cuBLAS in 16 bits, batched widened; both equal
    the CPU path (float32 products of the same 16-bit values) up to one rounding."""
    from mpipar.model import layers as L
    from mpipar.model.checkpoint import as_dtype
    dt = as_dtype(dtype)
    rng = np.random.default_rng(3)
    for shape_a, shape_b in (((37, 64), (64, 50)), ((4, 2, 9, 16), (4, 1, 16, 33))):
        a = rng.standard_normal(shape_a).astype(dt)
        b = rng.standard_normal(shape_b).astype(dt)
        want = L.matmul(np, a, b).astype(np.float32)
        got = L.matmul(cupy, cupy.asarray(a), cupy.asarray(b))
        assert got.dtype == dt
        err = np.abs(cupy.asnumpy(got).astype(np.float32) - want).max() / np.abs(want).max()
        assert err <= 2 * {"bfloat16": 2 ** -8, "float16": 2 ** -11}[dtype], (shape_a, err)


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3-moe-tiny"])
def test_reference_bfloat16_on_gpu_matches_cpu(fixtures_dir, name):
    """The same bf16 math on the GPU and on the CPU: within the tolerance of a bf16 run
    (verify.logit_tolerance), tokens equal except at ties within it."""
    from mpipar.model.checkpoint import CheckpointReader
    from mpipar.model.reference import ReferenceModel, generate
    from mpipar.verify import allowed_outlier_rows, compare, logit_tolerance
    folder = os.path.join(fixtures_dir, name)
    ref = json.load(open(os.path.join(folder, "ref.json")))
    src = CheckpointReader(folder)
    prompts = [ref["prompt_a"], ref["prompt_b"]]
    cpu = generate(ReferenceModel(src, dtype="bfloat16"), prompts, 8)
    gpu = generate(ReferenceModel(src, xp=cupy, dtype="auto"), prompts, 8)  # auto: the
    f32 = generate(ReferenceModel(src), prompts, 8)      # checkpoint's float32 on a GPU
    assert np.array_equal(gpu.tokens, f32.tokens)
    low = generate(ReferenceModel(src, xp=cupy, dtype="bfloat16"), prompts, 8)
    tol = logit_tolerance("bfloat16", src.config.num_layers,
                          float(np.nanmax(np.abs(f32.prompt_logits))))
    outliers = allowed_outlier_rows(src.config, "bfloat16", 40)
    assert compare(low, cpu, tol, outliers).startswith("pass")
    assert compare(low, f32, tol, outliers).startswith("pass")
