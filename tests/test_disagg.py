"""Prefill/decode disaggregation: the re-shard rule (pure), the group specs, and a
launcher job of 6 ranks that serves concurrent requests through six (prefill, decode)
pairs and compares every token with the single-process reference and every rank's
``kv_transfer`` bytes with the rule's prediction (tests/disagg_job.py)."""

import itertools
import json
import os

import pytest

from mpipar.cost.memory import kv_bytes
from mpipar.cost.traffic import piece_bytes_by_rank
from mpipar.layout import Layout, LayoutError, parse_groups
from mpipar.model.config import get_preset
from mpipar.parallel.reshard import kv_pieces
from mpipar.parallel.shard import rank_shard

HERE = os.path.dirname(os.path.abspath(__file__))


def _pairs(config):
    kv = config.num_kv_heads
    tps = [t for t in (1, 2, 4, 8, 16) if kv % t == 0 or t % kv == 0]
    for t1, p1, t2, d2 in itertools.product(tps, (1, 2, 4), tps, (1, 2)):
        yield Layout(tp=t1, pp=p1), Layout(tp=t2, dp=d2)


@pytest.mark.parametrize("preset", ["builtin-moe", "qwen3-30b-a3b"])  # 8 and 4 kv heads
def test_pieces_give_each_decode_rank_its_heads_once_from_a_holder(preset):
    c = get_preset(preset)
    for pre, dec in _pairs(c):
        base = dec.world
        for d in range(dec.dp):
            pieces = kv_pieces(c, pre, dec, d, base, 0)
            for t2 in range(dec.tp):
                dst = dec.rank_of(tp=t2, dp=d)
                got = sorted((layer, h) for p in pieces if p.dst == dst
                             for layer in p.layers for h in p.heads)
                want = sorted(itertools.product(range(c.num_layers),
                                                rank_shard(c, dec, dst).kv_heads))
                assert got == want, (pre, dec, t2)
            for p in pieces:  # the sender holds what it sends
                shard = rank_shard(c, pre, p.src - base)
                assert set(p.layers) <= set(shard.layers), p
                assert set(p.heads) <= set(shard.kv_heads), p
                if shard.kv_replication > 1:  # replicated: the first holder sends
                    assert (p.src - base) % pre.tp % shard.kv_replication == 0, p
            dup = max(1, dec.tp // c.num_kv_heads)
            by_rank = piece_bytes_by_rank(pieces, c, 37, 2)
            total = kv_bytes(c.num_layers, c.num_kv_heads, c.head_dim, 37, 2)
            assert sum(s for s, _ in by_rank.values()) == total * dup
            assert sum(r for _, r in by_rank.values()) == total * dup


def test_group_specs():
    g = parse_groups("tp=2,pp=2", "tp=2,dp=2,ep=4")
    assert (g.prefill, g.decode, g.world, g.prefill_base) == (
        Layout(tp=2, pp=2), Layout(tp=2, dp=2, ep=4), 8, 4)
    assert [g.is_prefill(r) for r in range(8)] == [False] * 4 + [True] * 4
    assert "prefill tp=2 pp=2" in g.describe()
    for pre, dec, msg in (("tp=2,dp=2", "tp=1", "KEY in tp, pp, ep"),
                          ("tp=1", "tp=1,pp=2", "KEY in tp, dp, ep"),
                          ("tp=x", "tp=1", "not an integer"), ("tp=0", "tp=1", "positive"),
                          ("tp=1,tp=2", "tp=1", "twice"), ("tp=1", "tp=1,ep=3", "divide")):
        with pytest.raises(LayoutError, match=msg):
            parse_groups(pre, dec)
    with pytest.raises(LayoutError, match="3 in all, but the job has 4"):
        parse_groups("tp=2", "tp=1").check_world(4)


@pytest.mark.launcher
def test_six_pairs_match_the_reference_and_the_kv_bytes(tmp_path, fixtures_dir):
    from mpipar.launch import run_mpi
    tiny, moe = (os.path.join(fixtures_dir, n) for n in ("qwen3-tiny", "qwen3-moe-tiny"))
    cases = [
        {"model": tiny, "prefill": "tp=1", "decode": "tp=1"},
        {"model": tiny, "prefill": "tp=1,pp=2", "decode": "tp=2",
         "trace": str(tmp_path / "trace.json")},
        {"model": tiny, "prefill": "tp=2", "decode": "tp=1", "abort_after_first": ["3", "6"]},
        {"model": moe, "prefill": "tp=2", "decode": "tp=2,ep=2"},
        {"model": tiny, "prefill": "tp=2", "decode": "tp=4"},  # 2 kv heads: replicated
        {"model": tiny, "prefill": "tp=1,pp=2", "decode": "tp=1", "decode_kv": 48,
         "requests": 8},  # one request at a time fits the decode pool
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "out.json"
    proc = run_mpi(6, [os.path.join(HERE, "disagg_job.py"), str(tmp_path / "cases.json"),
                       str(out)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert len(records) == len(cases)
    for rec in records:
        name = f"{rec['case']['prefill']} -> {rec['case']['decode']}"
        assert rec["tokens_equal"], (name, rec["got"], rec["want"])
        s = rec["stats"]
        aborted = rec["case"].get("abort_after_first", [])
        assert [i for i, r in enumerate(rec["reasons"]) if r == "abort"] == \
            [int(i) for i in aborted], (name, rec["reasons"])
        assert s["kv_blocks_used"] == 0 and s["running"] == s["waiting"] == 0, (name, s)
        assert s["kv_transfers"] >= len(rec["got"]) - len(aborted), (name, s)
        assert s["decode_num_preemptions"] == 0, (name, s)
        assert rec["model_traffic_mismatches"] == [], (name, rec["model_traffic_mismatches"])
        for r in rec["ledger"]:
            got = [r["kv"].get("sent_bytes", 0), r["kv"].get("recv_bytes", 0)]
            assert got == r["kv_predicted"], (name, r)
            assert (got[0] > 0) == r["prefill"] and (got[1] > 0) != r["prefill"], (name, r)
        itemsize, c = 4, {"layers": 4, "kv": 2, "d": 16}
        total = kv_bytes(c["layers"], c["kv"], c["d"], rec["prompt_tokens"], itemsize)
        dup = 2 if rec["case"]["decode"] == "tp=4" else 1
        assert sum(r["kv"].get("sent_bytes", 0) for r in rec["ledger"]) == total * dup, name
        assert all(set(t) == {"queue", "prefill", "handoff_wait", "transfer", "first_decode"}
                   for t in rec["timings"] if len(t) == 5) and rec["timings"], name
    assert records[-1]["stats"]["handoff_waits"] > 0, records[-1]["stats"]
    spans = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
             if e.get("name") == "kv_transfer"]  # one per piece on its sender and receiver
    assert sorted({e["pid"] for e in spans}) == [0, 1, 2, 3], spans[:4]
    assert len(spans) == 2 * 4 * len(records[1]["got"])  # 4 pieces a request


@pytest.mark.launcher
def test_disaggregated_server_serves_concurrent_requests_exactly(fixtures_dir):
    """programs/serve.py --prefill tp=2 --decode tp=1 (3 ranks): concurrent completions
    equal the reference; /metrics has every request's phases."""
    import threading
    import urllib.request

    import numpy as np

    from mpipar.bench.job import ServerJob
    from mpipar.model.checkpoint import CheckpointReader
    from mpipar.model.reference import ReferenceModel, generate
    from mpipar.model.sampling import Sampler
    tiny = os.path.join(fixtures_dir, "qwen3-tiny")
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (5, 40, 17, 64, 9, 33)]
    ref = ReferenceModel(CheckpointReader(tiny))
    want = [generate(ref, [p], 7, Sampler(), keep_logits=False).tokens[0].tolist()
            for p in prompts]
    got = [None] * len(prompts)
    with ServerJob(3, ["--model", tiny, "--prefill", "tp=2", "--decode", "tp=1",
                       "--max-model-len", "128", "--kv-cache-tokens", "256",
                       "--max-num-batched-tokens", "24"]) as job:
        def ask(i):
            body = json.dumps({"prompt": prompts[i], "max_tokens": 7, "temperature": 0,
                               "ignore_eos": True, "return_token_ids": True}).encode()
            req = urllib.request.Request(job.url + "/v1/completions", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                got[i] = json.loads(r.read())["choices"][0]["token_ids"]
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        with urllib.request.urlopen(job.url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
    assert got == want, (got, want)
    for phase in ("queue", "prefill", "handoff_wait", "transfer", "first_decode"):
        line = next(ln for ln in metrics.splitlines()
                    if ln.startswith("mpipar:disagg_phase_seconds_count") and
                    f'phase="{phase}"' in ln)
        assert float(line.rsplit(" ", 1)[1]) == len(prompts), line
    assert job.returncode == 0, job.output()[-2000:]


@pytest.mark.launcher
def test_bad_group_flags_exit_2_with_one_message(fixtures_dir):
    from mpipar.launch import run_mpi
    program = os.path.join(HERE, "..", "programs", "serve.py")
    tiny = os.path.join(fixtures_dir, "qwen3-tiny")
    for args, says in ((["--prefill", "tp=2", "--decode", "tp=1"], "3 in all, but the job has 2"),):
        out = run_mpi(2, [program, "--model", tiny, *args], timeout=60)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if "error:" in ln]
        assert out.returncode == 2 and len(errors) == 1 and says in errors[0], \
            (args, out.returncode, out.stdout, out.stderr)


@pytest.mark.launcher
def test_bench_disagg_quick(tmp_path):
    """programs/bench_disagg.py --quick: a dp2 and a disagg-1p1d Poisson record with the
    fields the issue asks for; the handoff bytes measured equal the predicted."""
    import subprocess
    import sys

    from mpipar.launch import clean_env
    out = tmp_path / "disagg.json"
    bench = os.path.join(HERE, "..", "programs", "bench_disagg.py")
    proc = subprocess.run([sys.executable, bench, "--quick", "--requests", "4", "--json",
                           str(out)],
                          env=clean_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    records = data["records"]
    assert [(r["layout"], r["workload"]) for r in records] == [
        ("dp2", "poisson"), ("disagg-1p1d", "poisson")]
    for r in records:
        assert r["completed"] == r["requests"] and r["failed"] == 0, r
        for key in ("ttft_p99_s", "tpot_p99_s", "itl_p99_s", "goodput_rps"):
            assert r[key] > 0, (key, r)
    d = records[1]
    assert d["kv_bytes_per_request_measured"] == d["kv_bytes_per_request_predicted"] == \
        data["kv_bytes_per_request_formula"] > 0
    assert set(d["phases_mean_s"]) == {"queue", "prefill", "handoff_wait", "transfer",
                                       "first_decode"}
