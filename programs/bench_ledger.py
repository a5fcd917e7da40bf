"""Measured bytes per rank per token, for each kind of traffic, beside the seed's formulas.

    python programs/bench_ledger.py [--preset builtin-moe] \\
        [--layout tp=2,pp=2 --layout tp=2,dp=2,ep=4 --layout tp=4] [--json ledger.json]

For each layout a worker job (``mpirun -n tp*pp*dp``, started by this driver through
mpipar.launch.run_mpi) builds the engine, then runs generate() twice on the same
prompts: with 1 new token (prefill + first pick) and with 1 + D new tokens. The ledger
of the first run divided by the prompt tokens of the rank's replica gives bytes per
prompt token; the difference of the two runs divided by D * (sequences of the replica)
gives bytes per generated token, the decode steps alone. Bytes are those a rank SENDS.

The seed's formulas (mpipar.cost.traffic), per token of the rank's DP replica, h hidden,
b = 4 bytes, n = tp, L = layers of the rank's stage:
  tp_allreduce  (2L - L_moe_ep) ring all-reduces of h*b: each 2(n-1)/n * h*b
  tp_allgather  L_moe_ep all-gathers of the EP shares: (n-1)/n * h*b (ep > 1)
  pp_send       one activation h*b per stage boundary (stages s < pp-1)
  ep_dispatch   per MoE layer: top_k*h*b/l per token of the EP group = top_k*h*b/n
                per replica token (self-copies counted); ep_combine the same again
Column "exact" is mpipar.cost.traffic.predict_rank (the same formulas with the chunk rounding of
the ring and the routing the run saw); measured == exact is checked on every rank.
Where the ratio to the seed is not 1.00, the output says why (chunk rounding, the
small-message path, kinds the seed does not count, routing).

Harness (flags, launch, one BLAS thread per rank): mpipar/bench/harness.py. Times are
not measured here (4 ranks on 2 cores are oversubscribed; bytes are exact).
"""

from __future__ import annotations

import argparse
import os
import sys

from mpipar.bench import harness

HERE = os.path.abspath(__file__)
SEED_KINDS = ("tp_allreduce", "tp_allgather", "pp_send", "ep_dispatch", "ep_combine")
WHY = {
    "tp_allreduce": "ring 2(n-1)/n of [N,h]; != 1 through chunk rounding (n does not divide "
                    "N*h), or below comm/allreduce.py's RECURSIVE_DOUBLING_MAX_BYTES, where "
                    "recursive doubling sends log2(n)*S instead of 2(n-1)/n*S: the same at "
                    "n = 2, 1.33x at n = 4",
    "tp_allgather": "EP token shares split(N, n): uneven when n does not divide N, so a "
                    "rank sends more or less than (n-1)/n",
    "pp_send": "one activation [N,h] per boundary: exact",
    "ep_dispatch": "the seed counts k copies of every token, self-copies included; mpipar "
                   "sends a token once per OTHER rank holding one of its experts (DeepEP's "
                   "dedupe), each row h*b + 8k bytes (k slot ids and weights): below the "
                   "seed, by how much depends on routing (bench_ep_dispatch.py)",
    "ep_combine": "one [h] row back per dispatched row (summed over the rank's experts): "
                  "as ep_dispatch without the 8k bytes",
    "tp_embed": "not in the seed: vocab-parallel embedding, one all-reduce of [N,h] on "
                "stage 0 (2(n-1)/n*h*b per token)",
    "tp_argmax": "not in the seed: greedy pick over the vocab-parallel head, all-gather of "
                 "(max, id) = 12 bytes per sequence per step",
    "tp_logits": "not in the seed: full logits all-gathered (only with --check/--save-logits)",
    "control": "not model traffic: each Step, world rank 0 -> every rank (token ids, "
               "positions, block tables); it carries the sampled tokens to stage 0",
    "ep_counts": "not in the seed: one int64 row count to each peer per MoE layer and "
                 "forward, whatever the number of tokens",
    "eplb_load": "not in the seed: EPLB, per rebalance an all-reduce of [MoE layers, X] "
                 "int64 expert loads over the EP group",
    "eplb_weights": "not in the seed: EPLB, whole expert copies (3*h*m*b) moved per "
                    "rebalance",
    "result": "not model traffic: each step's sampled tokens, last stage -> world rank 0",
}


