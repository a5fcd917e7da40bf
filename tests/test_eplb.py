"""EPLB: the placement rule on hand-worked cases, flag validation, and the engine on the
MoE fixture with redundant experts and rebalancing, in every layout of this world with
ep > 1 (tokens and logits against transformers, ledger == prediction on every rank).
The copy choice, row routing and dispatch/combine of moe.py are in test_moe.py."""

import argparse
import os

import numpy as np
import pytest

from mpipar.layout import Layout, make_comms
from mpipar.model.checkpoint import CheckpointReader
from mpipar.model.config import ModelConfig
from mpipar.parallel import eplb
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
    assert eplb.balanced_packing([5, 4, 3, 3, 1, 0], 2) == [[0, 3, 5], [1, 2, 4]]


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
    assert eplb.copy_moves([0, 1, 2, 3], [2, 0, 1, 3], 2) == [(2, 0, 1), (0, 1, 0),
                                                             (1, 2, 1), (3, 3, 0)]


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
