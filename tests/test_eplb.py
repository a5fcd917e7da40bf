"""EPLB and the MoE dispatch: the placement rule on hand-worked cases, copy choice and
row routing by hand, flag validation, and the engine on the MoE fixture with redundant
experts and rebalancing, in every layout of this world with ep > 1 (tokens and logits
against transformers, ledger == prediction on every rank)."""

import argparse
import os

import numpy as np
import pytest

from mpipar.layout import Layout, make_comms
from mpipar.model.checkpoint import CheckpointReader
from mpipar.model.config import ModelConfig
from mpipar.parallel import eplb
from mpipar.parallel.moe import pack_rows, pick_copies, route_rows, unpack_rows
from mpipar.parallel.rank_model import ParallelModel
from mpipar.serve import offline
from tests.test_engine import check_generation, check_ledger, layouts, load_refs, on_rank0


def test_replicate_gives_each_slot_to_the_highest_load_per_copy():
    # [10, 1, 1, 4]: 10 > 4 -> expert 0; 5 > 4 -> expert 0 again; then 3.33 < 4 stops
    assert eplb.replicate([10, 1, 1, 4], 6).tolist() == [3, 1, 1, 1]
    assert eplb.replicate([10, 1, 1, 4], 7).tolist() == [3, 1, 1, 2]
    assert eplb.replicate([1, 1, 1], 5).tolist() == [2, 2, 1]  # ties: lowest id


def test_pack_heaviest_first_to_the_lightest_pack_with_room():
    # 5->p0, 4->p1, 3->p1 (4<5), 3->p0 (5<7), 1->p1 (7<8, now full), 0->p0
    assert eplb.pack([5, 4, 3, 3, 1, 0], 2) == [[0, 3, 5], [1, 2, 4]]


def test_rebalance_hand_case():
    # load [8, 2, 1, 1], 2 extra slots -> copies [3, 1, 1, 1]; per copy 8/3 x3, 2, 1, 1;
    # pack on 2 ranks of 3: rank 0 {0, 0, 3} = 6.33, rank 1 {0, 1, 2} = 5.67
    got = eplb.rebalance([8, 2, 1, 1], 6, 2)
    assert got.tolist() == [0, 0, 3, 0, 1, 2]
    loads = [8 / 3 * 2 + 1, 8 / 3 + 2 + 1]
    assert max(loads) / np.mean(loads) < 1.06
    # without redundancy only the packing changes: 8 | 2+1+1
    assert eplb.rebalance([8, 2, 1, 1], 4, 2).tolist() == [0, 3, 1, 2]


def test_initial_placement_and_keep_in_place():
    assert eplb.initial_placement(8, 0, 2).tolist() == list(range(8))
    # uniform load: copies of experts 0 and 1, one on each rank
    assert eplb.initial_placement(4, 2, 2).tolist() == [2, 0, 1, 3, 0, 1]
    # load [1, 5, 5, 1]: packs {1, 0} and {2, 3}; each goes where its experts already are
    assert eplb.rebalance([1, 5, 5, 1], 4, 2).tolist() == [1, 0, 2, 3]
    assert eplb.rebalance([1, 5, 5, 1], 4, 2, previous=[2, 3, 0, 1]).tolist() == [2, 3, 1, 0]


def test_plan_moves():
    # ranks hold slots {0, 1} and {2, 3}; new: rank 0 gets 2 (travels from slot 2) and
    # keeps 0; rank 1 gets 1 (from slot 1) and keeps 3
    assert eplb.plan_moves([0, 1, 2, 3], [2, 0, 1, 3], 2) == [(2, 0, 1), (0, 1, 0),
                                                             (1, 2, 1), (3, 3, 0)]


def test_pick_copies_round_robin_from_the_rank_offset():
    start, slots = eplb.copies_of([0, 0, 3, 0, 1, 2], 4)  # expert 0 in slots 0, 1, 3
    assert start.tolist() == [0, 3, 4, 5, 6] and slots.tolist() == [0, 1, 3, 4, 5, 2]
    experts = np.array([[0, 1], [0, 2], [0, 3]])
    assert pick_copies(np, experts, start, slots, 0).tolist() == [[0, 4], [1, 5], [3, 2]]
    assert pick_copies(np, experts, start, slots, 1)[:, 0].tolist() == [1, 3, 0]
    # a hot expert's pairs spread evenly over its copies
    hot = np.zeros((301, 1), dtype=np.int64)
    counts = np.bincount(pick_copies(np, hot, start, slots, 2).ravel(), minlength=6)
    assert counts[[0, 1, 3]].tolist() == [100, 100, 101]


