"""Layout: the pure rank <-> coordinate map for every layout up to 64 ranks, and the split."""

import itertools

import pytest

from mpipar.layout import Layout, LayoutError, make_comms


def all_layouts(max_world=64):
    for tp, pp, dp in itertools.product(range(1, max_world + 1), repeat=3):
        if tp * pp * dp > max_world:
            continue
        for ep in range(1, tp * dp + 1):
            if (tp * dp) % ep == 0:
                yield Layout(tp=tp, pp=pp, dp=dp, ep=ep)


@pytest.mark.rank0
def test_every_layout_up_to_64_ranks():
    count = 0
    for lay in all_layouts():
        count += 1
        w = lay.world
        coords = [lay.coords(r) for r in range(w)]
        # The formula of the docstring, and its inverse.
        for c in coords:
            assert c.world == (c.pp * lay.dp + c.dp) * lay.tp + c.tp
            assert lay.rank_of(c.tp, c.dp, c.pp) == c.world
        for kind, size, n_groups in (("tp", lay.tp, w // lay.tp), ("dp", lay.dp, w // lay.dp),
                                     ("pp", lay.pp, w // lay.pp), ("ep", lay.ep, w // lay.ep),
                                     ("stage", lay.stage_size, lay.pp)):
            groups = lay.groups(kind)
            assert len(groups) == n_groups, (lay, kind)
            assert all(len(g) == size for g in groups), (lay, kind)
            assert sorted(r for g in groups for r in g) == list(range(w)), (lay, kind)
        for g in lay.groups("tp"):  # TP groups are runs of adjacent ranks
            assert g == list(range(g[0], g[0] + lay.tp))
            assert len({coords[r].pp for r in g}) == 1 and len({coords[r].dp for r in g}) == 1
        for g in lay.groups("pp"):  # neighbours along the pipeline: stage order
            assert [coords[r].pp for r in g] == list(range(lay.pp))
            assert len({(coords[r].tp, coords[r].dp) for r in g}) == 1
        for g in lay.groups("dp"):
            assert [coords[r].dp for r in g] == list(range(lay.dp))
        for g in lay.groups("ep"):  # inside one stage, adjacent, rank = ep coordinate
            assert len({coords[r].pp for r in g}) == 1
            assert [coords[r].ep for r in g] == list(range(lay.ep))
            assert g == list(range(g[0], g[0] + lay.ep))
    assert count > 1000


def test_seed_example_16_ranks():
    lay = Layout(tp=4, pp=4)
    assert lay.groups("tp") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert lay.groups("pp")[1] == [1, 5, 9, 13]
    assert [lay.coords(r).pp for r in range(4, 8)] == [1] * 4


@pytest.mark.parametrize("kwargs, words", [
    ({"tp": 0}, ["tp", "0"]),
    ({"pp": -1}, ["pp", "-1"]),
    ({"tp": 2, "dp": 2, "ep": 3}, ["ep=3", "tp*dp", "4"]),
    ({"tp": 2, "ep": 4}, ["ep=4", "2"]),
])
def test_bad_layouts_name_the_numbers(kwargs, words):
    with pytest.raises(LayoutError) as e:
        Layout(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_world_size_mismatch():
    with pytest.raises(LayoutError, match=r"2\*1\*2 = 4 ranks, but the job has 3"):
        Layout(tp=2, pp=2).check_world(3)


def test_split_matches_layout(world):
    """Comm.Split gives groups whose members are the pure map's, in its order."""
    n = world.Get_size()
    for tp in [d for d in range(1, n + 1) if n % d == 0]:
        lay = Layout(tp=tp, pp=n // tp, ep=tp)
        comms = make_comms(lay, world)
        for kind in ("tp", "pp", "ep"):
            group = getattr(comms, kind)
            members = group.comm.allgather(world.Get_rank())
            assert members in lay.groups(kind)
            assert members[group.rank] == world.Get_rank()
