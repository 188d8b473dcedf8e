"""What a cluster user trips over: a --memory-limit too small for the tiles (workers
paused for ever), numba's cache on a read-only or shared file system, and warnings
printed with Python's source line on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import drizzlestack as ds
from drizzlestack import cli, parallel
from drizzlestack.store import FRAME_METADATA, StackStore
from conftest import register_with_truth

ROOT = Path(__file__).resolve().parents[1]


def _unwritten_store(path, n_frames, shape):
    """A registered store of ``n_frames`` frames of ``shape`` whose pixel chunks were
    never written (they read as NaN): the issue's 48 frames of 2048 x 2048 cost nothing."""
    st = StackStore.create(path, shape)
    st.group["frames"].resize((n_frames,) + tuple(shape))
    for name in FRAME_METADATA:
        st.group[name].resize((n_frames,))
    st.group["status"][:] = np.array(["ok"] * n_frames)
    st.group["path"][:] = np.array([f"/data/f{i}.fits" for i in range(n_frames)])
    st.attrs["n_frames"] = n_frames
    st.write_variable("transform", np.array([np.eye(3)] * n_frames), ("frame", "transform_row", "transform_col"))
    st.attrs["reference"] = 0
    st.begin_step("register", {})
    st.end_step("register")
    return st


def test_memory_limit_too_small_for_48_frames_of_2048px_stops_before_starting(tmp_path, monkeypatch):
    # The case: --memory-limit 800MB on SLURM jobs of 4 cores (4 tile tasks at once
    # per worker); the workers paused for ever. Now nothing starts and the message says
    # which limit or task memory would do.
    st = _unwritten_store(tmp_path / "big.zarr", 48, (2048, 2048))
    monkeypatch.setattr(parallel, "worker_memory", lambda: (800_000_000, 4, "--memory-limit 800MB", 1))
    with pytest.raises(ds.DrizzlestackError) as err:
        ds.integrate(st.path, output=None)
    msg = str(err.value)
    assert "integrate: the workers would pause for ever: --memory-limit 800MB gives each worker" in msg
    assert "tiles of 512 px over 48 frames" in msg
    # 4 x 151 MB tasks + 300 MiB for the worker = 918 MB, which must stay below 80 %: 1.2 GB
    assert "Use --memory-limit 1.2GB or more, or --task-memory 77MiB (smaller tiles)" in msg
    assert "integrate" not in StackStore.open(st.path).attrs["steps"]  # nothing started
    assert "location" not in StackStore.open(st.path).group

    # The suggestions do fit: the same plan with the suggested limit passes the check
    # (and stops later, on these empty frames, for another reason).
    monkeypatch.setattr(parallel, "worker_memory", lambda: (1_200_000_000, 4, "--memory-limit 1.2GB", 1))
    from drizzlestack.integration.integrate import _check_worker_memory

    _check_worker_memory(512, 48, "256MiB", (2048, 2048))
    monkeypatch.setattr(parallel, "worker_memory", lambda: (800_000_000, 4, "--memory-limit 800MB", 1))
    _check_worker_memory(512, 48, "77MiB", (2048, 2048))


