"""OpenAI-compatible HTTP endpoints on world rank 0, as vLLM serves them (FastAPI).

    POST /v1/completions        prompt: text | token ids | a batch of either
    POST /v1/chat/completions   messages through the folder's chat template
    GET  /v1/models   GET /health (200 once every rank is ready, else 503)   GET /metrics

Each HTTP request becomes one engine Request per prompt, handed to the Driver (the
engine runs on the main thread; see driver.py), and its tokens come back step by step:
a streamed response sends each step's text as a server-sent event and ends with
``data: [DONE]``. Errors: a bad request is a 400 with an OpenAI-style body
{"error": {"message", "type", "param", "code"}} and the server goes on serving; with
an API key every endpoint but /health wants ``Authorization: Bearer KEY`` (else 401).
A client that goes away (or a stop string that ends the text) aborts its requests.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import ChatTemplateError
from .detok import TextStream
from .driver import ACCEPTED, ServerClosing
from .protocol import ChatRequest, CompletionRequest, error_body
from .request import Request as EngineRequest
from .request import RequestError

DISCONNECT_POLL_S = 0.5


@dataclass
class ServedModel:
    names: list[str]  # --served-model-name (first one reported), default the folder
    vocab_size: int
    max_model_len: int
    tokenizer: object | None = None  # encode(str) -> ids, decode(ids) -> str
    chat_template: object | None = None  # chat.ChatTemplate
    defaults: dict = field(default_factory=dict)  # temperature/top_p of generation_config
    created: int = field(default_factory=lambda: int(time.time()))


def _error(status: int, message: str, param=None, kind="BadRequestError") -> JSONResponse:
    return JSONResponse(error_body(message, param, status, kind), status_code=status)


def create_app(model: ServedModel, driver, metrics, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="mpipar", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if "json" not in request.headers.get("content-type", ""):
            return _error(400, "the body must be JSON (Content-Type: application/json)")
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('msg', '')}")
        return _error(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}",
                      loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):  # 404, 405 as OpenAI bodies
        return _error(exc.status_code, str(exc.detail), kind="NotFoundError"
                      if exc.status_code == 404 else "BadRequestError")

    if api_key:
        app.add_middleware(_KeyCheck, key=api_key)

    @app.get("/health")
    async def health():
        ok = driver.ready.is_set() and not driver.stopping.is_set()
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": model.created, "owned_by": "mpipar",
             "root": model.names[0], "parent": None, "max_model_len": model.max_model_len}
            for n in model.names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serve(request, body, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await serve(request, body, "chat.completion", "chatcmpl")

    def encode(prompt) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        if model.tokenizer is None:
            raise RequestError("this model folder has no tokenizer.json: send the prompt "
                               "as a list of token ids")
        return model.tokenizer.encode(prompt)

    def prompts_of(body) -> list[list[int]]:
        if isinstance(body, CompletionRequest):
            return [encode(p) for p in body.prompts()]
        if model.chat_template is None or model.tokenizer is None:
            raise RequestError("this model has no chat template (tokenizer_config.json "
                               "chat_template): use /v1/completions")
        messages = [m.as_template_input() for m in body.messages]
        text = model.chat_template.render(messages, **(body.chat_template_kwargs or {}))
        return [model.tokenizer.encode(text)]

    async def serve(request: Request, body, kind: str, prefix: str):
        if not driver.ready.is_set() or driver.stopping.is_set():
            return _error(503, "the server is not ready", kind="ServiceUnavailableError")
        if body.model is not None and body.model not in model.names:
            return _error(404, f"The model `{body.model}` does not exist.", "model",
                          "NotFoundError")
        try:
            body.refuse_unsupported()
            prompts = prompts_of(body)
            reqs = []
            for i, ids in enumerate(prompts):
                limit = body.limit() if isinstance(body, ChatRequest) else body.max_tokens
                if limit is None:  # as many as fit
                    limit = max(1, model.max_model_len - len(ids))
                params = body.sampling(limit, model.defaults)
                reqs.append(EngineRequest(f"{prefix}-{uuid.uuid4().hex}-{i}", ids, params,
                                          time.monotonic()))
        except (RequestError, ChatTemplateError) as e:
            return _error(400, str(e))
        stream = driver.submit(reqs)
        _, first = await stream.get()
        if isinstance(first, RequestError):
            return _error(400, str(first))
        if first is not ACCEPTED:
            return _error(503, str(first), kind="ServiceUnavailableError")
        job = _Job(driver, stream, reqs, body, model, kind, prefix)
        if body.stream:
            return StreamingResponse(job.events(), media_type="text/event-stream")
        return await job.whole(request)

    return app


class _KeyCheck:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every path but /health. (A plain
    ASGI wrapper: Starlette's BaseHTTPMiddleware would hide client disconnects.)"""

    def __init__(self, app, key: str):
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.want):
                response = _error(401, "missing or wrong API key (Authorization: Bearer "
                                  "KEY)", kind="AuthenticationError")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _Job:
    """The engine requests of one HTTP request, turned into OpenAI response objects."""

    def __init__(self, driver, stream, reqs, body, model: ServedModel, kind, prefix):
        self.driver, self.stream, self.reqs, self.body = driver, stream, reqs, body
        self.kind, self.chat = kind, kind == "chat.completion"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created, self.model = int(time.time()), model.names[0]
        self.texts = [TextStream(model.tokenizer, body.stop_strings()) for _ in reqs]
        self.reasons: list[str | None] = [None] * len(reqs)
        self.stop_reasons: list = [None] * len(reqs)

    def open_ids(self) -> list[str]:
        return [r.request_id for r, why in zip(self.reqs, self.reasons, strict=True)
                if why is None]

    async def next_events(self):
        """-> [(index, text delta, new ids, finish_reason or None)] or raises
        ServerClosing; stop strings end a choice here (its request is aborted)."""
        index, item = await self.stream.get()
        if isinstance(item, ServerClosing):
            raise item
        text = self.texts[index]
        delta = text.add(item.new_token_ids, final=item.finished)
        reason = None
        if text.stopped_by is not None:
            reason, self.stop_reasons[index] = "stop", text.stopped_by
            if not item.finished:
                self.driver.abort([item.request_id])
        elif item.finished:
            reason = item.finish_reason
            stop_ids = self.reqs[index].params.stop_token_ids
            if reason == "stop" and text.ids and text.ids[-1] in stop_ids:
                self.stop_reasons[index] = text.ids[-1]
        self.reasons[index] = reason
        return index, delta, list(item.new_token_ids), reason

    def usage(self) -> dict:
        prompt = sum(len(r.prompt_ids) for r in self.reqs)
        done = sum(len(t.ids) for t in self.texts)
        return {"prompt_tokens": prompt, "completion_tokens": done,
                "total_tokens": prompt + done}

    def choice(self, i: int, text: str, ids: list[int], reason, first: bool) -> dict:
        c: dict = {"index": i}
        if self.chat:
            if self.body.stream:
                c["delta"] = ({"role": "assistant", "content": text} if first
                              else {"content": text} if text or reason is None else {})
            else:
                c["message"] = {"role": "assistant", "content": text}
        else:
            c["text"] = text
        c.update(logprobs=None, finish_reason=reason, stop_reason=self.stop_reasons[i])
        if self.body.return_token_ids:
            c["token_ids"] = ids
            if first and not self.chat:
                c["prompt_token_ids"] = list(self.reqs[i].prompt_ids)
        return c

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    async def whole(self, request: Request):
        try:
            next_check = time.monotonic() + DISCONNECT_POLL_S
            while self.open_ids():
                try:
                    await asyncio.wait_for(self.next_events(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() >= next_check:  # the client may have gone
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return Response(status_code=499)
        except ServerClosing as e:
            return _error(503, str(e), kind="ServiceUnavailableError")
        finally:
            if self.open_ids():
                self.driver.abort(self.open_ids())
        out = self.head(self.kind)
        out["choices"] = [self.choice(i, t.text, t.ids, self.reasons[i], True)
                          for i, t in enumerate(self.texts)]
        if self.chat and self.body.return_token_ids:
            out["prompt_token_ids"] = list(self.reqs[0].prompt_ids)
        out["usage"] = self.usage()
        return out

    async def events(self):
        kind = "chat.completion.chunk" if self.chat else self.kind
        started = [False] * len(self.reqs)

        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        try:
            while self.open_ids():
                try:
                    i, delta, ids, reason = await self.next_events()
                except ServerClosing as e:
                    yield sse(error_body(str(e), status=503, kind="ServiceUnavailableError"))
                    break
                if not (delta or reason or ids) and started[i]:
                    continue
                chunk = self.head(kind)
                chunk["choices"] = [self.choice(i, delta, ids, reason, not started[i])]
                if self.chat and self.body.return_token_ids and not started[i]:
                    chunk["prompt_token_ids"] = list(self.reqs[i].prompt_ids)
                started[i] = True
                yield sse(chunk)
            if self.body.include_usage():
                yield sse({**self.head(kind), "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream (the task is cancelled)
            if self.open_ids():
                self.driver.abort(self.open_ids())
