"""Quality report of a stack store (``drizzlestack report``): one HTML page with PNG plots.

The page is a plain file with relative image links, so a browser opens it from disk
without a server and the report directory can be copied or zipped as a whole. Every
section needs only what the store holds: a store that has only been ingested gets a
report too, with a note where a later step is missing.

Nothing here loads a whole image: the previews are block means computed through dask
(``da.coarsen``), at most :data:`MAX_PREVIEW` pixels a side, so the report of a
100k x 100k drizzle costs one pass over its chunks and a few MiB of memory.
matplotlib is imported inside the functions that draw, so ``import drizzlestack``
stays fast; figures are drawn on matplotlib's Agg canvas directly (no pyplot, no change
to the user's backend).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from ._version import __version__
from .geometry import apply_homography
from .store import STATUS_OK, open_stack

#: largest side, in pixels, of a preview image (before it is computed)
MAX_PREVIEW = 1500

#: per-frame panels: (title, y label, [(store variable, legend label, factor)])
FRAME_PANELS = [
    ("FWHM", "FWHM [px]", [("fwhm", "median star FWHM", 1.0)]),
    ("Stars", "stars", [("n_stars", "stars detected", 1.0), ("n_matches", "stars matched", 1.0)]),
    ("Weight", "weight", [("weight", "integration weight", 1.0)]),
    ("Rejected pixels", "rejected [%]", [("rejected_low_fraction", "low", 100.0),
                                          ("rejected_high_fraction", "high", 100.0)]),
    ("Outliers", "flagged [%]", [("outlier_fraction", "own pixels flagged (dropped by drizzle)", 100.0)]),
    ("Registration residual", "RMS [px]", [("registration_rms", "registration RMS", 1.0)]),
]

#: images previewed: (store variable, title, kind) with kind "sky" (asinh stretch) or "map" (linear)
PREVIEWS = [
    ("integration", "Integration (reference grid)", "sky"),
    ("drizzle", "Drizzle result", "sky"),
    ("drizzle_weights", "Drizzle weights", "map"),
    ("drizzle_coverage", "Drizzle coverage (frames per output pixel)", "map"),
]


def _esc(value) -> str:
    """Text from the store (file names, headers, statuses) made safe for HTML."""
    return html.escape(str(value), quote=True)


# --------------------------------------------------------------------------- dither
def dither_phases(transforms, frame_shape) -> np.ndarray:
    """Sub-pixel phases at which each frame samples the reference grid.

    The phase of a frame is where its centre pixel ``(nx // 2, ny // 2)`` lands on the
    reference grid, modulo one pixel. Because that pixel has integer coordinates, this
    is also the fractional part of the frame -> reference translation at the frame
    centre: two frames with the same phase put their pixel centres on the same points of
    the sky (up to whole pixels) and give drizzle no new information.

    Parameters
    ----------
    transforms : (n, 3, 3) array_like
        ``transform[frame]``, the frame -> reference homographies (NaN: unregistered).
    frame_shape : (int, int)
        ``(ny, nx)`` of the frames.

    Returns
    -------
    (n, 2) ndarray
        ``(x, y)`` phases in ``[0, 1)``; NaN for frames without a finite transform.

    Notes
    -----
    With rotation or scale between frames the phase varies across the field (which
    itself spreads the sampling); the centre's phase is then representative of the
    middle of the field only.
    """
    transforms = np.asarray(transforms, dtype=np.float64).reshape(-1, 3, 3)
    ny, nx = (int(v) for v in frame_shape)
    cx, cy = nx // 2, ny // 2
    phases = np.full((len(transforms), 2), np.nan)
    for i, matrix in enumerate(transforms):
        if not np.all(np.isfinite(matrix)):
            continue
        x, y = apply_homography(matrix, cx, cy)
        phases[i] = np.mod([x, y], 1.0)
    # np.mod(-1e-17, 1) rounds to 1.0, which is phase 0.
    phases[phases >= 1.0] = 0.0
    return phases


def phase_occupancy(phases, n: int, n_offsets: int = 16) -> float:
    """Fraction of an ``n x n`` sub-pixel grid occupied by the (finite) ``phases``.

    Where the grid starts is arbitrary, and a fixed grid would count two nearly equal
    phases on either side of a cell edge (0.49 and 0.51, or 0.99 and 0.01) as spread; so
    the grid is slid over ``n_offsets`` x ``n_offsets`` starting points within one cell,
    cells wrap around (phase 1 is phase 0), and the smallest occupancy is returned.

    Parameters
    ----------
    phases : (m, 2) array_like
        ``(x, y)`` phases in ``[0, 1)`` (from :func:`dither_phases`); NaN rows are ignored.
    n : int
        Cells per axis.
    n_offsets : int
        Grid positions tried per axis.

    Returns
    -------
    float
        Occupied cells / ``n**2``, in ``[0, 1]``; 0 when there is no finite phase.
    """
    p = np.asarray(phases, dtype=np.float64).reshape(-1, 2)
    p = p[np.all(np.isfinite(p), axis=1)]
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(p) == 0:
        return 0.0
    best = n * n
    steps = np.arange(n_offsets) / (n_offsets * n)
    for ox in steps:
        cx = np.floor(np.mod(p[:, 0] - ox, 1.0) * n).astype(int) % n
        for oy in steps:
            cy = np.floor(np.mod(p[:, 1] - oy, 1.0) * n).astype(int) % n
            best = min(best, len(np.unique(cx * n + cy)))
    return best / (n * n)


def dither_verdict(phases, scale: float | None = None) -> str:
    """One line telling whether the dither lets drizzle gain resolution.

    The grid judged is ``ceil(scale)`` cells a side (2 when ``scale`` is unknown), the
    number of output pixels a drizzle at that scale puts across one input pixel.
    """
    p = np.asarray(phases, dtype=np.float64).reshape(-1, 2)
    m = int(np.all(np.isfinite(p), axis=1).sum())
    if m == 0:
        return "No registered frame: the dither pattern is unknown."
    if m == 1:
        return "Only one registered frame: drizzle has nothing to interleave and cannot gain resolution."
    n = 2 if scale is None else int(min(4, max(2, math.ceil(scale - 1e-9))))
    occ = {k: phase_occupancy(p, k) for k in sorted({2, 3, n})}
    grid_text = ", ".join(f"{round(v * k * k)}/{k * k} cells of a {k}x{k} grid" for k, v in occ.items())
    frac = occ[n]
    where = f"a drizzle at scale {scale:g}" if scale is not None else "drizzle"
    if frac >= 0.75:
        verdict = f"well spread: {where} can gain resolution"
    elif frac >= 0.5:
        verdict = f"partly spread: {where} gains some resolution; more frames or a finer dither would help"
    else:
        verdict = (f"clustered: {where} cannot gain much over the integration; "
                   "dither by non-integer pixel offsets")
    limit = f" ({m} frames can fill at most {m} of {n * n})" if m < n * n else ""
    return f"Sub-pixel phases occupy {grid_text}{limit}: {verdict}."


# -------------------------------------------------------------------------- previews
def downsample(data, max_size: int = MAX_PREVIEW) -> tuple[np.ndarray, int]:
    """Block-mean a 2-D (dask or numpy) image to at most ``max_size`` pixels a side.

    The reduction runs chunk by chunk through dask before anything is computed, so the
    memory used is that of a few chunks plus the result. Blocks without a finite value
    are NaN; the partial blocks at the right and top edges are dropped.

    Returns
    -------
    image : ndarray, float32
        The preview.
    factor : int
        Input pixels per preview pixel along each axis.
    """
    arr = data if isinstance(data, da.Array) else da.asarray(np.asarray(data))
    arr = arr.astype(np.float32)
    ny, nx = arr.shape
    k = max(1, math.ceil(max(ny, nx) / max_size))
    if k > 1 and min(ny, nx) >= k:
        finite = da.isfinite(arr)
        total = da.coarsen(np.sum, da.where(finite, arr, 0).astype(np.float64), {0: k, 1: k}, trim_excess=True)
        count = da.coarsen(np.sum, finite.astype(np.int64), {0: k, 1: k}, trim_excess=True)
        # (no division by zero inside the worker threads: no warnings from there)
        arr = da.where(count > 0, total / da.maximum(count, 1), np.nan).astype(np.float32)
    else:
        k = 1
    return np.asarray(arr.compute(), dtype=np.float32), k


def stretch(image, low: float = 0.5, high: float = 99.8, softening: float = 0.05) -> np.ndarray:
    """Asinh stretch of ``image`` to ``[0, 1]`` between two percentiles of its finite values.

    ``softening`` is the (normalized) level where the stretch turns from linear to
    logarithmic: smaller shows fainter structure. NaN stays NaN.
    """
    img = np.asarray(image, dtype=np.float64)
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return np.full(img.shape, np.nan)
    lo, hi = np.percentile(finite, [low, high])
    if not hi > lo:
        hi = lo + 1.0
    with np.errstate(invalid="ignore"):
        x = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
    return np.arcsinh(x / softening) / np.arcsinh(1.0 / softening)


def _save_image(path: Path, image: np.ndarray, cmap: str, vmin: float, vmax: float) -> None:
    import matplotlib
    import matplotlib.image

    # no data: dark red-brown, distinct from a black sky
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#402020")
    matplotlib.image.imsave(path, np.ma.masked_invalid(image), cmap=colormap, vmin=vmin, vmax=vmax,
                            origin="lower", format="png")


def _alignment_note(stack) -> str:
    """One sentence on the colour drizzle's channel alignment, from its step record."""
    rec = stack.attrs.get("steps", {}).get("drizzle", {})
    if not (rec.get("params") or {}).get("cfa_pattern"):
        return ""
    found = (rec.get("summary") or {}).get("channel_offsets")
    if not (rec.get("params") or {}).get("align_channels", True):
        return " Channels not aligned (align_channels=False): red and blue where the registration puts them."
    if not found:
        return " Channels not aligned: too few clean stars in red and blue to measure their offsets from green."
    off, err = found["offset_rgb"], found["error_rgb"]
    parts = [f"{c} ({off[k][0]:+.3f}, {off[k][1]:+.3f}) &plusmn; ({err[k][0]:.3f}, {err[k][1]:.3f})"
             for k, c in ((0, "red"), (2, "blue"))]
    return (f" On the sky {parts[0]} and {parts[1]} px (x, y) from green, measured on "
            f"{found['n_stars_rgb'][2]} star fits in {found['n_frames']} frames (atmospheric dispersion, lateral "
            "colour); removed: the drizzle shifted their drops onto green.")


def _save_rgb(path: Path, planes) -> None:
    """A colour preview: each channel stretched on its own (no white balance, as the
    drizzle keeps none), no data dark red."""
    import matplotlib.image

    rgb = np.stack([stretch(p) for p in planes], axis=-1)
    missing = ~np.all(np.isfinite(rgb), axis=-1)
    rgb = np.nan_to_num(rgb, nan=0.0)
    rgb[missing] = (0x40 / 255, 0x20 / 255, 0x20 / 255)
    matplotlib.image.imsave(path, np.clip(rgb, 0.0, 1.0), origin="lower", format="png")


# ----------------------------------------------------------------------------- plots
def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_frames(path: Path, values: dict, status, reference=None, widened=None) -> list[str]:
    """Per-frame panels (those whose variables are in ``values``); excluded frames marked.

    ``widened`` (:func:`drizzlestack.info.outlier_widening`) marks, in the outlier panel,
    the frames whose outlier tolerance was widened for a poor registration residual, with
    the factor. Returns the titles of the panels drawn (empty: nothing written).
    """
    panels = [(t, yl, [s for s in series if s[0] in values]) for t, yl, series in FRAME_PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return []
    status = np.asarray([str(s) for s in status])
    frames = np.arange(len(status))
    excluded = status != STATUS_OK
    fig = _new_figure(8.0, 1.55 * len(panels) + 0.6)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colors = ["tab:blue", "tab:orange", "tab:green"]
    for ax, (title, ylabel, series) in zip(axes, panels):
        for i in np.flatnonzero(excluded):
            ax.axvspan(i - 0.5, i + 0.5, color="tab:red", alpha=0.12, lw=0)
        if reference is not None:
            ax.axvline(reference, color="0.5", ls=":", lw=1)
        for (var, label, factor), color in zip(series, colors):
            v = np.asarray(values[var], dtype=np.float64) * factor
            ax.plot(frames, v, "-", color=color, lw=0.8, alpha=0.5)
            ax.plot(frames[~excluded], v[~excluded], "o", color=color, ms=3.5, label=label)
            if excluded.any():
                ax.plot(frames[excluded], v[excluded], "x", color="tab:red", ms=6, mew=1.5)
        marked = _mark_widened(ax, frames, values, series, widened)
        ax.set_ylabel(ylabel)
        ax.set_title(title, loc="left", fontsize="medium")
        if len(series) > 1 or marked:
            ax.legend(fontsize="small", loc="best")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("frame" + (" (dotted: reference; red x / band: excluded)" if excluded.any()
                                   else " (dotted: reference)"))
    axes[-1].set_xlim(-0.5, len(frames) - 0.5)
    fig.savefig(path, dpi=100)
    return [p[0] for p in panels]


def _mark_widened(ax, frames, values, series, widened) -> bool:
    """Ring, in the outlier panel, the frames tested with a widened tolerance and write the
    factor above each (True if any was marked)."""
    var = "outlier_fraction"
    if not widened or var not in [s[0] for s in series]:
        return False
    factor = dict((v, f) for v, _, f in series)[var]
    idx = np.array([i for i in sorted(widened) if 0 <= i < len(frames)], int)
    if not idx.size:
        return False
    v = np.asarray(values[var], dtype=np.float64)[idx] * factor
    v = np.where(np.isfinite(v), v, 0.0)
    ax.plot(frames[idx], v, "D", mfc="none", mec="tab:purple", ms=10, mew=1.5,
            label="tolerance widened: poor registration residual")
    for i, y in zip(idx, v):
        ax.annotate(f"x{widened[int(i)]['factor']:.2f}", (i, y), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize="small", color="tab:purple")
    ax.margins(y=0.25)
    return True


def _widened_html(widened: dict, values: dict, paths) -> str:
    """Table of the frames whose outlier tolerance was widened, by how much and why."""
    rms = values.get("registration_rms")
    frac = values.get("outlier_fraction")
    rows = []
    for i, w in sorted(widened.items()):
        r = f"{rms[i]:.3f}" if rms is not None and i < len(rms) and np.isfinite(rms[i]) else "-"
        o = f"{100 * frac[i]:.3f}" if frac is not None and i < len(frac) and np.isfinite(frac[i]) else "-"
        name = Path(str(paths[i])).name if i < len(paths) else ""
        rows.append(f"<tr class='widened' id='widened-{i}'><td>{i}</td><td>{_esc(name)}</td><td>{r}</td>"
                    f"<td>{w['tolerance']:g}</td><td>x{w['factor']:.2f}</td><td>{o}</td></tr>")
    return ("<h3>Outlier tolerance widened</h3><p>These frames' registration residual exceeds the outlier "
            "test's tolerance, so their own-pixel outlier test allowed proportionally more room for "
            "interpolation and registration error (the model-gradient term multiplied by residual / "
            "tolerance), so that their misaligned star edges are not taken for outliers. Ringed in the "
            "outlier panel above; <code>drizzlestack info</code> lists the factor as <code>tol.x</code>.</p><table><tr><th>frame</th><th>file</th><th>registration RMS [px]</th>"
            "<th>tolerance [px]</th><th>widened by</th><th>flagged [%]</th></tr>" + "".join(rows) + "</table>")


def plot_dither(path: Path, phases: np.ndarray, status, reference=None) -> None:
    """The sub-pixel phases in the unit square, with 2x2 and 3x3 grid lines."""
    status = np.asarray([str(s) for s in status])
    ok = (status == STATUS_OK) & np.all(np.isfinite(phases), axis=1)
    bad = (status != STATUS_OK) & np.all(np.isfinite(phases), axis=1)
    fig = _new_figure(5.2, 5.2)
    ax = fig.subplots()
    for t in (1 / 3, 2 / 3):
        ax.axvline(t, color="0.6", ls=":", lw=1)
        ax.axhline(t, color="0.6", ls=":", lw=1)
    ax.axvline(0.5, color="0.4", ls="--", lw=1)
    ax.axhline(0.5, color="0.4", ls="--", lw=1)
    ax.plot(phases[ok, 0], phases[ok, 1], "o", color="tab:blue", ms=6, label="frames", clip_on=False)
    if bad.any():
        ax.plot(phases[bad, 0], phases[bad, 1], "x", color="tab:red", ms=7, mew=1.5, label="excluded",
                clip_on=False)
    if reference is not None and 0 <= reference < len(phases) and np.all(np.isfinite(phases[reference])):
        ax.plot(*phases[reference], "*", color="k", ms=12, label="reference", clip_on=False)
    if len(phases) <= 60:
        for i in np.flatnonzero(ok | bad):
            ax.annotate(str(i), phases[i], xytext=(4, 3), textcoords="offset points", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("x phase [reference px, mod 1]")
    ax.set_ylabel("y phase [reference px, mod 1]")
    ax.set_title("Dither: sub-pixel phase of each frame", fontsize="medium")
    ax.legend(fontsize="small", loc="upper right", framealpha=0.8)
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------ html
def _format_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = repr(value)  # exactly as given (4.0, 0.9), unless it is a long computed figure
        return text if len(text) <= 10 else format(value, ".6g")
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, name + "."))
        else:
            rows.append((name, value))
    return rows


def _table(d: dict, head=("parameter", "value")) -> str:
    rows = _flatten(d)
    if not rows:
        return "<p class='note'>(none)</p>"
    body = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(_format_value(v))}</td></tr>" for k, v in rows)
    return f"<table><tr><th>{_esc(head[0])}</th><th>{_esc(head[1])}</th></tr>{body}</table>"


