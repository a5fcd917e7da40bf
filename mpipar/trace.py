"""Chrome trace of a run: every rank a process, compute and communication as spans.

The file is the ``traceEvents`` JSON that Perfetto and chrome://tracing open. Each
rank's spans come from its ledger (``Ledger(trace=True)``): communication kinds
(``tp_allreduce``, ``pp_send``, ``ep_dispatch`` ...) and compute spans (``attention``,
``mlp``, ``forward``). Clocks: every rank takes its time zero right after one barrier,
so spans line up to within the barrier's exit skew. With tracing off, the ledger keeps
no spans and ``span()`` returns at once.
"""

from __future__ import annotations

import json
import time

from .comm.control import barrier, gather_object


def write_trace(path: str, comms, ledger) -> None:
    """Collective: gather every rank's spans on world rank 0 and write ``path`` there."""
    world = comms.world
    barrier(world)
    now = time.perf_counter()
    # Shift each rank's spans so that "now" (just after the barrier) is the same instant.
    mine = [(name, cat, t0 - now, t1 - now) for name, cat, t0, t1 in ledger.spans]
    everyone = gather_object(world, {"rank": world.rank, "coords": vars(comms.coords),
                                     "spans": mine})
    if everyone is None:
        return
    start = min((s[2] for r in everyone for s in r["spans"]), default=0.0)
    events = []
    for r in everyone:
        c = r["coords"]
        events.append({"ph": "M", "name": "process_name", "pid": r["rank"],
                       "args": {"name": f"rank {r['rank']} (stage {c['pp']}, tp {c['tp']}, "
                                        f"dp {c['dp']})"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": r["rank"],
                       "args": {"sort_index": r["rank"]}})
        for name, cat, t0, t1 in r["spans"]:
            events.append({"ph": "X", "name": name, "cat": cat, "pid": r["rank"],
                           "tid": 1 if cat == "comm" else 0,
                           "ts": (t0 - start) * 1e6, "dur": max(t1 - t0, 0.0) * 1e6})
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
