"""Continuous batching on world rank 0: which requests run in the next step, and how far.

Each call of ``schedule(lane)`` builds one micro-batch per DP replica under two limits:
at most ``max_num_batched_tokens`` tokens per replica and at most ``max_num_seqs``
running requests per replica (split evenly over the lanes, see below). Order:

1. running requests, decodes (one token left to compute) first, then unfinished
   chunked prefills: each gets ``min(tokens left, budget left)`` tokens, so a long
   prompt is spread over steps and never holds up the decodes;
2. waiting requests, first come first served (preempted ones at the front): admitted
   only when the pool has the blocks for their first chunk, after taking the blocks of
   their cached prefix (see kvpool.py); the first one that does not fit stops admission.

Growing a running request may need a block the pool does not have: then the most
recently admitted request that has nothing in flight is preempted (its blocks are
released, it goes back to the front of the queue and recomputes its prompt and the
tokens it already produced later; nothing is lost, as its tokens stay). If that is the
request itself, it waits. With ``reserve`` (the offline ``generate``) a request is
admitted with the blocks of its whole length and never grows.

Lanes: with P pipeline stages up to P micro-batches are in flight (pp.py), and they
must hold disjoint requests, since a request's next token needs its last one. A request
joins the lane being scheduled when it is admitted; a lane's next micro-batch holds its
requests that are not waiting for a token. A chunk that samples nothing (the middle of
a prompt) leaves its request schedulable at once, so a long prefill streams through
the stages chunk after chunk.

DP: ``add`` places a request on the replica with the fewest unfinished requests
(``layout.least_loaded_replica``).
A request finishes on EOS or a stop id ("stop"), at ``max_tokens`` or
``max_model_len`` ("length"), or on abort; its blocks are released at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..layout import least_loaded_replica
from .kvpool import BlockManager, blocks_for, extend_hashes
from .request import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Request, RequestOutput
from .step import Entry, Sampling


@dataclass
class Seq:
    request: Request
    seq_id: int
    seed: int
    key: int  # the per-sequence part of the sampling generator's seed
    replica: int
    tokens: list  # prompt + generated
    stop_ids: frozenset
    num_computed: int = 0  # positions scheduled (in the cache or in flight)
    table: list = field(default_factory=list)
    hashes: list = field(default_factory=list)
    lane: int = -1
    in_flight: int = 0  # launched micro-batches holding this request, not yet back
    awaiting: bool = False  # one of them samples its next token
    admitted: int = -1  # admission order: the largest is preempted first
    aborted: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class Scheduler:
    def __init__(self, replicas: int, num_blocks: int, block_size: int,
                 max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                 lanes: int = 1, prefix_caching: bool = True, reserve: bool = False):
        self.block_size, self.budget = block_size, max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.max_model_len, self.lanes = max_model_len, lanes
        self.reserve = reserve  # admit with the blocks of the whole request (no growth)
        self.lane_cap = blocks_for(max_num_seqs, lanes)
        self.pools = [BlockManager(num_blocks, block_size, prefix_caching)
                      for _ in range(replicas)]
        self.waiting = [deque() for _ in range(replicas)]
        self.running = [[] for _ in range(replicas)]
        self.seqs = {}  # request_id -> Seq
        self.admissions = self.num_preemptions = self.prefix_hit_tokens = 0
        self.finished_outputs = []  # aborts found while scheduling

    # ---- requests in and out
    def add(self, seq: Seq) -> None:
        loads = [len(w) + len(r) for w, r in zip(self.waiting, self.running, strict=True)]
        seq.replica = least_loaded_replica(loads)
        self.seqs[seq.request.request_id] = seq
        self.waiting[seq.replica].append(seq)

    def abort(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None:
            seq.aborted = True

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def _finish(self, seq: Seq, reason: str, new: list) -> RequestOutput:
        d = seq.replica
        if seq in self.running[d]:
            self.running[d].remove(seq)
            self.pools[d].release(seq.table)
        elif seq in self.waiting[d]:
            self.waiting[d].remove(seq)
        seq.table = []
        del self.seqs[seq.request.request_id]
        return RequestOutput(seq.request.request_id, new, True, reason, seq.prompt_len,
                             seq.generated)

    def _reap_aborted(self) -> None:
        for seq in list(self.seqs.values()):
            if seq.aborted and seq.in_flight == 0:
                self.finished_outputs.append(self._finish(seq, FINISH_ABORT, []))

    def take_finished(self) -> list:
        out, self.finished_outputs = self.finished_outputs, []
        return out

    # ---- one micro-batch
    def schedule(self, lane: int) -> list[list[Entry]]:
        """Entries per replica for one micro-batch of ``lane`` (lists may be empty)."""
        self._reap_aborted()
        return [self._schedule_replica(d, lane) for d in range(len(self.pools))]

    def _schedule_replica(self, d: int, lane: int) -> list[Entry]:
        pool, budget, entries, chosen = self.pools[d], self.budget, [], set()
        preempted_before = self.num_preemptions
        ready = [s for s in self.running[d]
                 if s.lane == lane and not s.awaiting and not s.aborted]
        ready.sort(key=lambda s: (len(s.tokens) - s.num_computed > 1, s.admitted))
        for seq in ready:
            if budget == 0:
                break
            if seq not in self.running[d]:  # preempted for an earlier one
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            while not self._grow(pool, seq, n):
                victim = self._victim(d, chosen)
                if victim is None or victim is seq:
                    if victim is seq:
                        self._preempt(victim)
                    n = 0
                    break
                self._preempt(victim)
            if n:
                entries.append(self._entry(seq, n))
                chosen.add(seq.seq_id)
                budget -= n
        in_lane = sum(1 for s in self.running[d] if s.lane == lane)
        # No admission in a step that had to preempt: the pool is short.
        while (self.waiting[d] and budget > 0 and len(self.running[d]) < self.max_seqs
               and in_lane < self.lane_cap and self.num_preemptions == preempted_before):
            seq = self.waiting[d][0]
            extend_hashes(seq.hashes, seq.tokens, self.block_size)
            cacheable = (len(seq.tokens) - 1) // self.block_size  # >= 1 token to compute
            hits = pool.lookup(seq.hashes[:cacheable])
            start = len(hits) * self.block_size
            n = min(len(seq.tokens) - start, budget)
            # The last token's keys are never needed: a request holds len + max_tokens - 1.
            end = seq.prompt_len + seq.request.params.max_tokens - 1 if self.reserve \
                else start + n
            need = blocks_for(end, self.block_size) - len(hits)
            if need > pool.free_after_taking(hits):
                break
            pool.take(hits)
            seq.table = hits + pool.allocate(need, hits[-1] if hits else None)
            seq.num_computed, seq.lane, seq.admitted = start, lane, self.admissions
            self.admissions += 1
            self.prefix_hit_tokens += start
            self.waiting[d].popleft()
            self.running[d].append(seq)
            in_lane += 1
            entries.append(self._entry(seq, n))
            budget -= n
        return entries

    def _grow(self, pool: BlockManager, seq: Seq, n: int) -> bool:
        need = blocks_for(seq.num_computed + n, self.block_size) - len(seq.table)
        if need > pool.num_free:
            return False
        if need > 0:
            seq.table += pool.allocate(need, seq.table[-1] if seq.table else None)
        return True

    def _victim(self, d: int, chosen: set) -> Seq | None:
        """The most recently admitted running request with nothing in flight."""
        free = [s for s in self.running[d] if s.in_flight == 0 and s.seq_id not in chosen]
        return max(free, key=lambda s: s.admitted) if free else None

    def _preempt(self, seq: Seq) -> None:
        d = seq.replica
        self.running[d].remove(seq)
        self.pools[d].release(seq.table)
        seq.table, seq.num_computed, seq.lane = [], 0, -1
        self.waiting[d].appendleft(seq)
        self.num_preemptions += 1

    def _entry(self, seq: Seq, n: int) -> Entry:
        start = seq.num_computed
        seq.num_computed += n
        extend_hashes(seq.hashes, seq.tokens[:seq.num_computed], self.block_size)
        pool = self.pools[seq.replica]
        for i in range(start // self.block_size, seq.num_computed // self.block_size):
            pool.register(seq.table[i], seq.hashes[i])
        sampling = None
        if seq.num_computed == len(seq.tokens):
            p = seq.request.params
            sampling = Sampling(float(p.temperature), float(p.top_p), seq.seed, seq.key,
                                seq.generated)
            seq.awaiting = True
        seq.in_flight += 1
        return Entry(seq.seq_id, seq.tokens[start:seq.num_computed], start, list(seq.table),
                     sampling)

    # ---- results of a micro-batch
    def update(self, seqs_by_id: dict, entries: list[list[Entry]], tokens: list[list[int]]):
        """The sampled tokens of one micro-batch (per replica, one per sampling entry)
        -> RequestOutputs of the requests that got a token or finished."""
        outputs = []
        for replica_entries, replica_tokens in zip(entries, tokens, strict=True):
            it = iter(replica_tokens)
            for e in replica_entries:
                seq = seqs_by_id[e.seq_id]
                seq.in_flight -= 1
                if e.sampling is None:
                    continue
                seq.awaiting = False
                tok = int(next(it))
                seq.tokens.append(tok)
                reason = self._stop_reason(seq, tok)
                if seq.aborted:
                    outputs.append(self._finish(seq, FINISH_ABORT, [tok]))
                elif reason:
                    outputs.append(self._finish(seq, reason, [tok]))
                else:
                    outputs.append(RequestOutput(seq.request.request_id, [tok], False, None,
                                                 seq.prompt_len, seq.generated))
        self._reap_aborted()
        return outputs + self.take_finished()

    def _stop_reason(self, seq: Seq, tok: int) -> str | None:
        if tok in seq.stop_ids:
            return FINISH_STOP
        if seq.generated >= seq.request.params.max_tokens or len(seq.tokens) >= self.max_model_len:
            return FINISH_LENGTH
        return None

    def stats(self) -> dict:
        return {
            "running": sum(len(r) for r in self.running),
            "waiting": sum(len(w) for w in self.waiting),
            "kv_blocks_used": sum(p.num_used for p in self.pools),
            "kv_blocks_total": sum(p.num_blocks for p in self.pools),
            "num_preemptions": self.num_preemptions,
            "prefix_cache_hit_tokens": self.prefix_hit_tokens,
        }