def parse_layout(text: str) -> dict:
    out = {"tp": 1, "pp": 1, "dp": 1, "ep": 1}
    for part in text.split(","):
        key, _, val = part.partition("=")
        if key.strip() not in out:
            raise argparse.ArgumentTypeError(f"layout {text!r}: unknown key {key!r}")
        out[key.strip()] = int(val)
    return out


def seed_per_token(config, layout, coords) -> dict:
    """The seed's bytes sent per token of the rank's replica, by kind (module docstring)."""
    from mpipar.cost.traffic import seed_bytes_by_kind
    return seed_bytes_by_kind(config, layout, 4, coords.pp)


def one_run(model, prompts, new_tokens):
    """generate() with a fresh ledger and workload record -> (sent by kind, predicted)."""
    from mpipar.cost.traffic import predict_rank
    from mpipar.parallel.moe import RoutingStats
    from mpipar.serve import offline
    model.comms.ledger.reset()
    model.forward_tokens = []
    model.stats = RoutingStats(model.config.num_experts)
    offline.generate(model, prompts, new_tokens)
    rep = model.report()  # collective
    sent = {k: v["sent_bytes"] for k, v in model.comms.ledger.totals().items()}
    pred = None
    if rep is not None:
        pred = [predict_rank(model.config, model.comms.layout, r) for r in rep]
    return sent, pred


def worker(cfg: dict) -> dict | None:
    from mpi4py import MPI

    from mpipar.layout import Layout, make_comms
    from mpipar.model.init import open_model
    from mpipar.parallel.rank_model import ParallelModel

    world = MPI.COMM_WORLD
    layout = Layout(**cfg["layout"])
    comms = make_comms(layout, world)
    source = open_model(preset=cfg["preset"])
    config = source.config
    model = ParallelModel(comms, source)
    v, plen, d = config.vocab_size, cfg["prompt_len"], cfg["decode"]
    prompts = [[(53 * s + 29 * i + 3) % v for i in range(plen)] for s in range(cfg["batch"])]
    seqs = len(range(comms.coords.dp, len(prompts), layout.dp))
    a, pred_a = one_run(model, prompts, 1)
    b, pred_b = one_run(model, prompts, 1 + d)
    mine = {"rank": world.rank, "coords": vars(comms.coords), "seqs": seqs,
            "prefill": {k: a[k] / (seqs * plen) for k in a},
            "decode": {k: (b.get(k, 0) - a.get(k, 0)) / (seqs * d) for k in set(a) | set(b)},
            "seed": seed_per_token(config, layout, comms.coords)}
    ranks = world.gather(mine, root=0)
    if world.rank != 0:
        return None
    for r in ranks:
        i = r["rank"]
        r["exact_prefill"] = {k: pred_a[i][k] / (r["seqs"] * plen) for k in pred_a[i]}
        r["exact_decode"] = {k: (pred_b[i][k] - pred_a[i][k]) / (r["seqs"] * d)
                             for k in pred_b[i]}
    return {"layout": cfg["layout"], "preset": cfg["preset"], "batch": cfg["batch"],
            "prompt_len": plen, "decode_steps": d, "ranks": ranks, "mpi": harness.mpi_version()}


