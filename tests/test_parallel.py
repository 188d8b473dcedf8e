"""Scheduler choice: local schedulers, a local distributed cluster giving the same results,
an address that does not answer, and HPC job scripts from the config files."""

from __future__ import annotations

from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

import drizzlestack as ds
from drizzlestack.parallel import SchedulerOptions, active_client, compute, scheduler
from conftest import register_with_truth, run_with_hang_guard

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["threads", "processes", "synchronous"])
def test_local_schedulers_set_dask_config(name):
    with scheduler(SchedulerOptions(scheduler=name, workers=2)) as client:
        assert client is None
        from dask.base import get_scheduler, named_schedulers

        assert get_scheduler() is named_schedulers[name]
        (total,) = compute(da.ones((10, 10), chunks=5).sum())
    assert total == 100


def test_the_threaded_scheduler_does_not_import_distributed():
    # dask resolves a scheduler *name* by importing distributed to look for a client:
    # 0.4 s at the start of every local run. The context sets the function itself.
    import subprocess
    import sys

    code = ("import sys, dask.array as da\n"
            "from drizzlestack.parallel import scheduler\n"
            "with scheduler(scheduler='threads', workers=2, progress=False):\n"
            "    assert da.ones((8, 8), chunks=4).sum().compute() == 64\n"
            "print('distributed' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _blas_threads():
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def _worker_thread_env(_):
    import os

    return os.environ.get("OPENBLAS_NUM_THREADS")


def test_blas_does_not_oversubscribe_inside_dask_workers(monkeypatch):
    """Two threaded workers on two or more cores: BLAS runs one thread per worker inside
    the context, and gets its threads back after it; process workers start with the
    thread-count variables at 1 (the user's own setting is kept)."""
    import os

    np.linalg.solve(np.eye(64) + 1.0, np.ones(64))  # load numpy's BLAS
    before = _blas_threads()
    if not before or os.cpu_count() < 2:
        pytest.skip("needs a BLAS library that threadpoolctl can see and two cores")
    with scheduler(SchedulerOptions(scheduler="threads", workers=os.cpu_count())):
        assert _blas_threads() == [1] * len(before)
    assert _blas_threads() == before
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with scheduler(SchedulerOptions(scheduler="processes", workers=2)):
        (values,) = compute(dask.delayed(_worker_thread_env)(0))
    assert values == "1"
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    with scheduler(SchedulerOptions(scheduler="processes", workers=2)):
        (values,) = compute(dask.delayed(_worker_thread_env)(0))
    assert values == "2"


def test_unknown_scheduler_is_refused_with_the_choices():
    with pytest.raises(ds.DrizzlestackError, match="'gpu'.*threads, processes"):
        with scheduler(scheduler="gpu"):
            pass


def test_address_that_does_not_answer_fails_after_a_bounded_wait():
    def connect():
        with scheduler(scheduler="tcp://127.0.0.1:9", timeout=2):
            pass

    with pytest.raises(ds.DrizzlestackError, match="tcp://127.0.0.1:9.*no answer"):
        run_with_hang_guard(connect)


@pytest.mark.slow
def test_distributed_local_cluster_gives_the_same_store_as_threads(tmp_path, small_sim):
    """Ingest and drizzle once on threads and once on a local distributed cluster
    (2 worker processes with a memory limit): every variable of the stores is identical."""
    stores = {}
    for name, opts in [("threads", SchedulerOptions(scheduler="threads")),
                       ("distributed", SchedulerOptions(scheduler="distributed", workers=2, memory_limit="1GB",
                                                        dashboard=":0"))]:
        store = tmp_path / f"{name}.zarr"
        with scheduler(opts) as client:
            if name == "distributed":
                assert client is not None and active_client() is client
                assert client.scheduler.address.startswith("tcp://127.0.0.1")  # listens on localhost
            ds.ingest(small_sim.files, store)
            register_with_truth(store, small_sim)
            ds.drizzle(store, scale=2.0, pixfrac=0.8, tile=64, output=tmp_path / f"{name}.fits")
        stores[name] = ds.open_stack(store)
    assert active_client() is None
    a, b = stores["threads"], stores["distributed"]
    assert set(a.data_vars) == set(b.data_vars)
    assert "drizzle" in a.data_vars
    for var in a.data_vars:
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)


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
