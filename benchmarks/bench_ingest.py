"""Ingest throughput and memory: 2048x2048 uint16 frames (BZERO 32768, as cameras write).

Each store size runs in a fresh subprocess that reports its own peak RSS (``VmHWM``, see _rss.py):
flat peak memory as frames are added shows that ingest holds a bounded number of frames
(the one being read and the one being written).

    python benchmarks/bench_ingest.py [--frames 4 8 16] [--size 2048] [--gzip]
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


def make_frames(directory: Path, n: int, size: int, gz: bool) -> list[Path]:
    from astropy.io import fits

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        data = rng.poisson(800, (size, size)).astype(np.uint16)
        p = directory / (f"f{i:03d}.fits" + (".gz" if gz else ""))
        fits.PrimaryHDU(data).writeto(p, overwrite=True)
        paths.append(p)
    return paths


def child(paths: list[str], store: str) -> None:
    from drizzlestack.ingest import ingest_files

    t0 = time.perf_counter()
    report = ingest_files(paths, store)
    dt = time.perf_counter() - t0
    rss = peak_rss_mib()  # this child's own peak
    print(json.dumps({"frames": len(report.added), "seconds": dt, "peak_rss_mib": rss}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--gzip", action="store_true")
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        child(args.child[1:], args.child[0])
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        paths = make_frames(tmp, max(args.frames), args.size, args.gzip)
        # warm up imports and the filesystem cache once
        subprocess.run([sys.executable, __file__, "--child", str(tmp / "warm.zarr"), str(paths[0])],
                       check=True, capture_output=True)
        mb_per_frame = args.size * args.size * 2 / 1e6
        print(f"{'frames':>6} {'seconds':>8} {'frames/s':>9} {'MB/s (uint16 in)':>17} {'peak RSS MiB':>13}")
        for n in args.frames:
            store = tmp / f"s{n}.zarr"
            out = subprocess.run([sys.executable, __file__, "--child", str(store), *map(str, paths[:n])],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{n:>6} {r['seconds']:>8.2f} {n / r['seconds']:>9.2f} {n * mb_per_frame / r['seconds']:>17.1f}"
                  f" {r['peak_rss_mib']:>13.0f}")
            shutil.rmtree(store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
