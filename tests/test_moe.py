"""mpipar/parallel/moe.py on its own: copy choice, row routing, dispatch/combine, and the
MoE layer against the dense single-process MoE.

Hand-worked cases (moved here from test_eplb.py with the module they test): the copy
choice, rows once per destination rank, the row packing, dispatch_combine against a
direct weighted sum.

The layer: one sparse layer of random weights with odd sizes (hidden 27, expert
intermediate 13, 8 experts, top 3) whose router is skewed so that routing is uneven
(two experts take most pairs, some none), in every (tp, ep) this world allows, with and
without redundant expert copies. Each DP replica feeds its own tokens (13, 0, 7 or 1 of
them: the TP shares are uneven and one replica has none), and every rank's output must
equal ``ReferenceModel.mlp`` of its replica's tokens: all experts, one process, no
communication. The routing counts summed over the world equal the reference's, and with
ep > 1 every (token, expert) pair is computed exactly once. Mismatches are shared by
every rank before the assertion, so a failure cannot leave ranks waiting.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpipar.layout import Layout, make_comms
from mpipar.model import layers as L
from mpipar.model.config import ModelConfig
from mpipar.model.init import RandomWeights
from mpipar.model.reference import ReferenceModel
from mpipar.parallel import eplb
from mpipar.parallel.moe import (
    MoE,
    RoutingStats,
    pack_rows,
    pick_copies,
    read_expert,
    route_rows,
    unpack_rows,
)
from mpipar.parallel.shard import rank_shard

pytestmark = pytest.mark.timeout(120)

TOL = 2e-5


# ---- moved from tests/test_eplb.py --------------------------------------------------
def test_pick_copies_round_robin_from_the_rank_offset():
    start, slots = eplb.copies_of([0, 0, 3, 0, 1, 2], 4)  # expert 0 in slots 0, 1, 3
    assert start.tolist() == [0, 3, 4, 5, 6] and slots.tolist() == [0, 1, 3, 4, 5, 2]
    experts = np.array([[0, 1], [0, 2], [0, 3]])
    assert pick_copies(np, experts, start, slots, 0).tolist() == [[0, 4], [1, 5], [3, 2]]
    assert pick_copies(np, experts, start, slots, 1)[:, 0].tolist() == [1, 3, 0]
    # a hot expert's pairs spread evenly over its copies
    hot = np.zeros((301, 1), dtype=np.int64)
    counts = np.bincount(pick_copies(np, hot, start, slots, 2).ravel(), minlength=6)
    assert counts[[0, 1, 3]].tolist() == [100, 100, 101]


def test_route_rows_once_per_destination_rank():
    phys = np.array([[0, 1], [0, 3], [4, 5]])  # 3 slots per rank, 2 ranks
    token, slot, counts = route_rows(np, phys, 3, 2)
    assert token.tolist() == [0, 1, 1, 2] and counts.tolist() == [2, 2]
    assert slot.tolist() == [[0, 1], [0, -1], [-1, 0], [1, 2]]
    token, slot, counts = route_rows(np, phys, 3, 2, dedupe=False)
    assert token.tolist() == [0, 0, 1, 1, 2, 2] and counts.tolist() == [3, 3]
    assert slot.tolist() == [[0, -1], [-1, 1], [0, -1], [-1, 0], [1, -1], [-1, 2]]
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    w = np.random.default_rng(1).random((4, 2)).astype(np.float32)
    back = unpack_rows(np, pack_rows(np, x, slot[:4], w), 5, 2, np.float32)
    assert back[0].tobytes() == x.tobytes() and back[2].tobytes() == w.tobytes()
    assert back[1].tolist() == slot[:4].tolist()


@pytest.mark.parametrize("dedupe", [True, False])
def test_dispatch_combine_against_a_direct_sum(world, dedupe):
    """Random routing over 3 slots per rank with copies; slot s scales rows by (s + 1) *
    (rank + 1), so a row sent to the wrong rank or slot shows; odd token counts, and a
    rank without tokens."""
    from mpipar.comm.group import Group
    from mpipar.comm.ledger import Ledger
    from mpipar.parallel.moe import dispatch_combine
    g = Group(world, "ep", Ledger())
    n, r, per, k, h = g.size, g.rank, 3, 2, 5
    rng = np.random.default_rng(7 + r)
    t = 0 if r == 1 else 11 + 2 * r
    x = rng.standard_normal((t, h)).astype(np.float32)
    phys = np.array([rng.choice(n * per, size=k, replace=False) for _ in range(t)],
                    dtype=np.int64).reshape(t, k)
    w = rng.random((t, k)).astype(np.float32)
    y = dispatch_combine(g, x, phys, w, per, lambda s, rows: rows * ((s + 1) * (g.rank + 1)),
                         dedupe)
    scale = (phys % per + 1) * (phys // per + 1)  # [t, k]
    want = (x[:, None, :] * (w * scale)[:, :, None]).sum(axis=1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    sent = g.ledger.sent("ep_dispatch")
    dest = phys // per
    rows = (sum(len(set(d.tolist()) - {r}) for d in dest) if dedupe
            else int((dest != r).sum()))
    assert sent == rows * (h * 4 + 8 * k)
    assert g.ledger.entries["ep_counts"].calls == 1


# ---- the MoE layer against the dense single-process MoE ------------------------------
CONFIG = ModelConfig(vocab_size=50, hidden_size=27, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=6, intermediate_size=0, model_type="qwen3_moe", num_experts=8,
                     num_experts_per_tok=3, moe_intermediate_size=13)
HOT, COLD = (0, 5), (2, 6)  # experts the skewed router prefers / avoids
TOKENS = (13, 0, 7, 1)  # tokens of DP replica d: TOKENS[d % 4]


class SkewedRouter:
    """RandomWeights of CONFIG whose router leans towards HOT and away from COLD along
    one direction that every token shares, so that routing is far from uniform."""

    def __init__(self, seed=31):
        self.base, self.config = RandomWeights(CONFIG, seed=seed), CONFIG
        self.lean = np.random.default_rng(5).standard_normal(CONFIG.hidden_size)
        self.lean = (self.lean / np.linalg.norm(self.lean)).astype(np.float32)

    def read(self, name, index=None, dtype="float32"):
        w = self.base.read(name, index, dtype=dtype)
        if name.endswith("mlp.gate.weight"):
            w = w.copy()
            w[list(HOT)] += 1.5 * self.lean
            w[list(COLD)] -= 3.0 * self.lean
        return w


def tokens_of(dp):
    n = TOKENS[dp % len(TOKENS)]
    rng = np.random.default_rng(50 + dp)
    h = rng.standard_normal((n, CONFIG.hidden_size)) + 2.0 * SkewedRouter().lean
    return h.astype(np.float32)


def reference_counts(ref, h):
    """Pairs per expert of the dense reference's router on h [n, hidden]."""
    if h.shape[0] == 0:
        return np.zeros(CONFIG.num_experts, np.int64)
    experts, _ = L.router_topk(np, h, ref.layers[0]["router"], CONFIG.num_experts_per_tok,
                               CONFIG.norm_topk_prob)
    return np.bincount(experts.ravel(), minlength=CONFIG.num_experts)


