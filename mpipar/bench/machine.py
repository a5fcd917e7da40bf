"""Machine probes for the benchmarks: facts printed with results, medians over quiet
rounds, and this machine's figures (the time model's inputs).

A timing on a shared machine means little if another process ran meanwhile.
``LoadProbe`` measures the cores that processes outside the job kept busy during a
round (machine busy time from /proc/stat minus the job's own CPU time), and
``quiet_rounds`` repeats a round until enough of them were quiet, then takes medians.
"""

from __future__ import annotations

import os
import statistics
import sys

QUIET_CORES = 0.2


def busy_cores(seconds: float = 0.5) -> float | None:
    """Cores kept busy by anything (other jobs) over ``seconds``, from /proc/stat."""
    import time

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    if not os.path.exists("/proc/stat"):
        return None
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def machine() -> dict:
    """Facts printed with the results: cores, memory, CPU, BLAS threads, other load."""
    import platform

    import numpy as np
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    busy = busy_cores()
    if busy is not None and busy > 0.25:
        print(f"warning: {busy:.2f} cores busy with other work before the run: "
              "timings are not reliable", file=sys.stderr)
    return {"cores": os.cpu_count(), "memory_gib": round(mem, 1), "cpu": cpu,
            "numpy": np.__version__, "busy_cores_before": busy,
            "blas_threads_per_rank": os.environ.get("OPENBLAS_NUM_THREADS")}


class LoadProbe:
    """Cores that processes outside this job kept busy during a round: machine busy
    time (/proc/stat) minus the CPU time of the job's own ranks. Collective over
    ``comm`` (None: this process alone); every rank gets rank 0's figure."""

    def __init__(self, comm=None):
        self.comm, self.t0 = comm, None

    def _sample(self):
        import resource
        import time
        ru = resource.getrusage(resource.RUSAGE_SELF)
        mine = ru.ru_utime + ru.ru_stime
        if self.comm is not None:
            mine = self.comm.allreduce(mine)
        busy = 0.0
        if os.path.exists("/proc/stat"):
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
        return busy, mine, time.monotonic()

    def start(self):
        self.t0 = self._sample()

    def stop(self) -> float:
        (b0, m0, t0), (b1, m1, t1) = self.t0, self._sample()
        load = max(0.0, (b1 - b0) - (m1 - m0)) / max(t1 - t0, 1e-9)
        return load if self.comm is None else self.comm.bcast(load, root=0)


def quiet_rounds(probe, repeats: int, run_round, max_factor: int = 4) -> dict:
    """Run ``run_round()`` (-> {variant: seconds}) until ``repeats`` rounds were quiet
    (at most max_factor*repeats rounds). -> {"median": {variant: median over the quiet
    rounds, or over all if none was quiet}, "all": rounds, "loads", "quiet"}."""
    rounds, loads = [], []
    while (sum(ld < QUIET_CORES for ld in loads) < repeats
           and len(rounds) < max_factor * repeats):
        probe.start()
        rounds.append(run_round())
        loads.append(probe.stop())
    quiet = [r for r, ld in zip(rounds, loads, strict=True) if ld < QUIET_CORES]
    use = quiet or rounds
    return {"median": {k: statistics.median(r[k] for r in use) for k in rounds[0]},
            "all": rounds, "loads": loads, "quiet": len(quiet)}


def cpu_seconds() -> tuple[float, float]:
    """(busy core-seconds of the whole machine, CPU seconds of our finished children)."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not os.path.exists("/proc/stat"):
        return 0.0, ru.ru_utime + ru.ru_stime
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), ru.ru_utime + ru.ru_stime


def load_note(records) -> str:
    worst = max(r["other_load_cores"] for r in records)
    quiet = min(r["quiet_rounds"] for r in records)
    note = (f"other processes kept up to {worst:.2f} cores busy over a whole job; medians "
            f"over the quiet rounds (other load < {QUIET_CORES} cores), at least {quiet} "
            "per configuration")
    return note if quiet else note + ": NONE QUIET, timings disturbed"


# ---- this machine's figures (the time model's inputs: mpipar/cost/time.py) -------------
# Each is measured the way the engine uses the machine: float32 products of activations
# [M, k] with weights stored [out, in] (``a @ w.T``), a large weight read once
# (matrix-vector product), and messages through mpipar.comm (Python's per-call cost
# included, since the engine pays it too).

def _best_time(fn, min_time: float = 0.15, floor: int = 3) -> float:
    """Median of at least ``floor`` calls and ``min_time`` seconds, after one warm-up."""
    import time
    fn()
    times, start = [], time.perf_counter()
    while len(times) < floor or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sgemm_rates(rows=(1, 2, 4, 8, 16, 64, 256, 1024), k: int = 2048, out: int = 5120,
                mib: int = 256, min_time: float = 0.15) -> dict:
    """FLOP/s of float32 ``x @ w.T`` with x [M, k], w [out, k], for each M in ``rows``
    -> {M: flop/s}. The products cycle through ``mib`` MiB of weights (6 of 42 MB),
    several times the last-level cache, so weights come from memory as in a forward."""
    import numpy as np
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((out, k), dtype=np.float32)
          for _ in range(max(1, mib * 2**20 // (4 * k * out)))]
    rates = {}
    for m in rows:
        x = rng.standard_normal((m, k), dtype=np.float32)

        def products(x=x):
            for w in ws:
                x @ w.T
        rates[int(m)] = 2.0 * m * k * out * len(ws) / _best_time(products, min_time)
    return rates


def read_bandwidth(mib: int = 256, min_time: float = 0.15) -> float:
    """Bytes/s at which a float32 matrix-vector product reads a ``mib`` MiB matrix (how
    decode reads its weights)."""
    import numpy as np
    mat = np.ones((mib * 2**20 // 4 // 4096, 4096), dtype=np.float32)
    x = np.ones(4096, dtype=np.float32)
    return mat.nbytes / _best_time(lambda: mat @ x, min_time)


def sync(xp) -> None:
    """Wait for the device's current stream (CuPy); nothing for NumPy."""
    if xp.__name__ != "numpy":
        xp.cuda.get_current_stream().synchronize()


