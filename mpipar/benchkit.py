"""What the benchmarks in programs/ share: machine facts, and medians over quiet rounds.

A timing on a shared 2-core machine means little if another process ran meanwhile.
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


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def launch_worker(script: str, n: int, cfg: dict, timeout: float) -> dict:
    """Run ``script --worker CFG`` as a job of n ranks; its JSON result, with
    ``other_load_cores``: the cores that other processes kept busy meanwhile (machine
    busy time minus our job's)."""
    import json
    import tempfile
    import time

    from .launch import run_mpi
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        busy0, ours0, t0 = *cpu_seconds(), time.monotonic()
        proc = run_mpi(n, [script, "--worker", json.dumps(cfg), "--worker-out", out],
                       timeout=timeout)
        busy1, ours1, t1 = *cpu_seconds(), time.monotonic()
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"{os.path.basename(script)} worker on {n} ranks, {cfg}, "
                               f"failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(out) as f:
            res = json.load(f)
        res["other_load_cores"] = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (t1 - t0)
        return res


def worker_main(worker, cfg_json: str, out_path: str) -> int:
    """The ``--worker`` side of ``launch_worker``: run ``worker(cfg)`` on every rank and
    write what it returns (rank 0's result; None elsewhere) to ``out_path``."""
    import json
    res = worker(json.loads(cfg_json))
    if res is not None:
        with open(out_path, "w") as f:
            json.dump(res, f)
    return 0
