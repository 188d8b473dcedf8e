"""The rejection methods, one kernel each, on the sorted sample of one pixel (or a lane
of 128 pixels for sigma and winsorized clipping). See the package docstring for what
each method does."""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
from numba import njit


from .sorting import (FLAG_HIGH, FLAG_LOW, _EPS, _INF, _IQR_TO_SIGMA, _WINSOR_CLAMP, _WINSOR_MAXIT, _WINSOR_SCALE,
                      _WINSOR_SOLVES, _WINSOR_TOL, _astropy_sigma_bounds, _median_sorted, _negligible, _wirth_median)

# ----------------------------------------------------------------------------------------
# Work arrays of the lockstep methods, named: one value per lane (pixel column) unless
# noted. The block kernel allocates them once per block, so that the methods allocate
# nothing per segment, and each method has its own, so that no slot means one thing in
# one method and another in the next.
# ----------------------------------------------------------------------------------------

#: :func:`_sigma_lanes`: ``s``, ``ss`` the masked sum and sum of squared deviations,
#: ``mean``, ``lo``/``hi`` the bounds, ``tol`` the rounding tolerance that sends a lane
#: to the astropy replica; ``a``/``b`` the kept range in sorted order, ``it`` its
#: iterations, ``nlo``/``nhi`` the counts of values ``< lo`` / ``<= hi``, ``near`` of values
#: within ``tol`` of a bound, ``active`` and ``fallback`` flags; ``buf`` (one value per
#: frame) one lane's values in frame order for the replica.
SigmaScratch = namedtuple("SigmaScratch", "s ss mean lo hi tol a b it nlo nhi near active fallback buf")

#: :func:`_winsorized_lanes`: ``P1``/``P2`` (``frames + 1`` rows) the prefix sums of
#: ``v - median`` and its square, ``shift`` the median, ``sigma0`` the starting sigma;
#: ``lane`` the column of the block each packed column came from, ``a``/``b`` its kept
#: range, ``it`` its rounds, ``done`` whether it stopped.
WinsorScratch = namedtuple("WinsorScratch", "P1 P2 shift sigma0 lane a b it done")


@njit(nogil=True, cache=True, error_model="numpy")
def _sigma_scratch(n, lanes):
    """A :data:`SigmaScratch` for ``n`` frames and ``lanes`` columns."""
    f = np.float64
    i = np.int64
    return SigmaScratch(np.empty(lanes, f), np.empty(lanes, f), np.empty(lanes, f), np.empty(lanes, f),
                        np.empty(lanes, f), np.empty(lanes, f), np.empty(lanes, i), np.empty(lanes, i),
                        np.empty(lanes, i), np.empty(lanes, i), np.empty(lanes, i), np.empty(lanes, i),
                        np.empty(lanes, i), np.empty(lanes, i), np.empty(n, f))


@njit(nogil=True, cache=True, error_model="numpy")
def _winsor_scratch(n, lanes):
    """A :data:`WinsorScratch` for ``n`` frames and ``lanes`` columns."""
    f = np.float64
    i = np.int64
    return WinsorScratch(np.empty((n + 1, lanes), f), np.empty((n + 1, lanes), f), np.empty(lanes, f),
                         np.empty(lanes, f), np.empty(lanes, i), np.empty(lanes, i), np.empty(lanes, i),
                         np.empty(lanes, i), np.empty(lanes, i))


# ----------------------------------------------------------------------------------------
# Methods. Each receives the sorted sample v[:m] (but minmax, which needs only ranks)
# and writes status[:m] (0 kept, FLAG_LOW, FLAG_HIGH) by sorted position; status
# arrives zeroed.
# ----------------------------------------------------------------------------------------


@njit(nogil=True, cache=True, error_model="numpy")
def _reject_minmax(m, status, n_low, n_high, use_low, use_high):
    nl = min(n_low, m) if use_low else 0
    nh = min(n_high, m) if use_high else 0
    # Keep at least one value: give up high rejections last (bright outliers are the
    # commoner kind).
    while nl + nh >= m and nl + nh > 0:
        if nl >= nh and nl > 0:
            nl -= 1
        else:
            nh -= 1
    for k in range(nl):
        status[k] = FLAG_LOW
    for k in range(m - nh, m):
        status[k] = FLAG_HIGH


