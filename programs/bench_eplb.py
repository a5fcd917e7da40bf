"""Expert-parallel load balancing: max/mean load per EP rank and MoE layer time before and
after an EPLB rebalance, under a skewed router, for ep = 2 and 4 and R redundant experts.

    python programs/bench_eplb.py [--ep 2,4] [--redundant 0,1,2] [--tokens 256] \\
        [--hidden 1024] [--experts 64] [--top-k 8] [--moe-inter 256] [--json eplb.json]

The model: one Qwen3-MoE layer of the engine (``mpipar.parallel.moe.MoE``: router,
dispatch with dedupe, experts, combine) with random weights, X experts, top-k, fed
hidden states x [T, h] per rank (T tokens on each of the l ranks of the EP group,
``tp=1, dp=ep=l``). The router is skewed through its rows: x[:, 0] = 1 and the router's
column 0 holds a bias b_e, so expert e's logit is b_e + a N(0, 1) token part:
  zipf        b_e = -s ln(rank_e) (s = --zipf-s, 1.2): popularity ~ 1/rank^s, the ranks
              shuffled over the expert ids with a fixed seed;
  all-to-one  b_e = +20 for experts 0..k-1 (all on EP rank 0 in the first placement),
              so every token picks the same k experts: one rank gets every pair.
--redundant lists R in units of ep (default 0, 1, 2: R = 0, ep, 2*ep).

Procedure per (ep, routing, R): "before" is the layer without EPLB (contiguous experts,
R = 0); "after" starts from the first placement with R slots (the EPLB rule on uniform
load, mpipar/parallel/eplb.py), runs a window of --window forwards on training tokens
and rebalances
(``ExpertBalancer``: load all-reduced over the EP group, new placement, copies moved
over MPI: kind ``eplb_weights``). Both placements then run on fresh tokens from the same
router (out of sample): max/mean of (token, expert) pairs computed per EP rank, and
their outputs must agree (1e-4). At ep = 2 (one core per rank) the MoE layer time
(route + dispatch + experts + combine, max over ranks) of both placements is measured
interleaved in quiet rounds (mpipar/bench/machine.py); ep = 4 on 2 cores is
oversubscribed, so only its loads and bytes are reported.

Harness (flags, launch, one BLAS thread per rank): mpipar/bench/harness.py.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from mpipar.bench import harness
from mpipar.bench.machine import LoadProbe, machine, quiet_rounds

HERE = os.path.abspath(__file__)
ROUTINGS = ("zipf", "all-to-one")


def router_bias(routing: str, n_experts: int, k: int, s: float):
    import numpy as np
    if routing == "zipf":
        order = np.random.default_rng(12345).permutation(n_experts)  # popularity rank - 1
        return (-s * np.log(1.0 + order)).astype(np.float32)
    if routing == "all-to-one":
        bias = np.zeros(n_experts, dtype=np.float32)
        bias[:k] = 20.0
        return bias
    raise ValueError(f"unknown routing {routing!r}")


def biased_source(config, bias):
    """Random weights whose router column 0 is ``bias`` (the skewed router rows)."""
    from mpipar.model.init import RandomWeights

    class BiasedRouter(RandomWeights):
        def read(self, name, index=None, dtype="float32"):
            out = super().read(name, index, dtype)
            if name.endswith("mlp.gate.weight"):
                out[:, 0] = bias[index[0] if isinstance(index, tuple) else slice(None)]
            return out
    return BiasedRouter(config, seed=0)


def tokens(n, h, seed):
    import numpy as np
    x = np.random.default_rng(seed).standard_normal((n, h), dtype=np.float32)
    x[:, 0] = 1.0  # the bias feature
    return x


def worker(cfg: dict) -> dict | None:
    import numpy as np
    from mpi4py import MPI

    from mpipar.layout import Layout, make_comms
    from mpipar.model.config import ModelConfig
    from mpipar.parallel.eplb import ExpertBalancer, initial_placement
    from mpipar.parallel.moe import MoE, RoutingStats
    from mpipar.parallel.shard import rank_shard

    world = MPI.COMM_WORLD
    ep, me = world.size, world.rank
    x_n, k, h = cfg["experts"], cfg["top_k"], cfg["hidden"]
    config = ModelConfig(name="bench-eplb", vocab_size=64, hidden_size=h, num_layers=1,
                         num_heads=1, num_kv_heads=1, head_dim=h, intermediate_size=64,
                         model_type="qwen3_moe", num_experts=x_n, num_experts_per_tok=k,
                         moe_intermediate_size=cfg["moe_inter"], norm_topk_prob=True)
    layout = Layout(tp=1, dp=ep, ep=ep)
    comms = make_comms(layout, world)
    shard = rank_shard(config, layout, me)
    t = cfg["tokens"]
    x_train, x_test = tokens(t, h, 100 + me), tokens(t, h, 200 + me)

    def pairs_per_rank(layer):
        st = RoutingStats(x_n)
        y = layer.forward(x_test, st)
        return world.allgather(st.pairs_computed), y

    def moe_time(layer):
        out = []
        for _ in range(cfg["inner"]):
            world.Barrier()
            t0 = time.perf_counter()
            layer.forward(x_test, RoutingStats(x_n))
            out.append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        return statistics.median(out)

    records = []
    for routing in cfg["routings"]:
        source = biased_source(config, router_bias(routing, x_n, k, cfg["zipf_s"]))
        for units in cfg["redundant"]:
            r = units * ep
            if (x_n + r) % ep:
                continue
            first = initial_placement(x_n, r, ep)
            before = MoE(source, config, shard, 0, comms, np, initial_placement(x_n, 0, ep))
            after = MoE(source, config, shard, 0, comms, np, first)
            balancer = ExpertBalancer([after], comms, cfg["window"])
            stats = RoutingStats(x_n)
            comms.ledger.reset()
            for _ in range(cfg["window"]):  # one window: the rebalance closes it
                after.forward(x_train, stats)
                balancer.forward_done(stats)
            moved = world.allgather(comms.ledger.sent("eplb_weights"))
            load_bytes = world.allgather(comms.ledger.sent("eplb_load"))
            copies = sum(world.allgather(stats.copies_sent))
            rows_b, y_b = pairs_per_rank(before)
            rows_a, y_a = pairs_per_rank(after)
            if not np.allclose(y_a, y_b, rtol=1e-4, atol=1e-4):
                raise AssertionError(f"{routing} R={r}: the rebalanced layer's output differs")
            timing = None
            if ep == 2 and not cfg["no_time"]:
                timing = quiet_rounds(
                    LoadProbe(world), cfg["repeats"],
                    lambda b=before, a=after: {"before": moe_time(b), "after": moe_time(a)},
                    cfg["patience"])
            if me != 0:
                continue
            rb, ra = np.array(rows_b, dtype=float), np.array(rows_a, dtype=float)
            rec = {"ep": ep, "redundant": r, "routing": routing, "tokens_per_rank": t,
                   "hidden": h, "experts": x_n, "top_k": k, "moe_inter": cfg["moe_inter"],
                   "window": cfg["window"],
                   "placement_before": before.slot_expert.tolist(),
                   "placement_first": first.tolist(),
                   "placement_after": after.slot_expert.tolist(),
                   "pairs_per_rank_before": rows_b, "pairs_per_rank_after": rows_a,
                   "max_over_mean_before": float(rb.max() / rb.mean()),
                   "max_over_mean_after": float(ra.max() / ra.mean()),
                   "copies_moved": copies,
                   "eplb_weights_bytes_per_rank": moved,
                   "bytes_per_rebalance": int(sum(moved)),
                   "eplb_load_bytes_per_rank": load_bytes,
                   "copy_bytes": 3 * h * cfg["moe_inter"] * 4,
                   "moe_time_before_s": None, "moe_time_after_s": None,
                   "moe_time_ratio": None, "quiet_rounds": None, "round_other_load_cores": None}
            if timing is not None:
                tb, ta = timing["median"]["before"], timing["median"]["after"]
                rec.update(moe_time_before_s=tb, moe_time_after_s=ta, moe_time_ratio=ta / tb,
                           quiet_rounds=timing["quiet"], round_other_load_cores=timing["loads"])
            records.append(rec)
    if me != 0:
        return None
    return harness.worker_records(records)


LEGEND = ("max/mean: (token, expert) pairs computed per EP rank on fresh tokens; before = "
          "no EPLB (contiguous experts, R = 0), after = R redundant slots and one EPLB "
          "rebalance; MB/rebalance: expert weights sent over MPI, all ranks (kind "
          "eplb_weights); MoE ms: one layer's forward, max over ranks, ep=2 only (ep=4 is "
          "oversubscribed on 2 cores)")


def table(records) -> str:
    lines = [" ep | routing    |  R | max/mean before | after | copies moved | MB/rebalance |"
             " MoE ms before | after | after/before",
             "----+------------+----+-----------------+-------+--------------+--------------+"
             "---------------+-------+-------------"]
    for r in records:
        t = ("             - |     - |            -" if r["moe_time_ratio"] is None else
             f" {1e3 * r['moe_time_before_s']:13.2f} | {1e3 * r['moe_time_after_s']:5.1f} |"
             f" {r['moe_time_ratio']:12.2f}")
        lines.append(f" {r['ep']:2d} | {r['routing']:10s} | {r['redundant']:2d} |"
                     f" {r['max_over_mean_before']:15.2f} | {r['max_over_mean_after']:5.2f} |"
                     f" {r['copies_moved']:12d} | {r['bytes_per_rebalance'] / 1e6:12.2f} |{t}")
    return "\n".join(lines)


def parse_args(argv):
    p = harness.parser(__doc__, quick="small sizes, seconds (smoke test)")
    p.add_argument("--ep", type=harness.ints, default=[2, 4])
    p.add_argument("--redundant", type=harness.ints, default=[0, 1, 2],
                   help="R in units of ep (0,1,2: R = 0, ep, 2*ep)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--moe-inter", type=int, default=256)
    p.add_argument("--zipf-s", type=float, default=1.2)
    p.add_argument("--window", type=int, default=4, help="forwards before the rebalance")
    p.add_argument("--inner", type=int, default=3, help="forwards timed per round (median)")
    p.add_argument("--no-time", action="store_true", help="loads and bytes only")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.experts, args.top_k, args.moe_inter = 32, 32, 16, 4, 16
        args.repeats, args.inner, args.patience, args.window = 1, 1, 1, 2
    return args


def main(args) -> int:
    cfg = harness.pick(args, "tokens", "hidden", "experts", "top_k", "moe_inter", "zipf_s",
                       "window", "repeats", "inner", "patience", "no_time", "redundant")
    cfg["routings"] = list(ROUTINGS)
    meta = machine()
    records, mpi = harness.launch_all(HERE, [(ep, cfg) for ep in args.ep], args.timeout)
    timed = [r for r in records if r["quiet_rounds"] is not None]
    harness.print_report(f"bench_eplb: {args.tokens} tokens/rank, h={args.hidden}, "
                         f"{args.experts} experts, top_k={args.top_k}, moe_inter="
                         f"{args.moe_inter}, float32, Zipf s={args.zipf_s}, window "
                         f"{args.window} forwards", meta, mpi, table(records), timed, LEGEND)
    harness.write_report(args.json, "eplb", meta, records, mpi=mpi)
    return 0


if __name__ == "__main__":
    sys.exit(harness.run(parse_args, worker, main))
