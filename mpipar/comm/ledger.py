"""Communication ledger: bytes sent/received and seconds spent, per kind, per rank.

Every collective in ``mpipar.comm`` records into the ledger of the group it runs on.
Kinds are strings such as ``tp_allreduce``, ``pp_send``, ``ep_dispatch``; the engine
compares the totals with ``mpipar.cost.traffic``. With ``trace=True`` the ledger also keeps
timed spans (communication and compute) for a Chrome trace.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Entry:
    sent_bytes: int = 0
    recv_bytes: int = 0
    seconds: float = 0.0
    calls: int = 0


@dataclass
class Ledger:
    trace: bool = False
    entries: dict = field(default_factory=lambda: defaultdict(Entry))
    spans: list = field(default_factory=list)  # (name, category, t_start, t_end)
    t0: float = field(default_factory=time.perf_counter)

    def record(self, kind: str, sent_bytes: int, recv_bytes: int, seconds: float,
               t_start: float | None = None) -> None:
        e = self.entries[kind]
        e.sent_bytes += int(sent_bytes)
        e.recv_bytes += int(recv_bytes)
        e.seconds += seconds
        e.calls += 1
        if self.trace and t_start is not None:
            self.spans.append((kind, "comm", t_start, t_start + seconds))

    @contextmanager
    def span(self, name: str, category: str = "compute"):
        """A traced span that is not communication (compute); free when tracing is off."""
        if not self.trace:
            yield
            return
        t = time.perf_counter()
        yield
        self.spans.append((name, category, t, time.perf_counter()))

    def sent(self, kind: str) -> int:
        return self.entries[kind].sent_bytes if kind in self.entries else 0

    def totals(self) -> dict:
        """{kind: {"sent_bytes", "recv_bytes", "seconds", "calls"}} (plain dicts)."""
        return {k: vars(e).copy() for k, e in sorted(self.entries.items())}

    def reset(self) -> None:
        self.entries.clear()
        self.spans.clear()
