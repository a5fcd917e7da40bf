"""The colocated serving engine: one step loop (loop.py) over every rank of one layout.

Who calls what: every rank builds the engine (collectively, same options); world rank 0
then calls ``add_request`` / ``abort`` / ``step`` / ``stats`` (serve/driver.py does, on
the thread that initialised MPI) and finally ``shutdown``; every other rank calls
``run_worker``, which returns after rank 0's ``shutdown``.

One ``step`` on world rank 0:

    results of finished micro-batches -> scheduler.update (tokens, stops, freed blocks)
    loop.launch(): the next lane's Step to every rank, rank 0's own part run inline
                   (stage 0 of replica 0)

DP: every replica runs every Step (a replica without entries runs it on zero tokens),
because the EP all-to-all may join ranks of different replicas. Offline generation
(every request at t=0) is this same engine: ``serve/offline.py``.
"""

from __future__ import annotations

from ..comm.control import Outbox
from ..parallel.rank_model import ParallelModel
from .loop import Admission, StepLoop, Worker, build_pool
from .options import EngineOptions, eos_token_ids
from .request import Request
from .scheduler import Scheduler


class ServeEngine:
    """Built collectively on every rank; ``model``: this rank's ParallelModel (default:
    one built from ``source`` in float32)."""

    def __init__(self, comms, source, options: EngineOptions, model=None):
        options.check()
        self.comms, self.options = comms, options
        o, layout = options, comms.layout
        self.model = model if model is not None else ParallelModel(comms, source, comms.xp)
        config = self.model.config
        self.max_model_len = o.max_len(config)
        self.pool = build_pool(self.model, o.kv_cache_tokens, o.block_size, self.max_model_len)
        self.world, self.rank = comms.world, comms.world.rank
        reporters = [layout.rank_of(tp=0, dp=d, pp=layout.pp - 1) for d in range(layout.dp)]
        self.worker = Worker(self.world, self.model, self.pool, comms.coords.dp, reporters,
                             Outbox())
        if self.rank != 0:
            return
        eos = list(o.eos_token_ids) if o.eos_token_ids is not None else eos_token_ids(source)
        self.admission = Admission(config.vocab_size, self.max_model_len, eos)
        lanes = o.micro_batches or layout.pp
        self.scheduler = Scheduler(layout.dp, self.pool.num_blocks, o.block_size,
                                   o.max_num_batched_tokens, o.max_num_seqs,
                                   self.max_model_len, lanes, o.enable_prefix_caching,
                                   o.reserve)
        self.seqs_by_id = {}  # seq_id -> Seq
        self.loop = StepLoop(self.world, self.scheduler, self.seqs_by_id, lanes, layout.pp,
                             range(self.world.size), reporters, self.worker.outbox,
                             self.worker, o.keep_logits)

    # ---- rank 0: requests
    def add_request(self, req: Request, sample_key: int = 0) -> None:
        seq = self.admission.seq(req, sample_key, self.scheduler.seqs)
        self.seqs_by_id[seq.seq_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or len(self.loop) > 0

    def stats(self) -> dict:
        return dict(self.scheduler.stats(), last_step_tokens=self.loop.last_step_tokens,
                    peak_in_flight=self.loop.window.peak)

    @property
    def logit_rows(self) -> dict:
        """request_id -> {position: logits [V]} (options.keep_logits)."""
        return self.loop.logit_rows

    # ---- rank 0: the loop
    def step(self) -> list:
        """One step (see the module docstring); RequestOutputs on rank 0, [] elsewhere."""
        if self.rank != 0:
            self.run_worker()
            return []
        loop = self.loop
        outputs = loop.harvest(block=False)
        if loop.launch() is not None:
            outputs += loop.harvest(block=False)
        elif len(loop):
            outputs += loop.harvest(block=True)
        else:
            outputs += self.scheduler.take_finished()  # aborted while scheduling
            if not outputs and self.scheduler.has_unfinished():
                raise RuntimeError(f"scheduler stalled: {self.scheduler.stats()}")
        outputs += self.scheduler.take_finished()
        finished = {o.request_id for o in outputs if o.finished}
        if finished:
            for k in [k for k, s in self.seqs_by_id.items() if s.request.request_id in finished]:
                del self.seqs_by_id[k]
        return outputs

    def run_worker(self) -> None:
        """Ranks != 0: run Steps until rank 0's ``shutdown``."""
        self.worker.serve()

    def shutdown(self) -> None:
        """Rank 0: take the last results, then let the workers leave run_worker()."""
        self.loop.drain()
        self.loop.end_workers(range(self.world.size))
        self.worker.finish()
