"""Colour (CFA) drizzle against a grey drizzle of the same frames, side by side.

    python benchmarks/bench_colour.py ratio  [--frames 8 --size 1024 --repeat 3] [--step integrate] [--stars]
    python benchmarks/bench_colour.py phases [--frames 6 --size 1024 --repeat 5]
    python benchmarks/bench_colour.py m27    (the real frames in ../shared/data/m27-cfa)

``ratio``: two stores hold the same synthetic mosaics, one declared RGGB and one ingested
as grey, with the same known transforms; their drizzles (scale 2, pixfrac 0.9, square
kernel, one worker) are timed alternately in one process after a warm-up, and the
ratio of the medians is reported (a ratio, so a busy machine affects both alike), of
wall time and of the process's CPU time.
``--stars``: simulated star fields instead (``drizzlestack.simulate``, registered by
drizzlestack; colour with blue 0.3 px from green), so that the colour drizzle shifts its
red and blue drops by the measured channel offsets, and the measurement itself (paid
by the first drizzle of a registration) is timed apart.
``--step integrate`` times the integration instead (default winsorized rejection with
the own-pixel outlier pass; colour per channel).

``phases``: the same two drizzles, alternating, with the driver's phases wrapped and
timed in the thread that runs them (``time.thread_time``, CPU seconds of that thread,
and wall seconds): output window, frame reads, channel index, pixmap, the kernel, the
coverage count, finalize, chunk encode + write, and the rest of the tile task. Medians
over the repeats, colour and grey side by side, and their difference.

``m27``: ingests the six M27 frames as colour and as grey, registers them, drizzles
both, and reports what a checkerboard would show: the power at the input grid's
Nyquist frequency over its neighbourhood, per channel (colour) and for the grey
drizzle of the mosaic; the two greens' statistics; the channels' star centroids; and a
comparison with debayer-then-drizzle (bilinear debayer per channel, each plane
drizzled as grey): FWHM of the stars and noise of the background.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
M27 = ROOT.parent / "shared" / "data" / "m27-cfa"


def make_store(path: Path, n_frames: int, size: int, pattern: str, seed: int = 0) -> None:
    from drizzlestack.geometry import similarity
    from drizzlestack.store import StackStore

    rng = np.random.default_rng(seed)
    st = StackStore.create(path, (size, size), chunk=512)
    transforms = []
    c = ((size - 1) / 2, (size - 1) / 2)
    for i in range(n_frames):
        st.append_frame(rng.normal(100, 10, (size, size)).astype(np.float32), path=f"/synthetic/{i}.fits",
                        exptime=60.0, status="ok", saturation=np.inf, cfa_pattern=pattern)
        transforms.append(np.eye(3) if i == 0 else similarity(1.0, rng.uniform(-0.5, 0.5),
                                                               *rng.uniform(-5, 5, 2), center=c))
    st.write_variable("transform", np.array(transforms), ("frame", "transform_row", "transform_col"))
    st.attrs["reference"] = 0
    st.begin_step("register", {"synthetic": True})
    st.end_step("register")


def make_sky_store(path: Path, n_frames: int, size: int, pattern: str, seed: int = 3) -> None:
    """Simulated frames of a star field (``drizzlestack.simulate``; colour with blue 0.3 px
    from green on the sky), ingested and registered by drizzlestack: the colour drizzle
    then measures and removes the channels' offsets, as on real data."""
    import drizzlestack as ds
    from drizzlestack.simulate import simulate

    truth = simulate(path.with_suffix(".frames"), n_frames=n_frames, shape=(size, size), fwhm=2.0, n_stars=1500,
                     seed=seed, cfa=pattern or None, dispersion=(0.0, 0.3) if pattern else (0.0, 0.0))
    ds.ingest(truth.files, path)
    ds.register(path)


