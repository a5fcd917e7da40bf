"""What a client asks the serving engine for, and what it gets back each step.

Plain data and its checks, no MPI: the HTTP server (serve/api.py) builds `Request`s,
the engine on world rank 0 validates and schedules them, and hands back one
`RequestOutput` per request that produced tokens (or finished) in a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


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


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_prompt(ids, vocab_size: int) -> None:
    """RequestError unless ``ids`` is a non-empty list of token ids of the vocabulary."""
    if not isinstance(ids, list) or not ids:
        raise RequestError("the prompt must be a non-empty list of token ids")
    bad = [t for t in ids if not (_is_int(t) and 0 <= t < vocab_size)]
    if bad:
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size}), "
                           f"got {bad[:5]}")


def check_length(prompt_len: int, max_tokens: int, max_model_len: int,
                 new_name: str = "max_tokens", limit_name: str | None = None) -> None:
    """RequestError when prompt + new tokens exceed ``max_model_len`` (the names say which
    options the caller calls them)."""
    total = prompt_len + max_tokens
    if total > max_model_len:
        limit = limit_name or f"max_model_len ({max_model_len})"
        raise RequestError(f"{prompt_len} tokens + {new_name} {max_tokens} = {total} > {limit}")


def check_request(req: Request, vocab_size: int, max_model_len: int) -> None:
    """Raise RequestError (a message for the client) for what the engine cannot run."""
    p = req.params
    check_prompt(req.prompt_ids, vocab_size)
    if not _is_int(p.max_tokens) or p.max_tokens < 1:
        raise RequestError(f"max_tokens must be an integer >= 1, got {p.max_tokens!r}")
    if not (_is_number(p.temperature) and math.isfinite(p.temperature) and p.temperature >= 0):
        raise RequestError(f"temperature must be a number >= 0, got {p.temperature!r}")
    if not (_is_number(p.top_p) and 0 < p.top_p <= 1):
        raise RequestError(f"top_p must be in (0, 1], got {p.top_p!r}")
    if p.seed is not None and not _is_int(p.seed):
        raise RequestError(f"seed must be an integer, got {p.seed!r}")
    if not isinstance(p.stop_token_ids, list) or not all(_is_int(t) for t in p.stop_token_ids):
        raise RequestError("stop_token_ids must be a list of integers")
    check_length(len(req.prompt_ids), p.max_tokens, max_model_len)
