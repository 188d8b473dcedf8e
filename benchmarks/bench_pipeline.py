"""The whole pipeline end to end: out-of-core proof, and against today's Python tools.

    python benchmarks/bench_pipeline.py outofcore --frames 64 --size 4096 --scales 2 3 [--workdir DIR] [--workers 2]
    python benchmarks/bench_pipeline.py compare --frames 16 --size 2048 [--height 1536] [--workdir DIR] [--workers 2]

Both subcommands first simulate a dithered, undersampled observation with
``drizzlestack.simulate`` (uint16 FITS frames as a camera writes them: stars of FWHM
``--fwhm`` px (default 1.4), ~400 stars, 30 cosmic rays and 20 hot pixels per 512x512
px of frame, random sub-pixel dithers up to +-8 px and rotations up to +-0.5 degree,
Poisson and read noise, a satellite trail in one frame, a few saturated stars). The
simulation is timed separately and never counted. With ``--workdir`` the frames are
kept there and reused by a later run with the same parameters.

Before anything is timed, a small pipeline (4 frames of 256x256) runs once in its own
process so that numba's on-disk cache holds every compiled kernel: the figures then
include loading kernels from the cache (as every real run does) but not compiling them.

``outofcore`` -- a stack several times larger than the memory the run uses. Each step
runs in a *fresh subprocess* with the package defaults (``config.RunConfig``; the
integration's ``task_memory`` default):
ingest -> register -> integrate (writes ``integration.fits``) -> drizzle at every
``--scales`` value, each on the same integrated store and each writing its FITS
(square kernel, pixfrac 0.9). Each child reports its own peak RSS (``VmHWM``, see
``_rss_mib``; with the threaded scheduler all work happens in that one process); the
parent reaps it with ``os.wait4`` for its CPU time, and measures its wall time (interpreter start and imports included)
and the time of the step call alone, with the throughput of every step in frames/s
and input Mpx/s. The stack size is given on disk (the FITS frames; the store's
compressed frames) and as float32 in memory, and divided by the peak RSS of the whole
run (the largest step): the out-of-core target is stack / peak >= 4.

``compare`` -- the same job two ways on one stack that both can hold, each side in its
own fresh subprocess (wall time; CPU time from ``os.wait4``; the child's own peak RSS):

(a) drizzlestack: ingest, register (reference frame 0, so both outputs share a grid),
    integrate (package defaults: winsorized rejection 4/3, normalization, noise
    weights; store only, no integration FITS since (b) writes none), drizzle at scale 2,
    pixfrac 0.9, square kernel, FITS output; threaded scheduler with ``--workers``. The
    child ends as the ``drizzlestack`` command does (``cli.before_exit``: the heap frozen,
    so the interpreter's shutdown collections skip it).
(b) today's tools, written the way their documentation shows, in one Python process:
    read every FITS frame into memory with astropy; ``astroalign.find_transform(frame,
    reference)`` for every frame against frame 0; ``astroalign.apply_transform`` (which
    is scikit-image ``warp``, bicubic, plus a footprint warp) of every frame onto the
    reference grid into an in-memory ``(n, ny, nx)`` float32 stack (NaN outside the
    footprint); ``astropy.stats.sigma_clip(stack, axis=0, sigma=3, maxiters=5,
    cenfunc="median", stdfunc="std")``; a frame pixel is rejected when its centre,
    mapped to the reference grid, falls on a clipped pixel of that frame's registered
    view (nearest pixel); STScI ``drizzle.resample.Drizzle(kernel="square")`` and
    ``add_image`` per frame with the pixmap from the astroalign transform, scale 2
    (``pixel_scale_ratio=0.5``), pixfrac 0.9, the rejection as the weight map; the image
    and weights written to FITS. Single-threaded, as those libraries run.
(c) Siril (``siril-cli -s SCRIPT``, its own multi-threading on every core), the job as
    its users script it: ``convert`` the FITS frames into a sequence, ``register
    -drizzle`` (star registration onto frame 0 with Siril's x2 up-scaled "drizzle": an
    interpolated up-sampling, not a drizzle of the pixels), ``stack rej w 4 3
    -norm=addscale -output_norm`` (winsorized sigma clipping 4/3 with additive + scale
    normalization, the same rejection as (a)). Skipped with a message when ``siril-cli``
    is not on the path (``apt-get install siril``) or with ``--no-siril``. Its peak RSS
    is ``siril-cli``'s own ``ru_maxrss``, started from a small Python process that
    imports nothing heavy (so the exec'd address space it replaces is a few MiB).

Then a sanity check that the jobs are equal: the Pearson correlation of the two
drizzled images where both have weight, and the aperture flux of the brightest
isolated unsaturated stars (truth catalogue positions) in each image, as the median
ratio drizzlestack / STScI and each against the true flux; Siril's image (normalized
to [0, 1], on its own x2 grid) by its best correlation with drizzlestack's over shifts
of up to one output pixel.

``--size`` is the frame width; ``--height`` (default: the width) makes the small-stack
case of issue 12, ``--frames 16 --size 1024 --height 768``. ``--baseline-src DIR`` adds
drizzlestack from another source tree (an older commit) as a side, alternating with the
current tree in every repeat: before/after ratios from one run.

Results are also written as JSON to ``WORKDIR/results-<subcommand>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
MIB = 2 ** 20
GIB = 2 ** 30


# ------------------------------------------------------------------------ simulation
def sim_params(frames: int, size: int, fwhm: float, seed: int, height: int | None = None) -> dict:
    """Simulation parameters scaled with the frame area (the simulator's defaults are
    per 512x512 frame); frames are ``size`` wide and ``height`` (default ``size``) high."""
    height = size if height is None else height
    area = size * height / 512 ** 2
    return dict(n_frames=frames, shape=[height, size], fwhm=fwhm, n_stars=int(400 * area),
                cosmic_rays=int(30 * area), hot_pixels=int(20 * area), max_shift=8.0, max_rotation=0.5,
                seed=seed, dtype="uint16")


def simulate_frames(directory: Path, params: dict) -> tuple[list[str], float, bool]:
    """Simulate into ``directory`` (or reuse a simulation there with the same
    parameters). Returns (files, seconds, reused)."""
    truth_file = directory / "truth.json"
    if truth_file.exists():
        meta = json.loads(truth_file.read_text())
        cfg = meta["config"]
        if all(cfg.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in params.items()) \
                and all(Path(f).exists() for f in meta["files"]):
            return meta["files"], 0.0, True
    from drizzlestack.simulate import simulate

    t0 = time.perf_counter()
    truth = simulate(directory, **{**params, "shape": tuple(params["shape"])})
    return list(truth.files), time.perf_counter() - t0, False


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def dir_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -------------------------------------------------------------------- subprocesses
def run_child(spec: dict, log: Path, pythonpath: str | None = None) -> dict:
    """Run ``spec`` in a fresh interpreter (with ``pythonpath`` first on its path, e.g. an
    older drizzlestack source tree); return its JSON result plus the wall time, CPU time
    and peak RSS of that process (``os.wait4``: this child only)."""
    t0 = time.perf_counter()
    env = None
    if pythonpath:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([pythonpath, os.environ.get("PYTHONPATH", "")])}
    with open(log, "a") as err:
        err.write(f"\n=== {spec['task']} {json.dumps(spec)}\n")
        err.flush()
        proc = subprocess.Popen([sys.executable, str(HERE), "_child", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        out = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(Path(log).read_text()[-4000:])
        raise SystemExit(f"{spec['task']} failed (exit {proc.returncode}); log: {log}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime)
    result.setdefault("peak_rss_mib", usage.ru_maxrss / 1024)  # the child's own VmHWM when it reported one
    return result


def _rss_mib() -> float:
    from _rss import peak_rss_mib  # the child's own peak (see _rss.py)

    return peak_rss_mib()


def _ds_step(step: str, spec: dict) -> dict:
    """One drizzlestack step with the package defaults (as ``drizzlestack run`` calls
    it), on the threaded scheduler. Returns its seconds and a summary."""
    from drizzlestack.config import RunConfig
    from drizzlestack.parallel import scheduler

    cfg = RunConfig()
    store = spec["store"]
    info: dict = {}
    with scheduler(scheduler="threads", workers=spec["workers"], progress=False):
        t0 = time.perf_counter()
        if step == "ingest":
            from drizzlestack.ingest import ingest_files

            report = ingest_files(spec["files"], store, chunk=cfg.ingest.chunk, saturation=cfg.ingest.saturation)
            info = {"added": len(report.added), "skipped": len(report.skipped)}
        elif step == "register":
            from drizzlestack.registration import register

            kw = dataclasses.asdict(cfg.register)
            if spec.get("reference") is not None:
                kw["reference"] = spec["reference"]
            out = register(store, force=True, **kw)
            info = out.attrs["steps"]["register"].get("summary", {})
        elif step == "integrate":
            from drizzlestack.integration import integrate

            kw = dataclasses.asdict(cfg.integrate)
            kw["output"] = spec.get("output")
            out = integrate(store, force=True, overwrite=True, **kw)
            s = out.attrs["steps"]["integrate"].get("summary", {})
            info = {k: s.get(k) for k in ("tile", "seconds", "rejection", "rejected_low_fraction",
                                          "rejected_high_fraction", "scale_estimator")}
            info["frames_used"] = len(s.get("frames_used", []))
        elif step == "drizzle":
            from drizzlestack.drizzle.driver import drizzle

            kw = dataclasses.asdict(cfg.drizzle)
            kw.update(scale=float(spec["scale"]), output=spec.get("output"))
            out = drizzle(store, overwrite=True, force=True, **kw)
            info = {"shape": list(out["drizzle"].shape)}
        else:
            raise ValueError(step)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "info": info}


def _import_steps() -> None:
    """Import every step's modules before the baseline RSS is read."""
    import importlib

    for name in ("drizzlestack.ingest", "drizzlestack.registration", "drizzlestack.integration",
                 "drizzlestack.drizzle.driver"):
        importlib.import_module(name)


