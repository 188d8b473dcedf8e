"""Do two versions of the outlier pass give the same flags? Runs this tree's
``drizzlestack/integration/outliers.py`` and another version of that file on the same
store and the same plan (the model and spread of one integration), tile by tile, and
compares the flags and per-frame counts bit for bit; prints the single-thread time of
each.

    git show main:drizzlestack/integration/outliers.py > /tmp/outliers_before.py
    python benchmarks/compare_outliers.py STORE /tmp/outliers_before.py

``STORE`` is a registered store (it is integrated again, with ``force=True``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    p.add_argument("before", help="another version of drizzlestack/integration/outliers.py")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    import drizzlestack as ds
    from drizzlestack.integration import outliers as after
    from drizzlestack.store import StackStore

    warnings.simplefilter("ignore")
    name = "drizzlestack.integration._outliers_before"
    spec = importlib.util.spec_from_file_location(name, args.before)
    before = importlib.util.module_from_spec(spec)
    sys.modules[name] = before
    spec.loader.exec_module(before)

    plans = []
    run_tiles = after.run_tiles

    def capture(task, plan, tiles, width):
        plans.append((plan, tiles))
        return run_tiles(task, plan, tiles, width)

    after.run_tiles = capture
    try:
        ds.integrate(args.store, force=True)
    finally:
        after.run_tiles = run_tiles
    plan, tiles = plans[0]
    plan.done = None
    st = StackStore.open(args.store)
    result, seconds = {}, {"before": [], "after": []}
    for r in range(args.repeat + 1):  # the first round compiles
        for side, mod in (("before", before), ("after", after)):
            t = time.perf_counter()
            counts = [mod.outlier_tile(plan, iy, ix) for iy in range(tiles[0]) for ix in range(tiles[1])]
            if r:
                seconds[side].append(time.perf_counter() - t)
            result[side] = (np.asarray(st.group[plan.variable][...]), np.asarray(counts))
    flags = result["after"][0]
    print(json.dumps({
        "store": args.store, "frames": len(plan.indices), "tiles": list(tiles), "cfa": plan.cfa_pattern,
        "spline_frames": sum(not m.is_homography for m in plan.mappings),
        "flags_identical": bool(np.array_equal(result["before"][0], flags)),
        "counts_identical": bool(np.array_equal(result["before"][1], result["after"][1])),
        "flagged": int(((flags != 0) & (flags != before.FLAG_RANGE)).sum()), "hot": int((flags == before.FLAG_HOT).sum()),
        "single_thread_s": {side: round(min(v), 3) for side, v in seconds.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