@njit(nogil=True, cache=True, error_model="numpy")
def _reject_percentile(v, m, status, low, high, use_low, use_high):
    if m < 2:
        return
    med = _median_sorted(v, 0, m)
    scale = abs(med)
    if scale == 0.0:
        return
    a = 0
    if use_low:
        while a < m and (med - v[a]) / scale > low:
            status[a] = FLAG_LOW
            a += 1
    if use_high:
        b = m - 1
        while b >= a and (v[b] - med) / scale > high:
            status[b] = FLAG_HIGH
            b -= 1


@njit(nogil=True, cache=True, error_model="numpy")
def _sigma_lanes(Vd, U, cnt, w, k_low, k_high, use_low, use_high, max_iterations, cut_lo, cut_hi, scratch):
    """astropy-exact iterative sigma clipping of the sorted columns ``Vd[:cnt[l], l]``.

    Writes the final bounds of each column to ``cut_lo``/``cut_hi``: a value is clipped
    low if ``< cut_lo``, high if ``> cut_hi``. All ``w`` columns iterate in lockstep
    (masked sums vectorize across them); a column stops changing once it has converged.
    Only the sums' order differs from astropy's; where that could flip a decision, the
    column is recomputed by :func:`_astropy_sigma_bounds` from its frame-order values
    ``U[:, l]``. Work arrays: ``scratch``, a :data:`SigmaScratch`.
    """
    n = Vd.shape[0]
    s, ss, mean, lo, hi, tol = scratch.s, scratch.ss, scratch.mean, scratch.lo, scratch.hi, scratch.tol
    a, b, it, nlo, nhi, near = scratch.a, scratch.b, scratch.it, scratch.nlo, scratch.nhi, scratch.near
    active, fallback, buf = scratch.active, scratch.fallback, scratch.buf
    k_max = max(k_low if use_low else 0.0, k_high if use_high else 0.0)
    rows = 0
    for l in range(w):
        a[l] = 0
        b[l] = cnt[l]
        it[l] = 0
        active[l] = 1 if cnt[l] > 0 else 0
        fallback[l] = 0
        cut_lo[l] = -_INF
        cut_hi[l] = _INF
        rows = max(rows, cnt[l])
    while True:
        n_active = 0
        for l in range(w):
            n_active += active[l]
        if n_active == 0:
            break
        # Masked sums in sorted order. Adding 0.0 for the values outside [a, b) leaves
        # every partial sum bit-identical to summing the kept values alone.
        for l in range(w):
            s[l] = 0.0
            ss[l] = 0.0
        for k in range(rows):
            row = Vd[k]
            for l in range(w):
                keep = (k >= a[l]) & (k < b[l])
                s[l] += row[l] if keep else 0.0
        for l in range(w):
            mean[l] = s[l] / (b[l] - a[l])
        for k in range(rows):
            row = Vd[k]
            for l in range(w):
                keep = (k >= a[l]) & (k < b[l])
                d = row[l] - mean[l]
                ss[l] += d * d if keep else 0.0
        for l in range(w):
            if active[l] == 0:
                continue
            c = b[l] - a[l]
            h = a[l] + c // 2
            med = Vd[h, l] if c % 2 == 1 else 0.5 * (Vd[h, l] + Vd[h - 1, l])
            std = math.sqrt(ss[l] / c)
            lo[l] = med - k_low * std if use_low else -_INF
            hi[l] = med + k_high * std if use_high else _INF
            # Bound on the rounding difference between our sums (sorted order) and
            # astropy's (selection order): recursive summation errs by <= (c-1)·eps
            # relative, the median is bit-identical, the bounds' own rounding adds an
            # ulp. Generous on purpose: only exact or near-exact ties fall back. With
            # std == 0 both compute exactly the same bounds (all values equal).
            if std > 0.0:
                big = max(abs(Vd[a[l], l]), abs(Vd[b[l] - 1, l]))
                tol[l] = 32.0 * (c + 8) * _EPS * (k_max * std + abs(med) + big)
            else:
                tol[l] = -1.0
        # Cuts over the whole sample: the final mask compares every value, including
        # those clipped earlier, with the last bounds (as astropy does).
        for l in range(w):
            nlo[l] = 0
            nhi[l] = 0
            near[l] = 0
        for k in range(rows):
            row = Vd[k]
            for l in range(w):
                x = row[l]
                valid = k < cnt[l]
                nlo[l] += valid & (x < lo[l])
                nhi[l] += valid & (x <= hi[l])
                near[l] += valid & ((abs(x - lo[l]) <= tol[l]) | (abs(x - hi[l]) <= tol[l]))
        for l in range(w):
            if active[l] == 0:
                continue
            cut_lo[l] = lo[l]
            cut_hi[l] = hi[l]
            if near[l] > 0:
                fallback[l] = 1
                active[l] = 0
                continue
            c = b[l] - a[l]
            a2 = max(a[l], nlo[l])
            b2 = min(b[l], nhi[l])
            new_count = b2 - a2 if b2 > a2 else 0
            it[l] += 1
            if new_count == c or new_count == 0 or (max_iterations > 0 and it[l] >= max_iterations):
                active[l] = 0
            else:
                a[l] = a2
                b[l] = b2
    for l in range(w):
        if fallback[l] == 0:
            continue
        m = 0
        for f in range(n):
            x = np.float64(U[f, l])
            if x < _INF:
                buf[m] = x
                m += 1
        cut_lo[l], cut_hi[l] = _astropy_sigma_bounds(buf, m, k_low, k_high, use_low, use_high, max_iterations)


