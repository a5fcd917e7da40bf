"""Expert-parallel dispatch and combine: bytes per rank, time and load imbalance under
uniform, skewed (Zipf) and all-to-one routing, for ep = 2 and 4.

    python programs/bench_ep_dispatch.py [--ep 2,4] [--tokens 256] [--hidden 2048] \\
        [--experts 64] [--top-k 8] [--json ep.json] [--quick]

What it measures: the two ``Alltoallv`` of a MoE layer, alone, with synthetic routing
(no model: the expert computation is the identity, so the time is the exchange). Each
of the l ranks of the EP group holds T tokens [T, h] float32 and experts
``[e*X/l, (e+1)*X/l)``; every token picks k distinct experts. As in mpipar.parallel.ep:
the per-expert counts are exchanged (kind ``ep_counts``), the k*T rows, sorted by
expert and so by owner, go out in one ``mpipar.comm.alltoall.alltoallv`` (dispatch),
and come back in a second one (combine). Rows whose expert lives on the sending rank
move nothing.

Routing:
  uniform     every token draws k distinct experts uniformly;
  zipf        expert popularity p ~ 1/rank^s (s = --zipf-s, ranks shuffled over the
              expert ids with a fixed seed), k distinct experts drawn without
              replacement in proportion to p (Gumbel top-k);
  all-to-one  every token picks experts 0..k-1, all held by EP rank 0 (needs X/l >= k).

Reported per routing and ep: dispatch bytes sent per rank (max over ranks, from the
ledger), the seed's ``top_k*h*b/l`` per token of the group (self-copies counted, so
k*h*b*T per rank), the exact figure from the routing counts
(``mpipar.costmodel.ep_alltoall_bytes``), the load imbalance max/mean of rows received
per rank (and per expert), and the median time of dispatch + combine, beside MPI's own
``Alltoallv`` on the same buffers.

Launch model: a driver starts one ``mpirun -n l`` per ep value (mpipar.launch.run_mpi);
the worker runs every routing, warm-up first, then timed rounds with the routings
interleaved (each call: median of ``--inner``; time = max over ranks). ep = 4 on 2
cores is oversubscribed: its bytes and imbalance are exact, its times are marked and
not a latency claim.

Quiet rounds and machine facts: mpipar/benchkit.py.

BLAS: ``import mpipar`` pins OpenBLAS/OMP/MKL to one thread per rank before NumPy loads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import mpipar

mpipar.pin_threads()  # one BLAS thread per rank, before numpy and MPI load
from mpipar.benchkit import (  # noqa: E402
    LoadProbe,
    ints,
    launch_worker,
    load_note,
    machine,
    quiet_rounds,
    worker_main,
)

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


def exchange(group, x, experts, n_experts):
    """Dispatch rows of x [T, h] to the experts' owners and bring them back (identity
    experts). -> (rows back in pair order [T*k, h], send_counts [l], recv_counts [l])."""
    import numpy as np

    from mpipar.comm.alltoall import alltoallv
    k, ep = experts.shape[1], group.size
    flat = experts.ravel()
    order = np.argsort(flat, kind="stable")
    per_expert = np.bincount(flat, minlength=n_experts)
    send_counts = per_expert.reshape(ep, -1).sum(axis=1)
    alltoallv(group, per_expert.reshape(ep, -1), np.ones(ep, dtype=np.int64), kind="ep_counts")
    recv, recv_counts = alltoallv(group, x[order // k], send_counts, kind="ep_dispatch")
    back, _ = alltoallv(group, recv, np.asarray(recv_counts), kind="ep_combine")
    out = np.empty_like(back)
    out[order] = back
    return out, send_counts, np.asarray(recv_counts)


def mpi_alltoallv(comm, rows, send_counts, h):
    """The same round trip with MPI's own collectives: counts Alltoall, rows Alltoallv
    out, and back."""
    import numpy as np
    from mpi4py import MPI
    recv_counts = np.empty_like(send_counts)
    comm.Alltoall(send_counts, recv_counts)
    sc, rc = send_counts * h, recv_counts * h
    sd = np.concatenate([[0], np.cumsum(sc)[:-1]])
    rd = np.concatenate([[0], np.cumsum(rc)[:-1]])
    out = np.empty((int(recv_counts.sum()), h), dtype=rows.dtype)
    comm.Alltoallv([rows, (sc, sd), MPI.FLOAT], [out, (rc, rd), MPI.FLOAT])
    back = np.empty_like(rows)
    comm.Alltoallv([out, (rc, rd), MPI.FLOAT], [back, (sc, sd), MPI.FLOAT])
    return back


def worker(cfg: dict) -> dict | None:
    import numpy as np
    from mpi4py import MPI

    from mpipar.comm.group import Group
    from mpipar.comm.ledger import Ledger
    from mpipar.costmodel import ep_alltoall_bytes, ep_bytes_per_token_seed

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
        back, _, _ = exchange(group, x, routes[r], x_n)
        if not np.array_equal(back, np.repeat(x, k, axis=0)):
            raise AssertionError(f"{r}: rows did not come back unchanged")
    facts = {}
    for r in cfg["routings"]:  # bytes and load: one exchange per routing
        ledger.reset()
        _, send_counts, recv_counts = exchange(group, x, routes[r], x_n)
        facts[r] = {
            "counts_row": world.allgather(send_counts.tolist()),  # [src][dst]
            "dispatch_sent": world.allgather(ledger.sent("ep_dispatch")),
            "combine_sent": world.allgather(ledger.sent("ep_combine")),
            "rows_received": world.allgather(int(recv_counts.sum())),
            "pairs_per_expert": world.allreduce(
                np.bincount(routes[r].ravel(), minlength=x_n)).tolist(),
            "sorted_rows": x[np.argsort(routes[r].ravel(), kind="stable") // k],
            "send_counts": send_counts}

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
            out["mpi " + r] = timed(lambda f=f: mpi_alltoallv(world, f["sorted_rows"],
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
        exact = [ep_alltoall_bytes(f["counts_row"], i, h, 4)["dispatch"].sent
                 for i in range(ep)]
        rows, pairs = np.array(f["rows_received"]), np.array(f["pairs_per_expert"])
        records.append({
            "routing": r, "ep": ep, "ranks": ep,
            "oversubscribed": ep > (os.cpu_count() or 1),
            "tokens_per_rank": t, "hidden": h, "experts": x_n, "top_k": k,
            "dispatch_bytes_per_rank": f["dispatch_sent"],
            "combine_bytes_per_rank": f["combine_sent"],
            "exact_bytes_per_rank": exact,
            "seed_bytes_per_rank": seed_rank,
            "uniform_expected_bytes_per_rank": uniform_rank,
            "max_over_seed": max(f["dispatch_sent"]) / seed_rank,
            "rows_received_per_rank": f["rows_received"],
            "rank_imbalance": float(rows.max() / rows.mean()),
            "expert_imbalance": float(pairs.max() / pairs.mean()),
            "time_s": res["median"]["ours " + r],
            "time_all_s": [x["ours " + r] for x in res["all"]],
            "mpi_alltoallv_s": res["median"]["mpi " + r],
            "round_other_load_cores": res["loads"], "quiet_rounds": res["quiet"]})
    return {"mpi": MPI.Get_library_version().splitlines()[0].strip(), "records": records}


def launch(n: int, cfg: dict, timeout: float) -> dict:
    return launch_worker(HERE, n, cfg, timeout)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=ints, default=[2, 4])
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--zipf-s", type=float, default=1.2)
    p.add_argument("--repeats", type=int, default=3, help="quiet rounds")
    p.add_argument("--inner", type=int, default=5, help="calls timed per round (median)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--patience", type=int, default=4,
                   help="at most patience*repeats rounds to find quiet ones")
    p.add_argument("--quick", action="store_true", help="small sizes, seconds (smoke test)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.patience = 1
        args.tokens, args.hidden, args.experts, args.top_k, args.repeats = 16, 64, 8, 2, 1
        args.inner = 2
    return args


def table(records) -> str:
    lines = [" ep | routing    | dispatch MB/rank max | seed MB/rank | max/seed | exact ok |"
             " rank max/mean | expert max/mean | time ms | MPI Alltoallv ms",
             "----+------------+----------------------+--------------+----------+----------+"
             "---------------+-----------------+---------+-----------------"]
    for r in records:
        ok = "yes" if r["dispatch_bytes_per_rank"] == r["exact_bytes_per_rank"] else "NO"
        mark = " (oversubscribed)" if r["oversubscribed"] else ""
        lines.append(
            f" {r['ep']:2d} | {r['routing']:10s} | {max(r['dispatch_bytes_per_rank']) / 1e6:20.3f}"
            f" | {r['seed_bytes_per_rank'] / 1e6:12.3f} | {r['max_over_seed']:8.3f} | {ok:8s} |"
            f" {r['rank_imbalance']:13.2f} | {r['expert_imbalance']:15.2f} |"
            f" {1e3 * r['time_s']:7.2f} | {1e3 * r['mpi_alltoallv_s']:16.2f}{mark}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker_main(worker, args.worker, args.worker_out)
    cfg = {"tokens": args.tokens, "hidden": args.hidden, "experts": args.experts,
           "top_k": args.top_k, "zipf_s": args.zipf_s, "repeats": args.repeats,
           "patience": args.patience, "inner": args.inner,
           "routings": list(ROUTINGS)}
    meta = machine()  # before the runs: is anything else busy?
    records, mpi = [], None
    for ep in args.ep:
        res = launch(ep, cfg, args.timeout)
        records += [{**r, "other_load_cores": res["other_load_cores"]} for r in res["records"]]
        mpi = res["mpi"]
    print(f"bench_ep_dispatch: {args.tokens} tokens/rank, h={args.hidden} float32, "
          f"{args.experts} experts, top_k={args.top_k}, Zipf s={args.zipf_s}; median of "
          f"{args.repeats}; {meta['cores']} cores, {meta['memory_gib']} GiB, one BLAS thread "
          f"per rank; {mpi}")
    print(table(records))
    print(load_note(records))
    print("seed = top_k*h*b/l per token of the EP group = k*h*b*T per rank (self-copies "
          "included); uniform routing moves (l-1)/l of it.\ntime: counts + dispatch + "
          "combine, max over ranks; MPI Alltoallv: the same round trip with MPI's own "
          "Alltoall/Alltoallv")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "ep_dispatch", "machine": meta, "mpi": mpi,
                       "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
