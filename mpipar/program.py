"""The MPI program skeleton that programs/transformer.py and programs/serve.py share.

    parse the flags       every rank, the same flags -> the same checks
    open the job          layout, model source, device (``open_job``)
    connect               bind the device, split the communicators (``connect``)
    build                 every rank builds its part; a failure anywhere fails all
                          ranks together (``build_together``)

Errors: every rank validates the same flags, layout and config, so a bad input fails on
every rank at the same point (one of ``bad_input_errors()``); rank 0 prints the one
message and all ranks exit 2. Steps that can fail on some ranks only (reading a shard)
end with ``agree``, so the others learn of it instead of waiting. Anything unexpected
on one rank aborts the whole MPI job (``main``: exit 1) rather than leaving the others
hanging in a collective.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of printing on every rank
        raise UsageError(f"{self.prog}: {message}")

    def print_help(self, file=None):  # --help: once, from world rank 0
        from mpi4py import MPI
        if MPI.COMM_WORLD.Get_rank() == 0:
            super().print_help(file)


def bad_input_errors() -> tuple:
    """The exception types that mean "bad flags, layout, config or checkpoint": exit 2."""
    from .layout import LayoutError
    from .model.checkpoint import CheckpointError
    from .model.config import ConfigError
    return (UsageError, LayoutError, ConfigError, CheckpointError, ValueError, OSError)


def open_job(args, layout, world_size: int):
    """-> (source, device) for ``layout`` (a Layout, or a DisaggLayout of two groups) from
    args.model, preset, seed, device; the same checks on every rank (raises one of
    bad_input_errors())."""
    from .backend import select_device
    from .layout import DisaggLayout, LayoutError
    from .model.init import open_model
    from .parallel.shard import check_layout
    layout.check_world(world_size)
    source = open_model(args.model, args.preset, args.seed)
    groups = ([("--prefill", layout.prefill), ("--decode", layout.decode)]
              if isinstance(layout, DisaggLayout) else [("", layout)])
    for flag, group in groups:
        try:
            check_layout(source.config, group)
        except LayoutError as e:
            raise LayoutError(f"{flag}: {e}" if flag else str(e)) from None
    return source, select_device(args.device)


def bind_device(device: str, world, ledger, say):
    """Collective: -> (xp, transport): numpy and None on the CPU; on "gpu" this rank's
    GPU (cupy) and how its arrays reach MPI (CUDA-aware or staged, said once)."""
    if device != "gpu":
        return np, None
    from .backend import Transport, bind_gpu, cuda_aware
    xp, _, node_ranks, gpus = bind_gpu(world)
    transport = Transport(xp, cuda_aware(), ledger)
    if node_ranks > gpus:
        say(f"note: {node_ranks} ranks share {gpus} GPU(s) on a node (round-robin)")
    if not transport.aware:
        say("note: MPI is not CUDA-aware here; staging through pinned host buffers")
    return xp, transport


def connect(device: str, layout, world, ledger, say):
    """Collective: bind this rank's device and split the communicators of ``layout``:
    -> Comms, or DisaggComms (the world Group + this rank's group Comms) for two groups."""
    from .comm.group import Group
    from .layout import DisaggComms, DisaggLayout, connect_group, make_comms
    xp, transport = bind_device(device, world, ledger, say)
    if not isinstance(layout, DisaggLayout):
        return make_comms(layout, world, ledger, xp, transport)
    group = connect_group(layout, world, ledger, xp, transport)
    return DisaggComms(Group(world, "world", ledger, xp, transport), group)


def build_together(comms, build):
    """Collective: ``build()`` on every rank; if it failed anywhere (a shard that cannot
    be read, memory), every rank raises the same RemoteError instead of waiting."""
    from .comm.control import agree
    from .model.checkpoint import CheckpointError
    error, built = None, None
    try:
        built = build()
    except (CheckpointError, ValueError, OSError, MemoryError) as e:
        error = e
    agree(comms.world, error)
    return built


def main(program, argv=None) -> None:
    """Entry point: exit with the code of ``program(argv)``; an unexpected error on any
    rank aborts the whole job."""
    from mpi4py import MPI
    try:
        code = program(sys.argv[1:] if argv is None else argv)
    except SystemExit:
        raise
    except BaseException:
        import traceback
        sys.stderr.write(f"[rank {MPI.COMM_WORLD.Get_rank()}] unexpected error, aborting "
                         f"the job:\n{traceback.format_exc()}")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
        raise
    sys.exit(code)
