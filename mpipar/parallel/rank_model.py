"""ParallelModel: this rank's part of the model, and one step's forward of it.

A step (serve/step.py: the scheduler builds it on world rank 0 and every rank receives
it) gives each DP replica a list of entries: a request's next tokens, the position they
start at, and its block table in the replica's paged KV pool. Every rank of the replica
runs the same entries through its stage (``run_entries``):

    stage 0:  embed the tokens (vocab-parallel, tp.py)
    each stage: its layers (TP blocks, EP MoE), attention through the block tables,
                then the activation to the next stage (pp.py)
    last stage: logits of the rows that end a request's known tokens -> the next token
                (greedy: distributed argmax; else the request's own seeded sampler)

DP: every replica runs every step (a replica without entries runs it on zero tokens),
because the EP all-to-all may join ranks of different replicas. Offline generation (every
prompt at once) is the serving engine's case: ``mpipar.serve.offline.generate``.

``dtype`` (float32, bfloat16, float16, or "auto": ``backend.compute_dtype``) is the
dtype of this rank's weights, activations, KV cache and of everything its collectives
carry (a 16-bit run moves 2 bytes an element); the logits leave as float32.
"""

from __future__ import annotations

import numpy as np

from ..backend import compute_dtype
from ..comm.control import gather_object
from ..model.finite import FiniteWatch
from ..model.layers import flatten_batch
from ..model.sampling import sample_token
from .eplb import EPLBOptions, ExpertBalancer, initial_placement
from .moe import RoutingStats
from .pp import Pipeline
from .shard import rank_shard
from .tp import TPBlock, VocabParallelHead


class ParallelModel:
    """This rank's part of the model: its stage's layers, TP/EP-sliced, and its vocab."""

    def __init__(self, comms, source, xp=np, dtype="float32", eplb: EPLBOptions | None = None):
        self.comms, self.xp = comms, xp
        self.source = source
        self.config = config = source.config
        self.dtype = dt = compute_dtype(dtype, xp, config.dtype)
        self.shard = shard = rank_shard(config, comms.layout, comms.world.rank)
        eplb = eplb or EPLBOptions()
        slots = initial_placement(config.num_experts, eplb.redundant_experts,
                                  comms.layout.ep) if comms.layout.ep > 1 else None
        self.blocks = [TPBlock(source, config, shard, i, comms, xp, dt, slots)
                       for i in shard.layers]
        self.balancer = ExpertBalancer([b.moe for b in self.blocks], comms, eplb.window)
        self.head = VocabParallelHead(source, config, shard, comms, xp,
                                      embed=shard.first_stage, head=shard.last_stage, dtype=dt)
        self.pipe = Pipeline(comms)
        self.watch = FiniteWatch(xp)  # which layer first outputs NaN/inf (model/finite.py)
        self.stats = RoutingStats(config.num_experts)
        self.forward_tokens = []  # N of every stage_forward on this rank (cost model input)
        self.kv_cache_bytes = 0
        self.n_seqs = self.decode_steps = 0

    def stage_forward(self, token_lists, caches, seq_ids=None):
        """Run this stage on one batch of tokens; the last stage returns x [N, h]."""
        ids, segments = flatten_batch(token_lists, seq_ids)
        self.forward_tokens.append(int(ids.shape[0]))
        x = self.head.embed_tokens(ids) if self.pipe.first else self.pipe.recv_activation()
        with self.comms.ledger.span(f"forward {ids.shape[0]} tokens", "stage"):
            for block, layer_caches in zip(self.blocks, caches, strict=True):
                x = block.forward(x, layer_caches, segments, self.stats)
                self.watch.check(x, block.layer)
        if not self.pipe.last:
            self.pipe.send_activation(x)
        self.balancer.forward_done(self.stats)  # every N forwards: re-place experts
        return (x if self.pipe.last else None), segments

    def run_entries(self, entries, pool, keep_logits: bool = False):
        """One step of this replica. entries: serve/step.Entry records (read by field
        name: tokens, start, table, sampling), each with >= 1 token. Last stage ->
        (token per entry with sampling [list], full logits [N, V] host or None)."""
        self.pipe.wait_sends()  # the previous step's activation has left
        views = [pool.sequence(e.table, e.start) for e in entries]
        caches = [[v[i] for v in views] for i in range(len(self.blocks))]  # [layer][seq]
        x, segments = self.stage_forward([e.tokens for e in entries], caches)
        if not self.pipe.last:
            return None
        due = [e.sampling for e in entries if e.sampling is not None]
        rows = [start + n - 1 for (_, start, n), e in zip(segments, entries, strict=True)
                if e.sampling is not None]
        full_all = None
        if keep_logits:
            full_all = self.head.full_logits(self.head.local_logits(x))  # [N, V] host
        return self.pick(x[rows] if rows else x[:0], due, full_all, rows), full_all

    def pick(self, x_rows, due, full_all=None, rows=()):
        """Last stage: x rows [B, h] -> token ids [B]: the distributed argmax for greedy
        rows; for the others, the full logits row and the entry's own seeded draw."""
        if not due:
            return []
        local = self.head.local_logits(x_rows)
        self.watch.check(local, self.config.num_layers)  # "layer L": the logits
        tokens = self.head.argmax(local)
        if not all(s.greedy for s in due):
            full = full_all[rows] if full_all is not None else self.head.full_logits(local)
            for i, s in enumerate(due):
                if not s.greedy:
                    tokens[i] = sample_token(full[i], s.temperature, s.top_p, s.seed, s.key,
                                             s.step)
        return [int(t) for t in tokens]

    def report(self):
        """Per-rank facts gathered on world rank 0: ledger, forwards, routing, memory."""
        mine = {
            "rank": self.comms.world.rank,
            "coords": vars(self.comms.coords),
            "layers": [self.shard.layers.start, self.shard.layers.stop],
            "experts": [self.shard.experts.start, self.shard.experts.stop],
            "expert_slots": next((b.moe.local_experts() for b in self.blocks if b.moe), []),
            "kv_heads": [self.shard.kv_heads.start, self.shard.kv_heads.stop],
            "kv_replication": self.shard.kv_replication,
            "ledger": self.comms.ledger.totals(),
            "forward_tokens": self.forward_tokens,
            **self.stats.report(),
            "n_seqs": self.n_seqs,
            "decode_steps": self.decode_steps,
            "kv_cache_bytes": self.kv_cache_bytes,
            "dtype": self.dtype.name,
        }
        return gather_object(self.comms.world, mine)
