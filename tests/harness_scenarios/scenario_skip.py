"""Harness scenario (run by tests/test_harness.py, not by the suite): one rank skips
while the others enter a collective it will never join."""

import pytest


def test_one_rank_skips_before_a_collective(world):
    if world.Get_rank() == 1:
        pytest.skip(f"rank {world.Get_rank()} skips on its own")
    world.allreduce(1)


def test_never_reached(world):
    world.Barrier()
