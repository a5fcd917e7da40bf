"""Single-process speed: prefill and decode tokens/s of mpipar's forward on one rank,
as fractions of what this machine's one core can do, beside transformers on PyTorch.

    python programs/bench_single_rank.py [--preset bench-166m] [--prompt-len 256] \\
        [--decode 32] [--torch auto|off] [--json single.json] [--quick]

Model: "bench-166m" (hidden 1024, 8 layers, 16/8 heads, head_dim 64, intermediate
3072, vocab 32000, float32, random weights). The engine runs on one rank
(ParallelModel over MPI.COMM_SELF; no mpirun needed, no communication).

Roofline of one core, measured in the same run:
  prefill   compute-bound. Work = 2 * (matmul weights of the layers) * N + the causal
            attention (2 * N^2 * H * d per layer: QK^T and PV over half the square)
            + the lm_head of the last token. Fraction = (work / TTFT) / sgemm GFLOP/s,
            the sgemm measured on the prefill's own shape [N, h] x [h, I].
  decode    memory-bound. Bytes = every weight read once per token (layers, final
            norm, lm_head; the embedding row is negligible). Fraction = (bytes / TPOT)
            / copy bandwidth, where copy bandwidth counts bytes read + written
            (``bench.machine.copy_bandwidth``, STREAM's convention); the matrix-vector
            read bandwidth of a large float32 sgemv is printed beside it.

The alternative a user would pick is transformers on PyTorch CPU, one thread (seeded
here as 28 ms per decode token and 377 prefill tokens/s of 256 tokens). With ``--torch
auto`` (default), when torch and transformers import, the same shape (Qwen3ForCausalLM,
float32, random init, sdpa attention, ``torch.set_num_threads(1)``, logits of the last
token only) is timed in the same rounds as mpipar, one after the other, so both see the
same machine; otherwise that row says why it is absent. Never a dependency.

Medians after a warm-up over ``--repeats`` quiet rounds: a round counts when other
processes kept fewer than 0.2 cores busy meanwhile (``LoadProbe``: /proc/stat busy time
minus this process's CPU time); up to 4x as many rounds are tried. One core's limits:
``bench.machine.one_core_limits``. Harness (flags, one BLAS thread): mpipar/bench/.
"""

from __future__ import annotations

import sys
import time

from mpipar.bench import harness
from mpipar.bench.machine import QUIET_CORES, LoadProbe, machine, one_core_limits, quiet_rounds

SEEDED_TORCH = {"decode_ms_per_token": 28.0, "prefill_tokens_per_s": 377.0}


def once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def work(config, n: int) -> dict:
    """Prefill flops of n tokens and decode bytes per token (module docstring)."""
    from mpipar.cost.memory import param_counts
    c, pc = config, param_counts(config)
    layer_mm = sum(pc.per_layer) - c.num_layers * (pc.layer_norms + 2 * c.head_dim)
    attn = c.num_layers * 2 * n * n * c.num_heads * c.head_dim  # causal: half of 4*n^2*H*d
    head = 2 * c.vocab_size * c.hidden_size
    weights = sum(pc.per_layer) + pc.final_norm + c.vocab_size * c.hidden_size  # lm_head
    return {"prefill_flops": 2 * layer_mm * n + attn + head, "decode_bytes": 4 * weights}


def mpipar_runner(source, prompt, decode: int):
    """-> round function of the engine on one rank: {"ttft_s", "tpot_s"}."""
    from mpi4py import MPI

    from mpipar.layout import Layout, make_comms
    from mpipar.parallel.rank_model import ParallelModel
    from mpipar.serve import offline
    model = ParallelModel(make_comms(Layout(), MPI.COMM_SELF), source)
    offline.generate(model, [prompt], 1 + decode)  # warm-up
    return lambda: {"ttft_s": offline.generate(model, [prompt], 1).ttft_s,
                    "tpot_s": offline.generate(model, [prompt], 1 + decode).tpot_s}


def torch_runner(config, prompt, decode: int):
    """-> round function of transformers' Qwen3ForCausalLM on PyTorch CPU, one thread
    (prefill of the prompt, then greedy decode with the cache); raises ImportError."""
    import inspect

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.set_num_threads(1)
    c = config
    hf = Qwen3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                     num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                     num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                     intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps,
                     rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
                     max_position_embeddings=c.max_position_embeddings)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(hf).to(torch.float32).eval()
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    ids = torch.tensor([prompt], dtype=torch.long)

    def prefill():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)

    def run_decode():
        out = prefill()
        t = time.perf_counter()
        for _ in range(decode):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: cache})
        return (time.perf_counter() - t) / decode

    def one_round():
        with torch.no_grad():
            return {"ttft_s": once(prefill), "tpot_s": run_decode()}

    one_round()  # warm-up
    return one_round


