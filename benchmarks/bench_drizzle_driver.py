"""The tiled drizzle driver: parallel scaling and peak memory.

    python benchmarks/bench_drizzle_driver.py scaling  [--frames 8 --size 1024]
    python benchmarks/bench_drizzle_driver.py memory   [--size 1024]
    python benchmarks/bench_drizzle_driver.py step-vs-kernel --store STORE [--repeat 3]

``scaling`` times the same multi-frame drizzle on the threaded scheduler with 1 and 2
workers, alternating, in one process (numba warmed up first). ``memory`` runs each
configuration in a fresh subprocess and reports its peak RSS: scale 2 against scale 4
(4x the output area) and a growing number of frames.

``step-vs-kernel`` (issue 12: "drizzle in the pipeline within 1.5x of the kernel's own
throughput") runs the whole ``drizzle`` step on an integrated store (e.g. the one
``bench_pipeline.py compare --workdir DIR`` leaves in ``DIR/stack.zarr``): own-pixel
flags, weights, input windows, tile writes and the FITS file included, threaded
scheduler with ``--workers``; every call of the kernel (``drizzle.array.accumulate``) is
timed with the calling thread's CPU clock meanwhile. The kernel's own time per worker is
that CPU time divided by the workers; the step's overhead is its wall time over that.

For ``scaling`` and ``memory`` the store is synthetic (noise frames with random sub-pixel shifts and small rotations,
registered with the known transforms): the driver's cost does not depend on the content.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rss import peak_rss_mib  # noqa: E402


def make_store(path: Path, n_frames: int, size: int, seed: int = 0) -> None:
    from drizzlestack.geometry import similarity
    from drizzlestack.store import StackStore

    rng = np.random.default_rng(seed)
    st = StackStore.create(path, (size, size), chunk=512)
    transforms = []
    c = ((size - 1) / 2, (size - 1) / 2)
    for i in range(n_frames):
        st.append_frame(rng.normal(100, 10, (size, size)).astype(np.float32), path=f"/synthetic/{i}.fits",
                        exptime=60.0, status="ok", saturation=np.inf)
        transforms.append(np.eye(3) if i == 0 else similarity(1.0, rng.uniform(-0.5, 0.5),
                                                               *rng.uniform(-5, 5, 2), center=c))
    st.write_variable("transform", np.array(transforms), ("frame", "transform_row", "transform_col"))
    st.attrs["reference"] = 0
    st.begin_step("register", {"synthetic": True})
    st.end_step("register")


def run_drizzle(store, scale, workers, tile=1024, scheduler_name="threads", client=None):
    import drizzlestack as ds
    from drizzlestack.parallel import scheduler

    if client is not None:  # an already running distributed cluster of `workers` processes
        t0 = time.perf_counter()
        ds.drizzle(store, scale=scale, pixfrac=0.9, kernel="square", tile=tile, output=None, force=True)
        return time.perf_counter() - t0
    with scheduler(scheduler=scheduler_name, workers=workers, progress=False):
        t0 = time.perf_counter()
        ds.drizzle(store, scale=scale, pixfrac=0.9, kernel="square", tile=tile, output=None, force=True)
        return time.perf_counter() - t0


def distributed_times(store, workers, repeat, tile):
    """Times on a local cluster of `workers` single-threaded processes (started once,
    warmed up, then timed), so that cluster start-up is not counted."""
    from drizzlestack.parallel import scheduler

    with scheduler(scheduler="distributed", workers=workers, progress=False) as client:
        run_drizzle(store, 2.0, workers, tile=tile, client=client)  # warm-up: workers load numba's cache
        return [run_drizzle(store, 2.0, workers, tile=tile, client=client) for _ in range(repeat)]


def scaling(args):
    tmp = Path(tempfile.mkdtemp(prefix="bench-drz-"))
    try:
        store = tmp / "s.zarr"
        make_store(store, args.frames, args.size)
        t0 = time.perf_counter()
        run_drizzle(store, 2.0, 1, tile=256)  # warm-up: numba compile (or cache load)
        print(f"warm-up (first call, includes numba compile or cache load): {time.perf_counter() - t0:.1f} s")
        times = {1: [], 2: []}
        for _ in range(args.repeat):
            for w in (1, 2):
                times[w].append(run_drizzle(store, 2.0, w, tile=args.tile))
        mpix = args.frames * args.size ** 2 / 1e6
        print(f"{args.frames} frames of {args.size}^2, scale 2, square, pixfrac 0.9, tile {args.tile}")

        def report(label, times):
            t1, t2 = min(times[1]), min(times[2])
            print(f"{label}: 1 worker {t1:.2f} s ({mpix / t1:.1f} Mpix/s), 2 workers {t2:.2f} s "
                  f"({mpix / t2:.1f} Mpix/s), speed-up {t1 / t2:.2f}x   runs {times}")

        report("threads", times)
        dist = {w: distributed_times(store, w, args.repeat, args.tile) for w in (1, 2)}
        report("distributed (1-thread worker processes)", dist)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def child(store, scale, workers):
    dt = run_drizzle(store, scale, workers)
    rss = peak_rss_mib()  # this child's own peak (see _rss.py)
    print(json.dumps({"seconds": dt, "peak_rss_mib": rss}))


def memory(args):
    tmp = Path(tempfile.mkdtemp(prefix="bench-drz-mem-"))
    try:
        rows = []
        for n in args.frame_counts:
            store = tmp / f"s{n}.zarr"
            make_store(store, n, args.size)
            for scale in (2.0, 4.0):
                out = subprocess.run([sys.executable, __file__, "child", str(store), str(scale), "2"],
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                rows.append((n, scale, r["seconds"], r["peak_rss_mib"]))
                print(f"frames {n:>3}  scale {scale:g}  output {int(args.size * scale)}^2  "
                      f"{r['seconds']:.1f} s  peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        for n in args.frame_counts:
            s2 = [r[3] for r in rows if r[0] == n and r[1] == 2.0][0]
            s4 = [r[3] for r in rows if r[0] == n and r[1] == 4.0][0]
            print(f"frames {n}: peak RSS scale 4 / scale 2 = {s4 / s2:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def step_vs_kernel(args):
    import threading

    import drizzlestack as ds
    from drizzlestack.drizzle import array as _array
    from drizzlestack.drizzle import driver as _driver
    from drizzlestack.parallel import scheduler
    from drizzlestack.store import StackStore

    st = StackStore.open(args.store)
    n_ok = sum(str(s) == "ok" for s in st.group["status"][:st.n_frames])
    mpix = n_ok * st.frame_shape[0] * st.frame_shape[1] / 1e6
    inner = _array.accumulate
    lock, spent = threading.Lock(), [0.0]

    def timed(*a, **k):
        t0 = time.thread_time()
        try:
            return inner(*a, **k)
        finally:
            dt = time.thread_time() - t0
            with lock:
                spent[0] += dt

    out = Path(tempfile.mkdtemp(prefix="bench-drz-step-")) / "drizzle.fits"
    rows = []
    try:
        _driver._array.accumulate = timed
        with scheduler(scheduler="threads", workers=args.workers, progress=False):
            for k in range(args.repeat + 1):  # the first run loads numba's cache: not counted
                spent[0] = 0.0
                t0 = time.perf_counter()
                ds.drizzle(args.store, scale=2.0, pixfrac=0.9, kernel="square", output=out, force=True,
                           overwrite=True)
                wall = time.perf_counter() - t0
                if k:
                    rows.append((wall, spent[0]))
    finally:
        _driver._array.accumulate = inner
        shutil.rmtree(out.parent, ignore_errors=True)
    print(f"{args.store}: {n_ok} frames of {st.frame_shape[1]}x{st.frame_shape[0]} ({mpix:.0f} input Mpx), scale 2, "
          f"pixfrac 0.9, square, FITS written, {args.workers} workers")
    print("| run | step wall s | kernel CPU s | kernel s per worker | step / kernel | step Mpx/s | kernel Mpx/s per thread |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, (wall, cpu) in enumerate(rows, 1):
        per = cpu / args.workers
        print(f"| {k} | {wall:.2f} | {cpu:.2f} | {per:.2f} | **{wall / per:.2f}** | {mpix / wall:.1f} | {mpix / cpu:.1f} |")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["scaling", "memory", "step-vs-kernel"])
    ap.add_argument("--store", help="step-vs-kernel: an integrated store")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--frame-counts", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    {"scaling": scaling, "memory": memory, "step-vs-kernel": step_vs_kernel}[args.mode](args)


if __name__ == "__main__":
    main()
