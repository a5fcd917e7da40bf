"""Time to first token (TTFT) of a long prompt: pp = 2 with K = 1, 2, 4, 8 prefill chunks,
beside pp = 1.

    python programs/bench_pp_ttft.py [--preset bench-166m] [--prompt-len 1024] \\
        [--chunks 1,2,4,8] [--json pp.json] [--quick]

What it claims: with P stages and the prompt in one piece, stage s waits for stage s-1,
so a prefill that takes T on one process still takes about T (P stages of T/P one
after the other) plus the activation transfers. Cut into K chunks that follow each
other through the pipeline (non-blocking sends), stage 0 starts chunk i+1 while stage 1
works on chunk i, and TTFT falls toward T/P + (P-1)*T/(P*K): at P = 2, K = 8 that is
0.56 of the K = 1 time. Target: best K <= 0.65 x (K = 1) at pp = 2. Chunking costs
smaller matrix products and more messages, which is why K cannot grow forever; it also
saves work of its own: a chunk's causal attention scores only the keys before it,
where one piece computes the whole [N, N] square and masks half. pp = 1 runs the same
K values (chunked prefill without a pipeline), which separates that saving from the
pipeline's overlap.

Launch model: a driver process starts ``mpirun -n 1`` (pp = 1) and ``mpirun -n 2``
(pp = 2) workers through mpipar.launch.run_mpi. The pp = 2 worker loads the model once
and interleaves the K values inside each round (K = 1, 2, 4, 8, K = 1, 2, ...), so
drift of the machine hits every K alike. One warm-up generate() per K first. TTFT is
the engine's: from the barrier before prefill to the first token picked on the last
stage (generate() with one new token). pp = 2 on this 2-core machine gives each stage
its own core.

Quiet rounds: this machine is shared, so each round is timed together with the load
that other processes put on it (``LoadProbe``: /proc/stat busy time minus the CPU time
of the job's own ranks). Medians are over rounds with less than 0.2 other cores busy;
rounds go on until ``--repeats`` were quiet (at most 4x as many), and the output says
how many were.

BLAS: ``import mpipar`` pins OpenBLAS/OMP/MKL to one thread per rank before NumPy loads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import mpipar  # noqa: F401  (one BLAS thread per rank, before numpy loads)

HERE = os.path.abspath(__file__)
TARGET = 0.65  # best K / (K = 1), pp = 2


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


QUIET_CORES = 0.2  # a round is quiet when other processes kept fewer cores busy


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


def worker(cfg: dict) -> dict | None:
    from mpi4py import MPI

    from mpipar.layout import Layout, make_comms
    from mpipar.model.init import open_model
    from mpipar.parallel.engine import ParallelModel

    world = MPI.COMM_WORLD
    pp = world.size
    comms = make_comms(Layout(pp=pp), world)
    source = open_model(preset=cfg["preset"])
    model = ParallelModel(comms, source)
    vocab = source.config.vocab_size
    prompt = [[(31 * i + 7) % vocab for i in range(cfg["prompt_len"])]]
    chunks = cfg["chunks"]  # at pp = 1: chunked prefill alone, without a pipeline
    for k in chunks:  # warm-up
        model.generate(prompt, 1, prefill_chunks=k)

    def one_round():  # every K once, interleaved -> {K: TTFT} (rank 0's; 0 elsewhere)
        out = {}
        for k in chunks:
            gen = model.generate(prompt, 1, prefill_chunks=k)
            out[k] = gen.ttft_s if gen is not None else 0.0
        return out

    res = quiet_rounds(LoadProbe(world), cfg["repeats"], one_round, cfg["patience"])
    if world.rank != 0:
        return None
    return {"mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "records": [{"pp": pp, "chunks": k, "ranks": world.size,
                         "oversubscribed": world.size > (os.cpu_count() or 1),
                         "prompt_len": cfg["prompt_len"], "ttft_s": res["median"][k],
                         "ttft_all_s": [r[k] for r in res["all"]],
                         "round_other_load_cores": res["loads"], "quiet_rounds": res["quiet"]}
                        for k in chunks]}


def cpu_seconds() -> tuple[float, float]:
    """(busy core-seconds of the whole machine, CPU seconds of our finished children)."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not os.path.exists("/proc/stat"):
        return 0.0, ru.ru_utime + ru.ru_stime
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), ru.ru_utime + ru.ru_stime


