"""Shared fixtures: small simulated observations (session-scoped: simulating costs time),
paths to the real frames in ../shared/data, and a scheduler that counts computations."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import dask
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def small_sim(tmp_path_factory):
    """6 frames of 128x160 px with saturated stars, cosmic rays, a trail and hot pixels."""
    from drizzlestack.simulate import simulate

    d = tmp_path_factory.mktemp("small_sim")
    return simulate(d, n_frames=6, shape=(128, 160), n_stars=80, n_galaxies=2, seed=7)


@pytest.fixture
def hatp32_files():
    files = sorted((SHARED_DATA / "hatp32").glob("*.fits.gz"))
    if not files:
        pytest.skip("real frames not available (../shared/data/hatp32)")
    return files


class CountingScheduler:
    """A dask scheduler that counts how often it is asked to compute (as xarray's
    ``raise_if_dask_computes``); ``max_computes`` beyond which it raises."""

    def __init__(self, max_computes: int = 0):
        self.max_computes = max_computes
        self.total = 0

    def __call__(self, dsk, keys, **kwargs):
        self.total += 1
        if self.total > self.max_computes:
            raise RuntimeError(f"too many dask computations: {self.total} > {self.max_computes}")
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0):
    sched = CountingScheduler(max_computes)
    with dask.config.set(scheduler=sched):
        yield sched


def register_with_truth(store, truth, reference: int = 0):
    """Write the simulator's true transforms as the store's registration (for tests of
    the later steps that must not depend on the registration step's accuracy)."""
    import numpy as np

    from drizzlestack.store import StackStore

    st = StackStore.open(store)
    ref_inv = np.linalg.inv(truth.transforms[reference])
    transforms = np.array([ref_inv @ t for t in truth.transforms[: st.n_frames]])
    st.write_variable("transform", transforms, ("frame", "transform_row", "transform_col"))
    st.attrs["reference"] = reference
    st.begin_step("register", {"truth": True})
    st.end_step("register")
    return st


@pytest.fixture(scope="session")
def sat_sim(tmp_path_factory):
    """8 frames of 96x112 px with saturated stars, cosmic rays, hot pixels and a trail."""
    from drizzlestack.simulate import simulate

    d = tmp_path_factory.mktemp("sat_sim")
    return simulate(d, n_frames=8, shape=(96, 112), n_stars=60, n_galaxies=1, n_saturated=3, seed=21)


def run_with_hang_guard(fn, *args, timeout: float = 300.0, **kwargs):
    """``fn(*args, **kwargs)``, failing the test if it has not returned after ``timeout``
    seconds. A guard against hangs, not a speed check: the timeout is far beyond any
    normal run, even on a loaded CI machine (speed belongs in benchmarks/)."""
    result, error = [], []

    def target():
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # re-raised in the test's thread
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"{getattr(fn, '__name__', fn)} still running after {timeout:g} s: it hangs")
    if error:
        raise error[0]
    return result[0]
