"""Command-line interface: parses options and calls the API (no logic of its own)."""

from __future__ import annotations

import argparse
import errno
import sys
import time
from pathlib import Path

from . import __version__
from ._warnings import DrizzlestackError


def _add_scheduler_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where work runs")
    g.add_argument("--scheduler", default=None,
                   help="threads (default), processes, synchronous, distributed (local cluster), "
                        "tcp://HOST:PORT, or an HPC queue: slurm, pbs, sge, lsf, htcondor (see --jobqueue-config)")
    g.add_argument("--workers", type=int, default=None, help="number of workers (HPC: jobs)")
    g.add_argument("--memory-limit", default=None, help="memory per worker, e.g. 4GB (distributed); on HPC queues the memory per job, shared by its worker processes")
    g.add_argument("--dashboard", nargs="?", const=True, default=None,
                   help="start the Dask dashboard (optionally at ADDRESS, default 127.0.0.1:8787)")
    g.add_argument("--jobqueue-config", default=None, help="YAML file of dask-jobqueue cluster arguments")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _scheduler_options(args, base=None):
    from .parallel import SchedulerOptions

    opts = base or SchedulerOptions()
    for attr in ("scheduler", "workers", "memory_limit", "dashboard", "jobqueue_config"):
        value = getattr(args, attr, None)
        if value is not None:
            setattr(opts, attr, value)
    if getattr(args, "no_progress", False):
        opts.progress = False
    return opts


def _print_progress(i, n, path):
    if sys.stderr.isatty():
        print(f"\r  reading {i + 1}/{n}: {Path(path).name[:60]:60s}", end="", file=sys.stderr, flush=True)
        if i + 1 == n:
            print(file=sys.stderr)


def cmd_ingest(args) -> int:
    from .ingest import ingest_files

    t0 = time.perf_counter()
    report = ingest_files(args.files, args.store, chunk=args.chunk, saturation=args.saturation,
                          progress=None if args.no_progress else _print_progress,
                          cfa="grey" if args.grey else args.cfa)
    for line in report.lines():
        print(line)
    print(f"store {args.store} ({time.perf_counter() - t0:.1f} s)")
    return 1 if report.skipped else 0


def cmd_register(args) -> int:
    import warnings

    from ._warnings import DrizzlestackWarning
    from .parallel import scheduler
    from .registration import register

    t0 = time.perf_counter()
    reference = int(args.reference) if args.reference.isdigit() else args.reference
    smoothing = args.smoothing if args.smoothing == "auto" else float(args.smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DrizzlestackWarning)  # the summary below lists the excluded frames
        with scheduler(_scheduler_options(args)):
            result = register(args.store, reference=reference, model=args.model, distortion=args.distortion,
                              mirror=args.mirror, min_matches=args.min_matches, threshold=args.threshold,
                              max_stars=args.max_stars, smoothing=smoothing, force=args.force)
    summary = result.attrs["steps"]["register"].get("summary", {})
    rms = summary.get("median_rms")
    print(f"registered {summary.get('registered', 0)} frame(s) to reference frame {summary.get('reference')} "
          f"({args.model}{' + surface spline' if args.distortion else ''})"
          + (f", median residual {rms:.3f} px" if rms is not None else "")
          + f" in {time.perf_counter() - t0:.1f} s")
    for i, reason in summary.get("excluded", {}).items():
        print(f"  frame {i} excluded: {reason}")
    return 0 if summary.get("reference") is not None else 1


def cmd_simulate(args) -> int:
    from .simulate import simulate

    truth = simulate(args.directory, n_frames=args.frames, shape=(args.height, args.width), fwhm=args.fwhm,
                     n_stars=args.stars, seed=args.seed, hazy_frame=args.hazy_frame,
                     distortion=args.distortion, cfa=args.cfa, dispersion=tuple(args.dispersion))
    print(f"wrote {len(truth.files)} frames, truth.json and stars.ecsv to {args.directory}")
    return 0


def cmd_info(args) -> int:
    from .info import info_table

    print(info_table(args.store))
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(f"report {write_report(args.store, args.output)}")
    return 0