@njit(nogil=True, cache=True, error_model="numpy")
def _quantile_sorted(v, a, b, l, q):
    """Quantile ``q`` (linear interpolation) of the sorted column ``v[a:b, l]``."""
    pos = a + q * (b - a - 1)
    i = int(pos)
    frac = pos - i
    if i + 1 < b:
        return v[i, l] + frac * (v[i + 1, l] - v[i, l])
    return v[i, l]


@njit(nogil=True, cache=True, error_model="numpy")
def _walk_lower(V, l, a, b, i, x):
    """First index in ``[a, b)`` of the sorted column ``V[:, l]`` with a value ``>= x``,
    walking from the guess ``i`` (the cuts move little from one step to the next)."""
    while i < b and V[i, l] < x:
        i += 1
    while i > a and V[i - 1, l] >= x:
        i -= 1
    return i


@njit(nogil=True, cache=True, error_model="numpy")
def _walk_upper(V, l, a, b, i, x):
    """First index in ``[a, b)`` of the sorted column ``V[:, l]`` with a value ``> x``."""
    while i < b and V[i, l] <= x:
        i += 1
    while i > a and V[i - 1, l] > x:
        i -= 1
    return i


@njit(nogil=True, cache=True, error_model="numpy")
def _winsorize(V, l, a, b, shift, P1, P2, sigma):
    """Winsorized centre and sigma of the sorted column ``V[a:b, l]``.

    PixInsight's ImageIntegration loop, centred on the median: clamp the sample at
    ``median ± 1.5 sigma``, then ``sigma = 1.134 · std(ddof=1)`` of the clamped
    sample, until sigma stops changing. Clamping symmetrically about the median leaves
    the median where it is, so only sigma iterates, and the iteration is a contraction
    even with a quarter of the sample made of outliers. (Re-centring on the clamped
    *mean* instead, as a Huber M-estimator does, drifts away without converging once
    about 25 % of the sample are outliers: then nothing at all would be rejected.)

    The loop's limit is solved for exactly rather than iterated towards (PixInsight
    stops at a 0.05 % change, which takes 10-40 steps at a contraction of ~0.85 per
    step). While the same values are clamped, the clamped variance is a quadratic in
    sigma: with ``n0`` values clamped low and ``n1`` high, ``D = n1 - n0``,
    ``N = n0 + n1``, and ``S1``, ``S2`` the sums of ``v - median`` and its square over
    the unclamped values (prefix sums ``P1``, ``P2``; ``shift`` must be the median, and
    ``sigma`` is the starting one),
    ``sigma² (c - 1) / 1.134² = S2 + 2.25 N sigma² - (S1 + 1.5 D sigma)² / c``. Its
    positive root gives the next sigma; once that root clamps the same values, it is
    the fixed point. That takes 1-3 solves; should the clamped set ever cycle, the
    plain iteration finishes from there. Returns ``(centre, sigma, converged)``.
    """
    c = b - a
    centre = shift
    i0 = a
    i1 = b
    inv_k2 = 1.0 / (_WINSOR_SCALE * _WINSOR_SCALE)
    h = _WINSOR_CLAMP
    h2 = h * h
    for step in range(_WINSOR_SOLVES):
        i0 = _walk_lower(V, l, a, b, i0, centre - h * sigma)
        i1 = _walk_upper(V, l, a, b, i1, centre + h * sigma)
        n0 = i0 - a
        n1 = b - i1
        s1 = P1[i1, l] - P1[i0, l]
        s2 = P2[i1, l] - P2[i0, l]
        d = float(n1 - n0)
        qa = (c - 1) * inv_k2 - h2 * (n0 + n1) + h2 * d * d / c
        qb = 2.0 * h * s1 * d / c
        qc = s2 - s1 * (s1 / c)
        if qa <= 0.0 or qc < 0.0:
            break  # no positive root for this clamped set: iterate instead
        new_sigma = (-qb + math.sqrt(qb * qb + 4.0 * qa * qc)) / (2.0 * qa)
        sigma = new_sigma
        if _negligible(sigma, centre):
            return centre, sigma, True
        if (_walk_lower(V, l, a, b, i0, centre - h * sigma) == i0
                and _walk_upper(V, l, a, b, i1, centre + h * sigma) == i1):
            return centre, sigma, True
    # Fallback: PixInsight's plain iteration, until sigma changes by less than 0.05 %.
    for step in range(_WINSOR_MAXIT):
        t0 = centre - h * sigma
        t1 = centre + h * sigma
        i0 = _walk_lower(V, l, a, b, i0, t0)
        i1 = _walk_upper(V, l, a, b, i1, t1)
        n0 = i0 - a
        n1 = b - i1
        d0 = t0 - shift
        d1 = t1 - shift
        s1 = n0 * d0 + (P1[i1, l] - P1[i0, l]) + n1 * d1
        s2 = n0 * d0 * d0 + (P2[i1, l] - P2[i0, l]) + n1 * d1 * d1
        var = (s2 - s1 * (s1 / c)) / (c - 1)
        new_sigma = _WINSOR_SCALE * math.sqrt(var) if var > 0.0 else 0.0
        converged = abs(new_sigma - sigma) < _WINSOR_TOL * sigma
        sigma = new_sigma
        if _negligible(sigma, centre):
            return centre, sigma, True
        if converged:
            return centre, sigma, True
    return centre, sigma, False


