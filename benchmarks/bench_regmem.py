"""Peak memory of the registration step alone, this tree against another source tree.

    python benchmarks/bench_regmem.py --frames 8 --size 4096 --baseline-src DIR [DIR ...] [--repeat 2] [--workdir DIR]

Simulates (or reuses) ``--frames`` undersampled frames as ``bench_pipeline.py`` does
(``sim_params``: FWHM 1.4 px, ~400 stars, cosmic rays and hot pixels per 512x512 px,
dithers, a trail, saturated stars), ingests them once, and then runs
``drizzlestack register STORE --force --reference 0 --scheduler threads --workers N``
(the command-line entry point, ``drizzlestack.cli.main``) in a *fresh child process*
per run, alternating between this tree and each ``--baseline-src`` (e.g. main's
``drizzlestack`` extracted with ``git archive main drizzlestack | tar -x -C DIR``;
each side is named after its directory).
Each child reports its own peak RSS (``VmHWM``, read at its end: the child does
nothing but the registration) and its RSS after importing the command line. The star
tables and transforms of every run are kept, so the two trees' outputs are compared
(identical or not) and each is checked against the simulator's truth (the worst RMS
distance between the fitted and the true frame -> reference mapping at the corners
and centre, and the median registration residual).

With ``--detect-speed``, also times ``detect_stars`` alone in one process, the last
baseline's (loaded under another package name, given the whole frame read from the
store, as its register did) and this tree's (given ``StackStore.frame_rows``, as its
register does) alternated on every frame, ``--repeat`` times; the stars are checked equal.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(HERE.parent))

from bench_pipeline import _registration_error, sim_params, simulate_frames  # noqa: E402


def _vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> None:
    """Run the registration command and report this process's own memory."""
    from drizzlestack import cli

    base = _vm("VmRSS")
    t0 = time.perf_counter()
    argv = ["register", spec["store"], "--force", "--reference", "0", "--scheduler", "threads",
            "--workers", str(spec["workers"])]
    with open(os.devnull, "w") as null:
        stdout, sys.stdout = sys.stdout, null
        try:
            rc = cli.main(argv)
        finally:
            sys.stdout = stdout
    seconds = time.perf_counter() - t0
    import drizzlestack
    from drizzlestack.store import open_stack

    stack = open_stack(spec["store"])
    np.savez(spec["out"], stars=stack["stars"].values, transform=stack["transform"].values,
             rms=stack["registration_rms"].values)
    print(json.dumps({"rc": rc, "seconds": seconds, "baseline_rss_mib": base, "peak_rss_mib": _vm("VmHWM"),
                      "source": str(Path(drizzlestack.__file__).parent.parent)}))


