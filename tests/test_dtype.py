"""Compute in bfloat16 / float16: the fixtures against float32, with a tolerance derived here.

The tolerance (``verify.logit_tolerance``): each layer rounds its output with a relative
error eps1, measured below for each fixture and dtype by feeding every layer the same
float32 input (rounded to the dtype) in both precisions: max |out16 - out32| / max |out32|.
Through the pre-norm residual stream the L layers' and the head's errors add at most
linearly, so logits must lie within (L + 1) * eps1 * max |logit| of the float32 ones.
Measured on the fixtures: eps1 = 1.7-1.9 u (u = 2^-8 bfloat16, 2^-11 float16), logit
errors about half the bound. Tokens must agree except where the float32 reference is
itself a tie within that tolerance (``verify.compare``).

MoE: a token whose router has a near-tie at the top-k boundary can pick another expert
in 16 bits, a discrete change that no rounding bound covers. The test records both
runs' routing and requires that the logit rows beyond the tolerance are exactly rows
whose routing flipped, and that each flip started at a near-tie of the float32 router
(its k-th and (k+1)-th probabilities closer than twice the layer's measured 16-bit
probability error); ``verify.allowed_outlier_rows`` is the allowance a run without
routing records gets.

A parallel 16-bit run rounds more: each TP rank's partial sum is rounded before the
all-reduce, and the ring rounds once per hop. Its eps1 is measured the same way, on the
parallel blocks themselves, and gives its bound against float32; against the
single-process run in the same dtype the bound is the sum of both (triangle inequality).
Without TP (pipeline and data-parallel splits move activations but add nothing) it must
equal the single-process run bit for bit.
"""

import functools
import json
import os
from unittest import mock

import numpy as np
import pytest

from mpipar.backend import compute_dtype, to_host
from mpipar.cost.traffic import predict_rank
from mpipar.layout import Layout, LayoutError, make_comms
from mpipar.model import layers as L
from mpipar.model.checkpoint import CheckpointReader
from mpipar.model.layers import flatten_batch
from mpipar.model.reference import ReferenceModel, generate
from mpipar.parallel.rank_model import ParallelModel
from mpipar.parallel.shard import check_layout
from mpipar.serve import offline
from mpipar.verify import allowed_outlier_rows, compare, logit_tolerance

FIXTURES = ("qwen3-tiny", "qwen3-moe-tiny", "qwen3-mqa-bf16-tied", "qwen3-moe-mixed-sharded")
UNIT = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
NEW = 8


@functools.cache
def _source(folder):
    if not os.path.isdir(folder):
        pytest.skip(f"no fixture {folder}")
    return CheckpointReader(folder)


def prompts_of(folder):
    ref = json.load(open(os.path.join(folder, "ref.json")))
    return [ref["prompt_a"], ref["prompt_b"]]


@functools.cache
def traced(folder, dtype):
    """Greedy generation of the fixture's two prompts by the single-process model, and
    every router call's choice: [(experts sorted [n, k], probabilities [n, X])]."""
    calls, router_topk = [], L.router_topk

    def recording(xp, x, w_router, top_k, norm_topk_prob):
        experts, weights = router_topk(xp, x, w_router, top_k, norm_topk_prob)
        probs = L.softmax(xp, L.matmul(xp, x, w_router.T).astype(np.float32))
        calls.append((np.sort(to_host(experts), axis=1), to_host(probs)))
        return experts, weights
    with mock.patch.object(L, "router_topk", recording):
        gen = generate(ReferenceModel(_source(folder), dtype=dtype), prompts_of(folder), NEW)
    return gen, calls


def reference(folder, dtype):
    return traced(folder, dtype)[0]


def routing_flips(folder, dtype):
    """Logit rows whose routing differs between ``dtype`` and float32, in the forwards
    both runs fed the same tokens: {("prompt", seq, pos) | ("decode", seq, step)}; and
    for each such row the first flip's (float32 top-k margin, that layer's largest
    16-bit probability error)."""
    config = _source(folder).config
    (low, calls16), (f32, calls32) = traced(folder, dtype), traced(folder, "float32")
    moe = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    if not moe:
        return {}
    same = [s for s in range(NEW) if (low.tokens[:, :s] == f32.tokens[:, :s]).all()]
    _, segments = flatten_batch(prompts_of(folder))
    rows = {}
    for f in range(max(same) + 1):  # forward f: 0 the prefill, else decode -> step f
        names = ([("prompt", seq, r) for seq, _, n in segments for r in range(n)] if f == 0
                 else [("decode", b, f) for b in range(low.tokens.shape[0])])
        for j in range(moe):
            (e16, p16), (e32, p32) = calls16[f * moe + j], calls32[f * moe + j]
            flipped = (e16 != e32).any(axis=1)
            noise = float(np.abs(p16 - p32)[~flipped].max()) if (~flipped).any() else 1.0
            top = np.sort(p32, axis=1)[:, ::-1]
            k = config.num_experts_per_tok
            for r in np.flatnonzero(flipped):
                rows.setdefault(names[r], (float(top[r, k - 1] - top[r, k]), noise))
    return rows


