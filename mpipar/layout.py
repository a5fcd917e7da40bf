"""Parallel layout: world rank <-> (tp, dp, pp) coordinates, and the communicator split.

A world of ``tp * dp * pp`` ranks is laid out with TP innermost (adjacent ranks, one
node, NVLink), then attention data parallelism (DP), then pipeline stages (PP)
outermost, so only PP traffic crosses node boundaries:

    world_rank = (pp_rank * dp + dp_rank) * tp + tp_rank

16 ranks, tp=4, pp=4 (dp=1):

    stage | world ranks | TP group
    ------+-------------+----------
      0   |  0  1  2  3 | {0,1,2,3}
      1   |  4  5  6  7 | {4,5,6,7}
      2   |  8  9 10 11 | ...
      3   | 12 13 14 15 |
    PP groups (same tp rank across stages): {0,4,8,12}, {1,5,9,13}, ...

Expert parallelism lives inside one stage. The ``tp * dp`` ranks of a stage, numbered
``stage_rank = dp_rank * tp + tp_rank``, form ``tp*dp/ep`` EP groups of ``ep`` adjacent
ranks; each EP group holds every expert once, ``n_experts/ep`` per rank. ``ep = 1``
means no expert parallelism (experts are TP-split like a dense MLP).

Replica placement (one rule, ``least_loaded_replica``): a new request goes to the DP
replica with the fewest unfinished requests, the lowest index on ties -- the serving
scheduler's rule. Offline generation and the time model use what that rule gives when
every request arrives at t=0 on empty replicas (``offline_replicas``): request i goes to
replica i % dp.

Communicators are made with ``Comm.Split(color, key)``: one color per group, key = the
coordinate that varies inside it, so group rank == that coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A layout that cannot be built; the message names the numbers."""


