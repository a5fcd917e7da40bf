"""Prefill/decode disaggregation: world rank 0 drives a prefill group and a decode group.

By composition: two step loops (loop.py), one per group, plus the KV handoff between
them (handoff.py). World rank 0 (decode replica 0, TP rank 0; ``layout.DisaggLayout``
says who is where) keeps two schedulers (scheduler.py): the prefill one admits
requests into the prefill group's KV pool and cuts prompts into chunks under the token
budget (up to P1 micro-batches in flight through its pipeline); the decode one batches
the handed-over requests continuously in the decode group's pools (one per decode
replica). One step of rank 0:

    prefill results -> first tokens out; those requests leave the prefill scheduler
    kv acks         -> transfer done: free the prefill blocks, the request joins decode
    handoff queue   -> reserve decode blocks (prompt + max_tokens: the decode side never
                       preempts); none free: the request waits, holding its prefill
                       blocks (nothing is lost or computed twice); else post kv_send /
                       kv_recv plans (handoff.HandoffQueue, pieces of parallel/reshard.py)
    prefill Step    -> posted to every prefill rank, non-blocking (rank 0 never waits
                       for the prefill group, except for a result when its window is full
                       and nothing else can run)
    decode Step     -> to the decode ranks, rank 0 runs its part, results

Every other rank waits for Steps and KV orders from rank 0 (``loop.Worker.serve``,
sleeping between probes) and meanwhile completes its KV sends (prefill) or tests its KV
receives (decode). Traffic: Steps and orders ("control"), tokens ("result"), the
handoff ("kv_transfer", exactly the pieces' bytes, predicted per rank by
``HandoffQueue.kv_bytes``), and each group's own model traffic.

Per request, rank 0 records: queue (arrival -> first prefill chunk), prefill (-> first
token), handoff wait (-> decode blocks reserved), transfer (-> every receiver has it),
first decode (-> the second token), passed to ``on_timing`` when it finishes.
"""

from __future__ import annotations

import time

from ..comm.control import Outbox, gather_object
from ..parallel.rank_model import ParallelModel
from .handoff import HandoffQueue, KVReceiver, KVSender
from .kvpool import blocks_for
from .loop import Admission, StepLoop, Worker, build_pool, pool_blocks
from .options import EngineOptions, eos_token_ids
from .request import FINISH_ABORT, RequestError
from .scheduler import Scheduler

IDLE_SLEEP_MAX_S = 0.005
PHASES = ("queue", "prefill", "handoff_wait", "transfer", "first_decode")


class HandoffScheduler(Scheduler):
    """A Scheduler whose requests can leave (prefill side) or join already computed
    (decode side) with their block tables."""

    def detach(self, seq) -> None:
        """Take a running request out, keeping its blocks (released by the caller)."""
        self.running[seq.replica].remove(seq)
        del self.seqs[seq.request.request_id]

    def attach(self, seq, replica: int, table: list, admitted: int) -> None:
        """A request whose prompt is in ``table`` of ``replica``'s pool, first token known."""
        seq.replica, seq.table, seq.lane, seq.admitted = replica, table, 0, admitted
        seq.num_computed, seq.in_flight, seq.awaiting = seq.prompt_len, 0, False
        self.seqs[seq.request.request_id] = seq
        self.running[replica].append(seq)