@functools.cache
def layer_rounding(folder, dtype) -> float:
    """eps1: the largest relative error of one layer's output in ``dtype``."""
    src = _source(folder)
    f32, low = ReferenceModel(src), ReferenceModel(src, dtype=dtype)
    ids, segments = flatten_batch(prompts_of(folder))
    outs = []
    f32.hidden(ids, segments, f32.new_caches(2, 64), outs)
    inputs = [f32.embed[ids]] + outs[:-1]
    worst = 0.0
    for i, (x, want) in enumerate(zip(inputs, outs, strict=True)):
        got = low.block(i, x.astype(low.dtype), low.new_caches(2, 64)[i], segments)
        assert got.dtype == low.dtype
        worst = max(worst, float(np.abs(got.astype(np.float32) - want).max()
                                 / np.abs(want).max()))
    return worst


def tolerance(folder, dtype, eps1=None):
    scale = float(np.nanmax(np.abs(reference(folder, "float32").prompt_logits)))
    return logit_tolerance(dtype, _source(folder).config.num_layers, scale,
                           eps1 or layer_rounding(folder, dtype))


def parallel_layer_rounding(world, model, folder) -> float:
    """eps1 of this layout's blocks (collective): each block fed the float32 input."""
    from mpi4py import MPI

    from mpipar.parallel.moe import RoutingStats
    f32 = ReferenceModel(_source(folder))
    ids, segments = flatten_batch(prompts_of(folder))
    outs = []
    f32.hidden(ids, segments, f32.new_caches(2, 64), outs)
    inputs = [f32.embed[ids]] + outs[:-1]
    worst = 0.0
    for block in model.blocks:
        x, want = inputs[block.layer].astype(model.dtype), outs[block.layer]
        got = block.forward(x, [block.new_cache(64) for _ in range(2)], segments,
                            RoutingStats(model.config.num_experts))
        worst = max(worst, float(np.abs(got.astype(np.float32) - want).max()
                                 / np.abs(want).max()))
    return world.allreduce(worst, op=MPI.MAX)


@pytest.mark.rank0
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", FIXTURES)
def test_one_layer_rounding_is_a_few_units(fixtures_dir, name, dtype):
    """The basis of the tolerance: of the order of the unit roundoff, not 0 (a run that
    silently computes in float32) and not much more (a rounding step too many)."""
    eps1 = layer_rounding(os.path.join(fixtures_dir, name), dtype)
    assert 0.5 * UNIT[dtype] <= eps1 <= 4 * UNIT[dtype], (eps1, eps1 / UNIT[dtype])


@pytest.mark.rank0
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", FIXTURES)
def test_reference_in_16bit_against_float32(fixtures_dir, name, dtype):
    folder = os.path.join(fixtures_dir, name)
    model = ReferenceModel(_source(folder), dtype=dtype)
    dt = compute_dtype(dtype, np)
    assert model.lm_head.dtype == model.embed.dtype == model.layers[0]["attn"].q.dtype == dt
    assert model.new_caches(1, 4)[0][0].k.dtype == dt
    low, f32 = reference(folder, dtype), reference(folder, "float32")
    tol = tolerance(folder, dtype)
    flips = routing_flips(folder, dtype)
    for row, (margin, noise) in flips.items():  # each flip began at a router near-tie
        assert margin <= 2 * noise, (row, margin, noise)
    beyond = set()
    for seq, pos in zip(*np.nonzero(np.max(np.abs(low.prompt_logits - f32.prompt_logits),
                                           axis=-1) > tol), strict=True):
        beyond.add(("prompt", int(seq), int(pos)))
    same = max(s for s in range(NEW) if (low.tokens[:, :s] == f32.tokens[:, :s]).all())
    for seq, step in zip(*np.nonzero(np.max(np.abs(low.decode_logits - f32.decode_logits),
                                            axis=-1) > tol), strict=True):
        last = len(prompts_of(folder)[seq]) - 1  # step 0's logits: the prompt's last row
        if step <= same:  # later steps may follow another token (a tie)
            beyond.add(("prompt", int(seq), last) if step == 0 else ("decode", int(seq),
                                                                      int(step)))
    assert beyond <= set(flips), (sorted(beyond - set(flips)), tol)
    verdict = compare(low, f32, tol, outlier_rows=len(flips))
    assert verdict.startswith("pass"), (verdict, tol, sorted(flips))
    # the tolerance is not vacuous: 16-bit logits do differ, by more than float32 noise
    assert np.nanmax(np.abs(low.prompt_logits - f32.prompt_logits)) > UNIT[dtype]