def cmd_integrate(args) -> int:
    from .integration import integrate
    from .parallel import scheduler

    t0 = time.perf_counter()
    options = {k: v for k, v in (("n_low", args.n_low), ("n_high", args.n_high)) if v is not None}
    outliers = {k: v for k, v in (("snr", args.outlier_snr), ("signal", args.outlier_signal),
                                  ("derivative", args.outlier_derivative)) if v is not None}
    saturation = False if args.no_saturation else (True if args.saturation is None else args.saturation)
    with scheduler(_scheduler_options(args)):
        result = integrate(args.store, rejection=args.rejection, low=args.low, high=args.high,
                           normalization=args.normalization, weights=args.weights, roi=args.roi, tile=args.tile,
                           saturation=saturation,
                           scale_estimator=args.scale_estimator, weight_keyword=args.weight_keyword,
                           reject_low=not args.no_reject_low, reject_high=not args.no_reject_high,
                           range_low=args.range_low, range_high=args.range_high, rejection_options=options,
                           frames=args.frames, output=args.output, overwrite=args.overwrite,
                           task_memory=args.task_memory, force=args.force, outliers=outliers,
                           white_balance=args.white_balance, align_channels=not args.no_align_channels)
    name = "integrate" if args.roi is None else "integrate_roi"
    summary = result.attrs["steps"][name].get("summary", {})
    used = summary.get("frames_used", [])
    print(f"integrated {len(used)} frame(s) with {summary.get('rejection')} rejection "
          f"(low {100 * summary.get('rejected_low_fraction', 0):.2f}%, "
          f"high {100 * summary.get('rejected_high_fraction', 0):.2f}%) in {time.perf_counter() - t0:.1f} s"
          + (f" -> {args.output}" if args.output else " (store only)"))
    if summary.get("outliers"):
        o = summary["outliers"]
        print(f"  outliers in the frames' own pixels (what drizzle drops): {100 * o['flagged_fraction']:.3f}% "
              f"({o['flagged_low']} low, {o['flagged_high']} high)")
    for i, reason in summary.get("excluded", {}).items():
        print(f"  frame {i} excluded: {reason}")
    return 0


def cmd_advise(args) -> int:
    from .advise import advice_json, advise, format_advice

    advice = advise(args.store, scale=args.scale, pixfrac=args.pixfrac, kernel=args.kernel, frames=args.frames,
                    distortion=not args.no_distortion)
    print(advice_json(advice) if args.json else format_advice(advice))
    return 0


def cmd_drizzle(args) -> int:
    from .advise import warn_drizzle_settings
    from .drizzle.driver import drizzle
    from .parallel import scheduler

    t0 = time.perf_counter()
    warn_drizzle_settings(args.store, args.scale, args.pixfrac, args.kernel, args.frames, not args.no_distortion)
    with scheduler(_scheduler_options(args)):
        result = drizzle(args.store, scale=args.scale, pixfrac=args.pixfrac, kernel=args.kernel, roi=args.roi,
                         output=args.output, tile=args.tile, frames=args.frames, rejection=not args.no_rejection,
                         weights=not args.no_weights, normalization=not args.no_normalization,
                         distortion=not args.no_distortion, coverage=not args.no_coverage,
                         overwrite=args.overwrite, force=args.force, white_balance=args.white_balance,
                         align_channels=not args.no_align_channels)
    ny, nx = result["drizzle"].shape[-2:]
    colour = " x 3 colour channels (R, G, B)" if result["drizzle"].ndim == 3 else ""
    print(f"drizzled {ny} x {nx} px{colour} (scale {args.scale:g}, pixfrac {args.pixfrac:g}, {args.kernel}) in "
          f"{time.perf_counter() - t0:.1f} s" + (f" -> {args.output}" if args.output else " (store only)"))
    return 0


