"""programs/serve.py as a user runs it: ``mpirun -n 2|4 python programs/serve.py ...``.

Launcher tests (rank 0 only): each starts the server through mpipar/launch.py on a free
loopback port (mpipar/bench/job.py), waits for /health, and always ends the job. Against
the real engine over MPI: the official ``openai`` client (completions, streaming, chat
through a chat template) and ``curl``; greedy tokens of many concurrent clients, with a
KV pool small enough that requests queue, equal the single-process reference of each
prompt alone; bad requests are a 400 and the server keeps serving; the API key; SIGTERM
ends every rank with exit 0 within 10 s; a rank that dies ends the job; bad flags and a
taken port end every rank with exit 2 and one message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mpipar.launch import run_mpi

pytestmark = pytest.mark.launcher

sys.path.insert(0, os.path.dirname(__file__))
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from mpipar.bench.job import PROGRAM, ServerJob  # noqa: E402

SMALL_POOL = ["--kv-cache-tokens", "256", "--block-size", "16", "--max-model-len", "128",
              "--max-num-seqs", "4", "--max-num-batched-tokens", "48"]


def fixtures():
    from conftest import FIXTURES
    if not os.path.isdir(FIXTURES):
        pytest.skip(f"fixtures folder not found: {FIXTURES} (set MPIPAR_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from serve_standin import make_text_model
    return make_text_model(os.path.join(fixtures(), "qwen3-tiny"),
                           str(tmp_path_factory.mktemp("text-model")))


@pytest.fixture(scope="module")
def tp2(text_model):
    with ServerJob(2, ["--model", text_model, "--tp", "2", "--served-model-name", "tiny",
                       *SMALL_POOL]) as job:
        yield job
        code = job.stop(signal.SIGINT)  # Ctrl-C: mpirun forwards it to every rank
        assert code == 0 and job.stop_s < 10, (code, job.stop_s, job.output()[-3000:])


def client(job, key="none"):
    return openai.OpenAI(base_url=job.url + "/v1", api_key=key, max_retries=0, timeout=60)


def reference(model_dir, prompts, n):
    from mpipar.model.init import open_model
    from mpipar.model.reference import ReferenceModel, generate
    model = ReferenceModel(open_model(model_dir))
    return [generate(model, [p], k, keep_logits=False).tokens[0].tolist()
            for p, k in zip(prompts, n, strict=True)]


def concurrent_completions(job, model, prompts, lens, key="none"):
    """One client thread per prompt, started a little apart (they join a running batch)."""
    got = [None] * len(prompts)

    def ask(i):
        r = client(job, key).completions.create(
            model=model, prompt=prompts[i], max_tokens=lens[i], temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True})
        got[i] = r.choices[0].token_ids
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(120)
    return got


def prompts_and_lens(seed, n, vocab):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, size=int(k)).tolist() for k in rng.integers(1, 60, n)]
    return prompts, [int(k) for k in rng.integers(1, 24, n)]


def test_concurrent_clients_equal_reference(tp2, text_model):
    prompts, lens = prompts_and_lens(3, 10, 256)
    assert concurrent_completions(tp2, "tiny", prompts, lens) == \
        reference(text_model, prompts, lens)


def test_openai_client_text_stream_and_chat(tp2, text_model):
    from mpipar.model.tokenizer import load_tokenizer
    tok, c = load_tokenizer(text_model), client(tp2)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="The pipeline", max_tokens=8,
                             temperature=0, extra_body={"return_token_ids": True})
    ids = tok.encode("The pipeline")
    assert r.choices[0].token_ids == reference(text_model, [ids], [8])[0]
    assert r.choices[0].text == tok.decode(r.choices[0].token_ids)
    chunks = list(c.completions.create(model="tiny", prompt="The pipeline", max_tokens=8,
                                       temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    sampled = [c.completions.create(model="tiny", prompt=[4, 2], max_tokens=12, seed=seed,
                                    temperature=1.0, extra_body={"return_token_ids": True})
               .choices[0].token_ids for seed in (11, 11, 12)]
    assert sampled[0] == sampled[1] != sampled[2]  # a seed fixes the draw
    msgs = [{"role": "user", "content": "Split me over two ranks."}]
    chat = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6,
                                     temperature=0, extra_body={"return_token_ids": True})
    ids = chat.model_extra["prompt_token_ids"]
    assert tok.decode(ids).startswith("user\nSplit me")  # specials are skipped in decode
    assert chat.choices[0].model_extra["token_ids"] == reference(text_model, [ids], [6])[0]
    assert chat.usage.prompt_tokens == len(ids) and chat.usage.completion_tokens == 6


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_stream_and_bad_requests(tp2):
    def curl(body, *extra):
        out = subprocess.run(["curl", "-sS", "-N", "-w", "\n%{http_code}", *extra,
                              tp2.url + "/v1/completions", "-H",
                              "Content-Type: application/json", "-d", body],
                             capture_output=True, text=True, timeout=60)
        text, _, code = out.stdout.rpartition("\n")
        return int(code), text
    code, text = curl(json.dumps({"prompt": [3, 1, 4, 1, 5], "max_tokens": 5, "stream": True,
                                  "temperature": 0, "return_token_ids": True}))
    events = [ln for ln in text.splitlines() if ln]
    assert code == 200 and events[-1] == "data: [DONE]", text
    got = sum((json.loads(e[6:])["choices"][0]["token_ids"] for e in events[:-1]), [])
    assert len(got) == 5
    for body in ('{"prompt": [1, 2, 9999]}', '{"prompt": [1], "max_tokens": -3}',
                 '{"prompt": [1], "max_tokens": "8"}', '{"prompt": [1] , ',
                 json.dumps({"prompt": [1] * 120, "max_tokens": 30})):
        code, text = curl(body)
        assert code == 400, (body, text)
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    code, text = curl(json.dumps({"prompt": [3, 1, 4, 1, 5], "max_tokens": 5,
                                  "temperature": 0, "return_token_ids": True}))
    assert code == 200 and json.loads(text)["choices"][0]["token_ids"] == got


def test_metrics_after_requests(tp2):
    client(tp2).completions.create(model="tiny", prompt=[7, 7, 7], max_tokens=4)
    import urllib.request
    text = urllib.request.urlopen(tp2.url + "/metrics", timeout=10).read().decode()
    total = re.search(r"^mpipar:kv_blocks_total\{[^}]*\} (\S+)", text, re.M)
    assert total and float(total.group(1)) == 256 / 16, text[:2000]
    assert re.search(r"^mpipar:e2e_request_latency_seconds_count\{[^}]*\} [1-9]", text, re.M)


def metrics(job, key) -> str:
    """The /metrics lines of running requests that are not zero ('' if none)."""
    import urllib.request
    req = urllib.request.Request(job.url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    return "\n".join(ln for ln in text.splitlines()
                     if ln.startswith("mpipar:num_requests_running") and not ln.endswith(" 0.0"))


def cpu_seconds(pids) -> float:
    """User + system CPU seconds of these processes so far (/proc/PID/stat)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def test_four_ranks_pp_tp_api_key_idle_and_sigterm():
    model = os.path.join(fixtures(), "qwen3-moe-tiny")
    job = ServerJob(4, ["--model", model, "--tensor-parallel-size", "2",
                        "--pipeline-parallel-size", "2", *SMALL_POOL],
                    env={"MPIPAR_API_KEY": "k3y"})
    with job:
        with pytest.raises(openai.AuthenticationError):
            client(job, "wrong").models.list()
        assert job.health() == 200  # /health wants no key
        prompts, lens = prompts_and_lens(5, 8, 256)
        assert concurrent_completions(job, model, prompts, lens, key="k3y") == \
            reference(model, prompts, lens)
        ranks = {pid: r for pid, r in job.pids().items() if r is not None}
        assert sorted(ranks.values()) == [0, 1, 2, 3]
        busy = cpu_seconds(ranks)
        time.sleep(2.0)
        idle_cores = (cpu_seconds(ranks) - busy) / 2.0
        assert idle_cores < 0.25, f"an idle server keeps {idle_cores:.2f} cores busy"
        from mpipar.bench.loadgen import stream_one
        streamed = []  # a long request still streaming when SIGTERM comes
        t = threading.Thread(target=lambda: streamed.append(stream_one(
            job.url, [5] * 10, 115, {"Authorization": "Bearer k3y"})))
        t.start()
        t_end = time.monotonic() + 30
        while "mpipar:num_requests_running" not in metrics(job, "k3y") and \
                time.monotonic() < t_end:
            time.sleep(0.1)
        code = job.stop(signal.SIGTERM)
        t.join(10)
        assert code == 0 and job.stop_s < 10, (code, job.stop_s, job.output()[-3000:])
        assert streamed and "shutting down" in str(streamed[0]["error"]), streamed
        assert job.pids() == {}, "processes outlived mpirun"
    assert "mpipar serve: stopped" in job.output()


