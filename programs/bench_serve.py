"""Serving throughput and latency: mpipar's engine offline, beside transformers' continuous
batching and this machine's roofline, then online through the HTTP server.

    flock -x /tmp/mpipar-cpu.lock python programs/bench_serve.py --json serve.json
    python programs/bench_serve.py --requests 64          # the nano-vllm shape in full
    python programs/bench_serve.py --quick                # tiny model, seconds

Workload (seeded): R requests, prompt lengths uniform in [64, 256], outputs uniform in
[32, 128], random token ids, ``ignore_eos`` (every request makes its full output), preset
bench-166m (random weights, float32), all arriving at t=0 ("offline").

- mpipar offline, layouts tp1 (one rank) and dp2 / tp2 / pp2 (two ranks, one core each;
  PP keeps its micro-batches in flight): ``generate_offline`` on ServeEngine, each layout
  its own mpirun job (bench.harness.launch_worker), after a warm-up request; timed on
  rank 0.
- transformers offline: Qwen3ForCausalLM of the same shape (random init, float32),
  ``torch.set_num_threads(1)``, its continuous-batching manager (what ``generate_batch``
  runs) with per-request ``max_new_tokens``, page size 16 and a token budget of
  ``--max-num-batched-tokens`` like mpipar's, eos disabled. Runs in a Python where torch
  and transformers import (``--torch-python``, default this one, else $MPIPAR_TORCH_PYTHON);
  never a dependency.
- roofline, for n cores (from one core's limits, bench.machine.one_core_limits: best
  sgemm GFLOP/s, copy GB/s counted read + written):
      FLOPs = sum_i 2 M (P_i + O_i - 1) + A(P_i + O_i - 1) + 2 V h O_i
              (M: matmul weights of the layers, A(L) = layers * 2 L^2 H d: causal QK^T
              and PV, V h: the lm_head per sampled token)
      steps >= max(max_i O_i, sum_i (P_i + O_i) / budget)   (decode is sequential;
              a step computes at most --max-num-batched-tokens tokens)
      bytes = steps * 4 W (every float32 weight read once per step; KV reads left out)
      t_roof = max(FLOPs / (n * sgemm), bytes / (n * copy));  roofline = sum O / t_roof
- online (tp1 by default): the server under mpirun, the same requests sent with Poisson
  arrivals at ``--rate-factors`` x the offline tp1 capacity (requests/s), latencies as
  vLLM bench serve defines them (mpipar/bench/loadgen.py), goodput under ``--slo-*``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from mpipar.bench import harness
from mpipar.bench.machine import load_note, machine, one_core_limits

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))
from bench_single_rank import work  # noqa: E402

LAYOUTS = {"tp1": (1, 1, 1), "dp2": (1, 1, 2), "tp2": (2, 1, 1), "pp2": (1, 2, 1)}  # tp pp dp


def workload(cfg: dict) -> list[tuple[list[int], int]]:
    import numpy as np
    rng = np.random.default_rng(cfg["seed"])
    (plo, phi), (olo, ohi) = cfg["prompt_len"], cfg["output_len"]
    return [(rng.integers(0, cfg["vocab"], int(rng.integers(plo, phi + 1))).tolist(),
             int(rng.integers(olo, ohi + 1))) for _ in range(cfg["requests"])]


def workload_config(args, config) -> dict:
    """The workload's part of a worker's configuration (``workload``, ``engine_flags``)."""
    return {**harness.pick(args, "preset", "requests", "prompt_len", "output_len", "seed",
                           "budget"), "vocab": config.vocab_size}


def engine_flags(cfg: dict) -> dict:
    reqs = workload(cfg)
    longest = max(len(p) + o for p, o in reqs)
    kv = sum(len(p) + o + 16 for p, o in reqs)
    return {"kv_cache_tokens": max(kv, 2 * longest), "max_num_seqs": len(reqs),
            "max_num_batched_tokens": cfg["budget"], "max_model_len": longest + 16}


# ---- mpipar offline: one mpirun job per layout ------------------------------------------
def worker(cfg: dict) -> dict | None:
    from mpi4py import MPI

    from mpipar.comm.control import barrier
    from mpipar.layout import Layout, make_comms
    from mpipar.model.init import open_model
    from mpipar.serve.engine import ServeEngine
    from mpipar.serve.offline import generate_offline
    from mpipar.serve.options import EngineOptions
    from mpipar.serve.request import Request, SamplingParams
    tp, pp, dp = LAYOUTS[cfg["layout"]]
    comms = make_comms(Layout(tp=tp, pp=pp, dp=dp), MPI.COMM_WORLD)
    source = open_model(preset=cfg["preset"])
    engine = ServeEngine(comms, source, EngineOptions(**engine_flags(cfg)))

    def requests(tag, items):
        return [Request(f"{tag}{i}", p, SamplingParams(max_tokens=o, ignore_eos=True))
                for i, (p, o) in enumerate(items)]
    generate_offline(engine, requests("warm", [(list(range(1, 33)), 4)] * 2))
    barrier(comms.world)
    t0 = time.perf_counter()
    out = generate_offline(engine, requests("r", workload(cfg)))
    seconds = time.perf_counter() - t0
    if out is None:
        return None
    want = [o for _, o in workload(cfg)]
    assert [len(t) for t in out] == want, "a request ended early"
    return {"seconds": seconds, "output_tokens": sum(want)}


# ---- transformers offline (in a Python with torch) --------------------------------------
def torch_worker(cfg: dict) -> dict:
    import torch
    import transformers
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**cfg["hf_config"])).to(torch.float32).eval()
    reqs = workload(cfg)
    gen = GenerationConfig(max_new_tokens=max(o for _, o in reqs), do_sample=False,
                           eos_token_id=-1, pad_token_id=0)
    blocks = sum(-(-(len(p) + o) // 16) + 1 for p, o in reqs)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=blocks,
                                  max_batch_tokens=cfg["budget"])

    def run(items) -> float:
        with torch.no_grad(), model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=cb, warmup=False) as m:
            t0 = time.perf_counter()
            for i, (p, o) in enumerate(items):
                m.add_request(p, request_id=f"r{i}", max_new_tokens=o)
            done = {}
            while len(done) < len(items):
                r = m.get_result(timeout=600)
                if r is None:
                    raise RuntimeError("transformers' batching loop stopped")
                if r.is_finished():
                    done[r.request_id] = len(r.generated_tokens)
            seconds = time.perf_counter() - t0
        assert [done[f"r{i}"] for i in range(len(items))] == [o for _, o in items]
        return seconds
    run([(list(range(1, 33)), 4)] * 2)  # warm-up
    return {"seconds": run(reqs), "output_tokens": sum(o for _, o in reqs),
            "torch": torch.__version__, "transformers": transformers.__version__}


def launch_torch(python: str, cfg: dict, timeout: float) -> dict:
    """torch_worker in ``python`` (one process, one thread), measured as a worker job."""
    env = {"PYTHONPATH": os.path.dirname(os.path.dirname(HERE)), "OMP_NUM_THREADS": "1"}
    return harness.launch_worker(HERE, 1, cfg, timeout, python=python, flag="--torch-worker",
                                 env=env)


def torch_python(args) -> str | None:
    for py in (args.torch_python, os.environ.get("MPIPAR_TORCH_PYTHON"), sys.executable):
        if py and subprocess.run([py, "-c", "import torch, transformers"],
                                 capture_output=True).returncode == 0:
            return py
    return None


# ---- roofline and online ----------------------------------------------------------------
def roofline(config, reqs, budget: int, limits: dict, cores: int) -> float:
    w1 = work(config, 1)  # M and V h from the one-token prefill; A separately
    attn = config.num_layers * 2 * config.num_heads * config.head_dim
    head = 2 * config.vocab_size * config.hidden_size
    per_token = w1["prefill_flops"] - attn - head  # 2 M
    lens = [(len(p), o) for p, o in reqs]
    flops = sum(per_token * (p + o - 1) + attn * (p + o - 1) ** 2 + head * o for p, o in lens)
    steps = max(max(o for _, o in lens), sum(p + o for p, o in lens) / budget)
    t = max(flops / (cores * limits["sgemm_gflops"] * 1e9),
            steps * w1["decode_bytes"] / (cores * limits["copy_gbs"] * 1e9))
    return sum(o for _, o in reqs) / t


def online(cfg: dict, rate: float, slo_ms: dict) -> dict:
    from mpipar.bench.job import ServerJob
    from mpipar.bench.loadgen import run_load, summarize
    tp, pp, dp = LAYOUTS[cfg["layout"]]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in engine_flags(cfg).items()]
    with ServerJob(tp * pp * dp, ["--preset", cfg["preset"], "--tp", str(tp), "--pp",
                                  str(pp), "--dp", str(dp), *flags], start_timeout=300,
                   stop_timeout=20) as job:
        run_load(job.url, [(list(range(1, 33)), 4)] * 2, rate=100.0)  # warm-up
        return summarize(run_load(job.url, workload(cfg), rate, cfg["seed"]), slo_ms)


def parse_args(argv):
    p = harness.parser(__doc__, rounds=False)
    p.add_argument("--preset", default="bench-166m")
    p.add_argument("--requests", type=int, default=16, help="R (the issue's shape: 64)")
    p.add_argument("--prompt-len", type=harness.ints, default=[64, 256], help="LO,HI")
    p.add_argument("--output-len", type=harness.ints, default=[32, 128], help="LO,HI")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, dest="budget")
    p.add_argument("--layouts", default="tp1,dp2,tp2,pp2")
    p.add_argument("--online-layouts", default="tp1")
    p.add_argument("--rate-factors", default="0.5,0.9",
                   help="Poisson rates as fractions of the offline tp1 requests/s")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--torch", choices=("auto", "off"), default="auto")
    p.add_argument("--torch-python", help="a Python where torch + transformers import")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.requests, args.prompt_len, args.output_len = \
            "builtin-moe", 6, [8, 24], [4, 8]
        args.torch = "off"
    return args


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(records, meta, limits, note, slo_ms) -> None:
    print(f"bench_serve: {meta['cpu']}, {meta['cores']} cores; machine, one core: sgemm "
          f"{limits['sgemm_gflops']:.1f} GFLOP/s, copy {limits['copy_gbs']:.1f} GB/s")
    print(" impl         | layout | workload        | req | out tok | seconds | out tok/s "
          "| roofline | of roof | req/s | goodput")
    print("--------------+--------+-----------------+-----+---------+---------+-----------"
          "+----------+---------+-------+--------")
    for r in records:
        roof = r.get("roofline_output_tokens_per_s")
        load = r["workload"] + (f" {r['request_rate']:.2f}/s" if "request_rate" in r else "")
        print(f" {r['impl']:12s} | {r['layout']:6s} | {load:15s} | {r['requests']:3d} | "
              f"{r['output_tokens']:7d} | {r['seconds']:7.1f} | {r['output_tokens_per_s']:9.1f}"
              f" | {fmt(roof):>8s} | {fmt(roof and r['output_tokens_per_s'] / roof, '.2f'):>7s}"
              f" | {fmt(r.get('request_throughput'), '.2f'):>5s} | "
              f"{fmt(r.get('goodput_requests_per_s'), '.2f'):>6s}")
    online = [r for r in records if r["workload"] == "poisson"]
    if online:
        print(f" online latencies, ms (mean / median / p99); goodput SLOs: {slo_ms}")
        for r in online:
            parts = [f"{k.upper()} " + " / ".join(fmt(r[k][s], ".0f") for s in
                                                  ("mean_ms", "median_ms", "p99_ms"))
                     for k in ("ttft", "tpot", "itl", "e2el")]
            print(f"  {r['layout']} at {r['request_rate']:.2f} req/s: " + "; ".join(parts))
    print(f" {note}")


def main(args) -> int:
    if args.torch_worker:
        return harness.worker_main(torch_worker, args.torch_worker, args.worker_out)
    from mpipar.model.config import get_preset
    meta, config = machine(), get_preset(args.preset)
    cfg = workload_config(args, config)
    reqs = workload(cfg)
    inter = config.moe_intermediate_size if config.is_moe else config.intermediate_size
    limits = one_core_limits(args.budget, config.hidden_size, inter,
                             16 if args.quick else 256, 1, 2, 256 if args.quick else 1024)
    base = {"workload": "offline", "requests": len(reqs),
            "output_tokens": sum(o for _, o in reqs)}
    records = []
    for layout in args.layouts.split(","):
        tp, pp, dp = LAYOUTS[layout]
        res = harness.launch_worker(HERE, tp * pp * dp, {**cfg, "layout": layout}, args.timeout)
        records.append({**base, "impl": "mpipar", "layout": layout, **res,
                        "output_tokens_per_s": res["output_tokens"] / res["seconds"],
                        "roofline_output_tokens_per_s": roofline(
                            config, reqs, args.budget, limits, tp * pp * dp)})
        print(f"  mpipar {layout}: {records[-1]['output_tokens_per_s']:.1f} output tok/s",
              flush=True)
    python = torch_python(args) if args.torch == "auto" and not config.is_moe else None
    skipped = None if python else ("--torch off" if args.torch == "off" else
                                   "dense presets only" if config.is_moe else
                                   "no Python with torch + transformers")
    if python:
        res = launch_torch(python, {**cfg, "hf_config": config.to_hf()}, args.timeout)
        records.append({**base, "impl": "transformers", "layout": "tp1", **res,
                        "output_tokens_per_s": res["output_tokens"] / res["seconds"]})
    slo_ms = {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms}
    single = next((r for r in records if r["layout"] == "tp1" and r["impl"] == "mpipar"),
                  None)
    capacity = len(reqs) / single["seconds"] if single else 1.0
    for layout in filter(None, args.online_layouts.split(",")):
        for factor in (float(f) for f in args.rate_factors.split(",")):
            s = online({**cfg, "layout": layout}, factor * capacity, slo_ms)
            records.append({"impl": "mpipar", "layout": layout, "workload": "poisson",
                            "requests": len(reqs), "request_rate": factor * capacity,
                            "seconds": s["duration_s"], **s})
    note = load_note([{"other_load_cores": r.get("other_load_cores", 0.0),
                       "quiet_rounds": 1} for r in records])
    print_table(records, meta, limits, note.split(";")[0], slo_ms)
    if skipped:
        print(f" transformers: skipped ({skipped})")
    shape = {k: cfg[k] for k in ("requests", "prompt_len", "output_len", "seed", "budget")}
    harness.write_report(args.json, "serve", meta, records, preset=args.preset, limits=limits,
                         workload=shape, torch_skipped=skipped)
    return 0


if __name__ == "__main__":
    sys.exit(harness.run(parse_args, worker, main))
