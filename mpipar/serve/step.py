"""The step contract: what world rank 0 sends every rank each step, and what comes back.

Every record here crosses a process boundary (pickled by ``comm/control.py``, ledger kind
``control`` out and ``result`` back) and is read by field name on the other side: the
scheduler builds them, ``parallel/rank_model.py`` runs them, the colocated and the
disaggregated engines and the KV handoff all speak this one protocol on one tag
(``comm/tags.STEP``). A worker tells the messages apart by their type.

    Step        one micro-batch: per DP replica, a list of Entry
      Entry     one sequence's share: its next tokens, where they start, its block table,
                and Sampling when the step ends its known tokens (a token is due)
    StepResult  from each replica's reporting rank: one token per sampling entry
    KVOrder     disaggregation: send or receive one request's K/V pieces
    End         leave the worker loop

Room for what comes next, without another redesign: a StepResult gains per-token
log-probabilities beside ``tokens`` (``logprobs``: one entry per sampled token, the same
order); n > 1 choices are entries of their own that share blocks (each its own seq_id and
``Sampling.key``); a sequence whose K/V is sharded over context-parallel ranks carries
its shard's table in the Entry; a replica stepping at its own pace is a Step with one
replica's list filled; and where pickling shows in a profile, a Step packs into a few
flat int arrays (token ids, starts, lengths, tables) without changing these field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

_FIELD_GETTERS = {}  # record class -> attrgetter of its fields, in order


class _Record:
    """Pickled as its class and its field values in order: the names stay in the code and
    off the wire, so a Step is no bigger than the same data as plain tuples."""
    __slots__ = ()

    def __reduce__(self):
        cls = type(self)
        get = _FIELD_GETTERS.get(cls)
        if get is None:
            get = _FIELD_GETTERS[cls] = attrgetter(*cls.__dataclass_fields__)
        values = get(self)
        return cls, values if len(cls.__dataclass_fields__) > 1 else (values,)


@dataclass(slots=True)
class Sampling(_Record):
    """How to pick the token due at the end of an entry (temperature 0: greedy)."""
    temperature: float
    top_p: float
    seed: int  # the request's generator seed
    key: int  # the sequence's own part of the generator seed (its index in a batch)
    step: int  # how many tokens the sequence has generated before this one

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(slots=True)
class Entry(_Record):
    """One sequence's share of a micro-batch, as every rank of its replica runs it."""
    seq_id: int  # the sequence's number in its engine
    tokens: list  # ids at positions start .. start+len(tokens)-1
    start: int
    table: list  # block table in the replica's KV pool, covering start+len positions
    sampling: Sampling | None  # set when the entry ends the sequence's known tokens


@dataclass(slots=True)
class Step(_Record):
    """One micro-batch; ``entries[d]`` is replica d's (maybe empty) list."""
    entries: list  # [dp][n] Entry
    keep_logits: bool = False  # every computed row's full logits back (checks only)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.tokens) for rep in self.entries for e in rep)


@dataclass(slots=True)
class StepResult(_Record):
    """A replica's answer to a Step, from its last stage's TP rank 0."""
    tokens: list  # one id per entry with Sampling, in entry order
    logits: object = None  # [rows, V] float32 host array when keep_logits, else None


@dataclass(slots=True)
class KVOrder(_Record):
    """Send (prefill rank) or receive (decode rank) one request's K/V pieces."""
    send: bool  # True: gather from ``table`` and send; False: receive into ``table``
    xfer: int  # transfer id, acknowledged to world rank 0 when received
    table: list  # this side's block table of the request
    length: int  # prompt positions 0 .. length-1
    pieces: list = field(default_factory=list)  # parallel/reshard.Piece, this rank's


@dataclass(frozen=True)
class End:
    """No more steps: finish what is in flight and leave the worker loop."""