def compare(runners: dict, repeats: int, patience: int) -> dict:
    """Time every implementation in the same rounds (one after the other in each round),
    so a disturbance of the machine hits all of them -> {impl: medians and samples}."""
    def one_round():
        return {f"{name} {k}": v for name, run in runners.items() for k, v in run().items()}

    res = quiet_rounds(LoadProbe(), repeats, one_round, patience)
    out = {}
    for name in runners:
        out[name] = {k: res["median"][f"{name} {k}"] for k in ("ttft_s", "tpot_s")}
        out[name].update({f"{k}_all_s": [r[f"{name} {k}_s"] for r in res["all"]]
                          for k in ("ttft", "tpot")})
        out[name].update(round_other_load_cores=res["loads"], quiet_rounds=res["quiet"])
    return out


def parse_args(argv):
    p = harness.parser(__doc__, workers=False, timeout=None)
    p.add_argument("--preset", default="bench-166m")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode", type=int, default=32, help="decode tokens timed")
    p.add_argument("--torch", choices=("auto", "off"), default="auto")
    p.add_argument("--buffer-mib", type=int, default=512, help="bandwidth test buffer")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.prompt_len, args.decode, args.repeats = "builtin-moe", 32, 4, 1
        args.torch, args.buffer_mib, args.patience = "off", 16, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    meta = machine()  # before the runs: is anything else busy?
    from mpipar.model.init import open_model
    source = open_model(preset=args.preset)
    config = source.config
    prompt = harness.prompts_for(1, args.prompt_len, config.vocab_size)[0]
    inter = config.intermediate_size if not config.is_moe else config.moe_intermediate_size
    limits = one_core_limits(args.prompt_len, config.hidden_size, inter, args.buffer_mib,
                             args.repeats, args.patience, 256 if args.quick else 2048)
    w = work(config, args.prompt_len)
    runners = {"mpipar": mpipar_runner(source, prompt, args.decode)}
    skipped = None
    if args.torch == "auto" and config.is_moe:
        skipped = "the transformers comparison builds a dense Qwen3: dense presets only"
    elif args.torch == "auto":
        try:
            runners["transformers"] = torch_runner(config, prompt, args.decode)
        except ImportError as e:
            skipped = f"transformers/torch not installed ({e.name})"
    else:
        skipped = "--torch off"
    rows = compare(runners, args.repeats, args.patience)
    if "transformers" in rows:
        import torch
        import transformers
        rows["transformers"].update(torch=torch.__version__,
                                    transformers=transformers.__version__)
    records = []
    for name, r in rows.items():
        records.append({
            "impl": name, **r,
            "prefill_tokens_per_s": args.prompt_len / r["ttft_s"],
            "decode_tokens_per_s": 1 / r["tpot_s"],
            "prefill_fraction_of_sgemm": w["prefill_flops"] / r["ttft_s"] / 1e9
            / limits["sgemm_gflops"],
            "decode_fraction_of_copy_bw": w["decode_bytes"] / r["tpot_s"] / 1e9
            / limits["copy_gbs"]})
    print(f"bench_single_rank: {args.preset}, prompt {args.prompt_len} tokens, {args.decode} "
          f"decode tokens, median of {args.repeats} after a warm-up; {meta['cpu']}, "
          f"{meta['cores']} cores, {meta['memory_gib']} GiB; one thread")
    shapes = ", ".join(f"{k} {v:.0f}" for k, v in limits["sgemm_all"].items())
    print(f"machine, one core: sgemm {limits['sgemm_gflops']:.1f} GFLOP/s (best of: {shapes}); "
          f"copy {limits['copy_gbs']:.1f} GB/s (read+write); sgemv read "
          f"{limits['sgemv_read_gbs']:.1f} GB/s")
    print(f"work: prefill {w['prefill_flops'] / 1e9:.1f} GFLOP; decode "
          f"{w['decode_bytes'] / 1e6:.0f} MB of weights per token")
    print(" impl         | prefill tok/s | of sgemm | decode ms/tok | tok/s | of copy BW")
    print("--------------+---------------+----------+---------------+-------+-----------")
    for r in records:
        print(f" {r['impl']:12s} | {r['prefill_tokens_per_s']:13.1f} | "
              f"{r['prefill_fraction_of_sgemm']:8.2f} | {1e3 * r['tpot_s']:13.2f} | "
              f"{r['decode_tokens_per_s']:5.1f} | {r['decode_fraction_of_copy_bw']:9.2f}")
    if skipped:
        print(f" transformers | skipped: {skipped}")
    quiet = ", ".join(f"{n} {r['quiet_rounds']}/{len(r['round_other_load_cores'])}"
                      for n, r in (("machine limits", limits), *((r["impl"], r) for r in records)))
    print(f" quiet rounds (other load < {QUIET_CORES} cores) / rounds: {quiet}")
    print(f" (seeded: transformers {SEEDED_TORCH['prefill_tokens_per_s']:.0f} prefill tok/s, "
          f"{SEEDED_TORCH['decode_ms_per_token']:.0f} ms/token decode)")
    harness.write_report(args.json, "single_rank", meta, records, preset=args.preset,
                         limits=limits, work=w, seeded_transformers=SEEDED_TORCH,
                         torch_skipped=skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
