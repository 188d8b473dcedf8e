"""The tiled drizzle driver: parallel scaling and peak memory.

    python benchmarks/bench_drizzle_driver.py scaling  [--frames 8 --size 1024]
    python benchmarks/bench_drizzle_driver.py memory   [--size 1024]

``scaling`` times the same multi-frame drizzle on the threaded scheduler with 1 and 2
workers, alternating, in one process (numba warmed up first). ``memory`` runs each
configuration in a fresh subprocess and reports its peak RSS: scale 2 against scale 4
(4x the output area) and a growing number of frames.

The store is synthetic (noise frames with random sub-pixel shifts and small rotations,
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


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["scaling", "memory"])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--frame-counts", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    scaling(args) if args.mode == "scaling" else memory(args)


if __name__ == "__main__":
    main()
