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

#: columns of a star table, in order (the ``field`` coordinate of the store's ``stars``)
FIELDS = ("x", "y", "flux", "fwhm", "peak", "snr", "flags")
#: ``flags`` bits
FLAG_SATURATED = 1  #: the star has pixels at or above the saturation level (fitted on its wings)
FLAG_BLENDED = 2  #: deblended from, or overlapping, another source
FLAG_TRUNCATED = 4  #: the fitting stamp was cut by the frame edge or by invalid pixels
FLAG_NOFIT = 8  #: the profile fit did not converge (saturated star): first-moment position

SIGMA_TO_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))
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
def _find_peaks(d, rms, threshold, capacity):
    """Local maxima of the matched-filtered signal-to-noise image above ``threshold``.

    The filter is sep's and Source Extractor's default 3x3 kernel ``[1 2 1] x [1 2 1]``
    applied to ``d / rms``, divided by its noise gain (``sqrt(36) / 16``), so the
    filtered image has unit noise and ``threshold`` is a matched-filter S/N. A pixel is a
    peak if it beats its 8 neighbours (ties go to the first in scan order, so a flat
    top gives one peak). Returns ``(x, y, snr)`` of at most ``capacity`` peaks.
    """
    ny, nx = d.shape
    # One full-size buffer (frames can be 100+ Mpx): the horizontal pass of d / rms, then
    # the vertical pass in place, keeping the unfiltered rows it still needs.
    h = np.empty((ny, nx), np.float32)
    for y in range(ny):
        for x in range(nx):
            v = 2.0 * (d[y, x] / rms[y, x])
            if x > 0:
                v += d[y, x - 1] / rms[y, x - 1]
            if x < nx - 1:
                v += d[y, x + 1] / rms[y, x + 1]
            h[y, x] = v
    f = h
    norm = 1.0 / 6.0  # 1 / (16 * 0.375): unit noise after filtering
    above = np.zeros(nx, np.float32)  # the unfiltered row above
    row = np.empty(nx, np.float32)
    for y in range(ny):
        row[:] = h[y]
        for x in range(nx):
            v = 2.0 * row[x] + above[x] + (h[y + 1, x] if y < ny - 1 else 0.0)
            f[y, x] = v * norm
        above[:] = row
    xs = np.empty(capacity, np.int64)
    ys = np.empty(capacity, np.int64)
    vs = np.empty(capacity, np.float32)
    count = 0
    for y in range(ny):
        for x in range(nx):
            v = f[y, x]
            if not v > threshold:
                continue
            is_max = True
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
                            is_max = False
                    elif w > v:
                        is_max = False
            if is_max:
                if count == capacity:
                    return xs, ys, vs, -1
                xs[count] = x
                ys[count] = y
                vs[count] = v
                count += 1
    return xs[:count], ys[:count], vs[:count], count


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


def _plateau_centres(raw, sat_level, ix0, iy0, window: int = 25):
    """Centre (mean position) and equivalent radius of the saturated plateau holding each
    peak pixel ``(ix0, iy0)`` (its connected pixels at or above ``sat_level``)."""
    from scipy import ndimage

    ny, nx = raw.shape
    xs, ys, rs = np.empty(len(ix0)), np.empty(len(ix0)), np.empty(len(ix0))
    for k, (x, y) in enumerate(zip(ix0, iy0)):
        xa, xb = max(x - window, 0), min(x + window + 1, nx)
        ya, yb = max(y - window, 0), min(y + window + 1, ny)
        lab, _ = ndimage.label(raw[ya:yb, xa:xb] >= sat_level)
        comp = lab == lab[y - ya, x - xa]
        vy, vx = np.nonzero(comp)
        xs[k], ys[k] = xa + vx.mean(), ya + vy.mean()
        rs[k] = np.sqrt(vx.size / np.pi)
    return xs, ys, rs


def _measure(d, raw, bad, sat_level, x0, y0, nd, ni, sel, radius, s0):
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
    usable = inside & ~bad[ciy[:, :, None], cix[:, None, :]]
    own = np.ones_like(usable)
    d_own = (ix[:, None, :] - xs[:, None, None]) ** 2 + (iy[:, :, None] - ys[:, None, None]) ** 2
    for j in range(nd.shape[1]):
        near = nd[sel, j] < 2 * radius + 2
        if not near.any():
            break
        other = ni[sel, j] % n_all
        d_nb = (ix[:, None, :] - x0[other][:, None, None]) ** 2 + (iy[:, :, None] - y0[other][:, None, None]) ** 2
        own &= ~(near[:, None, None] & (d_nb < d_own))
    saturated_px = np.zeros_like(usable)
    if sat_level is not None:
        saturated_px = raw[ciy[:, :, None], cix[:, None, :]] >= sat_level
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