@njit(nogil=True, cache=True, error_model="numpy")
def _winsor_round(V, k, k_low, k_high, use_low, use_high, scratch):
    """One clipping round of winsorized sigma clipping on the sorted columns
    ``V[a[j]:b[j], j]``, ``j < k`` (``a``, ``b``, ``done`` and the work arrays are those
    of ``scratch``, a :data:`WinsorScratch`): updates ``a``/``b`` past the values
    rejected, and sets ``done[j]`` where the column stops (nothing rejected, no spread,
    no convergence).

    The centre is the median and the sigma the winsorized one of :func:`_winsorize`,
    iterated from the interquartile-range sigma.
    """
    a, b, done, shift, sigma0, P1, P2 = scratch.a, scratch.b, scratch.done, scratch.shift, scratch.sigma0, scratch.P1, scratch.P2
    for j in range(k):
        done[j] = 0
        lo = a[j]
        hi = b[j]
        med = _quantile_sorted(V, lo, hi, j, 0.5)
        # Sums relative to the median keep the one-pass variance well conditioned.
        shift[j] = med
        s0 = (_quantile_sorted(V, lo, hi, j, 0.75) - _quantile_sorted(V, lo, hi, j, 0.25)) * _IQR_TO_SIGMA
        if _negligible(s0, med):
            # Over half the sample is one value: start from the plain sample std.
            c = hi - lo
            m1 = 0.0
            m2 = 0.0
            for r in range(lo, hi):
                d = V[r, j] - med
                m1 += d
                m2 += d * d
            var = (m2 - m1 * m1 / c) / (c - 1)
            s0 = math.sqrt(var) if var > 0.0 else 0.0
            if _negligible(s0, med):
                done[j] = 1  # a flat sample: nothing to reject
                continue
        sigma0[j] = s0
    for j in range(k):
        if done[j]:
            continue
        lo = a[j]
        hi = b[j]
        med = shift[j]
        acc1 = 0.0
        acc2 = 0.0
        P1[lo, j] = 0.0
        P2[lo, j] = 0.0
        for r in range(lo, hi):
            d = V[r, j] - med
            acc1 += d
            acc2 += d * d
            P1[r + 1, j] = acc1
            P2[r + 1, j] = acc2
        ctr, sg, ok = _winsorize(V, j, lo, hi, med, P1, P2, sigma0[j])
        if not ok:
            # No convergence (a heavily quantized sample whose winsorized sigma
            # collapses): reject nothing rather than on a bad sigma.
            done[j] = 1
            continue
        if _negligible(sg, ctr):
            done[j] = 1
            continue
        if use_low:
            bound = ctr - k_low * sg
            while lo < hi and V[lo, j] < bound:
                lo += 1
        if use_high:
            bound = ctr + k_high * sg
            while hi > lo and V[hi - 1, j] > bound:
                hi -= 1
        if lo == a[j] and hi == b[j]:
            done[j] = 1
        a[j] = lo
        b[j] = hi


