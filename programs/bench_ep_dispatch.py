"""Expert-parallel dispatch and combine: bytes per rank, time and load imbalance under
uniform, skewed (Zipf) and all-to-one routing, for ep = 2 and 4.

    python programs/bench_ep_dispatch.py [--ep 2,4] [--tokens 256] [--hidden 2048] \\
        [--experts 64] [--top-k 8] [--json ep.json] [--quick]

What it measures: a MoE layer's exchange alone, through the engine's own
``mpipar.parallel.moe.dispatch_combine`` with synthetic routing (no model: the experts
are the identity, so the time is the exchange). Each of the l ranks of the EP group
holds T tokens [T, h] float32 and experts ``[e*X/l, (e+1)*X/l)``; every token picks k
distinct experts. Three collectives: row counts (kind ``ep_counts``), dispatch
(``ep_dispatch``) and combine (``ep_combine``). A token goes once to each other rank
that holds one of its experts (dedupe, as the engine does), or, for comparison, once
per (token, expert) pair; a row is h*b + 8k bytes (the token and k slot ids + weights).

Routing:
  uniform     every token draws k distinct experts uniformly;
  zipf        expert popularity p ~ 1/rank^s (s = --zipf-s, ranks shuffled over the
              expert ids with a fixed seed), k distinct experts drawn without
              replacement in proportion to p (Gumbel top-k);
  all-to-one  every token picks experts 0..k-1, all held by EP rank 0 (needs X/l >= k).

Reported per routing and ep: dispatch bytes sent per rank (max over ranks, from the
ledger) per pair and with dedupe, beside the seed's ``top_k*h*b/l`` per token of the
group (self-copies counted, so k*h*b*T per rank) and the exact figure counted straight
from the routing; the load imbalance max/mean of (token, expert) pairs per rank (and
per expert), and the median time of counts + dispatch + combine (dedupe), beside MPI's
own ``Alltoall`` + ``Alltoallv`` on the same buffers.

Launch model: a driver starts one ``mpirun -n l`` per ep value (mpipar.launch.run_mpi);
the worker runs every routing, warm-up first, then timed rounds with the routings
interleaved (each call: median of ``--inner``; time = max over ranks). ep = 4 on 2
cores is oversubscribed: its bytes and imbalance are exact, its times are marked and
not a latency claim.

Harness (flags, launch, one BLAS thread per rank), quiet rounds and machine facts:
mpipar/bench/.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from mpipar.bench import harness
from mpipar.bench.machine import LoadProbe, machine, quiet_rounds

HERE = os.path.abspath(__file__)
ROUTINGS = ("uniform", "zipf", "all-to-one")


def route(kind: str, n_tokens: int, n_experts: int, k: int, s: float, seed: int):
    """-> experts [T, k] int64 (distinct per token)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    if kind == "all-to-one":
        return np.tile(np.arange(k, dtype=np.int64), (n_tokens, 1))
    if kind == "uniform":
        logp = np.zeros(n_experts)
    elif kind == "zipf":
        order = np.random.default_rng(12345).permutation(n_experts)  # same on every rank
        logp = -s * np.log(1.0 + order)
    else:
        raise ValueError(f"unknown routing {kind!r}")
    gumbel = rng.gumbel(size=(n_tokens, n_experts))
    return np.argsort(-(logp + gumbel), axis=1)[:, :k].astype(np.int64)


def exchange(group, x, experts, n_experts, dedupe=True):
    """Dispatch rows of x [T, h] to the experts' owners and bring them back through
    mpipar.parallel.moe.dispatch_combine (identity experts, router weights 1/k, so the
    result is x again) -> y [T, h]."""
    import numpy as np

    from mpipar.parallel.moe import dispatch_combine
    k = experts.shape[1]
    weights = np.full(experts.shape, 1.0 / k, dtype=np.float32)
    return dispatch_combine(group, x, experts, weights, n_experts // group.size,
                            lambda slot, rows: rows, dedupe)


