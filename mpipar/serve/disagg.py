"""Prefill/decode disaggregation: world rank 0 drives a prefill group and a decode group.

World rank 0 (decode replica 0, TP rank 0; see groups.py for who is where) keeps two
schedulers (scheduler.py): the prefill one admits requests into the prefill group's KV
pool and cuts prompts into chunks under the token budget (up to P1 micro-batches in
flight through its pipeline); the decode one batches the handed-over requests
continuously in the decode group's pools (one per decode replica). One step of rank 0:

    prefill results -> first tokens out; those requests leave the prefill scheduler
    kv acks         -> transfer done: free the prefill blocks, the request joins decode
    handoff queue   -> reserve decode blocks (prompt + max_tokens: the decode side never
                       preempts); none free: the request waits, holding its prefill
                       blocks (nothing is lost or computed twice); else post kv_send /
                       kv_recv plans (handoff.HandoffQueue, pieces of parallel/reshard.py)
    prefill plan    -> posted to every prefill rank, non-blocking (rank 0 never waits
                       for the prefill group, except for a result when its window is full
                       and nothing else can run)
    decode step     -> broadcast to the decode ranks, rank 0 runs its part, results

Every other rank waits for plans from rank 0 (sleeping between probes) and meanwhile
completes its KV sends (prefill) or tests its KV receives (decode). Traffic: plans
("control"), tokens ("result"), the handoff ("kv_transfer", exactly the pieces' bytes,
predicted per rank by ``predicted_kv_bytes``), and each group's own model traffic.

Per request, rank 0 records: queue (arrival -> first prefill chunk), prefill (-> first
token), handoff wait (-> decode blocks reserved), transfer (-> every receiver has it),
first decode (-> the second token), passed to ``on_timing`` when it finishes.
"""

from __future__ import annotations

import random
import time

import numpy as np

