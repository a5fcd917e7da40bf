"""The time model against measured runs: predicted and measured TTFT and TPOT of layouts.

    python programs/bench_plan.py [--repeats 3] [--json plan.json] \\
        [--save-machine this.json] [--quick]

What it claims: ``mpipar.cost.time`` predicts, from this machine's measured figures
alone, the time to first token (TTFT) and time per output token (TPOT) of a layout
within 25% of the measured median, and orders the layouts of a model as the
measurements do. Nothing is fitted to these runs: first the machine is measured
(``bench.machine.machine_figures``: sgemm rate against rows, matrix-vector read bandwidth,
the latency and bandwidth of one exchange between two ranks; with 1 and with 2 ranks
measuring at once, since two ranks share this machine's memory bandwidth), then every
prediction is made, then the runs.

Cases (float32 weights and activations, as the engine runs on CPU): ``bench-166m``
(TTFT of a 512-token prompt; tp=1, tp=2, pp=2 with 1 and 4 chunks, dp=2 with two
prompts; TPOT at batch 1 or 2), ``bench-dense-300m`` (tp=1, tp=2; TTFT of 256 tokens,
TPOT at batch 1 and 8) and ``bench-moe`` (a MoE shape defined here: hidden 1024, 4
layers, 8 experts of 1024, top-2; ``builtin-moe`` is too small for time to mean more
than Python's per-call cost) at 1 rank and with dp=2, ep=2.

Launch: one ``mpirun -n R`` worker per layout (bench.harness.launch_worker); each loads
its model once, warms up, and runs quiet rounds (bench.machine.quiet_rounds) of every metric.
TTFT: generate() with one new token; TPOT: decode time / (new tokens - 1), predicted at
the mean context (prompt + new/2).

Harness (flags, launch, one BLAS thread per rank): mpipar/bench/harness.py.
"""

from __future__ import annotations

import json
import os
import sys

from mpipar.bench import harness
from mpipar.bench.machine import LoadProbe, load_note, machine, quiet_rounds

HERE = os.path.abspath(__file__)
TARGET = 0.25  # |predicted / measured - 1|
ITEMSIZE = 4  # the CPU engine holds weights and activations as float32
BENCH_MOE = dict(name="bench-moe", vocab_size=32000, hidden_size=1024, num_layers=4,
                 num_heads=16, num_kv_heads=8, head_dim=64, intermediate_size=3072,
                 model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=1024, norm_topk_prob=True,
                 max_position_embeddings=4096)
# (model, (tp, pp, dp, ep), TTFT chunk counts, TTFT prompts, TPOT batches)
CASES = [
    ("bench-166m", (1, 1, 1, 1), [1], 1, [1]),
    ("bench-166m", (2, 1, 1, 1), [1], 1, [1]),
    ("bench-166m", (1, 2, 1, 1), [1, 4], 1, [1]),
    ("bench-166m", (1, 1, 2, 1), [1], 2, [2]),
    ("bench-dense-300m", (1, 1, 1, 1), [1], 1, [1, 8]),
    ("bench-dense-300m", (2, 1, 1, 1), [1], 1, [1, 8]),
    ("bench-moe", (1, 1, 1, 1), [1], 2, [2]),
    ("bench-moe", (1, 1, 2, 2), [1], 2, [2]),
]
PROMPT_LEN = {"bench-166m": 512, "bench-dense-300m": 256, "bench-moe": 256}
QUICK_CASES = [("builtin-moe", (1, 1, 1, 1), [1, 2], 1, [1]),
               ("builtin-moe", (1, 1, 2, 2), [1], 2, [2])]


def model_config(name: str):
    from mpipar.model.config import ModelConfig, get_preset
    return ModelConfig(**BENCH_MOE) if name == "bench-moe" else get_preset(name)


