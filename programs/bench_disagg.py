"""Prefill/decode disaggregation against colocated DP on the same cores: one Poisson stream
of long prompts and short outputs, served by

    dp2          programs/serve.py --dp 2                       (2 ranks, one core each)
    disagg-1p1d  programs/serve.py --prefill tp=1 --decode tp=1  (rank 0 decodes, rank 1
                 prefills; the KV cache moves over MPI, ledger kind kv_transfer)

    flock -x /tmp/mpipar-cpu.lock python programs/bench_disagg.py --json disagg.json
    python programs/bench_disagg.py --quick          # tiny model, seconds (smoke test)

Workload (seeded, bench_serve.workload): R requests, prompts uniform in [512, 1024],
outputs in [32, 64], ``ignore_eos``, preset bench-166m (random weights, float32). The
rate is ``--load`` (default 0.7) x the colocated capacity, measured first: R / seconds of
the same requests all at t=0 through dp2 (bench_serve's offline worker). Latencies as
vLLM bench serve defines them (bench/loadgen.py); goodput under ``--slo-ttft-ms`` and
``--slo-tpot-ms``. Handoff bytes per request: measured (world rank 0's ledger: in 1p1d it
receives every byte) beside the cost model's 2 * L * KV * d * P * 4 (cost.memory.
kv_bytes); the disaggregated server also reports the mean of each request's
phases (queue, prefill, handoff wait, transfer, first decode) from /metrics.
Records go into the same --json list format as bench_serve (workload "poisson").
"""

from __future__ import annotations

import os
import sys
import urllib.request

from mpipar.bench import harness
from mpipar.bench.machine import machine

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))
import bench_serve  # noqa: E402