def launch(n: int, cfg: dict, timeout: float) -> dict:
    """Run a worker job of n ranks; its result, with ``other_load_cores``: the cores
    that other processes kept busy meanwhile (machine busy time minus our job's)."""
    import time

    from mpipar.launch import run_mpi
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        busy0, ours0, t0 = *cpu_seconds(), time.monotonic()
        proc = run_mpi(n, [HERE, "--worker", json.dumps(cfg), "--worker-out", out],
                       timeout=timeout)
        busy1, ours1, t1 = *cpu_seconds(), time.monotonic()
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"worker n={n} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(out) as f:
            res = json.load(f)
        res["other_load_cores"] = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (t1 - t0)
        return res


def load_note(records) -> str:
    worst = max(r["other_load_cores"] for r in records)
    quiet = min(r["quiet_rounds"] for r in records)
    note = (f"other processes kept up to {worst:.2f} cores busy over a whole job; medians "
            f"over the quiet rounds (other load < {QUIET_CORES} cores), at least {quiet} "
            "per configuration")
    return note if quiet else note + ": NONE QUIET, timings disturbed"


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-166m")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--pp", type=ints, default=[1, 2], help="stage counts (world sizes)")
    p.add_argument("--chunks", type=ints, default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--patience", type=int, default=4,
                   help="at most patience*repeats rounds to find quiet ones")
    p.add_argument("--quick", action="store_true", help="tiny model, seconds (smoke test)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.patience = 1
        args.preset, args.prompt_len, args.chunks, args.repeats = "builtin-moe", 64, [1, 4], 1
    if 1 not in args.chunks:
        args.chunks = [1, *args.chunks]  # the reference point of the target
    return args


def table(records) -> tuple[str, dict]:
    ttft = {(r["pp"], r["chunks"]): r["ttft_s"] for r in records}
    nan = float("nan")
    lines = [" pp | K chunks | ranks | TTFT ms   | vs K=1 (same pp) | vs pp=1 K=1 | vs pp=1 same K",
             "----+----------+-------+-----------+------------------+-------------+---------------"]
    for r in sorted(records, key=lambda r: (r["pp"], r["chunks"])):
        pp, k, t = r["pp"], r["chunks"], r["ttft_s"]
        mark = " (oversubscribed)" if r["oversubscribed"] else ""
        lines.append(f" {pp:2d} | {k:8d} | {r['ranks']:5d} | {1e3 * t:9.1f} | "
                     f"{t / ttft.get((pp, 1), nan):16.3f} | {t / ttft.get((1, 1), nan):11.3f} | "
                     f"{t / ttft.get((1, k), nan):14.3f}{mark}")
    verdict = {}
    pp2 = [r for r in records if r["pp"] == 2]
    if pp2:
        best = min(pp2, key=lambda r: r["ttft_s"])
        ratio = best["ttft_s"] / ttft[(2, 1)]
        verdict = {"best_chunks": best["chunks"], "best_over_k1": ratio, "target": TARGET,
                   "holds": ratio <= TARGET}
        lines.append(f"pp=2: best K = {best['chunks']}: {ratio:.3f} x the K=1 time "
                     f"(target <= {TARGET}): {'holds' if ratio <= TARGET else 'MISSED'}")
    return "\n".join(lines), verdict


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        res = worker(json.loads(args.worker))
        if res is not None:
            with open(args.worker_out, "w") as f:
                json.dump(res, f)
        return 0
    cfg = {"preset": args.preset, "prompt_len": args.prompt_len, "chunks": args.chunks,
           "repeats": args.repeats, "patience": args.patience}
    meta = machine()  # before the runs: is anything else busy?
    records, mpi = [], None
    for pp in args.pp:
        res = launch(pp, cfg, args.timeout)
        records += [{**r, "other_load_cores": res["other_load_cores"]} for r in res["records"]]
        mpi = res["mpi"]
    text, verdict = table(records)
    print(f"bench_pp_ttft: {args.preset}, one prompt of {args.prompt_len} tokens, median of "
          f"{args.repeats} after a warm-up; {meta['cores']} cores, {meta['memory_gib']} GiB, "
          f"one BLAS thread per rank; {mpi}")
    print(text)
    print(load_note(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "pp_ttft", "preset": args.preset, "machine": meta,
                       "mpi": mpi, "verdict": verdict, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