def test_memory_limit_of_a_local_cluster_is_checked_from_the_command_line(tmp_path, capsys):
    st = _unwritten_store(tmp_path / "s.zarr", 48, (1024, 1024))
    code = cli.main(["integrate", str(st.path), "--tile", "1024", "--task-memory", "1GiB", "--output", "none.fits",
                     "--scheduler", "distributed", "--workers", "1", "--memory-limit", "800MB", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "drizzlestack: error: integrate: the workers would pause for ever: --memory-limit 800MB" in err
    assert "tiles of 1024 px over 48 frames" in err and "Use --memory-limit 1.2GB or more" in err
    assert not (tmp_path / "none.fits").exists()


def test_drizzle_tiles_too_large_for_the_workers_suggest_a_smaller_tile(tmp_path, sat_sim, monkeypatch):
    store = tmp_path / "s.zarr"
    ds.ingest(sat_sim.files[:3], store)
    register_with_truth(store, sat_sim)
    monkeypatch.setattr(parallel, "worker_memory", lambda: (420_000_000, 4, "memory: 420MB", 1))
    with pytest.raises(ds.DrizzlestackError, match=r"drizzle: the workers would pause for ever: memory: 420MB.*"
                                                   r"tiles of 768 x 896 px.*600MB or more, or --tile 256"):
        ds.drizzle(store, scale=8, tile=1024, output=None)
    assert "drizzle" not in StackStore.open(store).group
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.DrizzlestackWarning)
        ds.drizzle(store, scale=8, tile=256, output=None)  # the suggestion runs


def test_slurm_job_memory_and_cores_are_what_the_check_uses():
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    cluster = dask_jobqueue.SLURMCluster(cores=4, processes=2, memory="1600MB",
                                         scheduler_options={"host": "127.0.0.1", "dashboard_address": ":0"})
    try:
        memory, threads, where, processes = parallel._jobqueue_workers(cluster, parallel.SchedulerOptions())
    finally:
        cluster.close()
    assert (memory, threads, processes) == (800_000_000, 2, 2)
    assert "shared by its 2 worker processes" in where


def test_no_memory_check_on_the_threaded_scheduler():
    with parallel.scheduler(scheduler="threads"):
        assert parallel.worker_memory() is None
        parallel.check_task_memory("integrate", 10**12, "huge tiles")  # nothing to check against


# ------------------------------------------------------------------------------ warnings
def test_cli_warnings_are_plain_lines_without_the_python_source_line(tmp_path, sat_sim):
    # Once: "cli.py:145: DrizzlestackWarning: kernel='lanczos3' ignores ...", then the
    # source line "result = drizzle(args.store, ...".
    store = tmp_path / "s.zarr"
    ds.ingest(sat_sim.files[:3], store)
    register_with_truth(store, sat_sim)
    res = subprocess.run([sys.executable, "-m", "drizzlestack.cli", "drizzle", str(store), "--kernel", "lanczos3",
                          "--pixfrac", "0.5", "--output", str(tmp_path / "d.fits"), "--scheduler", "synchronous",
                          "--no-progress"], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    err = res.stderr.splitlines()
    assert "warning: kernel='lanczos3' ignores pixfrac=0.5 (as STScI drizzle does); using 1" in err
    assert not any("DrizzlestackWarning" in line or ".py:" in line or "drizzle(" in line for line in err), err


def test_cli_warning_format_names_other_categories():
    assert cli.format_warning("x", ds.DrizzlestackWarning, "f.py", 1) == "warning: x\n"
    assert cli.format_warning("y", RuntimeWarning, "f.py", 1) == "warning: RuntimeWarning: y\n"


# -------------------------------------------------------------------------- numba cache
def test_numba_cache_goes_to_the_user_cache_dir_when_the_package_is_not_writable(tmp_path):
    from drizzlestack._numba_cache import choose_cache_dir

    read_only = tmp_path / "ro-package"
    read_only.write_text("a file, so nothing can be created under it")  # unwritable even for root
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert choose_cache_dir(read_only, env) == str(tmp_path / "cache" / "drizzlestack" / "numba")
    writable = tmp_path / "pkg"
    writable.mkdir()
    assert choose_cache_dir(writable, env) is None  # numba's own place, next to the sources
    assert choose_cache_dir(read_only, {**env, "NUMBA_CACHE_DIR": "/scratch/numba"}) is None  # the user's wins


def test_numba_cache_dir_is_set_for_workers_importing_a_read_only_install(tmp_path):
    # A copy of the package where nothing can be written next to the sources (a file
    # stands in its __pycache__ place): importing it sets NUMBA_CACHE_DIR, and the
    # kernels' cache files land there.
    import shutil

    pkg = tmp_path / "site" / "drizzlestack"
    shutil.copytree(ROOT / "drizzlestack", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for d in [pkg, *[p for p in pkg.rglob("*") if p.is_dir()]]:
        (d / "__pycache__").write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(tmp_path / "site"), XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONDONTWRITEBYTECODE="1")
    code = ("import os, numpy as np, drizzlestack.geometry as g; "
            f"assert g.__file__.startswith({str(tmp_path)!r}), g.__file__; "
            "print(os.environ.get('NUMBA_CACHE_DIR')); "
            "from drizzlestack.drizzle import kernels as K; "
            "out = np.empty((2, 2, 2)); K.homography_grid(np.eye(3), 0, 0, 2, 2, out)")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cache = tmp_path / "cache" / "drizzlestack" / "numba"
    assert res.stdout.strip() == str(cache)
    assert any(cache.rglob("*.nbi")), "no numba cache index written to NUMBA_CACHE_DIR"
