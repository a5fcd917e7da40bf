"""A decode step crosses to the host only for what it must: one bincount per MoE layer
(which experts got rows, so that only those run) and the token pick.

On a GPU every device->host copy is a synchronisation that stalls the launch queue, so
the per-step count is what keeps a decode step on the device. Counted on the CPU by
wrapping every ``to_host`` the model code calls (NumPy has no device, the calls are the
same). Of the syncs CuPy makes implicitly, the functions that need the data on the
host to size their output (``nonzero``, ``flatnonzero``, ``argwhere``, ``unique``, and
``bincount``, which checks the range of its input) must not run in the step either;
boolean-mask indexing and ``int()`` of a device scalar are not seen here (the code slices
by host counts instead: layers.experts_forward), which only a GPU run can time.
"""

import os

import pytest
from mpi4py import MPI

from mpipar import backend
from mpipar.layout import Layout, make_comms
from mpipar.model.checkpoint import CheckpointReader
from mpipar.parallel.rank_model import ParallelModel
from mpipar.serve.step import Sampling

MODULES = ("mpipar.model.layers", "mpipar.parallel.moe", "mpipar.parallel.tp",
           "mpipar.parallel.rank_model")


@pytest.mark.rank0
@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3-moe-tiny"])
def test_host_transfers_per_decode_step(fixtures_dir, monkeypatch, name):
    import importlib
    source = CheckpointReader(os.path.join(fixtures_dir, name))
    model = ParallelModel(make_comms(Layout(), MPI.COMM_SELF), source)
    caches = [[b.new_cache(16) for _ in range(2)] for b in model.blocks]
    x, _ = model.stage_forward([[1, 2, 3], [4, 5]], caches)  # prefill, not counted
    calls = []

    def counting(a):
        calls.append(getattr(a, "shape", None))
        return backend.to_host(a)
    for mod in MODULES:
        if hasattr(importlib.import_module(mod), "to_host"):
            monkeypatch.setattr(f"{mod}.to_host", counting)

    def syncs_on_a_gpu(*args, **kwargs):
        raise AssertionError("a function that synchronises CuPy ran in the decode step")
    for fn in ("nonzero", "flatnonzero", "argwhere", "unique", "bincount"):
        monkeypatch.setattr(f"numpy.{fn}", syncs_on_a_gpu)
    x, _ = model.stage_forward([[7], [9]], caches)
    greedy = [Sampling(0.0, 1.0, 0, key, 1) for key in (0, 1)]
    model.pick(x, greedy)  # two greedy rows
    monkeypatch.undo()
    moe_layers = sum(source.config.is_moe_layer(i) for i in range(source.config.num_layers))
    assert len(calls) == moe_layers + 2, calls  # + argmax: the best value and its index
