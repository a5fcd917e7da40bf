"""The two groups of a disaggregated server: world ranks -> decode group + prefill group.

    mpirun -n N ... --prefill tp=T1,pp=P1 --decode tp=T2,dp=D2,ep=E2
    N = T2*D2 + T1*P1
    world ranks 0 .. T2*D2-1        the decode group (its own Layout: tp=T2, dp=D2, ep=E2)
    world ranks T2*D2 .. N-1        the prefill group (its own Layout: tp=T1, pp=P1)

Decode comes first so that world rank 0 (HTTP, both schedulers) is a decode rank: its
own work is one short decode step at a time, so it hands out prefill plans, starts
transfers and streams tokens at decode-step granularity. Were it a prefill rank, every
decode step of the other group would wait until rank 0's prefill chunk ended -- the very
stall disaggregation removes. Each group's communicators are split from its own
sub-communicator by the ordinary layout code (``layout.make_comms``), so group rank r
has the coordinates ``Layout.coords(r)`` of its layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layout import Layout, LayoutError

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
    from ..layout import make_comms
    layout.check_world(world.Get_size())
    rank = world.Get_rank()
    sub = world.Split(int(layout.is_prefill(rank)), rank)
    return make_comms(layout.group_layout(rank), sub, ledger, xp, transport)
