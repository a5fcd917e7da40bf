"""``mpirun -n N python programs/serve.py --model DIR [--tp T --pp P --dp D --ep E]``.

Every rank parses the same flags, opens the model and builds its part of the engine
(the checks and loading steps of mpipar/runner.py). Then the ranks split up:

    world rank 0, main thread     Driver.run(): engine.step() whenever there is work
    world rank 0, HTTP thread     uvicorn + FastAPI (api.py), talks to the driver by queues
    every other rank              engine.run_worker(): each step's share of the model

Start-up: the listening socket is bound before the model loads (a taken port fails at
once, exit 2), and /health answers 503 until every rank has built its engine. Bad flags
end every rank with exit 2 and one message from rank 0. SIGINT/SIGTERM (mpirun forwards
them to every rank): the workers wait for rank 0, which stops accepting requests, ends
the open ones, tells the workers to leave and exits 0 with them. An error on one rank
aborts the whole job (mpipar.runner.main), so a dead rank never leaves the others hanging.
vLLM's flag names are accepted as aliases, so a vLLM command line carries over.
``--prefill tp=T1,pp=P1 --decode tp=T2,dp=D2`` serves disaggregated instead: the world
splits into a decode group and a prefill group (serve/groups.py, serve/disagg.py)
behind the same driver and HTTP side.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading

from ..runner import Parser, UsageError, bad_input_errors, build_together, connect, open_job
from . import groups

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SHUTDOWN_JOIN_S = 4.0


def build_parser() -> argparse.ArgumentParser:
    from ..backend import COMPUTE_DTYPES
    from ..parallel.eplb import add_eplb_arguments
    p = Parser(prog="serve.py", description=(
        "OpenAI-compatible server of a Qwen3 / Qwen3-MoE model split over MPI ranks."))
    m = p.add_argument_group("model")
    m.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    m.add_argument("--model", help="Hugging Face folder (config.json + safetensors)")
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
    groups.add_arguments(p)
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
    for name in ("block_size", "kv_cache_tokens", "max_num_batched_tokens",
                 "max_num_seqs", "max_model_len"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if args.trace and not os.path.isdir(os.path.dirname(os.path.abspath(args.trace))):
        raise UsageError(f"--trace {args.trace}: its folder does not exist")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        raise UsageError("--gpu-memory-utilization must be in (0, 1]")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    groups.check_args(args)
    return args


def engine_options(args):
    from .engine import EngineOptions
    given = {"block_size": args.block_size, "kv_cache_tokens": args.kv_cache_tokens,
             "max_num_batched_tokens": args.max_num_batched_tokens,
             "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
             "enable_prefix_caching": args.prefix_caching}
    return EngineOptions(**{k: v for k, v in given.items() if v is not None})


def served_model(args, source, max_model_len: int):
    """api.ServedModel: names, tokenizer and chat template (rank 0)."""
    from ..model.tokenizer import load_tokenizer
    from .api import ServedModel
    from .chat import load_chat_template
    folder = args.tokenizer or args.model
    tokenizer = None
    if folder and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tokenizer = load_tokenizer(folder)
    template = load_chat_template(folder, args.chat_template)
    defaults = {}
    gen = os.path.join(args.model or "", "generation_config.json")
    if args.model and os.path.isfile(gen):
        with open(gen, encoding="utf-8") as f:
            defaults = {k: v for k, v in json.load(f).items() if k in ("temperature", "top_p")}
    names = args.served_model_name or [args.model or args.preset or "builtin-moe"]
    return ServedModel(names, source.config.vocab_size, max_model_len, tokenizer, template,
                       defaults)


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(argv, world=None) -> int:
    """The program on every rank; returns the exit code (0, or 2 for bad input)."""
    from mpi4py import MPI

    from ..comm.control import RemoteError, agree
    from ..comm.ledger import Ledger
    from ..parallel.eplb import check_eplb_arguments

    world = MPI.COMM_WORLD if world is None else world
    rank = world.Get_rank()
    stop = threading.Event()  # set by SIGINT/SIGTERM; acted on by rank 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def say(*a, **k):
        if rank == 0:
            print(*a, **k, flush=True)

    try:
        args = parse_args(argv)
        disagg = bool(args.prefill)  # two groups (serve/groups.py) or one layout
        layout, source, device = (groups.open_job if disagg else open_job)(args, world.Get_size())
        if disagg and (args.redundant_experts or args.eplb_window):
            raise UsageError("--redundant-experts / --eplb-window: not with --prefill/--decode")
        args.eplb = None if disagg else check_eplb_arguments(args, source.config, layout)
    except bad_input_errors() as e:
        say(f"error: {e}", file=sys.stderr)
        return 2
    ledger = Ledger(trace=bool(args.trace))
    comms = (groups.connect if disagg else connect)(device, layout, world, ledger, say)
    web = None
    try:  # rank 0: the port, the tokenizer, the template; a failure ends every rank
        error = None
        if rank == 0:
            try:
                web = _Web(args, source)
            except (*bad_input_errors(), ImportError) as e:
                error = e
        agree(comms.world, error)
        engine = build_together(comms, lambda: groups.build_engine(comms, layout, source, args)
                                if disagg else _engine(comms, source, args))
    except RemoteError as e:
        say(f"error: {e}", file=sys.stderr)
        if web is not None:
            web.close()
        return 2
    if rank != 0:
        engine.run_worker()
        code = 0
    else:  # returns after telling the workers to leave run_worker()
        code = web.serve(engine, stop, layout, source, world.Get_size())
    if args.trace:  # collective: every rank is past its loop
        from types import SimpleNamespace

        from ..trace import write_trace
        write_trace(args.trace, SimpleNamespace(world=comms.world, coords=comms.group.coords)
                    if disagg else comms, ledger)
        say(f"mpipar serve: trace of every rank in {args.trace}")
    return code


def _engine(comms, source, args):
    from ..parallel.rank_model import ParallelModel
    from .engine import ServeEngine
    model = ParallelModel(comms, source, comms.xp, args.dtype, args.eplb)
    return ServeEngine(comms, source, engine_options(args), model=model)


class _Web:
    """Rank 0's HTTP side: bound at once, serving (503) while the engine loads."""

    def __init__(self, args, source):
        try:
            import uvicorn

            from .api import create_app
            from .driver import Driver
            from .metrics import ServeMetrics
        except ImportError as e:
            raise ImportError(f"the server needs {e.name}: pip install 'mpipar[serve]'") \
                from None
        self.args = args
        self.sock = listen(args.host, args.port)
        limit = args.max_model_len or source.config.max_position_embeddings
        self.model = served_model(args, source, limit)
        self.metrics = ServeMetrics(self.model.names[0])
        self.driver = Driver(None, self.metrics)
        app = create_app(self.model, self.driver, self.metrics, args.api_key)
        config = uvicorn.Config(app, log_level=args.uvicorn_log_level, lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(SHUTDOWN_JOIN_S)
        self.sock.close()

    def serve(self, engine, stop: threading.Event, layout, source, world_size) -> int:
        args = self.args
        host, port = self.sock.getsockname()[:2]
        self.driver.engine = engine
        if hasattr(engine, "on_timing"):  # disaggregated: per-request phases in /metrics
            engine.on_timing = groups.phase_metrics(self.metrics, engine)
        limit = getattr(engine, "max_model_len", None)
        if limit:
            self.model.max_model_len = limit
        self.driver.ready.set()
        print(f"mpipar serve: {world_size} ranks, {layout.describe().splitlines()[0]}, "
              f"model {source.describe()} as {self.model.names[0]!r}", flush=True)
        where = socket.gethostname() if args.host in WILDCARD_HOSTS else host
        if ":" in where:
            where = f"[{where}]"
        print(f"mpipar serve: rank 0 on host {socket.gethostname()} listening on "
              f"http://{where}:{port}", flush=True)
        if args.host in WILDCARD_HOSTS and not args.api_key:
            print(f"warning: listening on all interfaces ({args.host or '*'}) without an "
                  "API key: anyone who can reach this host can use the server "
                  "(give --api-key or $MPIPAR_API_KEY)", file=sys.stderr, flush=True)
        if args.gpu_memory_utilization is not None:
            print("note: --gpu-memory-utilization is not used; the KV pool is sized by "
                  "--kv-cache-tokens", file=sys.stderr, flush=True)
        http_died = threading.Event()
        watcher = threading.Thread(target=_watch, daemon=True,
                                   args=(stop, self.driver, self.thread, http_died))
        watcher.start()
        try:
            self.driver.run()
        except BaseException:  # the engine failed: runner.main aborts the whole job
            self.server.should_exit = True
            raise
        engine.shutdown()  # the workers leave run_worker()
        self.close()
        print("mpipar serve: stopped", flush=True)
        return 1 if http_died.is_set() else 0


def _watch(stop: threading.Event, driver, http_thread, http_died) -> None:
    """A signal, or an HTTP thread that died: stop the driver loop (on the main thread)."""
    while not stop.wait(0.2):
        if not http_thread.is_alive():
            print("error: the HTTP server stopped", file=sys.stderr, flush=True)
            http_died.set()
            break
    driver.stop()


def main(argv=None) -> None:
    from ..runner import main as run_main
    run_main(argv, program=run)
