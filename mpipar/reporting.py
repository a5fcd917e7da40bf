"""What a run prints and writes: the layout, tokens, timings, and the ledger beside the
cost model's prediction, per rank.

Files (world rank 0 only):
- ``--json FILE``: tokens, ttft_s, tpot_s, tokens_per_s, check, layout, and ``ledger``:
  for each kind, ``measured_bytes`` and ``predicted_bytes`` lists indexed by world rank
  (bytes sent by that rank), plus per-rank placement and expert load.
- ``--save-logits FILE.npz``: prompt_logits [B, L, V] (NaN past a prompt's end),
  decode_logits [B, new, V], tokens [B, new].
"""

from __future__ import annotations

import json

import numpy as np

from .cost.traffic import PREDICTED_KINDS, predict_rank


def run_record(args, config, layout, gen, per_rank, verdict, load_s, hosts) -> dict:
    ledger = {}
    predicted = [predict_rank(config, layout, r) for r in per_rank]
    kinds = sorted({k for r in per_rank for k in r["ledger"]} | set(PREDICTED_KINDS))
    for kind in kinds:
        ledger[kind] = {
            "measured_bytes": [r["ledger"].get(kind, {}).get("sent_bytes", 0) for r in per_rank],
            "received_bytes": [r["ledger"].get(kind, {}).get("recv_bytes", 0) for r in per_rank],
            "seconds": [r["ledger"].get(kind, {}).get("seconds", 0.0) for r in per_rank],
            "predicted_bytes": [p.get(kind) for p in predicted],
        }
    pairs = np.sum([r["expert_pairs"] for r in per_rank], axis=0) if config.is_moe else []
    rows = [r["pairs_computed"] for r in per_rank]  # (token, expert) pairs per rank
    return {
        "model": config.name or "checkpoint",
        "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep,
                   "world": layout.world},
        "tokens": gen.tokens.tolist(),
        "ttft_s": gen.ttft_s, "tpot_s": gen.tpot_s, "tokens_per_s": gen.tokens_per_s,
        "load_s": load_s,
        "check": verdict,
        "prefill_chunks": args.prefill_chunks,
        "dtype": per_rank[0].get("dtype", "float32"),
        "eplb": {"redundant_experts": getattr(args, "redundant_experts", 0),
                 "window": getattr(args, "eplb_window", 0)},
        "ledger": ledger,
        "ranks": [{"rank": r["rank"], "host": hosts[r["rank"]], **r["coords"],
                   "layers": r["layers"], "experts": r["experts"], "kv_heads": r["kv_heads"],
                   "kv_cache_bytes": r["kv_cache_bytes"],
                   "kv_replication": r["kv_replication"],
                   "expert_slots": r["expert_slots"]} for r in per_rank],
        "expert_load": _load(pairs, rows, layout) if config.is_moe else None,
    }


def _load(pairs, rows, layout) -> dict:
    pairs = np.asarray(pairs, dtype=np.int64)
    out = {"pairs_per_expert": pairs.tolist(),
           "expert_max_over_mean": float(pairs.max() / pairs.mean()) if pairs.sum() else 0.0}
    if layout.ep > 1:
        r = np.asarray(rows, dtype=np.int64)
        out["rows_per_rank"] = r.tolist()
        busy = r[r > 0] if r.sum() else r
        out["rank_max_over_mean"] = float(busy.max() / busy.mean()) if r.sum() else 0.0
    return out


def print_report(rec, gen, per_rank, quiet=False) -> None:
    lay = rec["layout"]
    if not quiet:
        print("placement:")
        print(" rank | host         | stage layers   | kv heads | experts  | KV cache")
        for r in rec["ranks"]:
            print(f" {r['rank']:4d} | {r['host'][:12]:12s} | {r['pp']:5d} {_rng(r['layers']):8s}"
                  f" | {_rng(r['kv_heads']):8s} | {_rng(r['experts']):8s} | "
                  f"{r['kv_cache_bytes'] / 1024:.1f} KiB")
        if _uses_eplb(rec):  # redundant copies or rebalancing: slots are not a range
            for r in rec["ranks"]:
                print(f"rank {r['rank']} expert slots (first MoE layer, at the end): "
                      f"{r['expert_slots']}")
        rep = max(r["kv_replication"] for r in rec["ranks"])
        if rep > 1:
            kv = sum(r["kv_cache_bytes"] for r in rec["ranks"])
            print(f"kv heads replicated: tp={lay['tp']} > kv heads, so each kv head and its "
                  f"cache live on {rep} TP ranks; of {kv / 1024:.1f} KiB of KV cache in the "
                  f"job, {kv * (rep - 1) / rep / 1024:.1f} KiB are copies (x{rep} memory)")
    for i, row in enumerate(rec["tokens"]):
        print(f"tokens[{i}]: {' '.join(map(str, row))}")
    print(f"time to first token {rec['ttft_s'] * 1e3:.2f} ms, time per output token "
          f"{rec['tpot_s'] * 1e3:.2f} ms, {rec['tokens_per_s']:.1f} tokens/s "
          f"(tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} ep={lay['ep']}, "
          f"prefill chunks {rec['prefill_chunks']}, {rec['dtype']})")
    if not quiet:
        print("bytes sent per rank, measured / predicted by the cost model "
              "(- : not in the seed's model; headers and counts in --json):")
        kinds = [k for k, v in rec["ledger"].items()  # model traffic; the rest is in --json
                 if not k.endswith(("_header", "_counts")) and k != "result"
                 and (any(v["measured_bytes"]) or any(p for p in v["predicted_bytes"] if p))]
        print(" rank | " + " | ".join(f"{k:>21s}" for k in kinds))
        for r in range(lay["world"]):
            cells = []
            for k in kinds:
                m, p = rec["ledger"][k]["measured_bytes"][r], rec["ledger"][k]["predicted_bytes"][r]
                cells.append(f"{m:>10d} / {'-' if p is None else p:>8}")
            print(f" {r:4d} | " + " | ".join(cells))
        if rec["expert_load"]:
            el = rec["expert_load"]
            print(f"expert load: (token, expert) pairs per expert {el['pairs_per_expert']}, "
                  f"max/mean {el['expert_max_over_mean']:.2f}")
            if "rows_per_rank" in el:
                print(f"EP (token, expert) pairs computed per rank {el['rows_per_rank']}, "
                      f"max/mean {el['rank_max_over_mean']:.2f}")
    mismatch = [k for k, v in rec["ledger"].items()
                if any(p is not None and p != m
                       for m, p in zip(v["measured_bytes"], v["predicted_bytes"], strict=True))]
    if mismatch:
        print(f"ledger differs from the cost model for: {', '.join(mismatch)}")
    else:
        print("ledger equals the cost model for every predicted kind")
    print(f"check: {rec['check']}")


def _uses_eplb(rec) -> bool:
    return bool(rec.get("eplb", {}).get("redundant_experts") or
                rec.get("eplb", {}).get("window"))


def _rng(r) -> str:
    return "-" if r[1] <= r[0] else (str(r[0]) if r[1] - r[0] == 1 else f"{r[0]}-{r[1] - 1}")


def write_outputs(args, gen, rec) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)
    if args.save_logits:
        np.savez(args.save_logits, prompt_logits=gen.prompt_logits.astype(np.float32),
                 decode_logits=gen.decode_logits.astype(np.float32),
                 tokens=gen.tokens.astype(np.int64))
