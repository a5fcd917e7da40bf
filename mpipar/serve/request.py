"""What a client asks the serving engine for, and what it gets back each step.

Plain data, no MPI and no arrays: the HTTP server (serve/api.py) builds `Request`s,
the engine on world rank 0 validates and schedules them, and hands back one
`RequestOutput` per request that produced tokens (or finished) in a step.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class RequestError(ValueError):
    """A bad request; the message is meant for the client (an HTTP 400)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 -> greedy (distributed argmax)
    top_p: float = 1.0
    seed: int | None = None           # per-request generator seed; None -> derived from the id
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_s: float = 0.0


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]          # tokens produced in this step (may be empty)
    finished: bool
    finish_reason: str | None         # "stop" | "length" | "abort" | None while running
    prompt_len: int
    num_generated: int


FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
