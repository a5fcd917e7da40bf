"""Expert-parallel load balancing (EPLB): redundant expert copies placed from measured load.

An EP group of ``l`` ranks holds ``P = X + R`` physical expert slots, ``S = P / l`` per
rank (slot p lives on rank ``p // S``); ``R = --redundant-experts`` slots hold extra
copies of hot experts. A placement is ``slot_expert[p]``: the logical expert of slot p.

The rule (DeepSeek's EPLB, the global policy used for models without expert groups,
as Qwen3; vLLM and SGLang use the same), from the load ``w[e]`` of each logical expert
(tokens routed to it over the last window, summed over the EP group):

1. Replicate: every expert starts with one copy; each of the R extra slots goes to the
   expert with the highest load per copy ``w[e] / copies[e]`` (ties: lowest id).
2. Pack: the P copies, each carrying ``w[e] / copies[e]``, go onto the l ranks heaviest
   first (ties: lowest expert id), each to the rank with the least load so far among
   those with a free slot (ties: lowest rank). Inside a rank, slots follow that order.
3. Keep (ours, balance unchanged): the packs are interchangeable, so when a placement
   exists each pack goes to the rank that already holds most of its experts (greedy,
   largest overlap first; ties: lowest pack, then rank), which cuts the copies moved.

With R = 0 this only re-packs; with R = l every rank can take one hot copy. A rank's
load is then at most mean + max copy load, so with enough copies max/mean -> 1. The
first placement (no load seen yet) is contiguous ``[e*X/l, (e+1)*X/l)`` when R = 0, and
the rule on uniform load when R > 0 (copies of experts 0..R-1).

Rebalancing (``ExpertBalancer``): each MoE layer counts its routed (token, expert) pairs
per logical expert; every ``--eplb-window N`` stage forwards the counts of all the
stage's MoE layers ([L_s, X] int64) are summed over the EP group (one all-reduce, kind
``eplb_load``), every rank computes the same new placements, and the copies that land on
a rank which did not hold that expert before travel over MPI, in lockstep, in one
``Alltoallv`` of whole experts (kind ``eplb_weights``, 3*h*m*b bytes per copy, sent by
the lowest old slot of that expert). A copy a rank already holds is reused in place.
Why MPI and not a re-read of the checkpoint: the source copy sits in a peer's memory in
the same stage (NVLink / shared memory), while a re-read goes disk -> host -> device on
the critical path and, for random-weight presets, regenerates the tensor; a re-read
would only win when the group's links are slower than local storage, which EP layouts
(EP groups inside one node) avoid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import to_host
from ..comm.allreduce import ring_allreduce
from ..comm.alltoall import alltoallv
from ..model.layers import linear_weight


class EPLBError(ValueError):
    """--redundant-experts / --eplb-window that this model or layout cannot take."""


@dataclass(frozen=True)
class EPLBOptions:
    redundant_experts: int = 0  # R extra physical slots per EP group
    window: int = 0  # rebalance every N stage forwards (0: never)


def add_eplb_arguments(parser) -> None:
    """The EPLB flags, for programs/transformer.py and programs/serve.py alike."""
    g = parser.add_argument_group("expert load balancing (ep > 1)")
    g.add_argument("--redundant-experts", type=int, default=0, metavar="R",
                   help="R extra expert slots per EP group for copies of hot experts; "
                        "(experts + R) must divide by ep")
    g.add_argument("--eplb-window", type=int, default=0, metavar="N",
                   help="re-place experts from the load of every N forwards (0: never)")


def check_eplb_arguments(args, config, layout) -> EPLBOptions:
    """Validate the flags against the model and layout (EPLBError: one clear message)."""
    r, n = args.redundant_experts, args.eplb_window
    if not isinstance(r, int) or r < 0:
        raise EPLBError(f"--redundant-experts must be >= 0, got {r}")
    if not isinstance(n, int) or n < 0:
        raise EPLBError(f"--eplb-window must be >= 0, got {n}")
    if (r or n) and not config.is_moe:
        raise EPLBError("--redundant-experts/--eplb-window need a Mixture-of-Experts model; "
                        "this one is dense")
    if (r or n) and layout.ep == 1:
        raise EPLBError("--redundant-experts/--eplb-window need expert parallelism (--ep > 1)")
    if (config.num_experts + r) % layout.ep:
        raise EPLBError(f"--redundant-experts {r}: {config.num_experts} experts + {r} = "
                        f"{config.num_experts + r} slots do not divide by ep={layout.ep}")
    return EPLBOptions(redundant_experts=r, window=n)


# ---- the rule ---------------------------------------------------------------------------

def replicate(load, num_physical: int) -> np.ndarray:
    """Step 1: copies [X] of each expert, num_physical in all (highest load per copy)."""
    load = np.asarray(load, dtype=np.float64)
    copies = np.ones(load.shape[0], dtype=np.int64)
    for _ in range(num_physical - load.shape[0]):
        copies[int(np.argmax(load / copies))] += 1  # argmax: lowest id on ties
    return copies


def balanced_packing(item_load, num_packs: int) -> list[list[int]]:
    """Step 2: items (heaviest first, ties lowest index) to the lightest pack with room;
    -> items of each pack, in the order they were placed."""
    item_load = np.asarray(item_load, dtype=np.float64)
    per_pack = item_load.shape[0] // num_packs
    packs, weight = [[] for _ in range(num_packs)], np.zeros(num_packs)
    for i in np.argsort(-item_load, kind="stable"):
        room = [p for p in range(num_packs) if len(packs[p]) < per_pack]
        best = min(room, key=lambda p: (weight[p], p))
        packs[best].append(int(i))
        weight[best] += item_load[i]
    return packs


def keep_in_place(packs: list[list[int]], previous) -> list[int]:
    """Step 3: rank of each pack (lists of experts), most overlap with ``previous``
    (slot_expert [P]) first."""
    ep = len(packs)
    per = len(previous) // ep
    held = [np.bincount(previous[r * per:(r + 1) * per], minlength=len(previous))
            for r in range(ep)]
    overlap = np.array([[int(np.minimum(np.bincount(p, minlength=len(previous)), h).sum())
                         for h in held] for p in packs])  # [pack, rank]
    rank_of, free_packs, free_ranks = [0] * ep, set(range(ep)), set(range(ep))
    while free_packs:
        a, r = max(((a, r) for a in free_packs for r in free_ranks),
                   key=lambda ar: (overlap[ar], -ar[0], -ar[1]))
        rank_of[a] = r
        free_packs.discard(a)
        free_ranks.discard(r)
    return rank_of


def rebalance(load, num_physical: int, ep: int, previous=None) -> np.ndarray:
    """load [X] -> slot_expert [P]: the placement of the module docstring (step 3 only
    with a ``previous`` placement)."""
    copies = replicate(load, num_physical)
    items = np.repeat(np.arange(copies.shape[0]), copies)  # expert of each copy [P]
    per_copy = np.asarray(load, dtype=np.float64)[items] / copies[items]
    packs = [[int(items[i]) for i in p] for p in balanced_packing(per_copy, ep)]
    if previous is not None:
        order = keep_in_place(packs, np.asarray(previous))
        packs = [packs[order.index(r)] for r in range(ep)]
    return np.array([e for p in packs for e in p], dtype=np.int64)


def initial_placement(num_experts: int, redundant: int, ep: int) -> np.ndarray:
    """slot_expert [X+R] before any load is seen (contiguous when R = 0)."""
    if redundant == 0:
        return np.arange(num_experts, dtype=np.int64)
    return rebalance(np.ones(num_experts), num_experts + redundant, ep)


def copies_of(slot_expert, num_experts: int):
    """-> (start [X+1], slots [P]): the physical slots of expert e are
    ``slots[start[e]:start[e+1]]``, ascending."""
    slot_expert = np.asarray(slot_expert)
    slots = np.argsort(slot_expert, kind="stable").astype(np.int64)
    start = np.zeros(num_experts + 1, dtype=np.int64)
    np.cumsum(np.bincount(slot_expert, minlength=num_experts), out=start[1:])
    return start, slots


def copy_moves(old, new, ep: int) -> list[tuple[int, int, int]]:
    """(src slot, dst slot, kind) for every slot of ``new``: kind 0 = the dst rank held
    that expert already (src is its slot there), 1 = it travels from ``src`` (the lowest
    old slot of the expert) to dst's rank."""
    old, new = np.asarray(old), np.asarray(new)
    per = old.shape[0] // ep
    out = []
    for p, e in enumerate(new):
        d = p // per
        here = [q for q in range(d * per, (d + 1) * per) if old[q] == e]
        if here:
            out.append((here[0], p, 0))
        else:
            out.append((int(np.nonzero(old == e)[0][0]), p, 1))
    return out


