"""Pipeline parallelism: layers in P stages, activations handed on by send/recv.

Stage s holds a contiguous range of layers (``shard.stage_layers``). Stage 0 embeds the
tokens; each stage runs its layers and sends the activation [N, h] to the next stage
of its PP group (same tp/dp coordinates); the last stage applies the final norm and
lm_head and picks the tokens, which go to world rank 0; the next Step brings
them to stage 0 (serve/engine.py).

What moves, per forward of N tokens: each boundary carries one activation, so a rank
of stage s < P-1 sends ``N*h*itemsize`` (kind ``pp_send``) and a rank of stage s > 0
receives it (``pp_recv``). Over P stages: (P-1)*h per token.

The schedule: micro-batches in flight. A Step (serve/step.py) is a micro-batch; sends are
non-blocking, so stage 0 starts micro-batch m+1 while stage 1 works on m. Up to P
micro-batches are in flight (``InFlight``): more would only queue at a stage. Two
kinds of micro-batches can follow each other without waiting for a result:

- chunks of prefills (the scheduler cuts long prompts under its token budget): chunk
  i+1 needs only the keys and values of chunk i, which every stage holds before it
  sees chunk i+1 (each stage runs micro-batches in order), so the time to first token
  falls from about P*T toward T + (P-1)*T/K for a prefill of K chunks taking T;
- decodes of disjoint request sets ("lanes", serve/scheduler.py): with P lanes each
  stage works on one lane while the others are elsewhere in the pipeline.

    time ->    m0  m1  m2  m3
    stage 0   [0] [1] [2] [3]
    stage 1       [0] [1] [2] [3]
"""

from __future__ import annotations

from collections import deque

from ..comm.p2p import isend_array, recv_array
from ..comm.tags import ACTIVATION


class Pipeline:
    """This rank's place in its PP group: who feeds it and whom it feeds."""

    def __init__(self, comms):
        self.group = comms.pp
        self.stage = comms.pp.rank
        self.stages = comms.pp.size
        self.first = self.stage == 0
        self.last = self.stage == self.stages - 1
        self._pending = []

    def recv_activation(self):
        return recv_array(self.group, self.stage - 1, ACTIVATION, kind="pp_recv")

    def send_activation(self, x):
        """Non-blocking: the next micro-batch can start while this one travels."""
        self._pending.append(isend_array(self.group, x, self.stage + 1, ACTIVATION,
                                         kind="pp_send"))

    def wait_sends(self):
        for handle in self._pending:
            handle.wait()
        self._pending.clear()


class InFlight:
    """The micro-batches launched into the pipeline and not yet back, oldest first."""

    def __init__(self, depth: int):
        self.depth = max(1, depth)
        self._queue = deque()
        self.peak = 0  # the most micro-batches that were in flight at once

    def __len__(self):
        return len(self._queue)

    @property
    def full(self) -> bool:
        return len(self._queue) >= self.depth

    def push(self, item) -> None:
        self._queue.append(item)
        self.peak = max(self.peak, len(self._queue))

    def oldest(self):
        return self._queue[0]

    def pop(self):
        return self._queue.popleft()
