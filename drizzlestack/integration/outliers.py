"""Outlier flags in each frame's own pixels: the robust model blotted back and every raw
pixel tested against it (AstroDrizzle's blot + ``driz_cr``, with a tolerance for seeing).

Why not flag the registered view: an undersampled star core cannot be interpolated
faithfully (its peak depends on the pixel phase) and seeing changes from frame to frame,
so on the reference grid star cores look like outliers in the frames where they are
sharper or blurrier than the rest; every such flag then cost drizzle up to four good
input pixels (issue 10: star fluxes 0.7 % low with 2.5 % scatter on real frames). Here
nothing is interpolated but the model, and the test allows for the model's own errors.

For frame ``i``, raw pixel ``I`` and the model ``B`` (the integration, mapped through the
frame's full registration onto its grid with bilinear interpolation and taken back to
the frame's units through its normalization), a pixel is an outlier when

.. math::

    |I - B| > \\mathrm{snr}\\,\\sigma + \\mathrm{derivative}\\,D + \\mathrm{signal}\\,\\max(B - \\mathrm{sky}, 0)
              + k\\,S

* ``sigma``: the frame's noise at that level, ``sqrt(noise^2 + (B - sky)/gain + q^2/12)``
  times ``sqrt(1 + 1/n)`` for the model's own noise (``noise`` is the frame's measured
  background noise, ``gain`` from the header when it has one (else the Poisson term is
  left to the ``signal`` term), ``q`` the quantization step of integer data);
* ``D``: the largest absolute difference between the blotted model at the pixel and at
  its four neighbours (drizzlepac's derivative image): room for registration error and
  for the pixel-phase dependence of undersampled profiles. In colour frames red and
  blue compare with their model 2 px away, their own sample spacing (first pass only);
* ``signal``: a fraction of the model above the sky, for the PSF (seeing) and
  transparency differences between frames; it is what keeps the cores of stars in
  frames sharper than the model, where ``D`` alone is not enough. A frame whose stars
  are sharper than the model's (FWHM ``f`` against the median ``F`` of the frames) can
  have cores ``(F/f)^2`` times the model's peak: its signal terms grow by
  ``(F/f)^2 - 1``.

* ``S``: the spread (standard deviation) of the samples the model kept at that sky
  position, blotted like the model, and ``k`` the rejection's own ``high``/``low``
  threshold (sigma methods; 3 for the others): the user's thresholds keep their meaning,
  and where the model is uncertain (frames disagree: seeing, pixel phase, or an outlier
  the chosen rejection let through) good pixels are not condemned against it.

``range_low``/``range_high`` apply to each raw pixel too (:data:`FLAG_RANGE`).

A second pass, around the first pass's hits (8-neighbourhood), uses the looser
``snr_grow``/``derivative_grow``/``signal_grow`` and catches the tails of cosmic rays and
the edges of trails. A sensor pixel flagged high in at least ``hot_fraction`` of the
frames (and in at least 3) is a hot pixel: it is flagged in every frame
(:data:`FLAG_HOT`). Saturated pixels are never flagged, NaN pixels are no data already,
and pixels where the model has no data are not tested.

Flags (store variable ``outliers (frame, y, x)``, uint8, in each frame's own pixels and
chunked like ``frames``): ``1`` low, ``2`` high, ``4`` out of range (excluded frames
carry it everywhere), ``8`` hot pixel. Drizzle gives zero weight to every flagged pixel.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numba
import numpy as np

from .. import cfa as _cfa
from .._warnings import DrizzlestackError
from ..chunkio import DirectArray
from ..geometry import pixel_grid, translation
from ..store import record_tile
from ..tiled import run_tiles, start_or_resume
from .rejection import FLAG_HIGH, FLAG_LOW, FLAG_RANGE
from .blot import EDGE_REACH, _blot_list, _blot_own, model_window

#: a sensor pixel flagged high in many frames: a hot (or warm) pixel, flagged everywhere
FLAG_HOT = 8
#: store variable of the own-pixel flags
OUTLIERS_VARIABLE = "outliers"
_NO_POSITIONS = np.empty((0, 0))



@dataclass(frozen=True)
class OutlierParameters:
    """Tolerances of the own-pixel outlier test (see the module docstring).

    ``snr_grow`` is used at most equal to ``snr`` (the second pass is never stricter
    than the first). The defaults were set on simulated undersampled fields (FWHM 1.2-2.4 px varying
    from frame to frame) and the real hatp32 frames (benchmarks/README.md, "Rejection
    in each frame's pixels"): no star core flagged, 99.95 % of the cosmic rays 10 sigma
    above the sky found, 2e-6 to 6e-5 of clean sky samples flagged. STScI's parameters for its
    undersampled cameras are snr 5/4 and derivative 3.0/2.4 with no signal term.
    """

    snr: float = 4.0
    derivative: float = 1.2
    signal: float = 0.6
    snr_grow: float = 3.0
    derivative_grow: float = 0.7
    signal_grow: float = 0.4
    hot_fraction: float = 0.3

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise DrizzlestackError(f"outliers.{name}={value!r}: must be a number >= 0")
        if not 0 < self.hot_fraction <= 1:
            raise DrizzlestackError(f"outliers.hot_fraction={self.hot_fraction!r}: must be in (0, 1]")

    @classmethod
    def from_dict(cls, values: dict | None) -> "OutlierParameters":
        """From a mapping of option names to numbers (the config's ``integrate.outliers``)."""
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise DrizzlestackError(f"outliers: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        for k, v in values.items():
            try:
                values[k] = float(v)
            except (TypeError, ValueError):
                raise DrizzlestackError(f"outliers.{k}={v!r}: must be a number >= 0") from None
        return cls(**values)


@dataclass(frozen=True)
class FrameNoise:
    """The noise model of one frame, in its own ADU."""

    sky: np.ndarray  # background level per channel (one entry for grey frames)
    noise: np.ndarray  # background noise (measured) per channel
    gain: float  # e-/ADU; NaN when unknown (no Poisson term)
    quantum: float  # quantization step (0 for float data)
    model_frames: int  # frames averaged into the model


@numba.njit(nogil=True, cache=True)
def flag_pixels(data, chan, model, spread, saturation, sky, noise2, inv_gain, model_var_factor,
                snr, derivative, signal, snr_grow, derivative_grow, signal_grow, k_low, k_high,
                norm_scale, norm_offset, range_low, range_high, out, reach_rb=1):
    """Own-pixel outlier flags of one frame window (both passes), against a blotted model.

    The outlier pass itself calls :func:`flag_window`, which blots the model lazily (same
    flags); this is the rule on given planes.

    Parameters
    ----------
    data : (h, w) float32
        Raw pixels of the frame.
    chan : (h, w) uint8
        Channel of every pixel (colour frames; zeros for grey): it picks the pixel's
        model plane and its entries of ``sky``, ``noise2``, ``norm_scale`` and
        ``norm_offset``.
    model : (n_channels, h, w) float32
        The blotted model of every channel at every pixel, in the frame's units (NaN: no
        model). The derivative term compares a pixel's model with its own colour's model
        at the neighbouring pixels (another colour's would count colour as gradient).
    spread : (n_channels, h, w) float32
        The blotted spread of the samples the model kept, in the frame's units (NaN:
        unknown, taken as 0).
    saturation : float
        The frame's saturation level (pixels at or above are never flagged).
    sky, noise2 : (n_channels,) float64
        Background level and background variance (including quantization) per channel.
    inv_gain, model_var_factor : float
        1/gain (0 when unknown), and ``1 + 1/n`` for the model's own noise.
    snr, derivative, signal, snr_grow, derivative_grow, signal_grow : float
        Tolerances of the first and second pass.
    k_low, k_high : float
        Multiples of the spread tolerated below / above the model (``inf``: that side
        is never flagged).
    norm_scale, norm_offset : (n_channels,) float64
        The frame's normalization per channel.
    range_low, range_high : float
        The range limits in normalized units: samples at or below / at or above are
        flagged :data:`FLAG_RANGE` (saturated ones excepted).
    out : (h, w) uint8
        Receives :data:`FLAG_LOW` / :data:`FLAG_HIGH` / :data:`FLAG_RANGE` (0 elsewhere).
    reach_rb : int
        Largest distance (px) of the neighbours of the derivative term for red and
        blue (channels 0 and 2 of a three-channel frame; the neighbours 1 px away count
        too): 2, the same-colour sample spacing, for colour frames; 1 (grey frames and
        green) elsewhere. Red and blue's
        model was built from samples 2 px apart, so its error near an undersampled core
        is that of a grid twice as coarse: the model's change over one pixel understates
        it; green's samples are a quincunx, nearest ones one pixel apart in each axis).
        The second pass keeps the one-pixel derivative: it tests only the neighbours
        of a first-pass hit, where a cosmic ray's tail is the likely cause.

    Returns
    -------
    int
        Pixels tested: with data and a model.
    """
    h, w = data.shape
    own = np.empty((h, w), np.float32)
    for y in range(h):
        for x in range(w):
            own[y, x] = model[chan[y, x], y, x]
    geo = (0, 0, 0, 0, np.eye(3), 0, 0, np.empty((0, 0)), np.empty((0, 0)), True, 0.0)
    return _flag_core(data, chan, own, model, spread, False, False, geo, saturation, sky, noise2, inv_gain,
                      model_var_factor, snr, derivative, signal, snr_grow, derivative_grow, signal_grow, k_low,
                      k_high, norm_scale, norm_offset, range_low, range_high, out, reach_rb)


@numba.njit(nogil=True, cache=True)
def flag_window(data, chan, model, spread, quick_spread, geo, saturation, sky, noise2, inv_gain, model_var_factor,
                snr, derivative, signal, snr_grow, derivative_grow, signal_grow, k_low, k_high,
                norm_scale, norm_offset, range_low, range_high, out, reach_rb):
    """:func:`flag_pixels` of one frame window, blotting only what the test reads: each
    pixel's own colour at every pixel (the sky shortcut needs it), the spread and the
    other colours' models (derivative term) only at the few pixels that fail the
    shortcut. The flags of :func:`.blot.blot_window` then :func:`flag_pixels`, for a third of
    the blot in colour.

    Parameters
    ----------
    model, spread : (n_channels, h, w) float32
        Windows of the reference-grid model and spread (normalized units), as for
        :func:`.blot.blot_window`.
    quick_spread : bool
        No spread is negative (NaN allowed): the spread is then blotted only where the
        other terms flag the pixel.
    geo : tuple
        ``(wy0, wx0, mny, mnx, matrix, y0, x0, xs, ys, use_matrix, reach)``:
        :func:`.blot.blot_window`'s mapping arguments.
    out : (h, w) uint8
        As for :func:`flag_pixels`, plus the bit ``_HOT_OK`` where the pixel has data
        below saturation (where a hot pixel may be flagged; :func:`_hot_pixels` clears it).

    The other parameters and the return value are :func:`flag_pixels`'.
    """
    own = np.empty(data.shape, np.float32)
    _blot_own(model, chan, geo, norm_scale, norm_offset, own)
    tested = _flag_core(data, chan, own, model, spread, True, quick_spread, geo, saturation, sky, noise2, inv_gain,
                        model_var_factor, snr, derivative, signal, snr_grow, derivative_grow, signal_grow, k_low,
                        k_high, norm_scale, norm_offset, range_low, range_high, out, reach_rb)
    h, w = data.shape
    for y in range(h):
        for x in range(w):
            if data[y, x] < saturation:  # False for NaN too
                out[y, x] |= _HOT_OK
    return tested


#: flag_window's mark of the pixels that may be flagged hot (cleared by _hot_pixels)
_HOT_OK = 32


@numba.njit(nogil=True, cache=True)
def _flag_core(data, chan, own, planes, spreads, lazy, skip_spread, geo, saturation, sky, noise2, inv_gain,
               model_var_factor, snr, derivative, signal, snr_grow, derivative_grow, signal_grow, k_low, k_high,
               norm_scale, norm_offset, range_low, range_high, out, reach_rb):
    """Both passes of :func:`flag_pixels`. ``own`` is the model of each pixel's own colour
    at the pixel; other colours' models and the spread come from ``planes`` and
    ``spreads``: the blotted planes, or (``lazy``) the model windows blotted through
    ``geo`` where they are read."""
    h, w = data.shape
    tested = 0
    seeds = 0
    # Without a gain the noise is one number per channel (above * 0 adds nothing): no
    # square root per pixel, the same bits.
    sigma_flat = np.empty(len(noise2))
    for c in range(len(noise2)):
        sigma_flat[c] = np.sqrt((noise2[c] + 0.0) * model_var_factor)
    flat = inv_gain == 0.0
    # Every term of the tolerance is >= 0 and sigma >= sigma_flat (rounding is monotone),
    # so |I - B| <= snr * sigma_flat is never a hit: most sky pixels skip the derivative,
    # noise and spread terms, with the same flags.
    quick = inv_gain >= 0.0 and derivative >= 0.0 and signal >= 0.0 and k_low >= 0.0 and k_high >= 0.0
    n_chan = len(noise2)
    # The pixels that fail the shortcut are listed and tested after its loop: that loop,
    # run for every pixel, stays small (2.5x faster than with the full test in it). What
    # the test reads lazily (other colours' models, the spread) is listed and blotted in
    # one call (:func:`_blot_list`) outside every loop: blot code in a loop nest here
    # cost 0.2 us per listed pixel.
    failed = np.empty(h * w, np.int64)  # y * w + x
    n_failed = 0
    for y in range(h):
        for x in range(w):
            out[y, x] = 0
            c = chan[y, x]
            b = own[y, x]
            v = data[y, x]
            if np.isfinite(v) and np.isfinite(b):
                tested += 1
            if not np.isfinite(v) or v >= saturation:
                continue
            vn = v * norm_scale[c] + norm_offset[c]
            if vn <= range_low or vn >= range_high:
                out[y, x] = FLAG_RANGE
                continue
            if not np.isfinite(b):
                continue
            if quick and abs(v - b) <= snr * sigma_flat[c]:
                continue
            failed[n_failed] = y * w + x
            n_failed += 1
    n_nbr = 4 * max(reach_rb, 1)
    nbr = np.empty(max(n_failed, 1) * n_nbr, np.float32)  # listed pixel q's neighbours at q * n_nbr + ...
    todo = np.empty((4, max(n_failed, 1) * n_nbr), np.int64)  # colour, y, x, destination of each blot
    n_todo = 0
    for q in range(n_failed):
        y, x = divmod(failed[q], w)
        c = chan[y, x]
        n_todo = _neighbours(own, chan, planes, lazy, c, y, x, reach_rb if n_chan == 3 and c != 1 else 1, nbr,
                             q * n_nbr, todo, n_todo)
    _blot_list(planes, spreads, geo, norm_scale, norm_offset, todo, n_todo, 0, nbr)
    # The spread term is >= 0 when the spread is (``skip_spread``): a pixel within the
    # other terms passes without it (the final sum rounds up from t), and most star
    # pixels that fail the shortcut do; the spread is blotted for the rest only.
    tol = np.empty(max(n_failed, 1))
    sp = np.empty(max(n_failed, 1), np.float32)
    n_left = 0
    for q in range(n_failed):
        y, x = divmod(failed[q], w)
        c = chan[y, x]
        b = own[y, x]
        r = reach_rb if n_chan == 3 and c != 1 else 1
        d, above, sigma = _terms(nbr, q * n_nbr, 4 * r, c, b, sky, noise2, inv_gain, model_var_factor, flat,
                                 sigma_flat)
        t = snr * sigma + derivative * d + signal * above
        if skip_spread and quick and norm_scale[c] > 0 and abs(data[y, x] - b) <= t:
            continue
        failed[n_left] = failed[q]  # (n_left <= q: the list is compacted in place)
        tol[n_left] = t
        if lazy:
            todo[0, n_left], todo[1, n_left], todo[2, n_left], todo[3, n_left] = c, y, x, n_left
        else:
            sp[n_left] = spreads[c, y, x]
        n_left += 1
    _blot_list(planes, spreads, geo, norm_scale, norm_offset, todo, n_left if lazy else 0, 1, sp)
    for q in range(n_left):
        y, x = divmod(failed[q], w)
        diff = data[y, x] - own[y, x]
        s = sp[q]
        if not np.isfinite(s):
            s = 0.0
        k = k_high if diff > 0 else k_low
        if abs(diff) > tol[q] + k * s:
            out[y, x] = FLAG_HIGH if diff > 0 else FLAG_LOW
            seeds += 1
    # Second pass: the high neighbours of first-pass hits (cosmic-ray tails, trail edges).
    # Hits are rare (~0.05 % of the pixels): visiting the neighbours of each hit costs a
    # fraction of testing every pixel's 8-neighbourhood for one, with the same flags; their
    # tolerances are computed there, for those few pixels only.
    if seeds == 0 or not k_high < np.inf:
        return tested
    # The candidates are listed first (64 marks a listed one), then tested as above.
    n_cand = 0
    for y in range(h):
        for x in range(w):
            if (out[y, x] & 3) == 0:
                continue
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    v = data[yy, xx]
                    # The first pass tested this pixel (and it passed) exactly when:
                    if out[yy, xx] == 0 and np.isfinite(v) and v < saturation and np.isfinite(own[yy, xx]):
                        out[yy, xx] = 64
                        failed[n_cand] = yy * w + xx
                        n_cand += 1
    nbr = np.empty(max(n_cand, 1) * 4, np.float32)
    todo = np.empty((4, max(n_cand, 1) * 4), np.int64)
    n_todo = 0
    for q in range(n_cand):
        y, x = divmod(failed[q], w)
        n_todo = _neighbours(own, chan, planes, lazy, chan[y, x], y, x, 1, nbr, 4 * q, todo, n_todo)
    _blot_list(planes, spreads, geo, norm_scale, norm_offset, todo, n_todo, 0, nbr)
    for q in range(n_cand):
        y, x = divmod(failed[q], w)
        c = chan[y, x]
        b = own[y, x]
        d, above, sigma = _terms(nbr, 4 * q, 4, c, b, sky, noise2, inv_gain, model_var_factor, flat, sigma_flat)
        t = np.float32(snr_grow * sigma + derivative_grow * d + signal_grow * above)
        out[y, x] = FLAG_HIGH if np.isfinite(t) and data[y, x] - b > t else 0
    return tested


@numba.njit(nogil=True, cache=True, inline="always")
def _neighbours(own, chan, planes, lazy, c, y, x, reach, nbr, at, todo, n_todo):
    """Channel ``c``'s model at the neighbours of pixel ``(y, x)`` 1 to ``reach`` px away
    along each axis, into ``nbr[at:at + 4 reach]`` (NaN: none): from ``own`` where the
    neighbour has colour ``c``, else from ``planes`` or (``lazy``) listed in ``todo``
    for :func:`_blot_list`. Returns the new length of the list."""
    h, w = own.shape
    for r in range(1, reach + 1):
        for p in range(4):
            yy = y - r if p == 0 else (y + r if p == 1 else y)
            xx = x - r if p == 2 else (x + r if p == 3 else x)
            m = np.float32(np.nan)
            if yy >= 0 and yy < h and xx >= 0 and xx < w:
                if chan[yy, xx] == c:
                    m = own[yy, xx]
                elif not lazy:
                    m = planes[c, yy, xx]
                else:
                    todo[0, n_todo], todo[1, n_todo], todo[2, n_todo], todo[3, n_todo] = c, yy, xx, at + 4 * r - 4 + p
                    n_todo += 1
            nbr[at + 4 * r - 4 + p] = m
    return n_todo


@numba.njit(nogil=True, cache=True, inline="always")
def _terms(nbr, at, n, c, b, sky, noise2, inv_gain, model_var_factor, flat, sigma_flat):
    """:func:`flag_pixels`' derivative ``d`` (the model's largest change to its
    neighbours ``nbr[at:at + n]``, see :func:`_neighbours`), model above the sky and
    noise ``sigma`` at one pixel of colour ``c`` and model ``b``."""
    d = 0.0
    for i in range(at, at + n):
        m = nbr[i]
        if np.isfinite(m):
            d = max(d, abs(b - m))
    above = b - sky[c]
    if above < 0.0:
        above = 0.0
    if flat:
        sigma = sigma_flat[c]
    else:
        sigma = np.sqrt((noise2[c] + above * inv_gain) * model_var_factor)
    return d, above, sigma


@numba.njit(nogil=True, cache=True)
def _hot_pixels(flags, need, counts):
    """Hot pixels across the frames of one tile, and the per-frame counts.

    A sensor pixel flagged high in at least ``need`` frames is flagged :data:`FLAG_HOT`
    in every frame where :func:`flag_window` marked it ``_HOT_OK`` (the mark is cleared).
    ``counts`` (3 n) receives per frame the pixels flagged low or out of range, then
    those flagged high or hot."""
    n, h, w = flags.shape
    high = np.zeros((h, w), np.int64)
    for k in range(n):  # frame by frame: contiguous rows
        for y in range(h):
            for x in range(w):
                if flags[k, y, x] & FLAG_HIGH:
                    high[y, x] += 1
    for k in range(n):
        low_k = 0
        high_k = 0
        for y in range(h):
            for x in range(w):
                f = flags[k, y, x]
                f = FLAG_HOT if high[y, x] >= need and (f & _HOT_OK) else f & ~_HOT_OK
                flags[k, y, x] = f
                low_k += f == FLAG_LOW or f == FLAG_RANGE
                high_k += (f & (FLAG_HIGH | FLAG_HOT)) != 0
        counts[k] = low_k
        counts[n + k] = high_k


@dataclass
class OutlierPlan:
    """What an outlier tile task needs (small and picklable)."""

    store: str
    model: str  # store variable of the reference-grid model (normalized units)
    spread: str  # store variable of the kept samples' spread (normalized units)
    spread_k: tuple  # (low, high) multiples of the spread tolerated
    ranges: tuple  # (range_low, range_high), normalized units
    variable: str  # store variable receiving the flags (``outliers``; ROI trials their own)
    model_origin: tuple  # (y0, x0) of the model array on the reference grid
    indices: list  # frames tested, in store order
    mappings: list
    frame_shape: tuple
    tile: tuple  # (ty, tx): the frames' chunks
    saturation: np.ndarray  # raw ADU per frame (inf: none)
    norm_scale: np.ndarray
    norm_offset: np.ndarray
    noise: list  # FrameNoise per frame
    params: OutlierParameters
    derivative_scale: np.ndarray  # per frame: >1 widens the derivative term (poor registration)
    signal_extra: np.ndarray  # per frame: added to the signal terms (frames sharper than the model)
    step: str = "outliers"
    done: np.ndarray | None = None
    cfa_pattern: str = ""  # colour: each pixel tested against the model of its own colour


def outlier_tile(plan: OutlierPlan, iy: int, ix: int) -> np.ndarray:
    """Flag one spatial tile of every frame's own pixels, write it, record it.

    Returns
    -------
    (3 * n_frames,) float64
        Per frame: pixels flagged low, high (hot pixels included), and tested.
    """
    ty, tx = plan.tile
    ny, nx = plan.frame_shape
    sy = slice(iy * ty, min((iy + 1) * ty, ny))
    sx = slice(ix * tx, min((ix + 1) * tx, nx))
    n = len(plan.indices)
    frames = DirectArray(plan.store, "frames")
    model = DirectArray(plan.store, plan.model)
    spreads = DirectArray(plan.store, plan.spread)
    my0, mx0 = plan.model_origin
    mshape = model.shape[-2:]  # (colour models have a leading channel axis)
    p = plan.params
    flags = np.zeros((n, sy.stop - sy.start, sx.stop - sx.start), np.uint8)
    tested = np.zeros(n)
    # Each frame's model window, in the model array's own coordinates (an ROI model
    # starts at model_origin on the reference grid); the union is read once per task.
    windows = []
    for mapping in plan.mappings:
        win = model_window(mapping, sy, sx, plan.frame_shape)
        if win is not None:
            wy = slice(max(win[0].start - my0, 0), min(win[0].stop - my0, mshape[0]))
            wx = slice(max(win[1].start - mx0, 0), min(win[1].stop - mx0, mshape[1]))
            win = (wy, wx) if wy.start < wy.stop and wx.start < wx.stop else None  # beyond an ROI model
        windows.append(win)
    reached = [w for w in windows if w is not None]
    if reached:
        uy = slice(min(w[0].start for w in reached), max(w[0].stop for w in reached))
        ux = slice(min(w[1].start for w in reached), max(w[1].stop for w in reached))
        if plan.cfa_pattern:  # (channel, y, x)
            model_all, spread_all = model[:, uy, ux], spreads[:, uy, ux]
        else:
            model_all, spread_all = model[uy, ux][None], spreads[uy, ux][None]
        quick_spread = not (spread_all < 0).any()  # NaN spreads count as 0
    chan = (_cfa.channel_index(plan.cfa_pattern, flags.shape[1:], sy.start, sx.start) if plan.cfa_pattern
            else np.zeros(flags.shape[1:], np.uint8))
    for k, (i, mapping) in enumerate(zip(plan.indices, plan.mappings)):
        if windows[k] is None:
            continue
        wy, wx = windows[k]
        data = frames[int(i), sy, sx]
        if mapping.is_homography:
            to_model = translation(-mx0, -my0) @ mapping.matrix
            xr = yr = _NO_POSITIONS
        else:  # the spline: positions evaluated in numpy
            to_model = np.eye(3)
            xf, yf = pixel_grid(data.shape, sy.start, sx.start)
            xr, yr = mapping.forward(xf.astype(np.float64), yf.astype(np.float64))
            xr, yr = xr - mx0, yr - my0
        cut = (slice(None), slice(wy.start - uy.start, wy.stop - uy.start),
               slice(wx.start - ux.start, wx.stop - ux.start))
        geo = (wy.start, wx.start, mshape[0], mshape[1], to_model, sy.start, sx.start, xr, yr,
               bool(mapping.is_homography), EDGE_REACH)
        fn = plan.noise[k]
        noise2 = fn.noise ** 2 + fn.quantum ** 2 / 12.0
        inv_gain = 1.0 / fn.gain if np.isfinite(fn.gain) and fn.gain > 0 else 0.0
        factor = 1.0 + 1.0 / max(fn.model_frames, 1)
        widen, extra = float(plan.derivative_scale[k]), float(plan.signal_extra[k])
        tested[k] = flag_window(data, chan, model_all[cut], spread_all[cut], quick_spread, geo,
                                float(plan.saturation[k]), fn.sky, noise2, inv_gain, factor, p.snr,
                                p.derivative * widen, p.signal + extra, min(p.snr_grow, p.snr),
                                p.derivative_grow * widen, p.signal_grow + extra,
                                *plan.spread_k, plan.norm_scale[k], plan.norm_offset[k], *plan.ranges, flags[k],
                                2 if plan.cfa_pattern else 1)
    # Hot pixels: a sensor pixel high in many frames is a defect in all of them. With the
    # field drifting, the sky behind it changes, so it only crosses the threshold in some.
    counts = np.zeros(3 * n)
    _hot_pixels(flags, max(3, int(np.ceil(p.hot_fraction * n))), counts)
    target = DirectArray(plan.store, plan.variable, "r+")
    for k, i in enumerate(plan.indices):
        target[int(i), sy, sx] = flags[k]
    counts[2 * n:] = tested
    record_tile(plan.store, plan.step, iy, ix, counts)
    return counts


# ----------------------------------------------------------------------- the pass
def _parse_header(header_text: str):
    from astropy.io.fits import Header

    try:
        return Header.fromstring(header_text, sep="\n" if "\n" in header_text else "") if header_text else Header()
    except Exception:  # a header ingest could store is always parseable; be safe anyway
        return Header()


def _header_number(hdr, keys) -> float:
    """The first of ``keys`` in ``hdr`` holding a positive number (NaN: none)."""
    for key in keys:
        try:
            value = float(hdr[key])
        except (KeyError, TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            return value
    return float("nan")


def _frame_noise_models(st, used, location, noise, model_frames: int):
    """Each frame's noise model for the outlier test, and where its numbers came from."""
    headers = [str(h) for h in st.group["header"][:st.n_frames]]
    models, sources = [], {}
    for i in used:
        hdr = _parse_header(headers[i])
        gain = _header_number(hdr, ("GAIN", "EGAIN", "CCDGAIN"))
        bitpix = _header_number(hdr, ("BITPIX",))  # NaN for float data (BITPIX < 0)
        quantum = _header_number(hdr, ("BSCALE",)) if np.isfinite(bitpix) else 0.0
        quantum = 1.0 if not np.isfinite(quantum) else quantum
        models.append(FrameNoise(np.atleast_1d(np.asarray(location[i], np.float64)),
                                 np.atleast_1d(np.asarray(noise[i], np.float64)), gain, quantum, model_frames))
        sources[str(i)] = ("measured background noise, gain from the header" if np.isfinite(gain)
                           else "measured background noise, no gain keyword (signal term only)")
    return models, sources


def flag_outliers(st, base, tiling, location, noise, used, params: OutlierParameters, variable: str, model: str,
                  spread: str, spread_k, ranges, rms_tolerance: float = 0.5) -> dict:
    """The outlier pass of :func:`drizzlestack.integrate`: the own-pixel flags of every
    used frame, one Dask task per spatial tile of the sensor (every frame at once, so
    that hot pixels are seen across frames), resumable through its tile ledger.

    Parameters
    ----------
    st : StackStore
    base : integrate's TilePlan
        The integration's plan (store, frames, mappings, normalization, saturation).
    tiling : integrate's tiling
        Step name, parameters and inputs of the run, and whether it resumes.
    location, noise : arrays over the store's frames
        Background level and noise (raw ADU).
    used : list of int
        The frames integrated.
    params : OutlierParameters
    variable, model, spread : str
        Store variables of the flags, the model and the spread.
    spread_k : (float, float)
        Multiples of the spread tolerated below / above the model.
    ranges : (float or None, float or None)
        ``range_low``, ``range_high`` in normalized units.
    rms_tolerance : float
        A frame whose registration residual exceeds this (px) gets a proportionally
        wider derivative term.

    Returns
    -------
    dict
        The step summary's ``outliers`` record (plus ``_fraction``, per frame).
    """
    t0 = time.perf_counter()
    n = len(used)
    cy, cx = (int(c) for c in st.group["frames"].chunks[1:])
    ny, nx = st.frame_shape
    tiles = (-(-ny // cy), -(-nx // cx))
    rms = (np.asarray(st.group["registration_rms"][:st.n_frames], np.float64)
           if "registration_rms" in st.group else np.zeros(st.n_frames))
    widen = np.array([max(1.0, float(rms[i]) / rms_tolerance) if np.isfinite(rms[i]) else 1.0
                      for i in used])
    noise_models, sources = _frame_noise_models(st, used, location, noise, n)
    # Seeing: a frame sharper than the model (about the median frame) has brighter cores.
    fwhm = np.asarray(st.group["fwhm"][:st.n_frames], np.float64) if "fwhm" in st.group else np.full(st.n_frames,
                                                                                                   np.nan)
    f_model = np.nanmedian(fwhm[used]) if np.isfinite(fwhm[used]).any() else np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        extra = np.where(np.isfinite(fwhm[used]) & (fwhm[used] > 0), (f_model / fwhm[used]) ** 2 - 1.0, 0.0)
    extra = np.nan_to_num(np.clip(extra, 0.0, None), nan=0.0)
    ledger = tiling.ledger("outliers")

    def create():
        st.create_variable(variable, (st.n_frames, ny, nx), ("frame", "y", "x"), (1, cy, cx), "uint8", FLAG_RANGE,
                           attrs={"flags": "1 low, 2 high, 4 out of range or frame not integrated, 8 hot pixel",
                                  "parameters": asdict(params)})

    done = start_or_resume(st, tiling.step, tiling.params, tiling.inputs, tiles=tiles, width=3 * n, tile=cy,
                           products=[variable], create=create, ledger=ledger, resumable=tiling.resumable,
                           what="integration", part=" of its outliers pass", stacklevel=3)
    plan = OutlierPlan(
        store=base.store, model=model, spread=spread, spread_k=tuple(float(k) for k in spread_k),
        ranges=(-np.inf if ranges[0] is None else float(ranges[0]), np.inf if ranges[1] is None else float(ranges[1])),
        variable=variable, model_origin=tuple(base.origin), indices=list(used),
        mappings=list(base.mappings), frame_shape=tuple(base.frame_shape), tile=(cy, cx),
        saturation=np.asarray(base.raw_saturation, np.float64), norm_scale=np.asarray(base.norm_scale, np.float64),
        norm_offset=np.asarray(base.norm_offset, np.float64), noise=noise_models, params=params,
        derivative_scale=widen, signal_extra=extra, step=ledger, done=done, cfa_pattern=base.cfa_pattern,
    )
    per_tile = run_tiles(outlier_tile, plan, tiles, 3 * n).reshape(-1, 3 * n)
    low, high, tested = (per_tile[:, j * n:(j + 1) * n].sum(axis=0) for j in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(tested > 0, (low + high) / tested, np.nan)
    return {
        "_fraction": fraction,
        "flagged_fraction": float((low.sum() + high.sum()) / max(tested.sum(), 1)),
        "flagged_low": int(low.sum()), "flagged_high": int(high.sum()),
        "parameters": asdict(params),
        "noise_model": sources,
        "widened": {str(i): round(float(f), 3) for i, f in zip(used, widen) if f > 1},
        "rms_tolerance": float(rms_tolerance),
        "sharper_than_model": {str(i): round(float(e), 3) for i, e in zip(used, extra) if e > 0},
        "seconds": round(time.perf_counter() - t0, 3),
    }


__all__ = ["FLAG_HOT", "FLAG_HIGH", "FLAG_LOW", "FLAG_RANGE", "OUTLIERS_VARIABLE", "OutlierParameters",
           "FrameNoise", "flag_pixels", "flag_window", "OutlierPlan", "outlier_tile",
           "flag_outliers"]
