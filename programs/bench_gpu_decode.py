"""Decode on one GPU: ms per output token and the fraction of the HBM roofline reached.

    python programs/bench_gpu_decode.py [--device gpu|cpu] [--presets qwen3-8b,...]
        [--batches 1,64] [--ranks 1,4] [--new-tokens 12] [--json out.json]

Presets (random weights): qwen3-0.6b, qwen3-8b (dense: 36 layers, hidden 4096, 32/8
heads, intermediate 12288) and qwen3-30b-a3b (MoE: 128 experts, 8 per token), in
bfloat16 on a GPU. ``--device cpu`` is the dry run of the same code: tiny shapes with
the same structure (one dense, one MoE) in float32, which CI runs
(tests/test_benchmarks.py). With R ranks, all R share the one GPU (mpipar binds local
rank % GPUs): tp=R, and ep=R for the MoE model.

What is measured: a worker job per (preset, R) loads the model once, then for each batch
B runs one warm-up generate() (CuPy compiles its kernels) and one timed generate() of
``new_tokens`` (default 10) from prompts of 16 tokens; ms per output token = decode
time after the first token / (new_tokens - 1), on world rank 0 (all ranks keep pace).

Roofline: a memory-bound decode step reads every weight it uses once, so it takes at
least  bytes_step / B_copy,  with B_copy the device copy bandwidth measured first (a
1 GiB device-to-device copy, ``bench.machine.copy_bandwidth``: bytes read + written /
time, the best HBM streams reach)
and bytes_step the weights of the layers and the lm_head on all ranks (the embedding
reads only B rows; the KV cache is not counted: at 16 + 10 positions it is small). An
MoE layer reads only the experts that got tokens: under uniform routing
E (1 - (1 - k/E)^B) of its E experts (8 of 128 at B = 1, 126 at B = 64). fraction =
(bytes_step / B_copy) / measured time per token. Weights are a tiled random block
(``TiledWeights``): the speed does not depend on their values, and generating 8e9
normal values per run would take longer than the benchmark.

CUDA graphs: the decode step is not captured. A graph replays fixed kernels on fixed
addresses, and this step is not fixed: attention runs over the S cached positions, a
shape that grows every step, RoPE's positions are kernel arguments, an MoE layer brings
its expert counts to the host to run only the experts that got tokens, and with more
than one rank MPI calls sit between the kernels. Capturing needs a decode path with
device-side positions and lengths, attention over a fixed-capacity (paged) cache and a
fixed MoE schedule, on one rank or with device collectives (NCCL). What this step does
on the device instead: no host round-trip inside a layer (tests/test_device_syncs.py),
so CuPy's launches queue up ahead of the GPU; the one per-step sync is the token pick.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

# isort: off
from mpipar.bench import harness  # first: one BLAS thread per rank
import numpy as np
# isort: on

from mpipar.bench.machine import copy_bandwidth, sync
from mpipar.model.checkpoint import (
    WeightSource,
    as_dtype,
    check_index,
    expected_shapes,
)
from mpipar.model.config import ModelConfig, get_preset

HERE = os.path.abspath(__file__)
GPU_PRESETS = ("qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b")
CPU_PRESETS = {  # the GPU presets' structure at a size a CPU test can afford
    "tiny-dense": ModelConfig(name="tiny-dense", vocab_size=512, hidden_size=64,
                              num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16,
                              intermediate_size=128),
    "tiny-moe": ModelConfig(name="tiny-moe", vocab_size=512, hidden_size=64, num_layers=2,
                            num_heads=8, num_kv_heads=4, head_dim=16, intermediate_size=128,
                            model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=32, norm_topk_prob=True),
}
PROMPT_LEN = 16
POOL = 1 << 22  # values in the random block that every tensor tiles


def config_of(name: str) -> ModelConfig:
    return CPU_PRESETS[name] if name in CPU_PRESETS else get_preset(name)


class TiledWeights(WeightSource):
    """Every tensor filled by tiling one block of N(0, 1) values (scaled 1/sqrt(fan-in);
    norm weights 1 + 0.1 z): cheap to make at any size, deterministic, the same slice
    whatever slicing produced it (row r of a [R, C] tensor is elements r*C.. of the tile).
    A tensor of at most POOL values is a copy of a slice of a scaled, cast pool."""

    def __init__(self, config: ModelConfig, seed: int = 0):
        self.config = config
        self._shapes = expected_shapes(config)
        self._z = np.random.default_rng(seed).standard_normal(POOL, dtype=np.float32)
        self._pools = {}  # (fan-in or 0 for norms, dtype) -> two periods of the pool

    def describe(self) -> str:
        return f"tiled random weights of {self.config.name}"

    def _pool(self, fan_in: int, dtype) -> np.ndarray:
        key = (fan_in, np.dtype(dtype))
        if key not in self._pools:
            p = 1.0 + 0.1 * self._z if fan_in == 0 else self._z / np.float32(np.sqrt(fan_in))
            self._pools[key] = np.concatenate([p, p]).astype(dtype)
        return self._pools[key]

    def read(self, name, index=None, dtype="float32"):
        shape = tuple(self._shapes[self.resolve(name)])
        idx = check_index(name, shape, index)
        r0, r1, _ = (idx[0] if idx else slice(None)).indices(shape[0])
        n_rows, row = max(r1 - r0, 0), int(np.prod(shape[1:], dtype=np.int64))
        start, count = (r0 * row) % POOL, n_rows * row
        pool = self._pool(0 if len(shape) == 1 else shape[-1], as_dtype(dtype))
        if count <= POOL:
            flat = pool[start:start + count]
        else:
            flat = np.tile(pool[:POOL], -(-(start + count) // POOL))[start:start + count]
        block = flat.reshape((n_rows, *shape[1:]))
        return np.array(block[(slice(None), *idx[1:])] if len(idx) > 1 else block)


def step_weight_bytes(model, batch: int) -> float:
    """Bytes of weights this rank reads in one decode step of ``batch`` tokens."""
    c, total = model.config, 0.0
    for b in model.blocks:
        arrays = [b.norm1, b.norm2, *(a for a in vars(b.attn).values() if a is not None)]
        arrays += [b.moe.router] if b.moe else list(b.mlp)
        total += sum(a.nbytes for a in arrays)
        if b.moe:
            used = c.num_experts * (1 - (1 - c.num_experts_per_tok / c.num_experts) ** batch)
            slots = b.moe.slots  # this rank's experts (or expert slices)
            per_expert = sum(a.nbytes for w in slots for a in w) / max(len(slots), 1)
            total += per_expert * used * len(slots) / c.num_experts
    head = model.head
    if model.shard.last_stage:
        total += head.lm_head.nbytes + head.norm.nbytes
    if model.shard.first_stage:
        total += batch * head.embed.nbytes / max(head.embed.shape[0], 1)
    return total


def worker(cfg: dict):
    from mpi4py import MPI

    from mpipar import backend
    from mpipar.layout import Layout, make_comms
    from mpipar.parallel.rank_model import ParallelModel
    from mpipar.serve import offline
    world = MPI.COMM_WORLD
    n, transport, xp = world.Get_size(), None, np
    if cfg["device"] == "gpu":
        xp = backend.bind_gpu(world)[0]
        transport = backend.Transport(xp, backend.cuda_aware())
    config = config_of(cfg["preset"])
    layout = Layout(tp=n, ep=n if config.is_moe else 1)
    comms = make_comms(layout, world, xp=xp, transport=transport)
    if transport is not None:
        transport.ledger = comms.ledger
    bw = copy_bandwidth(cfg["copy_mib"], xp=xp) if world.rank == 0 else 0.0
    world.Barrier()
    t = time.perf_counter()
    model = ParallelModel(comms, TiledWeights(config), xp, dtype=cfg["dtype"])
    sync(xp)
    load_s = world.allreduce(time.perf_counter() - t, op=MPI.MAX)
    rows = []
    for batch in cfg["batches"]:
        prompts = harness.prompts_for(batch, PROMPT_LEN, config.vocab_size)
        offline.generate(model, prompts, 3)  # warm-up: kernels compiled, memory pools filled
        gen = offline.generate(model, prompts, cfg["new_tokens"])
        step_bytes = world.allreduce(step_weight_bytes(model, batch))
        if world.rank == 0:
            tpot = gen.tpot_s
            rows.append({"preset": cfg["preset"], "ranks": n, "batch": batch,
                         "layout": f"tp={layout.tp} ep={layout.ep}",
                         "dtype": model.dtype.name, "ms_per_token": tpot * 1e3,
                         "tokens_per_s": batch / tpot if tpot else 0.0,
                         "weight_gb_per_step": step_bytes / 1e9,
                         "copy_gbs": bw / 1e9,
                         "roofline_fraction": (step_bytes / bw) / tpot if tpot else 0.0,
                         "load_s": load_s})
    return {"rows": rows} if world.rank == 0 else None


def run(device: str, presets, batches, ranks, new_tokens: int, timeout: float) -> list:
    cfg = {"device": device, "batches": list(batches), "new_tokens": new_tokens,
           "dtype": "bfloat16" if device == "gpu" else "float32",
           "copy_mib": 1024 if device == "gpu" else 64}
    rows = []
    for preset in presets:
        for n in ranks:
            rows += harness.launch_worker(HERE, n, {**cfg, "preset": preset}, timeout)["rows"]
    return rows


def table(rows) -> list[str]:
    out = ["| preset | ranks | layout | dtype | batch | ms/token | tokens/s | weight GB/step "
           "| copy GB/s | roofline |", "|" + " --- |" * 10]
    for r in rows:
        out.append(f"| {r['preset']} | {r['ranks']} | {r['layout']} | {r['dtype']} | "
                   f"{r['batch']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | "
                   f"{r['weight_gb_per_step']:.3f} | {r['copy_gbs']:.0f} | "
                   f"{100 * r['roofline_fraction']:.1f}% |")
    return out


def parse_args(argv):
    ap = harness.parser(__doc__, rounds=False, timeout=300,
                        quick="the CPU dry run (--device cpu): tiny shapes, seconds")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--presets", help="comma-separated (default: the three Qwen3 shapes on "
                                      "a GPU, tiny-dense,tiny-moe on the CPU)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--ranks", default="1,4", help="ranks sharing the GPU")
    ap.add_argument("--new-tokens", type=int, default=10)
    args = ap.parse_args(argv)
    if args.quick:
        args.device = "cpu"
    return args


def main(args) -> int:
    presets = (args.presets.split(",") if args.presets else
               list(GPU_PRESETS) if args.device == "gpu" else list(CPU_PRESETS))
    rows = run(args.device, presets, harness.ints(args.batches), harness.ints(args.ranks),
               args.new_tokens, args.timeout)
    print("\n".join(table(rows)))
    harness.write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(harness.run(parse_args, worker, main))
