"""Scheduler choice: local schedulers, a local distributed cluster giving the same results,
an address that does not answer, and HPC job scripts from the config files."""

from __future__ import annotations

import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

import drizzlestack as ds
from drizzlestack.parallel import SchedulerOptions, active_client, compute, scheduler

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["threads", "processes", "synchronous"])
def test_local_schedulers_set_dask_config(name):
    with scheduler(SchedulerOptions(scheduler=name, workers=2)) as client:
        assert client is None
        assert dask.config.get("scheduler") == name
        (total,) = compute(da.ones((10, 10), chunks=5).sum())
    assert total == 100


def test_unknown_scheduler_is_refused_with_the_choices():
    with pytest.raises(ds.DrizzlestackError, match="'gpu'.*threads, processes"):
        with scheduler(scheduler="gpu"):
            pass


def test_address_that_does_not_answer_fails_after_a_bounded_wait():
    t0 = time.monotonic()
    with pytest.raises(ds.DrizzlestackError, match="tcp://127.0.0.1:9.*no answer"):
        with scheduler(scheduler="tcp://127.0.0.1:9", timeout=2):
            pass
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_distributed_local_cluster_gives_the_same_results_as_threads(tmp_path, small_sim):
    store = tmp_path / "s.zarr"
    ds.ingest(small_sim.files, store)
    stack = ds.open_stack(store)
    work = (stack.frames.mean("frame").data, stack.frames.std("frame").data)
    with scheduler(scheduler="threads"):
        expected = compute(*work)
    with scheduler(scheduler="distributed", workers=2, memory_limit="1GB", dashboard=":0") as client:
        assert client is not None and active_client() is client
        assert client.scheduler.address.startswith("tcp://127.0.0.1")  # listens on localhost
        got = compute(*work)
    assert active_client() is None
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_slurm_job_script_from_the_config_file():
    pytest.importorskip("dask_jobqueue")
    from drizzlestack.parallel import _jobqueue_cluster

    opts = SchedulerOptions(scheduler="slurm", jobqueue_config=str(CONFIGS / "hpc-slurm.yaml"), memory_limit="16GB")
    cluster = _jobqueue_cluster("slurm", opts)
    try:
        script = cluster.job_script()
        address = cluster.scheduler_address
    finally:
        cluster.close()
    assert address.startswith("tcp://127.0.0.1:")  # no interface configured: localhost only
    assert "#SBATCH -p normal" in script
    assert "#SBATCH -A myproject" in script
    assert "#SBATCH -t 02:00:00" in script
    assert "source ~/venvs/drizzlestack/bin/activate" in script
    assert "--nworkers 4" in script and "--nthreads 2" in script
    assert "--memory-limit 3.73GiB" in script  # --memory-limit 16GB over 4 processes (the file says 32GB)


def test_pbs_job_script_from_the_config_file():
    pytest.importorskip("dask_jobqueue")
    from drizzlestack.parallel import _jobqueue_cluster

    cluster = _jobqueue_cluster("pbs", SchedulerOptions(scheduler="pbs", jobqueue_config=str(CONFIGS / "hpc-pbs.yaml")))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#PBS -q workq" in script
    assert "#PBS -l select=1:ncpus=8:mem=32GB" in script
