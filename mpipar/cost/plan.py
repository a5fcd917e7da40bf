"""Deployment planner: every valid (tp, pp, dp, ep) for a model on G GPUs, ranked.

    python -m mpipar.cost.plan --model qwen3-235b-a22b --gpus 16 --gpu-mem-gb 80 \\
        --gpus-per-node 8 [--dtype bf16] [--reserve-gb 0] [--json out.json]
    python -m mpipar.cost.plan --model qwen3-235b-a22b --gpus 16 --machine h100-node \\
        [--prompt-len 2048 --batch 1 --new-tokens 256 --optimise throughput]

``--model``: a preset name (mpipar.model.config.PRESETS) or a config.json / model folder.

Valid layouts: tp*pp*dp = G and those ``parallel.shard.check_layout`` accepts (tp divides
the query heads; kv heads and tp, one divides the other; pp <= layers; ep divides tp*dp
and the expert count, ep = 1 for dense models). For each, per GPU (the fullest stage;
memory.py, traffic.py): weight GB, free GB = gpu_mem - weights - reserve, KV-cache bytes per
token, the tokens of KV cache that fit (per DP replica: min over stages of free / kv-per-
token), and the seed's communication bytes per token (sent + received, per token of the
GPU's own DP replica, busiest stage) for tp all-reduce, pp send/recv and ep all-to-all.

Ranking (lexicographic, printed with the table; ``RANKING`` holds each rule's words and
its sort key together, so the printed rule and the sort cannot drift apart):
  1. fits (free > 0 on every stage);
  2. TP inside a node (no TP group spans two nodes: NVLink, not the network);
  3. no kv-head duplication (tp <= kv heads: no KV cache memory spent on copies);
  4. larger tp (decode reads every weight once per token: time ~ weights/tp; PP does
     not cut it -- the seed's argument for TP);
  5. fewer communication bytes per token per GPU;
  6. more KV-cache tokens in total (dp * per replica); then smaller pp, dp, ep.
With ``--machine`` (a name in mpipar/cost/machines/ or a JSON file; its GPU memory and GPUs
per node are the defaults) each fitting layout also gets the time model's figures
(time.layout_times): the largest batch per replica whose KV cache (prompt +
new tokens) fits, TTFT of ``--batch`` prompts (best chunk count), TPOT at ``--batch``,
and decode tokens/s at the largest batch; the rows are then ranked by ``--optimise``
(ttft, tpot: smaller first; throughput: larger first), RULE breaking ties.
For Qwen3-235B-A22B this gives the seed's choice: 16 GPUs -> tp=4, pp=4 first; on 8 GPUs,
tp=8 leaves 21.04 GB, the seed's 80 - 235*2/8 = 21.25 less 0.02 GB for the exact 235.09e9
parameters and 0.19 GB for what tp=8 replicates (kv heads x2, router, norms).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..comm.dtypes import FLOAT_DTYPES, dtype_size
from ..layout import Layout, LayoutError
from ..parallel.shard import check_layout, kv_heads_per_rank, kv_replication, stage_layers
from .memory import kv_cache_bytes_per_token, param_counts, rank_params, weight_bytes_per_rank
from .traffic import comm_per_token

GB = 1e9
# The ranking rule: (its words, its sort key; smaller sorts first), best first.
RANKING = (
    ("fits", lambda r: not r["fits"]),
    ("TP inside a node", lambda r: r["tp_crosses_nodes"]),
    ("no kv-head duplication", lambda r: r["kv_dup"] > 1),
    ("larger tp", lambda r: -r["tp"]),
    ("fewer comm bytes per token per GPU", lambda r: r["comm_bytes_per_token"]["total"]),
    ("more KV tokens (total)", lambda r: -r["kv_tokens_total"]),
    ("smaller pp, dp, ep", lambda r: (r["pp"], r["dp"], r["ep"])),
)
RULE = " > ".join(words for words, _ in RANKING)


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def _crosses(group: int, gpus: int, per_node: int) -> bool:
    """Do the contiguous rank blocks [g*group, (g+1)*group) straddle node boundaries?"""
    return any(g // per_node != (g + group - 1) // per_node for g in range(0, gpus, group))


def layouts(config, gpus: int):
    """Every valid Layout for ``config`` on ``gpus`` ranks."""
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            for ep in _divisors(tp * dp) if config.is_moe else [1]:
                layout = Layout(tp=tp, pp=pp, dp=dp, ep=ep)
                try:
                    check_layout(config, layout)      # the engine's own rules
                except LayoutError:
                    continue
                yield layout


def evaluate(config, layout, gpu_mem_gb: float, gpus_per_node: int, dtype="bf16",
             reserve_gb: float = 0.0) -> dict:
    """One row of the plan (all numbers per GPU; bytes are exact integers or floats)."""
    b = dtype_size(dtype)
    cap = gpu_mem_gb * GB - reserve_gb * GB
    weights, frees, tokens, comms = [], [], [], []
    for s in range(layout.pp):
        w = weight_bytes_per_rank(config, layout, b, stage=s)
        kv = kv_cache_bytes_per_token(config, layout, b, stage=s)
        weights.append(w)
        frees.append(cap - w)
        tokens.append(max(int((cap - w) // kv), 0))
        comms.append(comm_per_token(config, layout, b, s))
    busiest = max(range(layout.pp), key=lambda s: sum(t.total for t in comms[s].values()))
    comm = {k: t.total for k, t in comms[busiest].items()}
    dup = kv_replication(config, layout.tp)
    row = dict(tp=layout.tp, pp=layout.pp, dp=layout.dp, ep=layout.ep,
               weight_gb=max(weights) / GB, free_gb=min(frees) / GB,
               kv_bytes_per_token=kv_cache_bytes_per_token(config, layout, b),
               kv_tokens=min(tokens), kv_tokens_total=layout.dp * min(tokens),
               comm_bytes_per_token={**comm, "total": sum(comm.values())},
               busiest_stage=busiest, kv_dup=dup,
               tp_crosses_nodes=_crosses(layout.tp, layout.world, gpus_per_node),
               ep_crosses_nodes=layout.ep > 1 and _crosses(layout.ep, layout.world,
                                                            gpus_per_node),
               fits=min(frees) > 0)
    flags = []
    if dup > 1:
        flags.append(f"kv-dup x{dup}")
    if row["tp_crosses_nodes"]:
        flags.append("tp-crosses-nodes")
    if row["ep_crosses_nodes"]:
        flags.append("ep-crosses-nodes")
    if not row["fits"]:
        flags.append("no-fit")
    row["flags"] = flags
    return row


def rank_key(row: dict) -> tuple:
    """Sort key of RULE (smaller sorts first): the keys of ``RANKING`` in turn."""
    return tuple(key(row) for _, key in RANKING)


def plan(config, gpus: int, gpu_mem_gb: float, gpus_per_node: int, dtype="bf16",
         reserve_gb: float = 0.0) -> list[dict]:
    """All valid layouts, evaluated and sorted by RULE; each row gets its 1-based rank."""
    rows = sorted((evaluate(config, lay, gpu_mem_gb, gpus_per_node, dtype, reserve_gb)
                   for lay in layouts(config, gpus)), key=rank_key)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


OBJECTIVES = {"ttft": ("ttft_s", 1), "tpot": ("tpot_s", 1), "throughput": ("tokens_per_s", -1)}


def add_times(rows: list[dict], config, machine, prompt_len: int, batch: int,
              new_tokens: int, dtype="bf16", chunks: int = 0,
              optimise: str = "throughput", ep_imbalance: float = 1.0) -> list[dict]:
    """Time columns for the rows that fit (time.layout_times), re-ranked by
    ``optimise``; rows that do not fit keep their RULE order at the end."""
    from .time import layout_times
    b = dtype_size(dtype)
    for r in rows:
        if r["fits"]:
            lay = Layout(tp=r["tp"], pp=r["pp"], dp=r["dp"], ep=r["ep"])
            r.update(layout_times(machine, config, lay, r["kv_tokens"], prompt_len,
                                     batch, new_tokens, b, chunks, ep_imbalance))
    key, sign = OBJECTIVES[optimise]
    rows = sorted(rows, key=lambda r: (not r["fits"], sign * r.get(key, 0), rank_key(r)))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def format_time_table(rows: list[dict]) -> str:
    head = (f"{'#':>3} {'tp':>3} {'pp':>3} {'dp':>3} {'ep':>3} {'free':>8} {'KV B/tok':>9} "
            f"{'max B':>6} {'TTFT ms':>9} {'K':>3} {'TPOT ms':>8} {'tok/s':>9}  flags")
    out = [head, "-" * len(head)]
    for r in rows:
        times = (f"{r['max_batch']:>6} {1e3 * r['ttft_s']:>9.1f} {r['prefill_chunks']:>3} "
                 f"{1e3 * r['tpot_s']:>8.2f} {r['tokens_per_s']:>9.0f}") if r["fits"] else \
            f"{'-':>6} {'-':>9} {'-':>3} {'-':>8} {'-':>9}"
        out.append(f"{r['rank']:>3} {r['tp']:>3} {r['pp']:>3} {r['dp']:>3} {r['ep']:>3} "
                   f"{_fmt_bytes(r['free_gb'] * GB):>8} {r['kv_bytes_per_token']:>9} "
                   f"{times}  {' '.join(r['flags'])}")
    return "\n".join(out)


def _fmt_bytes(x: float) -> str:
    """Bytes with a decimal unit: 21.04G, 16.38K, -37.62G."""
    for unit, f in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.2f}{unit}"
    return f"{x:.0f}"


def summary(config, gpus: int, gpu_mem_gb: float, dtype="bf16") -> list[str]:
    """Header lines: parameter counts, the seed's even-split arithmetic, units."""
    b = dtype_size(dtype)
    p = param_counts(config)
    nominal = round(p.total / 1e9)
    even = p.total * b / gpus / GB
    seed = (f"nominal {nominal}e9: {gpu_mem_gb:g} - {nominal}*{b}/{gpus} = "
            f"{gpu_mem_gb - nominal * b / gpus:.2f} GB free; " if nominal else "")
    moe = (f", {config.num_experts} experts top-{config.num_experts_per_tok}"
           if config.is_moe else "")
    return [
        f"model {config.name or '?'}: {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_heads} q / {config.num_kv_heads} kv heads{moe}",
        f"parameters: {p.total:,} total ({p.total / 1e9:.2f}e9), {p.active:,} active per token, "
        f"{p.non_embedding:,} without embedding/lm_head",
        f"weights in {b}-byte elements split evenly over {gpus} GPUs: {seed}exact count: "
        f"{gpu_mem_gb:g} - {even:.4g} = {gpu_mem_gb - even:.4g} GB free",
        "per-GPU rows below add what a layout replicates (router, norms, kv heads when "
        "tp > kv heads) and uneven stages / embedding on stage 0, lm_head on the last",
        "units: G/M/K = 1e9/1e6/1e3 bytes; weights, free: per GPU, fullest stage; comm = "
        "bytes sent + received per token of the GPU's own DP "
        "replica (seed formulas, busiest stage); KV tok = tokens of KV cache per replica",
        f"sorted by: {RULE}",
    ]


