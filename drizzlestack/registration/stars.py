"""Star detection and measurement for registration.

Background and noise maps come from ``sep`` (Source Extractor's, as a library).
Candidates are the local maxima of the background-subtracted image divided by the noise
map and filtered with Source Extractor's default 3x3 kernel (a matched filter for
undersampled stars) -- ten times faster than a full segmentation, and local maxima keep
close pairs apart.

Positions do **not** come from windowed or isophotal centroids: on undersampled stars
(FWHM 1-2 px) a Gaussian window narrower than ~1.5 px has a pixel-phase bias of
0.02-0.1 px, and a wider one fails on faint stars. Instead every star is fitted with a
*pixel-integrated* circular Gaussian (the model pixel value is the Gaussian integrated
over the pixel's square, ``A [Phi(x+1/2) - Phi(x-1/2)] [Phi(y+1/2) - Phi(y-1/2)] + b``),
which has no pixel-phase bias for any sampling. The fit is a Levenberg-Marquardt
iteration per star (small stamps, five parameters), compiled with numba.

Sharp single-pixel sources (hot pixels, cosmic rays, their one-pixel tails) are rejected:
a real star, even undersampled, spreads light into its neighbours along *both* axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import sep
from scipy.spatial import cKDTree

from ..constants import SIGMA_TO_FWHM  # noqa: F401  (also importable from here)
from ..saturation import adc_ceiling

#: columns of a star table, in order (the ``field`` coordinate of the store's ``stars``)
FIELDS = ("x", "y", "flux", "fwhm", "peak", "snr", "flags")
#: ``flags`` bits
FLAG_SATURATED = 1  #: the star has pixels at or above the saturation level (fitted on its wings)
FLAG_BLENDED = 2  #: deblended from, or overlapping, another source
FLAG_TRUNCATED = 4  #: the fitting stamp was cut by the frame edge or by invalid pixels
FLAG_NOFIT = 8  #: the profile fit did not converge (saturated star): first-moment position

_SQRT2 = np.sqrt(2.0)
_SQRTPI = np.sqrt(np.pi)


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


@numba.njit(nogil=True, cache=True)
def _profile_1d(pix0, k, c, sig, e, de_dc, de_ds):
    """Pixel-integrated unit 1-D Gaussian at pixels ``pix0 .. pix0 + k - 1`` and its
    derivatives with respect to the centre ``c`` and the width ``sig``."""
    r2s = 1.0 / (_SQRT2 * sig)
    for j in range(k):
        hi = (pix0 + j + 0.5 - c) * r2s
        lo = (pix0 + j - 0.5 - c) * r2s
        ghi = np.exp(-hi * hi)
        glo = np.exp(-lo * lo)
        e[j] = 0.5 * (math.erf(hi) - math.erf(lo))
        de_dc[j] = -(ghi - glo) * r2s / _SQRTPI
        de_ds[j] = -(hi * ghi - lo * glo) / (_SQRTPI * sig)


@numba.njit(nogil=True, cache=True)
def _chi2_and_normal(st, vd, x0, y0, p, ex, dex, dexs, ey, dey, deys, jtj, jtr, want_normal):
    """Chi-square of params ``p`` on one stamp and, if asked, ``J^T J`` and ``J^T r``."""
    k = st.shape[0]
    _profile_1d(x0, k, p[0], p[3], ex, dex, dexs)
    _profile_1d(y0, k, p[1], p[3], ey, dey, deys)
    chi2 = 0.0
    if want_normal:
        for a in range(5):
            jtr[a] = 0.0
            for b in range(5):
                jtj[a, b] = 0.0
    g = np.empty(5)
    for i in range(k):
        for j in range(k):
            if not vd[i, j]:
                continue
            prof = ey[i] * ex[j]
            r = st[i, j] - (p[2] * prof + p[4])
            chi2 += r * r
            if want_normal:
                g[0] = p[2] * ey[i] * dex[j]
                g[1] = p[2] * dey[i] * ex[j]
                g[2] = prof
                g[3] = p[2] * (deys[i] * ex[j] + ey[i] * dexs[j])
                g[4] = 1.0
                for a in range(5):
                    jtr[a] += g[a] * r
                    for b in range(a, 5):
                        jtj[a, b] += g[a] * g[b]
    if want_normal:
        for a in range(5):
            for b in range(a):
                jtj[a, b] = jtj[b, a]
    return chi2


@numba.njit(nogil=True, cache=True)
def _solve5(a, b, out):
    """Solve the 5x5 system ``a out = b`` by Gaussian elimination with partial pivoting;
    False if singular."""
    m = a.copy()
    v = b.copy()
    for c in range(5):
        piv = c
        for r in range(c + 1, 5):
            if abs(m[r, c]) > abs(m[piv, c]):
                piv = r
        if m[piv, c] == 0.0 or not np.isfinite(m[piv, c]):
            return False
        if piv != c:
            for q in range(5):
                m[c, q], m[piv, q] = m[piv, q], m[c, q]
            v[c], v[piv] = v[piv], v[c]
        for r in range(c + 1, 5):
            f = m[r, c] / m[c, c]
            for q in range(c, 5):
                m[r, q] -= f * m[c, q]
            v[r] -= f * v[c]
    for c in range(4, -1, -1):
        acc = v[c]
        for q in range(c + 1, 5):
            acc -= m[c, q] * out[q]
        out[c] = acc / m[c, c]
    return True


@numba.njit(nogil=True, cache=True)
def _fit_all(stamps, valid, px0, py0, init, n_iter, min_sigma, params, cov, ok):
    n, k = stamps.shape[0], stamps.shape[1]
    ex = np.empty(k)
    dex = np.empty(k)
    dexs = np.empty(k)
    ey = np.empty(k)
    dey = np.empty(k)
    deys = np.empty(k)
    jtj = np.empty((5, 5))
    jtr = np.empty(5)
    tj = np.empty((5, 5))
    tr = np.empty(5)
    a = np.empty((5, 5))
    step = np.empty(5)
    trial = np.empty(5)
    col = np.empty(5)
    unit = np.empty(5)
    for s in range(n):
        st = stamps[s]
        vd = valid[s]
        p = params[s]
        for q in range(5):
            p[q] = init[s, q]
        npix = 0
        for i in range(k):
            for j in range(k):
                if vd[i, j]:
                    npix += 1
        ok[s] = False
        if npix < 6:
            continue
        chi2 = _chi2_and_normal(st, vd, px0[s], py0[s], p, ex, dex, dexs, ey, dey, deys, jtj, jtr, True)
        lam = 1e-3
        for _ in range(n_iter):
            for r in range(5):
                for c in range(5):
                    a[r, c] = jtj[r, c]
                # damping, plus a tiny ridge so a degenerate stamp never makes it singular
                a[r, r] += lam * jtj[r, r] + 1e-12 * (jtj[r, r] + 1e-300)
            if not _solve5(a, jtr, step):
                lam *= 10.0
                if lam > 1e8:
                    break
                continue
            for q in range(5):
                trial[q] = p[q] + step[q]
            if trial[3] < min_sigma:
                trial[3] = min_sigma
            t_chi2 = _chi2_and_normal(st, vd, px0[s], py0[s], trial, ex, dex, dexs, ey, dey, deys, tj, tr, True)
            if np.isfinite(t_chi2) and t_chi2 <= chi2:
                small = abs(chi2 - t_chi2) <= 1e-7 * max(chi2, 1e-30) or \
                    max(abs(step[0]), abs(step[1])) < 1e-4
                for q in range(5):
                    p[q] = trial[q]
                    jtr[q] = tr[q]
                    for c in range(5):
                        jtj[q, c] = tj[q, c]
                chi2 = t_chi2
                lam *= 0.3
                if small:
                    break
            else:
                lam *= 10.0
                if lam > 1e8:
                    break
        # covariance: (J^T J)^-1 scaled by the reduced chi-square (which carries the
        # source's own photon noise, not modelled by the uniform weights)
        scale = chi2 / max(npix - 5.0, 1.0)
        good = True
        for c in range(5):
            for q in range(5):
                unit[q] = 1.0 if q == c else 0.0
            for r in range(5):
                for q in range(5):
                    a[r, q] = jtj[r, q]
                a[r, r] += 1e-12 * (jtj[r, r] + 1e-300)
            if not _solve5(a, unit, col):
                good = False
                break
            for r in range(5):
                cov[s, r, c] = col[r] * scale
        ok[s] = good and np.isfinite(p[0]) and np.isfinite(p[1]) and p[2] > 0.0


def fit_gaussians(stamps, valid, px, py, init, n_iter: int = 30, min_sigma: float = 0.15):
    """Least-squares fit of pixel-integrated circular Gaussians to many stamps.

    Parameters
    ----------
    stamps : (n, K, K) float64
        Background-subtracted pixel values (any value where not ``valid``).
    valid : (n, K, K) bool
        Pixels that take part in the fit.
    px, py : (n, K) float64
        Pixel-centre x of the stamp columns and y of its rows, in frame pixels
        (consecutive integers).
    init : (n, 5) float64
        Starting ``(x, y, flux, sigma, background offset)``.
    n_iter : int
        Most Levenberg-Marquardt steps per star.
    min_sigma : float
        Lower bound of the Gaussian sigma (px): a hot pixel runs to it.

    Returns
    -------
    params : (n, 5) float64
        Fitted ``(x, y, flux, sigma, b)``.
    cov : (n, 5, 5) float64
        Parameter covariance, scaled by the reduced chi-square (so it includes the
        source's own photon noise, which a uniform-weight fit does not model).
    ok : (n,) bool
        The fit converged to a sensible star.
    """
    n = stamps.shape[0]
    params = np.empty((n, 5))
    cov = np.full((n, 5, 5), np.nan)
    ok = np.zeros(n, bool)
    if n:
        _fit_all(np.ascontiguousarray(stamps, dtype=np.float64), np.ascontiguousarray(valid, dtype=np.bool_),
                 np.ascontiguousarray(px[:, 0], dtype=np.float64), np.ascontiguousarray(py[:, 0], dtype=np.float64),
                 np.ascontiguousarray(init, dtype=np.float64), int(n_iter), float(min_sigma), params, cov, ok)
    return params, cov, ok


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
def _find_peaks(d, rms, threshold, capacity):
    """Local maxima of the matched-filtered signal-to-noise image above ``threshold``.

    The filter is sep's and Source Extractor's default 3x3 kernel ``[1 2 1] x [1 2 1]``
    applied to ``d / rms``, divided by its noise gain (``sqrt(36) / 16``), so the
    filtered image has unit noise and ``threshold`` is a matched-filter S/N. A pixel is a
    peak if it beats its 8 neighbours (ties go to the first in scan order). Returns
    ``(x, y, snr, count)`` of the peaks; ``count`` is -1 when there are more than
    ``capacity``.

    ``rms`` is overwritten by the filtered image: frames can be 100+ Mpx, and the
    noise map is not needed afterwards, so it is the filter's only full-size buffer.
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
    for y in range(ny):
        for x in range(nx):
            if f[y, x] > threshold and _is_peak(f, y, x):
                count += 1
    if count > capacity:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), -1
    xs = np.empty(count, np.int64)
    ys = np.empty(count, np.int64)
    vs = np.empty(count, np.float32)
    k = 0
    for y in range(ny):
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


