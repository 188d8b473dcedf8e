"""Orchestration of the steps: the demo (and, later, ``drizzlestack run``)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .info import info_table
from .parallel import SchedulerOptions, scheduler


def demo(directory="drizzlestack-demo", scheduler_options: SchedulerOptions | None = None, frames: int = 12,
         size: int = 384, seed: int = 1, **_ignored) -> int:
    """Simulate a small dithered, undersampled field and run the pipeline on it.

    Writes ``DIRECTORY/frames/*.fits`` (with the truth) and ``DIRECTORY/stack.zarr``,
    then prints the store summary. Returns the process exit status.
    """
    from .ingest import ingest_files
    from .simulate import simulate

    opts = scheduler_options or _ignored.get("scheduler") or SchedulerOptions()
    root = Path(directory)
    frames_dir, store = root / "frames", root / "stack.zarr"
    if store.exists():
        shutil.rmtree(store)  # the demo always starts afresh; it only ever deletes its own store
    t0 = time.perf_counter()
    print(f"[1] simulating {frames} dithered frames of {size}x{size} px (FWHM 1.5 px) in {frames_dir}")
    truth = simulate(frames_dir, n_frames=frames, shape=(size, size), fwhm=1.5, seed=seed,
                     n_stars=int(400 * (size / 512) ** 2) + 50)
    with scheduler(opts):
        print(f"[2] ingesting into {store}")
        report = ingest_files(truth.files, store)
        for line in report.lines():
            print("    " + line)
    print()
    print(info_table(store))
    print()
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; results in {root.resolve()}")
    return 0 if not report.skipped else 1