def layouts_16bit(world_size, moe):
    """A few layouts of this world: TP alone, PP alone, TP x PP, and EP with DP."""
    w = world_size
    out = [Layout(tp=w), Layout(pp=w)]
    if w % 2 == 0 and w > 2:
        out.append(Layout(tp=2, pp=w // 2))
    if moe and w % 2 == 0:
        out.append(Layout(tp=w // 2, dp=2, ep=w))
    return list(dict.fromkeys(out))


@pytest.mark.parametrize("name", FIXTURES)
def test_parallel_bfloat16(world, fixtures_dir, name):
    folder = os.path.join(fixtures_dir, name)
    source = _source(folder)
    config = source.config
    low, f32 = reference(folder, "bfloat16"), reference(folder, "float32")
    tol_single = tolerance(folder, "bfloat16")
    rows = int(np.sum(~np.isnan(f32.prompt_logits[..., 0]))) + f32.tokens.size
    outliers = allowed_outlier_rows(config, "bfloat16", rows)
    for layout in layouts_16bit(world.Get_size(), config.is_moe):
        try:
            check_layout(config, layout)
        except LayoutError:
            continue  # the same on every rank
        comms = make_comms(layout, world)
        model = ParallelModel(comms, source, dtype="bfloat16")
        assert all(b.attn.q.dtype.name == "bfloat16" for b in model.blocks)
        tol = tolerance(folder, "bfloat16", max(layer_rounding(folder, "bfloat16"),
                                                parallel_layer_rounding(world, model, folder)))
        comms.ledger.reset()  # the measurement's traffic is not the run's
        gen = offline.generate(model, prompts_of(folder), NEW, keep_logits=True,
                             prefill_chunks=3 if layout.pp > 1 else 1)
        per_rank = model.report()
        problems = None
        if world.Get_rank() == 0:
            problems = []
            assert all(r["dtype"] == "bfloat16" for r in per_rank)
            assert sum(r["kv_cache_bytes"] for r in per_rank) > 0
            for r in per_rank:  # 2 bytes an element on the wire, as predicted
                for kind, want in predict_rank(config, layout, r).items():
                    got = r["ledger"].get(kind, {}).get("sent_bytes", 0)
                    if got != want:
                        problems.append((layout, r["rank"], kind, got, want))
            for ref, what, bound in ((f32, "float32", tol), (low, "bfloat16", tol + tol_single)):
                verdict = compare(gen, ref, bound, outliers)
                if not verdict.startswith("pass"):
                    problems.append((layout, what, verdict))
            # No arithmetic split and the same batches as the single-process run (pp > 1
            # prefills in 3 chunks: other GEMM row counts, so BLAS may sum in another
            # order): bit-exact.
            if layout.tp == 1 and layout.ep == 1 and layout.pp == 1:
                if not (np.array_equal(gen.tokens, low.tokens)
                        and np.array_equal(gen.decode_logits, low.decode_logits)):
                    problems.append((layout, "not bit-exact with the single-process run"))
        problems = world.bcast(problems, root=0)
        assert not problems, problems


@pytest.mark.launcher
def test_program_dtype_flag(fixtures_dir, tmp_path):
    """--dtype bfloat16 end to end: check passes, the report says bfloat16, the KV cache
    holds 2 bytes an element, the ledger equals the prediction; a bad --dtype exits 2."""
    from mpipar.launch import run_mpi
    program = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "programs",
                           "transformer.py")
    folder = os.path.join(fixtures_dir, "qwen3-moe-tiny")
    prompt = prompts_of(folder)[0]
    js = tmp_path / "run.json"
    out = run_mpi(2, [program, "--model", folder, "--tp", "2", "--dtype", "bfloat16",
                      "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "6",
                      "--json", str(js), "--quiet"], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rec = json.load(open(js))
    assert rec["check"] == "pass" and rec["dtype"] == "bfloat16"
    c = _source(folder).config
    from mpipar.serve.kvpool import blocks_for
    from mpipar.serve.offline import BLOCK_SIZE
    tokens = BLOCK_SIZE * blocks_for(len(prompt) + 6, BLOCK_SIZE)  # whole blocks of the pool
    per_rank_kv = tokens * c.num_layers * (c.num_kv_heads // 2) * c.head_dim * 2 * 2
    assert [r["kv_cache_bytes"] for r in rec["ranks"]] == [per_rank_kv] * 2
    ar = rec["ledger"]["tp_allreduce"]
    assert ar["measured_bytes"] == ar["predicted_bytes"] and min(ar["measured_bytes"]) > 0
    bad = run_mpi(2, [program, "--model", folder, "--dtype", "int8"], timeout=60)
    assert bad.returncode == 2 and (bad.stdout + bad.stderr).count("error:") == 1
