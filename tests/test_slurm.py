"""slurm/two_node.sh, unchanged, on a real (local) Slurm cluster of two compute nodes.

The batch scripts one_node.sh and two_node.sh are short: #SBATCH lines and a default
layout, then they source slurm/mpipar_job.sh (the shared body) from the checkout,
$MPIPAR_ROOT or else the directory sbatch ran in, since the job runs a spool copy.

The cluster (tests/slurm_cluster.py) is munged + slurmctld + two slurmd on this host,
nodes "n1" and "n2" advertising 64 CPUs and 8 GPUs each, so the script's
``--nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=8`` is granted as
written. Only environment variables (exported into the job by sbatch) make the local
choices: CPU device, this Python, ``srun --mpi=pmi2`` (the PyPI MPICH speaks PMI-2,
not PMIx), and the mpirun beside this Python. The output goes to the test's tmp dir.

Checked from the job's output: exit code 0, 16 ranks, 8 on each node, every TP group
on one node, the layout table for tp=4 pp=4, and ``check: pass``; a failing program
makes ``sbatch --wait`` (hence the test) fail. slurm/one_node.sh runs its TP=4 x PP=2 on
one node, finding the shared body through $SLURM_SUBMIT_DIR alone (no MPIPAR_ROOT), and
stops with a clear message when submitted from outside the checkout; slurm/cpu_tests.sh
runs one small test file at 1 and 4 ranks. Every daemon is stopped by pid at the end,
also when a test fails. Skipped only where Slurm cannot be installed or run (not root).
"""

from __future__ import annotations

import glob
import os
import re
import sys

import pytest

pytestmark = [pytest.mark.launcher, pytest.mark.slow]

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(ROOT, "slurm", "two_node.sh")
JOB_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from slurm_cluster import SlurmCluster, ensure_installed
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs slurmd as root; not root here")
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(nodes=("n1", "n2"), cpus=64, gpus=8,
                     base=str(tmp_path_factory.mktemp("slurm")))
    try:
        c.start()
        yield c
    finally:
        c.stop()
        left = c.ours()
        assert not left, f"Slurm processes still running after stop: {left}"


def submit(cluster, tmp_path, env: dict | None = None, args=(), script=SCRIPT, cwd=ROOT):
    """sbatch --wait SCRIPT ARGS in ``cwd``; returns (exit code, job output, sbatch
    output). A variable given as None in ``env`` is left out of the job's environment."""
    from mpipar.launch import mpirun_path
    job_env = {"MPIPAR_DEVICE": "cpu", "MPIPAR_PYTHON": sys.executable,
               "MPIPAR_ROOT": ROOT, "MPIPAR_SRUN_MPI": "pmi2",
               "MPIPAR_MPIRUN": mpirun_path(), **(env or {})}
    res = cluster.sbatch([f"--output={tmp_path}/job-%j.out", script, *args],
                         env=job_env, cwd=cwd, timeout=JOB_TIMEOUT_S)
    text = "".join(open(p).read() for p in sorted(glob.glob(f"{tmp_path}/job-*.out")))
    return res.returncode, text, res.stdout + res.stderr


def placement(text: str) -> dict[int, str]:
    """world rank -> node, from the per-rank lines the script's task wrapper prints."""
    return {int(r): n for r, n in re.findall(r"^mpipar-task: rank (\d+) node (\S+)", text,
                                             re.M)}


def layout_rows(text: str) -> dict[int, tuple[int, int, int]]:
    """world rank -> (tp, dp, pp), from the layout table rank 0 prints."""
    rows = re.findall(r"^\s*(\d+) \|\s*(\d+)\s+(\d+)\s+(\d+) \|\s*\d+\s+\d+\s*$", text, re.M)
    return {int(r): (int(t), int(d), int(p)) for r, t, d, p in rows}


def explain(code, text, sbatch_out, cluster) -> str:
    return (f"job exit {code}\n--- sbatch ---\n{sbatch_out}\n--- job output ---\n"
            f"{text[-6000:]}\n--- daemon logs ---\n{cluster.logs(1500)}")


def test_two_node_srun(cluster, tmp_path):
    code, text, out = submit(cluster, tmp_path)
    why = explain(code, text, out, cluster)
    assert code == 0, why
    assert "launcher srun --mpi=pmi2" in text, why
    assert "layout: tp=4 pp=4 dp=1 ep=1 world=16" in text, why
    where = placement(text)
    assert sorted(where) == list(range(16)), why
    assert sorted(where.values()) == ["n1"] * 8 + ["n2"] * 8, why
    assert all(where[r] == ("n1" if r < 8 else "n2") for r in range(16)), why
    coords = layout_rows(text)
    assert sorted(coords) == list(range(16)), why
    tp_groups: dict[tuple[int, int], set[str]] = {}
    for r, (_, dp, pp) in coords.items():
        tp_groups.setdefault((pp, dp), set()).add(where[r])
    assert len(tp_groups) == 4 and all(len(n) == 1 for n in tp_groups.values()), \
        f"a TP group spans nodes: {tp_groups}\n{why}"
    pp_nodes = {pp: where[r] for r, (tp, _, pp) in coords.items() if tp == 0}
    assert set(pp_nodes.values()) == {"n1", "n2"}, f"PP should cross nodes: {pp_nodes}"
    assert re.search(r"^check: pass\s*$", text, re.M), why


