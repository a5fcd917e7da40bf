"""Run a Qwen3 / Qwen3-MoE model split over MPI ranks and check it against the reference.

    mpirun -n 16 python programs/transformer.py --tp 4 --pp 4
    mpirun -n 4 python programs/transformer.py --model tests/fixtures/qwen3-moe-tiny \\
        --tp 2 --dp 2 --ep 4 --prefill-chunks 3 --json run.json

One run: parse the flags, open the job, build every rank's part (mpipar/program.py),
generate (mpipar.serve.offline.generate), check against the single-process reference
(mpipar/verify.py), report per rank the bytes sent beside the cost model's prediction
(mpipar/reporting.py). ``--help`` lists the flags.
"""

import mpipar

mpipar.pin_threads()  # one BLAS thread per rank, before numpy and MPI load

import argparse  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from mpipar import verify  # noqa: E402
from mpipar.backend import COMPUTE_DTYPES, compute_dtype  # noqa: E402
from mpipar.comm.control import RemoteError  # noqa: E402
from mpipar.comm.ledger import Ledger  # noqa: E402
from mpipar.cost.memory import param_counts  # noqa: E402
from mpipar.layout import Layout  # noqa: E402
from mpipar.model.finite import describe_layer  # noqa: E402
from mpipar.model.sampling import Sampler  # noqa: E402
from mpipar.parallel.eplb import add_eplb_arguments, check_eplb_arguments  # noqa: E402
from mpipar.parallel.rank_model import ParallelModel  # noqa: E402
from mpipar.program import (  # noqa: E402
    Parser,
    UsageError,
    bad_input_errors,
    build_together,
    connect,
    main,
    open_job,
)
from mpipar.reporting import print_report, run_record, write_outputs  # noqa: E402
from mpipar.serve.offline import generate  # noqa: E402
from mpipar.serve.request import RequestError, check_length, check_prompt  # noqa: E402
from mpipar.trace import write_trace  # noqa: E402

DEFAULT_PROMPT_LEN = 16
CHECK_PARAMS_MAX = 50_000_000  # --check defaults on below this many parameters


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="transformer.py", description=(
        "Run a Qwen3 / Qwen3-MoE model split over MPI ranks (tp*pp*dp ranks)."))
    m = p.add_argument_group("model")
    m.add_argument("--model", help="Hugging Face folder (config.json + safetensors), "
                   "or a .gguf file (or a folder holding one)")
    m.add_argument("--preset", help="named shape with random weights (default: builtin-moe)")
    m.add_argument("--seed", type=int, default=0, help="random-weight seed")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt-ids", action="append", default=[],
                   help="comma-separated token ids; repeat for a batch")
    g.add_argument("--prompt", action="append", default=[],
                   help="text (needs tokenizer.json or a .gguf in --model); repeat "
                   "for a batch")
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
        from mpipar.model.tokenizer import load_tokenizer
        tok = load_tokenizer(args.model)
        prompts += [tok.encode(t) for t in args.prompt]
    if not prompts:  # the built-in prompt: a fixed spread of ids
        prompts = [[(37 * i + 11) % vocab for i in range(DEFAULT_PROMPT_LEN)]]
    for i, p in enumerate(prompts):
        try:
            check_prompt(p, vocab)
        except RequestError as e:
            raise UsageError(f"prompt {i}: {e}") from None
    return prompts, tok


def check_lengths(prompts, max_new_tokens: int, max_model_len, config) -> None:
    """Refuse, before any work, a sequence longer than the model's positions allow."""
    limit, what = config.max_position_embeddings, "the model's max_position_embeddings"
    if max_model_len is not None:
        if max_model_len > limit:
            raise UsageError(f"--max-model-len {max_model_len} exceeds {what} ({limit})")
        limit, what = max_model_len, "--max-model-len"
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    try:
        check_length(len(prompts[longest]), max_new_tokens, limit, "--max-new-tokens",
                     f"{what} ({limit})")
    except RequestError as e:
        raise UsageError(f"prompt {longest}: {e}") from None


def run(argv, world=None) -> int:
    """The program; returns the exit code (0 ok, 1 check failed, 2 bad input)."""
    from mpi4py import MPI


    world = MPI.COMM_WORLD if world is None else world
    rank = world.Get_rank()

    def say(*a, **k):
        if rank == 0:
            print(*a, **k, flush=True)

    try:
        args = parse_args(argv)
        layout = Layout(tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep)
        source, device = open_job(args, layout, world.Get_size())
        config = source.config
        eplb = check_eplb_arguments(args, config, layout)
        prompts, tokenizer = parse_prompts(args, config.vocab_size)
        check_lengths(prompts, args.max_new_tokens, args.max_model_len, config)
    except bad_input_errors() as e:
        say(f"error: {e}", file=sys.stderr)
        return 2

    ledger = Ledger(trace=bool(args.trace))
    comms = connect(device, layout, world, ledger, say)
    xp = comms.xp
    say(f"mpipar: {world.Get_size()} ranks, model {source.describe()}, device {device}")
    say(layout.describe())
    hosts = world.gather(socket.gethostname(), root=0)
    if rank == 0 and not args.quiet:
        for r, h in enumerate(hosts):
            print(f"rank {r} host {h}")

    dtype = compute_dtype(args.dtype, xp, config.dtype)
    say(f"dtype {dtype.name} (weights, activations, KV cache; --dtype {args.dtype})")
    try:
        t = time.perf_counter()
        model = build_together(comms, lambda: ParallelModel(comms, source, xp, dtype, eplb))
        load_s = time.perf_counter() - t
    except RemoteError as e:
        say(f"error while loading: {e}", file=sys.stderr)
        return 2

    sampler = Sampler(args.temperature, args.top_p, args.seed)
    small = param_counts(config).total <= CHECK_PARAMS_MAX
    check = args.check if args.check is not None else small
    keep_logits = check or bool(args.save_logits)
    ledger.reset()
    if os.environ.get("MPIPAR_FAIL_RANK") == str(rank):  # fault injection, for the tests
        raise RuntimeError(f"MPIPAR_FAIL_RANK={rank}: injected failure before generate")
    gen = generate(model, prompts, args.max_new_tokens, sampler, args.prefill_chunks,
                   keep_logits, args.decode_microbatches)
    bad = [x for x in world.allgather(model.watch.first_bad_layer()) if x is not None]
    if bad:
        say(f"error: the output of {describe_layer(min(bad), config.num_layers)} is not "
            "finite (NaN or inf): the checkpoint's weights there hold NaN or inf values",
            file=sys.stderr)
        return 2
    per_rank = model.report()
    if args.trace:
        write_trace(args.trace, comms, ledger)

    status = 0
    if rank == 0:
        verdict = "skipped"
        if check:  # the oracle runs in float32 on the CPU; 16 bits have their tolerance
            verdict = verify.check(source, prompts, gen, sampler, dtype, layout.tp)
        record = run_record(args, config, layout, gen, per_rank, verdict, load_s, hosts)
        print_report(record, gen, per_rank, quiet=args.quiet)
        if tokenizer is not None:  # text prompts: show the continuation as text too
            for i, row in enumerate(gen.tokens):
                print(f"text[{i}]: {tokenizer.decode(row)!r}")
        write_outputs(args, gen, record)
        status = 1 if verdict.startswith("fail") else 0
    return int(world.bcast(status, root=0))


if __name__ == "__main__":
    main(run)
