"""mpipar: reference model parallelism for Qwen3 transformer inference over MPI.

Modules, one concept each:
  layout        ranks <-> (tp, dp, pp, ep) coordinates; communicator split
  comm/         hand-coded collectives (ring all-reduce, p2p, all-to-all), ledger
  backend       array module (numpy | cupy), GPU binding, host staging
  model/        Qwen3 config, checkpoints, layer math, single-process reference
  parallel/     shard plan, TP, EP, PP, the generate() engine
  costmodel     the seed's communication formulas
  plan          deployment planner (python -m mpipar.plan)
"""

import os as _os

__version__ = "0.1.0"

# Set before numpy/mpi4py load (import mpipar first). Each rank runs one BLAS thread: the
# ranks are the parallelism. MPICH's waiting ranks spin by default; with heavy yield they
# give up their core instead. Measured on 2 cores: spinning is right up to 2 ranks per
# core (a 2-rank all-reduce: 7 us spinning, 180 us yielding; 4 ranks: 120 vs 520 us, and
# 4 MiB 1.3x faster); beyond that idle ranks must yield (8 ranks, one working: 8.3 s
# spinning, 0.9 s yielding).


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


for _k, _v in (("OPENBLAS_NUM_THREADS", "1"), ("OMP_NUM_THREADS", "1"),
               ("MKL_NUM_THREADS", "1")):
    _os.environ.setdefault(_k, _v)
if _ranks_on_this_node() > 2 * _cores():
    _os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
