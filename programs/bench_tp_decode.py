"""Time per output token (TPOT) of decode with tensor parallelism: tp = 1, 2 (and 4).

    python programs/bench_tp_decode.py [--preset bench-dense-300m] [--tp 1,2] \\
        [--batch 1,16] [--json tp.json] [--quick]

What it claims: a TP group of T ranks splits every weight matrix of a block T ways, so
each rank reads 1/T of the weights (decode at batch 1 is a memory-bound matrix-vector
product) and does 1/T of the flops (batch >= 8 is compute-bound), at the price of two
all-reduces of [B, h] per layer. On this 2-core machine, two processes each reading
half the weights take about 0.71x of one (two cores do not double the memory
bandwidth) and two processes each doing half the flops take about 0.51x. Targets:
tp=2 / tp=1 <= 0.75 at batch 1 and <= 0.60 at batch 16.

Launch model: this process is a driver; for each tp it starts ``mpirun -n tp python
bench_tp_decode.py --worker ...`` (mpipar.launch.run_mpi), so every configuration has
exactly its own ranks and nothing else runs. A worker loads the model once, runs one
warm-up generate() per batch, then timed rounds (one generate() per batch each, batches
interleaved), and reports the median TPOT of world rank 0 (decode time after
the first token / (new tokens - 1)). One extra traced generate() per batch splits a
decode step into attention, MLP, the TP all-reduces and the rest (argmax over the
vocab-parallel head, Python bookkeeping). Runs with more ranks than cores are marked
"oversubscribed" and not compared against the targets.

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
TARGETS = {1: 0.75, 16: 0.60}  # batch -> max tp=2 / tp=1 TPOT


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


def prompts_for(batch: int, length: int, vocab: int) -> list:
    return [[(97 * s + 31 * i + 7) % vocab for i in range(length)] for s in range(batch)]


def breakdown(ledger, n_layers: int, steps: int, tpot: float) -> dict:
    """ms per decode token from one traced generate(): skip the prefill's spans."""
    by = {}
    for name, _cat, t0, t1 in ledger.spans:
        by.setdefault(name.split()[0], []).append(t1 - t0)
    out = {}
    for key, skip in (("attention", n_layers), ("mlp", n_layers), ("forward", 1),
                      ("tp_allreduce", 2 * n_layers), ("tp_embed", 1), ("tp_argmax", 2)):
        spans = by.get(key, [])[skip:]
        out[key + "_ms"] = 1e3 * sum(spans) / steps if steps else 0.0
    out["outside_forward_ms"] = 1e3 * tpot - out["forward_ms"]
    return out


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
    comms = make_comms(Layout(tp=cfg["tp"]), world)
    source = open_model(preset=cfg["preset"])
    model = ParallelModel(comms, source)
    vocab, layers = source.config.vocab_size, source.config.num_layers
    new = cfg["new_tokens"]
    sets = {b: prompts_for(b, cfg["prompt_len"], vocab) for b in cfg["batches"]}
    for b in cfg["batches"]:  # warm-up: BLAS buffers, page faults, code paths
        model.generate(sets[b], max(2, new // 4))

    def one_round():  # every batch once -> {batch: TPOT} (rank 0's; 0 elsewhere)
        out = {}
        for b in cfg["batches"]:
            gen = model.generate(sets[b], new)
            out[b] = gen.tpot_s if gen is not None else 0.0
        return out

    res = quiet_rounds(LoadProbe(world), cfg["repeats"], one_round, cfg["patience"])
    parts = {}
    for b in cfg["batches"]:
        comms.ledger.trace = True
        comms.ledger.reset()
        gen = model.generate(sets[b], new)
        comms.ledger.trace = False
        if world.rank == 0:
            parts[b] = breakdown(comms.ledger, layers, new - 1, gen.tpot_s)
    if world.rank != 0:
        return None
    return {"mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "records": [{"tp": cfg["tp"], "batch": b, "ranks": world.size,
                         "oversubscribed": world.size > (os.cpu_count() or 1),
                         "tpot_s": res["median"][b], "tpot_all_s": [r[b] for r in res["all"]],
                         "round_other_load_cores": res["loads"], "quiet_rounds": res["quiet"],
                         "breakdown_ms_per_token": parts[b]} for b in cfg["batches"]]}


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
            raise RuntimeError(f"worker tp={cfg['tp']} failed (exit {proc.returncode}):\n"
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
    p.add_argument("--preset", default="bench-dense-300m")
    p.add_argument("--tp", type=ints, default=[1, 2], help="comma list (4: oversubscribed)")
    p.add_argument("--batch", type=ints, default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=8)
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
        args.preset, args.batch, args.new_tokens, args.repeats = "builtin-moe", [1, 2], 4, 1
        args.prompt_len = 4
    if args.new_tokens < 3:
        p.error("--new-tokens must be at least 3")
    return args


def table(records) -> str:
    base = {r["batch"]: r["tpot_s"] for r in records if r["tp"] == 1}
    lines = [" tp | batch | ranks | TPOT ms  | vs tp=1 | target      |  attn   mlp allred  head+",
             "----+-------+-------+----------+---------+-------------+-------------------------"]
    for r in sorted(records, key=lambda r: (r["batch"], r["tp"])):
        ratio = r["tpot_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        target, verdict = TARGETS.get(r["batch"]), ""
        if r["oversubscribed"]:
            verdict = "oversub."
        elif r["tp"] == 2 and target is not None:
            verdict = f"<={target:.2f} " + ("ok" if ratio <= target else "MISS")
        bd = r["breakdown_ms_per_token"]
        lines.append(f" {r['tp']:2d} | {r['batch']:5d} | {r['ranks']:5d} | "
                     f"{1e3 * r['tpot_s']:8.2f} | {ratio:7.3f} | {verdict:11s} | "
                     f"{bd['attention_ms']:5.1f} {bd['mlp_ms']:5.1f} "
                     f"{bd['tp_allreduce_ms']:6.2f} {bd['outside_forward_ms']:5.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        res = worker(json.loads(args.worker))
        if res is not None:
            with open(args.worker_out, "w") as f:
                json.dump(res, f)
        return 0
    cfg = {"preset": args.preset, "batches": args.batch, "new_tokens": args.new_tokens,
           "prompt_len": args.prompt_len, "repeats": args.repeats, "patience": args.patience}
    meta = machine()  # before the runs: is anything else busy?
    records, mpi = [], None
    for tp in args.tp:
        res = launch(tp, {**cfg, "tp": tp}, args.timeout)
        records += [{**r, "other_load_cores": res["other_load_cores"]} for r in res["records"]]
        mpi = res["mpi"]
    print(f"bench_tp_decode: {args.preset}, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats} after a warm-up; "
          f"{meta['cores']} cores, {meta['memory_gib']} GiB, one BLAS thread per rank; {mpi}")
    print(table(records))
    print(load_note(records))
    print("(ms per decode token on rank 0. allred: every TP all-reduce; the one after "
          "attention is outside attn,\n the one after the MLP inside mlp. head+: outside "
          "the layers: lm_head of the vocab slice, argmax + its all-gather, bookkeeping)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "tp_decode", "preset": args.preset, "machine": meta,
                       "mpi": mpi, "targets_tp2_over_tp1": TARGETS, "records": records},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