def worker(cfg: dict) -> dict | None:
    from mpi4py import MPI

    from mpipar.comm.group import Group
    from mpipar.comm.ledger import Ledger
    world = MPI.COMM_WORLD
    if cfg["task"] == "machine":
        from mpipar.bench.machine import machine_figures
        small = {"rows": (1, 16), "mib": 16} if cfg.get("quick") else {}
        return machine_figures(Group(world, "world", Ledger()), **small)

    from mpipar.layout import Layout, make_comms
    from mpipar.model.init import open_model
    from mpipar.parallel.rank_model import ParallelModel
    from mpipar.serve import offline
    comms = make_comms(Layout(*cfg["layout"]), world)
    config = model_config(cfg["model"])
    model = ParallelModel(comms, open_model(preset=config))
    length, new = cfg["prompt_len"], cfg["new_tokens"]
    ttft_set = harness.prompts_for(cfg["ttft_prompts"], length, config.vocab_size)
    tpot_sets = {b: harness.prompts_for(b, length, config.vocab_size) for b in cfg["batches"]}
    for k in cfg["chunks"]:  # warm-up
        offline.generate(model, ttft_set, 1, prefill_chunks=k)
    for b in cfg["batches"]:
        offline.generate(model, tpot_sets[b], 3)

    def one_round():  # rank 0's times; 0 elsewhere
        out = {}
        for k in cfg["chunks"]:
            gen = offline.generate(model, ttft_set, 1, prefill_chunks=k)
            out[f"ttft K={k}"] = gen.ttft_s if gen is not None else 0.0
        for b in cfg["batches"]:
            gen = offline.generate(model, tpot_sets[b], new)
            out[f"tpot B={b}"] = gen.tpot_s if gen is not None else 0.0
        return out

    res = quiet_rounds(LoadProbe(world), cfg["repeats"], one_round, cfg["patience"])
    if world.rank != 0:
        return None
    return {"median": res["median"], "all": res["all"], "quiet": res["quiet"],
            "loads": res["loads"]}


def layout_name(lay) -> str:
    tp, pp, dp, ep = lay
    parts = [f"{k}={v}" for k, v in (("tp", tp), ("pp", pp), ("dp", dp), ("ep", ep)) if v > 1]
    return " ".join(parts) or "1 rank"