def ratio(args):
    import drizzlestack as ds
    from drizzlestack.parallel import scheduler

    tmp = Path(tempfile.mkdtemp(prefix="bench-colour-"))
    try:
        warnings.simplefilter("ignore")
        make = make_sky_store if args.stars else make_store
        make(tmp / "colour.zarr", args.frames, args.size, "RGGB")
        make(tmp / "grey.zarr", args.frames, args.size, "")
        times = {"colour": [], "grey": []}
        cpu = {"colour": [], "grey": []}
        def step(path):
            if args.step == "integrate":
                ds.integrate(path, force=True)
            else:
                ds.drizzle(path, scale=2.0, pixfrac=0.9, tile=1024, output=None, force=True)

        with scheduler(scheduler="threads", workers=1, progress=False):
            for name in ("colour", "grey"):  # warm-up (numba cache, file cache)
                step(tmp / f"{name}.zarr")
            for _ in range(args.repeat):
                for name in ("colour", "grey"):
                    t0, c0 = time.perf_counter(), time.process_time()
                    step(tmp / f"{name}.zarr")
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        if args.stars and args.step == "drizzle":
            # What the first colour drizzle of a registration pays once more (later ones
            # reuse the offsets kept in the store): measuring the channels' offsets.
            from drizzlestack.channel_alignment import measure_channel_offsets

            m = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                offsets = measure_channel_offsets(tmp / "colour.zarr")
                m.append(time.perf_counter() - t0)
            print(f"channel offsets (measured once per registration): {np.round(m, 3)} s; "
                  f"B - G {np.round(offsets.offset[2], 3)} px (simulated 0, 0.3)")
        c, g = np.median(times["colour"]), np.median(times["grey"])
        what = "integrate (winsorized)" if args.step == "integrate" else "drizzle: scale 2, pixfrac 0.9, square"
        print(f"{args.frames} frames of {args.size} x {args.size}, {what}, 1 worker")
        print(f"colour: {np.round(times['colour'], 2)} s   grey: {np.round(times['grey'], 2)} s")
        print(f"colour / grey = {c / g:.2f} (medians)")
        # CPU seconds of the whole process (every thread): less at the mercy of other
        # processes on a shared machine than wall time, though not immune (shared caches)
        cc, cg = np.median(cpu["colour"]), np.median(cpu["grey"])
        print(f"process CPU: colour {np.round(cpu['colour'], 2)} s   grey {np.round(cpu['grey'], 2)} s   "
              f"colour / grey = {cc / cg:.2f} (medians)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_PHASES = {
    # phase: (module attribute path, attribute)
    "window": ("drizzlestack.drizzle.driver", "input_window"),
    "read": ("drizzlestack.chunkio", "DirectArray.read"),
    "channel index": ("drizzlestack.drizzle.driver", "_cfa.channel_index"),
    "pixmap": ("drizzlestack.drizzle.kernels", "homography_grid"),
    "kernel": ("drizzlestack.drizzle.kernels", "square_kernel"),
    "coverage count": ("drizzlestack.drizzle.kernels", "add_touched"),
    "accumulate (all)": ("drizzlestack.drizzle.array", "accumulate"),
    "finalize": ("drizzlestack.drizzle.array", "finalize"),
    "write (encode + file)": ("drizzlestack.chunkio", "DirectArray._write_chunk"),
    "store write (all)": ("drizzlestack.chunkio", "DirectArray.__setitem__"),
    "tile task": ("drizzlestack.drizzle.driver", "_tile_task"),
}


def _wrap_phases(totals):
    """Wrap every phase's function to add its thread CPU and wall time into ``totals``;
    returns the undo list."""
    import importlib
    import threading

    undo = []
    depth = threading.local()
    for phase, (module, attr) in _PHASES.items():
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        def wrapped(*a, _f=original, _p=phase, **k):
            # nested calls of the same phase (a colour finalize calls itself) count once
            key = "in_" + _p
            if getattr(depth, key, False):
                return _f(*a, **k)
            setattr(depth, key, True)
            c0, w0 = time.thread_time(), time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                totals[_p][0] += time.thread_time() - c0
                totals[_p][1] += time.perf_counter() - w0
                setattr(depth, key, False)

        setattr(owner, name, wrapped)
        undo.append((owner, name, original))
    return undo


