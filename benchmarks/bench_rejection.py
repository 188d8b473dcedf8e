"""Pixel rejection throughput and memory: drizzlestack against astropy's ``sigma_clip``.

Same data, same process, interleaved runs (best of ``--repeat``): astropy's
``sigma_clip(stack, axis=0, cenfunc="median", stdfunc="std", maxiters=None)`` on its C fast
path, then drizzlestack's ``reject_stack`` with ``method="sigma"`` (checked to give the same
mask) and ``method="winsorized"``, single-threaded; then the winsorized rejection through
Dask on all cores. Numba is compiled first, in a child process with an empty cache, and
that compile time is reported on its own. Peak memory (``ru_maxrss``) is measured in one
child process per method; the Dask child never holds the stack (tiles are generated in the
tasks), which is how the pipeline runs.

Usage::

    python benchmarks/bench_rejection.py                 # 20 frames of 2000 x 2000
    python benchmarks/bench_rejection.py --frames 20 --size 1000 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rss import peak_rss_mib  # noqa: E402

TILE = 500


def make_frame(seed: int, frame: int, ny: int, nx: int, y0: int = 0, x0: int = 0) -> np.ndarray:
    """One frame (or the tile at ``y0, x0`` of it) of a synthetic dithered field: sky
    1000 ± 10, stars, and per frame cosmic rays, dead pixels and NaNs (0.05 % each)."""
    rng = np.random.default_rng([seed, frame, y0, x0])
    yy, xx = np.mgrid[y0 : y0 + ny, x0 : x0 + nx]
    image = 1000.0 + rng.normal(0.0, 10.0, (ny, nx))
    # Stars on a fixed grid (the same in every frame), a little blurred per frame.
    sigma = 1.5 + 0.2 * np.sin(frame)
    cy = (yy // 50) * 50 + 25
    cx = (xx // 50) * 50 + 25
    image += 3000.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    defects = rng.random((ny, nx))
    image[defects < 0.0005] += rng.uniform(200.0, 5000.0, np.count_nonzero(defects < 0.0005))
    image[(defects >= 0.0005) & (defects < 0.001)] = 0.0
    image[(defects >= 0.001) & (defects < 0.0015)] = np.nan
    return image.astype(np.float32)


def make_stack(seed: int, frames: int, size: int) -> np.ndarray:
    stack = np.empty((frames, size, size), np.float32)
    for f in range(frames):
        stack[f] = make_frame(seed, f, size, size)
    return stack


def lazy_stack(seed: int, frames: int, size: int):
    """The same kind of field as a Dask array whose tiles are made inside the tasks."""
    import dask.array as da

    chunks = ((frames,), tuple(min(TILE, size - i) for i in range(0, size, TILE)),
              tuple(min(TILE, size - i) for i in range(0, size, TILE)))  # fmt: skip

    def tile(block_info=None):
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return np.stack([make_frame(seed, f, y1 - y0, x1 - x0, y0, x0) for f in range(frames)])

    return da.map_blocks(tile, chunks=chunks, dtype=np.float32)


def maxrss_mb() -> float:
    return peak_rss_mib()  # this process's own peak (see _rss.py)


def astropy_clip(stack):
    from astropy.stats import sigma_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Input data contains invalid values"
        return sigma_clip(
            stack, axis=0, sigma_lower=3.0, sigma_upper=3.0, maxiters=None, cenfunc="median", stdfunc="std"
        ).mask


# ----------------------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------------------


def child_compile(args) -> dict:
    """First calls in a process with an empty numba cache: compile time."""
    t0 = time.perf_counter()
    from drizzlestack.integration.rejection import reject_stack

    imported = time.perf_counter() - t0
    small = make_stack(args.seed, args.frames, 64)
    out = {"import_s": imported}
    for method in ("sigma", "winsorized"):
        t0 = time.perf_counter()
        reject_stack(small, method=method)
        out[f"compile_{method}_s"] = time.perf_counter() - t0
    return out


def child_memory(args) -> dict:
    """Peak RSS of one method: before the stack, with the stack, after rejection."""
    from drizzlestack.integration.rejection import reject_stack

    reject_stack(make_stack(args.seed, args.frames, 8), method="winsorized")  # compile / load cache
    reject_stack(make_stack(args.seed, args.frames, 8), method="sigma")
    import astropy.stats  # noqa: F401  (same imports in every child)

    before = maxrss_mb()
    if args.child == "dask":
        import dask

        mask = reject_stack(lazy_stack(args.seed, args.frames, args.size), method="winsorized")
        with dask.config.set(scheduler="threads", num_workers=os.cpu_count()):
            rejected = int(mask.sum().compute())
        return {"before_mb": before, "with_stack_mb": before, "peak_mb": maxrss_mb(), "rejected": rejected}
    stack = make_stack(args.seed, args.frames, args.size)
    with_stack = maxrss_mb()
    if args.child == "astropy":
        mask = astropy_clip(stack)
    else:
        mask = reject_stack(stack, method=args.child)
    return {"before_mb": before, "with_stack_mb": with_stack, "peak_mb": maxrss_mb(), "rejected": int(mask.sum())}


def run_child(args, mode: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--frames", str(args.frames), "--size", str(args.size),
           "--seed", str(args.seed)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------
# Throughput (in this process)
# ----------------------------------------------------------------------------------------


def throughput(args) -> dict:
    import dask.array as da
    from astropy.stats import sigma_clipping

    from drizzlestack.integration.rejection import reject_stack

    stack = make_stack(args.seed, args.frames, args.size)
    reject_stack(stack[:, :8, :70], method="sigma")  # warm: load the compiled kernels
    reject_stack(stack[:, :8, :70], method="winsorized")

    # Make sure astropy takes its compiled fast path (astropy/stats/sigma_clipping.py:
    # cenfunc/stdfunc given by name, an axis, no grow), by counting its calls.
    fast = sigma_clipping._sigma_clip_fast
    calls = []
    sigma_clipping._sigma_clip_fast = lambda *a, **k: calls.append(1) or fast(*a, **k)

    lazy = da.from_array(stack, chunks=(-1, TILE, TILE))
    runs = {
        "astropy sigma_clip": lambda: astropy_clip(stack),
        "drizzlestack sigma": lambda: reject_stack(stack, method="sigma"),
        "drizzlestack winsorized": lambda: reject_stack(stack, method="winsorized"),
        f"drizzlestack winsorized, dask {os.cpu_count()} threads": lambda: reject_stack(
            lazy, method="winsorized"
        ).compute(scheduler="threads", num_workers=os.cpu_count()),
    }
    best = {name: (np.inf, np.inf) for name in runs}
    results = {}
    for _ in range(args.repeat):
        for name, run in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            results[name] = run()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    sigma_clipping._sigma_clip_fast = fast
    assert calls, "astropy did not take its fast path"
    equal = bool(np.array_equal(results["astropy sigma_clip"], results["drizzlestack sigma"]))
    mpix = args.size * args.size / 1e6
    return {
        "mpix": mpix,
        "times": {k: {"wall_s": v[0], "cpu_s": v[1], "mpix_per_s": mpix / v[0]} for k, v in best.items()},
        "sigma_mask_equals_astropy": equal,
        "rejected_fraction": {k: float(v.mean()) for k, v in results.items()},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--size", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--child", choices=["compile", "astropy", "sigma", "winsorized", "dask"])
    args = p.parse_args(argv)
    if args.child == "compile":
        print(json.dumps(child_compile(args)))
        return
    if args.child:
        print(json.dumps(child_memory(args)))
        return

    import astropy
    import numba

    print(f"numpy {np.__version__}, numba {numba.__version__}, astropy {astropy.__version__}, "
          f"{os.cpu_count()} cores; stack {args.frames} x {args.size} x {args.size} float32 "
          f"({args.frames * args.size * args.size * 4 / 2**20:.0f} MiB)")  # fmt: skip
    with tempfile.TemporaryDirectory() as cache:
        comp = run_child(args, "compile", env={**os.environ, "NUMBA_CACHE_DIR": cache})
    print(f"numba compile (empty cache): {comp['compile_sigma_s']:.1f} s at the first call (the kernel "
          f"shared by sigma and winsorized), then {comp['compile_winsorized_s']:.1f} s; "
          f"import {comp['import_s']:.1f} s")  # fmt: skip

    # Memory first, while this process is small: a child's ru_maxrss starts from its
    # parent's high-water mark (Linux carries it over fork and exec).
    stack_mb = args.frames * args.size * args.size * 4 / 2**20
    print(f"\npeak memory (ru_maxrss, one process each; stack = {stack_mb:.0f} MiB):")
    for mode in ("astropy", "sigma", "winsorized", "dask"):
        m = run_child(args, mode)
        extra = m["peak_mb"] - m["before_mb"]
        step = m["peak_mb"] - m["with_stack_mb"]
        print(f"  {mode:11s} peak {m['peak_mb']:6.0f} MiB = {m['before_mb']:4.0f} MiB before the stack "
              f"+ {extra:5.0f} MiB ({extra / stack_mb:.2f} x the stack; the rejection itself "
              f"{step:4.0f} MiB above the stack's making)")  # fmt: skip

    tp = throughput(args)
    ref = tp["times"]["astropy sigma_clip"]
    print(f"\nthroughput, best of {args.repeat} (wall; CPU time in brackets):")
    for name, t in tp["times"].items():
        print(f"  {name:44s} {t['mpix_per_s']:6.2f} Mpix/s  {t['wall_s']:6.2f} s ({t['cpu_s']:6.2f} s)  "
              f"x{ref['wall_s'] / t['wall_s']:.1f} vs astropy")  # fmt: skip
    print(f"  sigma mask identical to astropy's: {tp['sigma_mask_equals_astropy']}")
    print("  rejected fraction: " + ", ".join(f"{k} {v:.4%}" for k, v in tp["rejected_fraction"].items()))

if __name__ == "__main__":
    main()