def child_main(spec: dict) -> None:
    import warnings

    t0 = time.perf_counter()
    task = spec["task"]
    if task in ("ds_step", "ds_pipeline"):  # (the tools side never imports drizzlestack)
        from drizzlestack._warnings import DrizzlestackWarning

        warnings.simplefilter("ignore", DrizzlestackWarning)
    if task == "ds_step":
        _import_steps()
        base = {"import_s": time.perf_counter() - t0, "baseline_rss_mib": _rss_mib()}
        res = _ds_step(spec["step"], spec)
    elif task == "ds_pipeline":
        _import_steps()
        base = {"import_s": time.perf_counter() - t0, "baseline_rss_mib": _rss_mib()}
        t1 = time.perf_counter()
        steps = {}
        for step, extra in (("ingest", {}), ("register", {}), ("integrate", {"output": spec.get("integration")}),
                            ("drizzle", {"scale": spec["scale"], "output": spec["output"]})):
            steps[step] = _ds_step(step, {**spec, **extra})
        res = {"seconds": time.perf_counter() - t1, "steps": steps}
    elif task == "tools_pipeline":
        base = {}
        res = tools_pipeline(spec, t0)
    elif task == "siril_pipeline":
        print(json.dumps(siril_pipeline(spec)))  # siril-cli's own peak RSS, not this process's
        return
    else:
        raise ValueError(task)
    print(json.dumps({**base, **res, "peak_rss_mib": _rss_mib()}), flush=True)
    if task in ("ds_step", "ds_pipeline"):
        from drizzlestack.cli import before_exit

        before_exit()  # the child ends as the `drizzlestack` command does (its exit is in the wall time)


