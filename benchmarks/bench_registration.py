"""Registration benchmark: seconds per frame and accuracy, drizzlestack vs astroalign.

Simulated undersampled frames (default 2048 x 2048, FWHM 1.3 px, shifts +-20 px,
rotations +-1 degree) with known transforms. For every frame, in the same process and
interleaved (so machine load hits both alike):

* **drizzlestack**: ``detect_stars`` on the frame + ``align_stars`` against the
  reference's star table (the reference is detected once per run, as in the pipeline;
  its time is reported separately), homography model;
* **astroalign** ``find_transform(frame, reference_image)``: its usual call, which
  detects the stars of both images every time;
* **astroalign, reference sources precomputed**: ``find_transform(frame, ref_sources)``
  with the reference's control points found once (``astroalign._find_sources``), the
  fairest like-for-like comparison.

Accuracy is the RMS distance between the fitted and the true frame -> reference mapping
at the four corners and the centre. Finally the whole step (``drizzlestack.register``
on a store, threads scheduler) is timed end to end.

Usage::

    python benchmarks/bench_registration.py [--frames 6] [--size 2048] [--fwhm 1.3] [--stars 6000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from drizzlestack.geometry import apply_homography
from drizzlestack.registration.match import align_stars
from drizzlestack.registration.stars import detect_stars
from drizzlestack.simulate import simulate


def corner_rms(matrix, truth, i, shape) -> float:
    ny, nx = shape
    p = np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1], [(nx - 1) / 2, (ny - 1) / 2]], float)
    tx, ty = truth.frame_to_reference(i, p[:, 0], p[:, 1])
    x, y = apply_homography(matrix, p[:, 0], p[:, 1])
    return float(np.sqrt(np.mean((x - tx) ** 2 + (y - ty) ** 2)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--fwhm", type=float, default=1.3)
    ap.add_argument("--stars", type=int, default=6000, help="stars in the simulated sky")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--directory", default=None, help="where to write the simulated frames (default: a temp dir)")
    args = ap.parse_args(argv)

    import astroalign as aa

    tmp = Path(args.directory or tempfile.mkdtemp(prefix="bench_registration_"))
    shape = (args.size, args.size)
    t0 = time.perf_counter()
    truth = simulate(tmp / "frames", n_frames=args.frames, shape=shape, fwhm=args.fwhm, n_stars=args.stars,
                     max_shift=20.0, max_rotation=1.0, seed=args.seed)
    print(f"simulated {args.frames} frames of {args.size}x{args.size} px, FWHM {args.fwhm} px "
          f"({time.perf_counter() - t0:.1f} s) in {tmp}")
    frames = [fits.getdata(f).astype(np.float32) for f in truth.files]

    # warm-up (imports, numba cache) outside the timings
    detect_stars(frames[0][:512, :512])
    try:
        aa.find_transform(frames[1][:512, :512], frames[0][:512, :512])
    except Exception:  # only warming up
        pass

    t = time.perf_counter()
    ref = detect_stars(frames[0], saturation=65535)
    t_ref_ours = time.perf_counter() - t
    align_stars(ref.table[:300], ref.table[:300], frame_shape=shape)  # warm-up
    t = time.perf_counter()
    ref_sources = aa._find_sources(frames[0])[:50]  # find_transform's default max_control_points
    t_ref_aa = time.perf_counter() - t

    rows = []
    for i in range(1, args.frames):
        t = time.perf_counter()
        stars = detect_stars(frames[i], saturation=65535)
        t_det = time.perf_counter() - t
        t = time.perf_counter()
        al = align_stars(stars.table, ref.table, model="homography", frame_shape=shape)
        t_match = time.perf_counter() - t
        ours = corner_rms(al.matrix, truth, i, shape) if al.ok else np.nan

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            try:
                tf, _ = aa.find_transform(frames[i], frames[0])
                aa_err = corner_rms(tf.params, truth, i, shape)
            except Exception as exc:  # astroalign raises MaxIterError when it finds nothing
                aa_err = f"failed ({type(exc).__name__})"
            t_aa = time.perf_counter() - t
            t = time.perf_counter()
            try:
                tf2, _ = aa.find_transform(frames[i], ref_sources)
                aa2_err = corner_rms(tf2.params, truth, i, shape)
            except Exception as exc:
                aa2_err = f"failed ({type(exc).__name__})"
            t_aa2 = time.perf_counter() - t
        rows.append((i, len(stars), al.n_matches, t_det, t_match, ours, t_aa, aa_err, t_aa2, aa2_err))
        print(f"frame {i}: ours {t_det + t_match:.3f} s (detect {t_det:.3f} + match {t_match:.3f}), "
              f"err {ours:.4f} px, {al.n_matches} matches | astroalign {t_aa:.3f} s err {aa_err} | "
              f"astroalign+ref sources {t_aa2:.3f} s err {aa2_err}")

    def med(k):
        return float(np.median([r[k] for r in rows]))

    def err_stats(k):
        vals = [r[k] for r in rows if isinstance(r[k], float) and np.isfinite(r[k])]
        failed = sum(1 for r in rows if not isinstance(r[k], float))
        return (f"{np.median(vals):.4f} / {np.max(vals):.4f}" if vals else "-") + (
            f" ({failed} failed)" if failed else "")

    print()
    print(f"| {args.frames - 1} frames {args.size}x{args.size}, FWHM {args.fwhm} px | s per frame (median) "
          "| corner+centre error, px (median / max) |")
    print("|---|---|---|")
    print(f"| drizzlestack: detect + match (homography) | {med(3) + med(4):.3f} ({med(3):.3f} + {med(4):.3f}) "
          f"| {err_stats(5)} |")
    print(f"| astroalign.find_transform(frame, reference image) | {med(6):.3f} | {err_stats(7)} |")
    print(f"| astroalign.find_transform(frame, reference sources) | {med(8):.3f} | {err_stats(9)} |")
    print(f"reference detection, once per run: drizzlestack {t_ref_ours:.3f} s, astroalign {t_ref_aa:.3f} s")

    # First-call cost of the numba kernels with an empty cache (a fresh install).
    import os
    import subprocess
    import sys

    code = ("import time, numpy as np; t = time.perf_counter();"
            "from drizzlestack.registration.stars import detect_stars;"
            "from drizzlestack.registration.models import SurfaceSpline;"
            "rng = np.random.default_rng(0); img = rng.normal(100, 5, (256, 256)).astype(np.float32);"
            "img[100:103, 100:103] += 500; detect_stars(img);"
            "s = SurfaceSpline.fit(rng.uniform(0, 256, (30, 2)), rng.normal(0, 1, (30, 2)), None, 1.0);"
            "g = np.mgrid[0:100, 0:100].astype(float); s.displacement(g[1], g[0]);"
            "print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as cache:
        cold = float(subprocess.run([sys.executable, "-c", code], env={**os.environ, "NUMBA_CACHE_DIR": cache},
                                    capture_output=True, text=True, check=True).stdout)
        warm = float(subprocess.run([sys.executable, "-c", code], env={**os.environ, "NUMBA_CACHE_DIR": cache},
                                    capture_output=True, text=True, check=True).stdout)
    print(f"numba kernels, first use in a process: {cold:.1f} s with an empty cache (compile), "
          f"{warm:.1f} s from the on-disk cache")

    # The whole step through the store and the threads scheduler.
    import drizzlestack as ds

    store = tmp / "stack.zarr"
    if not store.exists():
        ds.ingest(truth.files, store)
    t = time.perf_counter()
    result = ds.register(store, reference=0, force=True)
    t_step = time.perf_counter() - t
    errs = [corner_rms(result["transform"].values[i], truth, i, shape) for i in range(1, args.frames)]
    print(f"drizzlestack.register (store, threads scheduler, {args.frames} frames incl. reference): "
          f"{t_step:.2f} s, {t_step / args.frames:.3f} s per frame, max error {max(errs):.4f} px")


if __name__ == "__main__":
    main()
