"""The paged KV cache: block bookkeeping, prefix hashes, and attention through block tables."""

import numpy as np
import pytest

from mpipar.model import layers as L
from mpipar.serve.kvpool import BlockManager, KVPool, blocks_for, extend_hashes


def test_blocks_for():
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocation_keeps_tables_consecutive_then_falls_back_to_lru():
    m = BlockManager(8, 4)
    assert m.allocate(2) == [3, 4]  # a new sequence: the middle of the free run
    assert m.allocate(1, after=4) == [5]  # growth: the next block
    assert m.allocate(2) == [0, 1]  # the longest free run left is 0..2
    assert m.allocate(1, after=1) == [2]
    assert m.allocate(2, after=5) == [6, 7] and m.num_free == 0
    with pytest.raises(ValueError):
        m.allocate(1)
    m.release([3, 4, 5])  # tail first: 5 is the least recently freed
    m.release([0, 1])
    assert list(m.free) == [5, 4, 3, 1, 0]
    assert m.allocate(2, after=7) == [4, 5]  # nothing after 7: LRU, ascending
    m.register(3, b"h3")  # a cached prefix is not taken while uncached runs fit...
    assert m.allocate(1) == [0]
    assert m.allocate(2) == [1, 3]  # ...else LRU, which forgets the hash
    assert m.lookup([b"h3"]) == []


def test_release_and_refcounts():
    m = BlockManager(6, 4)
    a = m.allocate(3)
    m.take([a[0]])  # shared: two references
    m.release(a)
    assert m.ref[a[0]] == 1 and a[0] not in m.free and m.num_free == 5
    m.release([a[0]])
    assert m.ref[a[0]] == 0 and list(m.free)[-1] == a[0]
    with pytest.raises(AssertionError):
        m.release([a[0]])


def test_prefix_hashes_chain_and_survive_until_reuse():
    tokens = list(np.random.default_rng(0).integers(0, 100, 11))
    h = []
    extend_hashes(h, tokens, 4)
    assert len(h) == 2  # 11 tokens: two full blocks
    other = []
    extend_hashes(other, tokens[:4] + [t + 1 for t in tokens[4:8]], 4)
    assert other[0] == h[0] and other[1] != h[1]  # same first block, different second
    shifted = []
    extend_hashes(shifted, [tokens[0] + 1] + tokens[1:8], 4)
    assert shifted[1] != h[1]  # equal block tokens, different parent: different hash

    m = BlockManager(4, 4)
    blocks = m.allocate(2)
    for blk, hh in zip(blocks, h, strict=True):
        m.register(blk, hh)
    assert m.lookup(h) == blocks and m.lookup(other) == blocks[:1]
    m.take(m.lookup(h))  # a second request shares both
    assert m.ref[blocks[0]] == m.ref[blocks[1]] == 2
    m.release(blocks)
    m.release(blocks)
    assert m.num_free == 4 and m.lookup(h) == blocks  # free, still cached
    assert m.free_after_taking(blocks) == 2
    m.allocate(3)  # LRU: the two never-used blocks, then the cached tail block
    assert m.lookup(h) == blocks[:1]
    assert BlockManager(4, 4, prefix_caching=False).lookup(h) == []


def test_paged_attention_equals_contiguous():
    """Keys/values written in chunks through a scrambled block table read back as the
    contiguous cache does, and attention over them gives the same output."""
    rng = np.random.default_rng(1)
    hkv, d, hq, bs = 2, 8, 4, 4
    pool = KVPool(np, 1, 9, bs, hkv, d)
    table = [7, 2, 5, 0, 8]
    cache = L.KVCache(np, 20, hkv, d)
    length = 0
    for t in (5, 1, 7, 1, 3):  # 17 positions, chunks cross block borders
        k, v, q = (rng.standard_normal((t, h, d)).astype(np.float32) for h in (hkv, hkv, hq))
        paged = pool.sequence(table, length)[0]
        kk, vv = paged.append(k, v)
        ck, cv = cache.append(k, v)
        length += t
        assert paged.length == cache.length == length
        assert np.array_equal(kk, ck) and np.array_equal(vv, cv)
        assert np.array_equal(L.causal_gqa_attention(np, q, kk, vv),
                              L.causal_gqa_attention(np, q, ck, cv))
    assert np.array_equal(pool.k[0][7, :4], cache.k[:4])  # position 0..3 in block 7
    with pytest.raises(ValueError, match="holds 20 positions"):
        pool.sequence(table, 17)[0].append(*(np.zeros((4, hkv, d), np.float32),) * 2)
    assert pool.nbytes == 2 * 9 * bs * hkv * d * 4


def test_consecutive_tables_read_as_views():
    pool = KVPool(np, 2, 8, 4, 1, 2)
    k = np.arange(12, dtype=np.float32).reshape(6, 1, 2)
    kk, _ = pool.sequence([3, 4], 0)[1].append(k, k)
    assert np.shares_memory(kk, pool.k[1]) and np.array_equal(kk, k)
    kk, _ = pool.sequence([4, 3], 0)[1].append(k, k)  # not consecutive: gathered
    assert not np.shares_memory(kk, pool.k[1]) and np.array_equal(kk, k)
