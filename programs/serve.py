"""OpenAI-compatible server of a model split over MPI ranks (world rank 0 serves HTTP).

    mpirun -n 2 python programs/serve.py --model DIR --tp 2 --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0}'

All logic lives in mpipar.serve.server; ``--help`` lists the flags (vLLM's names work).
"""

import mpipar

mpipar.pin_threads()  # one BLAS thread per rank, before numpy and MPI load
from mpipar.serve.server import main

if __name__ == "__main__":
    main()
