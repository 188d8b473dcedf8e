"""The advisor's cost against a full drizzle of the same store, side by side in one run.

    python benchmarks/bench_advise.py [--workdir DIR] [--repeat 3]

Two stores: (a) the real frames ``../shared/data/hatp32`` (40 frames of 650x500),
ingested, registered and integrated with the package defaults; (b) a simulated field
of 12 frames of 1024x1024 (FWHM 1.5 px, ``drizzlestack.simulate`` defaults otherwise),
likewise. On each, interleaved ``--repeat`` times in this one process (numba kernels
warmed up first): ``ds.advise(store)`` and ``ds.drizzle(store)`` with the package
defaults (scale 2, pixfrac 0.9, square kernel, rejection flags, FITS output). The
figure that matters is the ratio of the medians: the machine is shared.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import drizzlestack as ds
from drizzlestack import DrizzlestackWarning

ROOT = Path(__file__).resolve().parents[1]


def _prepare(store: Path, files) -> None:
    if (store / "integration").exists():
        return
    ds.ingest(files, store)
    ds.register(store)
    ds.integrate(store, output=None)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-advise-"))
    work.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore", DrizzlestackWarning)
    cases = []
    hatp32 = sorted((ROOT.parent / "shared" / "data" / "hatp32").glob("*.fits.gz"))
    if hatp32:
        cases.append(("hatp32, 40 frames of 650x500", work / "hatp32.zarr", hatp32))
    sim_dir = work / "sim"
    if not (sim_dir / "truth.json").exists():
        ds.simulate(sim_dir, n_frames=12, shape=(1024, 1024), n_stars=1600, seed=2)
    sim_files = sorted(sim_dir.glob("frame_*.fits"))
    cases.append(("simulated, 12 frames of 1024x1024", work / "sim.zarr", sim_files))
    for label, store, files in cases:
        _prepare(store, files)
        ds.advise(store)  # warm-up: numba kernels from the cache, the store's metadata
        advise_s, drizzle_s = [], []
        for _ in range(args.repeat):
            advise_s.append(_time(lambda: ds.advise(store)))
            drizzle_s.append(_time(lambda: ds.drizzle(store, output=work / "drizzle.fits", overwrite=True)))
        a, d = float(np.median(advise_s)), float(np.median(drizzle_s))
        advice = ds.advise(store)
        print(f"{label}: advise {a:.2f} s, full drizzle {d:.2f} s (median of {args.repeat}), "
              f"ratio {a / d:.1%}; advice: helps={advice['drizzle_helps']}, scale {advice['scale']:g}, "
              f"pixfrac {advice['pixfrac']:g}, FWHM {advice['fwhm']:.2f} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
