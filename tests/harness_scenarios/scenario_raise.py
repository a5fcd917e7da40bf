"""Harness scenario (run by tests/test_harness.py, not by the suite): one rank raises
while the others enter a collective it will never join."""


def test_one_rank_raises_before_a_collective(world):
    if world.Get_rank() == 2:
        raise RuntimeError(f"rank {world.Get_rank()} raises before the collective")
    world.Barrier()


def test_never_reached(world):
    world.Barrier()
