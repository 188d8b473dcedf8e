"""Orchestration of the four steps: ``drizzlestack run`` and the demo.

Each step records its parameters in the store and skips itself when they (and its
inputs) have not changed since it last completed; ``force`` reruns a step and the
pipeline then reruns the steps after it, whose inputs it changed.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from .config import RunConfig, dump_config
from .info import info_table
from .location import is_url
from .parallel import SchedulerOptions, scheduler
from .store import open_stack

STEPS = ("ingest", "register", "integrate", "drizzle")


def resolve_path(path, base: Path | None = None):
    """A configured path made absolute: relative paths are taken from ``base``, or from
    the working directory when ``base`` is None (as every command-line tool does; a
    config file's own folder is not where a user expects ``drizzle.fits``). URLs
    (object storage) stay as they are."""
    if path is None or is_url(str(path)):
        return path
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    return str((Path(base) if base is not None else Path.cwd()) / p)


def run_outputs(cfg: RunConfig, base_dir=None) -> dict[str, str]:
    """The files a run writes, as absolute paths (or URLs): ``store``, ``integration``,
    ``drizzle`` (absent when configured as null) and ``report``."""
    base = Path(base_dir) if base_dir is not None else None
    store = resolve_path(cfg.store, base)
    out = {"store": store}
    for name, path in (("integration", cfg.integrate.output), ("drizzle", cfg.drizzle.output)):
        if path is not None:
            out[name] = resolve_path(path, base)
    # A store on object storage: the report goes to the working directory (or base).
    out["report"] = (str(Path(resolve_path("report", base)) / "report.html") if is_url(str(store))
                     else str(Path(store).resolve().parent / "report" / "report.html"))
    return out


def run(cfg: RunConfig, force=(), base_dir=None, log=print) -> dict:
    """Run ingest -> register -> integrate -> drizzle as configured.

    Parameters
    ----------
    cfg : RunConfig
        The configuration (``config.load_config``).
    force : iterable of str
        Steps to rerun even if their parameters are unchanged; the steps after a
        forced one rerun too.
    base_dir : path-like, optional
        Relative paths in ``cfg`` (store, inputs, outputs) are taken from here; default
        the working directory (not the config file's folder).
    log : callable
        Where progress lines go.

    Returns
    -------
    dict
        Seconds spent per step.
    """
    from .drizzle.driver import drizzle
    from .ingest import ingest_files
    from .integration import integrate
    from .registration import register

    force = set(force)
    unknown = force - set(STEPS)
    if unknown:
        from ._warnings import DrizzlestackError

        raise DrizzlestackError(f"--force {sorted(unknown)[0]}: unknown step (steps: {', '.join(STEPS)})")
    base = Path(base_dir) if base_dir is not None else None
    store = resolve_path(cfg.store, base)
    timings = {}
    forced = False
    with scheduler(cfg.scheduler):
        t0 = time.perf_counter()
        if cfg.ingest.inputs:
            inputs = [resolve_path(p, base) for p in cfg.ingest.inputs]
            report = ingest_files(inputs, store, chunk=cfg.ingest.chunk, saturation=cfg.ingest.saturation,
                                  cfa=cfg.ingest.cfa)
            for line in report.lines():
                log(f"[ingest] {line}")
            forced = bool(report.added)  # new frames: everything downstream reruns
        forced = forced or "ingest" in force
        timings["ingest"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        forced = forced or "register" in force
        register(store, force=forced, **dataclasses.asdict(cfg.register))
        timings["register"] = time.perf_counter() - t0
        log(f"[register] {timings['register']:.1f} s")

        t0 = time.perf_counter()
        forced = forced or "integrate" in force
        icfg = dataclasses.asdict(cfg.integrate)
        icfg["output"] = resolve_path(icfg["output"], base)
        integrate(store, force=forced, overwrite=True, **icfg)  # colour stores: per channel
        timings["integrate"] = time.perf_counter() - t0
        log(f"[integrate] {timings['integrate']:.1f} s")

        t0 = time.perf_counter()
        forced = forced or "drizzle" in force
        dcfg = dataclasses.asdict(cfg.drizzle)
        dcfg["output"] = resolve_path(dcfg["output"], base)
        from .advise import warn_drizzle_settings

        # Cheap (one setting's sample boxes): says before the longest step whether its
        # settings leave dry pixels or cannot gain over the integration.
        warn_drizzle_settings(store, dcfg["scale"], dcfg["pixfrac"], dcfg["kernel"], None, dcfg["distortion"])
        drizzle(store, overwrite=True, force=forced, **dcfg)
        timings["drizzle"] = time.perf_counter() - t0
        log(f"[drizzle] {timings['drizzle']:.1f} s")

        from .report import write_report

        # A store on object storage: the report goes to the working directory.
        report_dir = resolve_path("report", base) if is_url(str(store)) else None
        log(f"[report] {write_report(store, report_dir)}")
    return timings


def quality_summary(store) -> list[str]:
    """A few lines that tell whether the run went well."""
    stack = open_stack(store)
    status = [str(s) for s in stack["status"].values]
    ok = sum(s == "ok" for s in status)
    lines = [f"frames used: {ok} of {len(status)}"]
    if "registration_rms" in stack:
        rms = np.asarray(stack["registration_rms"].values, dtype=float)
        if np.isfinite(rms).any():
            lines.append(f"registration residual: median {np.nanmedian(rms):.3f} px, worst {np.nanmax(rms):.3f} px")
    for var, label in (("rejected_low_fraction", "rejected low"), ("rejected_high_fraction", "rejected high")):
        if var in stack:
            lines.append(f"{label}: {np.nanmean(np.asarray(stack[var].values, float)):.3%} of pixels")
    if "drizzle" in stack:
        img = stack["drizzle"]
        cov = stack["drizzle_coverage"].values if "drizzle_coverage" in stack else None
        lines.append(f"drizzle: {img.shape[-1]} x {img.shape[-2]} px"
                     + (f" x {img.shape[0]} colour channels (R, G, B)" if img.ndim == 3 else "") + ", "
                     f"{np.isfinite(img.values).mean():.1%} of the output covered"
                     + (f", median {np.median(cov):.0f} frames per pixel" if cov is not None else ""))
    return lines


def demo(directory="drizzlestack-demo", scheduler_options: SchedulerOptions | None = None, frames: int = 12,
         size: int = 384, seed: int = 1, log=print) -> int:
    """Simulate a small dithered, undersampled field and run the whole pipeline on it.

    Writes ``DIRECTORY/frames/*.fits`` (with the truth), ``DIRECTORY/stack.zarr``,
    ``DIRECTORY/integration.fits`` and ``DIRECTORY/drizzle.fits``, then prints the
    per-frame table and a quality summary. Returns the process exit status.
    """
    from .simulate import simulate

    root = Path(directory)
    frames_dir = root / "frames"
    store = root / "stack.zarr"
    if store.exists():
        shutil.rmtree(store)  # the demo always starts afresh; it only ever deletes its own store
    t_start = time.perf_counter()
    log(f"simulating {frames} dithered, undersampled frames of {size}x{size} px (FWHM 1.5 px) in {frames_dir}")
    truth = simulate(frames_dir, n_frames=frames, shape=(size, size), fwhm=1.5, seed=seed,
                     n_stars=int(400 * (size / 512) ** 2) + 50)
    cfg = RunConfig(store=str(store))
    cfg.ingest.inputs = list(truth.files)
    cfg.integrate.output = str(root / "integration.fits")
    cfg.drizzle.output = str(root / "drizzle.fits")
    cfg.drizzle.tile = 256
    if scheduler_options is not None:
        cfg.scheduler = scheduler_options
    (root / "config.yaml").write_text(dump_config(cfg))
    run(cfg, log=log)
    log("")
    log(info_table(store))
    log("")
    for line in quality_summary(store):
        log(line)
    log("")
    log(f"demo finished in {time.perf_counter() - t_start:.1f} s; results in {root.resolve()}:")
    log(f"  {root / 'drizzle.fits'} (drizzled image, WEIGHTS, COVERAGE)")
    log(f"  {root / 'report' / 'report.html'} (quality report: open it in a browser)")
    log(f"  {root / 'integration.fits'} (integration at the reference scale)")
    log(f"  {store} (the stack store: drizzlestack info {store})")
    log(f"  {root / 'config.yaml'} (the configuration: drizzlestack run {root / 'config.yaml'})")
    return 0