# ---- rebalancing in a running model -----------------------------------------------------

def _flat(xp, weights):
    """(gate [m, h], up [m, h], down [h, m]) -> one row [3*m*h]."""
    return xp.concatenate([xp.ascontiguousarray(w).ravel() for w in weights])


def _unflat(xp, row, m, h):
    mh = m * h
    return (linear_weight(xp, row[:mh].reshape(m, h)),
            linear_weight(xp, row[mh:2 * mh].reshape(m, h)),
            linear_weight(xp, row[2 * mh:].reshape(h, m)))


class ExpertBalancer:
    """Closes an EPLB window every ``window`` stage forwards of this rank's MoE layers
    (collective over the EP group: every rank of it runs the same forwards)."""

    def __init__(self, moes, comms, window: int):
        self.moes = [m for m in moes if m is not None and m.ep > 1]
        self.comms, self.window, self.forwards = comms, window, 0

    def forward_done(self, stats) -> None:
        if not self.window or not self.moes:
            return
        self.forwards += 1
        if self.forwards % self.window == 0:
            self.rebalance(stats)

    def rebalance(self, stats) -> None:
        xp, group = self.comms.xp, self.comms.ep
        ep, me = group.size, group.rank
        load = xp.stack([m.window_load for m in self.moes])  # [L_s, X] this rank's pairs
        total = to_host(ring_allreduce(group, load, kind="eplb_load"))
        stats.rebalances += 1
        per = self.moes[0].slots_per_rank
        updates = [(m, rebalance(w, per * ep, ep, m.slot_expert))
                   for m, w in zip(self.moes, total, strict=True)]
        updates = [(m, new, copy_moves(m.slot_expert, new, ep)) for m, new in updates]
        wg = self.moes[0].slots[0][0]
        mi, h = wg.shape
        send, recv_from = [[] for _ in range(ep)], np.zeros(ep, dtype=np.int64)
        for m, _, moves in updates:  # (layer, dst slot) order on both sides
            for src, dst, travels in moves:
                if travels and src // per == me:
                    send[dst // per].append(_flat(xp, m.slots[src - me * per]))
                if travels and dst // per == me:
                    recv_from[src // per] += 1
        moving = any(t for _, _, moves in updates for _, _, t in moves)
        recv = None
        if moving:  # the same decision on every rank: every rank computed the same updates
            rows = [r for d in range(ep) for r in send[d]]
            rows = xp.stack(rows) if rows else xp.zeros((0, 3 * mi * h), dtype=wg.dtype)
            counts = np.array([len(s) for s in send], dtype=np.int64)
            recv, _ = alltoallv(group, rows, counts, "eplb_weights", recv_counts=recv_from)
            stats.copies_sent += int(counts.sum() - counts[me])
            stats.copy_bytes = 3 * mi * h * wg.itemsize
        next_row = np.concatenate([[0], np.cumsum(recv_from)[:-1]])  # per source rank
        for m, new, moves in updates:
            got = {}
            for src, dst, travels in moves:
                if dst // per != me:
                    continue
                if travels:
                    s = src // per
                    got[dst] = _unflat(xp, recv[next_row[s]], mi, h)
                    next_row[s] += 1
                else:
                    got[dst] = m.slots[src - me * per]
            m.set_placement(new, lambda p, e, got=got: got[p])
