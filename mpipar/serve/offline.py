"""Offline generation: a batch of prompts as the serving engine's case, every one at t=0.

``generate(model, prompts, max_new_tokens)`` is the library's entry point (what
programs/transformer.py and the benchmarks call): collective over the model's ranks, the
Generation on world rank 0. Its knobs map onto the engine's: ``prefill_chunks`` K gives
a token budget of 1/K of the largest replica's prompt tokens (never fewer than its
sequences), so each prompt is spread over about K steps that follow each other through
the pipeline; ``decode_microbatches`` M gives M lanes of disjoint requests. Requests go
to replicas by the scheduler's rule (``layout.offline_replicas``). The pool holds every
request whole, reserved at admission, so each one's blocks are consecutive and attention
reads them as views (no gather, as fast as a contiguous cache); prefix caching is off
when logits are kept, so every prompt row gets its logits.
"""

from __future__ import annotations

import time

import numpy as np

from ..comm.control import barrier
from ..layout import offline_replicas
from ..model.sampling import Generation, Sampler, pad_prompt_logits
from .engine import ServeEngine
from .kvpool import blocks_for
from .options import EngineOptions
from .request import Request, RequestError, SamplingParams, check_request

BLOCK_SIZE = 16


def generate(model, prompts, max_new_tokens: int, sampler: Sampler | None = None,
             prefill_chunks: int = 1, keep_logits: bool = False,
             decode_microbatches: int | None = None) -> Generation | None:
    """Generation on world rank 0, None elsewhere (collective, same arguments on every
    rank). A prompt the model cannot run raises RequestError (a ValueError) on every rank."""
    sampler = sampler or Sampler()
    vocab, layout = model.config.vocab_size, model.comms.layout
    if max_new_tokens < 1:
        raise RequestError("max_new_tokens must be at least 1")
    if not prompts:
        raise RequestError("no prompts")
    requests = [Request(str(i), [int(t) for t in p],
                        SamplingParams(max_new_tokens, sampler.temperature, sampler.top_p,
                                       sampler.seed, ignore_eos=True))
                for i, p in enumerate(prompts)]
    max_model_len = max(len(p) for p in prompts) + max_new_tokens
    for req in requests:  # on every rank, before any step: all fail together
        check_request(req, vocab, max_model_len)
    n, bs = len(prompts), BLOCK_SIZE
    replica_of = offline_replicas(n, layout.dp)
    per_replica = [sum(len(p) for p, r in zip(prompts, replica_of, strict=True) if r == d)
                   for d in range(layout.dp)]
    budget = max(-(-max(per_replica) // max(1, prefill_chunks)), -(-n // layout.dp))
    options = EngineOptions(
        block_size=bs,
        kv_cache_tokens=bs * sum(blocks_for(len(p) + max_new_tokens, bs) for p in prompts),
        max_num_batched_tokens=budget, max_num_seqs=n,
        max_model_len=max_model_len,
        eos_token_ids=[], enable_prefix_caching=not keep_logits,
        micro_batches=decode_microbatches or 1, keep_logits=keep_logits, reserve=True)
    engine = ServeEngine(model.comms, model.source, options, model=model)
    model.decode_steps = max_new_tokens - 1
    model.n_seqs = replica_of.count(model.comms.coords.dp)  # this replica's
    barrier(model.comms.world)  # every rank starts the clock together
    t0, timing = time.perf_counter(), {}
    tokens = generate_offline(engine, requests, timing)
    if tokens is None:
        return None
    t_end, t_first = time.perf_counter(), timing["first_tokens_s"]
    gen = Generation(tokens=np.array(tokens, dtype=np.int64), ttft_s=t_first - t0,
                     decode_s=t_end - t_first)
    if keep_logits:  # rows by position: prompt rows, then the rows that chose each token
        rows = [engine.logit_rows[str(i)] for i in range(n)]
        gen.prompt_logits = pad_prompt_logits(
            [np.stack([r[j] for j in range(len(p))])
             for r, p in zip(rows, prompts, strict=True)], vocab)
        gen.decode_logits = np.stack([
            np.stack([r[len(p) - 1 + s] for s in range(max_new_tokens)])
            for r, p in zip(rows, prompts, strict=True)])
    return gen


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