def predictions(desc: dict, cases, new_tokens: int, prompt_len: dict) -> list:
    """Every record's prediction, before any run."""
    from mpipar.cost import time as tm
    from mpipar.cost.machine import machine_from_dict
    from mpipar.layout import Layout
    out = []
    for model, lay, chunks, n_prompts, batches in cases:
        layout, config = Layout(*lay), model_config(model)
        mach = machine_from_dict(desc)
        length = prompt_len[model]
        for k in chunks:
            out.append({"model": model, "layout": layout_name(lay) + (f" K={k}" if k > 1
                                                                      else ""),
                        "ranks": layout.world, "metric": f"ttft {n_prompts}x{length}",
                        "key": f"ttft K={k}", "case": (model, lay),
                        "predicted_s": tm.ttft(mach, config, layout, length, n_prompts, k,
                                               ITEMSIZE)})
        for b in batches:
            out.append({"model": model, "layout": layout_name(lay), "ranks": layout.world,
                        "metric": f"tpot B={b}", "key": f"tpot B={b}", "case": (model, lay),
                        "predicted_s": tm.tpot(mach, config, layout, b,
                                               length + new_tokens // 2, ITEMSIZE)})
    return out


def ordering(records) -> tuple[list[str], list[str]]:
    """Pairs of layouts of one model and metric whose predicted order is not the
    measured one -> (resolved: the measured rounds of the two do not overlap, so the
    measurement orders them; ties: they overlap)."""
    resolved, ties = [], []
    for i, a in enumerate(records):
        for b in records[i + 1:]:
            if (a["model"], a["metric"]) != (b["model"], b["metric"]):
                continue
            if (a["predicted_s"] - b["predicted_s"]) * (a["measured_s"] - b["measured_s"]) < 0:
                lo, hi = sorted((a, b), key=lambda r: r["measured_s"])
                clear = max(lo["measured_all_s"]) < min(hi["measured_all_s"])
                (resolved if clear else ties).append(
                    f"{a['model']} {a['metric']}: {a['layout']} vs {b['layout']}")
    return resolved, ties


def table(records) -> str:
    lines = [f"{'model':17s} {'layout':14s} {'metric':14s} {'predicted ms':>12s} "
             f"{'measured ms':>11s} {'pred/meas':>9s}  within 25%",
             "-" * 90]
    for r in records:
        ratio = r["predicted_s"] / r["measured_s"]
        lines.append(f"{r['model']:17s} {r['layout']:14s} {r['metric']:14s} "
                     f"{1e3 * r['predicted_s']:12.1f} {1e3 * r['measured_s']:11.1f} "
                     f"{ratio:9.2f}  {'ok' if abs(ratio - 1) <= TARGET else 'MISS'}")
    return "\n".join(lines)


def parse_args(argv):
    p = harness.parser(__doc__, patience=3, timeout=900)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--machine", metavar="JSON",
                   help="use this machine description instead of measuring")
    p.add_argument("--save-machine", metavar="JSON", help="write the measured machine here")
    p.add_argument("--replay", metavar="JSON",
                   help="no runs: predict again, with this machine, the measured records of "
                        "an earlier --json (after a change to the time model)")
    args = p.parse_args(argv)
    if args.new_tokens < 3:
        p.error("--new-tokens must be at least 3")
    return args


def machine_from_figures(name: str, figs: dict) -> dict:
    """bench.machine.machine_figures' result -> a machine description (cost.machine's format)."""
    link = figs["link"] or {"bandwidth_Bps": float("inf"), "latency_s": 0.0}
    return {"name": name, "gpus_per_node": figs["ranks"], "matmul_flops":
            {str(k): v for k, v in figs["matmul_flops_by_rows"].items()},
            "mem_read_Bps": figs["mem_read_Bps"],
            "intra_node": {"bandwidth_Bps": link["bandwidth_Bps"],
                           "latency_s": link["latency_s"]},
            "sources": {"all": "measured by mpipar.bench.machine.machine_figures"}}


def measure_machine(timeout: float, quick: bool = False) -> dict:
    """This machine as a description: 1-rank figures, and 2-rank ones (both measuring)."""
    one = harness.launch_worker(HERE, 1, {"task": "machine", "quick": quick}, timeout)
    two = harness.launch_worker(HERE, 2, {"task": "machine", "quick": quick}, timeout)
    desc = machine_from_figures("this machine", one)
    two_desc = machine_from_figures("this machine", two)
    desc["intra_node"] = two_desc["intra_node"]
    desc["gpus_per_node"] = os.cpu_count() or 1
    desc["by_ranks"] = {"2": {k: two_desc[k] for k in ("matmul_flops", "mem_read_Bps")}}
    desc["other_load_cores"] = max(one["other_load_cores"], two["other_load_cores"])
    return desc


def main(args) -> int:
    cases, prompt_len = CASES, PROMPT_LEN
    if args.quick:
        cases, prompt_len, args.repeats, args.patience = QUICK_CASES, {"builtin-moe": 32}, 1, 1
    meta = machine()
    old = None
    if args.replay:
        with open(args.replay) as f:
            old = json.load(f)
        desc = old["machine_description"]
    elif args.machine:
        with open(args.machine) as f:
            desc = json.load(f)
    else:
        desc = measure_machine(args.timeout, args.quick)
    harness.write_json(args.save_machine, desc)
    records = predictions(desc, cases, args.new_tokens, prompt_len)  # before any run
    for model, lay, chunks, n_prompts, batches in cases if old is None else []:
        cfg = {"task": "run", "model": model, "layout": list(lay), "chunks": chunks,
               "ttft_prompts": n_prompts, "batches": batches, "prompt_len": prompt_len[model],
               "new_tokens": args.new_tokens, "repeats": args.repeats,
               "patience": args.patience}
        res = harness.launch_worker(HERE, lay[0] * lay[1] * lay[2], cfg, args.timeout)
        for r in records:
            if r["case"] == (model, lay):
                r["measured_s"] = res["median"][r["key"]]
                r["measured_all_s"] = [x[r["key"]] for x in res["all"]]
                r["quiet_rounds"], r["other_load_cores"] = res["quiet"], res["other_load_cores"]
    if old is not None:
        measured = {(r["model"], r["layout"], r["metric"]): r for r in old["records"]}
        for r in records:
            m = measured[(r["model"], r["layout"], r["metric"])]
            r.update({k: m[k] for k in ("measured_s", "measured_all_s", "quiet_rounds",
                                        "other_load_cores")})
    for r in records:
        r["case"] = list(r["case"][1])
        r["ratio"] = r["predicted_s"] / r["measured_s"]
    misses = [r for r in records if abs(r["ratio"] - 1) > TARGET]
    bad_order, ties = ordering(records)
    print(f"bench_plan: time model vs measured, median of {args.repeats} after a warm-up; "
          f"{meta['cores']} cores, one BLAS thread per rank; machine: sgemm "
          f"{max(float(v) for v in desc['matmul_flops'].values()) / 1e9:.0f} GFLOP/s peak, "
          f"read {desc['mem_read_Bps'] / 1e9:.1f} GB/s (1 rank), link "
          f"{desc['intra_node']['latency_s'] * 1e6:.1f} us + "
          f"{desc['intra_node']['bandwidth_Bps'] / 1e9:.1f} GB/s")
    print(table(records))
    print(f"within {TARGET:.0%}: {len(records) - len(misses)} of {len(records)}; ordering "
          f"as measured: {'yes' if not bad_order else 'NO: ' + '; '.join(bad_order)}"
          + (f" (swapped, but within the measured rounds' spread: {'; '.join(ties)})"
             if ties else ""))
    print(load_note(records))
    harness.write_report(args.json, "plan", meta,
                         [{k: v for k, v in r.items() if k != "key"} for r in records],
                         machine_description=desc, target=TARGET,
                         within_target=len(records) - len(misses),
                         ordering_mismatches=bad_order, ordering_ties=ties)
    return 0


if __name__ == "__main__":
    sys.exit(harness.run(parse_args, worker, main))
