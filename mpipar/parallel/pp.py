"""Pipeline parallelism: layers in P stages, activations handed on by send/recv.

Stage s holds a contiguous range of layers (``shard.stage_layers``). Stage 0 embeds the
tokens; each stage runs its layers and sends the activation [N, h] to the next stage
of its PP group (same tp/dp coordinates); the last stage applies the final norm and
lm_head and picks the tokens, which travel back to stage 0 for the next decode step.

What moves, per forward of N tokens: each boundary carries one activation, so a rank
of stage s < P-1 sends ``N*h*itemsize`` (kind ``pp_send``) and a rank of stage s > 0
receives it (``pp_recv``); the token ids going back from the last stage to the first
are ``N_seq*8`` bytes (kind ``pp_tokens``). Over P stages: (P-1)*h per token.

Chunked prefill: the prompt is cut into K chunks that follow each other through the
pipeline. Sends are non-blocking, so stage 0 starts chunk i+1 while stage 1 works on
chunk i; the time to first token falls from about P*T toward T + (P-1)*T/K for a
prefill that takes T on one stage. Causality holds because a stage sees chunk i only
after chunks < i, whose keys and values are already in its cache. Decode gains
nothing: one token per sequence cannot be split.

    time ->    c0  c1  c2  c3
    stage 0   [0] [1] [2] [3]
    stage 1       [0] [1] [2] [3]
"""

from __future__ import annotations

from ..comm.p2p import isend_array, recv_array, send_array
from .shard import split

TAG_ACTIVATION = 11
TAG_TOKENS = 12


def chunk_prompts(prompts, chunks: int):
    """Cut every prompt into ``chunks`` contiguous pieces -> list (per chunk) of lists
    (per sequence) of token ids; a piece may be empty when a prompt is short."""
    out = []
    for c in range(chunks):
        pieces = []
        for p in prompts:
            part = split(len(p), chunks, c)
            pieces.append(list(p[part.start:part.stop]))
        out.append(pieces)
    return out


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
        return recv_array(self.group, self.stage - 1, TAG_ACTIVATION, kind="pp_recv")

    def send_activation(self, x):
        """Non-blocking: the next chunk can start while this one travels."""
        self._pending.append(isend_array(self.group, x, self.stage + 1, TAG_ACTIVATION,
                                         kind="pp_send"))

    def wait_sends(self):
        for handle in self._pending:
            handle.wait()
        self._pending.clear()

    def tokens_to_first(self, tokens):
        """Last stage -> first stage: the ids just chosen (host int64 [B])."""
        if self.stages > 1:
            send_array(self.group, tokens, 0, TAG_TOKENS, kind="pp_tokens")

    def tokens_from_last(self):
        return recv_array(self.group, self.stages - 1, TAG_TOKENS, kind="pp_tokens_recv")
