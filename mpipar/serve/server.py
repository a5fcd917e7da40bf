"""``mpirun -n N python programs/serve.py --model DIR [--tp T --pp P --dp D --ep E]``.

Every rank parses the same flags (serve/cli.py), opens the model and builds its part of
the engine (the skeleton of mpipar/program.py). Then the ranks split up:

    world rank 0, main thread     Driver.run(): engine.step() whenever there is work
    world rank 0, HTTP thread     uvicorn + FastAPI (api.py), talks to the driver by queues
    every other rank              engine.run_worker(): each step's share of the model

Start-up: the listening socket is bound before the model loads (a taken port fails at
once, exit 2), and /health answers 503 until every rank has built its engine. Bad flags
end every rank with exit 2 and one message from rank 0. SIGINT/SIGTERM (mpirun forwards
them to every rank): the workers wait for rank 0, which stops accepting requests, ends
the open ones, tells the workers to leave and exits 0 with them. An error on one rank
aborts the whole job (mpipar.program.main), so a dead rank never leaves the others
hanging. ``--prefill tp=T1,pp=P1 --decode tp=T2,dp=D2`` serves disaggregated instead:
the world splits into a decode group and a prefill group (layout.DisaggLayout,
serve/disagg.py) behind the same driver and HTTP side.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading

from ..program import UsageError, bad_input_errors, build_together, connect, open_job
from .cli import layout_of, parse_args
from .options import EngineOptions

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SHUTDOWN_JOIN_S = 4.0


def served_model(args, source, max_model_len: int):
    """api.ServedModel: names, tokenizer and chat template (rank 0)."""
    from ..model.gguf import gguf_path
    from ..model.tokenizer import load_tokenizer
    from .api import ServedModel
    from .chat import load_chat_template
    folder = args.tokenizer or args.model
    tokenizer = None
    if folder and (os.path.isfile(os.path.join(folder, "tokenizer.json"))
                   or gguf_path(folder) is not None):
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
        disagg = bool(args.prefill)  # two groups (layout.DisaggLayout) or one layout
        layout = layout_of(args)
        source, device = open_job(args, layout, world.Get_size())
        if disagg and (args.redundant_experts or args.eplb_window):
            raise UsageError("--redundant-experts / --eplb-window: not with --prefill/--decode")
        args.eplb = None if disagg else check_eplb_arguments(args, source.config, layout)
    except bad_input_errors() as e:
        say(f"error: {e}", file=sys.stderr)
        return 2
    ledger = Ledger(trace=bool(args.trace))
    comms = connect(device, layout, world, ledger, say)
    web = None
    try:  # rank 0: the port, the tokenizer, the template; a failure ends every rank
        error = None
        if rank == 0:
            try:
                web = _Web(args, source)
            except (*bad_input_errors(), ImportError) as e:
                error = e
        agree(comms.world, error)
        engine = build_together(comms, lambda: _engine(comms, layout, source, args))
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


def _engine(comms, layout, source, args):
    """The colocated engine, or the disaggregated one for two groups."""
    options = EngineOptions.from_args(args)
    if args.prefill:
        from .disagg import DisaggEngine
        return DisaggEngine(comms, layout, source, options, args.decode_kv_cache_tokens,
                            args.dtype)
    from ..parallel.rank_model import ParallelModel
    from .engine import ServeEngine
    model = ParallelModel(comms, source, comms.xp, args.dtype, args.eplb)
    return ServeEngine(comms, source, options, model=model)


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
            engine.on_timing = self.metrics.disagg_phases(engine)
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
        except BaseException:  # the engine failed: program.main aborts the whole job
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
    from ..program import main as program_main
    program_main(run, argv)
