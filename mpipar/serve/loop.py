"""The step loop: world rank 0 schedules and sends each Step, every rank runs its part.

Two pieces, which both engines are made of (engine.py: one loop over the whole world;
disagg.py: a prefill loop and a decode loop over two groups, plus the KV handoff):

``Worker`` (every rank): this rank's part of a group's steps. It runs its replica's
entries of a Step through its ``ParallelModel`` and KV pool; the replica's reporting rank
(last stage, TP rank 0) sends the StepResult to world rank 0 (ledger kind ``result``).
Ranks other than 0 sit in ``Worker.serve``: wait for the next message on tag STEP
(sleeping between probes, comm/control.py), run it, until ``End``. Workers keep no
per-request state: a Step carries the token ids and the block tables.

``StepLoop`` (world rank 0): one group's scheduler, lanes and in-flight window.

    launch():   scheduler.schedule(lane) -> Step     per replica: Entry records
                post it to the group's ranks          ledger "control": (W-1) * pickled size
                run rank 0's own part (if it is in the group)
    harvest():  the results of launched Steps, oldest first -> scheduler.update
                (tokens, stop rules, freed blocks) -> RequestOutputs

PP: up to P Steps in flight (pp.InFlight): rank 0 launches the next one while the last
ones are still in later stages, and waits for the oldest result only when the window is
full or nothing can be scheduled. Lanes (scheduler.py) keep the in-flight micro-batches
disjoint; chunks of one prefill may follow each other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..comm.control import Outbox, poll_object, wait_object
from ..comm.tags import RESULT, STEP
from ..parallel.pp import InFlight
from .kvpool import KVPool, blocks_for
from .request import Request, RequestError, check_request
from .scheduler import Seq
from .step import End, KVOrder, Step, StepResult


def pool_blocks(kv_cache_tokens: int, block_size: int, max_model_len: int,
                what: str = "the KV pool") -> int:
    """Blocks of a pool of ``kv_cache_tokens``; ValueError when they cannot hold one
    request of ``max_model_len``."""
    num_blocks = kv_cache_tokens // block_size
    if num_blocks < blocks_for(max_model_len, block_size):
        raise ValueError(f"{what} holds {num_blocks} blocks of {block_size} "
                         f"(kv_cache_tokens={kv_cache_tokens}): too few for one request of "
                         f"max_model_len={max_model_len}")
    return num_blocks


def build_pool(model, kv_cache_tokens: int, block_size: int, max_model_len: int) -> KVPool:
    """This rank's KV pool for ``model``: its layers and kv heads, in its dtype."""
    num_blocks = pool_blocks(kv_cache_tokens, block_size, max_model_len)
    pool = KVPool(model.xp, len(model.blocks), num_blocks, block_size,
                  len(model.shard.kv_heads), model.config.head_dim, model.dtype)
    model.kv_cache_bytes = pool.nbytes
    return pool


class Worker:
    """Every rank: its part of a group's steps (model + KV pool), reporting if it must."""

    def __init__(self, link, model, pool, replica: int, reporters: list, outbox: Outbox):
        self.link, self.model, self.pool, self.outbox = link, model, pool, outbox
        self.replica = replica  # this rank's DP replica in its group
        self.reporting = link.rank in reporters

    def execute(self, step: Step) -> StepResult | None:
        """Run this rank's part; on world rank 0 its replica's result comes back."""
        mine = step.entries[self.replica]
        out = self.model.run_entries(mine, self.pool, step.keep_logits)
        if out is None or not self.reporting or not mine:
            return None
        result = StepResult(tokens=out[0], logits=out[1])
        if self.link.rank == 0:
            return result
        self.outbox.post(self.link, result, 0, RESULT, "result")
        return None

    def serve(self, kv=None) -> None:
        """Ranks != 0: run Steps (and, with ``kv``, KV orders) until End arrives."""
        progress = None
        if kv is not None:
            def progress() -> bool:  # between probes: move K/V; busy -> wake up sooner
                kv.progress()
                return bool(kv.pending)
        while True:
            msg = wait_object(self.link, 0, STEP, "control", progress)
            if isinstance(msg, Step):
                self.execute(msg)
            elif isinstance(msg, KVOrder):
                kv.take(msg)
            elif isinstance(msg, End):
                self.finish(kv)
                return
            else:
                raise TypeError(f"unexpected step message {type(msg).__name__}")

    def finish(self, kv=None) -> None:
        """Complete every send this rank started (K/V pieces, results, activations)."""
        if kv is not None:
            kv.flush()
        self.outbox.flush()
        self.model.pipe.wait_sends()


