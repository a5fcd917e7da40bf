"""Paged KV cache: one pool of fixed-size blocks per rank, block tables, prefix caching.

Memory (every rank, arrays): for each layer of its stage, keys and values
``[num_blocks, block_size, Hkv_l, D]`` for its ``Hkv_l`` kv heads, with
``num_blocks = kv_cache_tokens // block_size``. Bytes per rank:
``2 * layers_l * num_blocks * block_size * Hkv_l * D * itemsize``.

A sequence holds a block table ``[b_0, b_1, ...]``: its position ``p`` lives in block
``table[p // block_size]`` at offset ``p % block_size``. Every rank of a DP replica uses
the same block numbers (they run the same Step), so only world rank 0 keeps the
bookkeeping (``BlockManager``, one per replica) and the Step carries the tables.

Attention reads a sequence through ``PagedKV``, which offers what the contiguous
``layers.KVCache`` offers (``length`` and ``append(k, v) -> (K, V)`` views
``[S, Hkv, D]``): ``layers.attention`` runs unchanged on either. The view gathers the
table's blocks (a copy of ``S * Hkv_l * D`` values per layer and step), or takes a view
when the table is consecutive blocks (``generate`` reserves whole sequences up front in a
fresh pool, so there it never copies).

Prefix caching: a full block's hash is ``sha256(parent hash + its token ids)``, so equal
hashes mean equal whole prefixes. A block whose tokens are all scheduled is registered
under its hash; a new request whose leading full blocks hash the same takes them
(reference count + 1) and starts computing after them. Blocks of ref count 0 go to a
free queue in least-recently-freed order and keep their hash until they are handed out
again, so a repeated system prompt is still found after its last user left.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict

import numpy as np


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` positions."""
    return -(-tokens // block_size)


def extend_hashes(hashes: list, tokens, block_size: int) -> None:
    """Append the chained hash of every full block of ``tokens`` not hashed yet."""
    for i in range(len(hashes), len(tokens) // block_size):
        parent = hashes[-1] if hashes else b""
        block = np.asarray(tokens[i * block_size:(i + 1) * block_size], dtype=np.int64)
        hashes.append(hashlib.sha256(parent + block.tobytes()).digest())


class PagedKV:
    """One sequence's keys/values of one layer, read and written through its block table."""

    def __init__(self, xp, k_pool, v_pool, table, length: int, first: int | None = None):
        self.xp, self.k_pool, self.v_pool = xp, k_pool, v_pool
        self.table = table  # [blocks] host ints
        self.length = length  # positions already in the cache (this chunk starts here)
        self.first = first  # set when the table is first, first+1, ...: views, no copy

    def append(self, k, v):
        """k, v [t, Hkv, D] at positions length .. length+t-1 -> K, V [S, Hkv, D]."""
        xp, bs = self.xp, self.k_pool.shape[1]
        end = self.length + k.shape[0]
        if end > len(self.table) * bs:
            raise ValueError(f"block table of {len(self.table)} blocks holds "
                             f"{len(self.table) * bs} positions, not {end}")
        shape = (-1,) + self.k_pool.shape[2:]
        if self.first is not None:  # consecutive blocks: one view of them
            used = slice(self.first, self.first + blocks_for(end, bs))
            keys, values = self.k_pool[used].reshape(shape), self.v_pool[used].reshape(shape)
            keys[self.length:end], values[self.length:end] = k, v
        else:
            table = xp.asarray(np.asarray(self.table, dtype=np.int64))
            pos = xp.arange(self.length, end)
            blocks, offsets = table[pos // bs], pos % bs
            self.k_pool[blocks, offsets] = k
            self.v_pool[blocks, offsets] = v
            used = table[:blocks_for(end, bs)]
            keys, values = self.k_pool[used].reshape(shape), self.v_pool[used].reshape(shape)
        self.length = end
        return keys[:end], values[:end]


class KVPool:
    """This rank's blocks: K and V [num_blocks, block_size, Hkv_l, D] per local layer."""

    def __init__(self, xp, num_layers: int, num_blocks: int, block_size: int,
                 n_kv_heads: int, head_dim: int, dtype="float32"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs blocks: {num_blocks} blocks of {block_size}")
        self.xp, self.num_blocks, self.block_size = xp, num_blocks, block_size
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(num_layers)]

    def sequence(self, table, length: int) -> list[PagedKV]:
        """One PagedKV per local layer for a sequence with ``length`` cached positions."""
        table = [int(b) for b in table]
        consecutive = table == list(range(table[0], table[0] + len(table))) if table else False
        first = table[0] if consecutive else None
        return [PagedKV(self.xp, k, v, table, length, first)
                for k, v in zip(self.k, self.v, strict=True)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)


class BlockManager:
    """Which blocks of one replica's pool are free, shared, or cached (world rank 0)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self.free = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.block_of = {}  # hash -> block holding that prefix
        self.hash_of = {}  # block -> its registered hash

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def lookup(self, hashes) -> list[int]:
        """Blocks holding the longest cached prefix of ``hashes`` (no reference taken)."""
        found = []
        if self.prefix_caching:
            for h in hashes:
                block = self.block_of.get(h)
                if block is None:
                    break
                found.append(block)
        return found

    def free_after_taking(self, blocks) -> int:
        """Free blocks left once ``blocks`` (cached hits) are taken."""
        return self.num_free - sum(1 for b in blocks if self.ref[b] == 0)

    def take(self, blocks) -> None:
        """Share cached blocks: one more reference each."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """``n`` fresh blocks, consecutive where it can (attention then takes views, not
        copies): the blocks right after ``after`` (a sequence's last block) if they are
        free and hold no cached prefix; for a new sequence the middle of the longest run
        of such blocks, so that sequences admitted together have room to grow; else the
        least recently freed blocks (their old hashes are forgotten), ascending."""
        if n > len(self.free):
            raise ValueError(f"{n} blocks wanted, {len(self.free)} free")
        run = self._run_after(after, n) if after is not None else self._spread(n)
        if run is None:
            run = sorted(itertools.islice(self.free, n))  # least recently freed first
        for b in run:
            del self.free[b]
            old = self.hash_of.pop(b, None)
            if old is not None:
                del self.block_of[old]
            self.ref[b] = 1
        return run

    def _open(self, b: int) -> bool:
        return 0 <= b < self.num_blocks and self.ref[b] == 0 and b not in self.hash_of

    def _run_after(self, after: int, n: int) -> list[int] | None:
        run = list(range(after + 1, after + 1 + n))
        return run if all(self._open(b) for b in run) else None

    def _spread(self, n: int) -> list[int] | None:
        best_start, best_len, start = 0, 0, None
        for b in range(self.num_blocks + 1):
            if b < self.num_blocks and self._open(b):
                start = b if start is None else start
                continue
            if start is not None and b - start > best_len:
                best_start, best_len = start, b - start
            start = None
        if best_len < n:
            return None
        first = best_start + (best_len - n) // 2
        return list(range(first, first + n))

    def release(self, table) -> None:
        """Drop a sequence's references; its tail blocks are the first to be reused."""
        for b in reversed(table):
            self.ref[b] -= 1
            if self.ref[b] < 0:
                raise AssertionError(f"block {b} released more often than taken")
            if self.ref[b] == 0:
                self.free[b] = None

    def register(self, block: int, h: bytes) -> None:
        """``block`` now holds the full prefix ``h`` (the first block to hold it wins)."""
        if self.prefix_caching and h not in self.block_of and block not in self.hash_of:
            self.block_of[h] = block
            self.hash_of[block] = h
