"""The skeleton every programs/bench_*.py shares: flags, the driver/worker launch, output.

A benchmark program is a claim (its docstring), a worker (what runs on the ranks), a table
and a verdict; this module is the rest:

- Importing it pins one BLAS thread per rank (``mpipar.pin_threads()``), so a program
  imports it before numpy and mpi4py load: first among its mpipar imports, and before
  any top-level ``import numpy`` (a program that has one turns isort off around it).
- ``parser``: the flags every benchmark has (``--quick``, ``--json``; with quiet rounds
  ``--repeats`` and ``--patience``; with worker jobs ``--timeout`` and the hidden
  ``--worker``/``--worker-out``).
- Launch model: the program runs as a driver; ``launch_worker`` starts ``mpirun -n N
  python PROGRAM --worker CFG`` (mpipar.launch.run_mpi) per configuration, so each has
  exactly its own ranks, and the worker side (``worker_main``) writes rank 0's result as
  JSON; ``run`` is a program's entry, driver or worker by the flags. ``launch_all`` runs
  a list of such jobs and collects their records.
- Output: ``print_report`` (title with the machine facts, table, load note),
  ``write_report`` / ``write_json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import mpipar

from .machine import cpu_seconds, load_note

mpipar.pin_threads()  # one BLAS thread per rank, before numpy and MPI load


def ints(text: str) -> list[int]:
    """A comma list of integers (a flag's type)."""
    return [int(t) for t in text.split(",") if t.strip()]


def parser(doc: str, *, rounds: bool = True, workers: bool = True, repeats: int = 3,
           patience: int = 4, timeout: float | None = 1800,
           quick: str = "tiny model, seconds (smoke test)") -> argparse.ArgumentParser:
    """An ArgumentParser described by the first paragraph of ``doc``, with the shared
    flags: --quick, --json; ``rounds``: --repeats, --patience; ``timeout`` (None: none):
    --timeout; ``workers``: the hidden --worker, --worker-out. The program adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if rounds:
        p.add_argument("--repeats", type=int, default=repeats, help="quiet rounds")
        p.add_argument("--patience", type=int, default=patience,
                       help="at most patience*repeats rounds to find quiet ones")
    if timeout is not None:
        p.add_argument("--timeout", type=float, default=timeout, help="seconds per job")
    if workers:
        p.add_argument("--worker", help=argparse.SUPPRESS)
        p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--json", metavar="PATH")
    return p


def launch_worker(script: str, n: int, cfg: dict, timeout: float, *, python: str | None = None,
                  flag: str = "--worker", env: dict | None = None) -> dict:
    """Run ``script FLAG CFG --worker-out F`` as a job of n ranks (``mpirun``; with
    ``python``: that interpreter, one process, no MPI); its JSON result, with
    ``other_load_cores``: the cores that other processes kept busy meanwhile (machine
    busy time minus our job's)."""
    from ..launch import run_mpi
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        argv = [script, flag, json.dumps(cfg), "--worker-out", out]
        busy0, ours0, t0 = *cpu_seconds(), time.monotonic()
        if python is None:
            proc = run_mpi(n, argv, timeout=timeout, env=env)
        else:
            proc = subprocess.run([python, *argv], capture_output=True, text=True,
                                  timeout=timeout, env={**os.environ, **(env or {})})
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
    res = worker(json.loads(cfg_json))
    if res is not None:
        with open(out_path, "w") as f:
            json.dump(res, f)
    return 0


def run(parse_args, worker, driver, argv=None) -> int:
    """A benchmark program's entry: ``parse_args(argv)``; with --worker this process is a
    worker of ``launch_worker`` (``worker_main``), else the driver: ``driver(args)``."""
    args = parse_args(argv)
    if getattr(args, "worker", None):
        return worker_main(worker, args.worker, args.worker_out)
    return driver(args)


def launch_all(script: str, jobs, timeout: float) -> tuple[list[dict], str | None]:
    """Run every (ranks, cfg) of ``jobs`` as its own job; each worker returns
    ``worker_records``. -> (all records, each with its job's ``other_load_cores``; the
    MPI library's name)."""
    records, mpi = [], None
    for n, cfg in jobs:
        res = launch_worker(script, n, cfg, timeout)
        records += [{**r, "other_load_cores": res["other_load_cores"]} for r in res["records"]]
        mpi = res["mpi"]
    return records, mpi


def pick(args, *names: str) -> dict:
    """{name: args.name}: the flags a worker's configuration carries."""
    return {k: getattr(args, k) for k in names}


def mpi_version() -> str:
    from mpi4py import MPI
    return MPI.Get_library_version().splitlines()[0].strip()


def worker_records(records: list[dict]) -> dict:
    """What a worker of ``launch_all`` returns on rank 0."""
    return {"mpi": mpi_version(), "records": records}


def oversubscribed(ranks: int) -> bool:
    """More ranks than cores: times are not a claim."""
    return ranks > (os.cpu_count() or 1)


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    """``batch`` deterministic prompts of ``length`` token ids below ``vocab``."""
    return [[(97 * s + 31 * i + 7) % vocab for i in range(length)] for s in range(batch)]


def machine_line(meta: dict, mpi: str | None = None) -> str:
    line = f"{meta['cores']} cores, {meta['memory_gib']} GiB, one BLAS thread per rank"
    return line + (f"; {mpi}" if mpi else "")


def print_report(title: str, meta: dict, mpi: str | None, table: str,
                 timed: list[dict] | None = None, legend: str = "") -> None:
    """``title; machine facts``, the table, the load note of the ``timed`` records, and
    the table's ``legend``."""
    print(f"{title}; {machine_line(meta, mpi)}")
    print(table)
    if timed:
        print(load_note(timed))
    if legend:
        print(legend)


def write_json(path: str | None, obj) -> None:
    """The program's --json file (nothing without one)."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


def write_report(path: str | None, benchmark: str, meta: dict, records: list,
                 **fields) -> None:
    """--json as the benchmarks write it: {"benchmark", "machine", fields..., "records"}."""
    write_json(path, {"benchmark": benchmark, "machine": meta, **fields, "records": records})
