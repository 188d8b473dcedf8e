"""Dask worker preload for tests/test_slurm.py: every drizzle tile takes 0.2 s longer,
so that a job can be cancelled while tiles are still running (not a race to win)."""

import time

from drizzlestack.drizzle import driver

_drizzle_tile = driver.drizzle_tile


def drizzle_tile(*args, **kwargs):
    time.sleep(0.2)
    return _drizzle_tile(*args, **kwargs)


driver.drizzle_tile = drizzle_tile