def detect_stars(data, saturation: float | None = None, threshold: float = 5.0, max_stars: int | None = 2000,
                 min_snr: float = 5.0, background_box: int = 64) -> StarList:
    """Detect and measure the stars of one frame.

    Parameters
    ----------
    data : (ny, nx) array_like
        Frame pixels; NaN means no data.
    saturation : float, optional
        Saturation level of the *raw* pixel values (ADU). Pixels at or above 99.5 % of
        it are left out of the fits and their star is flagged :data:`FLAG_SATURATED`.
        When four or more pixels share the frame's maximum value, that value is taken
        as the level if it is lower (clipped data in a wider integer type).
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

    Returns
    -------
    StarList
        Empty (with the background and noise still measured when possible) when the
        frame has no detectable star, e.g. a blank frame.

    Notes
    -----
    Single-pixel sources are rejected when the two neighbours along x or along y hold
    less than 12 % of the peak pixel's light (a centred FWHM 1.0 px star puts 32 % there,
    a hot pixel ~0, a cosmic ray with a one-pixel tail ~0 across the tail), and, after
    the fit, when a source is narrower than 40 % of the frame's median width.
    """
    data = np.asarray(data)
    raw = np.ascontiguousarray(data, dtype=np.float32)
    bad = ~np.isfinite(raw)
    sat_level = None
    if saturation is not None and np.isfinite(saturation) and saturation > 0:
        sat_level = 0.995 * float(saturation)
    if bad.all():
        return StarList(empty_table())
    # Cameras that store 12- or 14-bit data in 16-bit files saturate far below the type's
    # maximum (the usual default). Several pixels sharing the frame's exact maximum are
    # clipped, whatever the header says.
    top = float(np.nanmax(raw))
    if np.count_nonzero(raw == top) >= 4 and (sat_level is None or top < sat_level):
        sat_level = top
    work = np.where(bad, np.float32(0.0), raw) if bad.any() else raw
    ny, nx = work.shape
    box = int(min(background_box, max(8, min(ny, nx) // 4)))
    bkg = sep.Background(work, mask=bad if bad.any() else None, bw=box, bh=box, fw=3, fh=3)
    noise = float(bkg.globalrms)
    background = float(bkg.globalback)
    if not np.isfinite(noise) or noise <= 0:
        return StarList(empty_table(), background, noise)
    rms = bkg.rms()
    if not rms.min() > 0:  # also catches NaN: a mesh with no valid pixel
        rms = np.where(np.isfinite(rms) & (rms > 0), rms, noise).astype(np.float32)
    d = work.copy() if work is raw else work  # the raw pixels are measured later
    bkg.subfrom(d)  # in place: no full-size background map
    d[bad] = 0.0

    # Candidates: local maxima of the matched-filtered S/N image (sep's own extraction
    # costs ~0.3 s per 4 Mpx, this ~0.03 s; and local maxima split close pairs).
    capacity = max(20_000, ny * nx // 16)
    px, py, _pv, count = _find_peaks(d, rms, float(threshold), capacity)
    if count < 0:  # more peaks than a sixteenth of the pixels: noise, not stars
        return StarList(empty_table(), background, noise)
    if count == 0:
        return StarList(empty_table(), background, noise)
    # The filtered maximum can sit next to the brightest raw pixel: spikes are judged,
    # and stamps centred, on the latter.
    nb = _neighbourhood(d, px, py)
    k = np.argmax(nb.reshape(len(px), 9), axis=1)
    ix0 = np.clip(px + k % 3 - 1, 0, nx - 1)
    iy0 = np.clip(py + k // 3 - 1, 0, ny - 1)
    rx, ry, peak = _spike_ratios(d, ix0, iy0)
    spike = (np.minimum(rx, ry) < 0.12) & (peak > 0)
    raw_peak = raw[iy0, ix0]
    if sat_level is not None:
        # A saturated star has a flat top, so its peak neighbours are bright: never a spike.
        spike &= raw_peak < sat_level
    nb = _neighbourhood(d, ix0, iy0)
    flux3 = nb.sum(axis=(1, 2))
    keep = ~spike & (flux3 > 0)
    n_rejected = int(spike.sum())
    if max_stars is not None and keep.sum() > 1.25 * max_stars + 50:
        # Fitting is the costly part: fit only the brightest candidates, with a margin
        # for those the fit will reject.
        order = np.argsort(-np.where(keep, flux3, -np.inf))
        keep[order[int(1.25 * max_stars + 50):]] = False
    ix0, iy0, raw_peak, flux3, nb = ix0[keep], iy0[keep], raw_peak[keep], flux3[keep], nb[keep]
    n = len(ix0)
    if n == 0:
        return StarList(empty_table(), background, noise, n_rejected=n_rejected)
    # Starting positions: first moment of the 3x3 neighbourhood (within half a pixel).
    w3 = np.maximum(nb, 0.0)
    wsum = np.maximum(w3.sum(axis=(1, 2)), 1e-30)
    off = np.arange(-1.0, 2.0)
    x0 = ix0 + np.sum(w3.sum(axis=1) * off, axis=1) / wsum
    y0 = iy0 + np.sum(w3.sum(axis=2) * off, axis=1) / wsum

    saturated_peak = (raw_peak >= sat_level) if sat_level is not None else np.zeros(n, bool)
    plateau = np.zeros(n)
    if saturated_peak.any():
        # A saturated star is a plateau that may hold several peaks: start each from the
        # plateau's centre and keep one candidate per plateau.
        idx = np.flatnonzero(saturated_peak)
        x0[idx], y0[idx], plateau[idx] = _plateau_centres(raw, sat_level, ix0[idx], iy0[idx])
        cx, cy = np.round(x0[idx], 1), np.round(y0[idx], 1)
        _, first = np.unique(np.column_stack([cx, cy]), axis=0, return_index=True)
        dup = np.ones(idx.size, bool)
        dup[first] = False
        keep = np.ones(n, bool)
        keep[idx[dup]] = False
        ix0, iy0, raw_peak, flux3, nb, x0, y0 = (v[keep] for v in (ix0, iy0, raw_peak, flux3, nb, x0, y0))
        saturated_peak, plateau = saturated_peak[keep], plateau[keep]
        n = len(ix0)

    tree = cKDTree(np.column_stack([x0, y0]))
    kq = min(6, n)
    nd, ni = tree.query(np.column_stack([x0, y0]), k=kq)
    nd, ni = nd.reshape(n, kq)[:, 1:], ni.reshape(n, kq)[:, 1:]

    # The width: a quick fit of the brightest unsaturated, isolated stars on wide stamps
    # sets the stamp size and the starting point of the main fit.
    isolated = (nd[:, 0] > 8.0) if kq > 1 else np.ones(n, bool)
    s0 = _typical_sigma(d, x0, y0, flux3, isolated & ~saturated_peak)
    # +-(1.1 FWHM + 0.5) px reaches 4.5 sigma: all the light, and a ring for the local background.
    radius = int(np.clip(np.ceil(1.1 * s0 * SIGMA_TO_FWHM + 0.5), 2, 10))

    params = np.empty((n, 5))
    cov = np.empty((n, 5, 5))
    ok = np.zeros(n, bool)
    flags = np.zeros(n, dtype=np.int64)
    init = np.empty((n, 5))
    # Saturated stars are fitted on their wings, which lie beyond the plateau: a wider
    # stamp for them (a separate batch, as stamps of one batch share their size).
    batches = [(np.flatnonzero(~saturated_peak), radius)]
    if saturated_peak.any():
        r_sat = int(np.clip(np.ceil(plateau[saturated_peak].max() + 2.5 * s0 * SIGMA_TO_FWHM), radius, 20))
        batches.append((np.flatnonzero(saturated_peak), r_sat))
    for sel, rad in batches:
        if sel.size:
            params[sel], cov[sel], ok[sel], flags[sel], init[sel] = _measure(
                d, raw, bad, sat_level, x0, y0, nd, ni, sel, rad, s0)
    flags[saturated_peak] |= FLAG_SATURATED
    # A fit that fails is a bump on something else (a galaxy, a bright star's wing)
    # and is dropped, except on a saturated star, which keeps its plateau-centre
    # position (flagged) so that it can still serve for pattern matching.
    nofit = ~ok & ((flags & FLAG_SATURATED) != 0)
    params[nofit] = init[nofit]
    flags[nofit] |= FLAG_NOFIT

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
    n_rejected += int(narrow.sum())
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
    sel = (table[:, 6] == 0) & (table[:, 5] > 20)
    frame_fwhm = float(np.median(table[sel, 3])) if sel.sum() >= 3 else (
        float(np.median(table[:, 3])) if len(table) else np.nan)
    return StarList(table, background, noise, frame_fwhm, n_rejected)
