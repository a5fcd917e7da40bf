"""One run of ``programs/transformer.py``: load, generate, check, report.

Errors: every rank validates the same flags, layout and config, so a bad input fails
on every rank at the same point; rank 0 prints the one message and all ranks exit 2.
Steps that can fail on some ranks only (reading a shard) end with ``agree``, so the
others learn of it instead of waiting. Anything unexpected on one rank aborts the
whole MPI job (exit 1) rather than leaving the others hanging in a collective.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import numpy as np

DEFAULT_PROMPT_LEN = 16
CHECK_PARAMS_MAX = 50_000_000  # --check defaults on below this many parameters


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of printing on every rank
        raise UsageError(f"{self.prog}: {message}")

    def print_help(self, file=None):  # --help: once, from world rank 0
        from mpi4py import MPI
        if MPI.COMM_WORLD.Get_rank() == 0:
            super().print_help(file)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="transformer.py", description=(
        "Run a Qwen3 / Qwen3-MoE model split over MPI ranks (tp*pp*dp ranks)."))
    m = p.add_argument_group("model")
    m.add_argument("--model", help="Hugging Face folder (config.json + safetensors)")
    m.add_argument("--preset", help="named shape with random weights (default: builtin-moe)")
    m.add_argument("--seed", type=int, default=0, help="random-weight seed")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt-ids", action="append", default=[],
                   help="comma-separated token ids; repeat for a batch")
    g.add_argument("--prompt", action="append", default=[],
                   help="text (needs tokenizer.json in --model); repeat for a batch")
    g.add_argument("--max-new-tokens", type=int, default=8)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    par = p.add_argument_group("parallel layout")
    for name, what in (("tp", "tensor parallel"), ("pp", "pipeline stages"),
                       ("dp", "attention data-parallel replicas"),
                       ("ep", "expert parallel (divides tp*dp)")):
        par.add_argument(f"--{name}", type=int, default=1, help=what)
    par.add_argument("--prefill-chunks", type=int, default=1,
                     help="split each prompt into K chunks that flow through the pipeline")
    par.add_argument("--decode-microbatches", type=int, default=None, metavar="M",
                     help="decode the sequences in M micro-batches that keep the pipeline "
                          "stages busy (default 1: pays off only when decode is compute-bound)")
    par.add_argument("--device", choices=("cpu", "gpu", "auto"), default=None,
                     help="array device (default: $MPIPAR_DEVICE or auto)")
    o = p.add_argument_group("output")
    chk = o.add_mutually_exclusive_group()
    chk.add_argument("--check", dest="check", action="store_true", default=None,
                     help="compare with the single-process reference (default: small models)")
    chk.add_argument("--no-check", dest="check", action="store_false")
    o.add_argument("--save-logits", metavar="FILE.npz")
    o.add_argument("--json", metavar="FILE")
    o.add_argument("--trace", metavar="FILE.json", help="Chrome trace of every rank")
    o.add_argument("--quiet", action="store_true", help="no per-rank tables")
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.decode_microbatches is not None and args.decode_microbatches < 1:
        raise UsageError("--decode-microbatches must be at least 1")
    for name in ("tp", "pp", "dp", "ep", "prefill_chunks", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(args, name)}")
    if args.model and args.preset:
        raise UsageError("give --model or --preset, not both")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    for flag in ("json", "save_logits", "trace"):  # fail now, not after the whole run
        path = getattr(args, flag)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"--{flag.replace('_', '-')} {path}: its folder does not exist")
    return args


def parse_prompts(args, vocab):
    """-> (prompts, tokenizer or None): token-id lists from --prompt-ids and --prompt."""
    prompts, tok = [], None
    for text in args.prompt_ids:
        try:
            ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
        except ValueError:
            raise UsageError(f"--prompt-ids {text!r}: expected integers like 1,2,3") from None
        prompts.append(ids)
    if args.prompt:
        from .model.tokenizer import load_tokenizer
        tok = load_tokenizer(args.model)
        prompts += [tok.encode(t) for t in args.prompt]
    if not prompts:  # the built-in prompt: a fixed spread of ids
        prompts = [[(37 * i + 11) % vocab for i in range(DEFAULT_PROMPT_LEN)]]
    for i, p in enumerate(prompts):
        if not p:
            raise UsageError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise UsageError(f"prompt {i}: token ids {bad[:5]} outside the vocab [0, {vocab})")
    return prompts, tok


# ---- the steps every program that runs a model over MPI shares (transformer.py, serve.py)
def bad_input_errors() -> tuple:
    """The exception types that mean "bad flags, layout, config or checkpoint": exit 2."""
    from .layout import LayoutError
    from .model.checkpoint import CheckpointError
    from .model.config import ConfigError
    return (UsageError, LayoutError, ConfigError, CheckpointError, ValueError, OSError)


def open_job(args, world_size: int):
    """-> (layout, source, device) from args.tp/pp/dp/ep, model, preset, seed, device;
    the same checks on every rank (raises one of bad_input_errors())."""
    from .backend import select_device
    from .layout import Layout
    from .model.init import open_model
    from .parallel.shard import check_layout
    layout = Layout(tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep)
    layout.check_world(world_size)
    source = open_model(args.model, args.preset, args.seed)
    check_layout(source.config, layout)
    return layout, source, select_device(args.device)


def connect(device: str, layout, world, ledger, say):
    """Collective: bind this rank's GPU (device "gpu") and split the layout's Comms."""
    from .layout import make_comms
    xp, transport = np, None
    if device == "gpu":
        from .backend import Transport, bind_gpu, cuda_aware
        xp, gpu, node_ranks, gpus = bind_gpu(world)
        transport = Transport(xp, cuda_aware(), ledger)
        if node_ranks > gpus:
            say(f"note: {node_ranks} ranks share {gpus} GPU(s) on a node (round-robin)")
        if not transport.aware:
            say("note: MPI is not CUDA-aware here; staging through pinned host buffers")
    return make_comms(layout, world, ledger, xp, transport)


def build_together(comms, build):
    """Collective: ``build()`` on every rank; if it failed anywhere (a shard that cannot
    be read, memory), every rank raises the same RemoteError instead of waiting."""
    from .comm.control import agree
    from .model.checkpoint import CheckpointError
    error, built = None, None
    try:
        built = build()
    except (CheckpointError, ValueError, OSError, MemoryError) as e:
        error = e
    agree(comms.world, error)
    return built


def run(argv, world=None) -> int:
    """The program; returns the exit code (0 ok, 1 check failed, 2 bad input)."""
    from mpi4py import MPI

    from .comm.control import RemoteError

    world = MPI.COMM_WORLD if world is None else world
    rank = world.Get_rank()

    def say(*a, **k):
        if rank == 0:
            print(*a, **k, flush=True)

    try:
        args = parse_args(argv)
        layout, source, device = open_job(args, world.Get_size())
        config = source.config
        prompts, tokenizer = parse_prompts(args, config.vocab_size)
    except bad_input_errors() as e:
        say(f"error: {e}", file=sys.stderr)
        return 2

    from .comm.ledger import Ledger
    from .reporting import print_report, run_record, write_outputs
    ledger = Ledger(trace=bool(args.trace))
    comms = connect(device, layout, world, ledger, say)
    xp = comms.xp
    say(f"mpipar: {world.Get_size()} ranks, model {source.describe()}, device {device}")
    say(layout.describe())
    hosts = world.gather(socket.gethostname(), root=0)
    if rank == 0 and not args.quiet:
        for r, h in enumerate(hosts):
            print(f"rank {r} host {h}")

    from .parallel.engine import ParallelModel
    try:
        t = time.perf_counter()
        model = build_together(comms, lambda: ParallelModel(comms, source, xp))
        load_s = time.perf_counter() - t
    except RemoteError as e:
        say(f"error while loading: {e}", file=sys.stderr)
        return 2

    from .model.sampling import Sampler
    sampler = Sampler(args.temperature, args.top_p, args.seed)
    check = args.check if args.check is not None else config.num_params() <= CHECK_PARAMS_MAX
    keep_logits = check or bool(args.save_logits)
    ledger.reset()
    if os.environ.get("MPIPAR_FAIL_RANK") == str(rank):  # fault injection, for the tests
        raise RuntimeError(f"MPIPAR_FAIL_RANK={rank}: injected failure before generate")
    gen = model.generate(prompts, args.max_new_tokens, sampler, args.prefill_chunks,
                         keep_logits, args.decode_microbatches)
    per_rank = model.report()
    if args.trace:
        from .trace import write_trace
        write_trace(args.trace, comms, ledger)

    status = 0
    if rank == 0:
        verdict = "skipped"
        if check:
            from .model.reference import ReferenceModel, generate
            ref = generate(ReferenceModel(source), prompts, args.max_new_tokens, sampler)
            verdict = compare(gen, ref)
        record = run_record(args, config, layout, gen, per_rank, verdict, load_s, hosts)
        print_report(record, gen, per_rank, quiet=args.quiet)
        if tokenizer is not None:  # text prompts: show the continuation as text too
            for i, row in enumerate(gen.tokens):
                print(f"text[{i}]: {tokenizer.decode(row)!r}")
        write_outputs(args, gen, record)
        status = 1 if verdict.startswith("fail") else 0
    return int(world.bcast(status, root=0))


def compare(gen, ref, tol=1e-4) -> str:
    """'pass' or 'fail: ...' (tokens exact, logits within tol)."""
    if not np.array_equal(gen.tokens, ref.tokens):
        return f"fail: tokens differ {gen.tokens.tolist()} vs {ref.tokens.tolist()}"
    worst = max(float(np.nanmax(np.abs(gen.prompt_logits - ref.prompt_logits))),
                float(np.max(np.abs(gen.decode_logits - ref.decode_logits))))
    if not worst <= tol:
        return f"fail: max |logit diff| {worst:.3g} > {tol}"
    return "pass"


def main(argv=None, program=None) -> None:
    """Entry point: exit with the code of ``program`` (default run); an unexpected error
    aborts the whole job."""
    from mpi4py import MPI
    try:
        code = (program or run)(sys.argv[1:] if argv is None else argv)
    except SystemExit:
        raise
    except BaseException:
        import traceback
        sys.stderr.write(f"[rank {MPI.COMM_WORLD.Get_rank()}] unexpected error, aborting "
                         f"the job:\n{traceback.format_exc()}")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
        raise
    sys.exit(code)


if __name__ == "__main__":
    main()
