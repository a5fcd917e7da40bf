"""Choosing the next token, the record of one generate() call, and time per output token.

Greedy is an argmax (ties: lowest token id, as numpy.argmax). Temperature / top-p
sampling draws from a seeded generator per sequence, so a run is repeatable and every
layout draws the same tokens from the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def time_per_output_token(latency_s: float, ttft_s: float, output_tokens: int) -> float | None:
    """TPOT as vLLM defines it: the time after the first token over the tokens after it,
    (latency - TTFT) / (output tokens - 1); None below two tokens."""
    if output_tokens < 2:
        return None
    return (latency_s - ttft_s) / (output_tokens - 1)


@dataclass(frozen=True)
class Sampler:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def sample(self, logits: np.ndarray, seq_ids, step: int) -> np.ndarray:
        """logits [B, V] (host float32) -> token ids [B] int64."""
        if self.greedy:
            return np.argmax(logits, axis=-1).astype(np.int64)
        return np.array([sample_token(row, self.temperature, self.top_p, self.seed, seq, step)
                         for row, seq in zip(logits, seq_ids, strict=True)], dtype=np.int64)


def sample_token(logits: np.ndarray, temperature: float, top_p: float, seed: int, key: int,
                 step: int) -> int:
    """One row of logits [V] (host float32) -> a token id: temperature, then the smallest
    set of tokens whose probability reaches ``top_p``, drawn with the generator seeded by
    (seed, key, step), so every layout draws the same token from the same logits."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    keep = order[: int(np.searchsorted(cum, top_p) + 1)]
    q = p[keep] / p[keep].sum()
    rng = np.random.default_rng([seed, int(key), step])
    return int(keep[rng.choice(len(keep), p=q)])


@dataclass
class Generation:
    """What generate() returns (on the rank that reports)."""
    tokens: np.ndarray  # [B, new] int64
    prompt_logits: np.ndarray | None = None  # [B, max_prompt_len, V] f32, NaN past a prompt
    decode_logits: np.ndarray | None = None  # [B, new, V] f32: the logits that chose each token
    ttft_s: float = 0.0  # prompt in -> first token out
    decode_s: float = 0.0  # time of the decode steps after the first token

    @property
    def new_tokens(self) -> int:
        return int(self.tokens.shape[1]) if self.tokens.ndim == 2 else 0

    @property
    def tpot_s(self) -> float:
        tpot = time_per_output_token(self.ttft_s + self.decode_s, self.ttft_s, self.new_tokens)
        return 0.0 if tpot is None else tpot

    @property
    def tokens_per_s(self) -> float:
        total = self.ttft_s + self.decode_s
        return self.tokens.size / total if total > 0 else 0.0


def pad_prompt_logits(rows: list, vocab: int) -> np.ndarray:
    """list of [L_i, V] -> [B, max L, V] float32 with NaN past each prompt's end."""
    longest = max((r.shape[0] for r in rows), default=0)
    out = np.full((len(rows), longest, vocab), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