def copy_bandwidth(mib: int = 256, min_time: float = 0.15, xp=None) -> float:
    """Copy bandwidth in bytes/s, counting bytes read + written (STREAM's "copy"
    convention: a copy of an array of S bytes moves 2 S), of a ``mib`` MiB float32 array
    on ``xp``'s device (default NumPy: one core's memory bandwidth). Every caller uses
    this one convention; a figure of "bytes copied" per second is half of it."""
    import numpy as np
    xp = np if xp is None else xp
    src = xp.ones(mib * 2**20 // 4, dtype=np.float32)
    dst = xp.empty_like(src)

    def copy():
        dst[...] = src
        sync(xp)
    return 2 * src.nbytes / _best_time(copy, min_time)


def one_core_limits(n: int, h: int, inter: int, mib: int, repeats: int, patience: int = 4,
                    square: int = 2048) -> dict:
    """One core's limits in quiet rounds (``quiet_rounds``), GFLOP/s and GB/s: sgemm, the
    best of the prefill's MLP shapes ([n, h] x [h, inter] and back, weights stored
    [out, in] as the engine holds them) and a ``square``^3 one; ``copy_bandwidth`` (read +
    written) and ``read_bandwidth`` (sgemv) over ``mib`` MiB buffers."""
    import numpy as np
    rng = np.random.default_rng(0)
    shapes = {f"{m}x{k}x{o}": (rng.standard_normal((m, k), dtype=np.float32),
                               rng.standard_normal((o, k), dtype=np.float32))
              for m, k, o in ((n, h, inter), (n, inter, h), (square,) * 3)}

    def one_round():
        out = {name: _best_time(lambda a=a, w=w: a @ w.T, 0.0) for name, (a, w) in
               shapes.items()}
        return {**out, "copy": copy_bandwidth(mib, 0.0), "sgemv": read_bandwidth(mib, 0.0)}

    res = quiet_rounds(LoadProbe(), repeats, one_round, patience)
    t = res["median"]
    gflops = {name: 2 * a.shape[0] * a.shape[1] * w.shape[0] / t[name] / 1e9
              for name, (a, w) in shapes.items()}
    best = max(gflops, key=gflops.get)
    return {"sgemm_gflops": gflops[best], "sgemm_shape": best, "sgemm_all": gflops,
            "copy_gbs": t["copy"] / 1e9, "sgemv_read_gbs": t["sgemv"] / 1e9,
            "buffer_mib": mib, "round_other_load_cores": res["loads"],
            "quiet_rounds": res["quiet"]}


def link_figures(group, small: int = 1024, large: int = 4 << 20,
                 repeats: int = 200) -> dict | None:
    """Per-message latency (s) and bandwidth (B/s) between the first two ranks of
    ``group`` (a mpipar.comm Group), as mpipar's collectives see them: the time of one
    exchange of S bytes (the 2-rank recursive-doubling all-reduce, comm/recursive_doubling.py: one
    Sendrecv and an add) is t(S) = latency + S/bandwidth, fitted at ``small`` and
    ``large`` bytes. Collective over the group; ranks past the first two only wait.
    -> rank 0: {"latency_s", "bandwidth_Bps", "small_s", "large_s"}; others None."""
    import time

    import numpy as np

    from ..comm.allreduce import ring_allreduce
    from ..comm.control import barrier
    sub = group.comm.Split(0 if group.rank < 2 else 1, group.rank)
    times = {}
    if group.rank < 2:
        from ..comm.group import Group
        pair = Group(sub, "probe", group.ledger, np)
        for nbytes in (small, large):
            x = np.ones(nbytes // 4, dtype=np.float32)
            out = np.empty_like(x)
            reps = []
            for _ in range(repeats if nbytes == small else max(repeats // 10, 5)):
                pair.comm.Barrier()
                t = time.perf_counter()
                ring_allreduce(pair, x, algorithm="recursive_doubling", out=out)
                reps.append(time.perf_counter() - t)
            times[nbytes] = statistics.median(reps)
    sub.Free()
    barrier(group)
    if group.rank != 0:
        return None
    ts, tl = times[small], times[large]
    bw = (large - small) / max(tl - ts, 1e-12)
    return {"latency_s": max(ts - small / bw, 0.0), "bandwidth_Bps": bw,
            "small_s": ts, "large_s": tl, "small_bytes": small, "large_bytes": large}


def machine_figures(group, rows=(1, 2, 4, 8, 16, 64, 256, 1024), mib: int = 256) -> dict | None:
    """This machine's figures with every rank of ``group`` measuring at once (so shared
    memory bandwidth is shared as in a run of that many ranks): rank 0's sgemm rates,
    read and copy bandwidth (``mib`` MiB buffers), and the link between ranks 0 and 1
    (size > 1). Collective; rank 0 gets the dict."""
    from ..comm.control import barrier
    barrier(group)
    rates = sgemm_rates(rows, mib=mib)
    read, copy = read_bandwidth(mib), copy_bandwidth(mib)
    barrier(group)
    link = link_figures(group) if group.size > 1 else None
    if group.rank != 0:
        return None
    return {"ranks": group.size, "matmul_flops_by_rows": rates, "mem_read_Bps": read,
            "copy_Bps": copy, "link": link}
