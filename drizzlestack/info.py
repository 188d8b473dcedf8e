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
    ("outlier_fraction", "outliers%", "{:.2%}"),  # own pixels flagged (integration/outliers.py)
]


#: the registration-residual tolerance of the outlier test (px) for stores integrated
#: before the step summary recorded it (``outliers.rms_tolerance``): the value then
_DEFAULT_RMS_TOLERANCE = 0.5


def outlier_widening(steps: dict) -> dict[int, dict]:
    """Frames whose outlier tolerance the integration widened for a poor registration.

    ``integration.outliers.flag_outliers`` multiplies the derivative term of a frame's
    tolerance by ``registration rms / tolerance`` when its residual exceeds the
    tolerance, and records the factor in the step summary (``outliers.widened``).

    Parameters
    ----------
    steps : dict
        The store's ``steps`` attribute.

    Returns
    -------
    dict
        ``{frame: {"factor": f, "tolerance": px, "step": name}}`` (the largest factor when
        several integrate steps, e.g. colour channels, widened the same frame).
    """
    out: dict[int, dict] = {}
    for name, record in (steps or {}).items():
        outliers = ((record or {}).get("summary") or {}).get("outliers") or {}
        tolerance = float(outliers.get("rms_tolerance", _DEFAULT_RMS_TOLERANCE))
        for frame, factor in (outliers.get("widened") or {}).items():
            i, f = int(frame), float(factor)
            if i not in out or f > out[i]["factor"]:
                out[i] = {"factor": f, "tolerance": tolerance, "step": str(name)}
    return out


#: header keywords that must agree between the frames of one store: (keyword, what it is)
SETUP_KEYWORDS = (("FILTER", "filters"), ("INSTRUME", "instruments"))


def _names(paths, limit: int = 4) -> str:
    names = [Path(str(p)).name for p in paths]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def mixed_setups(paths, headers, exptimes) -> list[str]:
    """Messages naming the files when the frames of one store mix filters (``FILTER``),
    instruments (``INSTRUME``) or exposure times; empty when they agree.

    Frames without the keyword are not compared (many cameras do not write it).
    Mixing filters is a common mistake: one integration of R and B frames is neither.
    """
    from astropy.io import fits

    groups: dict[str, dict[str, list]] = {key: {} for key, _ in SETUP_KEYWORDS}
    for path, text in zip(paths, headers):
        try:
            header = fits.Header.fromstring(str(text), sep="\n")
        except Exception:
            continue
        for key, _ in SETUP_KEYWORDS:
            value = header.get(key)
            if value is not None and str(value).strip():
                groups[key].setdefault(str(value).strip(), []).append(path)
    out = []
    for key, what in SETUP_KEYWORDS:
        if len(groups[key]) > 1:
            parts = "; ".join(f"{key}={v!r}: {len(ps)} ({_names(ps)})" for v, ps in groups[key].items())
            out.append(f"frames of different {what} in one store ({parts}); integrate and drizzle them "
                       "separately, one store each")
    by_exptime: dict[float, list] = {}
    for path, t in zip(paths, exptimes):
        t = float(t)
        if np.isfinite(t):
            match = next((k for k in by_exptime if abs(k - t) <= 1e-3 * max(abs(k), 1e-9)), t)
            by_exptime.setdefault(match, []).append(path)
    if len(by_exptime) > 1:
        parts = "; ".join(f"{t:g} s: {len(ps)} ({_names(ps)})" for t, ps in sorted(by_exptime.items()))
        out.append(f"frames of different exposure times in one store ({parts}); check that they belong together "
                   "(the integration's weights and normalization account for the depth, not for a different "
                   "target or setup)")
    return out


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
    widened = outlier_widening(steps)
    for var, header, fmt in OPTIONAL_COLUMNS:
        if var in ds and ds[var].dims == ("frame",):
            cols.append((header, [_fmt(fmt, v) for v in ds[var].values]))
        if var == "outlier_fraction" and widened:
            # the outlier tolerance widened for a poor registration residual (rms[px] column)
            cols.append(("tol.x", [f"x{widened[i]['factor']:.2f}" if i in widened else "-" for i in range(n)]))
    cols.append(("status", [str(s) for s in ds["status"].values]))
    widths = [max(len(h), *(len(v) for v in vals)) if vals else len(h) for h, vals in cols]
    lines.append("  ".join(h.ljust(w) for (h, _), w in zip(cols, widths)).rstrip())
    for i in range(n):
        lines.append("  ".join(vals[i].ljust(w) for (_, vals), w in zip(cols, widths)).rstrip())
    excluded = [(i, s) for i, s in enumerate(ds["status"].values) if s != "ok"]
    lines.append("")
    lines.append(f"{n - len(excluded)} frame(s) ok, {len(excluded)} excluded")
    if widened:
        tol = sorted({w["tolerance"] for w in widened.values()})
        lines.append(f"outlier tolerance widened (tol.x) for {len(widened)} frame(s) whose registration residual "
                     f"exceeds {'/'.join(f'{t:g}' for t in tol)} px: "
                     + ", ".join(f"{i} (x{w['factor']:.2f})" for i, w in sorted(widened.items())))
    offsets = ((steps.get("drizzle") or {}).get("summary") or {}).get("channel_offsets")
    if offsets:
        off, err = offsets["offset_rgb"], offsets["error_rgb"]
        lines.append("colour channels on the sky, from green (x, y px; removed by the drizzle): "
                     + ", ".join(f"{name} ({off[c][0]:+.3f}, {off[c][1]:+.3f}) +- ({err[c][0]:.3f}, {err[c][1]:.3f})"
                                 for c, name in ((0, "R"), (2, "B"))))
    if n:
        for message in mixed_setups(ds["path"].values, ds["header"].values, ds["exptime"].values):
            lines.append(f"warning: {message}")
    return "\n".join(lines)
