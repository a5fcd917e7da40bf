"""The paged KV cache: block bookkeeping, prefix hashes, and attention through block tables."""

import numpy as np
import pytest

from mpipar.model import layers as L
from mpipar.serve.kvpool import BlockManager, KVPool, blocks_for, extend_hashes


def test_blocks_for():
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_release_lru_and_refcounts():
    m = BlockManager(6, 4)
    a = m.allocate(2)
    b = m.allocate(3)
    assert a == [0, 1] and b == [2, 3, 4] and m.num_free == 1
    with pytest.raises(ValueError):
        m.allocate(2)
    m.release(a)  # tail first: block 1 is freed before block 0
    assert list(m.free) == [5, 1, 0]
    assert m.allocate(2) == [5, 1]
    m.take([2])  # shared: two references
    m.release(b)
    assert m.ref[2] == 1 and 2 not in m.free
    m.release([2])
    assert m.ref[2] == 0 and list(m.free)[-1] == 2
    with pytest.raises(AssertionError):
        m.release([2])


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
