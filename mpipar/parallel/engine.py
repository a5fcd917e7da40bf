"""generate() across the layout: chunked prefill through the pipeline, then decode.

Every rank runs the same schedule, so the collectives line up without coordination:

    prefill: for each of K chunks: stage_forward(chunk)       (pp.py: non-blocking sends)
             last stage: logits of each prompt's last token -> first token
    decode:  for each new token after the first: tokens travel last stage -> stage 0,
             stage_forward(one token per sequence), last stage picks the next token

DP: prompt i belongs to replica ``i % dp``. Every replica runs the same number of
forwards (a replica without prompts runs them on zero tokens), because the EP all-to-all
may join ranks of different replicas. The last stage's TP rank 0 of each replica sends
its results to world rank 0, which puts them back in prompt order.

``dtype`` (float32, bfloat16, float16, or "auto": ``backend.compute_dtype``) is the
dtype of this rank's weights, activations, KV cache and of everything its collectives
carry (a 16-bit run moves 2 bytes an element); the logits leave as float32.
"""

from __future__ import annotations

import time

import numpy as np

from ..backend import compute_dtype
from ..comm.control import barrier, gather_object
from ..comm.p2p import recv_array, send_array
from ..model.finite import FiniteWatch
from ..model.layers import pack
from ..model.sampling import Generation, Sampler, pad_prompt_logits
from .eplb import EPLBOptions, ExpertBalancer, initial_placement
from .moe import RoutingStats
from .pp import Pipeline, chunk_prompts
from .shard import make_plan, split
from .tp import TPBlock, VocabParallelHead

TAG_RESULT = 21


