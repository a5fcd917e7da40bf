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

from .backend import COMPUTE_DTYPES
from .cost.memory import param_counts

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
    from .parallel.eplb import add_eplb_arguments
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
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="longest sequence (prompt + new tokens) to accept (default and at "
                        "most: the model's max_position_embeddings)")
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
    par.add_argument("--dtype", choices=COMPUTE_DTYPES, default="auto",
                     help="weights, activations and KV cache (auto: float32 on CPU, the "
                          "checkpoint's dtype on GPU); norms, softmax, router and RoPE "
                          "run in float32")
    add_eplb_arguments(p)
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
    for name in ("tp", "pp", "dp", "ep", "prefill_chunks", "max_new_tokens", "max_model_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
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


def check_lengths(prompts, max_new_tokens: int, max_model_len, config) -> None:
    """Refuse, before any work, a sequence longer than the model's positions allow."""
    limit, what = config.max_position_embeddings, "the model's max_position_embeddings"
    if max_model_len is not None:
        if max_model_len > limit:
            raise UsageError(f"--max-model-len {max_model_len} exceeds {what} ({limit})")
        limit, what = max_model_len, "--max-model-len"
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    total = len(prompts[longest]) + max_new_tokens
    if total > limit:
        raise UsageError(f"prompt {longest}: {len(prompts[longest])} tokens + --max-new-tokens "
                         f"{max_new_tokens} = {total} > {what} ({limit})")


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


def bind_device(device: str, world, ledger, say):
    """Collective: -> (xp, transport): numpy and None on the CPU; on "gpu" this rank's
    GPU (cupy) and how its arrays reach MPI (CUDA-aware or staged, said once)."""
    if device != "gpu":
        return np, None
    from .backend import Transport, bind_gpu, cuda_aware
    xp, _, node_ranks, gpus = bind_gpu(world)
    transport = Transport(xp, cuda_aware(), ledger)
    if node_ranks > gpus:
        say(f"note: {node_ranks} ranks share {gpus} GPU(s) on a node (round-robin)")
    if not transport.aware:
        say("note: MPI is not CUDA-aware here; staging through pinned host buffers")
    return xp, transport


def connect(device: str, layout, world, ledger, say):
    """Collective: bind this rank's device and split the layout's Comms."""
    from .layout import make_comms
    xp, transport = bind_device(device, world, ledger, say)
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
    from .parallel.eplb import check_eplb_arguments

    world = MPI.COMM_WORLD if world is None else world
    rank = world.Get_rank()

    def say(*a, **k):
        if rank == 0:
            print(*a, **k, flush=True)

    try:
        args = parse_args(argv)
        layout, source, device = open_job(args, world.Get_size())
        config = source.config
        eplb = check_eplb_arguments(args, config, layout)
        prompts, tokenizer = parse_prompts(args, config.vocab_size)
        check_lengths(prompts, args.max_new_tokens, args.max_model_len, config)
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

    from .backend import compute_dtype
    from .parallel.rank_model import ParallelModel
    dtype = compute_dtype(args.dtype, xp, config.dtype)
    say(f"dtype {dtype.name} (weights, activations, KV cache; --dtype {args.dtype})")
    try:
        t = time.perf_counter()
        model = build_together(comms, lambda: ParallelModel(comms, source, xp, dtype, eplb))
        load_s = time.perf_counter() - t
    except RemoteError as e:
        say(f"error while loading: {e}", file=sys.stderr)
        return 2

    from .model.sampling import Sampler
    sampler = Sampler(args.temperature, args.top_p, args.seed)
    check = args.check if args.check is not None else param_counts(config).total <= CHECK_PARAMS_MAX
    keep_logits = check or bool(args.save_logits)
    ledger.reset()
    if os.environ.get("MPIPAR_FAIL_RANK") == str(rank):  # fault injection, for the tests
        raise RuntimeError(f"MPIPAR_FAIL_RANK={rank}: injected failure before generate")
    gen = model.generate(prompts, args.max_new_tokens, sampler, args.prefill_chunks,
                         keep_logits, args.decode_microbatches)
    bad = [x for x in world.allgather(model.watch.first_bad_layer()) if x is not None]
    if bad:
        from .model.finite import describe_layer
        say(f"error: the output of {describe_layer(min(bad), config.num_layers)} is not "
            "finite (NaN or inf): the checkpoint's weights there hold NaN or inf values",
            file=sys.stderr)
        return 2
    per_rank = model.report()
    if args.trace:
        from .trace import write_trace
        write_trace(args.trace, comms, ledger)

    status = 0
    if rank == 0:
        verdict = "skipped"
        if check:
            from .model.reference import ReferenceModel, generate
            # the oracle runs in float32 on the CPU; a 16-bit run is held to its tolerance
            ref = generate(ReferenceModel(source), prompts, args.max_new_tokens, sampler)
            scale = float(np.nanmax(np.abs(ref.prompt_logits)))
            rows = int(np.sum(~np.isnan(ref.prompt_logits[..., 0]))) + ref.tokens.size
            tol = logit_tolerance(dtype, config.num_layers, scale, tp=layout.tp)
            verdict = compare(gen, ref, tol, allowed_outlier_rows(config, dtype, rows))
        record = run_record(args, config, layout, gen, per_rank, verdict, load_s, hosts)
        print_report(record, gen, per_rank, quiet=args.quiet)
        if tokenizer is not None:  # text prompts: show the continuation as text too
            for i, row in enumerate(gen.tokens):
                print(f"text[{i}]: {tokenizer.decode(row)!r}")
        write_outputs(args, gen, record)
        status = 1 if verdict.startswith("fail") else 0
    return int(world.bcast(status, root=0))


def logit_tolerance(dtype, num_layers: int, logit_scale: float,
                    per_layer_error: float | None = None, tp: int = 1) -> float:
    """Max |logit - float32 logit| allowed for a run in ``dtype``.

    float32: 1e-4 (summation order only). 16-bit: each of the L layers and the head
    rounds its output with a relative error ``per_layer_error``, and through the pre-norm
    residual stream those errors add at most linearly: (L + 1) * eps1 * max|logit|.
    tests/test_dtype.py measures eps1 on the fixtures: 1.5-2.3u single-process (u the
    unit roundoff: 2^-8 bfloat16, 2^-11 float16), 2.1-3.3u at tp=4, where each rank's
    partial sum is rounded before the all-reduce and the ring rounds once per hop; the
    default, 2u + (tp-1)/2 u, covers both. Measured logit errors are about half the bound.
    """
    unit = {"float32": 0.0, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}[np.dtype(dtype).name]
    if unit == 0.0:
        return 1e-4
    eps = (2 + (tp - 1) / 2) * unit if per_layer_error is None else per_layer_error
    return (num_layers + 1) * eps * logit_scale


def allowed_outlier_rows(config, dtype, n_rows: int) -> int:
    """Logit rows a run may have beyond the tolerance: none, except for an MoE model in
    16 bits, up to a quarter of them. There a token whose router has a near-tie at the
    top-k boundary can pick another expert than in float32, a discrete change no
    rounding bound covers (tests/test_dtype.py checks that the rows beyond the tolerance
    are exactly the tokens whose routing flipped, each at a near-tie; 2-4 of 35 rows on
    the fixtures, where top-2 of 8 experts makes one flip change half the MoE output)."""
    if not config.is_moe or np.dtype(dtype).itemsize > 2:
        return 0
    return n_rows // 4


def compare(gen, ref, tol=1e-4, outlier_rows: int = 0) -> str:
    """'pass' or 'fail: ...': logit rows within ``tol`` of the reference but at most
    ``outlier_rows`` of them; tokens equal, except that a sequence may pick another
    token where the reference itself is a tie within the tolerance (its logit within
    2*tol of the reference's pick, all the error the tolerance allows) or at an outlier
    row; the sequence's later steps have another context and are not compared."""
    worst, beyond, rows = 0.0, 0, 0
    real = ~np.isnan(ref.prompt_logits[..., 0])  # [B, L]: rows past a prompt's end are NaN
    for row in np.max(np.abs(gen.prompt_logits[real] - ref.prompt_logits[real]), axis=-1):
        worst, beyond, rows = max(worst, float(row)), beyond + bool(row > tol), rows + 1
    for i in range(ref.tokens.shape[0]):
        for step, (mine, want) in enumerate(zip(gen.tokens[i], ref.tokens[i], strict=True)):
            want_row = ref.decode_logits[i, step]
            diff = float(np.max(np.abs(gen.decode_logits[i, step] - want_row)))
            worst, beyond, rows = max(worst, diff), beyond + bool(diff > tol), rows + 1
            if mine == want:
                continue
            if not (want_row[want] - want_row[mine] <= 2 * tol or diff > tol):
                return (f"fail: tokens differ {gen.tokens.tolist()} vs {ref.tokens.tolist()} "
                        f"(sequence {i}, step {step}: reference margin "
                        f"{want_row[want] - want_row[mine]:.3g} > 2*tol)")
            break
    if beyond > outlier_rows:
        return (f"fail: max |logit diff| {worst:.3g} > {tol:.3g} "
                f"({beyond} of {rows} rows beyond, {outlier_rows} allowed)")
    return f"pass ({beyond} of {rows} logit rows beyond {tol:.3g})" if beyond else "pass"


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
