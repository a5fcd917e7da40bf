"""mpipar.cost.plan: layouts, numbers against hand arithmetic, ranking, and the command line.

Every test runs on every rank (the command-line ones start ``python -m mpipar.cost.plan``, which
imports no MPI, as a plain subprocess: under a second each).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mpipar.cost import plan as pl
from mpipar.launch import clean_env
from mpipar.model.config import ModelConfig, get_preset

Q235 = get_preset("qwen3-235b-a22b")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(rows, tp, pp, dp, ep):
    (r,) = [r for r in rows if (r["tp"], r["pp"], r["dp"], r["ep"]) == (tp, pp, dp, ep)]
    return r


def test_layouts_match_brute_force():
    # 12 heads, 4 kv heads, 6 experts, 5 layers on 12 GPUs
    c = ModelConfig(vocab_size=64, hidden_size=16, num_layers=5, num_heads=12, num_kv_heads=4,
                    head_dim=4, intermediate_size=0, model_type="qwen3_moe", num_experts=6,
                    num_experts_per_tok=2, moe_intermediate_size=8)
    got = {(x.tp, x.pp, x.dp, x.ep) for x in pl.layouts(c, 12)}
    want = set()
    for tp in range(1, 13):
        for pp in range(1, 13):
            for dp in range(1, 13):
                for ep in range(1, 13):
                    if (tp * pp * dp == 12 and 12 % tp == 0 and (4 % tp == 0 or tp % 4 == 0)
                            and pp <= 5 and (tp * dp) % ep == 0 and 6 % ep == 0):
                        want.add((tp, pp, dp, ep))
    assert got == want and (6, 1, 2, 1) not in got and (12, 1, 1, 6) in got
    dense = get_preset("qwen3-0.6b")
    assert all(x.ep == 1 for x in pl.layouts(dense, 8))


def test_235b_16_gpus_seed_choice_first():
    rows = pl.plan(Q235, 16, 80, 8, "bf16")
    top = rows[0]
    assert (top["tp"], top["pp"], top["dp"], top["ep"]) == (4, 4, 1, 1)
    # hand: weights 30,183,403,520 B (test_cost_memory); 80e9 - that = 49,816,596,480 B free;
    # KV per token 24 layers * 2 * 1 head * 128 * 2 B = 12288 -> floor(free/12288) tokens
    assert top["weight_gb"] == pytest.approx(30.18340352)
    assert top["free_gb"] == pytest.approx(49.81659648)
    assert top["kv_bytes_per_token"] == 12288 and top["kv_tokens"] == 49_816_596_480 // 12288
    # comm: TP 8*24*3*4096/4*2 = 1,179,648; PP middle stage h in + h out = 2*4096*2
    assert top["comm_bytes_per_token"] == {"tp": 1_179_648, "pp": 16384, "ep": 0,
                                           "total": 1_179_648 + 16384}
    assert top["fits"] and top["flags"] == []
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows == sorted(rows, key=pl.rank_key)
    assert all(r["fits"] for r in rows[:5]) and not rows[-1]["fits"]
    r16 = _row(rows, 16, 1, 1, 1)
    assert r16["tp_crosses_nodes"] and "tp-crosses-nodes" in r16["flags"]
    assert "kv-dup x4" in r16["flags"] and not _row(rows, 8, 2, 1, 1)["tp_crosses_nodes"]
    assert "ep-crosses-nodes" in _row(rows, 4, 1, 4, 16)["flags"]
    assert "no-fit" in _row(rows, 1, 1, 16, 1)["flags"]


def test_235b_8_gpus_tp8_free_memory():
    rows = pl.plan(Q235, 8, 80, 8, "bf16")
    r = _row(rows, 8, 1, 1, 1)
    # 80 - 235*2/8 = 21.25 (nominal); exact params 80 - 58.7734 = 21.2266; tp=8 replicates
    # kv heads (x2), router and norms: 58,959,617,024 B of weights -> 21.04 GB free
    assert r["free_gb"] == pytest.approx(80 - 58.959617024)
    assert abs(r["free_gb"] - 21.25) < 0.25 and r["flags"] == ["kv-dup x2"]
    # KV per token 94 layers * 2 * 1 head * 128 * 2 B = 48128 (a second copy on the peer)
    assert r["kv_bytes_per_token"] == 48128
    # TP: 8 * 94 * 7 * 4096 / 8 * 2 bytes
    assert r["comm_bytes_per_token"]["tp"] == 8 * 94 * 7 * 4096 / 8 * 2
    text = "\n".join(pl.summary(Q235, 8, 80, "bf16"))
    assert "80 - 235*2/8 = 21.25 GB" in text and "80 - 58.77 = 21.23 GB" in text


def test_reserve_and_dtype():
    a = _row(pl.plan(Q235, 16, 80, 8, "bf16", reserve_gb=10), 4, 4, 1, 1)
    assert a["free_gb"] == pytest.approx(49.81659648 - 10)
    b = _row(pl.plan(Q235, 16, 80, 8, "fp32"), 4, 4, 1, 1)
    assert b["weight_gb"] == pytest.approx(2 * 30.18340352) and b["fits"]
    c = _row(pl.plan(Q235, 8, 80, 8, "fp32"), 8, 1, 1, 1)
    assert c["free_gb"] == pytest.approx(80 - 2 * 58.959617024) and "no-fit" in c["flags"]


def test_main_in_process(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert pl.main(["--model", "qwen3-235b-a22b", "--gpus", "16", "--gpu-mem-gb", "80",
                    "--gpus-per-node", "8", "--json", str(out), "--explain", "4,4,1,1"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^\s*1\s+4\s+4\s+1\s+1\s+30\.18G\s+49\.82G\s+12288\s", text, re.M)
    assert "sorted by: " + pl.RULE in text and "layers" in text
    doc = json.loads(out.read_text())
    assert doc["rows"][0]["tp"] == 4 and doc["params"] == 235_093_634_560


@pytest.mark.parametrize("args, msg", [
    (["--model", "nope", "--gpus", "8"], "not a preset"),
    (["--model", "qwen3-0.6b", "--gpus", "0"], "--gpus must be >= 1"),
    (["--model", "qwen3-0.6b", "--gpus", "8", "--gpu-mem-gb", "-1"], "--gpu-mem-gb"),
    (["--model", "qwen3-0.6b", "--gpus", "8", "--dtype", "int8"], "invalid choice"),
    (["--gpus", "8"], "--model"),
    (["--model", "qwen3-0.6b", "--gpus", "8", "--explain", "4,4,1,1"], "not --gpus 8"),
])
def test_bad_args_exit_2(capsys, args, msg):
    with pytest.raises(SystemExit) as e:
        pl.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_config_json_model(capsys, fixtures_dir):
    path = os.path.join(fixtures_dir, "qwen3-moe-tiny", "config.json")
    assert pl.main(["--model", path, "--gpus", "4", "--gpu-mem-gb", "0.001",
                    "--dtype", "fp32"]) == 0
    assert "8 experts top-2" in capsys.readouterr().out


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mpipar.cost.plan", *args], cwd=ROOT,
                          env=clean_env(),
                          capture_output=True, text=True, timeout=60)


def test_cli_seed_command(tmp_path):
    out = tmp_path / "p.json"
    p = _run("--model", "qwen3-235b-a22b", "--gpus", "16", "--gpu-mem-gb", "80",
             "--gpus-per-node", "8", "--json", str(out))
    assert p.returncode == 0, p.stderr
    first = [ln for ln in p.stdout.splitlines() if re.match(r"\s*1\s", ln)]
    assert first and first[0].split()[:7] == ["1", "4", "4", "1", "1", "30.18G", "49.82G"]
    assert json.loads(out.read_text())["rows"][0]["pp"] == 4
    p = _run("--model", "qwen3-235b-a22b", "--gpus", "8")
    assert p.returncode == 0 and "21.25 GB" in p.stdout
    assert re.search(r"\s8\s+1\s+1\s+1\s+58\.96G\s+21\.04G\s.*kv-dup x2", p.stdout)


def test_cli_bad_args():
    for args in (["--model", "qwen3-235b-a22b", "--gpus", "-3"], ["--model", "no-such"],
                 ["--model", "qwen3-235b-a22b", "--gpus", "8", "--gpus-per-node", "0"]):
        p = _run(*args)
        assert p.returncode == 2 and p.stderr.startswith("mpipar.cost.plan: error: "), args
        assert p.stderr.count("\n") == 1 and p.stdout == ""
