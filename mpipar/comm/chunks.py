"""How n items are cut into p contiguous parts: one rule for the whole of mpipar.

The first ``n % p`` parts are one item larger. The ring all-reduce's chunks, the
shards of heads, intermediate and vocab, the EP token shares and the pipeline's stages
and prefill chunks all use it, so every piece of code agrees on who holds what.
(A pure module: it loads no MPI.)
"""

from __future__ import annotations


def chunk_bounds(n_elems: int, n_ranks: int) -> list[tuple[int, int]]:
    """[(start, stop)] of the n_ranks chunks: the first n_elems % n_ranks one larger."""
    base, extra = divmod(n_elems, n_ranks)
    bounds, start = [], 0
    for i in range(n_ranks):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
