"""mpipar.cost.time (with cost.work and cost.machine): each term against a hand
computation, the schedule's composition, the placement rule, the machine files, the
planner's time ranking, and bench.machine's measurements.

Pure arithmetic except the last tests (small NumPy timings; the link probe needs 2+
ranks). Every rank runs every test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from mpipar.cost import machine as mc
from mpipar.cost import plan as pl
from mpipar.cost import time as tm
from mpipar.cost import work as wk
from mpipar.launch import clean_env
from mpipar.layout import Layout
from mpipar.model.config import ModelConfig, get_preset

# 2 layers, h 64, 4 q / 2 kv heads of 16, I 96, vocab 100 (untied)
DENSE = ModelConfig(name="t", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, intermediate_size=96)
MOE = ModelConfig(name="m", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, intermediate_size=96, model_type="qwen3_moe",
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def machine(rate=1e12, bw=1e11, lat=1e-6, link_bw=1e10, inter_bw=1e9, per_node=8):
    return mc.machine_from_dict({
        "name": "hand", "matmul_flops": rate, "mem_read_Bps": bw, "gpus_per_node": per_node,
        "intra_node": {"bandwidth_Bps": link_bw, "latency_s": lat},
        "inter_node": {"bandwidth_Bps": inter_bw, "latency_s": 10 * lat}})


def test_rate_interpolates_log_log_and_clamps():
    m = mc.machine_from_dict({"name": "x", "matmul_flops": {"1": 1e9, "4": 4e9, "16": 8e9},
                              "mem_read_Bps": 1, "intra_node": {"bandwidth_Bps": 1,
                                                                "latency_s": 0}})
    assert m.rate(2) == pytest.approx(2e9)  # halfway on log scale between 1 and 4
    assert m.rate(8) == pytest.approx(math.sqrt(4e9 * 8e9))
    assert m.rate(0.5) == 1e9 and m.rate(1000) == 8e9
    assert machine().rate(1) == machine().rate(1e6) == 1e12  # a published peak


def test_products_roofline():
    m = machine(rate=1e12, bw=1e11)
    # M=10, P=1e6: compute 2*10*1e6/1e12 = 2e-5 s, read 1e6*2 B/1e11 = 2e-5 (equal)
    assert tm.products_time(m, [(10, 1e6, 1)], 2) == pytest.approx(2e-5)
    # M=1000: compute 2e-3 dominates; M=1: read 2e-5 dominates; counts multiply
    assert tm.products_time(m, [(1000, 1e6, 3)], 2) == pytest.approx(3 * 2e-3)
    assert tm.products_time(m, [(1, 1e6, 1)], 2) == pytest.approx(2e-5)


def test_forward_matmuls_dense_and_moe_by_hand():
    lay = Layout(tp=2)
    # attention per rank: 2*64*(2 q heads)*16 + 2*64*(1 kv head)*16 = 6144; MLP 3*64*48
    got = wk.forward_matmuls(DENSE, lay, 0, tokens=5, logit_rows=3)
    assert got == {"layers": (5, 2 * (6144 + 9216), 1), "lm_head": (3, 50 * 64, 1)}
    # MoE, ep=1: every expert TP-split (16 of 32 columns): 3*64*16 params each; 5 tokens
    # pick 2 of 8: hit = 8*(1-(6/8)**5) experts, 5*2/hit rows each, in 2 layers
    got = wk.forward_matmuls(MOE, lay, 0, tokens=5)
    hit = 8 * (1 - 0.75 ** 5)
    assert got["router"] == (5, 2 * 8 * 64, 1)
    m, p, k = got["experts"]
    assert (m, p, k) == (pytest.approx(10 / hit), 3 * 64 * 16, pytest.approx(2 * hit))
    # ep=2 (tp=2): 4 whole experts per rank; the EP group serves 2*5/2 = 5 tokens,
    # the router sees the rank's share ceil(5/2) = 3; the layer waits for the rank with
    # more hit experts: each of its 4 is hit with q = hit/8, E[max of 2 Binomial(4, q)]
    got = wk.forward_matmuls(MOE, Layout(tp=2, ep=2), 0, tokens=5)
    assert got["router"] == (3, 2 * 8 * 64, 1)
    q = hit / 8
    cdf = [sum(math.comb(4, i) * q ** i * (1 - q) ** (4 - i) for i in range(x + 1))
           for x in range(4)]
    busiest = sum(1 - f ** 2 for f in cdf)
    assert hit / 2 < busiest < 4
    m, p, k = got["experts"]
    assert (m, p, k) == (pytest.approx(10 / hit), 3 * 64 * 32, pytest.approx(2 * busiest))
    assert wk.experts_hit(8, 2, 0) == 0 and wk.experts_hit(8, 8, 1) == 8


def test_attention_work_blocks_by_hand():
    lay = Layout(tp=2)  # 2 q heads, 1 kv head of 16 per rank
    # 200 new after 10 cached, blocks of 128: 128 rows see 10+128 keys, 72 see 10+200
    flops, kv = wk.attention_work(DENSE, lay, 200, 10, 4)
    assert flops == 4 * 2 * 16 * (128 * 138 + 72 * 210)
    assert kv == 210 * 2 * 1 * 16 * 4
    m = machine(rate=1e9, bw=1e6)
    assert tm.attention_time(m, DENSE, lay, 200, 10, 4) == pytest.approx(
        max(flops / 1e9, kv / 1e6))


def test_allreduce_paths_by_hand():
    link = mc.Link(bandwidth_Bps=1e9, latency_s=1e-5)
    # 1000 B over 4 ranks: recursive doubling, 2 exchanges of the whole array
    assert tm.allreduce_time(link, 1000, 4) == pytest.approx(2 * 1e-5 + 2000 / 1e9)
    # 4 MiB: ring, 2*3 messages, 2*(3/4)*S bytes sent
    s = 4 << 20
    assert tm.allreduce_time(link, s, 4) == pytest.approx(6 * 1e-5 + 1.5 * s / 1e9)
    assert tm.allreduce_time(link, s, 1) == 0


def test_forward_time_tp_counts_the_ledgers_calls():
    m = machine()
    lay = Layout(tp=2)
    t = tm.forward_time(m, DENSE, lay, 0, [3, 4], [0, 5], 4)
    # 2 all-reduces per layer + the embedding's, of 7 tokens * 64 * 4 B (small path)
    assert t["tp"] == pytest.approx(5 * tm.allreduce_time(m.intra, 7 * 64 * 4, 2))
    prods = tm.products_time(m, wk.forward_matmuls(DENSE, lay, 0, 7).values(), 4)
    attn = 2 * (tm.attention_time(m, DENSE, lay, 3, 0, 4)
                + tm.attention_time(m, DENSE, lay, 4, 5, 4))
    assert t["products"] == pytest.approx(prods) and t["attention"] == pytest.approx(attn)
    assert t["total"] == pytest.approx(prods + attn + t["tp"]) and t["ep"] == 0
    # the last stage has no embedding all-reduce
    t1 = tm.forward_time(m, DENSE, Layout(tp=2, pp=2), 1, [7], [0], 4)
    assert t1["tp"] == pytest.approx(2 * tm.allreduce_time(m.intra, 7 * 64 * 4, 2))


def test_forward_time_ep_waits_for_the_most_loaded_rank():
    m, lay = machine(), Layout(tp=1, dp=2, ep=2)
    even = tm.forward_time(m, MOE, lay, 0, [64], [0], 4)
    skew = tm.forward_time(m, MOE, lay, 0, [64], [0], 4, ep_imbalance=1.5)
    # a token goes once to the other rank when one of its 2 experts is there:
    # 64 * (1 - 0.5**2) = 48 rows per layer; dispatch rows carry h*4 B + 8*k B of slots,
    # combine rows h*4 B; half of dispatch + combine per layer, 2 layers, 3 messages each
    rows = 64 * (1 - 0.5 ** 2)
    per_layer = rows * (64 * 4 + 8 * 2) + rows * 64 * 4
    assert even["ep"] == pytest.approx(m.intra.message(2 * per_layer / 2, 3 * 2))
    assert skew["ep"] > even["ep"] and skew["products"] > even["products"]


def test_schedule_composition():
    m = machine(per_node=1)  # every stage on its own node: PP on the inter-node link
    lay = Layout(pp=2)
    f = [[tm.forward_time(m, DENSE, lay, s, [n], [c], 4)["total"] for s in range(2)]
         for n, c in ((5, 0), (5, 5))]
    send = m.inter.message(5 * 64 * 4)
    head = tm.head_time(m, DENSE, lay, 1, 4)
    # K = 2 chunks of 5: F[1][1] = max(F[0][1] + send, F[1][0]) + t[1][1]
    f00, f01 = f[0][0], f[0][0] + f[1][0]
    f10 = f00 + send + f[0][1]
    want = max(f01 + send, f10) + f[1][1] + head
    assert tm.ttft(m, DENSE, lay, 10, 1, 2, 4) == pytest.approx(want)
    # decode: the stages in turn, one activation send, the ids back, the head
    s0 = tm.forward_time(m, DENSE, lay, 0, [1], [12], 4)["total"]
    s1 = tm.forward_time(m, DENSE, lay, 1, [1], [12], 4)["total"]
    want = s0 + s1 + m.inter.message(64 * 4) + m.inter.message(8) + head
    assert tm.tpot(m, DENSE, lay, 1, 12, 4) == pytest.approx(want)
    # throughput: P micro-batches of B/P keep both stages busy
    step = tm.decode_step(m, DENSE, lay, 2, 12, 4)
    assert tm.throughput(m, DENSE, lay, 4, 12, 4) == pytest.approx(
        4 / min(tm.decode_step(m, DENSE, lay, 4, 12, 4)["total"],
                max(2 * max(step["stages"]), step["total"])))


def test_machine_at_uses_figures_of_busy_ranks():
    d = {"name": "x", "matmul_flops": {"1": 10.0}, "mem_read_Bps": 5.0,
         "intra_node": {"bandwidth_Bps": 1, "latency_s": 0},
         "by_ranks": {"2": {"mem_read_Bps": 3.0}}}
    m = mc.machine_from_dict(d)
    assert m.at(1).mem_read_Bps == 5.0 and m.at(2).mem_read_Bps == 3.0
    assert m.at(4).mem_read_Bps == 3.0 and m.at(4).rate(1) == 10.0


def test_machine_files_cite_every_published_figure():
    for name in ("h100-node", "h200-node"):
        m = mc.load_machine(name)
        with open(os.path.join(mc.MACHINES, name + ".json")) as f:
            d = json.load(f)
        for key in ("matmul_flops", "mem_read_Bps", "gpu_memory_gb",
                    "intra_node.bandwidth_Bps", "inter_node.bandwidth_Bps",
                    "intra_node.latency_s", "inter_node.latency_s"):
            assert key in d["sources"], (name, key)
        assert m.gpus_per_node == 8 and m.rate(1) == 989.4e12
    assert mc.load_machine("h200-node").mem_read_Bps > mc.load_machine("h100-node").mem_read_Bps
    with pytest.raises(ValueError, match="known: "):
        mc.load_machine("no-such-machine")


def test_planner_ranking_small_case():
    # qwen3-30b-a3b (4 kv heads) on 8 H100s, layouts without EP
    c, m = get_preset("qwen3-30b-a3b"), mc.load_machine("h100-node")
    rows = [r for r in pl.plan(c, 8, 80, 8) if r["ep"] == 1]
    by = {}
    for goal in ("ttft", "tpot", "throughput"):
        ranked = pl.add_times([dict(r) for r in rows], c, m, 1024, 1, 128, "bf16",
                              optimise=goal)
        key, sign = pl.OBJECTIVES[goal]
        vals = [sign * r[key] for r in ranked if r["fits"]]
        assert vals == sorted(vals) and [r["rank"] for r in ranked] == list(
            range(1, len(ranked) + 1))
        assert not any(r["fits"] for r in ranked[len(vals):])  # misfits last
        by[goal] = {(r["tp"], r["pp"], r["dp"]): r for r in ranked}
    t8, t4 = by["tpot"][(8, 1, 1)], by["tpot"][(4, 2, 1)]
    # tp=8 replicates the 4 kv heads: twice the KV bytes per token per GPU of tp=4 x
    # pp=2 (all 48 layers, one head, against 24 layers, one head): about half the batch
    assert t8["kv_bytes_per_token"] == 2 * t4["kv_bytes_per_token"]
    assert t8["max_batch"] < 0.6 * t4["max_batch"]
    # the largest batch is what the KV memory holds at prompt + new tokens
    assert t4["max_batch"] == t4["kv_tokens"] // (1024 + 128)
    assert by["throughput"][(4, 2, 1)]["tokens_per_s"] > by["throughput"][(8, 1, 1)][
        "tokens_per_s"]


def test_planner_seed_deployment():
    # Qwen3-235B-A22B on 16 H100s without EP: TP=8 x PP=2 reads the fewest weights per
    # decode step (lowest TPOT), but its replicated kv heads halve the batch, so by
    # throughput the seed's TP=4 x PP=4 comes first
    c, m = get_preset("qwen3-235b-a22b"), mc.load_machine("h100-node")
    rows = [r for r in pl.plan(c, 16, 80, 8) if r["ep"] == 1]
    tput = pl.add_times([dict(r) for r in rows], c, m, 2048, 1, 256, "bf16")
    tpot = pl.add_times([dict(r) for r in rows], c, m, 2048, 1, 256, "bf16",
                        optimise="tpot")
    assert (tput[0]["tp"], tput[0]["pp"]) == (4, 4)
    assert tpot[0]["tp"] == 8 and tpot[0]["kv_dup"] == 2
    seed = tput[0]
    t8 = next(r for r in tput if (r["tp"], r["pp"]) == (8, 2))
    assert t8["max_batch"] < 0.55 * seed["max_batch"]


def _plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "mpipar.cost.plan", *args], capture_output=True,
                          text=True, timeout=120, env=clean_env())


def test_plan_cli_with_machine():
    p = _plan_cli("--model", "qwen3-235b-a22b", "--gpus", "16", "--machine", "h100-node",
                  "--optimise", "throughput", "--top", "12")
    assert p.returncode == 0, p.stderr
    assert "TTFT ms" in p.stdout and "tok/s" in p.stdout and "h100-node" in p.stdout
    bad = _plan_cli("--model", "qwen3-235b-a22b", "--gpus", "16", "--machine", "nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr
    bad = _plan_cli("--model", "qwen3-235b-a22b", "--gpus", "16", "--machine", "h100-node",
                    "--batch", "0")
    assert bad.returncode == 2 and "--batch" in bad.stderr


def test_plan_cli_filters_and_json(tmp_path):
    out = tmp_path / "plan.json"
    p = _plan_cli("--model", "qwen3-235b-a22b", "--gpus", "16", "--machine", "h100-node",
                  "--max-ep", "1", "--optimise", "tpot", "--ep-imbalance", "1.3",
                  "--json", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["optimise"] == "tpot" and all(r["ep"] == 1 for r in doc["rows"])
    fit = [r["tpot_s"] for r in doc["rows"] if r["fits"]]
    assert fit == sorted(fit) and doc["gpu_mem_gb"] == 80  # the machine's memory


def test_bench_machine_figures_are_measured():
    from mpipar.bench import machine
    rates = machine.sgemm_rates(rows=(1, 8), k=256, out=512, mib=2, min_time=0.01)
    assert set(rates) == {1, 8} and all(r > 1e6 for r in rates.values())
    assert machine.read_bandwidth(mib=8, min_time=0.01) > 1e8
    assert machine.copy_bandwidth(mib=8, min_time=0.01) > 1e8


def test_bench_machine_link_between_ranks():
    from mpi4py import MPI

    from mpipar.bench import machine
    from mpipar.comm.group import Group
    from mpipar.comm.ledger import Ledger
    world = MPI.COMM_WORLD
    if world.Get_size() < 2:
        pytest.skip("needs 2 ranks")
    res = machine.link_figures(Group(world, "world", Ledger()), large=1 << 20, repeats=20)
    if world.Get_rank() == 0:
        assert res["bandwidth_Bps"] > 1e6 and 0 <= res["latency_s"] < res["small_s"] + 1e-12
    else:
        assert res is None


def test_placement_rule_is_the_schedulers():
    from mpipar.layout import least_loaded_replica, offline_replicas
    # fewest unfinished requests, the lowest index on ties (serve/scheduler.py's rule)
    assert least_loaded_replica([2, 1, 1]) == 1 and least_loaded_replica([0]) == 0
    # all at t=0 on empty replicas: request i on replica i % dp
    assert offline_replicas(7, 3) == [i % 3 for i in range(7)]
    assert [tm.replica_batch(b, 3) for b in (0, 1, 3, 4, 7)] == [0, 1, 1, 2, 3]