def phases(args):
    import drizzlestack as ds
    from drizzlestack.parallel import scheduler

    tmp = Path(tempfile.mkdtemp(prefix="bench-colour-"))
    try:
        make_store(tmp / "colour.zarr", args.frames, args.size, "RGGB")
        make_store(tmp / "grey.zarr", args.frames, args.size, "")
        warnings.simplefilter("ignore")
        runs = {"colour": [], "grey": []}
        with scheduler(scheduler="threads", workers=1, progress=False):
            for name in ("colour", "grey"):  # warm-up
                ds.drizzle(tmp / f"{name}.zarr", scale=2.0, pixfrac=0.9, tile=1024, output=None, force=True)
            for _ in range(args.repeat):
                for name in ("colour", "grey"):
                    totals = {p: [0.0, 0.0] for p in _PHASES}
                    undo = _wrap_phases(totals)
                    try:
                        t0 = time.perf_counter()
                        ds.drizzle(tmp / f"{name}.zarr", scale=2.0, pixfrac=0.9, tile=1024, output=None,
                                   force=True)
                        totals["drizzle (whole call)"] = [np.nan, time.perf_counter() - t0]
                    finally:
                        for owner, attr, original in reversed(undo):
                            setattr(owner, attr, original)
                    runs[name].append(totals)
        print(f"{args.frames} frames of {args.size} x {args.size}, scale 2, pixfrac 0.9, square, tile 1024, "
              f"1 worker; medians of {args.repeat} alternating runs; thread CPU s (wall s)")
        print(f"{'phase':24s} {'colour':>16s} {'grey':>16s} {'colour - grey':>16s} {'ratio':>6s}")
        for p in runs["colour"][0]:
            c = [np.median([r[p][k] for r in runs["colour"]]) for k in (0, 1)]
            g = [np.median([r[p][k] for r in runs["grey"]]) for k in (0, 1)]
            print(f"{p:24s} {c[0]:7.3f} ({c[1]:6.3f}) {g[0]:7.3f} ({g[1]:6.3f}) "
                  f"{c[0] - g[0]:7.3f} ({c[1] - g[1]:6.3f}) {c[1] / g[1] if g[1] else np.nan:6.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def nyquist_ratio(image, scale=2.0):
    """The tests' Bayer-grid statistic (``tests/fidelity.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fidelity import nyquist_ratio as ratio

    return ratio(image, scale)


def _stars(image, scale, min_fwhm=4.0):
    """Unflagged stars (x, y, flux, fwhm, peak, snr, flags) with a FWHM of at least
    ``min_fwhm`` output pixels: the frames are not dark-subtracted, and a hot pixel's
    drop looks like a sharp star."""
    from drizzlestack import cfa
    from drizzlestack.registration.stars import detect_stars

    # Dry pixels (no sample of that colour) filled with the mean of their neighbours,
    # or every star touching one would be flagged as truncated.
    image = np.asarray(image, dtype=np.float64)
    filled = cfa._normalized_convolution(image, np.ones(image.shape, bool), np.ones((3, 3)))
    image = np.where(np.isfinite(image), image, filled)
    sl = detect_stars(image.astype(np.float32), threshold=10.0, max_stars=2000)
    t = sl.table
    return t[(t[:, 6] == 0) & (t[:, 3] >= min_fwhm) & (t[:, 5] > 15)] if len(t) else t


def _offsets(label, tables):
    """Median R - G and B - G centroid offsets of matched stars (reference px)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(tables[1][:, :2])
    for c in (0, 2):
        d, i = tree.query(tables[c][:, :2])
        ok = d < 1.5
        diff = (tables[c][ok, :2] - tables[1][i[ok], :2]) / 2.0
        off = np.median(diff, axis=0)
        err = 1.4826 * np.median(np.abs(diff - off), axis=0) / np.sqrt(max(ok.sum(), 1))
        print(f"{label}: {'RGB'[c]} - G centroid offset (median) ({off[0]:+.3f}, {off[1]:+.3f}) +- "
              f"({err[0]:.3f}, {err[1]:.3f}) reference px over {ok.sum()} stars")


def _fitted_offsets(label, planes, table, scale=2.0):
    """R - G and B - G offsets (reference px) from pixel-integrated Gaussian fits to each
    drizzled plane at the stars found on green (``tests/fidelity.py``; every star found
    on G, not only those each colour detects on its own: red's hot pixels leave few
    clean red detections)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fidelity import channel_offsets

    for c, (off, err, n) in channel_offsets(planes, table[:, :2], np.median(table[:, 3]) / scale, scale).items():
        print(f"{label}: {'RGB'[c]} - G offset (Gaussian fits at G's stars) ({off[0]:+.3f}, {off[1]:+.3f}) "
              f"+- ({err[0]:.3f}, {err[1]:.3f}) reference px over {n} stars")


def m27(args):
    import drizzlestack as ds
    from drizzlestack import cfa
    from drizzlestack.drizzle import drizzle_array  # noqa: F401  (documented API used below via ds)

    files = sorted(M27.glob("*.fits.gz"))
    if not files:
        print(f"no frames in {M27}")
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-m27-"))
    warnings.simplefilter("ignore")
    try:
        ds.ingest(files, tmp / "colour.zarr")
        ds.register(tmp / "colour.zarr")
        ds.ingest(files, tmp / "grey.zarr", cfa="grey")
        ds.register(tmp / "grey.zarr")
        times = {"colour": [], "grey": []}
        for k in range(3):  # the first pair warms up (numba cache, file cache)
            for name in ("colour", "grey"):
                t0 = time.perf_counter()
                result = ds.drizzle(tmp / f"{name}.zarr", scale=2.0, pixfrac=0.9, output=None,
                                    force=True)["drizzle"].values
                if k:
                    times[name].append(time.perf_counter() - t0)
                if name == "colour":
                    col = result
                else:
                    grey = result
        tc, tg = np.median(times["colour"]), np.median(times["grey"])
        stack = ds.open_stack(tmp / "colour.zarr")
        print(f"M27: {len(files)} frames {stack.frames.shape[1:]}, pattern {stack.cfa_pattern.values[0]}, "
              f"statuses {set(stack.status.values)}")
        print(f"drizzle time colour {np.round(times['colour'], 2)} s, grey {np.round(times['grey'], 2)} s "
              f"(ratio of medians {tc / tg:.2f}, alternating in one process)")
        crop = (slice(100, -100), slice(100, -100))
        print("Nyquist power / floor: grey drizzle of the mosaic "
              f"{nyquist_ratio(grey[crop]):.0f}; colour R, G, B "
              + ", ".join(f"{nyquist_ratio(col[c][crop]):.2f}" for c in range(3)))
        # the two greens of the raw mosaics
        frame = stack.frames[0].values
        p = stack.cfa_pattern.values[0]
        idx = cfa.channel_index(p, frame.shape)
        g_positions = [(dy, dx) for dy in (0, 1) for dx in (0, 1) if idx[dy, dx] == 1]
        g1, g2 = (frame[dy::2, dx::2] for dy, dx in g_positions)
        print(f"greens of frame 0: median {np.median(g1):.1f} / {np.median(g2):.1f}, "
              f"MAD {np.median(np.abs(g1 - np.median(g1))):.2f} / {np.median(np.abs(g2 - np.median(g2))):.2f}")
        # channel centroids: stars detected on G, centroids in R and B near them
        tables = [_stars(col[c], 2.0) for c in range(3)]
        _offsets("colour drizzle", tables)
        _fitted_offsets("colour drizzle", col, tables[1])
        from drizzlestack.store import StackStore as _Store

        removed = (_Store.open(tmp / "colour.zarr").step("drizzle")["summary"] or {}).get("channel_offsets")
        print("channel offsets measured on the raw samples and removed (reference px): "
              + (", ".join(f"{'RGB'[c]} ({removed['offset_rgb'][c][0]:+.3f}, {removed['offset_rgb'][c][1]:+.3f}) +- "
                           f"({removed['error_rgb'][c][0]:.3f}, {removed['error_rgb'][c][1]:.3f})" for c in (0, 2))
                 if removed else "none"))
        unaligned = ds.drizzle(tmp / "colour.zarr", scale=2.0, pixfrac=0.9, output=None, force=True,
                               align_channels=False)["drizzle"].values
        _fitted_offsets("colour drizzle, align_channels=False", unaligned, tables[1])
        fwhm = [np.median(t[:, 3]) / 2.0 for t in tables]
        print("colour drizzle FWHM (reference px) R, G, B: " + ", ".join(f"{f:.2f}" for f in fwhm))
        # debayer-then-drizzle: each frame demosaiced (bilinear) into three planes,
        # each plane drizzled as a grey store with the colour registration
        deb = []
        for c in range(3):
            st_path = tmp / f"deb{c}.zarr"
            from drizzlestack.store import StackStore

            src = StackStore.open(tmp / "colour.zarr", mode="r")
            st = StackStore.create(st_path, src.frame_shape, chunk=512)
            for i in range(src.n_frames):
                est = cfa.channel_estimate(src.frame(i), p, c).astype(np.float32)
                st.append_frame(est, path=f"/deb/{c}/{i}", exptime=float(stack.exptime.values[i]), status="ok",
                                saturation=float(stack.saturation.values[i]))
            st.write_variable("transform", stack.transform.values, ("frame", "transform_row", "transform_col"))
            st.attrs["reference"] = stack.attrs["reference"]
            st.begin_step("register", {"copied": True})
            st.end_step("register")
            deb.append(ds.drizzle(st_path, scale=2.0, pixfrac=0.9, output=None)["drizzle"].values)
        dt = [_stars(deb[c], 2.0) for c in range(3)]
        _offsets("debayer-then-drizzle", dt)
        _fitted_offsets("debayer-then-drizzle", deb, dt[1])
        print("debayer-then-drizzle FWHM (reference px) R, G, B: "
              + ", ".join(f"{np.median(t[:, 3]) / 2.0:.2f}" for t in dt))

        def bg_noise(img):
            v = img[crop]
            v = v[np.isfinite(v)]
            med = np.median(v)
            return 1.4826 * np.median(np.abs(v - med))

        print("background noise (MAD sigma, ADU) colour drizzle R, G, B: "
              + ", ".join(f"{bg_noise(col[c]):.2f}" for c in range(3))
              + "; debayer-then-drizzle: " + ", ".join(f"{bg_noise(deb[c]):.2f}" for c in range(3)))
        print("Nyquist power / floor of debayer-then-drizzle R, G, B: "
              + ", ".join(f"{nyquist_ratio(deb[c][crop]):.2f}" for c in range(3)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("ratio")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--step", choices=("drizzle", "integrate"), default="drizzle")
    p.add_argument("--stars", action="store_true",
                   help="simulated star fields registered by drizzlestack (the colour drizzle aligns its channels) "
                        "instead of synthetic noise with known transforms")
    p = sub.add_parser("phases")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=5)
    sub.add_parser("m27")
    args = parser.parse_args()
    {"ratio": ratio, "phases": phases, "m27": m27}[args.what](args)


if __name__ == "__main__":
    main()
