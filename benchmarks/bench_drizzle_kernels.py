"""Throughput of the drizzle kernels against STScI ``drizzle`` on the same data, in the
same process, on one thread.

A 2048x2048 float32 frame, drizzled at scale 2 (pixel_scale_ratio 0.5) with pixfrac 0.9
through a 0.3 degree rotation onto a 4136x4136 output. For each kernel the runs are
interleaved (STScI, ours, ours again) and repeated; the table reports the fastest run of
each, in input megapixels per second, and the ratio ours / STScI:

* ``drizzle_array``: the whole call, against ``Drizzle(...)`` + ``add_image(...)``
  (both allocate their outputs: float64 for us, float32 for STScI);
* ``accumulate``: the kernel alone, into pre-faulted float64 accumulators, against
  ``add_image`` alone.

Times are CPU time of this process (``time.process_time``: user + system, which
includes page faults) rather than wall time, so that other jobs on a shared machine
(this one has 2 cores shared by several engineers) do not count; they still slow the
figures down through shared caches and memory bandwidth, hence the interleaving and the
fastest-of-N.

First-call compile time is excluded from the figures and reported separately (for a
cold cache, run with ``NUMBA_CACHE_DIR`` pointing at an empty directory); with
``cache=True`` a second process loads the compiled kernels from the cache.

Usage::

    python benchmarks/bench_drizzle_kernels.py [--size 2048] [--reps 7] [--kernels square,turbo,point]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np


def rotated_pixmap(n: int, scale: float, angle_deg: float) -> np.ndarray:
    y, x = np.indices((n, n), dtype=np.float64)
    t = np.deg2rad(angle_deg)
    xc, yc = x - n / 2, y - n / 2
    xo = scale * (np.cos(t) * xc - np.sin(t) * yc) + scale * n / 2 + 10.3
    yo = scale * (np.sin(t) * xc + np.cos(t) * yc) + scale * n / 2 + 10.7
    return np.dstack([xo, yo])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="input frame side (pixels)")
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--angle", type=float, default=0.3, help="rotation (degrees)")
    parser.add_argument("--pixfrac", type=float, default=0.9)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--kernels", default="square,turbo,point")
    args = parser.parse_args()

    from drizzle.resample import Drizzle

    t0 = time.perf_counter()
    from drizzlestack.drizzle import accumulate, drizzle_array
    t_import = time.perf_counter() - t0

    n = args.size
    psr = 1.0 / args.scale
    pixmap = rotated_pixmap(n, args.scale, args.angle)
    data = np.random.default_rng(0).random((n, n)).astype(np.float32)
    out_shape = (int(args.scale * n) + 40, int(args.scale * n) + 40)
    mpix = n * n / 1e6

    # In a VM the first touch of never-used memory is very slow: fault in 1 GiB once
    # so that every timed run sees the same steady state.
    warm = np.ones(1 << 27)
    del warm

    print(f"input {n}x{n} float32, output {out_shape[0]}x{out_shape[1]}, scale {args.scale}, "
          f"pixfrac {args.pixfrac}, rotation {args.angle} deg, {args.reps} runs (fastest shown)")
    print(f"numba cache dir: {os.environ.get('NUMBA_CACHE_DIR', '(default, next to the sources)')}")
    print(f"import drizzlestack.drizzle: {t_import:.2f} s")
    header = (f"{'kernel':8s} {'first call':>10s} | {'STScI':>8s} {'drizzle_array':>14s} {'ratio':>6s} | "
              f"{'add_image':>9s} {'accumulate':>10s} {'ratio':>6s}")
    print(header)
    print("-" * len(header))
    for kernel in args.kernels.split(","):
        t0 = time.perf_counter()
        drizzle_array(data[:16, :16], pixmap[:16, :16], (48, 48), kernel, args.pixfrac,
                      pixel_scale_ratio=psr)
        t_first = time.perf_counter() - t0
        acc_wv = np.zeros(out_shape)
        acc_w = np.zeros(out_shape)
        best = {"stsci": np.inf, "stsci_add": np.inf, "ours": np.inf, "acc": np.inf}
        clock = time.process_time
        for _ in range(args.reps):
            t0 = clock()
            d = Drizzle(kernel=kernel, out_shape=out_shape, disable_ctx=True)
            t1 = clock()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                d.add_image(data, exptime=1.0, pixmap=pixmap, pixfrac=args.pixfrac, in_units="cps",
                            iscale=1.0, pixel_scale_ratio=psr)
            t2 = clock()
            best["stsci"] = min(best["stsci"], t2 - t0)
            best["stsci_add"] = min(best["stsci_add"], t2 - t1)
            del d
            t0 = clock()
            img, wht = drizzle_array(data, pixmap, out_shape, kernel, args.pixfrac, pixel_scale_ratio=psr)
            best["ours"] = min(best["ours"], clock() - t0)
            del img, wht
            acc_wv.fill(0.0)
            acc_w.fill(0.0)
            t0 = clock()
            accumulate(data, pixmap, None, acc_wv, acc_w, kernel, args.pixfrac, psr)
            best["acc"] = min(best["acc"], clock() - t0)
        print(f"{kernel:8s} {t_first:9.2f}s | {mpix / best['stsci']:8.1f} {mpix / best['ours']:14.1f} "
              f"{best['stsci'] / best['ours']:5.2f}x | {mpix / best['stsci_add']:9.1f} "
              f"{mpix / best['acc']:10.1f} {best['stsci_add'] / best['acc']:5.2f}x")
    print("(throughput in input Mpix/s of CPU time; ratio = STScI time / our time)")


if __name__ == "__main__":
    main()
