"""Every flag of ``programs/serve.py`` and its checks, in one place.

vLLM's flag names are accepted as aliases, so a vLLM command line carries over. The
checks run on every rank before anything loads; a bad flag is a UsageError (or a
ValueError from ``EngineOptions.check``): one message from rank 0, every rank exits 2.
``layout_of(args)`` is the job's layout: a Layout, or with ``--prefill/--decode`` a
``layout.DisaggLayout`` of two groups.
"""

from __future__ import annotations

import argparse
import os

from ..backend import COMPUTE_DTYPES
from ..layout import Layout, parse_groups
from ..parallel.eplb import add_eplb_arguments
from ..program import Parser, UsageError
from .options import EngineOptions


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="serve.py", description=(
        "OpenAI-compatible server of a Qwen3 / Qwen3-MoE / Llama / Qwen2 model split over "
        "MPI ranks."))
    m = p.add_argument_group("model")
    m.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    m.add_argument("--model", help="Hugging Face folder (config.json + safetensors), "
                   "or a .gguf file (or a folder holding one)")
    m.add_argument("--preset", help="named shape with random weights")
    m.add_argument("--seed", type=int, default=0, help="random-weight seed")
    m.add_argument("--tokenizer", help="folder of tokenizer.json (default: --model)")
    m.add_argument("--chat-template", help="Jinja file (default: the tokenizer folder's)")
    m.add_argument("--served-model-name", nargs="+", help="name(s) clients use")
    par = p.add_argument_group("parallel layout")
    for short, long, what in (("tp", "tensor-parallel-size", "tensor parallel"),
                              ("pp", "pipeline-parallel-size", "pipeline stages"),
                              ("dp", "data-parallel-size", "attention data parallel")):
        par.add_argument(f"--{short}", f"--{long}", f"-{short}", dest=short, type=int,
                         default=1, help=what)
    par.add_argument("--ep", type=int, default=None, help="expert parallel (divides tp*dp)")
    par.add_argument("--enable-expert-parallel", action="store_true",
                     help="vLLM's switch: ep = tp*dp")
    par.add_argument("--device", choices=("cpu", "gpu", "auto"), default=None)
    par.add_argument("--dtype", choices=COMPUTE_DTYPES, default="auto",
                     help="weights, activations and KV cache (auto: float32 on CPU, the "
                          "checkpoint's dtype on GPU)")
    add_eplb_arguments(p)
    e = p.add_argument_group("engine (default: the engine's)")
    for flag in ("block-size", "kv-cache-tokens", "max-num-batched-tokens",
                 "max-num-seqs", "max-model-len"):
        e.add_argument(f"--{flag}", type=int, default=None)
    e.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true",
                   default=None)
    e.add_argument("--no-enable-prefix-caching", dest="prefix_caching",
                   action="store_false")
    e.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="not used: the KV pool is sized by --kv-cache-tokens")
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    h.add_argument("--api-key", default=os.environ.get("MPIPAR_API_KEY"),
                   help="require Authorization: Bearer KEY (default $MPIPAR_API_KEY)")
    h.add_argument("--trace", metavar="FILE.json",
                   help="at shutdown, a Chrome trace of every rank (forwards, collectives, "
                        "KV handoffs; every span is kept, so for short runs)")
    h.add_argument("--uvicorn-log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))
    add_disagg_arguments(p)
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.model_pos:
        if args.model and args.model != args.model_pos:
            raise UsageError("give the model once (MODEL or --model)")
        args.model = args.model_pos
    if args.model and args.preset:
        raise UsageError("give --model or --preset, not both")
    if args.enable_expert_parallel:
        if args.ep not in (None, args.tp * args.dp):
            raise UsageError("--enable-expert-parallel means ep = tp*dp; drop --ep")
        args.ep = args.tp * args.dp
    args.ep = args.ep or 1
    for name in ("tp", "pp", "dp", "ep"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.trace and not os.path.isdir(os.path.dirname(os.path.abspath(args.trace))):
        raise UsageError(f"--trace {args.trace}: its folder does not exist")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        raise UsageError("--gpu-memory-utilization must be in (0, 1]")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    check_disagg_args(args)
    EngineOptions.from_args(args)  # ValueError (exit 2) for a bad engine option
    return args


DISAGG_HELP = ("prefill/decode disaggregation: world ranks 0..T2*D2-1 form the decode "
               "group (world rank 0 among them: HTTP and both schedulers), the next T1*P1 "
               "ranks the prefill group; mpirun -n T2*D2+T1*P1")


def add_disagg_arguments(parser) -> None:
    g = parser.add_argument_group("disaggregation", DISAGG_HELP)
    g.add_argument("--prefill", metavar="tp=T1,pp=P1[,ep=E1]",
                   help="layout of the prefill group (world ranks T2*D2 .. N-1)")
    g.add_argument("--decode", metavar="tp=T2[,dp=D2][,ep=E2]",
                   help="layout of the decode group (world ranks 0 .. T2*D2-1)")
    g.add_argument("--decode-kv-cache-tokens", type=int, default=None, metavar="N",
                   help="KV pool of each decode replica (default --kv-cache-tokens, "
                        "which sizes the prefill pool)")


def check_disagg_args(args) -> None:
    """Flag checks (UsageError / LayoutError: exit 2 from rank 0)."""
    if bool(args.prefill) != bool(args.decode):
        raise UsageError("give --prefill and --decode together")
    if not args.prefill:
        if args.decode_kv_cache_tokens is not None:
            raise UsageError("--decode-kv-cache-tokens needs --prefill and --decode")
        return
    if (args.tp, args.pp, args.dp, args.ep) != (1, 1, 1, 1):
        raise UsageError("--tp/--pp/--dp/--ep lay out a colocated server; with --prefill "
                         "and --decode put them in the specs (tp=2,pp=2)")
    if args.decode_kv_cache_tokens is not None and args.decode_kv_cache_tokens < 1:
        raise UsageError("--decode-kv-cache-tokens must be at least 1")
    parse_groups(args.prefill, args.decode)


def layout_of(args):
    """The job's layout from the parsed flags."""
    if args.prefill:
        return parse_groups(args.prefill, args.decode)
    return Layout(tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep)
