"""Run a Qwen3 / Qwen3-MoE model split over MPI ranks and check it against the reference.

    mpirun -n 16 python programs/transformer.py --tp 4 --pp 4
    mpirun -n 4 python programs/transformer.py --model ../shared/fixtures/qwen3-moe-tiny \\
        --tp 2 --dp 2 --ep 4 --prefill-chunks 3 --json run.json

All logic lives in mpipar.runner; ``--help`` lists the flags.
"""

import mpipar

mpipar.pin_threads()  # one BLAS thread per rank, before numpy and MPI load
from mpipar.runner import main

if __name__ == "__main__":
    main()