def settle(world, problems):
    """Every rank's mismatches, shared: all ranks fail together, with the whole story."""
    everyone = world.allgather(problems)
    lines = [f"rank {r}: {p}" for r, ps in enumerate(everyone) for p in ps]
    assert not lines, "\n".join(lines)


def moe_cases():
    """(tp, ep, redundant copies); dp fills the world. Each needs tp and ep ranks."""
    for tp, ep in [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2), (1, 4), (2, 4), (4, 4)]:
        for redundant in ((0, ep) if ep > 1 else (0,)):
            need = max(tp, ep)
            marks = [pytest.mark.mpi(min_size=need)] if need > 1 else []
            yield pytest.param(tp, ep, redundant, marks=marks,
                               id=f"tp{tp}-ep{ep}-r{redundant}")


@pytest.mark.parametrize("tp, ep, redundant", list(moe_cases()))
def test_moe_layer_matches_the_dense_reference(world, tp, ep, redundant):
    n_world = world.Get_size()
    if n_world % tp or (n_world % ep):
        pytest.skip(f"tp = {tp} and ep = {ep} must divide a world of {n_world}")
    layout = Layout(tp=tp, dp=n_world // tp, ep=ep)
    source = SkewedRouter()
    ref = ReferenceModel(source)
    comms = make_comms(layout, world)
    co = comms.coords
    shard = rank_shard(CONFIG, layout, co.world)
    slot_expert = eplb.initial_placement(CONFIG.num_experts, redundant, ep) if ep > 1 else None
    moe = MoE(source, CONFIG, shard, 0, comms, np, slot_expert)
    problems = []

    # the slots this rank holds: the experts the placement names, whole (ep > 1) or
    # their intermediate chunk of this TP rank (ep = 1)
    if ep > 1:
        per = len(slot_expert) // ep
        names = slot_expert[co.ep * per:(co.ep + 1) * per].tolist()
        inter = slice(None)
    else:
        names = list(range(CONFIG.num_experts))
        inter = slice(shard.expert_inter.start, shard.expert_inter.stop)
    if moe.local_experts() != names:
        problems.append(f"local experts {moe.local_experts()}, placement says {names}")
    for e, held in zip(names, moe.slots, strict=False):
        want = read_expert(np, source.base, 0, e, inter)
        if not all(np.array_equal(a, b) for a, b in zip(held, want, strict=True)):
            problems.append(f"slot of expert {e}: not its weights")
    if len(moe.slots) != len(names):
        problems.append(f"{len(moe.slots)} slots, want {len(names)}")

    h = tokens_of(co.dp)
    stats = RoutingStats(CONFIG.num_experts)
    got = moe.forward(h.copy(), stats)
    want = ref.mlp(0, h) if h.shape[0] else np.zeros_like(h)
    err = float(np.max(np.abs(got - want), initial=0.0)) if got.shape == want.shape else None
    if err is None or err > TOL * max(1.0, float(np.abs(want).max(initial=0.0))):
        problems.append(f"output of replica {co.dp} ({h.shape[0]} tokens): {got.shape}, "
                        f"max |diff| {err}")

    replicas = [tokens_of(d) for d in range(layout.dp)]
    counts = sum(reference_counts(ref, x) for x in replicas)
    total = sum(x.shape[0] for x in replicas) * CONFIG.num_experts_per_tok
    if counts[list(COLD)].sum() * 4 > counts[list(HOT)].sum() or counts.min() > 0:
        problems.append(f"routing not uneven enough for this test: {counts.tolist()}")
    seen = world.allreduce(stats.per_expert(), op=MPI.SUM)
    if seen.tolist() != counts.tolist():
        problems.append(f"routing counted {seen.tolist()}, reference {counts.tolist()}")
    computed = world.allreduce(stats.pairs_computed, op=MPI.SUM)
    if ep > 1 and computed != total:
        problems.append(f"{computed} pairs computed over the world, {total} routed")
    settle(world, problems)