@njit(nogil=True, cache=True, error_model="numpy")
def _winsorized_lanes(Vd, cnt, w, k_low, k_high, use_low, use_high, max_iterations, cut_lo, cut_hi, scratch):
    """Winsorized sigma clipping of the sorted columns ``Vd[:cnt[l], l]`` (``Vd`` is
    used as work space).

    Writes the smallest and largest kept value of each column to ``cut_lo``/``cut_hi``.
    Rounds of :func:`_winsor_round` repeat on the survivors while at least 3 remain.
    Between rounds the columns still clipping are packed to the left of the block, so
    that the lockstep passes of later rounds (a few columns, typically) stay dense.
    Work arrays: ``scratch``, a :data:`WinsorScratch`.
    """
    lane, a, b, it, done = scratch.lane, scratch.a, scratch.b, scratch.it, scratch.done
    k = 0
    for l in range(w):
        m = cnt[l]
        if m >= 3:
            lane[k] = l
            a[k] = 0
            b[k] = m
            it[k] = 0
            if k != l:
                for r in range(m):
                    Vd[r, k] = Vd[r, l]
            k += 1
        else:
            cut_lo[l] = Vd[0, l] if m > 0 else _INF
            cut_hi[l] = Vd[m - 1, l] if m > 0 else -_INF
    while k > 0:
        _winsor_round(Vd, k, k_low, k_high, use_low, use_high, scratch)
        kept = 0
        for j in range(k):
            lo = a[j]
            hi = b[j]
            it[j] += 1
            if done[j] or hi - lo < 3 or (max_iterations > 0 and it[j] >= max_iterations):
                # Everything below the smallest kept value, and above the largest, was
                # rejected (an empty kept range cannot happen: rounds need 3 values).
                cut_lo[lane[j]] = Vd[lo, j] if lo < hi else _INF
                cut_hi[lane[j]] = Vd[hi - 1, j] if lo < hi else -_INF
                continue
            if kept != j:
                for r in range(lo, hi):
                    Vd[r, kept] = Vd[r, j]
                lane[kept] = lane[j]
                a[kept] = lo
                b[kept] = hi
                it[kept] = it[j]
            kept += 1
        k = kept


