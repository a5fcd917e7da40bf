"""World rank 0's driver loop: HTTP handlers on one thread, the engine on the main thread.

Every MPI call must stay on the thread that initialised MPI, and ``engine.step()`` is a
collective, so the engine lives on rank 0's main thread and the HTTP server (uvicorn,
its own thread and asyncio loop) never touches it. They meet in two thread-safe places:

    HTTP thread                        main thread (run())
    submit(reqs) -> Stream  --inbox-->  engine.add_request(r) for r in reqs
    abort(ids)              --inbox-->  engine.abort(id)
    Stream.get()  <--loop.call_soon_threadsafe--  "accepted" | RequestError | outputs

While the engine has no unfinished request the loop blocks on the inbox (no step, no
broadcast, the worker ranks sleep in run_worker()); otherwise it drains the inbox and
runs one step, so a new request joins the running batch at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

from .request import FINISH_ABORT, RequestError, RequestOutput

ACCEPTED = "accepted"
IDLE_POLL_S = 0.2  # how often an idle loop looks at the stop flag


class ServerClosing(RuntimeError):
    """The server is shutting down; the request ends unfinished."""


class Stream:
    """One HTTP request's mailbox: (index of its engine request, item) in arrival order."""

    def __init__(self, request_ids: list[str]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids = request_ids

    def push(self, index: int, item) -> None:  # from the main thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))
        except RuntimeError:  # the HTTP loop is gone (shutdown): nobody is listening
            pass

    async def get(self):
        return await self.queue.get()


class Driver:
    def __init__(self, engine, metrics=None):
        self.engine, self.metrics = engine, metrics
        self.inbox: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.ready = threading.Event()  # set once every rank has built its engine
        self.stats: dict = {}  # engine.stats() after the last step (read by /metrics)
        self._routes: dict[str, tuple[Stream, int, dict]] = {}  # main thread only

    # ---- HTTP thread ---------------------------------------------------------------
    def submit(self, requests) -> Stream:
        """Queue these engine Requests together; their stream first gets ACCEPTED (all
        were added) or one RequestError (none runs). Called inside the HTTP loop."""
        stream = Stream([r.request_id for r in requests])
        if self.stopping.is_set():
            stream.push(0, ServerClosing("the server is shutting down"))
        else:
            self.inbox.put(("add", requests, stream))
        return stream

    def abort(self, request_ids) -> None:
        """The client went away, or a stop string ended the text: free these requests."""
        self.inbox.put(("abort", list(request_ids), None))

    def stop(self) -> None:
        self.stopping.set()
        self.inbox.put(("wake", None, None))

    # ---- main thread ---------------------------------------------------------------
    def run(self) -> None:
        """Serve until stop(); then end every open stream and let the workers go."""
        try:
            while not self.stopping.is_set():
                busy = self.engine.has_unfinished()
                self._take_inbox(block=not busy)
                if self.engine.has_unfinished() and not self.stopping.is_set():
                    self._step()
        finally:
            for stream, index, _ in list(self._routes.values()):
                stream.push(index, ServerClosing("the server is shutting down"))
            self._routes.clear()
            while True:  # requests that arrived too late
                try:
                    kind, reqs, stream = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    stream.push(0, ServerClosing("the server is shutting down"))

    def _take_inbox(self, block: bool) -> None:
        first = True
        while True:
            try:
                item = self.inbox.get(timeout=IDLE_POLL_S) if block and first \
                    else self.inbox.get_nowait()
            except queue.Empty:
                return
            first = False
            kind, payload, stream = item
            if kind == "add":
                self._add(payload, stream)
            elif kind == "abort":
                for rid in payload:
                    if self._routes.pop(rid, None) is not None:
                        self.engine.abort(rid)

    def _add(self, requests, stream: Stream) -> None:
        added = []
        try:
            for r in requests:
                self.engine.add_request(r)
                added.append(r.request_id)
        except RequestError as e:
            for rid in added:
                self.engine.abort(rid)
            stream.push(0, e)
            return
        now = time.monotonic()
        for i, r in enumerate(requests):
            self._routes[r.request_id] = (stream, i, {"arrival": now, "first": None,
                                                      "prompt": len(r.prompt_ids)})
        stream.push(0, ACCEPTED)

    def _step(self) -> None:
        t0 = time.monotonic()
        outputs: list[RequestOutput] = self.engine.step()
        now = time.monotonic()
        self.stats = self.engine.stats()
        if self.metrics is not None:
            self.metrics.observe_step(self.stats, now - t0)
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:  # aborted meanwhile
                continue
            stream, index, times = route
            if out.new_token_ids and times["first"] is None:
                times["first"] = now
            stream.push(index, out)
            if out.finished:
                del self._routes[out.request_id]
                if self.metrics is not None and out.finish_reason != FINISH_ABORT:
                    self.metrics.observe_finished(times, now, out)