def packed_rows(x, experts, n_experts, ep, dedupe=True):
    """What dispatch sends: (bytes rows [M, h*b + 8k], send_counts [l])."""
    import numpy as np

    from mpipar.parallel.moe import pack_rows, route_rows
    token, slot, counts = route_rows(np, experts, n_experts // ep, ep, dedupe)
    w = np.where(slot >= 0, 1.0 / experts.shape[1], 0).astype(np.float32)
    return pack_rows(np, x[token], slot, w), counts


def exact_rows(experts, n_experts, ep, me, dedupe):
    """Rows this rank sends to other ranks, counted straight from the routing: one per
    (token, other rank it needs) with dedupe, one per pair whose expert is elsewhere
    without."""
    dest = experts // (n_experts // ep)  # [T, k]
    if not dedupe:
        return int((dest != me).sum())
    return sum(len(set(row.tolist()) - {me}) for row in dest)


def mpi_alltoallv(comm, rows, send_counts, out_width):
    """The same round trip with MPI's own collectives: counts Alltoall, packed rows
    Alltoallv out, [h] float32 rows back."""
    import numpy as np
    from mpi4py import MPI
    recv_counts = np.empty_like(send_counts)
    comm.Alltoall(send_counts, recv_counts)
    b = rows.shape[1]
    sd = np.concatenate([[0], np.cumsum(send_counts)[:-1]])
    rd = np.concatenate([[0], np.cumsum(recv_counts)[:-1]])
    out = np.empty((int(recv_counts.sum()), b), dtype=np.uint8)
    comm.Alltoallv([rows, (send_counts * b, sd * b), MPI.BYTE],
                   [out, (recv_counts * b, rd * b), MPI.BYTE])
    y = np.ascontiguousarray(out[:, :out_width * 4]).view(np.float32)
    back = np.empty((rows.shape[0], out_width), dtype=np.float32)
    comm.Alltoallv([y, (recv_counts * out_width, rd * out_width), MPI.FLOAT],
                   [back, (send_counts * out_width, sd * out_width), MPI.FLOAT])
    return back


def worker(cfg: dict) -> dict | None:
    import numpy as np
    from mpi4py import MPI

    from mpipar.comm.group import Group
    from mpipar.comm.ledger import Ledger
    from mpipar.cost.traffic import ep_bytes_per_token_seed

    world = MPI.COMM_WORLD
    ledger = Ledger()
    group = Group(world, "ep", ledger, np)
    ep, me = world.size, world.rank
    t, h, x_n, k = cfg["tokens"], cfg["hidden"], cfg["experts"], cfg["top_k"]
    if x_n % ep or x_n // ep < k:
        raise ValueError(f"need experts % ep == 0 and experts/ep >= top_k: {x_n}, {ep}, {k}")
    x = np.random.default_rng(100 + me).standard_normal((t, h), dtype=np.float32)
    routes = {r: route(r, t, x_n, k, cfg["zipf_s"], 1000 * me + 7) for r in cfg["routings"]}
    for r in cfg["routings"]:  # warm-up, and correctness of the round trip
        for dedupe in (True, False):
            back = exchange(group, x, routes[r], x_n, dedupe)
            if not np.allclose(back, x, rtol=1e-5, atol=1e-5):
                raise AssertionError(f"{r} dedupe={dedupe}: rows did not come back unchanged")
    row_bytes = h * 4 + 8 * k
    facts = {}
    for r in cfg["routings"]:  # bytes and load: one exchange per routing and mode
        sent = {}
        for dedupe in (False, True):
            ledger.reset()
            exchange(group, x, routes[r], x_n, dedupe)
            sent[dedupe] = (ledger.sent("ep_dispatch"), ledger.sent("ep_combine"))
        rows, counts = packed_rows(x, routes[r], x_n, ep)
        pairs_in = world.allreduce(np.bincount(routes[r].ravel() // (x_n // ep), minlength=ep))
        facts[r] = {
            "dispatch_sent": world.allgather(sent[True][0]),
            "combine_sent": world.allgather(sent[True][1]),
            "dispatch_no_dedupe": world.allgather(sent[False][0]),
            "exact": world.allgather(exact_rows(routes[r], x_n, ep, me, True) * row_bytes),
            "exact_no_dedupe": world.allgather(
                exact_rows(routes[r], x_n, ep, me, False) * row_bytes),
            "pairs_per_rank": pairs_in.tolist(),
            "pairs_per_expert": world.allreduce(
                np.bincount(routes[r].ravel(), minlength=x_n)).tolist(),
            "packed": rows, "send_counts": counts}

    def timed(fn):  # max over ranks of one call, median of ``inner`` calls
        out = []
        for _ in range(cfg["inner"]):
            world.Barrier()
            t0 = time.perf_counter()
            fn()
            out.append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        return statistics.median(out)

    def one_round():  # -> {"ours routing": s, "mpi routing": s}
        out = {}
        for r in cfg["routings"]:
            f = facts[r]
            out["ours " + r] = timed(lambda r=r: exchange(group, x, routes[r], x_n))
            out["mpi " + r] = timed(lambda f=f: mpi_alltoallv(world, f["packed"],
                                                              f["send_counts"], h))
        return out

    res = quiet_rounds(LoadProbe(world), cfg["repeats"], one_round, cfg["patience"])
    if me != 0:
        return None
    seed_rank = ep_bytes_per_token_seed(k, h, ep, 4).sent * (ep * t)  # per rank, all tokens
    uniform_rank = seed_rank * (ep - 1) / ep
    records = []
    for r in cfg["routings"]:
        f = facts[r]
        rows, pairs = np.array(f["pairs_per_rank"]), np.array(f["pairs_per_expert"])
        records.append({
            "routing": r, "ep": ep, "ranks": ep,
            "oversubscribed": harness.oversubscribed(ep),
            "tokens_per_rank": t, "hidden": h, "experts": x_n, "top_k": k,
            "row_bytes": row_bytes,
            "dispatch_bytes_per_rank": f["dispatch_sent"],
            "dispatch_bytes_no_dedupe_per_rank": f["dispatch_no_dedupe"],
            "combine_bytes_per_rank": f["combine_sent"],
            "exact_bytes_per_rank": f["exact"],
            "exact_bytes_no_dedupe_per_rank": f["exact_no_dedupe"],
            "seed_bytes_per_rank": seed_rank,
            "uniform_expected_bytes_per_rank": uniform_rank,
            "max_over_seed": max(f["dispatch_sent"]) / seed_rank,
            "max_over_seed_no_dedupe": max(f["dispatch_no_dedupe"]) / seed_rank,
            "pairs_per_rank": f["pairs_per_rank"],
            "rank_imbalance": float(rows.max() / rows.mean()),
            "expert_imbalance": float(pairs.max() / pairs.mean()),
            "time_s": res["median"]["ours " + r],
            "time_all_s": [x["ours " + r] for x in res["all"]],
            "mpi_alltoallv_s": res["median"]["mpi " + r],
            "round_other_load_cores": res["loads"], "quiet_rounds": res["quiet"]})
    return harness.worker_records(records)


def parse_args(argv):
    p = harness.parser(__doc__, timeout=900, quick="small sizes, seconds (smoke test)")
    p.add_argument("--ep", type=harness.ints, default=[2, 4])
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--zipf-s", type=float, default=1.2)
    p.add_argument("--inner", type=int, default=5, help="calls timed per round (median)")
    args = p.parse_args(argv)
    if args.quick:
        args.patience = 1
        args.tokens, args.hidden, args.experts, args.top_k, args.repeats = 16, 64, 8, 2, 1
        args.inner = 2
    return args


LEGEND = ("seed = top_k*h*b/l per token of the EP group = k*h*b*T per rank (self-copies "
          "included); per pair: one row per (token, expert) on another rank; dedupe (what "
          "mpipar sends): one row per (token, other rank it needs); a row is h*b + 8k bytes "
          "(k slot ids and weights).\ntime: counts + dispatch + combine, max over ranks; "
          "MPI Alltoallv: the same round trip with MPI's own Alltoall/Alltoallv")


def table(records) -> str:
    lines = [" ep | routing    | seed MB/rank | per pair MB/rank max | dedupe MB/rank max |"
             " dedupe/seed | exact ok | rank max/mean | expert max/mean | time ms |"
             " MPI Alltoallv ms",
             "----+------------+--------------+----------------------+--------------------+"
             "-------------+----------+---------------+-----------------+---------+"
             "-----------------"]
    for r in records:
        ok = "yes" if (r["dispatch_bytes_per_rank"] == r["exact_bytes_per_rank"] and
                       r["dispatch_bytes_no_dedupe_per_rank"] ==
                       r["exact_bytes_no_dedupe_per_rank"]) else "NO"
        mark = " (oversubscribed)" if r["oversubscribed"] else ""
        lines.append(
            f" {r['ep']:2d} | {r['routing']:10s} | {r['seed_bytes_per_rank'] / 1e6:12.3f} |"
            f" {max(r['dispatch_bytes_no_dedupe_per_rank']) / 1e6:20.3f} |"
            f" {max(r['dispatch_bytes_per_rank']) / 1e6:18.3f} | {r['max_over_seed']:11.3f} |"
            f" {ok:8s} | {r['rank_imbalance']:13.2f} | {r['expert_imbalance']:15.2f} |"
            f" {1e3 * r['time_s']:7.2f} | {1e3 * r['mpi_alltoallv_s']:16.2f}{mark}")
    return "\n".join(lines)


def main(args) -> int:
    cfg = harness.pick(args, "tokens", "hidden", "experts", "top_k", "zipf_s", "repeats",
                       "patience", "inner")
    cfg["routings"] = list(ROUTINGS)
    meta = machine()  # before the runs: is anything else busy?
    records, mpi = harness.launch_all(HERE, [(ep, cfg) for ep in args.ep], args.timeout)
    harness.print_report(f"bench_ep_dispatch: {args.tokens} tokens/rank, h={args.hidden} "
                         f"float32, {args.experts} experts, top_k={args.top_k}, Zipf "
                         f"s={args.zipf_s}; median of {args.repeats}", meta, mpi,
                         table(records), records, LEGEND)
    harness.write_report(args.json, "ep_dispatch", meta, records, mpi=mpi)
    return 0


if __name__ == "__main__":
    sys.exit(harness.run(parse_args, worker, main))
