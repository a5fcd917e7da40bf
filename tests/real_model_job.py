"""An MPI job for tests/test_real_model.py: greedy generation of named SmolLM2 reference
prompts (tests/fixtures/smollm2-ref) from a GGUF under one layout, every rank of the job.

    mpirun -n N python tests/real_model_job.py MODEL.gguf OUT.npz tp=3,pp=2 NAME...

Rank 0 writes OUT.npz: ``tokens`` [B, n] and ``rows`` [B, 4, V] (the logit rows that
chose the first 4 tokens), compared with transformers' by the test.
"""

from __future__ import annotations

import json
import os
import sys

import mpipar

mpipar.pin_threads()

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpipar.layout import Layout, make_comms  # noqa: E402
from mpipar.model.gguf import GGUFSource  # noqa: E402
from mpipar.parallel.rank_model import ParallelModel  # noqa: E402
from mpipar.serve import offline  # noqa: E402

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "smollm2-ref")


def main(argv):
    gguf_file, out, spec, *names = argv
    layout = Layout(**{k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))})
    with open(os.path.join(REF, "outputs.json"), encoding="utf-8") as f:
        prompts = {p["name"]: p for p in json.load(f)["prompts"]}
    model = ParallelModel(make_comms(layout, MPI.COMM_WORLD), GGUFSource(gguf_file))
    gen = offline.generate(model, [prompts[n]["prompt_ids"] for n in names],
                           max(prompts[n]["n_new"] for n in names), keep_logits=True)
    if MPI.COMM_WORLD.Get_rank() == 0:
        np.savez(out, tokens=gen.tokens, rows=gen.decode_logits[:, :4])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
