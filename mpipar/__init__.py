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

# Set before numpy/mpi4py load (import mpipar first): many ranks share few cores, so each
# rank runs one BLAS thread, and MPICH's waiting ranks yield the core instead of
# spinning (15 idle spinning ranks made 0.6 s of work take 4.7 s on 2 cores).
for _k, _v in (("OPENBLAS_NUM_THREADS", "1"), ("OMP_NUM_THREADS", "1"),
               ("MKL_NUM_THREADS", "1"), ("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")):
    _os.environ.setdefault(_k, _v)
