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


# ---- programs/serve.py --prefill/--decode (hooks of serve/server.py) -------------------
HELP = ("prefill/decode disaggregation: world ranks 0..T2*D2-1 form the decode group "
        "(world rank 0 among them: HTTP and both schedulers), the next T1*P1 ranks the "
        "prefill group; mpirun -n T2*D2+T1*P1")


def add_arguments(parser) -> None:
    g = parser.add_argument_group("disaggregation", HELP)
    g.add_argument("--prefill", metavar="tp=T1,pp=P1[,ep=E1]",
                   help="layout of the prefill group (world ranks T2*D2 .. N-1)")
    g.add_argument("--decode", metavar="tp=T2[,dp=D2][,ep=E2]",
                   help="layout of the decode group (world ranks 0 .. T2*D2-1)")
    g.add_argument("--decode-kv-cache-tokens", type=int, default=None, metavar="N",
                   help="KV pool of each decode replica (default --kv-cache-tokens, "
                        "which sizes the prefill pool)")


def check_args(args) -> None:
    """Flag checks (UsageError / LayoutError: exit 2 from rank 0)."""
    from ..runner import UsageError
    if bool(args.prefill) != bool(args.decode):
        raise UsageError("give --prefill and --decode together")
    if not args.prefill:
        if args.decode_kv_cache_tokens is not None:
            raise UsageError("--decode-kv-cache-tokens needs --prefill and --decode")
        return
    if (args.tp, args.pp, args.dp, args.ep) != (1, 1, 1, 1):
        raise UsageError("--tp/--pp/--dp/--ep lay out a colocated server; with --prefill "
                         "and --decode put them in the specs (tp=2,pp=2)")
    if args.decode_kv_cache_tokens is not None and args.decode_kv_cache_tokens < 1:
        raise UsageError("--decode-kv-cache-tokens must be at least 1")
    parse_groups(args.prefill, args.decode)


def open_job(args, world_size: int):
    """runner.open_job for two groups: -> (DisaggLayout, source, device)."""
    from ..backend import select_device
    from ..model.init import open_model
    from ..parallel.shard import check_layout
    layout = parse_groups(args.prefill, args.decode)
    layout.check_world(world_size)
    source = open_model(args.model, args.preset, args.seed)
    for name, group in (("--prefill", layout.prefill), ("--decode", layout.decode)):
        try:
            check_layout(source.config, group)
        except LayoutError as e:
            raise LayoutError(f"{name}: {e}") from None
    return layout, source, select_device(args.device)


@dataclass
class DisaggComms:
    world: object  # Group over every rank of both groups (plans, results, the handoff)
    group: object  # Comms of this rank's group (its layout, on its sub-communicator)


def connect(device: str, layout: DisaggLayout, world, ledger, say) -> DisaggComms:
    """runner.connect for two groups (collective over ``world``)."""
    from ..comm.group import Group
    from ..runner import bind_device
    xp, transport = bind_device(device, world, ledger, say)
    group = connect_group(layout, world, ledger, xp, transport)
    return DisaggComms(Group(world, "world", ledger, xp, transport), group)


def build_engine(comms: DisaggComms, layout, source, args):
    from .disagg import DisaggEngine
    from .server import engine_options
    return DisaggEngine(comms, layout, source, engine_options(args),
                        args.decode_kv_cache_tokens, args.dtype)


def phase_metrics(metrics, engine):
    """A histogram of the per-request phases (disagg.PHASES) and gauges of the handoff
    bytes in the server's registry; -> the engine's ``on_timing`` callback."""
    from prometheus_client import Gauge, Histogram

    from .disagg import PHASES
    from .metrics import LATENCY_BUCKETS
    hist = Histogram("mpipar:disagg_phase_seconds", "Per request: queue, prefill, "
                     "handoff_wait, transfer, first_decode (disaggregated server).",
                     labelnames=["model_name", "phase"], buckets=LATENCY_BUCKETS,
                     registry=metrics.registry)
    children = {p: hist.labels(metrics._model, p) for p in PHASES}
    kv = Gauge("mpipar:kv_transfer_bytes", "KV handoff bytes since start: predicted (all "
               "ranks, sent), and received by world rank 0 (measured, predicted).",
               labelnames=["model_name", "what"], registry=metrics.registry)
    keys = ("kv_transfer_bytes_predicted", "kv_transfer_recv_bytes_rank0",
            "kv_transfer_recv_bytes_rank0_predicted")

    def observe(request_id, phases: dict) -> None:
        for phase, seconds in phases.items():
            children[phase].observe(seconds)
        stats = engine.stats()
        for key in keys:
            kv.labels(metrics._model, key).set(stats[key])
    return observe
