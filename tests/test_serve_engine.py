"""The serving engine against the single-process reference, in every layout of this world.

Requests of different lengths arrive over several steps while others decode; the KV
pool is small enough to queue and preempt, the token budget cuts prompts into chunks,
and some requests share a long prefix. Every request's tokens must equal the reference
run of that request alone (greedy, one seeded temperature request, one stop id), and
every rank's ledger must equal the cost model's prediction.
"""

import itertools
import os
import time

import numpy as np
import pytest
from test_engine import check_ledger, on_rank0

from mpipar.layout import Layout, make_comms
from mpipar.model.checkpoint import CheckpointReader
from mpipar.model.reference import ReferenceModel, generate
from mpipar.model.sampling import Sampler
from mpipar.serve.engine import ServeEngine
from mpipar.serve.offline import generate_offline
from mpipar.serve.options import EngineOptions
from mpipar.serve.request import Request, RequestError, SamplingParams

OPTIONS = dict(block_size=4, kv_cache_tokens=48, max_num_batched_tokens=12,
               max_num_seqs=4, max_model_len=40, eos_token_ids=[])


def serve_layouts(world_size, n_experts):
    """Every tp*pp*dp = world; on a MoE model the largest ep the layout allows."""
    for tp, pp in itertools.product(range(1, world_size + 1), repeat=2):
        if world_size % (tp * pp):
            continue
        dp = world_size // (tp * pp)
        ep = max(e for e in range(1, tp * dp + 1)
                 if (tp * dp) % e == 0 and (e == 1 or (n_experts and n_experts % e == 0)))
        yield Layout(tp=tp, pp=pp, dp=dp, ep=ep)


def workload(vocab):
    """(arrival step, request) pairs: short and long prompts, a shared 20-token prefix."""
    rng = np.random.default_rng(5)

    def ids(n):
        return [int(t) for t in rng.integers(0, vocab, n)]

    prefix = ids(20)
    greedy = SamplingParams
    items = [
        (0, ids(13), greedy(max_tokens=6)),
        (0, prefix + ids(3), greedy(max_tokens=5)),
        (1, ids(3), greedy(max_tokens=8)),
        (2, prefix + ids(5), greedy(max_tokens=4)),
        (2, ids(30), greedy(max_tokens=3)),
        (4, prefix + ids(1), greedy(max_tokens=6)),
        (5, ids(9), SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9, seed=3)),
        (6, ids(5), greedy(max_tokens=8)),
        (7, prefix + ids(2), greedy(max_tokens=3)),
    ]
    return [(step, Request(str(i), prompt, params)) for i, (step, prompt, params)
            in enumerate(items)]


def reference_tokens(source, requests):
    """Each request alone through the reference; the last one stops at its 3rd token."""
    model = ReferenceModel(source)
    out = []
    for _, req in requests:
        p = req.params
        gen = generate(model, [req.prompt_ids], p.max_tokens,
                       Sampler(p.temperature, p.top_p, p.seed or 0), keep_logits=False)
        out.append([int(t) for t in gen.tokens[0]])
    stop = out[-2][2]  # request 7 gets a stop id: its 3rd token (first time it appears)
    requests[-2][1].params.stop_token_ids = [stop]
    out[-2] = out[-2][:out[-2].index(stop) + 1]
    return out


