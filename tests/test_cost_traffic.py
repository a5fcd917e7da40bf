"""mpipar.cost.traffic against hand arithmetic (written out below) and direct simulations.

Pure functions: every rank runs the same checks (any world size).
"""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.cost import traffic as cm
from mpipar.layout import Layout
from tests.test_cost_memory import MOE, Q235  # the same hand-written models


def test_comm_formulas():
    assert cm.allreduce_bytes_seed(1000, 4) == 1500  # 2*3/4*1000
    assert cm.allreduce_bytes_seed(1000, 1) == 0
    assert cm.allgather_bytes_seed(1000, 4) == 750
    # TP, k=24 layers, n=4, h=4096, bf16: sent+recv = 8k(n-1)h/n elements * 2 bytes
    t = cm.tp_bytes_per_token(4096, 4, 24, "bf16")
    assert t.sent == t.recv == 2 * 24 * 1.5 * 4096 * 2
    assert t.total == 8 * 24 * 3 * 4096 / 4 * 2 == 1_179_648
    # PP, m=4 stages: (m-1)*h per token for the pipeline, h in/out per middle stage
    assert cm.pp_bytes_per_token(4096, 4, 2) == (3 * 8192, 3 * 8192)
    assert [cm.pp_bytes_per_token(4096, 4, 2, s) for s in range(4)] == [
        (8192, 0), (8192, 8192), (8192, 8192), (0, 8192)]
    # EP: seed top_k*h/l = 8*4096*2/4 = 16384 bytes (one row per (token, expert) pair)
    assert cm.ep_bytes_per_token_seed(8, 4096, 4, 2) == (16384, 16384)
    assert cm.ep_bytes_per_token_seed(8, 4096, 1, 2) == (0, 0)
    # the engine: a token once to each other rank holding one of its k=8 experts, l=4:
    # 3 * (1 - (3/4)**8) rows per token; a row h*b + 8k = 8192 + 64 out, 8192 back
    assert cm.ep_rows_sent_away(1, 8, 4) == pytest.approx(3 * (1 - 0.75 ** 8))
    assert cm.ep_rows_sent_away(10, 8, 1) == 0
    assert cm.ep_row_bytes(4096, "bf16", 8) == (8192 + 64, 8192)
    assert cm.Traffic(1, 2) + cm.Traffic(3, 4) == (4, 6)


def test_comm_per_token_layouts():
    # 235B, tp=4 pp=4 stage 0 (24 layers): 2 all-reduces per layer; middle stage pp 2h*b
    d = cm.comm_per_token(Q235, Layout(tp=4, pp=4), "bf16", 1)
    assert d["tp"].total == 1_179_648 and d["pp"].total == 16384 and d["ep"].total == 0
    # ep=4 = tp: attention all-reduce 24576 + share all-gather 2*(3/4)*8192 = 12288 per layer;
    # all-to-all: dispatch + combine, each 16384 sent and 16384 received, per layer
    d = cm.comm_per_token(Q235, Layout(tp=4, pp=4, ep=4), "bf16", 0)
    assert d["tp"].total == 24 * (24576 + 12288)
    assert d["ep"].total == 24 * 2 * 2 * 16384
    # tp=1, dp=4, ep=4: per token of a replica the rank dispatches all its tokens: k*h*b
    d = cm.comm_per_token(MOE, Layout(dp=4, ep=2), 4, 0)
    assert d["tp"].total == 0 and d["ep"].sent == 2 * 2 * 2 * 8 * 4  # 2 MoE layers


def test_ep_alltoall_bytes_random_counts():
    rng = np.random.default_rng(7)
    h, b, k = 13, 2, 3
    row = h * b + 8 * k  # a dispatch row carries k (slot, weight) pairs; combine h*b
    for n in (2, 3, 5):
        counts = rng.integers(0, 9, size=(n, n))
        for r in range(n):
            got = cm.ep_alltoall_bytes(counts.tolist(), r, h, b, k)
            off = counts * (1 - np.eye(n, dtype=int))  # rows that leave their rank
            assert got["dispatch"] == (off[r].sum() * row, off[:, r].sum() * row)
            assert got["combine"] == (off[:, r].sum() * h * b, off[r].sum() * h * b)


def test_ep_uniform_routing_matches_expectation():
    # Simulate: l ranks, T tokens per rank, each token picks k experts of E uniformly
    # (independently, as the expectation assumes); experts e live on rank e // (E/l); a
    # token goes once to each rank holding one of its picks (the engine's rows).
    rng = np.random.default_rng(11)
    l, E, k, h, b, T = 4, 16, 3, 10, 2, 4000
    pair_rows = np.zeros((l, l), dtype=np.int64)  # the seed's rows: one per pair
    rows = np.zeros((l, l), dtype=np.int64)  # the engine's rows: one per destination
    for src in range(l):
        dest = rng.integers(0, E, size=(T, k)) // (E // l)  # [T, k] destination ranks
        np.add.at(pair_rows[src], dest.ravel(), 1)
        hit = np.zeros((T, l), dtype=bool)
        hit[np.arange(T)[:, None], dest] = True
        rows[src] = hit.sum(axis=0)
    sent = np.mean([cm.ep_alltoall_bytes(rows, r, h, b, k)["dispatch"].sent for r in range(l)])
    expected = cm.ep_rows_sent_away(T, k, l) * cm.ep_row_bytes(h, b, k)[0]
    assert abs(sent / expected - 1) < 0.02
    with_self = pair_rows.sum(axis=1).mean() * h * b  # the seed counts rows kept at home
    assert with_self == cm.ep_bytes_per_token_seed(k, h, l, b).sent * l * T


def test_exact_allreduce_matches_seed():
    for n, elems, item in ((4, 4 * 25_013, 4), (3, 3 * 40_001, 2), (2, 2 * 60_000, 2)):
        for r in range(n):
            t = cm.exact_allreduce_sent(elems, item, n, r)
            assert t.sent == t.recv == cm.allreduce_bytes_seed(elems * item, n)
    # odd sizes: chunk rounding moves a few elements between ranks, but over the ring each
    # of n chunks is sent n-1 times in reduce-scatter and n-1 times in all-gather
    for n, elems, item in ((4, 100_003, 4), (3, 120_001, 2)):
        ts = [cm.exact_allreduce_sent(elems, item, n, r) for r in range(n)]
        assert sum(t.sent for t in ts) == sum(t.recv for t in ts) == 2 * (n - 1) * elems * item
        seed = cm.allreduce_bytes_seed(elems * item, n)
        assert all(abs(t.sent - seed) <= 2 * (n - 1) * item for t in ts)
    # "auto" = what ring_allreduce does: big messages go round the ring; small ones (one
    # decode token) by recursive doubling: n=4 -> 2 exchanges of the whole S per rank
    from mpipar.comm.allreduce import RECURSIVE_DOUBLING_MAX_BYTES
    big = RECURSIVE_DOUBLING_MAX_BYTES // 2 + 2
    assert cm.exact_allreduce_sent(big, 4, 4, 1, "auto") == cm.exact_allreduce_sent(big, 4, 4, 1)
    assert cm.exact_allreduce_sent(4096, 2, 4, 1, "auto") == (2 * 8192, 2 * 8192)
    assert cm.exact_allreduce_sent(4096, 2, 4, 1) == (12288, 12288)