@dataclass(frozen=True)
class Coords:
    world: int
    tp: int
    dp: int
    pp: int
    ep: int  # rank inside the EP group
    ep_group: int  # which EP group of the stage
    stage_rank: int  # dp * tp_size + tp: rank inside the stage


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LayoutError(f"{name} must be a positive integer, got {v!r}")
        if self.ep > self.tp * self.dp or (self.tp * self.dp) % self.ep:
            raise LayoutError(
                f"ep={self.ep} must divide tp*dp={self.tp}*{self.dp}={self.tp * self.dp} "
                "(expert groups live inside one pipeline stage)")

    @property
    def world(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def stage_size(self) -> int:
        return self.tp * self.dp

    def check_world(self, world_size: int) -> None:
        if world_size != self.world:
            raise LayoutError(
                f"tp*dp*pp = {self.tp}*{self.dp}*{self.pp} = {self.world} ranks, "
                f"but the job has {world_size}")

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world:
            raise LayoutError(f"rank {rank} outside a world of {self.world}")
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp
        pp = rank // self.stage_size
        stage_rank = dp * self.tp + tp
        return Coords(rank, tp, dp, pp, stage_rank % self.ep, stage_rank // self.ep, stage_rank)

    def rank_of(self, tp: int = 0, dp: int = 0, pp: int = 0) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    # Split colors/keys: every rank of one group gets the same color, key = its group rank.
    def split_keys(self, rank: int) -> dict:
        c = self.coords(rank)
        return {
            "tp": (c.pp * self.dp + c.dp, c.tp),
            "dp": (c.pp * self.tp + c.tp, c.dp),
            "pp": (c.dp * self.tp + c.tp, c.pp),
            "ep": (c.pp * (self.stage_size // self.ep) + c.ep_group, c.ep),
            "stage": (c.pp, c.stage_rank),
        }

    def groups(self, kind: str) -> list[list[int]]:
        """All groups of a kind as lists of world ranks, ordered by group rank (pure)."""
        by_color: dict[int, list[tuple[int, int]]] = {}
        for r in range(self.world):
            color, key = self.split_keys(r)[kind]
            by_color.setdefault(color, []).append((key, r))
        return [[r for _, r in sorted(v)] for _, v in sorted(by_color.items())]

    def describe(self) -> str:
        lines = [f"layout: tp={self.tp} pp={self.pp} dp={self.dp} ep={self.ep} "
                 f"world={self.world}",
                 " rank | tp dp pp | ep_group ep"]
        for r in range(self.world):
            c = self.coords(r)
            lines.append(f" {r:4d} | {c.tp:2d} {c.dp:2d} {c.pp:2d} | {c.ep_group:8d} {c.ep:2d}")
        return "\n".join(lines)


def least_loaded_replica(loads: list[int]) -> int:
    """The replica a new request goes to: fewest unfinished requests (``loads[d]``),
    the lowest index on ties."""
    return loads.index(min(loads))


def offline_replicas(n_requests: int, dp: int) -> list[int]:
    """Replica of each of ``n_requests`` requests that all arrive at t=0 on ``dp`` empty
    replicas and none finishes before the last is placed (``least_loaded_replica`` in
    turn; request i lands on i % dp)."""
    loads, out = [0] * dp, []
    for _ in range(n_requests):
        d = least_loaded_replica(loads)
        loads[d] += 1
        out.append(d)
    return out


@dataclass
class Comms:
    """Everything a rank needs to talk: its layout, coordinates, Groups and ledger."""
    layout: Layout
    coords: Coords
    world: object  # Group
    tp: object
    pp: object
    ep: object
    ledger: object
    xp: object


def make_comms(layout: Layout, comm=None, ledger=None, xp=None, transport=None) -> Comms:
    """Split ``comm`` (default COMM_WORLD) into the communicators the engine talks on:
    tp, pp, ep (collective). The dp and stage groups exist as maps (``groups``) only:
    nothing sends on them."""
    import numpy
    from mpi4py import MPI

    from .comm.group import Group
    from .comm.ledger import Ledger

    comm = MPI.COMM_WORLD if comm is None else comm
    layout.check_world(comm.Get_size())
    ledger = Ledger() if ledger is None else ledger
    xp = numpy if xp is None else xp
    keys = layout.split_keys(comm.Get_rank())
    groups = {}
    for kind in ("tp", "pp", "ep"):
        color, key = keys[kind]
        groups[kind] = Group(comm.Split(color, key), kind, ledger, xp, transport)
    world = Group(comm, "world", ledger, xp, transport)
    return Comms(layout, layout.coords(comm.Get_rank()), world, ledger=ledger, xp=xp, **groups)


# ---- prefill/decode disaggregation: the world as a decode group + a prefill group
#
#     mpirun -n N ... --prefill tp=T1,pp=P1 --decode tp=T2,dp=D2,ep=E2
#     N = T2*D2 + T1*P1
#     world ranks 0 .. T2*D2-1        the decode group (its own Layout: tp=T2, dp=D2, ep=E2)
#     world ranks T2*D2 .. N-1        the prefill group (its own Layout: tp=T1, pp=P1)
#
# Decode comes first so that world rank 0 (HTTP, both schedulers) is a decode rank: its
# own work is one short decode step at a time, so it hands out prefill steps, starts
# transfers and streams tokens at decode-step granularity. Were it a prefill rank, every
# decode step of the other group would wait until rank 0's prefill chunk ended -- the
# very stall disaggregation removes. Each group's communicators are split from its own
# sub-communicator by ``make_comms``, so group rank r has the coordinates
# ``Layout.coords(r)`` of its layout.
PREFILL_KEYS = ("tp", "pp", "ep")
DECODE_KEYS = ("tp", "dp", "ep")


def parse_spec(text: str, flag: str, allowed: tuple) -> Layout:
    """'tp=2,pp=2' -> Layout(tp=2, pp=2); LayoutError naming the flag otherwise."""
    values = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise LayoutError(f"{flag} {text!r}: expected KEY=N pairs "
                              f"with KEY in {', '.join(allowed)}, like "
                              f"{allowed[0]}=2,{allowed[1]}=2")
        if key in values:
            raise LayoutError(f"{flag} {text!r}: {key} given twice")
        try:
            values[key] = int(value)
        except ValueError:
            raise LayoutError(f"{flag} {text!r}: {key}={value!r} is not an integer") from None
    try:
        return Layout(**values)
    except LayoutError as e:
        raise LayoutError(f"{flag} {text!r}: {e}") from None


@dataclass(frozen=True)
class DisaggLayout:
    prefill: Layout
    decode: Layout

    @property
    def world(self) -> int:
        return self.decode.world + self.prefill.world

    @property
    def decode_base(self) -> int:
        return 0

    @property
    def prefill_base(self) -> int:
        return self.decode.world

    def check_world(self, world_size: int) -> None:
        if world_size != self.world:
            raise LayoutError(
                f"--decode needs tp*dp = {self.decode.world} ranks and --prefill tp*pp = "
                f"{self.prefill.world}: {self.world} in all, but the job has {world_size}")

    def is_prefill(self, world_rank: int) -> bool:
        return world_rank >= self.prefill_base

    def group_layout(self, world_rank: int) -> Layout:
        return self.prefill if self.is_prefill(world_rank) else self.decode

    def group_rank(self, world_rank: int) -> int:
        return world_rank - (self.prefill_base if self.is_prefill(world_rank) else 0)

    def describe(self) -> str:
        d, p = self.decode, self.prefill
        lines = [f"layout: disaggregated, decode tp={d.tp} dp={d.dp} ep={d.ep} (world ranks "
                 f"0-{d.world - 1}) + prefill tp={p.tp} pp={p.pp} ep={p.ep} (world ranks "
                 f"{self.prefill_base}-{self.world - 1}) world={self.world}",
                 " rank | group   | tp dp pp"]
        for r in range(self.world):
            c = self.group_layout(r).coords(self.group_rank(r))
            name = "prefill" if self.is_prefill(r) else "decode"
            lines.append(f" {r:4d} | {name:7s} | {c.tp:2d} {c.dp:2d} {c.pp:2d}")
        return "\n".join(lines)


def parse_groups(prefill: str, decode: str) -> DisaggLayout:
    return DisaggLayout(parse_spec(prefill, "--prefill", PREFILL_KEYS),
                        parse_spec(decode, "--decode", DECODE_KEYS))


def connect_group(layout: DisaggLayout, world, ledger, xp=None, transport=None):
    """Collective over ``world``: split it into the two groups; -> this rank's Comms
    (of its group's layout, on its group's sub-communicator)."""
    layout.check_world(world.Get_size())
    rank = world.Get_rank()
    sub = world.Split(int(layout.is_prefill(rank)), rank)
    return make_comms(layout.group_layout(rank), sub, ledger, xp, transport)


@dataclass
class DisaggComms:
    world: object  # Group over every rank of both groups (steps, results, the handoff)
    group: Comms  # this rank's group (its layout, on its sub-communicator)
