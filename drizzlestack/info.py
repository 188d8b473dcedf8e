"""Per-frame summary tables of a stack store (``drizzlestack info``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import location as _location
from .store import open_stack

#: optional per-frame columns: (store variable, header, format); shown when present
OPTIONAL_COLUMNS = [
    ("n_stars", "stars", "{:.0f}"),
    ("n_matches", "matches", "{:.0f}"),
    ("registration_rms", "rms[px]", "{:.3f}"),
    ("fwhm", "fwhm[px]", "{:.2f}"),
    ("location", "location", "{:.1f}"),
    ("scale", "scale", "{:.2f}"),
    ("noise", "noise", "{:.2f}"),
    ("weight", "weight", "{:.3f}"),
    ("rejected_low_fraction", "rej.low%", "{:.2%}"),
    ("rejected_high_fraction", "rej.high%", "{:.2%}"),
]


def _fmt(fmt: str, value) -> str:
    try:
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            return "-"
        if fmt.endswith("%}"):
            return fmt.format(value).replace("%", "")
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def info_table(store) -> str:
    """Text table of the frames in ``store``: file, exposure, saturation, status and,
    when the later steps have run, registration and integration figures."""
    ds = open_stack(store)
    n = ds.sizes.get("frame", 0)
    ny, nx = ds.attrs.get("frame_shape", [0, 0])
    ref = ds.attrs.get("reference")
    steps = ds.attrs.get("steps", {})
    lines = [
        f"store      {_location.display(str(store))}",
        f"frames     {n} of {nx} x {ny} px"
        + (f"  ({n * ny * nx * 4 / 2**20:.1f} MiB as float32)" if n else ""),
        f"reference  {ref if ref is not None else '-'}",
        "steps      " + (", ".join(f"{k}{'' if v.get('complete') else ' (incomplete)'}" for k, v in steps.items())
                         or "-"),
        "",
    ]
    cols = [("#", [str(i) for i in range(n)]),
            ("file", [Path(str(p)).name for p in ds["path"].values]),
            ("exptime", [_fmt("{:g}", v) for v in ds["exptime"].values]),
            ("saturation", [_fmt("{:g}", v) for v in ds["saturation"].values])]
    for var, header, fmt in OPTIONAL_COLUMNS:
        if var in ds and ds[var].dims == ("frame",):
            cols.append((header, [_fmt(fmt, v) for v in ds[var].values]))
    cols.append(("status", [str(s) for s in ds["status"].values]))
    widths = [max(len(h), *(len(v) for v in vals)) if vals else len(h) for h, vals in cols]
    lines.append("  ".join(h.ljust(w) for (h, _), w in zip(cols, widths)).rstrip())
    for i in range(n):
        lines.append("  ".join(vals[i].ljust(w) for (_, vals), w in zip(cols, widths)).rstrip())
    excluded = [(i, s) for i, s in enumerate(ds["status"].values) if s != "ok"]
    lines.append("")
    lines.append(f"{n - len(excluded)} frame(s) ok, {len(excluded)} excluded")
    return "\n".join(lines)