def _steps_html(steps: dict) -> str:
    if not steps:
        return "<p class='note'>No step has run on this store.</p>"
    parts = []
    for name, rec in steps.items():
        rec = rec if isinstance(rec, dict) else {"value": rec}
        state = "complete" if rec.get("complete") else "incomplete"
        times = " · ".join(f"{k} {_esc(rec[k])}" for k in ("started", "finished", "version") if rec.get(k))
        parts.append(f"<h3>{_esc(name)} <span class='state {state}'>{state}</span></h3>")
        if times:
            parts.append(f"<p class='note'>{times}</p>")
        parts.append("<div class='cols'><div><h4>parameters</h4>" + _table(rec.get("params") or {}) + "</div>")
        parts.append("<div><h4>summary</h4>" + _table(rec.get("summary") or {}, ("item", "value")) + "</div></div>")
        if rec.get("inputs"):
            parts.append("<details><summary>inputs (what decides whether the step reruns)</summary>"
                         + _table(rec["inputs"], ("input", "value")) + "</details>")
        extra = {k: v for k, v in rec.items()
                 if k not in ("params", "summary", "inputs", "complete", "started", "finished", "version", "digest")}
        if extra:
            parts.append(_table(extra, ("item", "value")))
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
h3 { margin-bottom: 0.2em; } h4 { margin: 0.5em 0 0.2em; }
.note { color: #666; font-size: 0.92em; }
.missing { color: #8a5a00; background: #fff6e0; padding: 0.4em 0.7em; border-left: 3px solid #e0a000; }
.verdict { font-weight: 600; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.92em; max-width: 800px; }
img.preview { width: 100%; max-width: 760px; image-rendering: pixelated; border: 1px solid #ccc; }
img.plot { max-width: 100%; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.3em 0; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
td:last-child { font-family: ui-monospace, monospace; word-break: break-all; }
th { background: #f4f4f4; }
.cols { display: flex; flex-wrap: wrap; gap: 2em; }
.advice { flex: 1; min-width: 320px; max-width: 560px; font-size: 0.92em; }
.state { font-size: 0.7em; padding: 1px 6px; border-radius: 3px; vertical-align: middle; }
.complete { background: #dfd; } .incomplete { background: #fdd; }
pre { background: #f8f8f8; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""


def _missing(text: str) -> str:
    return f"<p class='missing'>{text}</p>"


def _figure(src: str, caption: str, cls: str = "plot", alt: str = "") -> str:
    return (f"<figure><img class='{cls}' src='{_esc(src)}' alt='{_esc(alt or caption)}'>"
            f"<figcaption>{caption}</figcaption></figure>")


def _outlier_preview(out: Path, stack, fractions) -> str:
    """The most-flagged frame with what the outlier test flagged in it (red), block
    maxima so that single pixels stay visible."""
    i = int(np.nanargmax(fractions))
    image, k = downsample(stack["frames"].data[i])
    flags = stack["outliers"].data[i]
    hit = ((flags != 0) & (flags != 4)).astype(np.uint8)
    if k > 1:
        hit = da.coarsen(np.max, hit, {0: k, 1: k}, trim_excess=True)
    hit = np.asarray(hit.compute() if isinstance(hit, da.Array) else hit, bool)[:image.shape[0], :image.shape[1]]
    rgb = np.repeat(np.nan_to_num(stretch(image), nan=0.0)[..., None], 3, axis=2)
    rgb[hit] = (1.0, 0.1, 0.1)
    import matplotlib.image as mimage

    mimage.imsave(out / "outliers.png", rgb, origin="lower")
    reduced = f" (block maxima of {k}x{k} pixels)" if k > 1 else ""
    return _figure("outliers.png", f"<b>Outliers of frame {i}</b>, the most flagged ({100 * fractions[i]:.3f}% of "
                   f"its pixels): flagged pixels in red{reduced} over the frame itself (y up). These are the "
                   "pixels drizzle drops: cosmic rays, hot pixels, trails; never star cores.",
                   cls="preview", alt="outliers")


def _advice_html(store) -> str:
    """The advisor's verdict, recommendation and predictions (``drizzlestack advise``)."""
    from ._warnings import DrizzlestackError
    from .advise import advise

    try:
        a = advise(store)
    except DrizzlestackError as exc:
        return _missing(f"No drizzle advice: {_esc(exc)}")
    head = (f"<h3>Advice: drizzle {'helps' if a['drizzle_helps'] else 'will not help'}</h3>"
            f"<p class='verdict'>Recommended: scale {a['scale']:g}, pixfrac {a['pixfrac']:g} "
            f"({_esc(a['kernel'])}), predicted dry pixels {a['predicted_dry_fraction']:.2%}, weight rms "
            f"{a['predicted_weight_rms']:.0%} of the median.</p>")
    reasons = "<ul>" + "".join(f"<li>{_esc(r)}</li>" for r in a["reasons"]) + "</ul>"
    rows = "".join(f"<tr><td>{p['scale']:g}</td><td>{p['pixfrac']:g}</td><td>{100 * p['dry_fraction']:.2f}</td>"
                   f"<td>{100 * p['weight_rms']:.1f}</td><td>{p['noise_correlation_R']:.2f}</td></tr>"
                   for p in a["predictions"])
    table = ("<table><tr><th>scale</th><th>pixfrac</th><th>dry [%]</th><th>weight rms [%]</th><th>R</th></tr>"
             + rows + "</table>")
    return head + reasons + ("<p class='note'>Predicted by drizzling the frames' weights alone on sample tiles "
                             "(no rejection); R is Fruchter &amp; Hook's noise-correlation ratio.</p>") + table


def write_report(store, directory=None) -> Path:
    """Write the quality report of ``store``: ``report.html`` and its PNG plots.

    Parameters
    ----------
    store : str or path-like
        The stack store.
    directory : str or path-like, optional
        Where to write (a local directory); default ``report/`` next to the store, or in
        the working directory for a store on object storage. Created if needed; files
        of an earlier report there are replaced.

    Returns
    -------
    pathlib.Path
        The ``report.html`` file (open it in a browser; it needs no server).
    """
    from . import location as _location

    stack = open_stack(store)
    remote = _location.is_url(str(store))
    where = _location.normalize(store)  # the URL, or the resolved local path
    name = where.rstrip("/").rsplit("/", 1)[-1]
    # A store on object storage has no "next to it" on this machine: the working directory.
    default = Path("report") if remote else Path(where).parent / "report"
    out = Path(directory) if directory is not None else default
    out.mkdir(parents=True, exist_ok=True)

    attrs = stack.attrs
    steps = attrs.get("steps") or {}
    n = int(stack.sizes.get("frame", 0))
    ny, nx = attrs.get("frame_shape", [0, 0])
    reference = attrs.get("reference")
    reference = int(reference) if reference is not None else None
    status = [str(s) for s in stack["status"].values] if "status" in stack else ["ok"] * n
    paths = [str(p) for p in stack["path"].values] if "path" in stack else [""] * n
    drizzle_params = (steps.get("drizzle") or {}).get("params") or {}
    scale = drizzle_params.get("scale")

    # Small per-frame variables: one dask computation for all of them.
    per_frame = [v for _, _, series in FRAME_PANELS for v, _, _ in series
                 if v in stack and stack[v].dims == ("frame",)]
    computed = dask.compute(*[stack[v].data for v in per_frame])
    values = dict(zip(per_frame, (np.asarray(c, dtype=np.float64) for c in computed)))

    body = []
    n_ok = sum(s == STATUS_OK for s in status)
    body.append(f"<h1>drizzlestack quality report</h1>"
                f"<p class='note'>store <code>{_esc(where)}</code> · written "
                f"{_esc(_dt.datetime.now().astimezone().isoformat(timespec='seconds'))} by drizzlestack "
                f"{_esc(__version__)}</p>")

    # ---- summary
    summary = [f"{n} frame(s) of {_esc(nx)} x {_esc(ny)} px; {n_ok} used, {n - n_ok} excluded",
               f"reference frame: {_esc(reference) if reference is not None else 'not chosen yet'}"
               + (f" ({_esc(Path(paths[reference]).name)})" if reference is not None and reference < n else ""),
               "steps: " + (", ".join(f"{_esc(k)}{'' if (v or {}).get('complete') else ' (incomplete)'}"
                                      for k, v in steps.items()) or "none")]
    for var, label, fmt in (("fwhm", "FWHM", "{:.2f} px"), ("registration_rms", "registration residual", "{:.3f} px")):
        if var in values and np.isfinite(values[var]).any():
            summary.append(f"median {label}: " + fmt.format(np.nanmedian(values[var])))
    for var, label in (("rejected_low_fraction", "rejected low"), ("rejected_high_fraction", "rejected high"),
                       ("outlier_fraction", "outliers flagged in the frames' own pixels")):
        if var in values and np.isfinite(values[var]).any():
            summary.append(f"{label}: {np.nanmean(values[var]):.3%} of pixels (mean over frames)")
    excluded = [(i, s) for i, s in enumerate(status) if s != STATUS_OK]
    body.append("<h2>Summary</h2><ul>" + "".join(f"<li>{s}</li>" for s in summary) + "</ul>")
    if excluded:
        body.append("<p>Excluded frames:</p><ul>" + "".join(
            f"<li>{i}: <code>{_esc(Path(paths[i]).name)}</code> — {_esc(s)}</li>" for i, s in excluded) + "</ul>")

    # ---- previews
    body.append("<h2>Images</h2>")
    for var, title, kind in PREVIEWS:
        if var not in stack or stack[var].ndim not in (2, 3):
            continue
        colour = stack[var].ndim == 3 and stack[var].shape[0] == 3  # a colour drizzle: (channel, y, x)
        if colour and kind == "sky":
            planes = [downsample(stack[var].data[c]) for c in range(3)]
            k = planes[0][1]
            png = f"{var}.png"
            h, w = stack[var].shape[1:]
            reduced = f"block mean of {k}x{k} pixels, " if k > 1 else ""
            _save_rgb(out / png, [p for p, _ in planes])
            # Each channel's own stretch hides any white balance; say which the data carry
            # (the drizzle's is folded into its values, the store's integration is raw).
            wb = (stack.attrs.get("steps", {}).get("drizzle", {}).get("params", {}).get("white_balance", "none")
                  if var == "drizzle" else "none")
            how = (f"{reduced}R, G, B each asinh-stretched between its 0.5 and 99.8 percentiles, which hides "
                   f"the data's white balance: {wb}")
            body.append(_figure(png, f"<b>{_esc(title)}</b> (colour): {w} x {h} px ({how}; y up, "
                                     f"no data in dark red).{_alignment_note(stack) if var == 'drizzle' else ''}",
                                cls="preview", alt=title))
            continue
        if colour:
            title = f"{title}, green channel"
        image, k = downsample(stack[var].data[1] if colour else stack[var].data)
        png = f"{var}.png"
        h, w = stack[var].shape[-2:]
        reduced = f"block mean of {k}x{k} pixels, " if k > 1 else ""
        if kind == "sky":
            _save_image(out / png, stretch(image), "gray", 0.0, 1.0)
            how = f"{reduced}asinh stretch between the 0.5 and 99.8 percentiles"
        else:
            finite = image[np.isfinite(image)]
            vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
            _save_image(out / png, image, "viridis", 0.0, vmax)
            how = f"{reduced}linear, 0 (dark blue) to {vmax:.4g} (yellow)"
        body.append(_figure(png, f"<b>{_esc(title)}</b>: {w} x {h} px ({how}; y up, "
                                 "no data in dark red).", cls="preview", alt=title))
    if "outliers" in stack and "outlier_fraction" in values and np.isfinite(values["outlier_fraction"]).any():
        body.append(_outlier_preview(out, stack, values["outlier_fraction"]))
    if "integration" not in stack:
        body.append(_missing("No integration in this store yet (run <code>drizzlestack integrate</code>)."))
    if "drizzle" not in stack:
        body.append(_missing("No drizzle result in this store yet (run <code>drizzlestack drizzle</code>)."))

    # ---- per-frame plots
    body.append("<h2>Frames</h2>")
    from .info import outlier_widening

    widened = outlier_widening(steps)
    drawn = plot_frames(out / "frames.png", values, status, reference, widened) if n else []
    if drawn:
        ringed = (" Purple diamonds in the outlier panel: frames whose outlier tolerance was widened for a poor "
                  "registration residual (by the factor written above each; see the table below)."
                  if widened and "outlier_fraction" in values else "")
        body.append(_figure("frames.png", "Per-frame " + ", ".join(d.lower() for d in drawn)
                            + ". Excluded frames are red crosses on a red band; the dotted line is the reference."
                            + ringed))
    if widened:
        body.append(_widened_html(widened, values, paths))
    else:
        body.append(_missing("No per-frame measurements yet: FWHM, stars and registration RMS come from "
                             "<code>drizzlestack register</code>, weights and rejection from "
                             "<code>drizzlestack integrate</code>."))
    missing = [label for _, _, series in FRAME_PANELS for v, label, _ in series
               if v not in values and v != "n_matches"]
    if drawn and missing:
        body.append(f"<p class='note'>Not in the store yet: {_esc(', '.join(missing))}.</p>")

    # ---- dither
    body.append("<h2>Dither pattern</h2>")
    if "transform" in stack and n:
        phases = dither_phases(stack["transform"].values, (ny, nx))
        usable = np.array([s == STATUS_OK for s in status]) & np.all(np.isfinite(phases), axis=1)
        plot_dither(out / "dither.png", phases, status, reference)
        verdict = dither_verdict(phases[usable], scale)
        body.append("<div class='cols'><div>")
        body.append(_figure(
            "dither.png",
            "Where each frame's centre pixel lands on the reference grid, modulo one pixel (the fractional "
            "part of the frame offset). Drizzle gains resolution only if these phases are spread over the "
            "square: frames at the same phase sample the same points of the sky, and their drizzle is just "
            "the integration on a finer grid. Dashed lines: 2x2 sub-pixel grid (scale 2); dotted: 3x3 "
            "(scale 3). With rotation between frames the phase also varies across the field."))
        body.append(f"<p class='verdict'>{_esc(verdict)}</p></div>")
        body.append("<div class='advice'>" + _advice_html(store) + "</div></div>")
    else:
        body.append(_missing("No registration yet (run <code>drizzlestack register</code>): "
                             "the dither pattern needs the frame transforms."))

    # ---- parameters
    body.append("<h2>Parameters</h2>")
    store_attrs = {k: v for k, v in attrs.items() if k != "steps"}
    body.append("<h3>store</h3>" + _table(store_attrs, ("attribute", "value")))
    body.append(_steps_html(steps))

    # ---- per-frame table and the reference header
    from .info import info_table

    body.append("<h2>Frame table</h2><pre>" + _esc(info_table(store)) + "</pre>")
    if reference is not None and "header" in stack and reference < n:
        body.append(f"<details><summary>FITS header of the reference frame "
                    f"(<code>{_esc(Path(paths[reference]).name)}</code>)</summary>"
                    f"<pre>{_esc(str(stack['header'].values[reference]).rstrip())}</pre></details>")

    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>drizzlestack report: {_esc(name)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    path = out / "report.html"
    tmp = out / "report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)  # a browser never sees half a page
    return path