def cmd_run(args) -> int:
    from .config import load_config
    from .pipeline import quality_summary, run, run_outputs

    cfg = load_config(args.config, args.set)
    cfg.scheduler = _scheduler_options(args, cfg.scheduler)
    t0 = time.perf_counter()
    run(cfg, force=args.force or ())  # relative paths: from the working directory
    outputs = run_outputs(cfg)
    for line in quality_summary(outputs["store"]):
        print(line)
    print(f"finished in {time.perf_counter() - t0:.1f} s; outputs:")
    for name, path in outputs.items():
        print(f"  {name:12s} {path}")
    return 0


def cmd_demo(args) -> int:
    from .pipeline import demo

    return demo(args.directory, scheduler_options=_scheduler_options(args), frames=args.frames, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    from .whitebalance import WHITE_BALANCES

    parser = argparse.ArgumentParser(
        prog="drizzlestack",
        description="Out-of-core drizzle integration of dithered, undersampled frames.",
    )
    parser.add_argument("--version", action="version", version=f"drizzlestack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="append FITS frames to a stack store")
    p.add_argument("store", help="stack store directory (created if absent)")
    p.add_argument("files", nargs="+", help="FITS files, directories or glob patterns")
    p.add_argument("--chunk", type=int, default=512, help="spatial chunk size of a new store (default 512)")
    p.add_argument("--saturation", type=float, default=None,
                   help="saturation level in ADU (default: header SATURATE, else the data type's maximum)")
    p.add_argument("--cfa", default=None, metavar="PATTERN",
                   help="declare or override the Bayer pattern (RGGB, BGGR, GRBG, GBRG) of colour frames; "
                        "default: from each file's header")
    p.add_argument("--grey", "--gray", action="store_true", help="ingest colour mosaics as grey on purpose")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("register", help="detect stars, match them to the reference frame, fit the transforms")
    p.add_argument("store")
    p.add_argument("--reference", default="auto", help="'auto' (default), a frame index or a file name")
    p.add_argument("--model", default="homography", choices=("homography", "affine", "similarity"))
    p.add_argument("--distortion", action="store_true", help="add a surface spline for optical distortion")
    p.add_argument("--mirror", action="store_true", help="accept frames mirrored relative to the reference")
    p.add_argument("--min-matches", type=int, default=6, help="fewer matched stars exclude a frame (default 6)")
    p.add_argument("--threshold", type=float, default=5.0, help="detection threshold in sigma (default 5)")
    p.add_argument("--max-stars", type=int, default=2000, help="brightest stars kept per frame (default 2000)")
    p.add_argument("--smoothing", default="auto", help="spline smoothing: 'auto' (cross-validation) or a number")
    p.add_argument("--force", action="store_true", help="rerun even if the step is up to date")
    _add_scheduler_options(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("simulate", help="write simulated dithered frames with known truth")
    p.add_argument("directory")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--fwhm", type=float, default=1.5)
    p.add_argument("--stars", type=int, default=400)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hazy-frame", type=int, default=None, help="index of a frame taken through haze")
    p.add_argument("--distortion", type=float, default=0.0, help="radial distortion at the corners (px)")
    p.add_argument("--cfa", default=None, metavar="PATTERN",
                   help="a one-shot-colour camera with this Bayer pattern (RGGB, BGGR, GRBG, GBRG): colour sky")
    p.add_argument("--dispersion", type=float, nargs=2, default=(0.0, 0.0), metavar=("DX", "DY"),
                   help="colour: blue's offset from green on the sky (reference px; red at -0.5 times it)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("info", help="print the frames of a store and what the steps found")
    p.add_argument("store")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("report", help="write an HTML quality report (previews, per-frame plots, dither, parameters)")
    p.add_argument("store")
    p.add_argument("--output", "-o", default=None, help="directory (default: report/ next to the store)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("integrate", help="normalize, weight and reject outliers; write the integration and flags")
    p.add_argument("store")
    p.add_argument("--rejection", default="winsorized",
                   help="none, minmax, percentile, sigma, winsorized (default), averaged, linear, esd")
    p.add_argument("--low", type=float, default=4.0, help="low rejection threshold (default 4)")
    p.add_argument("--high", type=float, default=3.0, help="high rejection threshold (default 3)")
    p.add_argument("--no-reject-low", action="store_true", help="do not reject low outliers")
    p.add_argument("--no-reject-high", action="store_true", help="do not reject high outliers")
    p.add_argument("--range-low", type=float, default=None, help="reject samples at or below (normalized ADU)")
    p.add_argument("--range-high", type=float, default=None, help="reject samples at or above (normalized ADU)")
    p.add_argument("--outlier-snr", type=float, default=None,
                   help="noise multiples a raw pixel may stand off the model before drizzle drops it (default 4)")
    p.add_argument("--outlier-signal", type=float, default=None,
                   help="fraction of the model above the sky tolerated for seeing/transparency (default 0.6)")
    p.add_argument("--outlier-derivative", type=float, default=None,
                   help="multiples of the model's local gradient tolerated (default 1.2)")
    p.add_argument("--n-low", type=int, default=None, help="minmax: lowest values rejected (default 1)")
    p.add_argument("--n-high", type=int, default=None, help="minmax: highest values rejected (default 1)")
    p.add_argument("--normalization", default="additive+scaling",
                   help="none, additive, multiplicative, additive+scaling (default), multiplicative+scaling")
    p.add_argument("--scale-estimator", default="auto",
                   help="scale of the +scaling normalizations: auto (default), photometry, biweight, mad")
    p.add_argument("--weights", default="noise", help="none, exposure, noise (default), keyword")
    p.add_argument("--weight-keyword", default=None, help="FITS keyword holding the weight (--weights keyword)")
    p.add_argument("--saturation", type=float, default=None,
                   help="saturation level in ADU for every frame (default: each frame's, from ingest)")
    p.add_argument("--no-saturation", action="store_true", help="no saturation protection")
    p.add_argument("--roi", type=int, nargs=4, metavar=("X0", "Y0", "WIDTH", "HEIGHT"), default=None,
                   help="quick trial on a region of the reference frame (keeps the full-field products)")
    p.add_argument("--output", "-o", default="integration.fits", help="FITS file (default integration.fits)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--tile", type=int, default=512, help="largest tile size: one task per tile (default 512)")
    p.add_argument("--task-memory", default="256MiB", help="memory budget of one tile task (default 256MiB)")
    p.add_argument("--white-balance", choices=WHITE_BALANCES, default="none",
                   help="colour frames, the FITS image only: none (default, raw colours), camera (the raw "
                        "files' as-shot multipliers) or neutral (each channel's sky brought to green's)")
    p.add_argument("--no-align-channels", action="store_true",
                   help="colour frames: keep the image's red and blue where the registration puts them (default: "
                        "onto green, by their offset measured on the stars)")
    p.add_argument("--frames", type=int, nargs="+", default=None, help="frame indices (default: every ok frame)")
    p.add_argument("--force", action="store_true", help="recompute even if the store holds this integration")
    _add_scheduler_options(p)
    p.set_defaults(func=cmd_integrate)

    p = sub.add_parser("drizzle", help="drizzle the registered frames onto a finer grid")
    p.add_argument("store")
    p.add_argument("--scale", type=float, default=2.0, help="output pixels per reference pixel (default 2)")
    p.add_argument("--pixfrac", type=float, default=0.9, help="drop size in input pixels, (0, 1] (default 0.9)")
    p.add_argument("--kernel", default="square", help="square (default), point, turbo, gaussian, lanczos2, lanczos3")
    p.add_argument("--roi", type=float, nargs=4, metavar=("X0", "Y0", "WIDTH", "HEIGHT"), default=None,
                   help="region of the reference frame, in reference pixels")
    p.add_argument("--output", "-o", default="drizzle.fits", help="FITS file (default drizzle.fits)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--tile", type=int, default=1024, help="output tile size: one task per tile (default 1024)")
    p.add_argument("--frames", type=int, nargs="+", default=None, help="frame indices (default: every ok frame)")
    p.add_argument("--no-rejection", action="store_true", help="ignore the integration's rejection flags")
    p.add_argument("--no-weights", action="store_true", help="ignore the integration's frame weights")
    p.add_argument("--no-normalization", action="store_true", help="ignore the integration's normalization")
    p.add_argument("--no-distortion", action="store_true", help="ignore the distortion (spline) model")
    p.add_argument("--no-coverage", action="store_true", help="no COVERAGE extension")
    p.add_argument("--white-balance", choices=WHITE_BALANCES, default="none",
                   help="colour frames: none (default, raw colours), camera (the raw files' as-shot multipliers) "
                        "or neutral (each channel's sky brought to green's)")
    p.add_argument("--no-align-channels", action="store_true",
                   help="colour frames: keep red and blue where the registration puts them (default: shifted onto "
                        "green by the offset measured on the stars: atmospheric dispersion, lateral colour)")
    p.add_argument("--force", action="store_true", help="redrizzle even if the store holds this drizzle")
    _add_scheduler_options(p)
    p.set_defaults(func=cmd_drizzle)

    p = sub.add_parser("advise", help="will drizzle help these frames? recommended scale and pixfrac, "
                                      "predicted dry pixels and noise (needs only a registered store)")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--scale", type=float, default=None, help="keep this scale (default: recommend one)")
    p.add_argument("--pixfrac", type=float, default=None, help="keep this pixfrac (default: recommend one)")
    p.add_argument("--kernel", default="square", help="drizzle kernel of the predictions (default square)")
    p.add_argument("--frames", type=int, nargs="+", default=None, help="frame indices (default: every ok frame)")
    p.add_argument("--no-distortion", action="store_true", help="ignore the distortion (spline) model")
    p.set_defaults(func=cmd_advise)

    p = sub.add_parser("run", help="run ingest, register, integrate and drizzle from a config file")
    p.add_argument("config", help="YAML configuration (see configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key, e.g. --set drizzle.scale=3 (repeatable)")
    p.add_argument("--force", action="append", choices=["ingest", "register", "integrate", "drizzle"],
                   help="rerun this step (and the ones after it) even if nothing changed")
    _add_scheduler_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="simulate a small dithered field and run the pipeline on it")
    p.add_argument("directory", nargs="?", default="drizzlestack-demo")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--size", type=int, default=384, help="frame width and height (px)")
    _add_scheduler_options(p)
    p.set_defaults(func=cmd_demo)
    return parser


def format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as a plain ``warning: ...`` line: Python's default shows the file, line
    and source line that raised it (``cli.py:145: DrizzlestackWarning: ... result =
    drizzle(args.store, ...``), which says nothing to a user."""
    from ._warnings import DrizzlestackWarning

    kind = "" if issubclass(category, DrizzlestackWarning) else f"{category.__name__}: "
    return f"warning: {kind}{message}\n"


def main(argv=None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    # The format only: warnings are still shown (or recorded, or raised) as the filters say.
    previous, warnings.formatwarning = warnings.formatwarning, format_warning
    try:
        return _run(args)
    finally:
        warnings.formatwarning = previous


def _run(args) -> int:
    try:
        return args.func(args)
    except DrizzlestackError as exc:
        print(f"drizzlestack: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("drizzlestack: interrupted; the store keeps every completed frame and tile: run the same "
              "command again to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Frames are committed and tiles recorded only once fully written, so the store
        # stays readable and the same command resumes where this one stopped.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"drizzlestack: error: disk full{where}: {exc.strerror}. The store keeps every completed "
              "frame and tile; free some space and run the same command again to resume", file=sys.stderr)
        return 2


def before_exit() -> None:
    """Let the interpreter's last garbage collections skip every object alive now.

    Called by the console command once its work is done and written: with numpy, dask,
    xarray, zarr, numba and astropy loaded, the collections of the interpreter's
    shutdown took 0.6-0.9 s of every ``drizzlestack run`` (0.09 s frozen). Never called
    by :func:`main` itself, which tests and notebooks call in a long-lived process
    (frozen objects are never collected).
    """
    import gc

    gc.freeze()


def console(argv=None) -> int:
    """The ``drizzlestack`` console command: :func:`main`, then :func:`before_exit`."""
    try:
        return main(argv)
    finally:
        before_exit()


if __name__ == "__main__":
    sys.exit(console())