class DisaggEngine:
    """Built collectively on every rank; ``comms``: layout.DisaggComms (the world Group and
    this rank's group Comms); the same calls as engine.ServeEngine."""

    def __init__(self, comms, layout, source, options: EngineOptions,
                 decode_kv_cache_tokens: int | None = None, dtype="float32"):
        options.check()
        self.comms, self.link = comms.group, comms.world
        link, self.layout, self.options = comms.world, layout, options
        o, self.rank = options, link.rank
        self.model = ParallelModel(self.comms, source, self.comms.xp, dtype)
        config = self.config = self.model.config
        self.max_model_len = o.max_len(config)
        self.prefill = layout.is_prefill(self.rank)
        tokens = {"prefill": o.kv_cache_tokens,
                  "decode": decode_kv_cache_tokens or o.kv_cache_tokens}
        blocks = {side: pool_blocks(n, o.block_size, self.max_model_len, f"the {side} pool")
                  for side, n in tokens.items()}  # every rank refuses a bad size together
        self.pool = build_pool(self.model, tokens["prefill" if self.prefill else "decode"],
                               o.block_size, self.max_model_len)
        self.dtype = self.model.dtype
        outbox = Outbox()
        self.kv = (KVSender(link, self.pool, self.model.shard) if self.prefill else
                   KVReceiver(link, self.pool, self.model.shard, self.dtype))
        prefill_reporter = layout.prefill_base + layout.prefill.rank_of(
            tp=0, pp=layout.prefill.pp - 1)
        decode_reporters = [layout.decode.rank_of(tp=0, dp=d) for d in range(layout.decode.dp)]
        self.worker = Worker(link, self.model, self.pool, self.comms.coords.dp,
                             [prefill_reporter] if self.prefill else decode_reporters, outbox)
        if self.rank != 0:
            return
        eos = list(o.eos_token_ids) if o.eos_token_ids is not None else eos_token_ids(source)
        self.admission = Admission(config.vocab_size, self.max_model_len, eos)
        self.prefill_sched = HandoffScheduler(
            1, blocks["prefill"], o.block_size, o.max_num_batched_tokens,
            o.max_num_seqs, self.max_model_len, layout.prefill.pp, o.enable_prefix_caching)
        self.decode_sched = HandoffScheduler(
            layout.decode.dp, blocks["decode"], o.block_size, o.max_num_batched_tokens,
            o.max_num_seqs, self.max_model_len, 1, prefix_caching=False)
        self.seqs_by_id = {}  # seq_id -> Seq, shared by both loops
        lanes = layout.prefill.pp
        self.prefill_loop = StepLoop(link, self.prefill_sched, self.seqs_by_id, lanes, lanes,
                                     range(layout.prefill_base, layout.world),
                                     [prefill_reporter], outbox)
        self.decode_loop = StepLoop(link, self.decode_sched, self.seqs_by_id, 1, 1,
                                    range(layout.decode.world), decode_reporters, outbox,
                                    self.worker)
        self.by_id = {}  # request id -> Seq, from add_request to its end
        self.times = {}  # request id -> {event: perf_counter}
        self.handoffs = HandoffQueue(link, layout, config, self.dtype.itemsize,
                                     outbox, self.kv, self.prefill_sched,
                                     self.decode_sched, self._need_blocks, self.times)
        self.on_timing = None  # callable(request_id, {phase: seconds}) at finish
        self._idle = 0

    # ---- rank 0: requests ------------------------------------------------------------
    def add_request(self, req, sample_key: int = 0) -> None:
        if req.request_id in self.times:
            raise RequestError(f"request id {req.request_id!r} is already running")
        seq = self.admission.seq(req, sample_key, self.prefill_sched.seqs)
        self.seqs_by_id[seq.seq_id] = seq
        self.prefill_sched.add(seq)
        self.times[req.request_id] = {"arrival": time.perf_counter()}
        self.by_id[req.request_id] = seq

    def abort(self, request_id: str) -> None:
        for sched in (self.prefill_sched, self.decode_sched):
            if request_id in sched.seqs:
                sched.abort(request_id)
                return
        self.handoffs.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.prefill_sched.has_unfinished() or self.decode_sched.has_unfinished()
                    or len(self.prefill_loop) or self.handoffs.busy)

    def stats(self) -> dict:
        p, d = self.prefill_sched.stats(), self.decode_sched.stats()
        out = {k: p[k] + d[k] for k in ("running", "kv_blocks_used", "kv_blocks_total",
                                        "num_preemptions", "prefix_cache_hit_tokens")}
        out["waiting"] = p["waiting"] + len(self.handoffs.queue)
        out.update({f"prefill_{k}": v for k, v in p.items()})
        out.update({f"decode_{k}": v for k, v in d.items()})
        return dict(out, **self.handoffs.stats())

    def _need_blocks(self, seq) -> int:
        """Decode blocks reserved for a request: prompt + max_tokens, so that the decode
        side never has to preempt (and recompute) a request it took."""
        return blocks_for(min(seq.prompt_len + seq.request.params.max_tokens,
                              self.max_model_len), self.options.block_size)

    # ---- rank 0: one step ------------------------------------------------------------
    def step(self) -> list:
        if self.rank != 0:
            self.run_worker()
            return []
        outputs = self._prefilled(self.prefill_loop.harvest(block=False))
        self.handoffs.take_acks()
        outputs += self.handoffs.finish_aborted()
        self.handoffs.start()
        launched = self.prefill_loop.launch()
        if launched is not None:
            now = time.perf_counter()
            for e in launched.entries[0]:
                self.times[self.seqs_by_id[e.seq_id].request.request_id].setdefault("admitted", now)
        ran = self.decode_loop.launch() is not None
        if ran:  # every decode rank runs every step (EP joins replicas): wait for it
            outs = self.decode_loop.harvest(block=True)
            now = time.perf_counter()
            for o in outs:
                self.times[o.request_id].setdefault("first_decode", now)
            outputs += outs
        outputs += self.prefill_sched.take_finished() + self.decode_sched.take_finished()
        for out in outputs:
            if out.finished:
                self._done(out)
        if launched is not None or ran or outputs:
            self._idle = 0
        else:  # waiting for the prefill group or a transfer: sleep, do not spin
            self._idle += 1
            time.sleep(min(1e-4 * 1.5 ** self._idle, IDLE_SLEEP_MAX_S))
        return outputs

    def _prefilled(self, outputs: list) -> list:
        """Prefill results: a request with its first token leaves for the handoff queue."""
        now = time.perf_counter()
        for out in outputs:
            if not out.finished and out.num_generated == 1:  # prompt done: hand over
                seq = self.by_id[out.request_id]
                self.prefill_sched.detach(seq)
                self.times[out.request_id]["prefilled"] = now
                self.handoffs.queue.append(seq)
        return outputs

    def _done(self, out) -> None:
        seq = self.by_id.pop(out.request_id, None)
        if seq is not None:
            self.seqs_by_id.pop(seq.seq_id, None)
        t = self.times.pop(out.request_id, {})
        if self.on_timing is not None and out.finish_reason != FINISH_ABORT:
            marks = ("arrival", "admitted", "prefilled", "reserved", "transferred",
                     "first_decode")
            self.on_timing(out.request_id, {
                phase: t[b] - t[a] for phase, a, b in zip(PHASES, marks, marks[1:], strict=False)
                if a in t and b in t})

    # ---- every rank ---------------------------------------------------------------------
    def run_worker(self) -> None:
        """Ranks != 0: run Steps and move K/V until rank 0 says End."""
        self.worker.serve(self.kv)

    def shutdown(self) -> None:
        """Rank 0: finish what is in flight, then let every other rank leave run_worker()."""
        self._prefilled(self.prefill_loop.drain())
        while self.handoffs.transfers:
            self.handoffs.take_acks()
            time.sleep(1e-3)
        self.prefill_loop.end_workers(range(self.layout.world))
        self.worker.finish(self.kv)

    def report(self) -> list | None:
        """Collective: per rank its ledger totals and (rank 0) the predicted kv bytes."""
        mine = {"rank": self.rank, "ledger": self.comms.ledger.totals(),
                "prefill": self.prefill}
        per_rank = gather_object(self.link, mine)
        if self.rank == 0:
            for r in per_rank:
                r["kv_predicted"] = list(self.handoffs.kv_bytes.get(r["rank"], [0, 0]))
        return per_rank