def _typical_sigma(d, x, y, flux, clean, n: int = 100, radius: int = 5) -> float:
    """Median Gaussian sigma (px) of the ``n`` brightest clean stars, from wide-stamp fits."""
    ny, nx = d.shape
    cand = clean & (x > radius) & (x < nx - 1 - radius) & (y > radius) & (y < ny - 1 - radius)
    idx = np.flatnonzero(cand)
    idx = idx[np.argsort(-flux[idx])][:n]
    if idx.size < 3:
        return 1.0
    ix, iy = _stamp_indices(x[idx], y[idx], radius)
    stamps = d[iy[:, :, None], ix[:, None, :]].astype(np.float64)
    init = np.column_stack([x[idx], y[idx], np.maximum(stamps.sum(axis=(1, 2)), 1e-3),
                            np.full(idx.size, 1.0), np.zeros(idx.size)])
    params, _cov, ok = fit_gaussians(stamps, np.ones(stamps.shape, bool), ix.astype(np.float64),
                                     iy.astype(np.float64), init)
    ok &= (params[:, 3] > 0.2) & (params[:, 3] < radius)
    return float(np.median(params[ok, 3])) if ok.sum() >= 3 else 1.0


def _plateau_centres(mask, ix0, iy0, window: int = 25):
    """Centre (mean position) and equivalent radius of the saturated plateau holding each
    peak pixel ``(ix0, iy0)`` (its connected saturated pixels in ``mask``)."""
    from scipy import ndimage

    ny, nx = mask.shape
    xs, ys, rs = np.empty(len(ix0)), np.empty(len(ix0)), np.empty(len(ix0))
    for k, (x, y) in enumerate(zip(ix0, iy0)):
        xa, xb = max(x - window, 0), min(x + window + 1, nx)
        ya, yb = max(y - window, 0), min(y + window + 1, ny)
        lab, _ = ndimage.label((mask[ya:yb, xa:xb] & _MASK_SATURATED) != 0)
        comp = lab == lab[y - ya, x - xa]
        vy, vx = np.nonzero(comp)
        xs[k], ys[k] = xa + vx.mean(), ya + vy.mean()
        rs[k] = np.sqrt(vx.size / np.pi)
    return xs, ys, rs


