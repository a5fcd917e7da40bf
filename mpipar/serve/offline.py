"""``ParallelModel.generate``: a batch of prompts as the serving engine's offline case.

Every prompt arrives at t=0 (``engine.generate_offline``). The old generate's knobs map
onto the engine's: ``prefill_chunks`` K gives a token budget of 1/K of the largest
replica's prompt tokens (never fewer than its sequences), so each prompt is spread over
about K steps that follow each other through the pipeline; ``decode_microbatches`` M
gives M lanes of disjoint requests. The pool holds every request whole, reserved at
admission, so each one's blocks are consecutive and attention reads them as views (no
gather, as fast as a contiguous cache); prefix caching is off when logits are kept, so
every prompt row gets its logits.
"""

from __future__ import annotations

import time

import numpy as np

from ..comm.control import barrier
from ..model.sampling import Generation, pad_prompt_logits
from .engine import EngineOptions, ServeEngine, generate_offline
from .kvpool import blocks_for
from .request import Request, SamplingParams

BLOCK_SIZE = 16


def generate_batch(model, prompts, max_new_tokens: int, sampler, prefill_chunks: int,
                   keep_logits: bool, decode_microbatches: int | None):
    """Generation on world rank 0, None elsewhere (collective, same arguments on every rank)."""
    vocab, layout = model.config.vocab_size, model.comms.layout
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if any(not 0 <= int(t) < vocab for p in prompts for t in p):
        raise ValueError(f"token ids must be in [0, {vocab})")
    n, bs = len(prompts), BLOCK_SIZE
    # Replica d gets prompts d, d+dp, ... (the least loaded replica first).
    per_replica = [sum(len(p) for p in prompts[d::layout.dp]) for d in range(layout.dp)]
    budget = max(-(-max(per_replica) // max(1, prefill_chunks)), -(-n // layout.dp))
    options = EngineOptions(
        block_size=bs,
        kv_cache_tokens=bs * sum(blocks_for(len(p) + max_new_tokens, bs) for p in prompts),
        max_num_batched_tokens=budget, max_num_seqs=n,
        max_model_len=max(len(p) for p in prompts) + max_new_tokens,
        eos_token_ids=[], enable_prefix_caching=not keep_logits,
        micro_batches=decode_microbatches or 1, keep_logits=keep_logits, reserve=True)
    engine = ServeEngine(model.comms, model.source, options, model=model)
    model.decode_steps = max_new_tokens - 1
    model.n_seqs = len(prompts[model.comms.coords.dp::layout.dp])  # this replica's
    requests = [Request(str(i), [int(t) for t in p],
                        SamplingParams(max_new_tokens, sampler.temperature, sampler.top_p,
                                       sampler.seed, ignore_eos=True))
                for i, p in enumerate(prompts)]
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
