"""The serving step loop: rank 0 schedules and sends a plan, every rank runs its part.

One step on world rank 0:

    results of finished micro-batches -> scheduler.update (tokens, stops, freed blocks)
    plan = scheduler.schedule(lane)     per replica: (slot, tokens, start, table, sample)
    Outbox.broadcast(plan)              ledger kind "control": (W-1) * pickled size
    run its own part (stage 0 of replica 0: ParallelModel.run_entries)

Every other rank waits for the plan (sleeping, comm/control.py), runs its part; the last
stage's TP rank 0 of each replica sends the sampled tokens to rank 0 (kind "result").
Workers keep no per-request state: the plan carries the token ids (so tokens need no
path back to stage 0) and the block tables into the rank's own KV pool.

PP: up to P micro-batches in flight (pp.InFlight): rank 0 launches the next plan while
the last ones are still in later stages, and waits for the oldest result only when the
window is full or nothing can be scheduled. Lanes (scheduler.py) keep the in-flight
micro-batches disjoint; chunks of one prefill may follow each other.

``generate_offline`` is the offline case, every request arriving at t=0, on this same
loop; ``ParallelModel.generate`` runs through it (serve/offline.py).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass

import numpy as np

from ..comm.control import Outbox, poll_object, wait_object
from ..comm.tags import RESULT
from ..parallel.pp import InFlight
from .kvpool import KVPool, blocks_for
from .request import Request, RequestError, check_request
from .scheduler import Scheduler, Seq


@dataclass
class EngineOptions:
    block_size: int = 16
    kv_cache_tokens: int = 16384  # per replica; the pool of every rank holds this many
    max_num_batched_tokens: int = 512  # per replica per step
    max_num_seqs: int = 64  # running requests per replica
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    eos_token_ids: list | None = None  # None: from generation_config.json / config.json
    enable_prefix_caching: bool = True
    micro_batches: int | None = None  # lanes of disjoint requests; None: one per stage
    keep_logits: bool = False  # full logits of every computed row back to rank 0 (checks)
    reserve: bool = False  # admit a request with blocks for its whole length (offline)


def eos_token_ids(source) -> list[int]:
    """EOS ids of a checkpoint folder (generation_config.json first); [] for presets."""
    folder = getattr(source, "dir", None)
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(folder, name) if folder else ""
        if path and os.path.isfile(path):
            value = json.load(open(path)).get("eos_token_id")
            if value is not None:
                return [int(v) for v in (value if isinstance(value, list) else [value])]
    return []


@dataclass
class _Step:
    entries: list  # per replica: list of Entry
    waiting_on: set  # replicas whose result has not come
    results: dict  # replica -> {"tokens", "logits"}


class ServeEngine:
    """Built collectively on every rank (see SERVE_INTERFACE.md for who calls what)."""

    def __init__(self, comms, source, options: EngineOptions, model=None):
        from ..parallel.rank_model import ParallelModel
        self.comms, self.options = comms, options
        o = options
        self.model = model if model is not None else ParallelModel(comms, source, comms.xp)
        config, layout = self.model.config, comms.layout
        self.max_model_len = o.max_model_len or config.max_position_embeddings
        for name in ("block_size", "kv_cache_tokens", "max_num_batched_tokens",
                     "max_num_seqs", "micro_batches", "max_model_len"):
            value = getattr(o, name) if name != "micro_batches" else (o.micro_batches or 1)
            value = self.max_model_len if name == "max_model_len" else value
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_blocks = o.kv_cache_tokens // o.block_size
        if self.num_blocks < blocks_for(self.max_model_len, o.block_size):
            raise ValueError(f"kv_cache_tokens={o.kv_cache_tokens} holds {self.num_blocks} "
                             f"blocks of {o.block_size}: too few for one request of "
                             f"max_model_len={self.max_model_len}")
        self.pool = KVPool(self.model.xp, len(self.model.blocks), self.num_blocks,
                           o.block_size, len(self.model.plan.kv_heads), config.head_dim,
                           getattr(self.model, "dtype", np.float32))  # the model's dtype
        self.model.kv_cache_bytes = self.pool.nbytes
        self.world, self.rank = comms.world, comms.world.rank
        self.reporters = [layout.rank_of(tp=0, dp=d, pp=layout.pp - 1)
                          for d in range(layout.dp)]
        self.outbox = Outbox()
        if self.rank != 0:
            return
        self.eos = list(o.eos_token_ids) if o.eos_token_ids is not None else eos_token_ids(source)
        lanes = o.micro_batches or layout.pp
        self.scheduler = Scheduler(layout.dp, self.num_blocks, o.block_size,
                                   o.max_num_batched_tokens, o.max_num_seqs,
                                   self.max_model_len, lanes, o.enable_prefix_caching,
                                   o.reserve)
        self.lanes, self.next_lane = lanes, 0
        self.window = InFlight(layout.pp)
        self.slots = {}  # slot -> Seq
        self.next_slot, self.last_step_tokens = 0, 0
        self.logit_rows = {}  # request_id -> {position: logits [V]} (keep_logits)
        self._seeds = random.Random()

    # ---- rank 0: requests
    def add_request(self, req: Request, sample_key: int = 0) -> None:
        check_request(req, self.model.config.vocab_size, self.max_model_len)
        p = req.params
        if req.request_id in self.scheduler.seqs:
            raise RequestError(f"request id {req.request_id!r} is already running")
        stop = set(int(t) for t in p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos))
        # numpy's generators take seeds >= 0: a negative one maps to its 64-bit pattern
        seed = int(p.seed) % (1 << 64) if p.seed is not None else self._seeds.getrandbits(63)
        seq = Seq(req, self.next_slot, seed, int(sample_key), 0,
                  [int(t) for t in req.prompt_ids], frozenset(stop))
        self.slots[seq.slot] = seq
        self.next_slot += 1
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or len(self.window) > 0

    def stats(self) -> dict:
        return dict(self.scheduler.stats(), last_step_tokens=self.last_step_tokens,
                    peak_in_flight=self.window.peak)

    # ---- rank 0: the loop
    def step(self) -> list:
        """One step (see the module docstring); RequestOutputs on rank 0, [] elsewhere."""
        if self.rank != 0:
            plan = wait_object(self.world, 0)
            if not plan.get("end"):
                self._execute(plan)
            return []
        outputs = self._harvest(block=False)
        entries = None if self.window.full else self._schedule()
        if entries is not None:
            self._launch(entries)
            outputs += self._harvest(block=False)
        elif len(self.window):
            outputs += self._harvest(block=True)
        else:
            outputs += self.scheduler.take_finished()  # aborted while scheduling
            if not outputs and self.scheduler.has_unfinished():
                raise RuntimeError(f"scheduler stalled: {self.scheduler.stats()}")
        return outputs + self.scheduler.take_finished()

    def _schedule(self):
        for i in range(self.lanes):
            lane = (self.next_lane + i) % self.lanes
            entries = self.scheduler.schedule(lane)
            if any(entries):
                self.next_lane = (lane + 1) % self.lanes
                return entries
        return None

    def _launch(self, entries) -> None:
        plan = {"entries": [[e.pack() for e in rep] for rep in entries],
                "keep_logits": self.options.keep_logits}
        self.last_step_tokens = sum(len(e.tokens) for rep in entries for e in rep)
        self.outbox.broadcast(self.world, plan, 0)
        step = _Step(entries, {d for d, rep in enumerate(entries) if rep}, {})
        local = self._execute(plan)
        if local is not None:
            step.results[0] = local
            step.waiting_on.discard(0)
        self.window.push(step)

    def _harvest(self, block: bool) -> list:
        """Apply the results of finished micro-batches, oldest first; ``block``: wait
        for the oldest one."""
        outputs = []
        while len(self.window):
            step = self.window.oldest()
            for d in sorted(step.waiting_on):
                if block:
                    ok, obj = True, wait_object(self.world, self.reporters[d], RESULT,
                                                "result")
                else:
                    ok, obj = poll_object(self.world, self.reporters[d], RESULT, "result")
                if ok:
                    step.results[d] = obj
                    step.waiting_on.discard(d)
            if step.waiting_on:
                break
            self.window.pop()
            outputs += self._apply(step)
            block = False
        return outputs

    def _apply(self, step: _Step) -> list:
        tokens = [step.results[d]["tokens"] if rep else [] for d, rep in enumerate(step.entries)]
        if self.options.keep_logits:
            for d, rep in enumerate(step.entries):
                row = 0
                for e in rep:
                    rows = self.logit_rows.setdefault(self.slots[e.slot].request.request_id, {})
                    for j in range(len(e.tokens)):
                        rows[e.start + j] = step.results[d]["logits"][row + j]
                    row += len(e.tokens)
        outputs = self.scheduler.update(self.slots, step.entries, tokens)
        finished = {o.request_id for o in outputs if o.finished}
        self.slots = {k: s for k, s in self.slots.items()
                      if s.request.request_id not in finished}
        return outputs

    # ---- every rank: one plan
    def _execute(self, plan):
        """Run this rank's part of a plan; rank 0 gets its own replica's result back."""
        mine = plan["entries"][self.comms.coords.dp]
        out = self.model.run_entries(mine, self.pool, plan["keep_logits"])
        if out is None or self.rank not in self.reporters or not mine:
            return None
        result = {"tokens": out[0], "logits": out[1]}
        if self.rank == 0:
            return result
        self.outbox.post(self.world, result, 0, RESULT, "result")
        return None

    def run_worker(self) -> None:
        """Ranks != 0: run plans until rank 0 ends the batch or shuts down."""
        while True:
            plan = wait_object(self.world, 0)
            if plan.get("end"):
                self.outbox.flush()
                self.model.pipe.wait_sends()
                return
            self._execute(plan)

    def shutdown(self) -> None:
        """Rank 0: let the workers leave run_worker() (after the last results)."""
        while len(self.window):
            self._harvest(block=True)
        self.outbox.broadcast(self.world, {"end": True}, 0)
        self.outbox.flush()
        self.model.pipe.wait_sends()


def generate_offline(engine: ServeEngine, requests, timing: dict | None = None):
    """Collective: every request arrives at t=0; rank 0 returns each one's tokens
    (list of lists), the other ranks run the steps and return None. ``timing`` gets
    ``first_tokens_s`` (perf_counter when every request had its first token). The
    engine can be used again after."""
    if engine.rank != 0:
        engine.run_worker()
        return None
    out, firsts = {}, 0
    for i, req in enumerate(requests):
        engine.add_request(req, sample_key=i)
        out[req.request_id] = []
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
            firsts += o.num_generated == 1 and len(o.new_token_ids) == 1
            if timing is not None and firsts == len(requests) and "first_tokens_s" not in timing:
                timing["first_tokens_s"] = time.perf_counter()
    engine.shutdown()
    return [out[r.request_id] for r in requests]