def test_route_rows_once_per_destination_rank():
    phys = np.array([[0, 1], [0, 3], [4, 5]])  # 3 slots per rank, 2 ranks
    token, slot, counts = route_rows(np, phys, 3, 2)
    assert token.tolist() == [0, 1, 1, 2] and counts.tolist() == [2, 2]
    assert slot.tolist() == [[0, 1], [0, -1], [-1, 0], [1, 2]]
    token, slot, counts = route_rows(np, phys, 3, 2, dedupe=False)
    assert token.tolist() == [0, 0, 1, 1, 2, 2] and counts.tolist() == [3, 3]
    assert slot.tolist() == [[0, -1], [-1, 1], [0, -1], [-1, 0], [1, -1], [-1, 2]]
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    w = np.random.default_rng(1).random((4, 2)).astype(np.float32)
    back = unpack_rows(np, pack_rows(np, x, slot[:4], w), 5, 2, np.float32)
    assert back[0].tobytes() == x.tobytes() and back[2].tobytes() == w.tobytes()
    assert back[1].tolist() == slot[:4].tolist()


@pytest.mark.parametrize("dedupe", [True, False])
def test_dispatch_combine_against_a_direct_sum(world, dedupe):
    """Random routing over 3 slots per rank with copies; slot s scales rows by (s + 1) *
    (rank + 1), so a row sent to the wrong rank or slot shows; odd token counts, and a
    rank without tokens."""
    from mpipar.comm.group import Group
    from mpipar.comm.ledger import Ledger
    from mpipar.parallel.moe import dispatch_combine
    g = Group(world, "ep", Ledger())
    n, r, per, k, h = g.size, g.rank, 3, 2, 5
    rng = np.random.default_rng(7 + r)
    t = 0 if r == 1 else 11 + 2 * r
    x = rng.standard_normal((t, h)).astype(np.float32)
    phys = np.array([rng.choice(n * per, size=k, replace=False) for _ in range(t)],
                    dtype=np.int64).reshape(t, k)
    w = rng.random((t, k)).astype(np.float32)
    y = dispatch_combine(g, x, phys, w, per, lambda s, rows: rows * ((s + 1) * (g.rank + 1)),
                         dedupe)
    scale = (phys % per + 1) * (phys // per + 1)  # [t, k]
    want = (x[:, None, :] * (w * scale)[:, :, None]).sum(axis=1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    sent = g.ledger.sent("ep_dispatch")
    dest = phys // per
    rows = (sum(len(set(d.tolist()) - {r}) for d in dest) if dedupe
            else int((dest != r).sum()))
    assert sent == rows * (h * 4 + 8 * k)
    assert g.ledger.entries["ep_counts"].calls == 1


MOE = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48, model_type="qwen3_moe", num_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=16)
DENSE = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, intermediate_size=48)


@pytest.mark.parametrize("config, layout, flags, words", [
    (MOE, Layout(tp=2, ep=2), "--redundant-experts 1", ["8 experts + 1 = 9", "ep=2"]),
    (MOE, Layout(tp=4, ep=4), "--redundant-experts 2", ["10 slots", "ep=4"]),
    (DENSE, Layout(tp=2), "--redundant-experts 2", ["dense"]),
    (MOE, Layout(tp=2), "--redundant-experts 2", ["--ep > 1"]),
    (MOE, Layout(tp=2, ep=2), "--eplb-window -1", [">= 0"]),
])
def test_bad_flags_are_refused(config, layout, flags, words):
    p = argparse.ArgumentParser()
    eplb.add_eplb_arguments(p)
    with pytest.raises(eplb.EPLBError) as e:
        eplb.check_eplb_arguments(p.parse_args(flags.split()), config, layout)
    for w in words:
        assert w in str(e.value)
    ok = eplb.check_eplb_arguments(p.parse_args("--redundant-experts 2 --eplb-window 3".split()),
                                   MOE, Layout(tp=2, ep=2))
    assert ok == eplb.EPLBOptions(2, 3)


def test_redundant_experts_and_rebalancing_match_transformers(world, fixtures_dir):
    """Every layout with ep > 1; R = 0 and R = ep, rebalanced every 2 forwards (prefill,
    then 7 decode steps: 4 windows), so tokens before and after each placement count."""
    folder = os.path.join(fixtures_dir, "qwen3-moe-tiny")
    source, refs = CheckpointReader(folder), load_refs(folder)
    config, moved = source.config, 0
    for layout in layouts(world.Get_size(), config.num_experts):
        if layout.ep == 1:
            continue
        for redundant in (0, layout.ep):
            opts = eplb.EPLBOptions(redundant_experts=redundant, window=2)
            model = ParallelModel(make_comms(layout, world), source, eplb=opts)
            gen = offline.generate(model, refs["prompts"], 8, keep_logits=True)
            per_rank = model.report()
            on_rank0(world, check_ledger, per_rank, layout, config)
            on_rank0(world, check_generation, gen, refs, config, f"{layout} R={redundant}")
            if world.Get_rank() == 0:
                assert all(r["eplb_rebalances"] == 4 for r in per_rank if r["layers"][1] > 0)
                moved += sum(r["eplb_copies_sent"] for r in per_rank)
    def some_moved():
        assert moved > 0, "no rebalance moved an expert between ranks"
    if world.Get_size() > 1:  # (one rank has no layout with ep > 1)
        on_rank0(world, some_moved)