def scrape(url: str) -> dict:
    """The disaggregated server's /metrics: phase sums and counts, kv_transfer gauges."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    sums, counts, kv = {}, {}, {}
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels = dict(p.split("=", 1) for p in rest.split("}")[0].split(","))
        value = float(line.rsplit(" ", 1)[1])
        if name.endswith("disagg_phase_seconds_sum"):
            sums[labels["phase"].strip('"')] = value
        elif name.endswith("disagg_phase_seconds_count"):
            counts[labels["phase"].strip('"')] = value
        elif name == "mpipar:kv_transfer_bytes":
            kv[labels["what"].strip('"')] = value
    return {"sums": sums, "counts": counts, "kv": kv}


def online(cfg: dict, layout: str, rate: float, slo_ms: dict) -> dict:
    from mpipar.bench.job import ServerJob
    from mpipar.bench.loadgen import run_load, summarize
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in bench_serve.engine_flags(cfg).items()]
    shape = (["--dp", "2"] if layout == "dp2" else
             ["--prefill", "tp=1", "--decode", "tp=1", "--decode-kv-cache-tokens",
              str(bench_serve.engine_flags(cfg)["kv_cache_tokens"])])
    warm = [(list(range(1, 33)), 4)] * 2
    with ServerJob(2, ["--preset", cfg["preset"], *shape, *flags], start_timeout=300,
                   stop_timeout=20) as job:
        run_load(job.url, warm, rate=100.0)
        before = scrape(job.url) if layout != "dp2" else None
        s = summarize(run_load(job.url, bench_serve.workload(cfg), rate, cfg["seed"]), slo_ms)
        after = scrape(job.url) if layout != "dp2" else None
    rec = {"impl": "mpipar", "layout": layout, "workload": "poisson",
           "requests": cfg["requests"], "request_rate": rate, "seconds": s["duration_s"], **s,
           "goodput_rps": s["goodput_requests_per_s"]}
    for k in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            v = s[k][f"{stat}_ms"]
            rec[f"{k}_{stat}_s"] = None if v is None else v / 1e3
    if after is not None:
        n = cfg["requests"]
        warm_bytes = before["kv"]
        rec["kv_bytes_per_request_measured"] = (
            after["kv"]["kv_transfer_recv_bytes_rank0"]
            - warm_bytes["kv_transfer_recv_bytes_rank0"]) / n
        rec["kv_bytes_per_request_predicted"] = (
            after["kv"]["kv_transfer_bytes_predicted"]
            - warm_bytes["kv_transfer_bytes_predicted"]) / n
        rec["phases_mean_s"] = {  # of the measured requests (not the warm-up)
            k: (after["sums"][k] - before["sums"].get(k, 0.0))
            / (after["counts"][k] - before["counts"].get(k, 0.0))
            for k in after["sums"] if after["counts"][k] > before["counts"].get(k, 0.0)}
    return rec


def formula_bytes_per_request(cfg: dict, config) -> float:
    from mpipar.cost.memory import kv_bytes
    reqs = bench_serve.workload(cfg)
    return sum(kv_bytes(config.num_layers, config.num_kv_heads, config.head_dim,
                        len(p), 4) for p, _ in reqs) / len(reqs)


def parse_args(argv):
    p = harness.parser(__doc__, rounds=False, workers=False)
    p.add_argument("--preset", default="bench-166m")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=harness.ints, default=[512, 1024], help="LO,HI")
    p.add_argument("--output-len", type=harness.ints, default=[32, 64], help="LO,HI")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, dest="budget")
    p.add_argument("--loads", default="0.7",
                   help="comma-separated rates as fractions of the colocated capacity")
    p.add_argument("--slo-ttft-ms", type=float, default=20000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.prompt_len, args.output_len = "builtin-moe", [64, 128], [4, 8]
        args.requests = min(args.requests, 6)
    return args


def print_table(records, capacity, slo_ms, formula) -> None:
    def ms(r, k):
        return " / ".join("-" if r[f"{k}_{s}_s"] is None else f"{r[f'{k}_{s}_s'] * 1e3:.0f}"
                          for s in ("mean", "median", "p99"))
    print(f"bench_disagg: colocated dp2 capacity {capacity:.3f} req/s; SLOs {slo_ms} ms")
    print(" layout      | req/s | TTFT ms mean/p50/p99   | TPOT ms mean/p50/p99 | ITL p99 ms "
          "| goodput | kv bytes/req measured / predicted")
    for r in records:
        kv = (f"{r['kv_bytes_per_request_measured']:.0f} / "
              f"{r['kv_bytes_per_request_predicted']:.0f}"
              if "kv_bytes_per_request_measured" in r else "-")
        print(f" {r['layout']:11s} | {r['request_rate']:.3f} | {ms(r, 'ttft'):22s} | "
              f"{ms(r, 'tpot'):20s} | {r['itl_p99_s'] * 1e3:10.0f} | {r['goodput_rps']:7.3f} "
              f"| {kv}")
    print(f" cost model 2*L*KV*d*P*4 over the workload: {formula:.0f} bytes/request")
    for a, b in zip(records[::2], records[1::2], strict=True):  # dp2, disagg per load
        print(f" at {a['load']} of capacity, disagg/dp2: TPOT p99 "
              f"{b['tpot_p99_s'] / a['tpot_p99_s']:.2f}x, TTFT p99 "
              f"{b['ttft_p99_s'] / a['ttft_p99_s']:.2f}x, ITL p99 "
              f"{b['itl_p99_s'] / a['itl_p99_s']:.2f}x")
        if "phases_mean_s" in b:
            print(" disagg phases, mean s: " + ", ".join(
                f"{k} {v:.3f}" for k, v in b["phases_mean_s"].items()))


def main(argv=None) -> int:
    args = parse_args(argv)
    from mpipar.model.config import get_preset
    config = get_preset(args.preset)
    cfg = bench_serve.workload_config(args, config)
    offline = harness.launch_worker(bench_serve.HERE, 2, {**cfg, "layout": "dp2"}, args.timeout)
    capacity = args.requests / offline["seconds"]
    print(f"  colocated dp2 offline: {offline['seconds']:.1f} s for {args.requests} requests",
          flush=True)
    slo_ms = {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms}
    records = []
    for load in (float(x) for x in args.loads.split(",")):
        for layout in ("dp2", "disagg-1p1d"):
            records.append(dict(online(cfg, layout, load * capacity, slo_ms), load=load))
            print(f"  {layout} at {load}: TPOT p99 {records[-1]['tpot_p99_s'] * 1e3:.0f} ms",
                  flush=True)
    formula = formula_bytes_per_request(cfg, config)
    print_table(records, capacity, slo_ms, formula)
    workload = {k: cfg[k] for k in ("requests", "prompt_len", "output_len", "seed", "budget")}
    harness.write_report(args.json, "serve", machine(), records, preset=args.preset,
                         workload=workload, loads=args.loads, colocated_capacity_rps=capacity,
                         offline_dp2_seconds=offline["seconds"],
                         kv_bytes_per_request_formula=formula)
    return 0


if __name__ == "__main__":
    sys.exit(main())