def _measure(d, mask, x0, y0, nd, ni, sel, radius, s0):
    """Fit candidates ``sel`` on stamps of ``radius``; invalid and saturated pixels are
    left out, and so are the pixels nearer to a neighbouring candidate than to this one
    (a Voronoi split of blends). Returns params, cov, ok, flags and the starting values."""
    ny, nx = d.shape
    n_all = len(x0)
    xs, ys = x0[sel], y0[sel]
    ix, iy = _stamp_indices(xs, ys, radius)
    inside = (ix[:, None, :] >= 0) & (ix[:, None, :] < nx) & (iy[:, :, None] >= 0) & (iy[:, :, None] < ny)
    cix, ciy = np.clip(ix, 0, nx - 1), np.clip(iy, 0, ny - 1)
    stamps = d[ciy[:, :, None], cix[:, None, :]].astype(np.float64)
    m = mask[ciy[:, :, None], cix[:, None, :]] if mask is not None else np.zeros(stamps.shape, np.uint8)
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
def _saturation_level(raw, saturation):
    """Level of the raw pixels at and above which they are treated as saturated, or
    ``None``: 99.5 % of ``saturation``, or the converter's ceiling
    (:func:`drizzlestack.saturation.adc_ceiling`) when the frame shows a lower one."""
    level = float(saturation) if saturation is not None and np.isfinite(saturation) and saturation > 0 else np.inf
    ceiling = adc_ceiling(raw, level)
    if ceiling < level:
        return min(ceiling, 0.995 * level)
    return 0.995 * level if np.isfinite(level) else None


