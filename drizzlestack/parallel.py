"""Where work runs: one place that turns the scheduler options into a Dask context.

``--scheduler`` takes ``threads`` (default, embedded), ``processes``, ``synchronous``,
``distributed`` (a local cluster; its dashboard link is printed), a scheduler address
``tcp://HOST:PORT``, or an HPC queue name (``slurm``, ``pbs``, ``sge``, ``lsf``,
``htcondor``, ``moab``, ``oar``) configured from a dask-jobqueue YAML file.

Every step computes through :func:`compute`, which shows a progress bar that matches
the scheduler (dask's local bar, or distributed's ``progress``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass

import dask
from dask.utils import format_bytes, parse_bytes

from ._warnings import DrizzlestackError, DrizzlestackWarning

LOCAL = ("threads", "processes", "synchronous")
JOBQUEUE = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
    "htcondor": "HTCondorCluster",
    "moab": "MoabCluster",
    "oar": "OARCluster",
}


@dataclass
class SchedulerOptions:
    """Scheduler choice (the CLI's global options)."""

    scheduler: str = "threads"
    workers: int | None = None  # default: the number of cores (threads/processes/distributed), 1 job (HPC)
    memory_limit: str | None = None  # per worker, e.g. "4GB" (distributed); HPC: per job, shared by its processes
    dashboard: str | bool = False  # True or an address like ":8787" to start the dashboard
    jobqueue_config: str | None = None  # YAML file with the dask-jobqueue cluster arguments
    timeout: float = 10.0  # seconds to wait for a scheduler address to answer
    progress: bool = True


_active = {"client": None, "progress": True, "workers": None}

#: memory of a worker process before its first task: Python with numpy, numba,
#: astropy, zarr, distributed and the package loaded (255 MB measured, rounded up)
WORKER_BASELINE = 300 * 2**20


def _dashboard_address(dashboard) -> str | None:
    if dashboard is True:
        return "127.0.0.1:8787"
    if dashboard:
        # Listen on localhost unless the user names a host.
        return dashboard if not dashboard.startswith(":") else "127.0.0.1" + dashboard
    return None


def _jobqueue_cluster(name: str, opts: SchedulerOptions):
    try:
        import dask_jobqueue
    except ImportError:
        raise DrizzlestackError(f"--scheduler {name} needs dask-jobqueue: pip install 'drizzlestack[hpc]'") from None
    kwargs = {}
    if opts.jobqueue_config:
        import yaml

        with open(opts.jobqueue_config) as fh:
            doc = yaml.safe_load(fh) or {}
        # The file may hold dask's own layout (jobqueue: {slurm: {...}}) or the bare arguments.
        kwargs = doc.get("jobqueue", {}).get(name, doc.get(name, doc))
        if not isinstance(kwargs, dict):
            raise DrizzlestackError(f"{opts.jobqueue_config}: expected a mapping of {JOBQUEUE[name]} arguments")
    kwargs = dict(kwargs)
    if opts.memory_limit:
        kwargs["memory"] = opts.memory_limit  # the command line wins over the file
    if not kwargs.get("interface") and "scheduler_options" not in kwargs:
        # Listen on localhost unless told otherwise; a real cluster sets `interface`
        # (e.g. ib0) or `scheduler_options: {host: ...}` so the jobs can reach it.
        kwargs["scheduler_options"] = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    cls = getattr(dask_jobqueue, JOBQUEUE[name])
    return cls(**kwargs)


#: environment variables that size the BLAS / OpenMP thread pools of a new process
_THREAD_POOL_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _one_blas_thread_per_worker(name: str, workers: int | None = None):
    """One BLAS thread per Dask worker: Dask already runs a task per core, and BLAS
    spawning its own core-count threads inside each task oversubscribes the machine.
    Threads: limited in this process with threadpoolctl for the duration (to the cores
    per worker when fewer workers than cores are asked for). Processes:
    the worker processes start with the thread-count variables at 1 (the user's own
    settings win). Distributed clusters do this themselves (their nannies'
    ``pre-spawn-environ``)."""
    if name == "threads":
        from threadpoolctl import threadpool_limits

        cores = os.cpu_count() or 1
        with threadpool_limits(limits=max(1, cores // (workers or cores)), user_api="blas"):
            yield
        return
    if name != "processes":
        yield
        return
    added = [k for k in _THREAD_POOL_ENV if k not in os.environ]
    os.environ.update({k: "1" for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _local_get(name: str):
    """Dask's ``get`` function of a local scheduler (what ``scheduler=name`` selects)."""
    if name == "threads":
        from dask.threaded import get
    elif name == "processes":
        from dask.multiprocessing import get
    else:
        from dask.local import get_sync as get
    return get


@contextlib.contextmanager
def scheduler(opts: SchedulerOptions | None = None, **kwargs):
    """Context in which Dask work runs on the chosen scheduler.

    Parameters
    ----------
    opts : SchedulerOptions, optional
        Or the same fields as keywords.

    Yields
    ------
    distributed.Client or None
        The client for distributed, address and HPC schedulers; ``None`` for local ones.
    """
    opts = opts or SchedulerOptions(**kwargs)
    name = opts.scheduler
    previous = dict(_active)
    _active["progress"] = opts.progress
    try:
        if name in LOCAL:
            # The scheduler function itself, not its name: dask resolves a name by
            # importing distributed to look for a client (0.4 s of every run's start).
            cfg = {"scheduler": _local_get(name)}
            if opts.workers and name != "synchronous":
                cfg["num_workers"] = int(opts.workers)
            with dask.config.set(cfg), _one_blas_thread_per_worker(name, opts.workers):
                yield None
            return
        from distributed import Client, LocalCluster

        if name == "distributed":
            # distributed's nannies set MALLOC_TRIM_THRESHOLD_ in their workers, which
            # turns off glibc's adaptive mmap threshold: every large array a tile task
            # allocates is then mapped afresh and page-faulted in, and drizzle tiles ran
            # 3x slower than on the threaded scheduler (benchmarks/README.md). Unset
            # (None) for the workers this cluster spawns.
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                cluster = LocalCluster(
                    n_workers=opts.workers or os.cpu_count() or 1,
                    threads_per_worker=1,
                    processes=True,
                    memory_limit=opts.memory_limit or "auto",
                    host="127.0.0.1",
                    dashboard_address=_dashboard_address(opts.dashboard or True),
                )
            closer = cluster
            n = opts.workers or os.cpu_count() or 1
            if opts.memory_limit:
                _active["workers"] = (parse_bytes(opts.memory_limit), 1, f"--memory-limit {opts.memory_limit}", 1)
            else:  # "auto": the machine's memory shared by the workers
                from distributed.system import MEMORY_LIMIT

                _active["workers"] = (MEMORY_LIMIT // n, 1, f"this machine's memory over {n} workers", 1)
        elif name.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
            cluster, closer = name, None
        elif name in JOBQUEUE:
            cluster = _jobqueue_cluster(name, opts)
            _active["workers"] = _jobqueue_workers(cluster, opts)
            cluster.scale(jobs=opts.workers or 1)
            closer = cluster
        else:
            raise DrizzlestackError(
                f"--scheduler {name!r}: expected threads, processes, synchronous, distributed, "
                f"tcp://HOST:PORT or one of {', '.join(JOBQUEUE)}"
            )
        try:
            try:
                client = Client(cluster, timeout=f"{opts.timeout}s")
            except (OSError, TimeoutError) as exc:
                raise DrizzlestackError(
                    f"--scheduler {name}: no answer within {opts.timeout:g} s ({exc})") from None
            if client.dashboard_link:
                print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
            if name in JOBQUEUE:
                _wait_for_jobs(client, name, opts.workers or 1)
            _active["client"] = client
            try:
                yield client
            finally:
                client.close()
        finally:
            if closer is not None:
                closer.close()
    finally:
        _active.update(previous)


#: how long a queue's jobs are waited for before the work starts on those that run
JOB_WAIT_SECONDS = float(os.environ.get("DRIZZLESTACK_JOB_WAIT", "120"))


def _wait_for_jobs(client, name: str, jobs: int) -> None:
    """Wait (bounded) until every requested job has a worker: tasks are spread over the
    workers present when a step starts, so a job that starts a second late would sit idle
    through the first step. A queue that keeps jobs pending does not stall the run: after
    :data:`JOB_WAIT_SECONDS` (``DRIZZLESTACK_JOB_WAIT``) it starts on those that run."""
    try:
        client.wait_for_workers(jobs, timeout=JOB_WAIT_SECONDS)
    except (TimeoutError, OSError):
        running = len(client.scheduler_info().get("workers", {}))
        warnings.warn(f"--scheduler {name}: {running} of {jobs} job(s) running after {JOB_WAIT_SECONDS:g} s; "
                      "starting on those (the others join when the queue starts them)", DrizzlestackWarning,
                      stacklevel=3)
        if running == 0:
            client.wait_for_workers(1)  # nothing can run without a worker: wait for the first


def _jobqueue_workers(cluster, opts: SchedulerOptions):
    """(memory per worker process, threads per worker, where the limit comes from,
    worker processes per job) of a dask-jobqueue cluster's jobs, or ``None`` when the
    jobs set no memory."""
    try:
        job = cluster._dummy_job  # what every job will run (dask-jobqueue >= 0.8)
        memory, processes, threads = job.worker_memory, int(job.worker_processes), int(job.worker_process_threads)
    except Exception:  # another dask-jobqueue: the workers are asked once they run
        return None
    if not memory:
        return None
    where = f"--memory-limit {opts.memory_limit}" if opts.memory_limit else f"memory: {format_bytes(memory)}"
    if processes > 1:
        where += f" per job, shared by its {processes} worker processes"
    return memory // processes, threads, where, processes


def worker_memory() -> tuple[int, int, str, int] | None:
    """What each worker of the active scheduler may use.

    Returns
    -------
    (memory_limit, threads, source, processes) or None
        Bytes per worker process, threads (tasks at once) per worker, the option that
        set the limit (for messages) and the worker processes sharing one
        ``--memory-limit`` (HPC jobs); ``None`` on the local schedulers (no limit).
    """
    if _active["workers"] is not None:
        return _active["workers"]
    client = _active["client"]
    if client is None:
        return None
    workers = client.scheduler_info().get("workers", {}).values()
    limits = [w["memory_limit"] for w in workers if w.get("memory_limit")]
    if not limits:
        return None
    return min(limits), max(int(w.get("nthreads", 1)) for w in workers), "the workers' memory limit", 1


def check_task_memory(step: str, per_task: int, what: str, advice=None) -> None:
    """Stop before a step starts when its tile tasks cannot fit in a worker.

    A distributed worker pauses at ``distributed.worker.memory.pause`` (80 %) of its
    memory limit and waits for memory to be freed; when even one task per thread does
    not fit, it waits for ever (seen with 800 MB and 48 frames of 2048 x 2048).

    Parameters
    ----------
    step : str
        For the message (``integrate``, ``drizzle``).
    per_task : int
        Bytes one task of the step's plan needs at its peak.
    what : str
        The task, in words (``tiles of 512 px over 48 frames``).
    advice : callable, optional
        ``advice(bytes_per_task_that_fit)`` -> text suggesting a smaller plan, or ``""``.

    Raises
    ------
    DrizzlestackError
        The message says which memory limit would do, and which tile or task memory.
    """
    info = worker_memory()
    if info is None:
        return
    limit, threads, source, processes = info
    pause = dask.config.get("distributed.worker.memory.pause", 0.8) or 1.0
    usable = int(limit * float(pause))
    need = WORKER_BASELINE + threads * int(per_task)
    if need <= usable:
        return
    # rounded up to 100 MB; on HPC queues --memory-limit is per job, shared by its processes
    enough = -(-int(processes * need / float(pause)) // 100_000_000) * 100_000_000
    other = advice((usable - WORKER_BASELINE) // threads) if advice is not None and usable > WORKER_BASELINE else ""
    raise DrizzlestackError(
        f"{step}: the workers would pause for ever: {source} gives each worker {format_bytes(limit)} "
        f"({threads} thread(s)), and a worker pauses at {float(pause):.0%} of it ({format_bytes(usable)}); "
        f"{threads} task(s) of {what} need about {format_bytes(int(per_task))} each, plus "
        f"~{format_bytes(WORKER_BASELINE)} for the worker itself: {format_bytes(need)}. "
        f"Use --memory-limit {_decimal(enough)} or more"
        + (f", or {other}" if other else ""))


def _decimal(n: int) -> str:
    """``1.2GB``, ``800MB``: the way users write --memory-limit."""
    return f"{n / 1e9:g}GB" if n >= 1e9 else f"{n / 1e6:g}MB"


def active_client():
    """The distributed client of the current :func:`scheduler` context, or ``None``."""
    return _active["client"]


def compute(*collections, progress: bool | None = None, **kwargs):
    """``dask.compute`` with a progress bar suited to the active scheduler."""
    show = _active["progress"] if progress is None else progress
    client = _active["client"]
    if client is not None:
        futures = client.compute(list(collections), **kwargs)
        if show and sys.stderr.isatty():
            from distributed import progress as dprogress

            dprogress(futures)
        return tuple(client.gather(futures))
    if show and sys.stderr.isatty():
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr):
            return dask.compute(*collections, **kwargs)
    return dask.compute(*collections, **kwargs)
