"""mpipar/parallel/pp.py on its own: Pipeline's send/recv of activations, and InFlight.

Pipeline: in every pp that divides the world (tp filling the rest, so several PP groups
run side by side), each stage receives a micro-batch from the previous stage (stage 0
makes it), applies its own map and sends it on, all micro-batches before waiting for
any send. The last stage checks each arriving activation against the chain computed
here alone; a value carries the rank's tp coordinate, so one that crossed to another PP
group shows, and shapes and dtypes (float32, bfloat16, one token) must survive. The
ledger counts one ``pp_send`` per micro-batch on every stage but the last, one
``pp_recv`` on every stage but the first, payload bytes only, recorded when the send
completes (``wait_sends``). Mismatches are shared by every rank before the assertion,
so a failure cannot leave ranks waiting.

InFlight: the window of micro-batches launched and not yet back (pure tests).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from mpipar.layout import Layout, make_comms
from mpipar.parallel.pp import InFlight, Pipeline

# (tokens, hidden, dtype) of each micro-batch: a prefill chunk, a decode, a 16-bit one
MICRO_BATCHES = [(7, 11, np.float32), (1, 11, np.float32), (5, 11, ml_dtypes.bfloat16),
                 (3, 11, np.float32)]


def sizes(*values):
    return [pytest.param(v, marks=pytest.mark.mpi(min_size=v)) if v > 1 else v
            for v in values]


def settle(world, problems):
    """Every rank's mismatches, shared: all ranks fail together, with the whole story."""
    everyone = world.allgather(problems)
    lines = [f"rank {r}: {p}" for r, ps in enumerate(everyone) for p in ps]
    assert not lines, "\n".join(lines)


def first_activation(m, tp, dp):
    n, h, dtype = MICRO_BATCHES[m]
    rng = np.random.default_rng(1000 * m + 10 * tp + dp)
    return (rng.standard_normal((n, h)) + 100 * tp).astype(dtype)


def stage_map(stage, x):
    """What stage ``stage`` does to an activation (its 'layers'): exact in bfloat16 too."""
    return (x * (stage + 2) - stage).astype(x.dtype)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pp", sizes(1, 2, 4))
def test_activations_travel_down_the_stages_in_order(world, pp):
    n = world.Get_size()
    if n % pp:
        pytest.skip(f"pp = {pp} does not divide a world of {n}")
    layout = Layout(tp=n // pp, pp=pp)
    comms = make_comms(layout, world)
    co = comms.coords
    pipe = Pipeline(comms)
    problems = []
    if (pipe.stage, pipe.stages, pipe.first, pipe.last) != (co.pp, pp, co.pp == 0,
                                                            co.pp == pp - 1):
        problems.append(f"place {pipe.stage}/{pipe.stages} first={pipe.first} "
                        f"last={pipe.last}, coords pp={co.pp}")
    arrived = []
    for m in range(len(MICRO_BATCHES)):
        x = first_activation(m, co.tp, co.dp) if pipe.first else pipe.recv_activation()
        x = stage_map(pipe.stage, x)
        if pipe.last:
            arrived.append(x)
        else:
            pipe.send_activation(x)  # all of them before any wait: non-blocking
    sends = comms.ledger.entries["pp_send"].calls if "pp_send" in comms.ledger.entries else 0
    if sends:
        problems.append(f"{sends} sends recorded before wait_sends")
    pipe.wait_sends()
    if pipe._pending:  # completed sends are dropped, not kept over a long serve
        problems.append(f"{len(pipe._pending)} sends still held after wait_sends")
    pipe.wait_sends()  # nothing left: a second wait is a no-op
    nbytes = sum(n * h * np.dtype(t).itemsize for n, h, t in MICRO_BATCHES)
    want = {"pp_send": (0 if pipe.last else len(MICRO_BATCHES),
                        0 if pipe.last else nbytes, 0),
            "pp_recv": (0 if pipe.first else len(MICRO_BATCHES), 0,
                        0 if pipe.first else nbytes)}
    for kind, (calls, sent, recv) in want.items():
        e = comms.ledger.totals().get(kind, {"calls": 0, "sent_bytes": 0, "recv_bytes": 0})
        if (e["calls"], e["sent_bytes"], e["recv_bytes"]) != (calls, sent, recv):
            problems.append(f"ledger {kind}: {e}, want calls/sent/recv {calls, sent, recv}")
    for m, got in enumerate(arrived):
        x = first_activation(m, co.tp, co.dp)
        for s in range(pp):
            x = stage_map(s, x)
        if got.dtype != x.dtype or got.shape != x.shape or not np.array_equal(got, x):
            problems.append(f"micro-batch {m}: {got.dtype}{got.shape} differs from the "
                            f"chain's {x.dtype}{x.shape}")
    settle(world, problems)


def test_in_flight_window_is_first_in_first_out_up_to_its_depth():
    w = InFlight(3)
    assert (w.depth, len(w), w.full, w.peak) == (3, 0, False, 0)
    for m in range(3):
        assert not w.full
        w.push(m)
    assert (len(w), w.full, w.peak, w.oldest()) == (3, True, 3, 0)
    assert w.pop() == 0 and not w.full and w.oldest() == 1
    w.push(3)
    assert w.full and len(w) == 3 and w.peak == 3
    assert [w.pop() for _ in range(3)] == [1, 2, 3]
    assert (len(w), w.full, w.peak) == (0, False, 3)
    w.push(5)  # the peak is the most ever in flight, not the latest count
    assert (len(w), w.oldest(), w.peak) == (1, 5, 3)


def test_in_flight_depth_is_at_least_one():
    for depth in (0, -2, 1):
        w = InFlight(depth)
        assert w.depth == 1
        w.push("a")
        assert w.full and w.oldest() == "a"


@pytest.mark.parametrize("depth, batches", [(1, 4), (2, 5), (4, 3), (4, 9)])
def test_in_flight_drives_a_schedule_like_the_engine(depth, batches):
    """Launch while the window has room, else retire the oldest: micro-batches retire
    in launch order, never more than ``depth`` in flight, peak = min(depth, batches)."""
    w, launched, retired, most = InFlight(depth), 0, [], 0
    while len(retired) < batches:
        if launched < batches and not w.full:
            w.push(launched)
            launched += 1
        else:
            assert w.oldest() == retired[-1] + 1 if retired else w.oldest() == 0
            retired.append(w.pop())
        most = max(most, len(w))
        assert len(w) <= depth
    assert retired == list(range(batches))
    assert w.peak == most == min(depth, batches) and len(w) == 0