@dataclass
class Launched:
    """A Step in flight, and the replicas' results as they come back."""
    step: Step
    waiting_on: set  # replicas whose result has not come
    results: dict = field(default_factory=dict)  # replica -> StepResult


class StepLoop:
    """World rank 0's loop over one group (see the module docstring)."""

    def __init__(self, link, scheduler, seqs_by_id: dict, lanes: int, window: int, ranks,
                 reporters: list, outbox: Outbox, worker: Worker | None = None,
                 keep_logits: bool = False):
        self.link, self.scheduler, self.seqs_by_id = link, scheduler, seqs_by_id  # seq_id -> Seq
        self.lanes, self.next_lane = lanes, 0
        self.window = InFlight(window)
        self.ranks = [r for r in ranks if r != 0]  # who gets every Step (rank 0 runs inline)
        self.reporters, self.outbox, self.worker = reporters, outbox, worker
        self.keep_logits = keep_logits
        self.logit_rows = {}  # request_id -> {position: logits [V]} (keep_logits)
        self.last_step_tokens = 0

    def __len__(self) -> int:
        return len(self.window)

    def launch(self) -> Step | None:
        """Schedule the next lane that has work, send its Step, run rank 0's part."""
        if self.window.full:
            return None
        for i in range(self.lanes):
            lane = (self.next_lane + i) % self.lanes
            entries = self.scheduler.schedule(lane)
            if any(entries):
                self.next_lane = (lane + 1) % self.lanes
                break
        else:
            return None
        step = Step(entries, self.keep_logits)
        self.last_step_tokens = step.num_tokens
        self.outbox.post_to(self.link, step, self.ranks, STEP, "control")
        launched = Launched(step, {d for d, rep in enumerate(entries) if rep})
        if self.worker is not None:
            local = self.worker.execute(step)
            if local is not None:
                launched.results[0] = local
                launched.waiting_on.discard(0)
        self.window.push(launched)
        return step

    def harvest(self, block: bool) -> list:
        """RequestOutputs of the Steps whose results are all in, oldest first; ``block``:
        wait for the oldest one."""
        outputs = []
        while len(self.window):
            launched = self.window.oldest()
            for d in sorted(launched.waiting_on):
                source = self.reporters[d]
                if block:
                    ok, obj = True, wait_object(self.link, source, RESULT, "result")
                else:
                    ok, obj = poll_object(self.link, source, RESULT, "result")
                if ok:
                    launched.results[d] = obj
                    launched.waiting_on.discard(d)
            if launched.waiting_on:
                break
            self.window.pop()
            outputs += self._apply(launched)
            block = False
        return outputs

    def drain(self) -> list:
        """Wait for every Step in flight."""
        outputs = []
        while len(self.window):
            outputs += self.harvest(block=True)
        return outputs

    def _apply(self, launched: Launched) -> list:
        entries, results = launched.step.entries, launched.results
        if self.keep_logits:
            for d, rep in enumerate(entries):
                row = 0
                for e in rep:
                    request_id = self.seqs_by_id[e.seq_id].request.request_id
                    rows = self.logit_rows.setdefault(request_id, {})
                    for j in range(len(e.tokens)):
                        rows[e.start + j] = results[d].logits[row + j]
                    row += len(e.tokens)
        tokens = [results[d].tokens if rep else [] for d, rep in enumerate(entries)]
        return self.scheduler.update(self.seqs_by_id, entries, tokens)

    def end_workers(self, ranks) -> None:
        """Tell ``ranks`` (rank 0 excluded) to leave ``Worker.serve``."""
        self.outbox.post_to(self.link, End(), [r for r in ranks if r != 0], STEP, "control")


class Admission:
    """World rank 0: a request checked and made into a Seq (seq_id, seed, stop ids)."""

    def __init__(self, vocab_size: int, max_model_len: int, eos: list):
        self.vocab_size, self.max_model_len, self.eos = vocab_size, max_model_len, list(eos)
        self.next_seq_id = 0
        self._seeds = random.Random()

    def seq(self, req: Request, sample_key: int, running) -> Seq:
        """RequestError (for the client) if the request cannot run or its id is taken."""
        check_request(req, self.vocab_size, self.max_model_len)
        if req.request_id in running:
            raise RequestError(f"request id {req.request_id!r} is already running")
        p = req.params
        stop = set(int(t) for t in p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos))
        # numpy's generators take seeds >= 0: a negative one maps to its 64-bit pattern
        seed = int(p.seed) % (1 << 64) if p.seed is not None else self._seeds.getrandbits(63)
        seq = Seq(req, self.next_seq_id, seed, int(sample_key), 0,
                  [int(t) for t in req.prompt_ids], frozenset(stop))
        self.next_seq_id += 1
        return seq