def format_table(rows: list[dict]) -> str:
    head = (f"{'#':>3} {'tp':>3} {'pp':>3} {'dp':>3} {'ep':>3} {'weights':>9} {'free':>9} "
            f"{'KV B/tok':>9} {'KV tok':>9} {'tp B/tok':>9} {'pp B/tok':>9} {'ep B/tok':>9} "
            f"{'all B/tok':>9}  flags")
    out = [head, "-" * len(head)]
    for r in rows:
        c = r["comm_bytes_per_token"]
        out.append(
            f"{r['rank']:>3} {r['tp']:>3} {r['pp']:>3} {r['dp']:>3} {r['ep']:>3} "
            f"{_fmt_bytes(r['weight_gb'] * GB):>9} {_fmt_bytes(r['free_gb'] * GB):>9} "
            f"{r['kv_bytes_per_token']:>9} "
            f"{r['kv_tokens']:>9} {_fmt_bytes(c['tp']):>9} {_fmt_bytes(c['pp']):>9} "
            f"{_fmt_bytes(c['ep']):>9} {_fmt_bytes(c['total']):>9}  {' '.join(r['flags'])}")
    return "\n".join(out)


def explain(config, layout, dtype="bf16") -> list[str]:
    """Per-component parameters of the fullest rank of each stage, and what is replicated."""
    b = dtype_size(dtype)
    comps = ("attention", "norms", "dense_mlp", "router", "experts", "embedding", "lm_head")
    lines = [f"layout tp={layout.tp} pp={layout.pp} dp={layout.dp} ep={layout.ep}: "
             "parameters per GPU (fullest tp rank of each stage)",
             f"{'stage':>5} {'layers':>7} " + " ".join(f"{k:>13}" for k in comps)
             + f" {'GB':>8}"]
    for s, rng in enumerate(stage_layers(config.num_layers, layout.pp)):
        p = rank_params(config, layout, s)
        lines.append(f"{s:>5} {f'{rng.start}-{rng.stop - 1}':>7} "
                     + " ".join(f"{p[k]:>13,}" for k in comps)
                     + f" {sum(p.values()) * b / GB:>8.3f}")
    dup = kv_replication(config, layout.tp)
    first = len(stage_layers(config.num_layers, layout.pp)[0])
    # k, v params of stage 0 beyond an even 1/tp split of the kv heads (0 without dup)
    extra = first * 2 * config.hidden_size * config.head_dim * (
        kv_heads_per_rank(config, layout.tp) - config.num_kv_heads / layout.tp)
    lines.append(f"replicated on every rank: norms, q/k norms, router; kv heads: each on {dup} "
                 f"rank(s) (+{extra:,.0f} params = {extra * b / GB:.3f} GB on stage 0 over a "
                 "1/tp split)")
    return lines


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"mpipar.cost.plan: error: {message}\n")


