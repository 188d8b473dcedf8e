"""Star detection and measurement for registration.

Background and noise maps are ``sep``'s (Source Extractor's, as a library), evaluated a
band of rows at a time (:mod:`.background`): the frame is read in bands, never whole, so
a task holds a few MiB whatever the frame's size (issue 12). Candidates are the local maxima of the background-subtracted image divided by the noise
map and filtered with Source Extractor's default 3x3 kernel (a matched filter for
undersampled stars) -- ten times faster than a full segmentation, and local maxima keep
close pairs apart.

Positions do **not** come from windowed or isophotal centroids: on undersampled stars
(FWHM 1-2 px) a Gaussian window narrower than ~1.5 px has a pixel-phase bias of
0.02-0.1 px, and a wider one fails on faint stars. Instead every star is fitted with a
*pixel-integrated* circular Gaussian (the model pixel value is the Gaussian integrated
over the pixel's square, ``A [Phi(x+1/2) - Phi(x-1/2)] [Phi(y+1/2) - Phi(y-1/2)] + b``),
which has no pixel-phase bias for any sampling. The fit is a Levenberg-Marquardt
iteration per star (small stamps, five parameters), compiled with numba (:mod:`.psffit`).

Sharp single-pixel sources (hot pixels, cosmic rays, their one-pixel tails) are rejected:
a real star, even undersampled, spreads light into its neighbours along *both* axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from scipy.spatial import cKDTree

from ..constants import SIGMA_TO_FWHM  # noqa: F401  (also importable from here)
from ..saturation import ceiling_from_top
from .background import MeshBackground, box_statistics
from .bands import ArrayRows, Gathered, Work, bands
from .psffit import fit_gaussians  # noqa: F401  (the fitting kernels' home; importable from here)

#: columns of a star table, in order (the ``field`` coordinate of the store's ``stars``)
FIELDS = ("x", "y", "flux", "fwhm", "peak", "snr", "flags")
#: ``flags`` bits
FLAG_SATURATED = 1  #: the star has pixels at or above the saturation level (fitted on its wings)
FLAG_BLENDED = 2  #: deblended from, or overlapping, another source
FLAG_TRUNCATED = 4  #: the fitting stamp was cut by the frame edge or by invalid pixels
FLAG_NOFIT = 8  #: the profile fit did not converge (saturated star): first-moment position


@dataclass
class StarList:
    """Stars of one frame and the frame's measured properties.

    Attributes
    ----------
    table : (n, 7) float64 ndarray
        Columns :data:`FIELDS`, sorted by decreasing flux.
    background, noise : float
        Median background level and global background RMS (ADU).
    fwhm : float
        Median FWHM of the well-measured stars (px), NaN without any.
    n_rejected : int
        Sharp single-pixel sources (hot pixels, cosmic rays) rejected.
    """

    table: np.ndarray
    background: float = np.nan
    noise: float = np.nan
    fwhm: float = np.nan
    n_rejected: int = 0

    def __len__(self) -> int:
        return int(self.table.shape[0])

    def column(self, name: str) -> np.ndarray:
        return self.table[:, FIELDS.index(name)]

    @property
    def xy(self) -> np.ndarray:
        """``(n, 2)`` positions."""
        return self.table[:, :2]


def position_sigma(table: np.ndarray) -> np.ndarray:
    """Expected 1-sigma error per axis of each star's position (px), from its FWHM and SNR.

    For a Gaussian star of width ``s`` the centroid error lies between ``s / SNR``
    (source noise) and ``sqrt(2) s / SNR`` (background noise); the pessimistic value is
    used, with the pixel width added in quadrature to ``s``. Saturated and blended
    stars get a systematic 0.05 px on top (their profile is not the model's), stars
    without a profile fit 0.3 px.
    """
    s2 = (table[:, 3] / SIGMA_TO_FWHM) ** 2 + 1.0 / 12.0
    sig = np.sqrt(2.0 * s2) / np.maximum(table[:, 5], 1.0)
    flags = table[:, 6].astype(np.int64)
    extra = np.where(flags & (FLAG_SATURATED | FLAG_BLENDED), 0.05, 0.0) + np.where(flags & FLAG_NOFIT, 0.3, 0.0)
    return np.sqrt(sig ** 2 + extra ** 2)


def empty_table() -> np.ndarray:
    return np.empty((0, len(FIELDS)), dtype=np.float64)


def _stamp_indices(xc, yc, radius):
    offs = np.arange(-radius, radius + 1)
    ix = np.floor(xc + 0.5).astype(np.int64)[:, None] + offs
    iy = np.floor(yc + 0.5).astype(np.int64)[:, None] + offs
    return ix, iy


def _spike_ratios(d, ix0, iy0):
    """Light in the two neighbours along x and along y, relative to the peak pixel
    (a neighbour outside the frame counts as the peak's other neighbour)."""
    ny, nx = d.shape
    xm, xp = np.where(ix0 > 0, ix0 - 1, ix0 + 1), np.where(ix0 < nx - 1, ix0 + 1, ix0 - 1)
    ym, yp = np.where(iy0 > 0, iy0 - 1, iy0 + 1), np.where(iy0 < ny - 1, iy0 + 1, iy0 - 1)
    peak = d[iy0, ix0].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rx = (d[iy0, xm] + d[iy0, xp]) / peak
        ry = (d[ym, ix0] + d[yp, ix0]) / peak
    return rx, ry, peak


@numba.njit(nogil=True, cache=True)
def _is_peak(f, y, x):
    """``f[y, x]`` beats its 8 neighbours (ties go to the first in scan order, so a flat
    top gives one peak)."""
    ny, nx = f.shape
    v = f[y, x]
    for dy in range(-1, 2):
        yy = y + dy
        if yy < 0 or yy >= ny:
            continue
        for dx in range(-1, 2):
            xx = x + dx
            if (dx == 0 and dy == 0) or xx < 0 or xx >= nx:
                continue
            w = f[yy, xx]
            if dy < 0 or (dy == 0 and dx < 0):
                if w >= v:
                    return False
            elif w > v:
                return False
    return True


@numba.njit(nogil=True, cache=True)
def _find_peaks(d, rms, threshold, capacity, y0, y1):
    """Local maxima of the matched-filtered signal-to-noise image above ``threshold``.

    The filter is sep's and Source Extractor's default 3x3 kernel ``[1 2 1] x [1 2 1]``
    applied to ``d / rms``, divided by its noise gain (``sqrt(36) / 16``), so the
    filtered image has unit noise and ``threshold`` is a matched-filter S/N. A pixel is a
    peak if it beats its 8 neighbours (ties go to the first in scan order). Returns
    ``(x, y, snr, count)`` of the peaks in rows ``y0:y1``; ``count`` is -1 when there
    are more than ``capacity``.

    ``d`` and ``rms`` are a band of the frame: the rows ``y0:y1`` searched and at least
    two rows on either side (fewer only where the band meets the frame's edge, beyond
    which the filter sees zeros), so the filtered values and the 8-neighbour test of
    the searched rows are those of the whole frame. ``rms`` is overwritten by the
    filtered image (the filter's only band-sized buffer).
    """
    ny, nx = d.shape
    f = rms
    q = np.empty(nx, np.float32)  # d / rms of the current row, before it is overwritten
    for y in range(ny):
        for x in range(nx):
            q[x] = d[y, x] / rms[y, x]
        for x in range(nx):
            v = 2.0 * q[x]
            if x > 0:
                v += q[x - 1]
            if x < nx - 1:
                v += q[x + 1]
            f[y, x] = v
    norm = 1.0 / 6.0  # 1 / (16 * 0.375): unit noise after filtering
    above = np.zeros(nx, np.float32)  # the unfiltered row above
    row = np.empty(nx, np.float32)
    for y in range(ny):
        row[:] = f[y]
        for x in range(nx):
            v = 2.0 * row[x] + above[x] + (f[y + 1, x] if y < ny - 1 else 0.0)
            f[y, x] = v * norm
        above[:] = row
    # Count first, then fill arrays of the exact size (no capacity-sized buffers).
    count = 0
    for y in range(y0, y1):
        for x in range(nx):
            if f[y, x] > threshold and _is_peak(f, y, x):
                count += 1
    if count > capacity:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), -1
    xs = np.empty(count, np.int64)
    ys = np.empty(count, np.int64)
    vs = np.empty(count, np.float32)
    k = 0
    for y in range(y0, y1):
        for x in range(nx):
            if f[y, x] > threshold and _is_peak(f, y, x):
                xs[k] = x
                ys[k] = y
                vs[k] = f[y, x]
                k += 1
    return xs, ys, vs, count


# Bits of the pixel mask star detection keeps instead of the raw frame (which it
# overwrites with the background-subtracted one). The no-data bit is the larger so that
# sep, masking values above ``maskthresh=1``, leaves saturated pixels in the background.
_MASK_SATURATED = np.uint8(1)
_MASK_NODATA = np.uint8(2)


def _neighbourhood(d, ix0, iy0):
    """3x3 pixel values around each ``(ix0, iy0)`` (n, 3, 3), zero outside the frame."""
    ny, nx = d.shape
    off = np.arange(-1, 2)
    xx, yy = ix0[:, None] + off, iy0[:, None] + off
    inside = (xx[:, None, :] >= 0) & (xx[:, None, :] < nx) & (yy[:, :, None] >= 0) & (yy[:, :, None] < ny)
    vals = d[np.clip(yy, 0, ny - 1)[:, :, None], np.clip(xx, 0, nx - 1)[:, None, :]]
    return np.where(inside, vals, 0.0)


def _typical_sigma(take, shape, x, y, flux, clean, n: int = 100, radius: int = 5) -> float:
    """Median Gaussian sigma (px) of the ``n`` brightest clean stars, from wide-stamp fits
    (``take``: the candidates' stamps, :class:`.bands.Stamps`)."""
    ny, nx = shape
    cand = clean & (x > radius) & (x < nx - 1 - radius) & (y > radius) & (y < ny - 1 - radius)
    idx = np.flatnonzero(cand)
    idx = idx[np.argsort(-flux[idx])][:n]
    if idx.size < 3:
        return 1.0
    ix, iy = _stamp_indices(x[idx], y[idx], radius)
    stamps = take(idx, radius)[0].astype(np.float64)
    init = np.column_stack([x[idx], y[idx], np.maximum(stamps.sum(axis=(1, 2)), 1e-3),
                            np.full(idx.size, 1.0), np.zeros(idx.size)])
    params, _cov, ok = fit_gaussians(stamps, np.ones(stamps.shape, bool), ix.astype(np.float64),
                                     iy.astype(np.float64), init)
    ok &= (params[:, 3] > 0.2) & (params[:, 3] < radius)
    return float(np.median(params[ok, 3])) if ok.sum() >= 3 else 1.0


def _plateau_centres(mask, ix0, iy0, window: int = 25, row0: int = 0):
    """Centre (mean position) and equivalent radius of the saturated plateau holding each
    peak pixel ``(ix0, iy0)`` (its connected saturated pixels in ``mask``, a band whose
    first row is the frame's ``row0``; the centre in frame coordinates)."""
    from scipy import ndimage

    ny, nx = mask.shape
    xs, ys, rs = np.empty(len(ix0)), np.empty(len(ix0)), np.empty(len(ix0))
    for k, (x, y) in enumerate(zip(ix0, iy0)):
        xa, xb = max(x - window, 0), min(x + window + 1, nx)
        ya, yb = max(y - window, 0), min(y + window + 1, ny)
        lab, _ = ndimage.label((mask[ya:yb, xa:xb] & _MASK_SATURATED) != 0)
        comp = lab == lab[y - ya, x - xa]
        vy, vx = np.nonzero(comp)
        xs[k], ys[k] = xa + vx.mean(), (ya + row0) + vy.mean()
        rs[k] = np.sqrt(vx.size / np.pi)
    return xs, ys, rs


def _measure(take, shape, x0, y0, nd, ni, sel, radius, s0):
    """Fit candidates ``sel`` on stamps of ``radius``; invalid and saturated pixels are
    left out, and so are the pixels nearer to a neighbouring candidate than to this one
    (a Voronoi split of blends). Returns params, cov, ok, flags and the starting values."""
    ny, nx = shape
    n_all = len(x0)
    xs, ys = x0[sel], y0[sel]
    ix, iy = _stamp_indices(xs, ys, radius)
    inside = (ix[:, None, :] >= 0) & (ix[:, None, :] < nx) & (iy[:, :, None] >= 0) & (iy[:, :, None] < ny)
    stamps, m = take(sel, radius)  # (edge pixels repeated outside the frame, as clipped indices give)
    stamps = stamps.astype(np.float64)
    usable = inside & ((m & _MASK_NODATA) == 0)
    own = np.ones_like(usable)
    d_own = (ix[:, None, :] - xs[:, None, None]) ** 2 + (iy[:, :, None] - ys[:, None, None]) ** 2
    for j in range(nd.shape[1]):
        near = nd[sel, j] < 2 * radius + 2
        if not near.any():
            break
        other = ni[sel, j] % n_all
        d_nb = (ix[:, None, :] - x0[other][:, None, None]) ** 2 + (iy[:, :, None] - y0[other][:, None, None]) ** 2
        own &= ~(near[:, None, None] & (d_nb < d_own))
    saturated_px = (m & _MASK_SATURATED) != 0
    valid = usable & own & ~saturated_px
    flags = np.zeros(len(sel), dtype=np.int64)
    flags[np.any(saturated_px & inside, axis=(1, 2))] |= FLAG_SATURATED
    flags[np.any(~own & inside, axis=(1, 2))] |= FLAG_BLENDED
    flags[np.any(~usable, axis=(1, 2))] |= FLAG_TRUNCATED
    init = np.column_stack([xs, ys, np.maximum(np.sum(np.where(valid, stamps, 0.0), axis=(1, 2)), 1e-3),
                            np.full(len(sel), s0), np.zeros(len(sel))]).astype(np.float64)
    params, cov, ok = fit_gaussians(stamps, valid, ix.astype(np.float64), iy.astype(np.float64), init)
    moved = np.hypot(params[:, 0] - xs, params[:, 1] - ys)
    ok &= (moved < 1.5) & (params[:, 3] < 4.0 * s0 + 1.0) & (valid.sum(axis=(1, 2)) >= 6)
    if np.any(flags & FLAG_SATURATED):
        # the stamp sum misses the clipped light: start the flux from the fit's own scale
        init[:, 2] = np.where(flags & FLAG_SATURATED, np.maximum(params[:, 2], init[:, 2]), init[:, 2])
    return params, cov, ok, flags, init


# ------------------------------------------------------------ detect_stars, by stage
# Detection reads the frame a band of rows at a time, twice (issue 12: a 4096^2 frame is
# 64 MiB of float32, and each Dask worker held it with its noise map): a survey
# (saturation level, sep's background mesh), then a scan (peaks, their neighbourhoods,
# and the stamps of the candidates that may be fitted). Each band is read with enough
# rows of its neighbours (a halo) that every value computed for its own rows is the one
# the whole frame gives, so the stars are the same to the last bit.

#: rows of a band (rounded to whole mesh boxes): 4 MiB of float32 on a 4096 px wide frame
_BAND_ROWS = 256
#: halo of the scan: the peak filter (2 rows), the 3x3 around a peak's brightest pixel
#: (2), the window of its saturated plateau (25), whose centre is the stamp's (+20)
_SCAN_HALO = 50


def _survey(src, box: int, rows: int, work: Work):
    """First pass: whether the frame holds any data, its maximum and the number of
    pixels at it (for :func:`_saturation_level`), and sep's background mesh
    (:class:`~drizzlestack.registration.background.MeshBackground`; no-data pixels count
    as sep's masked pixels)."""
    ny, nx = src.shape
    back = np.empty(((ny - 1) // box + 1, (nx - 1) // box + 1), np.float32)
    sigma = np.empty_like(back)
    top, count, any_data = np.nan, 0, False
    for y0, y1 in bands(ny, rows):
        n = y1 - y0
        band = src.rows(y0, y1, work.view("d", n))
        nodata = np.logical_not(np.isfinite(band, out=work.view("nodata", n)), out=work.view("nodata", n))
        any_data |= not nodata.all()
        flag = work.view("flag", n)
        if not np.isnan(band, out=flag).all():
            btop = float(np.nanmax(band))
            if not btop <= top:  # also when top is still NaN
                top, count = btop, int(np.count_nonzero(np.equal(band, btop, out=flag)))
            elif btop == top:
                count += int(np.count_nonzero(np.equal(band, btop, out=flag)))
        holes = nodata.any()
        if holes:
            np.copyto(band, 0.0, where=nodata)
        j = y0 // box
        box_statistics(band, nodata if holes else None, box, back[j:j + band.shape[0] // box + 1],
                       sigma[j:j + band.shape[0] // box + 1])
    return any_data, top, count, MeshBackground(back, sigma, (ny, nx), box)


def _saturation_level(top, count, saturation):
    """Level of the raw pixels at and above which they are treated as saturated, or
    ``None``: 99.5 % of ``saturation``, or the converter's ceiling
    (:func:`drizzlestack.saturation.adc_ceiling`, from the frame's maximum ``top`` and
    the ``count`` of pixels at it) when the frame shows a lower one."""
    level = float(saturation) if saturation is not None and np.isfinite(saturation) and saturation > 0 else np.inf
    ceiling = ceiling_from_top(top, count, level)
    if ceiling < level:
        return min(ceiling, 0.995 * level)
    return 0.995 * level if np.isfinite(level) else None


def _pixel_mask(nodata, saturated, out):
    """The no-data and saturated pixels as one uint8 mask in ``out`` (``None`` when there
    are none), kept instead of the raw pixels."""
    if not nodata.any() and (saturated is None or not saturated.any()):
        return None
    np.multiply(nodata.view(np.uint8), _MASK_NODATA, out=out)
    if saturated is not None:
        np.bitwise_or(out, saturated.view(np.uint8), out=out)
    return out


def _band_pixels(src, bkg, sat_level, a: int, b: int, work: Work):
    """Rows ``a:b`` background-subtracted (no-data pixels 0, as sep saw them), their
    mask, and a spare band-sized float32 buffer (views of ``work``)."""
    n = b - a
    d = src.rows(a, b, work.view("d", n))
    nodata = np.logical_not(np.isfinite(d, out=work.view("nodata", n)), out=work.view("nodata", n))
    saturated = np.greater_equal(d, sat_level, out=work.view("flag", n)) if sat_level is not None else None
    mask = _pixel_mask(nodata, saturated, work.view("mask", n))
    holes = mask is not None and nodata.any()
    if holes:
        np.copyto(d, 0.0, where=nodata)
    buf = bkg.back_rows(a, b, out=work.view("buf", n))
    d -= buf
    if holes:
        np.copyto(d, 0.0, where=nodata)
    return d, mask, buf


def _saturated_at(mask, ix, iy):
    if mask is None:
        return np.zeros(len(ix), bool)
    return (mask[iy, ix] & _MASK_SATURATED) != 0


def _band_candidates(d, mask, px, py, row0):
    """Peaks of one band (band coordinates) that are not single-pixel spikes: the
    brightest raw pixel next to each (frame coordinates), its 3x3 neighbourhood and
    sum, whether it is saturated, and the plateau of each saturated one. Returns the
    per-peak sums and spike test (``flux3_all``, ``keep_all``, for the frame-wide
    selection) and the kept peaks' arrays."""
    ny, nx = d.shape
    # The filtered maximum can sit next to the brightest raw pixel: spikes are judged,
    # and stamps centred, on the latter.
    nb = _neighbourhood(d, px, py)
    k = np.argmax(nb.reshape(len(px), 9), axis=1)
    ix0 = np.clip(px + k % 3 - 1, 0, nx - 1)
    iy0 = np.clip(py + k // 3 - 1, 0, ny - 1)
    rx, ry, peak = _spike_ratios(d, ix0, iy0)
    spike = (np.minimum(rx, ry) < 0.12) & (peak > 0)
    saturated = _saturated_at(mask, ix0, iy0)
    # A saturated star has a flat top, so its peak neighbours are bright: never a spike.
    spike &= ~saturated
    nb = _neighbourhood(d, ix0, iy0)
    flux3 = nb.sum(axis=(1, 2))
    keep = ~spike & (flux3 > 0)
    plateau = np.full((int(keep.sum()), 3), np.nan)
    sat = saturated[keep]
    if sat.any():
        plateau[sat] = np.column_stack(_plateau_centres(mask, ix0[keep][sat], iy0[keep][sat], row0=row0))
    return {"flux3_all": flux3, "keep_all": keep, "n_spikes": int(spike.sum()),
            "ix0": ix0[keep], "iy0": iy0[keep] + row0, "nb": nb[keep], "flux3": flux3[keep],
            "saturated": sat, "plateau": plateau}


def _scan(src, bkg, sat_level, threshold, capacity, rows, work, limit):
    """Second pass: :func:`_band_candidates` of every band, concatenated in scan order
    (the order the whole frame gives), and the stamps of those that may be among the
    ``limit`` brightest (:class:`.bands.Gathered`). ``None`` when the frame has more than
    ``capacity`` peaks (noise, not stars)."""
    ny, nx = src.shape
    parts = []
    total = 0
    gathered = Gathered(limit, (ny, nx))
    n_kept = 0
    for y0, y1 in bands(ny, rows):
        a, b = max(0, y0 - _SCAN_HALO), min(ny, y1 + _SCAN_HALO)
        d, mask, buf = _band_pixels(src, bkg, sat_level, a, b, work)
        # The peak search needs two rows beyond its own, not the halo of the stamps.
        r0, r1 = max(0, y0 - a - 2), min(b - a, y1 - a + 2)
        rms = bkg.rms_rows(a + r0, a + r1, out=buf[:r1 - r0])
        if not rms.min() > 0:  # also catches NaN: a mesh with no valid pixel
            rms[~(np.isfinite(rms) & (rms > 0))] = bkg.globalrms
        px, py, _pv, count = _find_peaks(d[r0:r1], rms, float(threshold), capacity - total, y0 - a - r0,
                                         y1 - a - r0)
        py = py + r0
        if count < 0:
            return None
        total += count
        if count:
            part = _band_candidates(d, mask, px, py, a)
            part["kept_index"] = n_kept + np.arange(len(part["ix0"]))
            n_kept += len(part["ix0"])
            gathered.add(part, *_centres(part["ix0"], part["iy0"], part["nb"], part["saturated"], part["plateau"]),
                         d, mask, a)
            parts.append(part)
        del d, mask, buf, rms
    if not parts:
        return {}, gathered
    return ({key: np.concatenate([p[key] for p in parts]) if key != "n_spikes" else sum(p[key] for p in parts)
             for key in parts[0]}, gathered)


def _select_candidates(found, max_stars):
    """The kept peaks, at most ~1.25 ``max_stars`` of them (the brightest), and the
    number of spikes rejected."""
    keep = found["keep_all"].copy()
    if max_stars is not None and keep.sum() > 1.25 * max_stars + 50:
        # Fitting is the costly part: fit only the brightest candidates, with a margin
        # for those the fit will reject.
        order = np.argsort(-np.where(keep, found["flux3_all"], -np.inf))
        keep[order[int(1.25 * max_stars + 50):]] = False
    chosen = keep[found["keep_all"]]
    names = ("ix0", "iy0", "nb", "flux3", "saturated", "plateau", "kept_index")
    return {k: found[k][chosen] for k in names}, found["n_spikes"]


def _centres(ix0, iy0, nb, saturated, plateau):
    """Starting positions of candidates (:func:`_starting_positions`; a saturated one's
    plateau centre, as :func:`_merge_plateaus` sets it)."""
    x0, y0 = _starting_positions(ix0, iy0, nb)
    x0[saturated], y0[saturated] = plateau[saturated, 0], plateau[saturated, 1]
    return x0, y0


def _starting_positions(ix0, iy0, nb):
    """First moment of the 3x3 neighbourhood (within half a pixel of the peak pixel)."""
    w3 = np.maximum(nb, 0.0)
    wsum = np.maximum(w3.sum(axis=(1, 2)), 1e-30)
    off = np.arange(-1.0, 2.0)
    return ix0 + np.sum(w3.sum(axis=1) * off, axis=1) / wsum, iy0 + np.sum(w3.sum(axis=2) * off, axis=1) / wsum


def _merge_plateaus(cand):
    """A saturated star is a plateau that may hold several peaks: start each from the
    plateau's centre (``cand["plateau"]``, from :func:`_plateau_centres` as the bands were
    scanned) and keep one candidate per plateau. ``cand`` maps names to per-candidate
    arrays; returns it filtered, with the plateaus' radii."""
    sat = cand["saturated"]
    plateau = np.zeros(len(sat))
    if not sat.any():
        return cand, plateau
    idx = np.flatnonzero(sat)
    cand["x0"][idx], cand["y0"][idx], plateau[idx] = cand["plateau"][idx].T
    cx, cy = np.round(cand["x0"][idx], 1), np.round(cand["y0"][idx], 1)
    _, first = np.unique(np.column_stack([cx, cy]), axis=0, return_index=True)
    dup = np.ones(idx.size, bool)
    dup[first] = False
    keep = np.ones(len(sat), bool)
    keep[idx[dup]] = False
    return {k: v[keep] for k, v in cand.items()}, plateau[keep]


def _nearest_neighbours(x0, y0):
    """Distances and indices of each candidate's (up to) 5 nearest others."""
    n = len(x0)
    tree = cKDTree(np.column_stack([x0, y0]))
    kq = min(6, n)
    nd, ni = tree.query(np.column_stack([x0, y0]), k=kq)
    return nd.reshape(n, kq)[:, 1:], ni.reshape(n, kq)[:, 1:]


def _fit_candidates(take, shape, cand, plateau, nd, ni, s0):
    """Profile fits of every candidate: unsaturated ones on stamps of ~1.1 FWHM, the
    saturated on wider stamps reaching past their plateau (their wings). Returns
    params, cov, ok, flags, the starting values, and the ones without a fit."""
    x0, y0, saturated = cand["x0"], cand["y0"], cand["saturated"]
    n = len(x0)
    # +-(1.1 FWHM + 0.5) px reaches 4.5 sigma: all the light, and a ring for the local background.
    radius = int(np.clip(np.ceil(1.1 * s0 * SIGMA_TO_FWHM + 0.5), 2, 10))
    params = np.empty((n, 5))
    cov = np.empty((n, 5, 5))
    ok = np.zeros(n, bool)
    flags = np.zeros(n, dtype=np.int64)
    init = np.empty((n, 5))
    # Saturated stars are fitted on their wings, which lie beyond the plateau: a wider
    # stamp for them (a separate batch, as stamps of one batch share their size).
    batches = [(np.flatnonzero(~saturated), radius)]
    if saturated.any():
        r_sat = int(np.clip(np.ceil(plateau[saturated].max() + 2.5 * s0 * SIGMA_TO_FWHM), radius, 20))
        batches.append((np.flatnonzero(saturated), r_sat))
    for sel, rad in batches:
        if sel.size:
            params[sel], cov[sel], ok[sel], flags[sel], init[sel] = _measure(take, shape, x0, y0, nd, ni, sel, rad, s0)
    flags[saturated] |= FLAG_SATURATED
    # A fit that fails is a bump on something else (a galaxy, a bright star's wing)
    # and is dropped, except on a saturated star, which keeps its plateau-centre
    # position (flagged) so that it can still serve for pattern matching.
    nofit = ~ok & ((flags & FLAG_SATURATED) != 0)
    params[nofit] = init[nofit]
    flags[nofit] |= FLAG_NOFIT
    return params, cov, ok, flags, init, nofit


def _star_table(shape, params, cov, ok, flags, init, nofit, nb, noise, s0, min_snr, max_stars):
    """The star table (brightest first) from the fits: S/N, FWHM and peak columns;
    narrow spikes, faint, outside and duplicate sources dropped. Returns the table and
    the number of narrow spikes."""
    ny, nx = shape
    with np.errstate(invalid="ignore", divide="ignore"):
        flux_err = np.sqrt(np.maximum(cov[:, 2, 2], 0.0))
        snr = np.where(ok & (flux_err > 0), params[:, 2] / flux_err,
                       init[:, 2] / (noise * np.sqrt(4 * np.pi * (s0 ** 2 + 1 / 12))))
    fwhm = params[:, 3] * SIGMA_TO_FWHM
    peak = nb.max(axis=(1, 2)).astype(np.float64)

    good_width = ok & (flags == 0) & (snr > 20)
    med_sigma = float(np.median(params[good_width, 3])) if good_width.sum() >= 3 else s0
    # Narrow after the fit: a spike that slipped past the neighbour test (faint ones).
    narrow = ok & (params[:, 3] < 0.4 * med_sigma) & ((flags & FLAG_SATURATED) == 0)
    inframe = (params[:, 0] > -0.5) & (params[:, 0] < nx - 0.5) & (params[:, 1] > -0.5) & (params[:, 1] < ny - 0.5)
    keep = (ok | nofit) & ~narrow & (snr >= min_snr) & inframe & np.all(np.isfinite(params[:, :2]), axis=1)
    table = np.column_stack([params[:, 0], params[:, 1], params[:, 2], fwhm, peak, snr, flags.astype(np.float64)])
    table = table[keep]
    table = table[np.argsort(-table[:, 2], kind="stable")]
    # Two peaks of one star (a saturated plateau, a ragged top) converge to one position:
    # keep the brighter.
    if len(table) > 1:
        pairs = cKDTree(table[:, :2]).query_pairs(max(1.0, 0.5 * med_sigma * SIGMA_TO_FWHM), output_type="ndarray")
        if len(pairs):
            drop = np.zeros(len(table), bool)
            drop[np.max(pairs, axis=1)] = True  # sorted by flux: the larger index is fainter
            table = table[~drop]
    if max_stars is not None:
        table = table[:max_stars]
    return table, int(narrow.sum())


def _frame_fwhm(table) -> float:
    """Median FWHM of the clean stars with S/N over 20 (of all stars when fewer than 3)."""
    sel = (table[:, 6] == 0) & (table[:, 5] > 20)
    if sel.sum() >= 3:
        return float(np.median(table[sel, 3]))
    return float(np.median(table[:, 3])) if len(table) else np.nan


def detect_stars(data, saturation: float | None = None, threshold: float = 5.0, max_stars: int | None = 2000,
                 min_snr: float = 5.0, background_box: int = 64, overwrite_input: bool = False) -> StarList:
    """Detect and measure the stars of one frame.

    Parameters
    ----------
    data : (ny, nx) array_like, or a source of row bands
        Frame pixels; NaN means no data. Instead of an array, any object with a
        ``shape`` and a ``rows(y0, y1, out)`` method that writes rows ``y0:y1`` into the
        float32 array ``out`` and returns it (e.g.
        :meth:`drizzlestack.store.StackStore.frame_rows`, which reads a stored frame a
        band at a time): then the frame is never in memory whole.
    saturation : float, optional
        Saturation level of the *raw* pixel values (ADU). Pixels at or above 99.5 % of
        it are left out of the fits and their star is flagged :data:`FLAG_SATURATED`.
        A lower converter ceiling that the frame shows (a pile-up at ``2**k - 1``,
        :func:`drizzlestack.saturation.adc_ceiling`, the rule ingest uses) is taken
        instead.
    threshold : float
        Detection threshold: signal-to-noise ratio of the peak in the image filtered
        with the 3x3 kernel ``[1 2 1] x [1 2 1]`` (a matched filter for undersampled
        stars), the noise taken from the background noise map.
    max_stars : int, optional
        Keep at most this many stars (the brightest).
    min_snr : float
        Drop stars whose fitted flux has a lower signal-to-noise ratio.
    background_box : int
        Mesh size of the background and noise maps (px).
    overwrite_input : bool
        Accepted for compatibility and ignored: detection never writes to ``data``
        and holds no frame-sized buffer.

    Returns
    -------
    StarList
        Empty (with the background and noise still measured when possible) when the
        frame has no detectable star, e.g. a blank frame.

    Notes
    -----
    Memory: a few bands of 256 rows (with their halos) and the candidates' stamps,
    whatever the frame's size. The frame is read twice, a band at a time (``_survey``:
    saturation level and background mesh; ``_scan``: peaks, candidates and their
    stamps); the background and noise maps are sep's
    (:mod:`drizzlestack.registration.background`), evaluated for each band.

    Single-pixel sources are rejected when the two neighbours along x or along y hold
    less than 12 % of the peak pixel's light (a centred FWHM 1.0 px star puts 32 % there,
    a hot pixel ~0, a cosmic ray with a one-pixel tail ~0 across the tail), and, after
    the fit, when a source is narrower than 40 % of the frame's median width.
    """
    src = data if (hasattr(data, "rows") and hasattr(data, "shape")) else ArrayRows(np.asarray(data))
    ny, nx = src.shape
    box = int(min(background_box, max(8, min(ny, nx) // 4)))
    rows = max(box, (_BAND_ROWS // box) * box)
    work = Work(min(ny, rows + 2 * _SCAN_HALO), nx)
    any_data, top, count, bkg = _survey(src, box, rows, work)
    if not any_data:
        return StarList(empty_table())
    sat_level = _saturation_level(top, count, saturation)
    background, noise = bkg.globalback, bkg.globalrms
    if not np.isfinite(noise) or noise <= 0:
        return StarList(empty_table(), background, noise)

    # Candidates: local maxima of the matched-filtered S/N image (sep's own extraction
    # costs ~0.3 s per 4 Mpx, this ~0.03 s; and local maxima split close pairs).
    scanned = _scan(src, bkg, sat_level, threshold, max(20_000, ny * nx // 16), rows, work,
                    None if max_stars is None else int(1.25 * max_stars + 50))
    del work
    if scanned is None or not scanned[0]:  # none, or more peaks than a sixteenth of the pixels: noise
        return StarList(empty_table(), background, noise)
    found, gathered = scanned
    picked, n_rejected = _select_candidates(found, max_stars)
    del found
    ix0, iy0, nb = picked["ix0"], picked["iy0"], picked["nb"]
    if len(ix0) == 0:
        return StarList(empty_table(), background, noise, n_rejected=n_rejected)
    x0, y0 = _starting_positions(ix0, iy0, nb)
    cand = {**picked, "x0": x0, "y0": y0}
    cand, plateau = _merge_plateaus(cand)
    nd, ni = _nearest_neighbours(cand["x0"], cand["y0"])
    take = gathered.stamps(cand["kept_index"], cand["x0"], cand["y0"])
    del gathered

    # The width: a quick fit of the brightest unsaturated, isolated stars on wide stamps
    # sets the stamp size and the starting point of the main fit.
    isolated = nd[:, 0] > 8.0 if nd.shape[1] else np.ones(len(cand["x0"]), bool)
    s0 = _typical_sigma(take, (ny, nx), cand["x0"], cand["y0"], cand["flux3"], isolated & ~cand["saturated"])
    params, cov, ok, flags, init, nofit = _fit_candidates(take, (ny, nx), cand, plateau, nd, ni, s0)
    table, n_narrow = _star_table((ny, nx), params, cov, ok, flags, init, nofit, cand["nb"], noise, s0,
                                  min_snr, max_stars)
    return StarList(table, background, noise, _frame_fwhm(table), n_rejected + n_narrow)