@njit(nogil=True, cache=True, error_model="numpy")
def _reject_averaged(v, m, status, k_low, k_high, use_low, use_high, max_iterations):
    if m < 3:
        return
    med = _median_sorted(v, 0, m)
    if not med > 0.0:
        return
    # The Poisson factor is fitted once, on the whole sample but (as IRAF's avsigclip)
    # its lowest and highest values, so that a single outlier does not inflate it.
    first = 1 if m >= 5 else 0
    acc = 0.0
    for k in range(first, m - first):
        d = v[k] - med
        acc += d * d / med
    factor = math.sqrt(acc / (m - 2 * first - 1))
    a = 0
    b = m
    it = 0
    while True:
        sigma = factor * math.sqrt(med)
        if _negligible(sigma, med):
            break
        nl = 0
        if use_low:
            lo = med - k_low * sigma
            while a + nl < b and v[a + nl] < lo:
                status[a + nl] = FLAG_LOW
                nl += 1
        nh = 0
        if use_high:
            hi = med + k_high * sigma
            while b - 1 - nh >= a + nl and v[b - 1 - nh] > hi:
                status[b - 1 - nh] = FLAG_HIGH
                nh += 1
        if nl + nh == 0:
            break
        a += nl
        b -= nh
        if b - a < 3:
            break
        it += 1
        if max_iterations > 0 and it >= max_iterations:
            break
        med = _median_sorted(v, a, b)
        if not med > 0.0:
            break


@njit(nogil=True, cache=True, error_model="numpy")
def _lad_sign_sum(y, n, slope, tmp, tol):
    """For a trial slope: intercept = median(y - slope·x) (x = rank), the sum of
    x·sign(residual) (zero at the least-absolute-deviation optimum), and Σ|residual|."""
    for j in range(n):
        tmp[j] = y[j] - slope * j
    intercept = _wirth_median(tmp, n)
    s = 0.0
    adev = 0.0
    for j in range(n):
        d = y[j] - (slope * j + intercept)
        adev += abs(d)
        if d > tol:
            s += j
        elif d < -tol:
            s -= j
    return s, intercept, adev


@njit(nogil=True, cache=True, error_model="numpy")
def _lad_line(y, n, tmp):
    """Least-absolute-deviation line ``y ≈ intercept + slope·rank`` through ``y[:n]``.

    Bisection on the slope for the zero of the sign sum, bracketed from the
    least-squares solution (the classical approach, e.g. Numerical Recipes' medfit).
    Returns ``(intercept, slope, mean |residual|)``.
    """
    sx = 0.0
    sy = 0.0
    sxx = 0.0
    sxy = 0.0
    ymax = 0.0
    for j in range(n):
        sx += j
        sy += y[j]
        sxx += j * j
        sxy += j * y[j]
        ymax = max(ymax, abs(y[j]))
    det = n * sxx - sx * sx
    a_ls = (sxx * sy - sx * sxy) / det
    b_ls = (n * sxy - sx * sy) / det
    chisq = 0.0
    for j in range(n):
        d = y[j] - (a_ls + b_ls * j)
        chisq += d * d
    sig_b = math.sqrt(chisq / det)
    tol = 16.0 * _EPS * ymax
    b1 = b_ls
    f1, a1, adev1 = _lad_sign_sum(y, n, b1, tmp, tol)
    if sig_b == 0.0 or f1 == 0.0:
        return a1, b1, adev1 / n
    b2 = b1 + math.copysign(3.0 * sig_b, f1)
    f2, a2, adev2 = _lad_sign_sum(y, n, b2, tmp, tol)
    guard = 0
    while f1 * f2 > 0.0 and guard < 64:
        bb = b2 + 1.6 * (b2 - b1)
        b1 = b2
        f1 = f2
        b2 = bb
        f2, a2, adev2 = _lad_sign_sum(y, n, b2, tmp, tol)
        guard += 1
    if f2 == 0.0:
        return a2, b2, adev2 / n
    step = 0.01 * sig_b
    guard = 0
    while abs(b2 - b1) > step and guard < 200:
        bb = b1 + 0.5 * (b2 - b1)
        if bb == b1 or bb == b2:
            break
        f, aa, ad = _lad_sign_sum(y, n, bb, tmp, tol)
        if f == 0.0:
            return aa, bb, ad / n
        if f * f1 > 0.0:
            f1 = f
            b1 = bb
        else:
            f2 = f
            b2 = bb
        guard += 1
    slope = 0.5 * (b1 + b2)
    f, intercept, adev = _lad_sign_sum(y, n, slope, tmp, tol)
    return intercept, slope, adev / n


