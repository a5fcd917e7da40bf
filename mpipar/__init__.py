"""mpipar: reference model parallelism for Qwen3 transformer inference over MPI.

Floors, bottom up (an import only points down; README "Layout of the code" has the map):
  comm/         every byte between ranks: ring all-reduce, p2p, all-to-all, tags, ledger
  backend       array module (numpy | cupy), GPU binding, host staging
  model/        configs, checkpoints, layer math, single-process reference, sampling
  layout        ranks <-> (tp, dp, pp, ep) coordinates; communicator split; disaggregation
  parallel/     what a rank holds, TP, EP, PP, ParallelModel (one step of a rank)
  cost/         one home per formula: memory, traffic, work, time, planner
  program, verify, reporting, trace, launch   the MPI program skeleton and its checks
  serve/        the step contract, step loop, scheduler, KV pool, engines, HTTP server
  bench/        benchmark harness and load generator (tools; the library never imports it)

``mpipar.generate(model, prompts, max_new_tokens)`` (``serve/offline.py``) generates for a
batch of prompts on a ParallelModel, collectively on every rank.

Importing mpipar changes nothing in the process. Programs call ``mpipar.pin_threads()``
before numpy and mpi4py load (one BLAS thread per rank, MPICH's waits); a library user
who wants its own settings does not call it.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def __getattr__(name):
    if name == "generate":  # loaded on first use: ``import mpipar`` loads no numpy
        from .serve.offline import generate
        return generate
    raise AttributeError(f"module 'mpipar' has no attribute {name!r}")


def _ranks_on_this_node() -> int:
    for key in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_LOCAL_SIZE"):
        if _os.environ.get(key, "").isdigit():
            return int(_os.environ[key])
    tasks = _os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
    return int(tasks) if tasks.isdigit() else 1


def _cores() -> int:
    try:
        return len(_os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return _os.cpu_count() or 1


def pin_threads() -> None:
    """One BLAS thread per rank (the ranks are the parallelism), and MPICH's waiting ranks
    yield their core when there are more than 2 ranks per core.

    Sets environment defaults (a value already set wins), so it must run before numpy
    and mpi4py load: ``import mpipar; mpipar.pin_threads()`` first in a program. Measured
    on 2 cores: spinning waits are right up to 2 ranks per core (a 2-rank all-reduce:
    7 us spinning, 180 us yielding; 4 ranks: 120 vs 520 us, and 4 MiB 1.3x faster);
    beyond that idle ranks must yield (8 ranks, one working: 8.3 s spinning, 0.9 s
    yielding).
    """
    if "numpy" in _sys.modules or "mpi4py.MPI" in _sys.modules:
        import warnings
        warnings.warn("mpipar.pin_threads() called after numpy or mpi4py.MPI loaded: "
                      "their thread and wait settings are fixed already", stacklevel=2)
    for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        _os.environ.setdefault(key, "1")
    if _ranks_on_this_node() > 2 * _cores():
        _os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