# ------------------------------------------------------------- today's tools (b)
def tools_pipeline(spec: dict, t_start: float) -> dict:
    """The job assembled from astropy, astroalign, astropy.stats and STScI drizzle."""
    import warnings

    import astroalign as aa
    from astropy.io import fits
    from astropy.stats import sigma_clip
    from drizzle.resample import Drizzle

    out = {"import_s": time.perf_counter() - t_start, "baseline_rss_mib": _rss_mib()}
    times = {}
    scale, pixfrac = float(spec["scale"]), float(spec["pixfrac"])
    t1 = time.perf_counter()

    t = time.perf_counter()
    frames = [fits.getdata(f).astype(np.float32) for f in spec["files"]]
    times["read"] = time.perf_counter() - t
    ref = frames[0]
    ny, nx = ref.shape
    n = len(frames)

    t = time.perf_counter()
    transforms = [np.eye(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tfs = [None]
        for i in range(1, n):
            tf, _ = aa.find_transform(frames[i], ref)
            tfs.append(tf)
            transforms.append(np.asarray(tf.params, dtype=np.float64))
    times["astroalign.find_transform"] = time.perf_counter() - t

    t = time.perf_counter()
    stack = np.empty((n, ny, nx), np.float32)
    stack[0] = ref
    for i in range(1, n):
        registered, footprint = aa.apply_transform(tfs[i], frames[i], ref)
        stack[i] = registered
        stack[i][footprint] = np.nan
        del registered, footprint
    times["astroalign.apply_transform"] = time.perf_counter() - t

    t = time.perf_counter()
    clipped = sigma_clip(stack, axis=0, sigma=3, maxiters=5, cenfunc="median", stdfunc="std")
    rejected = np.ma.getmaskarray(clipped) & np.isfinite(stack)  # clipped, not merely "no data"
    clip_fraction = float(rejected.sum() / max(np.isfinite(stack).sum(), 1))
    del clipped, stack
    times["sigma_clip"] = time.perf_counter() - t

    t = time.perf_counter()
    out_shape = (int(round(scale * ny)), int(round(scale * nx)))
    driz = Drizzle(kernel="square", out_shape=out_shape, disable_ctx=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fidelity import script_pixmap_and_weights

    grid = np.indices((ny, nx), dtype=np.float64)
    t_map = 0.0
    for i in range(n):
        tm = time.perf_counter()
        pixmap, weight = script_pixmap_and_weights(transforms[i], rejected[i], scale, grid)
        t_map += time.perf_counter() - tm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            driz.add_image(frames[i], exptime=1.0, pixmap=pixmap, weight_map=weight, pixfrac=pixfrac,
                           in_units="cps", iscale=1.0, pixel_scale_ratio=1.0 / scale)
        del pixmap, weight
    times["drizzle (STScI add_image)"] = time.perf_counter() - t - t_map
    times["rejection -> frames, pixmaps"] = t_map

    t = time.perf_counter()
    fits.HDUList([fits.PrimaryHDU(driz.out_img), fits.ImageHDU(driz.out_wht, name="WEIGHTS")]).writeto(
        spec["output"], overwrite=True)
    times["write FITS"] = time.perf_counter() - t
    out.update(seconds=time.perf_counter() - t1, stages=times, clip_fraction=clip_fraction)
    return out


# -------------------------------------------------------------------------- Siril (c)
SIRIL_SCRIPT = """requires 1.0.0
setext fits
convert light -out=seq
cd seq
register light -drizzle
stack r_light rej w 4 3 -norm=addscale -output_norm -out=../siril
close
"""


def siril_pipeline(spec: dict) -> dict:
    """Siril's job (register with x2 up-scaling, winsorized 4/3 stack) on links to the
    frames in a clean directory; runs in a small child, reports ``siril-cli``'s own
    wall time and peak RSS (``ru_maxrss`` of that process: see the module docstring)."""
    work = Path(spec["workdir"])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for k, f in enumerate(spec["files"]):
        (work / f"light_{k:05d}.fits").symlink_to(Path(f).resolve())
    script = work / "job.ssf"
    script.write_text(SIRIL_SCRIPT)
    t0 = time.perf_counter()
    with open(work / "siril.log", "w") as log:
        proc = subprocess.Popen([spec["siril"], "-d", str(work), "-s", str(script)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    log_text = (work / "siril.log").read_text(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0 or "Script execution finished successfully" not in log_text \
            or not (work / "siril.fits").exists():
        raise SystemExit(f"siril-cli failed; log: {work / 'siril.log'}\n{log_text[-2000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "baseline_rss_mib": float("nan"),
            "import_s": 0.0, "output": str(work / "siril.fits"),
            "siril_cpu_s": usage.ru_utime + usage.ru_stime}


def siril_sanity(siril_path: Path, ds_path: Path, max_shift: int = 1) -> dict:
    """Best Pearson correlation of Siril's image with drizzlestack's (central region,
    shifts up to ``max_shift`` output pixels: the two x2 grids need not share an origin)."""
    from astropy.io import fits

    with fits.open(ds_path) as h:
        a, wa = h[0].data.astype(np.float64), h["WEIGHTS"].data
    with fits.open(siril_path) as h:
        b = h[0].data.astype(np.float64)
    if a.shape != b.shape:
        return {"correlation": float("nan"), "shift": None, "shape": list(b.shape)}
    ny, nx = a.shape
    m = max_shift
    cy, cx = slice(ny // 4, 3 * ny // 4), slice(nx // 4, 3 * nx // 4)
    best = (-2.0, (0, 0))
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            bb = np.roll(b, (dy, dx), axis=(0, 1))[cy, cx]
            aa, ww = a[cy, cx], wa[cy, cx]
            ok = np.isfinite(aa) & np.isfinite(bb) & (ww > 0)
            c = float(np.corrcoef(aa[ok], bb[ok])[0, 1])
            best = max(best, (c, (dy, dx)))
    return {"correlation": best[0], "shift": list(best[1]), "shape": list(b.shape)}


# ------------------------------------------------------------------------- warm-up
def warm_up(workdir: Path, workers: int, log: Path) -> float:
    """A 4-frame 256x256 pipeline in one child process: fills numba's on-disk cache."""
    wdir = workdir / "warmup"
    files, _, _ = simulate_frames(wdir / "frames", sim_params(4, 256, 1.4, 99))
    store = wdir / "stack.zarr"
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    run_child({"task": "ds_pipeline", "files": files, "store": str(store), "workers": workers, "reference": 0,
               "integration": str(wdir / "integration.fits"), "scale": 2.0, "output": str(wdir / "drizzle.fits")},
              log)
    return time.perf_counter() - t0


def _settings() -> dict:
    from drizzlestack.config import RunConfig
    from drizzlestack.integration import integrate

    cfg = RunConfig()
    return {"ingest.chunk": cfg.ingest.chunk,
            "register.model": cfg.register.model, "register.max_stars": cfg.register.max_stars,
            "integrate.rejection": f"{cfg.integrate.rejection} {cfg.integrate.low:g}/{cfg.integrate.high:g}",
            "integrate.normalization": cfg.integrate.normalization, "integrate.weights": cfg.integrate.weights,
            "integrate.tile": cfg.integrate.tile,
            "integrate.task_memory": inspect.signature(integrate).parameters["task_memory"].default,
            "drizzle.kernel": cfg.drizzle.kernel, "drizzle.pixfrac": cfg.drizzle.pixfrac,
            "drizzle.tile": cfg.drizzle.tile}


def _workdir(arg: str | None, prefix: str) -> tuple[Path, bool]:
    if arg:
        p = Path(arg).resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


def _registration_error(store: Path, truth_dir: Path) -> float:
    """Largest RMS distance (px, corners and centre) between a fitted frame -> reference
    mapping and the true one, over the registered frames."""
    from drizzlestack.geometry import apply_homography
    from drizzlestack.simulate import load_truth
    from drizzlestack.store import open_stack

    truth = load_truth(truth_dir)
    stack = open_stack(store)
    ref = int(stack.attrs["reference"])
    fitted = np.asarray(stack["transform"].values, float)
    status = [str(s) for s in stack["status"].values]
    ny, nx = truth.config.shape
    p = np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1], [(nx - 1) / 2, (ny - 1) / 2]], float)
    worst = 0.0
    to_ref = np.linalg.inv(truth.transforms[ref])
    for i, s in enumerate(status):
        if s != "ok":
            continue
        true = to_ref @ truth.transforms[i]
        tx, ty = apply_homography(true, p[:, 0], p[:, 1])
        x, y = apply_homography(fitted[i], p[:, 0], p[:, 1])
        worst = max(worst, float(np.sqrt(np.mean((x - tx) ** 2 + (y - ty) ** 2))))
    return worst


def prepare_frames(args, workdir: Path, log: Path):
    """Simulate (or reuse) the frames and warm numba's cache, outside the timed figures;
    returns the simulation parameters, the FITS files and the simulation's seconds
    (``None`` when the frames were reused)."""
    params = sim_params(args.frames, args.size, args.fwhm, args.seed, getattr(args, "height", None))
    files, t_sim, reused = simulate_frames(workdir / "frames", params)
    print(f"# simulation: {args.frames} frames of {params['shape'][1]}x{params['shape'][0]}, {params['n_stars']} stars, FWHM "
          f"{args.fwhm} px: " + ("reused from an earlier run" if reused else f"{t_sim:.1f} s (not counted)"),
          flush=True)
    if not args.no_warmup:
        print(f"# warm-up (numba cache, not counted): {warm_up(workdir, args.workers, log):.1f} s", flush=True)
    return params, files, (None if reused else t_sim)


# ----------------------------------------------------------------------- outofcore
def outofcore(args) -> None:
    workdir, temporary = _workdir(args.workdir, "bench-pipeline-")
    log = workdir / "children.log"
    try:
        params, files, t_sim = prepare_frames(args, workdir, log)
        store = workdir / "stack.zarr"
        shutil.rmtree(store, ignore_errors=True)
        for s in args.scales:
            (workdir / f"drizzle_x{s:g}.fits").unlink(missing_ok=True)
        common = {"task": "ds_step", "store": str(store), "workers": args.workers}
        steps = [("ingest", {"files": files}), ("register", {}),
                 ("integrate", {"output": str(workdir / "integration.fits")})]
        steps += [(f"drizzle x{s:g}", {"step": "drizzle", "scale": s, "output": str(workdir / f"drizzle_x{s:g}.fits")})
                  for s in args.scales]
        results = {}
        for name, extra in steps:
            spec = {**common, "step": name, **extra}
            r = run_child(spec, log)
            results[name] = r
            print(f"# {name}: {r['wall_s']:.1f} s wall, step {r['seconds']:.1f} s, peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB", flush=True)
            if name == "ingest":
                stack_disk = dir_bytes(store / "frames") if (store / "frames").exists() else dir_bytes(store)

        n, size = args.frames, args.size
        fits_bytes = sum(dir_bytes(Path(f)) for f in files)
        f32_bytes = n * size * size * 4
        mpx = n * size * size / 1e6
        peak = max(r["peak_rss_mib"] for r in results.values())
        settings = _settings()
        print()
        print(f"Stack: {n} frames of {size}x{size} = {mpx:.0f} Mpx; FITS on disk {fmt_bytes(fits_bytes)} (uint16); "
              f"store frames on disk {fmt_bytes(stack_disk)} (Blosc LZ4); as float32 in memory "
              f"{fmt_bytes(f32_bytes)}")
        print(f"Scheduler: threads, {args.workers} workers. Package defaults: "
              + ", ".join(f"{k} {v}" for k, v in settings.items()))
        integ = results["integrate"]["info"]
        print(f"Integration: effective tile {integ.get('tile')} (frames used {integ.get('frames_used')}), "
              f"statistics {integ['seconds']['statistics']:.1f} s + tiles {integ['seconds']['tiles']:.1f} s; "
              f"rejected low {100 * integ['rejected_low_fraction']:.3f} %, high "
              f"{100 * integ['rejected_high_fraction']:.3f} %")
        reg = results["register"]["info"]
        print(f"Registration: {reg.get('registered')} of {n} frames to reference {reg.get('reference')}, median "
              f"residual {reg.get('median_rms') or float('nan'):.3f} px, worst error against the truth "
              f"{_registration_error(store, workdir / 'frames'):.4f} px")
        print()
        print("| step | wall s (process) | step s | CPU s | frames/s | input Mpx/s | output Mpx/s | baseline RSS MiB "
              "| peak RSS MiB | stack float32 / peak |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in results.items():
            sec = r["seconds"]
            outpx = ""
            if name.startswith("drizzle"):
                oy, ox = r["info"]["shape"]
                outpx = f"{oy * ox / 1e6 / sec:.1f}"
                label = f"{name} ({ox}x{oy} out)"
            elif name == "integrate":
                label = f"integrate (tile {integ.get('tile')})"
            else:
                label = name
            print(f"| {label} | {r['wall_s']:.1f} | {sec:.1f} | {r['cpu_s']:.1f} | {n / sec:.2f} | {mpx / sec:.1f} "
                  f"| {outpx} | {r['baseline_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} "
                  f"| {f32_bytes / MIB / r['peak_rss_mib']:.2f} |")
        wall = sum(r["wall_s"] for r in results.values())
        sec = sum(r["seconds"] for r in results.values())
        cpu = sum(r["cpu_s"] for r in results.values())
        print(f"| **whole run** | {wall:.1f} | {sec:.1f} | {cpu:.1f} | {n / sec:.2f} | {mpx / sec:.1f} | | "
              f"| **{peak:.0f}** "
              f"| **{f32_bytes / MIB / peak:.2f}** |")
        ratio = f32_bytes / MIB / peak
        print()
        print(f"stack (float32) / peak RSS = {ratio:.2f} (target >= 4: {'met' if ratio >= 4 else 'NOT met'}); "
              f"FITS on disk / peak RSS = {fits_bytes / MIB / peak:.2f}; "
              f"store frames on disk / peak RSS = {stack_disk / MIB / peak:.2f}")
        print("outputs: " + ", ".join(f"{p.name} {fmt_bytes(dir_bytes(p))}"
                                      for p in [workdir / "integration.fits"]
                                      + [workdir / f"drizzle_x{s:g}.fits" for s in args.scales]))
        (workdir / "results-outofcore.json").write_text(json.dumps(
            {"frames": n, "size": size, "workers": args.workers, "simulation_s": t_sim, "fits_bytes": fits_bytes,
             "store_frames_bytes": stack_disk, "float32_bytes": f32_bytes, "settings": settings,
             "steps": results}, indent=1, default=str))
    finally:
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"# kept {workdir}")


# ------------------------------------------------------------------------- compare
def _aperture_fluxes(image, xs, ys, r_in, r_bg0, r_bg1):
    """Aperture photometry as the fidelity tests do it (``tests/fidelity.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fidelity import aperture_fluxes

    return aperture_fluxes(image, xs, ys, r_in, r_bg0, r_bg1)


def sanity(a_path: Path, b_path: Path, truth_dir: Path, scale: float) -> dict:
    """Are the two drizzled images the same picture? Correlation where both have
    weight, and aperture photometry of bright isolated unsaturated stars."""
    from astropy.io import fits
    from astropy.table import Table

    with fits.open(a_path) as h:
        a, wa = h[0].data.astype(np.float32), h["WEIGHTS"].data.astype(np.float32)
    with fits.open(b_path) as h:
        b, wb = h[0].data.astype(np.float32), h["WEIGHTS"].data.astype(np.float32)
    both = np.isfinite(a) & np.isfinite(b) & (wa > 0) & (wb > 0)
    corr = float(np.corrcoef(a[both].astype(np.float64), b[both].astype(np.float64))[0, 1])
    stars = Table.read(truth_dir / "stars.ecsv")
    x, y, flux = np.asarray(stars["x"]), np.asarray(stars["y"]), np.asarray(stars["flux"])
    sat = np.asarray(stars["saturated"], bool)
    ny, nx = a.shape[0] / scale, a.shape[1] / scale
    ok = ~sat & (x > 20) & (x < nx - 21) & (y > 20) & (y < ny - 21) & (flux < 6e4)  # peak well below 65535
    # isolated: no other star brighter than 2 % of this one within 8 px
    cand = np.flatnonzero(ok)[np.argsort(-flux[ok])][:400]
    keep = []
    for k in cand:
        d = np.hypot(x - x[k], y - y[k])
        near = (d < 8) & (d > 0) & (flux > 0.02 * flux[k])
        if not near.any():
            keep.append(k)
        if len(keep) == 50:
            break
    keep = np.array(keep, int)
    xo, yo = scale * (x[keep] + 0.5) - 0.5, scale * (y[keep] + 0.5) - 0.5
    r = (4 * scale, 6 * scale, 9 * scale)  # aperture 4 px, sky annulus 6-9 px (reference pixels)
    fa = _aperture_fluxes(a, xo, yo, *r) / scale ** 2  # surface brightness -> flux in input pixels
    fb = _aperture_fluxes(b, xo, yo, *r) / scale ** 2
    good = np.isfinite(fa) & np.isfinite(fb)
    ab = fa[good] / fb[good]
    return {"pixels_compared": int(both.sum()), "correlation": corr, "stars": int(good.sum()),
            "flux_ratio_median": float(np.median(ab)), "flux_ratio_p10": float(np.percentile(ab, 10)),
            "flux_ratio_p90": float(np.percentile(ab, 90)),
            "a_vs_truth_median": float(np.median(fa[good] / flux[keep][good])),
            "b_vs_truth_median": float(np.median(fb[good] / flux[keep][good]))}


def compare(args) -> None:
    workdir, temporary = _workdir(args.workdir, "bench-compare-")
    log = workdir / "children.log"
    siril = None if args.no_siril else shutil.which("siril-cli")
    if siril is None:
        print("# Siril side skipped: " + ("--no-siril" if args.no_siril else
                                          "siril-cli not found (apt-get install siril)"), flush=True)
    try:
        params, files, t_sim = prepare_frames(args, workdir, log)
        a_out, b_out = workdir / "drizzlestack.fits", workdir / "stsci.fits"
        runs = {"a": [], "a0": [], "b": [], "c": []}
        if args.baseline_src:  # its numba cache, outside the timed runs
            run_child({"task": "ds_pipeline", "files": files[:3], "store": str(workdir / "warm0.zarr"),
                       "workers": args.workers, "reference": 0, "integration": None, "scale": 2.0,
                       "output": str(workdir / "warm0.fits")}, log, args.baseline_src)
            shutil.rmtree(workdir / "warm0.zarr", ignore_errors=True)
            (workdir / "warm0.fits").unlink(missing_ok=True)
        for rep in range(args.repeat):
            store = workdir / "stack.zarr"
            shutil.rmtree(store, ignore_errors=True)
            a_out.unlink(missing_ok=True)
            ra = run_child({"task": "ds_pipeline", "files": files, "store": str(store), "workers": args.workers,
                            "reference": 0, "integration": None, "scale": 2.0, "output": str(a_out)}, log)
            print(f"# run {rep + 1} drizzlestack: {ra['wall_s']:.1f} s wall, peak RSS {ra['peak_rss_mib']:.0f} MiB",
                  flush=True)
            runs["a"].append(ra)
            if args.baseline_src:
                store0 = workdir / "stack0.zarr"
                shutil.rmtree(store0, ignore_errors=True)
                r0 = run_child({"task": "ds_pipeline", "files": files, "store": str(store0), "workers": args.workers,
                                "reference": 0, "integration": None, "scale": 2.0,
                                "output": str(workdir / "baseline.fits")}, log, args.baseline_src)
                (workdir / "baseline.fits").unlink(missing_ok=True)
                print(f"# run {rep + 1} drizzlestack from {args.baseline_src}: {r0['wall_s']:.1f} s wall, peak RSS "
                      f"{r0['peak_rss_mib']:.0f} MiB", flush=True)
                runs["a0"].append(r0)
            if not args.no_tools:
                rb = run_child({"task": "tools_pipeline", "files": files, "scale": 2.0, "pixfrac": 0.9,
                                "output": str(b_out)}, log)
                print(f"# run {rep + 1} today's tools: {rb['wall_s']:.1f} s wall, peak RSS "
                      f"{rb['peak_rss_mib']:.0f} MiB", flush=True)
                runs["b"].append(rb)
            if siril:
                rc = run_child({"task": "siril_pipeline", "files": files, "siril": siril,
                                "workdir": str(workdir / "siril")}, log)
                print(f"# run {rep + 1} Siril: {rc['wall_s']:.1f} s wall, peak RSS {rc['peak_rss_mib']:.0f} MiB",
                      flush=True)
                runs["c"].append(rc)
        best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items() if v}
        ra = best["a"]
        n = args.frames
        ny, nx = params["shape"]
        f32 = n * ny * nx * 4 / MIB
        print()
        print(f"{n} frames of {nx}x{ny} ({f32:.0f} MiB as float32), scale 2, pixfrac 0.9, square kernel; "
              f"{'fastest of ' + str(args.repeat) + ' alternating runs' if args.repeat > 1 else 'one run'} each")
        print()
        print("| | wall s (process) | pipeline s | CPU s | peak RSS MiB | baseline RSS MiB | wall / drizzlestack "
              "| peak RSS / drizzlestack |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        labels = {"a": f"drizzlestack (threads, {args.workers} workers)",
                  "a0": f"drizzlestack from {args.baseline_src} (same settings)",
                  "b": "astropy + astroalign + sigma_clip + STScI drizzle (1 thread)",
                  "c": "Siril 1.x (`siril-cli -s`, its own threads)"}
        for k, r in best.items():
            print(f"| {labels[k]} | {r['wall_s']:.1f} | {r['seconds']:.1f} | {r['cpu_s'] if k != 'c' else r['siril_cpu_s']:.1f} "
                  f"| {r['peak_rss_mib']:.0f} | {r['baseline_rss_mib']:.0f} | **{r['wall_s'] / ra['wall_s']:.2f}x** "
                  f"| {r['peak_rss_mib'] / ra['peak_rss_mib']:.2f}x |")
        print()
        for k in ("a", "a0"):
            if k not in best:
                continue
            r = best[k]
            name = "drizzlestack" if k == "a" else f"drizzlestack from {args.baseline_src}"
            print(f"{name} steps (s): " + ", ".join(f"{s} {v['seconds']:.1f}" for s, v in r["steps"].items())
                  + f"; imports {r['import_s']:.1f}; integrate: statistics "
                  f"{r['steps']['integrate']['info']['seconds']['statistics']:.1f} s, tiles "
                  f"{r['steps']['integrate']['info']['seconds']['tiles']:.1f} s")
        ia = ra["steps"]["integrate"]["info"]
        chk = {}
        if "b" in best:
            rb = best["b"]
            print("today's tools stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in rb["stages"].items())
                  + f"; imports {rb['import_s']:.1f}")
            print(f"rejected samples: drizzlestack winsorized low {100 * ia['rejected_low_fraction']:.3f} % + high "
                  f"{100 * ia['rejected_high_fraction']:.3f} %; sigma_clip {100 * rb['clip_fraction']:.3f} %")
            chk = sanity(a_out, b_out, workdir / "frames", 2.0)
            ok = chk["correlation"] > 0.9 and abs(chk["flux_ratio_median"] - 1) < 0.03
            print(f"sanity: correlation {chk['correlation']:.4f} over {chk['pixels_compared']} px with weight in both; "
                  f"{chk['stars']} bright isolated stars, flux drizzlestack / STScI median "
                  f"{chk['flux_ratio_median']:.4f} (10-90 %: {chk['flux_ratio_p10']:.4f}-{chk['flux_ratio_p90']:.4f}), "
                  f"against the truth drizzlestack {chk['a_vs_truth_median']:.4f}, STScI "
                  f"{chk['b_vs_truth_median']:.4f} -> {'comparable images' if ok else 'NOT comparable: check the outputs'}")
        if "c" in best:
            sc = siril_sanity(Path(best["c"]["output"]), a_out)
            chk["siril"] = sc
            print(f"sanity (Siril): output {sc['shape'][1]}x{sc['shape'][0]}, correlation with drizzlestack "
                  f"{sc['correlation']:.4f} (best shift {sc['shift']} output px, central half)")
        (workdir / "results-compare.json").write_text(json.dumps(
            {"frames": n, "shape": [ny, nx], "workers": args.workers, "simulation_s": t_sim, "runs": runs,
             "sanity": chk}, indent=1, default=str))
    finally:
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"# kept {workdir}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        child_main(json.loads(argv[1]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for name, frames, size in (("outofcore", 64, 4096), ("compare", 16, 2048)):
        p = sub.add_parser(name)
        p.add_argument("--frames", type=int, default=frames)
        p.add_argument("--size", type=int, default=size, help="frame width (and height unless --height) (px)")
        p.add_argument("--workers", type=int, default=2, help="threads of the threaded scheduler (default 2)")
        p.add_argument("--fwhm", type=float, default=1.4, help="star FWHM in px (default 1.4: undersampled)")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--workdir", default=None,
                       help="where frames, store and outputs go (kept; frames reused when the parameters match); "
                            "default: a temporary directory, deleted at the end")
        p.add_argument("--keep", action="store_true", help="keep the temporary directory")
        p.add_argument("--no-warmup", action="store_true", help="skip the numba-cache warm-up run")
        if name == "outofcore":
            p.add_argument("--scales", type=float, nargs="+", default=[2.0, 3.0])
        else:
            p.add_argument("--repeat", type=int, default=1, help="alternate the sides N times, keep the fastest")
            p.add_argument("--height", type=int, default=None, help="frame height (px; default: --size)")
            p.add_argument("--no-siril", action="store_true", help="leave Siril out")
            p.add_argument("--no-tools", action="store_true", help="leave the astroalign/STScI script out")
            p.add_argument("--baseline-src", default=None,
                           help="also run drizzlestack from this source tree (e.g. an older commit extracted with "
                                "`git archive COMMIT drizzlestack | tar -x -C DIR`), alternating with the current one")
    args = ap.parse_args(argv)
    outofcore(args) if args.mode == "outofcore" else compare(args)


if __name__ == "__main__":
    main()