def rows_of(res) -> list[dict]:
    """Flat records: one per (rank, kind, phase)."""
    out = []
    for r in res["ranks"]:
        for phase in ("decode", "prefill"):
            meas, exact = r[phase], r[f"exact_{phase}"]
            for kind in sorted(set(meas) | set(SEED_KINDS)):
                m, s = meas.get(kind, 0.0), r["seed"].get(kind)
                if m == 0 and not s:
                    continue
                e = exact.get(kind)
                out.append({"layout": res["layout"], "rank": r["rank"], "phase": phase,
                            "stage": r["coords"]["pp"], "tp_rank": r["coords"]["tp"],
                            "kind": kind, "measured_bytes_per_token": m,
                            "seed_bytes_per_token": s, "exact_bytes_per_token": e,
                            "ratio": (m / s) if s else None,
                            "matches_exact": None if e is None else abs(m - e) < 1e-6})
    return out


def table(res, records) -> str:
    lay = ",".join(f"{k}={v}" for k, v in res["layout"].items() if v > 1) or "single"
    lines = [f"layout {lay}: {res['preset']}, {res['batch']} prompts of {res['prompt_len']} "
             f"tokens, {res['decode_steps']} decode steps; bytes SENT per rank per token of "
             "its replica",
             " phase   | rank | stage tp | kind               | measured B/tok |  seed B/tok |"
             " ratio | = exact",
             "---------+------+----------+--------------------+----------------+-------------+"
             "-------+--------"]
    for r in records:
        ratio = "  n/a" if r["ratio"] is None else f"{r['ratio']:5.2f}"
        seed = "not in seed" if r["seed_bytes_per_token"] is None else \
            f"{r['seed_bytes_per_token']:.1f}"
        ex = {None: "  -", True: "  yes", False: "  NO"}[r["matches_exact"]]
        lines.append(f" {r['phase']:7s} | {r['rank']:4d} | {r['stage']:5d} {r['tp_rank']:2d} | "
                     f"{r['kind']:18s} | {r['measured_bytes_per_token']:14.1f} | {seed:>11s} | "
                     f"{ratio} | {ex}")
    return "\n".join(lines)


def parse_args(argv):
    p = harness.parser(__doc__, rounds=False, timeout=600, quick="one small layout (smoke test)")
    p.add_argument("--preset", default="builtin-moe")
    p.add_argument("--layout", type=parse_layout, action="append",
                   help="e.g. tp=2,pp=2 (repeat); default tp=2,pp=2, tp=2,dp=2,ep=4 "
                   "and tp=4")
    p.add_argument("--batch", type=int, default=4, help="prompts")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode", type=int, default=8, help="decode steps D")
    args = p.parse_args(argv)
    if not args.layout:
        args.layout = [parse_layout(t) for t in ("tp=2,pp=2", "tp=2,dp=2,ep=4", "tp=4")]
    if args.quick:
        args.layout, args.decode, args.prompt_len = [parse_layout("tp=2,dp=1,ep=2")], 2, 6
    return args


def main(args) -> int:
    results, kinds = [], set()
    for lay in args.layout:
        n = lay["tp"] * lay["pp"] * lay["dp"]
        cfg = {"preset": args.preset, "layout": lay, "batch": args.batch,
               "prompt_len": args.prompt_len, "decode": args.decode}
        res = harness.launch_worker(HERE, n, cfg, args.timeout)
        recs = rows_of(res)
        results.append({**{k: res[k] for k in ("layout", "preset", "batch", "prompt_len",
                                               "decode_steps", "mpi")}, "records": recs})
        print(table(res, recs))
        print()
        kinds |= {r["kind"] for r in recs}
    print("why a ratio is not 1.00 (one BLAS thread per rank; " + results[-1]["mpi"] + "):")
    for k in sorted(kinds):
        why = WHY.get(k) or ("not in the seed: the header (dtype, shape) p2p sends before "
                             "every array" if k.endswith("_header") else "")
        print(f"  {k:18s} {why}")
    bad = [r for res in results for r in res["records"] if r["matches_exact"] is False]
    print(f"measured == exact prediction: {'all' if not bad else f'{len(bad)} MISMATCHES'}")
    harness.write_json(args.json, {"benchmark": "ledger", "why": WHY, "layouts": results})
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(harness.run(parse_args, worker, main))
