"""All-reduce bandwidth: the hand-coded ring (mpipar.comm.ring) beside MPI's Allreduce.

    mpirun -n N python programs/bench_allreduce.py [--json out.json] [--device gpu]
        [--min-size BYTES] [--max-size BYTES] [--quick]

float32 arrays of 1 KiB .. 64 MiB (x4 steps); for each size and method: warm-up calls, then the
median over repeats of the slowest rank's time. algbw = size / time;
busbw = algbw * 2(n-1)/n (as nccl-tests: the bytes one link carries in a ring, so
it is comparable across rank counts). The two methods alternate call by call, so
machine noise hits both alike. Rank 0 also measures the single-core copy bandwidth
(``bench.machine.copy_bandwidth`` of a 64 MiB array: bytes read + written / time) as the
yardstick of one core; each JSON record carries it as ``copy_gbs``.

``--device gpu``: the arrays live on the GPU (CuPy); the ring moves them through
``mpipar.backend.Transport`` (CUDA-aware MPI, or host staging), and MPI's Allreduce gets
the device arrays when MPI is CUDA-aware, else host copies made (and timed) around it.
"""

from __future__ import annotations

# isort: off
from mpipar.bench import harness  # first: one BLAS thread per rank
# isort: on

import json
import time

import numpy as np
from mpi4py import MPI

from mpipar import backend
from mpipar.bench.machine import copy_bandwidth
from mpipar.comm.allreduce import ring_allreduce
from mpipar.comm.group import Group
from mpipar.comm.ledger import Ledger


def methods_for(device: str, comm, group):
    """{name: f(x, y)} for the arrays of ``device``: y = sum over ranks of x."""
    ring = {"ring": lambda x, y: ring_allreduce(group, x, out=y)}
    if device == "cpu":
        return {**ring, "mpi": lambda x, y: comm.Allreduce(x, y, op=MPI.SUM)}
    xp, aware = group.xp, group.transport.aware

    def mpi(x, y):
        if aware:
            xp.cuda.get_current_stream().synchronize()
            comm.Allreduce(x, y, op=MPI.SUM)
        else:
            host = xp.asnumpy(x)
            out = np.empty_like(host)
            comm.Allreduce(host, out, op=MPI.SUM)
            y.set(out)
        xp.cuda.get_current_stream().synchronize()

    def ring_synced(x, y):
        ring_allreduce(group, x, out=y)
        xp.cuda.get_current_stream().synchronize()
    return {"ring": ring_synced, "mpi": mpi}


def main() -> None:
    ap = harness.parser(__doc__, rounds=False, workers=False, timeout=None,
                        quick="1 KiB to 64 KiB, few repeats")
    ap.add_argument("--min-size", type=int, default=1 << 10, help="bytes (default 1 KiB)")
    ap.add_argument("--max-size", type=int, default=64 << 20, help="bytes (default 64 MiB)")
    ap.add_argument("--device", default="cpu", help="cpu | gpu | auto")
    ap.add_argument("--repeats", type=int, default=0, help="0: by size")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.max_size, args.repeats = min(args.max_size, 64 << 10), args.repeats or 5

    comm = MPI.COMM_WORLD
    n, rank = comm.Get_size(), comm.Get_rank()
    device = backend.select_device(args.device)
    if device == "gpu":
        xp = backend.bind_gpu(comm)[0]
        group = Group(comm, "bench", Ledger(), xp, backend.Transport(xp, backend.cuda_aware()))
    else:
        xp, group = np, Group(comm, "bench", Ledger())
    sizes = []
    s = args.min_size
    while s <= args.max_size:
        sizes.append(s)
        s *= 4
    methods = methods_for(device, comm, group)
    records = []
    rng = np.random.default_rng(rank)
    for size in sizes:
        x = xp.asarray(rng.standard_normal(size // 4).astype(np.float32))
        y = xp.empty_like(x)
        repeats = args.repeats or (50 if size <= 1 << 20 else 30 if size <= 16 << 20 else 12)
        times = {m: [] for m in methods}
        for i in range(args.warmup + repeats):
            for m, f in methods.items():
                comm.Barrier()
                t = time.perf_counter()
                f(x, y)
                dt = comm.allreduce(time.perf_counter() - t, op=MPI.MAX)
                if i >= args.warmup:
                    times[m].append(dt)
        for m in methods:
            med = float(np.median(times[m]))
            algbw = size / med / 1e9
            records.append({"method": m, "ranks": n, "size_bytes": size, "median_s": med,
                            "algbw_gbs": algbw, "busbw_gbs": algbw * 2 * (n - 1) / n,
                            "device": device})
    copy_gbs = copy_bandwidth(64) / 1e9 if rank == 0 else 0.0  # the others sleep meanwhile
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.002)
    if rank != 0:
        return
    for rec in records:
        rec["copy_gbs"] = copy_gbs
    print(f"ranks {n}, device {device}; single-core copy bandwidth {copy_gbs:.2f} GB/s "
          "(read + write)")
    print(f"{'size':>10} {'ring us':>10} {'mpi us':>10} {'ring busbw':>11} {'mpi busbw':>10}"
          f" {'ring/mpi':>9}")
    by = {(r["method"], r["size_bytes"]): r for r in records}
    for size in sizes:
        ring, mpi = by["ring", size], by["mpi", size]
        print(f"{size:>10} {ring['median_s'] * 1e6:>10.1f} {mpi['median_s'] * 1e6:>10.1f}"
              f" {ring['busbw_gbs']:>11.3f} {mpi['busbw_gbs']:>10.3f}"
              f" {mpi['median_s'] / ring['median_s']:>9.2f}")
    if args.json:
        harness.write_json(args.json, records)
        print(f"wrote {args.json}")
    print(json.dumps({"copy_gbs": copy_gbs}))


if __name__ == "__main__":
    main()