def test_two_node_mpirun_inside_allocation(cluster, tmp_path):
    code, text, out = submit(cluster, tmp_path, {"MPIPAR_LAUNCHER": "mpirun"})
    why = explain(code, text, out, cluster)
    assert code == 0, why
    assert "launcher mpirun" in text, why
    assert sorted(placement(text)) == list(range(16)), why
    assert sorted(layout_rows(text)) == list(range(16)), why
    assert re.search(r"^check: pass\s*$", text, re.M), why


def test_one_node_default_layout(cluster, tmp_path):
    script = os.path.join(ROOT, "slurm", "one_node.sh")
    code, text, out = submit(cluster, tmp_path, {"MPIPAR_ROOT": None}, script=script)
    why = explain(code, text, out, cluster)
    assert code == 0, why
    assert "layout: tp=4 pp=2 dp=1 ep=1 world=8" in text, why
    where = placement(text)
    assert sorted(where) == list(range(8)) and len(set(where.values())) == 1, why
    assert re.search(r"^check: pass\s*$", text, re.M), why


def test_submitted_outside_the_checkout_says_so(cluster, tmp_path):
    script = os.path.join(ROOT, "slurm", "one_node.sh")
    code, text, out = submit(cluster, tmp_path, {"MPIPAR_ROOT": None}, script=script,
                             cwd=str(tmp_path))
    assert code == 2, explain(code, text, out, cluster)
    assert f"mpipar: no slurm/mpipar_job.sh in {tmp_path}: run sbatch in the mpipar " \
        "checkout or set MPIPAR_ROOT" in text, text


def test_failing_program_fails_the_job(cluster, tmp_path):
    code, text, out = submit(cluster, tmp_path, args=["--max-new-tokens", "0"])
    assert code != 0, explain(code, text, out, cluster)
    assert "check: pass" not in text


def test_wrong_task_count_refused_before_launch(cluster, tmp_path):
    code, text, out = submit(cluster, tmp_path, {"MPIPAR_TP": "8"})
    assert code == 2, explain(code, text, out, cluster)
    assert "= 32 ranks, but the job has 16 tasks" in text


def test_cpu_tests_script_runs_pytest_at_1_and_4_ranks(cluster, tmp_path):
    script = os.path.join(ROOT, "slurm", "cpu_tests.sh")
    args = ["tests/test_layout.py", "-k", "split or mismatch"]  # 2 fast tests
    code, text, out = submit(cluster, tmp_path, args=args, script=script)
    why = explain(code, text, out, cluster)
    assert code == 0, why
    assert "=== pass 1: 1 process" in text and "=== pass 2: 4 ranks (srun) ===" in text, why
    assert len(re.findall(r"^\d+ passed", text, re.M)) >= 2, why
    assert "mpipar-tests: passed" in text, why


def test_serve_script_serves_and_ends_on_scancel(cluster, tmp_path):
    """slurm/serve.sh on both nodes (one rank each, PP=2): /health on the host rank 0
    reports, a completion, then scancel ends every rank."""
    import json
    import time
    import urllib.request

    from mpipar.launch import mpirun_path
    script = os.path.join(ROOT, "slurm", "serve.sh")
    job_env = {"MPIPAR_DEVICE": "cpu", "MPIPAR_PYTHON": sys.executable, "MPIPAR_ROOT": ROOT,
               "MPIPAR_SRUN_MPI": "pmi2", "MPIPAR_MPIRUN": mpirun_path(),
               "MPIPAR_TP": "1", "MPIPAR_PP": "2", "MPIPAR_PORT": "0",
               "MPIPAR_API_KEY": "slurm-key"}
    out = cluster.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1",
                       f"--output={tmp_path}/job-%j.out", script, "--preset", "builtin-moe",
                       "--kv-cache-tokens", "1024", "--max-model-len", "256"],
                      env=job_env, cwd=ROOT)
    job = out.stdout.strip().split(";")[0]
    log = os.path.join(tmp_path, f"job-{job}.out")

    def text():
        return open(log).read() if os.path.exists(log) else ""

    def state():
        out = cluster.run(["scontrol", "show", "job", job], check=False, timeout=20)
        found = re.search(r"JobState=(\S+)", out.stdout)
        return found.group(1) if found else "GONE"
    try:
        url, t_end = None, time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < t_end and url is None:
            found = re.search(r"listening on (http://\S+)", text())
            url = found.group(1) if found else None
            assert state() in ("PENDING", "RUNNING", "CONFIGURING"), \
                explain(state(), text(), "", cluster)
            time.sleep(0.5)
        assert url, explain("no address", text(), "", cluster)
        host = re.search(r"rank 0 on host (\S+)", text()).group(1)
        assert url.startswith(f"http://{host}:"), url  # 0.0.0.0 -> the host to use
        assert "without an API key" not in text()
        while urllib.request.urlopen(url + "/health", timeout=5).status != 200:
            time.sleep(0.5)
        body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": "Bearer slurm-key"})
        reply = json.load(urllib.request.urlopen(req, timeout=60))
        assert reply["usage"]["completion_tokens"] == 4, reply
        where = placement(text())
        assert sorted(where.values()) == ["n1", "n2"], text()
    finally:
        cluster.run(["scancel", job], check=False)
    t_end = time.monotonic() + 30
    while state() not in ("CANCELLED", "COMPLETED", "FAILED", "GONE") and \
            time.monotonic() < t_end:
        time.sleep(0.5)
    assert state() in ("CANCELLED", "COMPLETED", "GONE"), explain(state(), text(), "", cluster)
    needle = f"SLURM_JOB_ID={job}".encode()
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                left.append(pid)
        except OSError:
            pass
    assert not left, f"processes of job {job} still running: {left}\n{text()}"
