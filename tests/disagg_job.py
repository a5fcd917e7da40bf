"""``mpirun -n N python tests/disagg_job.py CASES.json OUT.json``: disaggregated serving
cases, one after the other, each on the first ranks of the world (the others sleep).

Per case: a DisaggEngine on ``world.Split``; requests arrive over several steps (some
while others decode), prompts long enough to be chunked; rank 0 compares every request's
tokens with the single-process reference run of it alone, and every rank's ledger
``kv_transfer`` sent/received bytes with the re-shard rule's prediction. OUT.json gets
one record per case (tests/test_disagg.py asserts on them).
"""

import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
from mpi4py import MPI

import mpipar  # noqa: F401
from mpipar.comm.group import Group
from mpipar.comm.ledger import Ledger
from mpipar.cost.traffic import predict_rank
from mpipar.layout import DisaggComms, connect_group, parse_groups
from mpipar.model.checkpoint import CheckpointReader
from mpipar.model.reference import ReferenceModel, generate
from mpipar.model.sampling import Sampler
from mpipar.serve.disagg import DisaggEngine
from mpipar.serve.options import EngineOptions
from mpipar.serve.request import Request, SamplingParams
from mpipar.trace import write_trace


def sleepy_barrier(comm):
    req, delay = comm.Ibarrier(), 1e-4
    while not req.Test():
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def workload(vocab, n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = [int(t) for t in rng.integers(0, vocab, int(rng.integers(3, 40)))]
        out.append((i // 2, Request(str(i), prompt, SamplingParams(
            max_tokens=int(rng.integers(2, 9)), ignore_eos=True))))
    return out


def run_case(world, case):
    layout = parse_groups(case["prefill"], case["decode"])
    source = CheckpointReader(case["model"])
    ledger = Ledger(trace=bool(case.get("trace")))
    comms = DisaggComms(Group(world, "world", ledger), connect_group(layout, world, ledger))
    options = EngineOptions(block_size=4, kv_cache_tokens=case.get("kv", 256),
                            max_num_batched_tokens=12, max_num_seqs=8, max_model_len=48,
                            eos_token_ids=[])
    engine = DisaggEngine(comms, layout, source, options, case.get("decode_kv"))
    requests = workload(source.config.vocab_size, case.get("requests", 10), case.get("seed", 0))
    rec = None
    if world.Get_rank() == 0:
        timings = []
        engine.on_timing = lambda rid, t: timings.append(t)
        tokens = {r.request_id: [] for _, r in requests}
        reasons, abort_after_first = {}, set(case.get("abort_after_first", ()))
        pending, step = list(requests), 0
        while pending or engine.has_unfinished():
            while pending and pending[0][0] <= step:
                engine.add_request(pending.pop(0)[1])
            for o in engine.step():
                tokens[o.request_id] += o.new_token_ids
                if o.finished:
                    reasons[o.request_id] = o.finish_reason
                elif o.request_id in abort_after_first:  # now in the handoff
                    engine.abort(o.request_id)
            step += 1
        stats = engine.stats()
        engine.shutdown()
        ref = ReferenceModel(source)
        want = [[int(t) for t in generate(ref, [r.prompt_ids], r.params.max_tokens,
                                          Sampler(), keep_logits=False).tokens[0]]
                for _, r in requests]
        got = [tokens[r.request_id] for _, r in requests]
        for i, (_, r) in enumerate(requests):  # aborted: their first token, then nothing
            if r.request_id in abort_after_first:
                want[i] = want[i][:1]
        rec = {"case": case, "tokens_equal": got == want, "got": got, "want": want,
               "reasons": [reasons[r.request_id] for _, r in requests],
               "stats": stats, "timings": timings,
               "prompt_tokens": sum(len(r.prompt_ids) for _, r in requests)}
    else:
        engine.run_worker()
    report = engine.report()
    # Each group's own model traffic (TP, PP, EP) against the cost model, on its layout.
    group_report = engine.model.report()  # collective inside the group
    wrong = []
    if engine.comms.world.rank == 0:
        for r in group_report:
            for kind, want in predict_rank(source.config, engine.comms.layout, r).items():
                got = r["ledger"].get(kind, {}).get("sent_bytes", 0)
                if got != want:
                    wrong.append((engine.prefill, r["rank"], kind, got, want))
    wrong = sum(world.gather(wrong, root=0) or [], [])
    if case.get("trace"):  # a Chrome trace of the job: the transfers as spans, both sides
        write_trace(case["trace"], SimpleNamespace(world=comms.world,
                                                   coords=comms.group.coords), ledger)
    if rec is not None:
        rec["ledger"] = [{"rank": r["rank"], "prefill": r["prefill"],
                          "kv": r["ledger"].get("kv_transfer", {}),
                          "kv_predicted": r["kv_predicted"]} for r in report]
        rec["model_traffic_mismatches"] = wrong
        rec["model_kinds_seen"] = sorted({k for r in report for k in r["ledger"]})
    return rec


def main():
    cases = json.load(open(sys.argv[1]))
    world = MPI.COMM_WORLD
    records = []
    for case in cases:
        n = parse_groups(case["prefill"], case["decode"]).world
        inside = world.Get_rank() < n
        sub = world.Split(0 if inside else 1, world.Get_rank())
        if inside:
            records.append(run_case(sub, case))
        sub.Free()
        sleepy_barrier(world)
    if world.Get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(records, f)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