def serve(engine, requests):
    """Rank 0: add requests at their arrival steps, step until all are done."""
    tokens = {r.request_id: [] for _, r in requests}
    reasons = {}
    step = 0
    pending = list(requests)
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            engine.add_request(pending.pop(0)[1])
        if engine.has_unfinished():
            for o in engine.step():
                tokens[o.request_id] += o.new_token_ids
                if o.finished:
                    reasons[o.request_id] = o.finish_reason
        step += 1
    engine.shutdown()
    return [tokens[r.request_id] for _, r in requests], [reasons[r.request_id]
                                                          for _, r in requests]


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3-moe-tiny"])
def test_concurrent_requests_match_the_reference_alone(world, fixtures_dir, name):
    source = CheckpointReader(os.path.join(fixtures_dir, name))
    config = source.config
    requests = workload(config.vocab_size)
    want = reference_tokens(source, requests) if world.Get_rank() == 0 else None
    for layout in serve_layouts(world.Get_size(), config.num_experts):
        comms = make_comms(layout, world)
        engine = ServeEngine(comms, source, EngineOptions(**OPTIONS))
        if world.Get_rank() == 0:
            got, reasons = serve(engine, requests)
            stats = engine.stats()
        else:
            engine.run_worker()
        on_rank0(world, check_ledger, engine.model.report(), layout, config)
        on_rank0(world, check_served, got if world.Get_rank() == 0 else None, want,
                 reasons if world.Get_rank() == 0 else None,
                 stats if world.Get_rank() == 0 else None, layout)


def check_served(got, want, reasons, stats, layout):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, (layout, f"request {i}", g, w)
    assert reasons == ["length"] * 7 + ["stop", "length"], (layout, reasons)
    assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0, stats
    if layout.dp == 1:  # one pool for everyone: it must queue, preempt and share
        assert stats["num_preemptions"] > 0, (layout, stats)
        assert stats["prefix_cache_hit_tokens"] >= 16, (layout, stats)  # 4 shared blocks


def test_bad_requests_are_refused_and_offline_batches_repeat(world, fixtures_dir):
    """RequestError for what the engine cannot serve; generate_offline twice on one
    engine (the pool's cached prefixes carry over) gives the same tokens, seeds included
    (negative ones too); with P stages, P micro-batches were in flight at once."""
    source = CheckpointReader(os.path.join(fixtures_dir, "qwen3-tiny"))
    n = world.Get_size()
    engine = ServeEngine(make_comms(Layout(pp=n), world), source, EngineOptions(**OPTIONS))
    if world.Get_rank() == 0:
        bad = [([], {}), ([1, 256], {}), ([1, -1], {}), ([1] * 30, {"max_tokens": 11}),
               ([1], {"max_tokens": 0}), ([1], {"temperature": -1.0}), ([1], {"top_p": 0.0}),
               ([1], {"temperature": "hot"}), ([1], {"seed": 1.5}), ([1], {"max_tokens": 2.0}),
               ([1], {"stop_token_ids": ["a"]}), ([True], {})]
        for prompt, kw in bad:
            with pytest.raises(RequestError):
                engine.add_request(Request("x", prompt, SamplingParams(**kw)))
        assert not engine.has_unfinished()
    reqs = [Request(str(i), [(7 * i + j) % 256 for j in range(5 + 3 * i)],
                    SamplingParams(max_tokens=4, temperature=0.5 * i, seed=-i)) for i in range(3)]
    first = generate_offline(engine, reqs)
    second = generate_offline(engine, reqs)
    if world.Get_rank() == 0:
        assert first == second and all(len(t) == 4 for t in first)
        assert engine.stats()["prefix_cache_hit_tokens"] > 0
        assert engine.stats()["peak_in_flight"] == min(n, 3)  # a lane per stage (3 requests)
    if world.Get_rank() == 0:  # abort: frees the blocks once nothing of it is in flight
        engine.add_request(Request("a", list(range(1, 30)), SamplingParams(max_tokens=8)))
        engine.step()
        assert engine.stats()["kv_blocks_used"] > 0
        engine.abort("a")
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [
            ("a", True, "abort")]
        assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished()
        time.sleep(0.5)  # the workers wait for a plan meanwhile: they must sleep
        engine.shutdown()
    else:
        cpu = time.process_time()
        engine.run_worker()
        assert time.process_time() - cpu < 0.25  # of 0.5 s idle (spinning would be ~0.5)
    with pytest.raises(ValueError, match="too few"):
        ServeEngine(make_comms(Layout(pp=n), world), source,
                    EngineOptions(**dict(OPTIONS, kv_cache_tokens=36)))