def detect_speed(store: Path, baseline_src: str, repeat: int) -> None:
    """Seconds per frame of the baseline's and this tree's ``detect_stars``, alternated."""
    import importlib.util

    init = Path(baseline_src) / "drizzlestack" / "__init__.py"
    spec = importlib.util.spec_from_file_location("ds_baseline", init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ds_baseline"] = mod
    spec.loader.exec_module(mod)
    from ds_baseline.registration.stars import detect_stars as old_detect

    from drizzlestack.registration.stars import detect_stars as new_detect
    from drizzlestack.store import StackStore

    st = StackStore.open(store, mode="r")
    sat = [float(v) for v in st.group["saturation"][:st.n_frames]]
    old_detect(st.frame(0)[:600], saturation=sat[0])  # numba caches loaded, not timed
    new_detect(st.frame(0)[:600], saturation=sat[0])
    t_old, t_new = [], []
    for _ in range(repeat):
        for i in range(st.n_frames):
            t0 = time.perf_counter()
            a = old_detect(st.frame(i), saturation=sat[i])
            t_old.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = new_detect(st.frame_rows(i), saturation=sat[i])
            t_new.append(time.perf_counter() - t0)
            if not np.array_equal(a.table, b.table):
                raise SystemExit(f"frame {i}: the two trees' stars differ")
    print(f"detect_stars per frame (median of {len(t_old)}): {Path(baseline_src).name} {np.median(t_old):.3f} s "
          f"(whole frame read), this tree {np.median(t_new):.3f} s (bands); this tree / baseline "
          f"{np.median(t_new) / np.median(t_old):.2f}; stars identical")


def run(spec: dict, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(HERE), "_child", json.dumps(spec)], env=env, check=True,
                         capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        child(json.loads(argv[1]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--fwhm", type=float, default=1.4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side, alternated")
    ap.add_argument("--baseline-src", nargs="*", default=[],
                    help="source trees whose drizzlestack are the 'before' sides (named after their directory)")
    ap.add_argument("--workdir", default=None, help="frames and store (kept, reused); default: a temporary one")
    ap.add_argument("--detect-speed", action="store_true",
                    help="also time detect_stars alone against the last baseline, in this process")
    ap.add_argument("--no-register", action="store_true", help="skip the register runs (with --detect-speed)")
    args = ap.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-regmem-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    params = sim_params(args.frames, args.size, args.fwhm, args.seed)
    files, t_sim, reused = simulate_frames(workdir / "frames", params)
    store = workdir / "stack.zarr"
    marker = workdir / "ingested.json"
    if not (store.exists() and marker.exists() and json.loads(marker.read_text()) == files):
        shutil.rmtree(store, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "drizzlestack.cli", "ingest", str(store), *files, "--no-progress"],
                       check=True, capture_output=True)
        marker.write_text(json.dumps(files))
    if args.detect_speed and args.baseline_src:
        detect_speed(store, args.baseline_src[-1], args.repeat)
    if args.no_register:
        return
    sides = [(Path(src).resolve().name, str(Path(src).resolve())) for src in args.baseline_src]
    sides.append(("this tree", str(HERE.parent.parent)))
    # warm numba's cache for both sides (not counted)
    for name, src in sides:
        run({"store": str(store), "workers": args.workers, "out": str(workdir / "warm.npz")}, src)
    results: dict[str, list] = {name: [] for name, _ in sides}
    outputs = {}
    for r in range(args.repeat):
        for name, src in sides:
            out = workdir / f"{name.replace(' ', '_')}.npz"
            res = run({"store": str(store), "workers": args.workers, "out": str(out)}, src)
            res["truth_error_px"] = _registration_error(store, workdir / "frames")
            z = np.load(out)
            res["median_rms_px"] = float(np.nanmedian(z["rms"][z["rms"] > 0]))
            results[name].append(res)
            outputs[name] = {k: z[k] for k in z.files}
            print(f"# {name} run {r + 1}: peak RSS {res['peak_rss_mib']:.0f} MiB (after imports "
                  f"{res['baseline_rss_mib']:.0f}), step {res['seconds']:.1f} s, worst error vs truth "
                  f"{res['truth_error_px']:.4f} px, median residual {res['median_rms_px']:.4f} px "
                  f"[{res['source']}]", flush=True)
    print(f"\n{args.frames} frames of {args.size}x{args.size}, threads x{args.workers}")
    print("| side | peak RSS MiB (runs) | RSS after imports MiB | step s (loaded machine) | worst error vs truth px "
          "| median residual px |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rs in results.items():
        peaks = " / ".join(f"{r['peak_rss_mib']:.0f}" for r in rs)
        secs = " / ".join(f"{r['seconds']:.1f}" for r in rs)
        print(f"| {name} | {peaks} | {rs[0]['baseline_rss_mib']:.0f} | {secs} | {rs[-1]['truth_error_px']:.4f} "
              f"| {rs[-1]['median_rms_px']:.4f} |")
    b = outputs["this tree"]
    for name, a in outputs.items():
        if name == "this tree":
            continue
        for key in ("stars", "transform"):
            same = a[key].shape == b[key].shape and np.array_equal(a[key], b[key], equal_nan=True)
            diff = "" if same or a[key].shape != b[key].shape else \
                f" (largest difference {np.nanmax(np.abs(a[key] - b[key])):.3g})"
            print(f"{key}, {name} vs this tree: {'identical' if same else 'DIFFERENT'}{diff}")
    print(f"# workdir {workdir}")


if __name__ == "__main__":
    main()
