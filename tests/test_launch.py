"""The program under its own mpirun: 4, 8 and 16 ranks, bad layouts, a failing rank.

These tests start ``mpirun -n N python programs/transformer.py ...`` themselves, so they
run on world rank 0 only (``launcher``). Each run checks itself against the
single-process reference (``--check``) and writes its JSON, which is read back here.
"""

import json
import os
import time

import pytest

from mpipar.launch import run_mpi

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROGRAM = os.path.join(ROOT, "programs", "transformer.py")
pytestmark = pytest.mark.launcher


def run_program(n, args, tmp_path, timeout=240, env=None):
    out = tmp_path / f"run{time.monotonic_ns()}.json"
    proc = run_mpi(n, [PROGRAM, *args, "--json", str(out)], timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def fixture_args(fixtures_dir, name):
    folder = os.path.join(fixtures_dir, name)
    ref = json.load(open(os.path.join(folder, "ref.json")))
    ids = ",".join(map(str, ref["prompt_a"]))
    return ["--model", folder, "--prompt-ids", ids, "--max-new-tokens", "8"], ref


@pytest.mark.parametrize("name, layout", [
    ("qwen3-tiny", "--tp 2 --pp 2 --prefill-chunks 4"),
    ("qwen3-tiny", "--dp 2 --pp 2"),
    ("qwen3-moe-tiny", "--tp 2 --dp 2 --ep 4 --prefill-chunks 3"),
    ("qwen3-moe-tiny", "--pp 4 --prefill-chunks 6"),
    ("qwen3-moe-tiny", "--tp 2 --dp 2 --ep 4 --redundant-experts 4 --eplb-window 2"),
])
def test_four_ranks_on_fixtures(fixtures_dir, tmp_path, name, layout):
    args, ref = fixture_args(fixtures_dir, name)
    rec, out = run_program(4, [*args, *layout.split(), "--check"], tmp_path)
    assert rec["tokens"] == [ref["greedy_generate"]]
    assert rec["check"] == "pass"
    assert "ledger equals the cost model" in out


@pytest.mark.slow
@pytest.mark.parametrize("n, layout, model", [
    (8, "--tp 2 --pp 2 --dp 2 --ep 4 --prefill-chunks 2", None),
    (8, "--tp 8", None),
    (8, "--tp 4 --pp 2 --ep 4", "qwen3-moe-tiny"),
    (16, "--tp 4 --pp 4", None),
    (16, "--tp 4 --pp 4", "qwen3-moe-tiny"),
    (16, "--tp 4 --pp 2 --dp 2 --ep 8", None),
    (16, "--tp 4 --pp 2 --dp 2 --ep 8 --prefill-chunks 3", "qwen3-moe-tiny"),
])
def test_many_ranks(fixtures_dir, tmp_path, n, layout, model):
    args = fixture_args(fixtures_dir, model)[0] if model else []
    rec, out = run_program(n, [*args, *layout.split()], tmp_path, timeout=400)
    assert rec["check"] == "pass"
    assert rec["layout"]["world"] == n
    ledger = rec["ledger"]
    for kind in ("tp_allreduce", "pp_send", "ep_counts", "ep_dispatch", "ep_combine"):
        if kind in ledger:
            assert ledger[kind]["measured_bytes"] == ledger[kind]["predicted_bytes"], kind
    if "--ep 8" in layout:  # every rank takes part in dispatch, prompts or not
        assert all(b > 0 for b in ledger["ep_counts"]["measured_bytes"])
        assert sum(ledger["ep_dispatch"]["measured_bytes"]) > 0


@pytest.mark.parametrize("n, args, message", [
    (4, ["--tp", "3"], "tp*dp*pp = 3*1*1 = 3 ranks, but the job has 4"),
    (4, ["--tp", "2", "--ep", "3"], "ep=3 must divide tp*dp"),
    (4, ["--tp", "4", "--ep", "4", "--preset", "bench-166m"], "dense"),
    (4, ["--pp", "4", "--model", "/nonexistent/model"], "/nonexistent/model"),
    (2, ["--tp", "2", "--max-new-tokens", "0"], "--max-new-tokens"),
    (2, ["--tp", "2", "--ep", "2", "--redundant-experts", "1"], "do not divide by ep=2"),
    (2, ["--tp", "2", "--redundant-experts", "2", "--preset", "bench-166m"], "dense"),
])
def test_bad_input_one_message_quick_exit(n, args, message):
    t = time.monotonic()
    proc = run_mpi(n, [PROGRAM, *args], timeout=60)
    took = time.monotonic() - t
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr
    assert message in errors[0]
    assert "Traceback" not in proc.stderr
    assert took < 30


def test_exception_on_one_rank_ends_the_job():
    t = time.monotonic()
    proc = run_mpi(4, [PROGRAM, "--tp", "2", "--pp", "2"], timeout=60,
                   env={"MPIPAR_FAIL_RANK": "2"})
    assert proc.returncode != 0
    assert "injected failure" in proc.stderr
    assert time.monotonic() - t < 30