def _load_model(arg: str):
    from ..model.config import PRESETS, ConfigError, get_preset, load_config
    if arg in PRESETS:
        return get_preset(arg)
    from ..model.checkpoint import CheckpointError
    from ..model.gguf import GGUFSource, gguf_path
    try:
        if os.path.exists(arg) and gguf_path(arg) is not None:
            return GGUFSource(gguf_path(arg)).config  # the metadata; tensors stay on disk
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if os.path.exists(arg):
        return load_config(arg)
    raise ConfigError(f"--model {arg!r}: not a preset (known: {', '.join(PRESETS)}) "
                      "and no such config.json or folder")


def main(argv=None) -> int:
    ap = _Parser(prog="python -m mpipar.cost.plan",
                 description="Rank every (tp, pp, dp, ep) layout of a model on a GPU count.")
    ap.add_argument("--model", required=True, help="preset name, path to config.json, "
                    "a model folder or a .gguf file")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu-mem-gb", type=float, help="per GPU, 1e9 bytes (default: the "
                    "machine's, else 80)")
    ap.add_argument("--gpus-per-node", type=int, help="default: the machine's, else 8")
    ap.add_argument("--machine", help="machine name (mpipar/cost/machines/) or JSON file: adds "
                    "TTFT, TPOT, tokens/s and ranks by --optimise")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1, help="sequences for TTFT and TPOT")
    ap.add_argument("--new-tokens", type=int, default=256,
                    help="generated per sequence (KV cache holds prompt + these)")
    ap.add_argument("--prefill-chunks", type=int, default=0,
                    help="chunks for TTFT (0: the best of 1, 2pp, 4pp, 8pp)")
    ap.add_argument("--optimise", choices=sorted(OBJECTIVES), default="throughput")
    ap.add_argument("--ep-imbalance", type=float, default=1.0,
                    help="rows of the most loaded EP rank / the mean (1: uniform routing)")
    ap.add_argument("--max-ep", type=int, default=0,
                    help="only layouts with ep <= this (0: all); 1: TP/PP/DP only")
    ap.add_argument("--dtype", default="bf16", choices=list(FLOAT_DTYPES))
    ap.add_argument("--reserve-gb", type=float, default=0.0,
                    help="per GPU, kept for activations/workspace (the seed keeps 0)")
    ap.add_argument("--top", type=int, default=0, help="print only the first N rows")
    ap.add_argument("--json", help="also write the plan as JSON to this file")
    ap.add_argument("--explain", metavar="TP,PP,DP,EP",
                    help="also print the per-component weights of this layout")
    a = ap.parse_args(argv)
    machine = None
    if a.machine:
        from .machine import load_machine
        try:
            machine = load_machine(a.machine)
        except (ValueError, KeyError, OSError) as e:
            ap.error(f"--machine {a.machine!r}: {e}")
    a.gpu_mem_gb = a.gpu_mem_gb if a.gpu_mem_gb is not None else \
        machine.gpu_memory_gb if machine else 80.0
    a.gpus_per_node = a.gpus_per_node if a.gpus_per_node is not None else \
        machine.gpus_per_node if machine else 8
    for name, v, lo in (("--gpus", a.gpus, 1), ("--gpus-per-node", a.gpus_per_node, 1),
                        ("--top", a.top, 0), ("--prompt-len", a.prompt_len, 1),
                        ("--batch", a.batch, 1), ("--new-tokens", a.new_tokens, 1),
                        ("--prefill-chunks", a.prefill_chunks, 0), ("--max-ep", a.max_ep, 0)):
        if v < lo:
            ap.error(f"{name} must be >= {lo}, got {v}")
    if not a.ep_imbalance >= 1:
        ap.error(f"--ep-imbalance must be >= 1, got {a.ep_imbalance:g}")
    if not a.gpu_mem_gb > 0 or not 0 <= a.reserve_gb < a.gpu_mem_gb:
        ap.error(f"need --gpu-mem-gb > 0 and 0 <= --reserve-gb < it, got {a.gpu_mem_gb:g}, "
                 f"{a.reserve_gb:g}")
    try:
        config = _load_model(a.model)
    except ValueError as e:  # ConfigError
        ap.error(str(e))
    lay = None
    if a.explain:
        try:
            lay = Layout(*(int(x) for x in a.explain.split(",")))
            if lay.world != a.gpus:
                raise ValueError(f"tp*pp*dp = {lay.world}, not --gpus {a.gpus}")
            rank_params(config, lay, 0)
        except (ValueError, TypeError) as e:
            ap.error(f"--explain {a.explain!r}: {e}")
    rows = plan(config, a.gpus, a.gpu_mem_gb, a.gpus_per_node, a.dtype, a.reserve_gb)
    if a.max_ep:
        rows = [r for r in rows if r["ep"] <= a.max_ep]
        for i, r in enumerate(rows, 1):
            r["rank"] = i
    print("\n".join(summary(config, a.gpus, a.gpu_mem_gb, a.dtype)))
    if machine is None:
        print(format_table(rows[:a.top] if a.top else rows))
    else:
        rows = add_times(rows, config, machine, a.prompt_len, a.batch, a.new_tokens,
                         a.dtype, a.prefill_chunks, a.optimise, a.ep_imbalance)
        m = machine
        print(f"machine {m.name}: {m.rate(1e9) / 1e12:g} TFLOP/s, memory "
              f"{m.mem_read_Bps / 1e12:g} TB/s, intra-node {m.intra.bandwidth_Bps / 1e9:g} "
              f"GB/s, inter-node {m.inter.bandwidth_Bps / 1e9:g} GB/s per GPU; "
              f"prompt {a.prompt_len}, "
              f"batch {a.batch}, {a.new_tokens} new tokens; max B: sequences per replica "
              f"whose KV cache fits; tok/s: decode at max B; sorted by {a.optimise}")
        print(format_time_table(rows[:a.top] if a.top else rows))
    if lay is not None:
        print("\n".join(explain(config, lay, a.dtype)))
    if a.json:
        doc = dict(model=config.name, gpus=a.gpus, gpu_mem_gb=a.gpu_mem_gb,
                   gpus_per_node=a.gpus_per_node, dtype=a.dtype, reserve_gb=a.reserve_gb,
                   params=param_counts(config).total, rule=RULE, rows=rows,
                   machine=a.machine, optimise=a.optimise if machine else None)
        try:
            with open(a.json, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
        except OSError as e:
            ap.error(f"cannot write --json {a.json}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