def _pixel_mask(raw, sat_level):
    """The no-data and saturated pixels as one uint8 mask (``None`` when there are
    none): a quarter of a float32 frame, kept instead of the raw pixels."""
    nodata = ~np.isfinite(raw)
    saturated = (raw >= sat_level) if sat_level is not None else None
    if not nodata.any() and (saturated is None or not saturated.any()):
        return None
    mask = nodata.view(np.uint8) * _MASK_NODATA
    if saturated is not None:
        mask |= saturated.view(np.uint8)
    return mask


def _subtract_background(d, mask, background_box):
    """Background-subtract ``d`` in place (no-data pixels set to 0) and return the
    noise map, the global background and the global noise (sep)."""
    nodata = mask is not None and bool(np.any(mask & _MASK_NODATA))
    if nodata:
        d[(mask & _MASK_NODATA) != 0] = 0.0
    ny, nx = d.shape
    box = int(min(background_box, max(8, min(ny, nx) // 4)))
    bkg = sep.Background(d, mask=mask if nodata else None, maskthresh=1.0, bw=box, bh=box, fw=3, fh=3)
    noise = float(bkg.globalrms)
    background = float(bkg.globalback)
    if not np.isfinite(noise) or noise <= 0:
        return None, background, noise
    rms = bkg.rms()
    if not rms.min() > 0:  # also catches NaN: a mesh with no valid pixel
        rms[~(np.isfinite(rms) & (rms > 0))] = noise
    bkg.subfrom(d)  # in place: no full-size background map
    if nodata:
        d[(mask & _MASK_NODATA) != 0] = 0.0
    return rms, background, noise


def _saturated_at(mask, ix, iy):
    if mask is None:
        return np.zeros(len(ix), bool)
    return (mask[iy, ix] & _MASK_SATURATED) != 0


def _candidates(d, mask, px, py, max_stars):
    """Peak pixels that are not single-pixel spikes (at most ~1.25 ``max_stars``, the
    brightest): positions ``ix0, iy0``, 3x3 neighbourhoods, their sums, whether the peak
    is saturated, and the number of spikes rejected."""
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
    n_rejected = int(spike.sum())
    if max_stars is not None and keep.sum() > 1.25 * max_stars + 50:
        # Fitting is the costly part: fit only the brightest candidates, with a margin
        # for those the fit will reject.
        order = np.argsort(-np.where(keep, flux3, -np.inf))
        keep[order[int(1.25 * max_stars + 50):]] = False
    return ix0[keep], iy0[keep], nb[keep], flux3[keep], saturated[keep], n_rejected


def _starting_positions(ix0, iy0, nb):
    """First moment of the 3x3 neighbourhood (within half a pixel of the peak pixel)."""
    w3 = np.maximum(nb, 0.0)
    wsum = np.maximum(w3.sum(axis=(1, 2)), 1e-30)
    off = np.arange(-1.0, 2.0)
    return ix0 + np.sum(w3.sum(axis=1) * off, axis=1) / wsum, iy0 + np.sum(w3.sum(axis=2) * off, axis=1) / wsum


def _merge_plateaus(mask, cand):
    """A saturated star is a plateau that may hold several peaks: start each from the
    plateau's centre and keep one candidate per plateau. ``cand`` maps names to
    per-candidate arrays; returns it filtered, with the plateaus' radii."""
    sat = cand["saturated"]
    plateau = np.zeros(len(sat))
    if not sat.any():
        return cand, plateau
    idx = np.flatnonzero(sat)
    cand["x0"][idx], cand["y0"][idx], plateau[idx] = _plateau_centres(mask, cand["ix0"][idx], cand["iy0"][idx])
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


def _fit_candidates(d, mask, cand, plateau, nd, ni, s0):
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
            params[sel], cov[sel], ok[sel], flags[sel], init[sel] = _measure(d, mask, x0, y0, nd, ni, sel, rad, s0)
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
    data : (ny, nx) array_like
        Frame pixels; NaN means no data.
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
        ``data`` (float32, C-contiguous) may be overwritten with the
        background-subtracted frame, which saves a frame-sized copy.

    Returns
    -------
    StarList
        Empty (with the background and noise still measured when possible) when the
        frame has no detectable star, e.g. a blank frame.

    Notes
    -----
    Memory: the frame itself (background-subtracted in place), the noise map (which the
    peak filter then overwrites) and a uint8 mask of no-data and saturated pixels.

    Single-pixel sources are rejected when the two neighbours along x or along y hold
    less than 12 % of the peak pixel's light (a centred FWHM 1.0 px star puts 32 % there,
    a hot pixel ~0, a cosmic ray with a one-pixel tail ~0 across the tail), and, after
    the fit, when a source is narrower than 40 % of the frame's median width.
    """
    raw = np.asarray(data)
    d = np.ascontiguousarray(raw, dtype=np.float32)
    if d is raw and not (overwrite_input and d.flags.writeable):
        d = d.copy()  # the caller's pixels stay as they are
    if not np.isfinite(d).any():
        return StarList(empty_table())
    sat_level = _saturation_level(d, saturation)
    mask = _pixel_mask(d, sat_level)
    rms, background, noise = _subtract_background(d, mask, background_box)
    if rms is None:
        return StarList(empty_table(), background, noise)

    # Candidates: local maxima of the matched-filtered S/N image (sep's own extraction
    # costs ~0.3 s per 4 Mpx, this ~0.03 s; and local maxima split close pairs).
    ny, nx = d.shape
    px, py, _pv, count = _find_peaks(d, rms, float(threshold), max(20_000, ny * nx // 16))
    del rms  # overwritten by the filtered image
    if count <= 0:  # none, or more peaks than a sixteenth of the pixels: noise, not stars
        return StarList(empty_table(), background, noise)
    ix0, iy0, nb, flux3, saturated, n_rejected = _candidates(d, mask, px, py, max_stars)
    if len(ix0) == 0:
        return StarList(empty_table(), background, noise, n_rejected=n_rejected)
    x0, y0 = _starting_positions(ix0, iy0, nb)
    cand = {"ix0": ix0, "iy0": iy0, "nb": nb, "flux3": flux3, "x0": x0, "y0": y0, "saturated": saturated}
    cand, plateau = _merge_plateaus(mask, cand)
    nd, ni = _nearest_neighbours(cand["x0"], cand["y0"])

    # The width: a quick fit of the brightest unsaturated, isolated stars on wide stamps
    # sets the stamp size and the starting point of the main fit.
    isolated = nd[:, 0] > 8.0 if nd.shape[1] else np.ones(len(cand["x0"]), bool)
    s0 = _typical_sigma(d, cand["x0"], cand["y0"], cand["flux3"], isolated & ~cand["saturated"])
    params, cov, ok, flags, init, nofit = _fit_candidates(d, mask, cand, plateau, nd, ni, s0)
    table, n_narrow = _star_table(d.shape, params, cov, ok, flags, init, nofit, cand["nb"], noise, s0,
                                  min_snr, max_stars)
    return StarList(table, background, noise, _frame_fwhm(table), n_rejected + n_narrow)
