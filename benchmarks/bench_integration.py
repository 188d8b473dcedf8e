"""The integration step out of core: peak memory against the number of frames.

    python benchmarks/bench_integration.py [--frames 8 16 32 64 128] [--size 2048]
                                           [--task-memory 64MiB] [--workers 2]

One synthetic store of ``max(frames)`` frames is written first (stars, sky, noise and
cosmic rays, random sub-pixel shifts and small rotations, registered with the known
transforms, the reference's star list stored as registration would). Then, for every
count ``N``, a *fresh subprocess* integrates the first ``N`` frames with the defaults
(winsorized rejection, additive+scaling with star photometry, noise weights) and
reports its wall time and its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
next to the RSS it had after importing everything (the interpreter baseline).

What it shows: peak RSS stays flat as frames are added -- the tile shrinks so that one
task's ``tile**2 * frames`` samples fit ``--task-memory`` -- while the stack grows to
several times the memory the run uses.
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
    """A registered store of ``n_frames`` synthetic ``size x size`` float32 frames."""
    from drizzlestack.geometry import apply_homography, similarity
    from drizzlestack.simulate import render_stars
    from drizzlestack.store import StackStore

    rng = np.random.default_rng(seed)
    n_stars = int(800 * (size / 1024) ** 2)
    sx, sy = rng.uniform(-8, size + 8, n_stars), rng.uniform(-8, size + 8, n_stars)
    flux = 10 ** rng.uniform(3.0, 5.0, n_stars)
    st = StackStore.create(path, (size, size), chunk=512)
    c = ((size - 1) / 2, (size - 1) / 2)
    transforms = []
    for i in range(n_frames):
        t = np.eye(3) if i == 0 else similarity(1.0, rng.uniform(-0.3, 0.3), *rng.uniform(-5, 5, 2), center=c)
        transforms.append(t)
        fx, fy = apply_homography(np.linalg.inv(t), sx, sy)
        image = np.full((size, size), 200.0)
        render_stars(image, fx, fy, flux, 1.6)
        image += rng.normal(0.0, 1.0, image.shape) * np.sqrt(image + 25.0)
        ix, iy = rng.integers(0, size, 200), rng.integers(0, size, 200)
        image[iy, ix] += rng.uniform(2e3, 2e4, 200)  # cosmic rays
        st.append_frame(np.clip(image, 0, 65535).astype(np.float32), path=f"/synthetic/{i}.fits", exptime=60.0,
                        status="ok", saturation=65535.0)
    st.write_variable("transform", np.array(transforms), ("frame", "row", "col"))
    ref = (sx > 0) & (sx < size - 1) & (sy > 0) & (sy < size - 1)
    stars = np.full((n_frames, int(ref.sum()), 7), np.nan)
    stars[0, :, 0], stars[0, :, 1], stars[0, :, 2], stars[0, :, 3], stars[0, :, 6] = \
        sx[ref], sy[ref], flux[ref], 1.6, 0
    st.write_variable("stars", stars, ("frame", "star", "field"),
                      attrs={"fields": ["x", "y", "flux", "fwhm", "peak", "snr", "flags"]})
    st.attrs["reference"] = 0
    st.begin_step("register", {"synthetic": True})
    st.end_step("register")


def _child(store: str, n: int, task_memory: str, workers: int) -> None:
    """Body of one measurement subprocess: prints a JSON line."""
    import drizzlestack as ds
    from drizzlestack.integration import integrate as _  # noqa: F401  (imports and numba caches loaded)
    from drizzlestack.parallel import scheduler

    base = peak_rss_mib()
    with scheduler(scheduler="threads", workers=workers, progress=False):
        t0 = time.perf_counter()
        out = ds.integrate(store, frames=list(range(n)), task_memory=task_memory, force=True)
        seconds = time.perf_counter() - t0
    peak = peak_rss_mib()
    summary = out.attrs["steps"]["integrate"]["summary"]
    print(json.dumps({"frames": n, "seconds": seconds, "baseline_mib": base, "peak_mib": peak,
                      "tile": summary["tile"], "stats_s": summary["seconds"]["statistics"],
                      "tiles_s": summary["seconds"]["tiles"]}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--task-memory", default="64MiB")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--keep", default=None, help="directory for the store (kept; reused if present)")
    p.add_argument("--child", nargs=4, metavar=("STORE", "N", "TASK_MEMORY", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        store, n, tm, w = args.child
        _child(store, int(n), tm, int(w))
        return 0

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-integration-"))
    store = tmp / "stack.zarr"
    n_max = max(args.frames)
    try:
        if not store.exists():
            t0 = time.perf_counter()
            make_store(store, n_max, args.size)
            print(f"# wrote {n_max} frames of {args.size}x{args.size} in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
        # Warm the numba caches once so that no measurement pays for compilation.
        subprocess.run([sys.executable, __file__, "--child", str(store), str(min(args.frames)), args.task_memory,
                        str(args.workers)], check=True, capture_output=True)
        frame_mib = args.size * args.size * 4 / 2**20
        print("| frames | stack MiB | tile | seconds (stats + tiles) | baseline RSS MiB | peak RSS MiB "
              "| stack / peak |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n in args.frames:
            res = subprocess.run([sys.executable, __file__, "--child", str(store), str(n), args.task_memory,
                                  str(args.workers)], check=True, capture_output=True, text=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            stack = n * frame_mib
            print(f"| {n} | {stack:.0f} | {r['tile']} | {r['seconds']:.1f} ({r['stats_s']:.1f} + {r['tiles_s']:.1f}) "
                  f"| {r['baseline_mib']:.0f} | {r['peak_mib']:.0f} | {stack / r['peak_mib']:.1f} |", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