@njit(nogil=True, cache=True, error_model="numpy")
def _reject_linear(v, m, status, k_low, k_high, use_low, use_high, max_iterations, ys, pos, tmp):
    if m < 5:
        return
    c = m
    for k in range(m):
        ys[k] = v[k]
        pos[k] = k
    it = 0
    while True:
        intercept, slope, adev = _lad_line(ys, c, tmp)
        sigma = 2.0 * adev  # PixInsight's scaling, so thresholds read like sigma clipping
        if _negligible(sigma, ys[c // 2]):
            break
        nc = 0
        kept = 0
        for j in range(c):
            r = ys[j] - (intercept + slope * j)
            if r < 0.0:
                if use_low and -r >= k_low * sigma:
                    status[pos[j]] = FLAG_LOW
                    nc += 1
                    continue
            elif use_high and r >= k_high * sigma:
                status[pos[j]] = FLAG_HIGH
                nc += 1
                continue
            ys[kept] = ys[j]
            pos[kept] = pos[j]
            kept += 1
        if nc == 0:
            break
        c = kept
        if c < 3:
            break
        it += 1
        if max_iterations > 0 and it >= max_iterations:
            break


@njit(nogil=True, cache=True, error_model="numpy")
def _reject_esd(v, m, status, use_low, use_high, lam, fraction, low_relaxation, p1, p2, side):
    if m < 3:
        return
    k = int(fraction * m)
    k = min(max(k, 1), m - 2)
    shift = _median_sorted(v, 0, m)
    p1[0] = 0.0
    p2[0] = 0.0
    for j in range(m):
        d = v[j] - shift
        p1[j + 1] = p1[j] + d
        p2[j + 1] = p2[j] + d * d
    a = 0
    b = m
    n_out = 0
    for i in range(k):
        c = b - a
        s1 = p1[b] - p1[a]
        s2 = p2[b] - p2[a]
        mean_d = s1 / c
        var = (s2 - s1 * mean_d) / (c - 1)
        if not var > 0.0:
            break
        sd = math.sqrt(var)
        mean = shift + mean_d
        if _negligible(sd, mean):
            break
        # On a sorted sample the value farthest from the mean is one of the two ends.
        r_high = (v[b - 1] - mean) / sd
        r_low = (mean - v[a]) / (low_relaxation * sd)
        if r_high >= r_low:
            stat = r_high
            side[i] = FLAG_HIGH
            b -= 1
        else:
            stat = r_low
            side[i] = FLAG_LOW
            a += 1
        if stat > lam[m, i]:
            n_out = i + 1  # Rosner: the largest i whose statistic exceeds its critical value
    a = 0
    b = m
    for i in range(n_out):
        if side[i] == FLAG_LOW:
            if use_low:
                status[a] = FLAG_LOW
            a += 1
        else:
            if use_high:
                status[b - 1] = FLAG_HIGH
            b -= 1


