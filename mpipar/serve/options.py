"""The serving engine's options, checked in one place, and where their defaults come from.

``EngineOptions.check`` is the one check of these numbers: the engines call it before
building anything, and ``serve/cli.py`` calls it on the parsed flags (a ValueError there
is a bad input: exit 2 from rank 0 before any model loads).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

POSITIVE = ("block_size", "kv_cache_tokens", "max_num_batched_tokens", "max_num_seqs",
            "micro_batches", "max_model_len")


@dataclass
class EngineOptions:
    block_size: int = 16
    kv_cache_tokens: int = 16384  # per replica; the pool of every rank holds this many
    max_num_batched_tokens: int = 512  # per replica per step
    max_num_seqs: int = 64  # running requests per replica
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    eos_token_ids: list | None = None  # None: from generation_config.json / config.json
    enable_prefix_caching: bool = True
    micro_batches: int | None = None  # lanes of disjoint requests; None: one per stage
    keep_logits: bool = False  # full logits of every computed row back to rank 0 (checks)
    reserve: bool = False  # admit a request with blocks for its whole length (offline)

    def check(self, as_flags: bool = False) -> None:
        """ValueError naming the first option that is not a positive integer (None: the
        default, which is); ``as_flags``: named as serve.py's flags (--block-size)."""
        for name in POSITIVE:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                what = "--" + name.replace("_", "-") if as_flags else name
                raise ValueError(f"{what} must be a positive integer, got {value!r}")

    def max_len(self, config) -> int:
        """The longest prompt + output accepted: the option, else the model's positions."""
        return self.max_model_len or config.max_position_embeddings

    @classmethod
    def from_args(cls, args) -> EngineOptions:
        """The options that serve.py's flags give (flags left out keep the defaults)."""
        given = {"block_size": args.block_size, "kv_cache_tokens": args.kv_cache_tokens,
                 "max_num_batched_tokens": args.max_num_batched_tokens,
                 "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                 "enable_prefix_caching": args.prefix_caching}
        options = cls(**{k: v for k, v in given.items() if v is not None})
        options.check(as_flags=True)
        return options


def eos_token_ids(source) -> list[int]:
    """EOS ids of a checkpoint folder (generation_config.json first); [] for presets."""
    if getattr(source, "eos_token_ids", None) is not None:  # a GGUF's metadata
        return list(source.eos_token_ids)
    folder = getattr(source, "dir", None)
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(folder, name) if folder else ""
        if path and os.path.isfile(path):
            value = json.load(open(path)).get("eos_token_id")
            if value is not None:
                return [int(v) for v in (value if isinstance(value, list) else [value])]
    return []
