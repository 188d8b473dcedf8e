"""Fidelity of the default drizzle against the simulator's truth and a plain script.

The same simulated undersampled frames (cosmic rays, hot pixels, a trail, saturated
stars, a hazy frame; optionally seeing varying from frame to frame) through

* drizzlestack with its defaults (ingest, register, integrate, drizzle),
* drizzlestack with ``drizzle(rejection=False)`` (what the flags cost or gain),
* astroalign + astropy ``sigma_clip`` + STScI drizzle (``tests/fidelity.py``),

and, for each, the star flux scale and scatter against the truth, the astrometric
scatter, the largest background excess (sigma), and the own-pixel flags against the
truth mask (cosmic rays found, clean sky flagged), plus the time of the outlier pass
against the drizzle's own.

    python benchmarks/bench_fidelity.py --frames 16 --width 1024 --height 768
    python benchmarks/bench_fidelity.py --frames 16 --width 1024 --height 768 --seeing 1.2 2.4

``--before FILE`` times the outlier pass of another version of
``drizzlestack/integration/outliers.py`` (e.g. ``git show main:drizzlestack/integration/outliers.py``
saved to a file) side by side with this tree's, alternating ``--repeat`` times on the
same store (the fastest wall and CPU times of each are kept; the machine's load
varies), and checks that both give the same flags.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--fwhm", type=float, default=1.3)
    p.add_argument("--seeing", type=float, nargs=2, default=None)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--pixfrac", type=float, default=0.9)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--before", default=None, help="another outliers.py to time against this tree's")
    p.add_argument("--repeat", type=int, default=5, help="alternations with --before")
    args = p.parse_args(argv)

    import drizzlestack as ds
    from drizzlestack.simulate import DEFECT_COSMIC_RAY, simulate
    from drizzlestack.store import StackStore
    import fidelity

    warnings.simplefilter("ignore")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds-fidelity-"))
    shutil.rmtree(work / "frames", ignore_errors=True)
    area = args.width * args.height / 512 ** 2
    truth = simulate(work / "frames", n_frames=args.frames, shape=(args.height, args.width), fwhm=args.fwhm,
                     seeing=tuple(args.seeing) if args.seeing else None, n_stars=int(400 * area),
                     cosmic_rays=int(30 * area), hot_pixels=int(20 * area), hazy_frame=args.frames // 2,
                     max_shift=8.0, seed=args.seed)
    store = work / "stack.zarr"
    shutil.rmtree(store, ignore_errors=True)
    ds.ingest([str(work / "frames")], store)
    ds.register(store)
    # Warm the kernels on a throwaway drizzle so that the timed runs below exclude compiles.
    ds.integrate(store)
    t = time.perf_counter()
    ds.integrate(store, force=True)
    t_integrate = time.perf_counter() - t
    st = StackStore.open(store)
    summary = st.step("integrate")["summary"]
    ds.drizzle(store, scale=args.scale, pixfrac=args.pixfrac, output=None, force=True)
    t = time.perf_counter()
    out = ds.drizzle(store, scale=args.scale, pixfrac=args.pixfrac, output=None, force=True)
    t_drizzle = time.perf_counter() - t
    image, weights = out.drizzle.values, out.drizzle_weights.values
    raw = ds.drizzle(store, scale=args.scale, pixfrac=args.pixfrac, output=None, rejection=False, force=True)
    raw_image, raw_weights = raw.drizzle.values, raw.drizzle_weights.values

    ref = int(st.attrs["reference"])
    rows = {"drizzlestack (default)": (image, weights), "drizzlestack, rejection=False": (raw_image, raw_weights)}
    if not args.no_peer:
        t = time.perf_counter()
        rows["astroalign + sigma_clip + STScI drizzle"] = fidelity.peer_pipeline(truth.files, args.scale, args.pixfrac)
        t_peer = time.perf_counter() - t
    results = {}
    for name, (img, wht) in rows.items():
        r = 0 if name.startswith("astroalign") else ref  # the script registers on frame 0
        chosen = fidelity.bright_isolated_stars(truth, (args.height, args.width), reference=r)
        m = fidelity.measure(img, args.scale, truth, chosen, reference=r)
        m["background_max_sigma"] = fidelity.background_excess(img, wht, truth, args.scale, reference=r)
        results[name] = m

    flags = np.asarray(st.group["outliers"][...]) != 0
    mask, excess = truth.defects(work / "frames")
    noise = np.asarray(st.group["noise"][...])
    # Only pixels that land inside the reference field can be tested (and can matter).
    from drizzlestack.registration import frame_mapping

    inside = np.zeros(flags.shape, bool)
    ny, nx = st.frame_shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    for i in range(st.n_frames):
        xr, yr = frame_mapping(st, i).forward(xx, yy)
        inside[i] = (xr >= -0.5) & (xr <= nx - 0.5) & (yr >= -0.5) & (yr <= ny - 0.5)
    cr = ((mask & DEFECT_COSMIC_RAY) != 0) & (excess > 10 * noise[:, None, None]) & inside
    clean = (mask == 0) & inside
    flags_report = {"cosmic_rays_10sigma": int(cr.sum()), "found": float((flags & cr).sum() / max(cr.sum(), 1)),
                    "clean_flagged": float((flags & clean).sum() / clean.sum()),
                    "defects_found": float((flags & (mask != 0) & inside).sum() / max(((mask != 0) & inside).sum(), 1)),
                    "flagged_fraction": summary["outliers"]["flagged_fraction"]}
    timing = {"integrate_s": round(t_integrate, 2), "outlier_pass_s": summary["outliers"]["seconds"],
              "drizzle_s": round(t_drizzle, 2),
              "outlier_pass_over_drizzle": round(summary["outliers"]["seconds"] / t_drizzle, 3)}
    if not args.no_peer:
        timing["peer_s"] = round(t_peer, 2)
    if args.before:
        timing["side_by_side"] = side_by_side(store, args)
    print(json.dumps({"args": vars(args), "reference": ref, "results": results, "flags": flags_report,
                      "timing": timing}, indent=1))


def side_by_side(store, args) -> dict:
    """Outlier pass and drizzle times with ``args.before``'s outliers module and this
    tree's, alternating; the fastest of each, and whether the flags are identical."""
    import importlib.util

    import drizzlestack as ds
    from drizzlestack.integration import outliers
    from drizzlestack.store import StackStore

    name = "drizzlestack.integration._outliers_before"
    spec = importlib.util.spec_from_file_location(name, args.before)
    before = importlib.util.module_from_spec(spec)
    sys.modules[name] = before
    spec.loader.exec_module(before)
    tasks = {"before": before.outlier_tile, "after": outliers.outlier_tile}
    # Wall time (the fastest run) and CPU time of the process (all threads; less
    # sensitive to other jobs on the machine) of the outlier pass and of the drizzle.
    times = {side: {"outlier_pass_s": [], "outlier_pass_cpu_s": [], "drizzle_s": [], "drizzle_cpu_s": []}
             for side in tasks}
    flags = {}
    flag_outliers = outliers.flag_outliers
    cpu = {}

    def timed_flag_outliers(*a, **k):
        c = time.process_time()
        result = flag_outliers(*a, **k)
        cpu["outliers"] = time.process_time() - c
        return result

    outliers.flag_outliers = timed_flag_outliers
    try:
        for r in range(args.repeat + 1):  # the first round compiles the other module's kernels
            for side, task in tasks.items():
                outliers.outlier_tile = task
                ds.integrate(store, force=True)
                st = StackStore.open(store)
                flags[side] = np.asarray(st.group["outliers"][...])
                t, c = time.perf_counter(), time.process_time()
                ds.drizzle(store, scale=args.scale, pixfrac=args.pixfrac, output=None, force=True)
                if r:
                    times[side]["drizzle_s"].append(time.perf_counter() - t)
                    times[side]["drizzle_cpu_s"].append(time.process_time() - c)
                    times[side]["outlier_pass_s"].append(st.step("integrate")["summary"]["outliers"]["seconds"])
                    times[side]["outlier_pass_cpu_s"].append(cpu["outliers"])
    finally:
        outliers.outlier_tile = tasks["after"]
        outliers.flag_outliers = flag_outliers
    out = {"flags_identical": bool(np.array_equal(flags["before"], flags["after"]))}
    for side, t in times.items():
        best = {k: min(v) for k, v in t.items()}
        out[side] = {k: round(v, 3) for k, v in best.items()}
        out[side]["ratio"] = round(best["outlier_pass_s"] / best["drizzle_s"], 3)
        out[side]["cpu_ratio"] = round(best["outlier_pass_cpu_s"] / best["drizzle_cpu_s"], 3)
        out[side]["outlier_pass_all_s"] = [round(v, 3) for v in t["outlier_pass_s"]]
    return out


if __name__ == "__main__":
    main()