class ParallelModel:
    """This rank's part of the model: its stage's layers, TP/EP-sliced, and its vocab."""

    def __init__(self, comms, source, xp=np, dtype="float32", eplb: EPLBOptions | None = None):
        self.comms, self.xp = comms, xp
        self.config = config = source.config
        self.dtype = dt = compute_dtype(dtype, xp, config.dtype)
        self.plan = plan = make_plan(config, comms.layout, comms.world.rank)
        eplb = eplb or EPLBOptions()
        slots = initial_placement(config.num_experts, eplb.redundant_experts,
                                  comms.layout.ep) if comms.layout.ep > 1 else None
        self.blocks = [TPBlock(source, config, plan, i, comms, xp, dt, slots)
                       for i in plan.layers]
        self.balancer = ExpertBalancer([b.moe for b in self.blocks], comms, eplb.window)
        self.head = VocabParallelHead(source, config, plan, comms, xp,
                                      embed=plan.first_stage, head=plan.last_stage, dtype=dt)
        self.pipe = Pipeline(comms)
        self.watch = FiniteWatch(xp)  # which layer first outputs NaN/inf (model/finite.py)
        self.stats = RoutingStats(config.num_experts)
        self.forward_tokens = []  # N of every stage_forward on this rank (cost model input)
        self.kv_cache_bytes = 0
        self.n_seqs = self.decode_steps = 0

    def stage_forward(self, token_lists, caches, seq_ids=None):
        """Run this stage on one batch of tokens; the last stage returns x [N, h]."""
        ids, segments = pack(token_lists, seq_ids)
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

    def pick(self, x_rows, sampler, keep_logits, seq_ids, step):
        """Last stage: x rows [B, h] -> (tokens [B], full logits [B, V] or None)."""
        local = self.head.local_logits(x_rows)
        self.watch.check(local, self.config.num_layers)  # "layer L": the logits
        full = self.head.full_logits(local) if keep_logits or not sampler.greedy else None
        if sampler.greedy:
            return self.head.argmax(local), full
        return sampler.sample(full, seq_ids, step), full

    def generate(self, prompts, max_new_tokens: int, sampler: Sampler | None = None,
                 prefill_chunks: int = 1, keep_logits: bool = False,
                 decode_microbatches: int | None = None):
        """All prompts in, Generation out on world rank 0 (None elsewhere)."""
        sampler = sampler or Sampler()
        layout, co = self.comms.layout, self.comms.coords
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        seq_ids = list(range(co.dp, len(prompts), layout.dp))  # this replica's sequences
        mine = [list(prompts[i]) for i in seq_ids]
        n_seq = self.n_seqs = len(mine)
        # Memory-bound decode reads every weight once per forward, so M micro-batches
        # cost M weight reads per step; pipelining repays that only when compute-bound.
        decode_microbatches = max(1, decode_microbatches or 1)
        self.decode_steps = max_new_tokens - 1
        capacity = max((len(p) for p in mine), default=0) + max_new_tokens
        caches = [[b.new_cache(capacity) for _ in range(n_seq)] for b in self.blocks]
        self.kv_cache_bytes = sum(c.nbytes for layer in caches for c in layer)
        last = self.pipe.last
        prompt_rows = [[] for _ in range(n_seq)]
        first_rows = [None] * n_seq
        done = [0] * n_seq
        barrier(self.comms.world)  # every rank starts the clock together
        t0 = time.perf_counter()

        for pieces in chunk_prompts(mine, prefill_chunks):
            x, segments = self.stage_forward(pieces, caches)
            if not last:
                continue
            for seq, start, rows in segments:
                done[seq] += rows
                if keep_logits:
                    prompt_rows[seq].append(self.head.full_logits(
                        self.head.local_logits(x[start:start + rows])))
                if done[seq] == len(mine[seq]):
                    first_rows[seq] = x[start + rows - 1]
        self.pipe.wait_sends()

        # Decode in micro-batches of sequences, so that with P stages up to P of them are
        # in flight: stage 0 starts micro-batch m+1 while stage 1 works on m.
        micro = [list(split(n_seq, decode_microbatches, m)) for m in range(decode_microbatches)]
        tokens = np.zeros((n_seq, max_new_tokens), dtype=np.int64)
        decode_logits = (np.zeros((n_seq, max_new_tokens, self.config.vocab_size), np.float32)
                         if keep_logits and last else None)
        t_first = None
        for step in range(max_new_tokens):
            for mb in micro:
                if step > 0:  # forward the previous token of the micro-batch's sequences
                    prev = (self.pipe.tokens_from_last() if self.pipe.first and not last
                            else tokens[mb, step - 1])
                    x, _ = self.stage_forward([[int(t)] for t in prev], caches, mb)
                if not last:
                    continue
                rows = (self.xp.stack([first_rows[i] for i in mb]) if step == 0 else x) \
                    if mb else self.xp.zeros((0, self.config.hidden_size), dtype=self.dtype)
                tokens[mb, step], full = self.pick(rows, sampler, keep_logits,
                                                   [seq_ids[i] for i in mb], step)
                if keep_logits:
                    decode_logits[mb, step] = full
                if step + 1 < max_new_tokens:
                    self.pipe.tokens_to_first(tokens[mb, step])
            self.pipe.wait_sends()
            if t_first is None:
                t_first = time.perf_counter()
        t_end = time.perf_counter()

        result = None
        if last and co.tp == 0:
            result = Generation(
                tokens=tokens,
                prompt_logits=pad_prompt_logits([np.concatenate(r) if r else
                                                 np.zeros((0, self.config.vocab_size),
                                                          np.float32) for r in prompt_rows],
                                                self.config.vocab_size) if keep_logits else None,
                decode_logits=decode_logits,
                ttft_s=t_first - t0, decode_s=t_end - t_first)
        return self._collect(result, len(prompts), keep_logits)

    def _collect(self, result, n_prompts, keep_logits):
        """Replica results -> world rank 0, in prompt order."""
        layout, world = self.comms.layout, self.comms.world
        reporters = [layout.rank_of(tp=0, dp=d, pp=layout.pp - 1) for d in range(layout.dp)]
        if world.rank in reporters and world.rank != 0:
            send_array(world, result.tokens, 0, TAG_RESULT, kind="result")
            send_array(world, np.array([result.ttft_s, result.decode_s]), 0, TAG_RESULT,
                       kind="result")
            if keep_logits:
                send_array(world, result.prompt_logits, 0, TAG_RESULT, kind="result")
                send_array(world, result.decode_logits, 0, TAG_RESULT, kind="result")
        if world.rank != 0:
            return None
        parts = []
        for r in reporters:
            if r == 0:
                parts.append(result)
                continue
            tokens = recv_array(world, r, TAG_RESULT, kind="result")
            ttft, dec = recv_array(world, r, TAG_RESULT, kind="result")
            pl = recv_array(world, r, TAG_RESULT, kind="result") if keep_logits else None
            dl = recv_array(world, r, TAG_RESULT, kind="result") if keep_logits else None
            parts.append(Generation(tokens, pl, dl, float(ttft), float(dec)))
        order = [i for d in range(layout.dp) for i in range(d, n_prompts, layout.dp)]
        inverse = np.argsort(order)
        tokens = np.concatenate([p.tokens for p in parts])[inverse]
        out = Generation(tokens=tokens, ttft_s=max(p.ttft_s for p in parts),
                         decode_s=max(p.decode_s for p in parts))
        if keep_logits:
            longest = max(p.prompt_logits.shape[1] for p in parts)
            out.prompt_logits = np.concatenate([
                np.pad(p.prompt_logits, ((0, 0), (0, longest - p.prompt_logits.shape[1]),
                                         (0, 0)), constant_values=np.nan)
                for p in parts])[inverse]
            out.decode_logits = np.concatenate([p.decode_logits for p in parts])[inverse]
        return out

    def report(self):
        """Per-rank facts gathered on world rank 0: ledger, forwards, routing, memory."""
        mine = {
            "rank": self.comms.world.rank,
            "coords": vars(self.comms.coords),
            "layers": [self.plan.layers.start, self.plan.layers.stop],
            "experts": [self.plan.experts.start, self.plan.experts.stop],
            "expert_slots": next((b.moe.local_experts() for b in self.blocks if b.moe), []),
            "kv_heads": [self.plan.kv_heads.start, self.plan.kv_heads.stop],
            "kv_replication": self.plan.kv_replication,
            "ledger": self.comms.ledger.totals(),
            "forward_tokens": self.forward_tokens,
            **self.stats.report(),
            "n_seqs": self.n_seqs,
            "decode_steps": self.decode_steps,
            "kv_cache_bytes": self.kv_cache_bytes,
            "dtype": self.dtype.name,
        }
        return gather_object(self.comms.world, mine)