from ..comm.control import Outbox, gather_object, poll_object, wait_object
from ..comm.tags import RESULT, STEP
from ..parallel.pp import InFlight
from .engine import EngineOptions, ServeEngine, _Step, eos_token_ids
from .handoff import HandoffQueue, KVReceiver, KVSender
from .kvpool import KVPool, blocks_for
from .request import FINISH_ABORT
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
    """Built collectively on every rank; ``comms``: groups.DisaggComms (the world Group
    and this rank's group Comms)."""

    def __init__(self, comms, layout, source, options: EngineOptions,
                 decode_kv_cache_tokens: int | None = None, dtype="float32"):
        from ..parallel.rank_model import ParallelModel
        self.comms, self.link = comms.group, comms.world
        link, self.layout, self.options = comms.world, layout, options
        o, self.rank = options, link.rank
        self.model = ParallelModel(self.comms, source, self.comms.xp, dtype)
        config = self.config = self.model.config
        self.max_model_len = o.max_model_len or config.max_position_embeddings
        for name in ("block_size", "kv_cache_tokens", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(o, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.prefill = layout.is_prefill(self.rank)
        tokens = {True: o.kv_cache_tokens, False: decode_kv_cache_tokens or o.kv_cache_tokens}
        blocks = {k: v // o.block_size for k, v in tokens.items()}
        for side, n in blocks.items():
            if n < blocks_for(self.max_model_len, o.block_size):
                raise ValueError(f"the {'prefill' if side else 'decode'} pool holds {n} "
                                 f"blocks of {o.block_size}: too few for one request of "
                                 f"max_model_len={self.max_model_len}")
        self.dtype = np.dtype(getattr(self.model, "dtype", np.float32))
        self.pool = KVPool(self.comms.xp, len(self.model.blocks), blocks[self.prefill],
                           o.block_size, len(self.model.plan.kv_heads), config.head_dim,
                           self.dtype)
        self.model.kv_cache_bytes = self.pool.nbytes
        self.outbox = Outbox()
        self.kv = (KVSender(link, self.pool, self.model.plan) if self.prefill else
                   KVReceiver(link, self.pool, self.model.plan, self.dtype))
        self.prefill_reporter = layout.prefill_base + layout.prefill.rank_of(
            tp=0, pp=layout.prefill.pp - 1)
        self.decode_reporters = [layout.decode.rank_of(tp=0, dp=d)
                                 for d in range(layout.decode.dp)]
        if self.rank != 0:
            return
        self.eos = list(o.eos_token_ids) if o.eos_token_ids is not None else eos_token_ids(source)
        self.scheduler = self.prefill_sched = HandoffScheduler(
            1, blocks[True], o.block_size, o.max_num_batched_tokens, o.max_num_seqs,
            self.max_model_len, layout.prefill.pp, o.enable_prefix_caching)
        self.decode_sched = HandoffScheduler(
            layout.decode.dp, blocks[False], o.block_size, o.max_num_batched_tokens,
            o.max_num_seqs, self.max_model_len, 1, prefix_caching=False)
        self.lanes, self.next_lane = layout.prefill.pp, 0
        self.window = InFlight(layout.prefill.pp)
        self.slots, self.next_slot = {}, 0
        self._seeds = random.Random()
        self.by_id = {}  # request id -> Seq, from add_request to its end
        self.times = {}  # request id -> {event: perf_counter}
        self.handoffs = HandoffQueue(link, layout, config, self.dtype.itemsize,
                                     self.outbox, self.kv, self.prefill_sched,
                                     self.decode_sched, self._need_blocks, self.times)
        self.on_timing = None  # callable(request_id, {phase: seconds}) at finish
        self._idle = 0

    # ---- rank 0: requests ------------------------------------------------------------
    def add_request(self, req, sample_key: int = 0) -> None:
        if req.request_id in self.times:
            from .request import RequestError
            raise RequestError(f"request id {req.request_id!r} is already running")
        # The serving engine's checks and Seq making, on the prefill scheduler.
        ServeEngine.add_request(self, req, sample_key)
        self.times[req.request_id] = {"arrival": time.perf_counter()}
        self.by_id[req.request_id] = self.slots[self.next_slot - 1]

    def abort(self, request_id: str) -> None:
        for sched in (self.prefill_sched, self.decode_sched):
            if request_id in sched.seqs:
                sched.abort(request_id)
                return
        self.handoffs.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.prefill_sched.has_unfinished() or self.decode_sched.has_unfinished()
                    or len(self.window) or self.handoffs.busy)

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
        outputs = self._harvest_prefill(block=False)
        self.handoffs.take_acks()
        outputs += self.handoffs.finish_aborted()
        self.handoffs.start()
        launched = self._launch_prefill()
        ran = self._decode_step(outputs)
        outputs += self.prefill_sched.take_finished() + self.decode_sched.take_finished()
        for out in outputs:
            if out.finished:
                self._done(out)
        if launched or ran or outputs:
            self._idle = 0
        else:  # waiting for the prefill group or a transfer: sleep, do not spin
            self._idle += 1
            time.sleep(min(1e-4 * 1.5 ** self._idle, IDLE_SLEEP_MAX_S))
        return outputs

    def _launch_prefill(self) -> bool:
        if self.window.full:
            return False
        for i in range(self.lanes):
            lane = (self.next_lane + i) % self.lanes
            entries = self.prefill_sched.schedule(lane)
            if any(entries):
                break
        else:
            return False
        self.next_lane = (lane + 1) % self.lanes
        now = time.perf_counter()
        for e in entries[0]:
            self.times[self.slots[e.slot].request.request_id].setdefault("admitted", now)
        plan = {"op": "run", "entries": [[e.pack() for e in entries[0]]]}
        self._post(plan, range(self.layout.prefill_base, self.layout.world))
        self.window.push(_Step(entries, {0}, {}))
        return True

    def _harvest_prefill(self, block: bool) -> list:
        outputs = []
        while len(self.window):
            step = self.window.oldest()
            if block:
                ok, obj = True, wait_object(self.link, self.prefill_reporter, RESULT, "result")
            else:
                ok, obj = poll_object(self.link, self.prefill_reporter, RESULT, "result")
            if not ok:
                break
            self.window.pop()
            block = False
            outs = self.prefill_sched.update(self.slots, step.entries, [obj["tokens"]])
            now = time.perf_counter()
            for out in outs:
                if not out.finished and out.num_generated == 1:  # prompt done: hand over
                    seq = self.by_id[out.request_id]
                    self.prefill_sched.detach(seq)
                    self.times[out.request_id]["prefilled"] = now
                    self.handoffs.queue.append(seq)
            outputs += outs
        return outputs

    def _decode_step(self, outputs: list) -> bool:
        entries = self.decode_sched.schedule(0)
        if not any(entries):
            return False
        plan = {"op": "run", "entries": [[e.pack() for e in rep] for rep in entries]}
        self._post(plan, range(1, self.layout.decode.world))
        local = self._run(plan)  # every decode rank runs every step (EP joins replicas)
        results = {0: local} if local is not None else {}
        for d, rep in enumerate(entries):
            if rep and d not in results:
                results[d] = wait_object(self.link, self.decode_reporters[d], RESULT,
                                         "result")
        tokens = [results[d]["tokens"] if rep else [] for d, rep in enumerate(entries)]
        outs = self.decode_sched.update(self.slots, entries, tokens)
        now = time.perf_counter()
        for o in outs:
            self.times[o.request_id].setdefault("first_decode", now)
        outputs += outs
        return True

    def _done(self, out) -> None:
        seq = self.by_id.pop(out.request_id, None)
        if seq is not None:
            self.slots.pop(seq.slot, None)
        t = self.times.pop(out.request_id, {})
        if self.on_timing is not None and out.finish_reason != FINISH_ABORT:
            marks = ("arrival", "admitted", "prefilled", "reserved", "transferred",
                     "first_decode")
            self.on_timing(out.request_id, {
                phase: t[b] - t[a] for phase, a, b in zip(PHASES, marks, marks[1:], strict=False)
                if a in t and b in t})

    def _post(self, plan, ranks) -> None:
        for r in ranks:
            self.outbox.post(self.link, plan, r, STEP, "control")

    # ---- every rank: plans -------------------------------------------------------------
    def _run(self, plan):
        """This rank's part of a run plan; a reporter's result (rank 0 gets it back)."""
        mine = plan["entries"][self.comms.coords.dp]
        out = self.model.run_entries(mine, self.pool)
        reporters = [self.prefill_reporter] if self.prefill else self.decode_reporters
        if out is None or self.rank not in reporters or not mine:
            return None
        result = {"tokens": out[0]}
        if self.rank == 0:
            return result
        self.outbox.post(self.link, result, 0, RESULT, "result")
        return None

    def run_worker(self) -> None:
        """Ranks != 0: run plans and move KV until rank 0 says end."""
        delay = 1e-5
        while True:
            self.kv.progress()
            ok, plan = poll_object(self.link, 0, STEP, "control")
            if not ok:
                time.sleep(delay)
                delay = min(delay * 1.3, 0.02 if not self.kv.pending else 2e-4)
                continue
            delay = 1e-5
            op = plan.get("op")
            if op == "run":
                self._run(plan)
            elif op == "kv_send":
                self.kv.send(plan)
            elif op == "kv_recv":
                self.kv.post(plan)
            elif op == "end":
                self.kv.flush()
                self.outbox.flush()
                self.model.pipe.wait_sends()
                return

    def shutdown(self) -> None:
        """Rank 0: finish what is in flight, then let every other rank leave run_worker()."""
        while len(self.window):
            self._harvest_prefill(block=True)
        while self.handoffs.transfers:
            self.handoffs.take_acks()
            time.sleep(1e-3)
        self._post({"op": "end"}, range(1, self.layout.world))
        self.kv.flush()
        self.outbox.flush()
        self.model.pipe.wait_sends()

    def report(self) -> list | None:
        """Collective: per rank its ledger totals and (rank 0) the predicted kv bytes."""
        mine = {"rank": self.rank, "ledger": self.comms.ledger.totals(),
                "prefill": self.prefill}
        per_rank = gather_object(self.link, mine)
        if self.rank == 0:
            for r in per_rank:
                r["kv_predicted"] = list(self.handoffs.kv_bytes.get(r["rank"], [0, 0]))
        return per_rank
