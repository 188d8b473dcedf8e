"""Interrupted runs resume without redoing finished tiles and without corrupting the
store: an exception in a tile task, a killed process (SIGKILL), a full disk, and a
worker process that dies mid-run on a distributed cluster."""

from __future__ import annotations

import errno
import importlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import drizzlestack as ds
from drizzlestack import cli
from drizzlestack.drizzle import driver
from drizzlestack.parallel import scheduler
from drizzlestack.chunkio import DirectArray
from drizzlestack.store import StackStore
from conftest import register_with_truth

# the module (drizzlestack.integration re-exports a function of the same name)
integrate_module = importlib.import_module("drizzlestack.integration.integrate")


@pytest.fixture
def registered(tmp_path, sat_sim):
    store = tmp_path / "s.zarr"
    ds.ingest(sat_sim.files, store)
    register_with_truth(store, sat_sim)
    return store


class Boom(RuntimeError):
    pass


def _failing_after(monkeypatch, module, name, n_ok):
    """Patch ``module.name`` to run normally ``n_ok`` times, then raise; returns the
    call counter."""
    original = getattr(module, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if n_ok is not None and calls["n"] > n_ok:
            raise Boom("interrupted")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _ledger_done(store, step):
    ledger = StackStore.open(store).group[f"{step}_tiles"][...]
    return int(np.all(np.isfinite(ledger), axis=-1).sum()), ledger.shape[0] * ledger.shape[1]


def test_interrupted_drizzle_resumes_without_redoing_finished_tiles(registered, monkeypatch):
    kwargs = dict(scale=2.0, pixfrac=0.8, tile=32, output=None)
    with scheduler(scheduler="synchronous"):
        calls = _failing_after(monkeypatch, driver, "drizzle_tile", 5)
        with pytest.raises(Boom):
            ds.drizzle(registered, **kwargs)
        done, total = _ledger_done(registered, "drizzle")
        assert done == 5 and total == 42
        assert not StackStore.open(registered).step("drizzle")["complete"]
        ds.open_stack(registered)  # the store stays readable

        monkeypatch.undo()
        calls = _failing_after(monkeypatch, driver, "drizzle_tile", None)
        with pytest.warns(ds.DrizzlestackWarning, match="resuming an interrupted drizzle .5 of 42 tiles"):
            resumed = ds.drizzle(registered, **kwargs)
        assert calls["n"] == total - done  # finished tiles are not redone
        resumed = {v: resumed[v].values for v in driver.OUTPUT_VARIABLES}
        assert StackStore.open(registered).step("drizzle")["complete"]
        fresh = ds.drizzle(registered, force=True, **kwargs)
        assert calls["n"] == 2 * total - done
    for v in driver.OUTPUT_VARIABLES:
        np.testing.assert_array_equal(resumed[v], fresh[v].values, err_msg=v)


def test_changed_parameters_start_afresh_instead_of_resuming(registered, monkeypatch):
    with scheduler(scheduler="synchronous"):
        _failing_after(monkeypatch, driver, "drizzle_tile", 3)
        with pytest.raises(Boom):
            ds.drizzle(registered, scale=2.0, pixfrac=0.8, tile=32, output=None)
        monkeypatch.undo()
        calls = _failing_after(monkeypatch, driver, "drizzle_tile", None)
        ds.drizzle(registered, scale=2.0, pixfrac=0.7, tile=32, output=None)  # another pixfrac: all tiles
    assert calls["n"] == 42


def test_interrupted_integration_resumes_without_redoing_finished_tiles(registered, monkeypatch):
    kwargs = dict(rejection="sigma", tile=32, scale_estimator="biweight")  # no stars: no photometric scale
    with scheduler(scheduler="synchronous"):
        _failing_after(monkeypatch, integrate_module, "integrate_tile", 2)
        with pytest.raises(Boom):
            ds.integrate(registered, **kwargs)
        # Interrupted in the first (model) pass: its ledger has 2 of 4 tiles.
        done, total = _ledger_done(registered, "integrate_model")
        assert done == 2 and total == 4  # tiles of at least 64 px
        monkeypatch.undo()
        calls = _failing_after(monkeypatch, integrate_module, "integrate_tile", None)
        with pytest.warns(ds.DrizzlestackWarning, match="resuming an interrupted integration"):
            resumed = ds.integrate(registered, **kwargs)
        # The model pass finishes its two missing tiles; the final pass does all four.
        assert calls["n"] == (total - done) + total
        names = ["integration", "integration_model", "outliers", "rejected_low", "rejected_high",
                 "integration_weight", "rejection", "rejected_low_fraction", "rejected_high_fraction",
                 "outlier_fraction"]
        resumed = {v: resumed[v].values for v in names}
        summary = StackStore.open(registered).step("integrate")["summary"]
        fresh = ds.integrate(registered, force=True, **kwargs)
        assert StackStore.open(registered).step("integrate")["summary"]["max_weight"] == summary["max_weight"]
    for v in names:
        np.testing.assert_array_equal(resumed[v], fresh[v].values, err_msg=v)


def test_integration_interrupted_in_its_patched_final_pass_resumes_from_the_kept_sums(registered, monkeypatch):
    """Interrupted after the model pass and one tile of the final pass (which patches
    the model pass's plain sums, :mod:`drizzlestack.integration.patch`): the sums are
    still in the store, the resumed pass does the three missing tiles, and the products
    equal a fresh run's; the scratch sums are gone afterwards."""
    kwargs = dict(rejection="sigma", tile=32, scale_estimator="biweight")
    with scheduler(scheduler="synchronous"):
        _failing_after(monkeypatch, integrate_module, "integrate_tile", 5)
        with pytest.raises(Boom):
            ds.integrate(registered, **kwargs)
        assert _ledger_done(registered, "integrate_model") == (4, 4)
        assert _ledger_done(registered, "integrate") == (1, 4)
        assert "integration_base_sum" in StackStore.open(registered).group
        monkeypatch.undo()
        calls = _failing_after(monkeypatch, integrate_module, "integrate_tile", None)
        with pytest.warns(ds.DrizzlestackWarning, match="resuming an interrupted integration"):
            resumed = ds.integrate(registered, **kwargs)
        assert calls["n"] == 3
        names = ["integration", "rejected_low", "rejected_high", "integration_weight", "rejection", "outliers",
                 "rejected_low_fraction", "rejected_high_fraction"]
        resumed = {v: resumed[v].values for v in names}
        assert not any(k.startswith("integration_base") for k in StackStore.open(registered).group.array_keys())
        fresh = ds.integrate(registered, force=True, **kwargs)
    for v in names:
        np.testing.assert_array_equal(resumed[v], fresh[v].values, err_msg=v)


def test_full_disk_gives_a_clear_error_and_the_run_resumes(registered, monkeypatch, capsys, tmp_path):
    ds.integrate(registered, tile=32, scale_estimator="biweight")
    original = DirectArray._write_chunk
    writes = {"n": 0}

    def disk_fills_up(self, chunk, block):
        writes["n"] += 1
        if writes["n"] > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, chunk, block)

    monkeypatch.setattr(DirectArray, "_write_chunk", disk_fills_up)
    out = tmp_path / "d.fits"
    args = ["drizzle", str(registered), "--scale", "2", "--tile", "32", "-o", str(out), "--scheduler", "synchronous"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "No space left on device" in err and "run the same command again" in err
    assert not out.exists()
    ds.open_stack(registered)  # still readable
    done, total = _ledger_done(registered, "drizzle")
    assert 0 < done < total

    monkeypatch.undo()
    with pytest.warns(ds.DrizzlestackWarning, match="resuming"):
        assert cli.main(args) == 0
    resumed = ds.open_stack(registered)["drizzle"].values
    fresh = ds.drizzle(registered, scale=2.0, tile=32, output=None, force=True)["drizzle"].values
    np.testing.assert_array_equal(resumed, fresh)


#: run in a child process: the drizzle CLI, SIGKILLed by itself right after the tile
#: ledger records its KILL_AFTER-th tile (deterministic, no race against the clock)
KILLED_CHILD = """
import os, signal, sys
from drizzlestack import cli
from drizzlestack.drizzle import driver

recorded = 0
original = driver.record_tile

def record_then_die(*args, **kwargs):
    global recorded
    original(*args, **kwargs)
    recorded += 1
    if recorded == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)  # no chance to clean up

driver.record_tile = record_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_process_resumes_where_it_stopped(registered, tmp_path):
    """A drizzle CLI process killed with SIGKILL mid-run leaves a readable store; the
    same command then does only the missing tiles."""
    out = tmp_path / "d.fits"
    command = ["drizzle", str(registered), "--scale", "2", "--tile", "16", "-o", str(out),
               "--scheduler", "synchronous", "--no-progress"]
    env = dict(os.environ, KILL_AFTER="20")
    killed = subprocess.run([sys.executable, "-c", KILLED_CHILD, *command], capture_output=True, text=True,
                            timeout=600, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done, total = _ledger_done(registered, "drizzle")
    assert (done, total) == (20, 14 * 12)
    assert not out.exists()
    ds.open_stack(registered)

    resumed = subprocess.run([sys.executable, "-m", "drizzlestack.cli", *command], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming an interrupted drizzle ({done} of {total} tiles" in resumed.stderr
    assert out.exists()
    result = ds.open_stack(registered)["drizzle"].values
    fresh = ds.drizzle(registered, scale=2.0, tile=16, output=None, force=True)["drizzle"].values
    np.testing.assert_array_equal(result, fresh)


def _die_once(marker):
    """Installed in every worker: the first tile task to run kills its worker process."""
    from drizzlestack.drizzle import driver as worker_driver

    original = worker_driver.drizzle_tile

    def dying(plan, *args):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return original(plan, *args)
        os.close(fd)
        os._exit(1)

    worker_driver.drizzle_tile = dying


@pytest.mark.slow
def test_worker_death_is_retried_and_the_result_is_unchanged(registered, tmp_path):
    reference = ds.drizzle(registered, scale=2.0, pixfrac=0.8, tile=32, output=None)["drizzle"].values
    marker = tmp_path / "died"
    with scheduler(scheduler="distributed", workers=2, memory_limit="1GB", dashboard=":0") as client:
        client.run(_die_once, str(marker))
        result = ds.drizzle(registered, scale=2.0, pixfrac=0.8, tile=32, output=None, force=True)["drizzle"].values
    assert marker.exists()  # a worker did die
    np.testing.assert_array_equal(result, reference)
