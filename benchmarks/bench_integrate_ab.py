"""Integrate one store with two drizzlestack source trees, alternately, each run a fresh process:
the tile passes' seconds (and the process CPU time) side by side, for before/after ratios
on a shared machine (issue 12).

    python benchmarks/bench_integrate_ab.py STORE NEW_TREE,OLD_TREE REPEATS

STORE must be registered (e.g. the `stack.zarr` that `bench_pipeline.py compare --workdir
DIR` keeps); every run is `integrate(STORE, force=True)` with the package defaults on the
threaded scheduler (2 workers). Round 0 warms both trees' numba caches and is not counted;
the order of the two trees alternates from round to round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import dataclasses, json, sys, warnings
warnings.simplefilter("ignore")
import drizzlestack
from drizzlestack.config import RunConfig
from drizzlestack.integration import integrate
from drizzlestack.parallel import scheduler
kw = dataclasses.asdict(RunConfig().integrate)
with scheduler(scheduler="threads", workers=2, progress=False):
    out = integrate(sys.argv[1], force=True, overwrite=True, **kw)
print(json.dumps({"file": drizzlestack.__file__, **out.attrs["steps"]["integrate"]["summary"]["seconds"]}))
"""


def run(store: str, tree: str) -> dict:
    """One integrate in a fresh process with ``tree`` first on the path; its seconds and CPU time.

    Run from inside ``tree``: ``python -c`` puts the working directory before
    ``PYTHONPATH``, so started from another source tree it would import that one (the
    child prints the package file it imported)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, store], stdout=subprocess.PIPE, text=True, cwd=tree,
                            env={**os.environ, "PYTHONPATH": tree})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"integrate with {tree} failed")
    result = json.loads(out.strip().splitlines()[-1])
    if not os.path.realpath(result["file"]).startswith(os.path.realpath(tree) + os.sep):
        raise SystemExit(f"the child imported {result['file']}, not the tree {tree}")
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def main(store: str, trees: list, repeats: int) -> None:
    results = {t: [] for t in trees}
    for r in range(repeats + 1):
        for tree in (trees if r % 2 else trees[::-1]):
            res = run(store, tree)
            if r:
                results[tree].append(res)
            print(r, tree, res, flush=True)
    for tree in trees:
        print(tree, "tiles s", [d["tiles"] for d in results[tree]], "CPU s",
              [round(d["cpu_s"], 1) for d in results[tree]])
    a, b = trees
    tiles = {t: sorted(d["tiles"] for d in results[t]) for t in trees}
    cpu = {t: sorted(d["cpu_s"] for d in results[t]) for t in trees}
    print(f"tiles, fastest {a} / {b}: {tiles[a][0] / tiles[b][0]:.2f}; median: "
          f"{tiles[a][repeats // 2] / tiles[b][repeats // 2]:.2f}; CPU median: "
          f"{cpu[a][repeats // 2] / cpu[b][repeats // 2]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]))
