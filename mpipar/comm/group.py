"""Group: one MPI communicator, the ledger that counts its traffic, and its array module.

Model code never touches mpi4py: it calls the collectives of ``mpipar.comm`` with a
Group. ``name`` prefixes the ledger kind (a Group named "tp" records "tp_allreduce").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from .ledger import Ledger


@dataclass
class Group:
    comm: object  # mpi4py.MPI.Comm
    name: str
    ledger: Ledger
    xp: object = numpy  # numpy or cupy
    transport: object = None  # mpipar.backend.Transport: how arrays reach MPI (None: host arrays)

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def kind(self, op: str) -> str:
        return f"{self.name}_{op}"
