"""Machines: the figures the time model reads, as data (machines/*.json).

A machine file gives a matrix rate (``matmul_flops``: one peak FLOP/s, or {rows M:
FLOP/s} measured, interpolated log-log between the points), the memory read bandwidth
(``mem_read_Bps``), two links (``intra_node``, ``inter_node``: bandwidth in bytes/s and
latency in s; a message of S bytes costs latency + S / bandwidth), ``gpus_per_node``,
``gpu_memory_gb`` and ``sources`` (where each published figure comes from). A machine
whose ranks share memory bandwidth can add ``by_ranks`` ({"2": {figures}}: measured with
that many ranks busy at once; ``Machine.at``). ``mpipar.bench.machine.machine_figures``
measures this machine in the same format.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

MACHINES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "machines")


@dataclass(frozen=True)
class Link:
    bandwidth_Bps: float
    latency_s: float

    def message(self, nbytes: float, messages: float = 1) -> float:
        return messages * self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class Machine:
    name: str
    matmul_flops: dict  # {rows M: FLOP/s}; one entry {0: peak} = the same rate for all M
    mem_read_Bps: float
    intra: Link
    inter: Link
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    sources: dict = field(default_factory=dict, compare=False)
    by_ranks: dict = field(default_factory=dict, compare=False)
    description: dict = field(default_factory=dict, compare=False, repr=False)

    def at(self, busy: int) -> Machine:
        """The figures for ``busy`` ranks working at once (``by_ranks``, the largest
        count <= busy); a machine without such figures is the same at any count."""
        keys = [k for k in self.by_ranks if k <= busy]
        if not keys:
            return self
        d = {k: v for k, v in self.description.items() if k != "by_ranks"}
        return machine_from_dict({**d, **self.by_ranks[max(keys)]})

    def rate(self, rows: float) -> float:
        """Matrix rate at M rows: log-log interpolation of the measured points."""
        pts = sorted((int(m), float(r)) for m, r in self.matmul_flops.items())
        if len(pts) == 1 or rows <= pts[0][0]:
            return pts[0][1]
        for (m0, r0), (m1, r1) in zip(pts, pts[1:], strict=False):
            if rows <= m1:
                f = math.log(rows / m0) / math.log(m1 / m0)
                return math.exp(math.log(r0) + f * (math.log(r1) - math.log(r0)))
        return pts[-1][1]


def machine_from_dict(d: dict) -> Machine:
    """A machine description (machines/*.json). Its optional ``by_ranks``
    ({"2": {figures}}: measured with that many ranks busy at once, which matters where
    ranks share memory bandwidth) is kept for ``Machine.at``."""
    d = dict(d)
    flops = d["matmul_flops"]
    flops = {int(k): float(v) for k, v in flops.items()} if isinstance(flops, dict) \
        else {0: float(flops)}

    def link(x):
        return Link(float(x["bandwidth_Bps"]), float(x["latency_s"]))
    return Machine(name=d["name"], matmul_flops=flops, mem_read_Bps=float(d["mem_read_Bps"]),
                   intra=link(d["intra_node"]), inter=link(d.get("inter_node",
                                                                 d["intra_node"])),
                   gpus_per_node=int(d.get("gpus_per_node", 8)),
                   gpu_memory_gb=float(d.get("gpu_memory_gb", 80.0)),
                   sources=d.get("sources", {}),
                   by_ranks={int(k): v for k, v in d.get("by_ranks", {}).items()},
                   description=d)


def machine_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(MACHINES) if f.endswith(".json"))


def load_machine(name_or_path: str) -> Machine:
    """A name in mpipar/cost/machines/ (``h100-node``) or a path to such a JSON file."""
    path = name_or_path if name_or_path.endswith(".json") else \
        os.path.join(MACHINES, name_or_path + ".json")
    if not os.path.exists(path):
        raise ValueError(f"machine {name_or_path!r}: no {path} (known: "
                         f"{', '.join(machine_names())})")
    with open(path, encoding="utf-8") as f:
        return machine_from_dict(json.load(f))
