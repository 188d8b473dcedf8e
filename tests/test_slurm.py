"""A real SLURM cluster on localhost (tests/slurm/start_cluster.sh): ``drizzlestack run``
through dask-jobqueue with 2 jobs equals the threaded run, also when one job is
cancelled (``scancel``, as at walltime) in the middle of the drizzle.

Skipped, with the reason, where SLURM cannot be had (not root, slurm-wlm/munge not
installed, dask-jobqueue missing)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

import drizzlestack as ds
from drizzlestack.store import StackStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    pytest.importorskip("dask_jobqueue", reason="the SLURM test needs dask-jobqueue (pip install 'drizzlestack[hpc]')")
    state = tmp_path_factory.mktemp("slurm-state")
    try:
        res = subprocess.run(["bash", str(HERE / "slurm" / "start_cluster.sh"), str(state)], capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no SLURM cluster: {exc}")
    if res.returncode != 0:
        pytest.skip(f"no SLURM cluster: {(res.stdout.strip() or res.stderr.strip()).splitlines()[-1:]}")
    try:
        yield state
    finally:
        subprocess.run(["bash", str(HERE / "slurm" / "stop_cluster.sh"), str(state)], timeout=60)


def _jobqueue_file(path: Path, job_name: str, preload: str | None = None) -> Path:
    """The jobqueue YAML a user on this machine would write: the scheduler on the
    loopback interface, and a prologue that puts the environment's ``bin`` (and this
    checkout) on the job's paths."""
    cfg = {
        "cores": 1, "processes": 1, "memory": "1GB", "walltime": "00:10:00", "job_name": job_name,
        "interface": "lo", "python": sys.executable,
        "scheduler_options": {"dashboard_address": ":0"},
        "local_directory": str(path.parent / "worker-space"), "log_directory": str(path.parent / "logs"),
        "job_script_prologue": [f"export PATH={Path(sys.executable).parent}:$PATH",
                                f"export PYTHONPATH={ROOT}"],
    }
    if preload:
        cfg["worker_extra_args"] = ["--preload", preload]
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_config(directory: Path, files) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # Absolute paths: relative ones are taken from the working directory, not the config's.
    cfg = {"store": str(directory / "stack.zarr"), "ingest": {"inputs": [str(f) for f in files], "chunk": 64},
           "integrate": {"tile": 64, "output": str(directory / "integration.fits")},
           "drizzle": {"scale": 2.0, "pixfrac": 0.8, "tile": 32, "output": str(directory / "drizzle.fits")}}
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    kwargs.setdefault("cwd", str(Path(args[1]).parent) if len(args) > 1 else None)  # reports land there
    return subprocess.Popen([sys.executable, "-m", "drizzlestack.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture(scope="module")
def threaded(small_sim, tmp_path_factory):
    """The reference: the same configuration on the threaded scheduler."""
    d = tmp_path_factory.mktemp("threaded")
    proc = _cli("run", str(_run_config(d, small_sim.files)), "--scheduler", "threads", "--no-progress")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return ds.open_stack(d / "stack.zarr")


def _assert_same_products(store, reference):
    got = ds.open_stack(store)
    for var in ("transform", "weight", "integration", "rejection", "drizzle", "drizzle_weights", "drizzle_coverage"):
        np.testing.assert_array_equal(got[var].values, reference[var].values, err_msg=var)
    assert np.isfinite(got.drizzle.values).mean() > 0.5


def test_run_on_slurm_with_two_jobs_equals_the_threaded_run(slurm, small_sim, threaded, tmp_path):
    name = f"dzs-{uuid.uuid4().hex[:8]}"
    config = _run_config(tmp_path / "run", small_sim.files)
    jobqueue = _jobqueue_file(tmp_path / "slurm.yaml", name)
    proc = _cli("run", str(config), "--scheduler", "slurm", "--workers", "2", "--jobqueue-config", str(jobqueue),
                "--no-progress")
    seen = set()
    while proc.poll() is None:  # the two jobs really ran on SLURM
        q = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True)
        seen |= {line.split()[0] for line in q.stdout.splitlines() if line.endswith("RUNNING")}
        time.sleep(0.5)
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    assert len(seen) == 2, f"SLURM jobs seen running: {seen}\n{out}"
    _assert_same_products(tmp_path / "run" / "stack.zarr", threaded)


def test_slurm_job_cancelled_mid_drizzle_still_gives_the_threaded_result(slurm, small_sim, threaded, tmp_path):
    name = f"dzs-{uuid.uuid4().hex[:8]}"
    config = _run_config(tmp_path / "run", small_sim.files)
    jobqueue = _jobqueue_file(tmp_path / "slurm.yaml", name, preload=str(HERE / "slurm" / "slow_tiles.py"))
    args = ["run", str(config), "--scheduler", "slurm", "--workers", "2", "--jobqueue-config", str(jobqueue),
            "--no-progress"]
    proc = _cli(*args)
    store = tmp_path / "run" / "stack.zarr"
    cancelled = None
    deadline = time.monotonic() + 300
    # Tiles take 0.2 s each on the workers (slow_tiles.py): 80 drizzle tiles leave seconds
    # to cancel one of the two jobs once the first tiles are recorded in the ledger.
    while proc.poll() is None and cancelled is None and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            st = StackStore.open(store, mode="r")
            if "drizzle_tiles" not in st.group or (st.step("drizzle") or {}).get("complete"):
                continue
            done = int(np.all(np.isfinite(st.group["drizzle_tiles"][...]), axis=-1).sum())
        except Exception:  # the store or the ledger is being written right now
            continue
        if done >= 4:
            jobs = subprocess.run(["squeue", "-h", "-n", name, "-t", "RUNNING", "-o", "%i"], capture_output=True,
                                  text=True).stdout.split()
            if len(jobs) == 2:
                subprocess.run(["scancel", jobs[0]], check=True)
                cancelled = (jobs[0], done)
    out, _ = proc.communicate(timeout=300)
    assert cancelled is not None, f"no job was cancelled mid-drizzle (exit {proc.returncode}):\n{out}"
    if proc.returncode != 0:
        # The run may stop when its last worker goes: the same command resumes.
        rerun = _cli(*args)
        out2, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, out2
        assert "resuming an interrupted drizzle" in out2
    st = StackStore.open(store, mode="r")
    assert st.step("drizzle")["complete"]
    _assert_same_products(store, threaded)
