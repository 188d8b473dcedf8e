"""Least-squares fits of pixel-integrated circular Gaussians to star stamps (numba).

The model pixel value is the Gaussian integrated over the pixel's square,
``A [Phi(x+1/2) - Phi(x-1/2)] [Phi(y+1/2) - Phi(y-1/2)] + b``, which has no pixel-phase
bias for any sampling; one Levenberg-Marquardt iteration per star (small stamps, five
parameters). Used by :mod:`drizzlestack.registration.stars`.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_SQRT2 = np.sqrt(2.0)
_SQRTPI = np.sqrt(np.pi)

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
