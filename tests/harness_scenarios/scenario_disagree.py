"""Harness scenario (run by tests/test_harness.py, not by the suite): ranks disagree
without leaving anyone inside a collective; every rank fails those tests and the run
goes on to the next."""

import pytest


@pytest.fixture
def skips_on_rank_3(world):
    if world.Get_rank() == 3:
        pytest.skip(f"fixture skips on rank {world.Get_rank()} only")


def test_setup_skips_on_one_rank(world, skips_on_rank_3):
    world.Barrier()                 # never entered: the setup agreement fails it first


def test_one_rank_fails_an_assertion(world):
    assert world.Get_rank() != 1, f"assertion fails on rank {world.Get_rank()}"


def test_the_run_goes_on(world):
    assert world.allreduce(1) == world.Get_size()
