"""Time per output token (TPOT) of decode with tensor parallelism: tp = 1, 2 (and 4).

    python programs/bench_tp_decode.py [--preset bench-dense-300m] [--tp 1,2] \\
        [--batch 1,16] [--json tp.json] [--quick]

What it claims: a TP group of T ranks splits every weight matrix of a block T ways, so
each rank reads 1/T of the weights (decode at batch 1 is a memory-bound matrix-vector
product) and does 1/T of the flops (batch >= 8 is compute-bound), at the price of two
all-reduces of [B, h] per layer. On this 2-core machine, two processes each reading
half the weights take about 0.71x of one (two cores do not double the memory
bandwidth) and two processes each doing half the flops take about 0.51x. Targets:
tp=2 / tp=1 <= 0.75 at batch 1 and <= 0.60 at batch 16.

Launch model: this process is a driver; for each tp it starts ``mpirun -n tp python
bench_tp_decode.py --worker ...`` (mpipar.launch.run_mpi), so every configuration has
exactly its own ranks and nothing else runs. A worker loads the model once, runs one
warm-up generate() per batch, then timed rounds (one generate() per batch each, batches
interleaved), and reports the median TPOT of world rank 0 (decode time after
the first token / (new tokens - 1)). One extra traced generate() per batch splits a
decode step into attention, MLP, the TP all-reduces and the rest (argmax over the
vocab-parallel head, Python bookkeeping). Runs with more ranks than cores are marked
"oversubscribed" and not compared against the targets.

Harness (flags, launch, one BLAS thread per rank), quiet rounds and machine facts:
mpipar/bench/.
"""

from __future__ import annotations

import os
import sys

from mpipar.bench import harness
from mpipar.bench.machine import LoadProbe, machine, quiet_rounds

HERE = os.path.abspath(__file__)
TARGETS = {1: 0.75, 16: 0.60}  # batch -> max tp=2 / tp=1 TPOT


def breakdown(ledger, n_layers: int, steps: int, tpot: float) -> dict:
    """ms per decode token from one traced generate(): skip the prefill's spans."""
    by = {}
    for name, _cat, t0, t1 in ledger.spans:
        by.setdefault(name.split()[0], []).append(t1 - t0)
    out = {}
    for key, skip in (("attention", n_layers), ("mlp", n_layers), ("forward", 1),
                      ("tp_allreduce", 2 * n_layers), ("tp_embed", 1), ("tp_argmax", 2)):
        spans = by.get(key, [])[skip:]
        out[key + "_ms"] = 1e3 * sum(spans) / steps if steps else 0.0
    out["outside_forward_ms"] = 1e3 * tpot - out["forward_ms"]
    return out


def worker(cfg: dict) -> dict | None:
    from mpi4py import MPI

    from mpipar.layout import Layout, make_comms
    from mpipar.model.init import open_model
    from mpipar.parallel.rank_model import ParallelModel
    from mpipar.serve import offline

    world = MPI.COMM_WORLD
    comms = make_comms(Layout(tp=cfg["tp"]), world)
    source = open_model(preset=cfg["preset"])
    model = ParallelModel(comms, source)
    vocab, layers = source.config.vocab_size, source.config.num_layers
    new = cfg["new_tokens"]
    sets = {b: harness.prompts_for(b, cfg["prompt_len"], vocab) for b in cfg["batches"]}
    for b in cfg["batches"]:  # warm-up: BLAS buffers, page faults, code paths
        offline.generate(model, sets[b], max(2, new // 4))

    def one_round():  # every batch once -> {batch: TPOT} (rank 0's; 0 elsewhere)
        out = {}
        for b in cfg["batches"]:
            gen = offline.generate(model, sets[b], new)
            out[b] = gen.tpot_s if gen is not None else 0.0
        return out

    res = quiet_rounds(LoadProbe(world), cfg["repeats"], one_round, cfg["patience"])
    parts = {}
    for b in cfg["batches"]:
        comms.ledger.trace = True
        comms.ledger.reset()
        gen = offline.generate(model, sets[b], new)
        comms.ledger.trace = False
        if world.rank == 0:
            parts[b] = breakdown(comms.ledger, layers, new - 1, gen.tpot_s)
    if world.rank != 0:
        return None
    return harness.worker_records([
        {"tp": cfg["tp"], "batch": b, "ranks": world.size,
         "oversubscribed": harness.oversubscribed(world.size), "tpot_s": res["median"][b],
         "tpot_all_s": [r[b] for r in res["all"]], "round_other_load_cores": res["loads"],
         "quiet_rounds": res["quiet"], "breakdown_ms_per_token": parts[b]}
        for b in cfg["batches"]])


def parse_args(argv):
    p = harness.parser(__doc__)
    p.add_argument("--preset", default="bench-dense-300m")
    p.add_argument("--tp", type=harness.ints, default=[1, 2], help="comma list (4: oversubscribed)")
    p.add_argument("--batch", type=harness.ints, default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=8)
    args = p.parse_args(argv)
    if args.quick:
        args.patience = 1
        args.preset, args.batch, args.new_tokens, args.repeats = "builtin-moe", [1, 2], 4, 1
        args.prompt_len = 4
    if args.new_tokens < 3:
        p.error("--new-tokens must be at least 3")
    return args


LEGEND = ("(ms per decode token on rank 0. allred: every TP all-reduce; the one after "
          "attention is outside attn,\n the one after the MLP inside mlp. head+: outside "
          "the layers: lm_head of the vocab slice, argmax + its all-gather, bookkeeping)")


def table(records) -> str:
    base = {r["batch"]: r["tpot_s"] for r in records if r["tp"] == 1}
    lines = [" tp | batch | ranks | TPOT ms  | vs tp=1 | target      |  attn   mlp allred  head+",
             "----+-------+-------+----------+---------+-------------+-------------------------"]
    for r in sorted(records, key=lambda r: (r["batch"], r["tp"])):
        ratio = r["tpot_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        target, verdict = TARGETS.get(r["batch"]), ""
        if r["oversubscribed"]:
            verdict = "oversub."
        elif r["tp"] == 2 and target is not None:
            verdict = f"<={target:.2f} " + ("ok" if ratio <= target else "MISS")
        bd = r["breakdown_ms_per_token"]
        lines.append(f" {r['tp']:2d} | {r['batch']:5d} | {r['ranks']:5d} | "
                     f"{1e3 * r['tpot_s']:8.2f} | {ratio:7.3f} | {verdict:11s} | "
                     f"{bd['attention_ms']:5.1f} {bd['mlp_ms']:5.1f} "
                     f"{bd['tp_allreduce_ms']:6.2f} {bd['outside_forward_ms']:5.2f}")
    return "\n".join(lines)


def main(args) -> int:
    cfg = {"batches": args.batch,
           **harness.pick(args, "preset", "new_tokens", "prompt_len", "repeats", "patience")}
    meta = machine()  # before the runs: is anything else busy?
    jobs = [(tp, {**cfg, "tp": tp}) for tp in args.tp]
    records, mpi = harness.launch_all(HERE, jobs, args.timeout)
    harness.print_report(f"bench_tp_decode: {args.preset}, prompt {args.prompt_len} tokens, "
                         f"{args.new_tokens} new tokens, median of {args.repeats} after a warm-up",
                         meta, mpi, table(records), records, LEGEND)
    harness.write_report(args.json, "tp_decode", meta, records, preset=args.preset, mpi=mpi,
                         targets_tp2_over_tp1=TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(harness.run(parse_args, worker, main))