def test_all_interfaces_warning_and_a_dead_rank_ends_the_job(text_model):
    with ServerJob(2, ["--model", text_model, "--tp", "2", "--host", "0.0.0.0"]) as job:
        assert "warning: listening on all interfaces" in job.output()
        assert f"listening on http://{socket.gethostname()}:" in job.output()
        ranks = {rank: pid for pid, rank in job.pids().items() if rank is not None}
        assert sorted(ranks) == [0, 1], job.pids()
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.monotonic()
        try:
            code = job.proc.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        assert code not in (None, 0), f"mpirun still running or exit 0: {code}"
        assert time.monotonic() - t0 < 20


def test_bad_flags_and_taken_port_exit_2_with_one_message(text_model):
    for args, says in ((["--model", text_model, "--tp", "3"], "tp*dp*pp"),
                       (["--model", text_model, "--bogus"], "unrecognized arguments"),
                       (["--model", text_model, "--tp", "2", "--kv-cache-tokens", "32"],
                        "too few")):
        out = run_mpi(2, [PROGRAM, *args], timeout=60)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if "error:" in ln]
        assert out.returncode == 2 and len(errors) == 1 and says in errors[0], \
            (args, out.returncode, out.stdout, out.stderr)
    out = run_mpi(2, [PROGRAM, "--help"], timeout=60)
    assert out.returncode == 0 and out.stdout.count("usage: serve.py") == 1, out.stdout
    assert "--tensor-parallel-size" in out.stdout
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        out = run_mpi(2, [PROGRAM, "--model", text_model, "--tp", "2", "--port", port],
                      timeout=60)
    errors = [ln for ln in (out.stdout + out.stderr).splitlines() if "error:" in ln]
    assert out.returncode == 2 and len(errors) == 1 and "cannot listen" in errors[0], \
        (out.stdout, out.stderr)


def test_bench_serve_quick(tmp_path):
    """programs/bench_serve.py --quick: offline rows, an online row, the JSON it promises."""
    from mpipar.launch import clean_env
    out = tmp_path / "serve.json"
    bench = os.path.join(os.path.dirname(PROGRAM), "bench_serve.py")
    proc = subprocess.run([sys.executable, bench, "--quick", "--layouts", "tp1",
                           "--rate-factors", "0.5", "--json", str(out)], env=clean_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert [(r["layout"], r["workload"]) for r in records] == \
        [("tp1", "offline"), ("tp1", "poisson")]
    for r in records:
        for key in ("impl", "requests", "output_tokens", "seconds", "output_tokens_per_s"):
            assert key in r, (key, r)
        assert r["output_tokens"] > 0 and r["output_tokens_per_s"] > 0
    assert records[0]["roofline_output_tokens_per_s"] > 0
    online = records[1]
    assert online["completed"] == online["requests"] and online["failed"] == 0
    assert online["ttft"]["p99_ms"] >= online["ttft"]["median_ms"] > 0
    assert " impl " in proc.stdout and "poisson" in proc.stdout
