"""Pixel rejection across the frame axis, and the weighted combine of what survives.

Every function here works on a *stack*: an array ``(frame, y, x)`` of registered,
normalized frames. Each pixel position is treated on its own: its ``n`` values, one per
frame, are classified as kept, rejected low, rejected high, or invalid. The functions are
blockwise by construction, so a Dask array chunked ``(frame=all, y=tile, x=tile)`` is
processed tile by tile with memory ≈ tile × frames.

Flags (the store's ``rejection`` variable, uint8)
-------------------------------------------------
=====  ===================================================================
bit    meaning
=====  ===================================================================
``1``  rejected low by the statistical method (:data:`FLAG_LOW`)
``2``  rejected high by the statistical method (:data:`FLAG_HIGH`)
``4``  range-rejected or invalid: NaN/±inf, ``<= range_low`` or
       ``>= range_high`` (:data:`FLAG_RANGE`)
=====  ===================================================================
A pixel carries at most one bit; ``0`` means it is used by the combine and by drizzle.

Saturation
----------
A saturated pixel (value ``>= saturation[frame]``) is a *lower bound* on the true value,
not an outlier. Rejecting it is what makes star cores come out black (every frame
saturated, everything rejected, nothing left) or hollow (the saturated frames rejected,
only the fainter unsaturated frames of the same pixel averaged, so the centre of the
star is fainter than its shoulders). So, when ``saturation`` is given:

* saturated pixels are never flagged, neither by the statistical methods nor by
  ``range_high``: they are always kept (flag ``0``) and enter the combine and drizzle
  with their frame weight;
* they are left out of the statistics (median, sigma, fits) of their pixel, because a
  censored value says nothing about the noise; the statistics, and so the low/high
  rejection, use the unsaturated values only;
* therefore, where every frame is saturated the combine returns the (weighted mean)
  saturated value, and where some are, it averages saturated and unsaturated values,
  which keeps the profile monotonic towards the centre.

The price: a cosmic-ray hit that itself reaches the saturation level is kept. Leave
``saturation=None`` (the default) for data where that matters more than star cores.

Methods
-------
``low``/``high`` are thresholds in units of the method's dispersion (sigma) except for
``"percentile"`` (fractions of the median) and ``"esd"`` (which uses a significance level
instead); ``reject_low``/``reject_high`` switch each side off. Values below refer to the
*sample* of a pixel: its valid, unsaturated values.

``"none"``
    Only range/invalid rejection.
``"minmax"``
    Rejects the ``n_low`` lowest and ``n_high`` highest values; at least one value is
    always kept (the counts are lowered, high side last, when the sample is too small).
``"percentile"``
    Rejects ``x`` with ``(median - x) / |median| > low`` or ``(x - median) / |median| >
    high`` (PixInsight's percentile clipping; ``low``/``high`` are fractions, e.g. 0.2
    and 0.1). Nothing is rejected where the median is 0.
``"sigma"``
    Iterative sigma clipping with exactly the semantics of
    ``astropy.stats.sigma_clip(stack, axis=0, sigma_lower=low, sigma_upper=high,
    maxiters=max_iterations, cenfunc="median", stdfunc="std")``: bounds
    ``median ∓ k·std`` with the population standard deviation (``ddof=0``), values
    strictly outside are clipped, values equal to a bound kept, iterate until nothing
    changes or nothing is left, and finally flag every value of the sample outside the
    last bounds. The returned mask equals astropy's, bit for bit (see *Notes*).
``"winsorized"``
    Winsorized sigma clipping (as PixInsight's ImageIntegration; the pipeline's
    default). The sample is winsorized (clamped) to ``median ± 1.5·sigma`` and
    ``sigma = 1.134 · std(ddof=1)`` of the winsorized sample, iterated from the
    interquartile-range sigma until sigma changes by less than 0.05 %; values beyond
    ``median - low·sigma`` / ``median + high·sigma`` are rejected, and the whole repeats
    on the survivors while at least 3 remain. Centring on the median keeps the
    iteration stable with a quarter of the sample made of outliers (a clamped-mean
    centre drifts away there and would reject nothing; see :func:`_winsorize`). Where
    there is no spread, or the winsorization does not converge (heavily quantized
    samples, whose winsorized sigma collapses towards 0), nothing more is rejected.
``"averaged"``
    Averaged sigma clipping (IRAF's ``avsigclip``, as in PixInsight): a Poisson noise
    model ``sigma² = k · median`` whose factor ``k = Σ(x - m)² / m / (n' - 1)`` is fitted
    once on the whole sample (``m`` its median) less its lowest and highest values
    (``n'`` values; with 5 or more, as IRAF does, so that one outlier does not inflate
    it); the clipping then iterates with ``sigma = sqrt(k · median)`` about the median
    of the survivors. It needs a positive signal: nothing is rejected where the median
    is ``<= 0``.
``"linear"``
    Linear fit clipping (PixInsight): a straight line is fitted to the sorted sample
    against rank by least absolute deviation; ``sigma = 2 · mean |residual|``; values
    with residuals below ``-low·sigma`` or above ``high·sigma`` are rejected; refit on
    the survivors. Needs 5 values to start, stops below 3.
``"esd"``
    Generalized extreme studentized deviate test (Rosner 1983): up to
    ``floor(esd_outliers · n)`` (at least 1, at most ``n - 2``) candidates are removed one
    at a time, each the value farthest from the mean of the remaining ones in units of
    their sample standard deviation (low deviations divided by ``esd_low_relaxation``);
    the number of outliers is the largest ``i`` whose statistic exceeds Rosner's
    two-sided critical value at significance ``esd_significance``. ``low``/``high`` are
    not used.

Notes
-----
*How it runs.* Pixels are taken 128 at a time along x, where every frame row is
contiguous: their samples are sorted together by a comparator network (the same
compare-exchange sequence for every pixel, i.e. vector min/max, no branches), and the
sigma and winsorized clipping iterate them in lockstep with vectorized masked sums;
the other methods run per pixel on the sorted sample.

*Equality with astropy.* Astropy's fast path (``astropy/stats/src/compute_bounds.c``)
takes medians with Wirth's selection algorithm, which permutes the buffer, and then sums
the mean and the variance in that permuted order. We clip on a sorted sample instead
(the median is read off directly, and clipping only ever removes values from the two
ends), so our sums run in another order and may differ from astropy's in the last bits.
Our bounds are therefore checked at every iteration: if any value of the sample lies
within a generous bound on that rounding difference (``32 (n + 8) eps`` relative) from a
clipping bound, the pixel is recomputed with a replica of astropy's algorithm, same
buffer order, same selection algorithm, same operations, which gives astropy's bounds
bit for bit. Either way the decisions are the same as astropy's.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numba import njit

from drizzlestack._warnings import DrizzlestackError

__all__ = [
    "FLAG_LOW",
    "FLAG_HIGH",
    "FLAG_RANGE",
    "METHODS",
    "reject_stack",
    "rejection_flags",
    "combine_stack",
]

FLAG_LOW = 1
"""Flag bit: rejected low by the statistical method."""
FLAG_HIGH = 2
"""Flag bit: rejected high by the statistical method."""
FLAG_RANGE = 4
"""Flag bit: invalid (NaN, ±inf) or outside ``(range_low, range_high)``."""

METHODS = ("none", "minmax", "percentile", "sigma", "winsorized", "averaged", "linear", "esd")
"""Names accepted by ``method``."""

# Method codes seen by the kernel (numba freezes module globals as constants).
_NONE, _MINMAX, _PERCENTILE, _SIGMA, _WINSORIZED, _AVERAGED, _LINEAR, _ESD = range(8)
_METHOD_CODE = {name: code for code, name in enumerate(METHODS)}

_EPS = float(np.finfo(np.float64).eps)
_INF = math.inf
# Pixels processed together along x: a multiple of every SIMD width; wide enough that
# the lockstep loops amortize their overhead (128 measured ~7 % faster than 64), small
# enough that the column block of a few hundred frames stays in cache.
_LANES = 128
# Winsorization (Huber): clamp at 1.5 sigma, 1.134 restores a Gaussian's sigma from the
# winsorized one, convergence at 0.05 % (the constants of PixInsight's implementation).
_WINSOR_CLAMP = 1.5
_WINSOR_SCALE = 1.134
_WINSOR_TOL = 5e-4
_WINSOR_MAXIT = 1000  # the contraction can be slow (0.85 a step) when it starts from an outlier-inflated IQR
_WINSOR_SOLVES = 16  # exact solves of the fixed point before falling back to iterating
_IQR_TO_SIGMA = 1.0 / 1.3489795003921634  # a Gaussian's sigma from its interquartile range


# ----------------------------------------------------------------------------------------
# Small helpers on a sorted sample v[a:b]
# ----------------------------------------------------------------------------------------


@njit(nogil=True, cache=True, error_model="numpy")
def _network_sort(V, tmp, w, network):
    """Sort the columns ``V[:, :w]`` ascending with a comparator network.

    The same compare-exchange sequence runs on every column, so each comparator is a
    vector min/max over ``w`` contiguous pixels: no data-dependent branches, unlike a
    comparison sort (which mispredicts on every pixel). The minima go through ``tmp``
    so that the compiler sees two non-overlapping stores and vectorizes the loop.
    """
    for c in range(network.shape[0]):
        lower = V[network[c, 0]]
        upper = V[network[c, 1]]
        for l in range(w):
            x = lower[l]
            y = upper[l]
            below = x < y
            tmp[l] = x if below else y
            upper[l] = y if below else x
        for l in range(w):
            lower[l] = tmp[l]


@njit(nogil=True, cache=True, error_model="numpy")
def _median_sorted(v, a, b):
    """Median of sorted ``v[a:b]``; mean of the two middle values for even counts."""
    c = b - a
    h = a + c // 2
    if c % 2 == 1:
        return v[h]
    # Same expression as astropy's C (``0.5 * (upper + lower)``; + is commutative).
    return 0.5 * (v[h] + v[h - 1])


@njit(nogil=True, cache=True, error_model="numpy")
def _negligible(sigma, centre):
    """True when a dispersion is zero or at the rounding level of the data."""
    return not (sigma > 8.0 * _EPS * abs(centre))


# ----------------------------------------------------------------------------------------
# Astropy replica (used only where rounding could make our decisions differ from it)
# ----------------------------------------------------------------------------------------


@njit(nogil=True, cache=True, error_model="numpy")
def _wirth_kth(a, n, k):
    """k-th smallest of ``a[:n]`` by Wirth's selection, permuting ``a`` exactly as
    astropy's ``kth_smallest`` (``astropy/stats/src/wirth_select.c``) does."""
    lo = 0
    hi = n - 1
    while lo < hi:
        x = a[k]
        i = lo
        j = hi
        while True:
            while a[i] < x:
                i += 1
            while x < a[j]:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
            if i > j:
                break
        if j < k:
            lo = i
        if k < i:
            hi = j
    return a[k]


@njit(nogil=True, cache=True, error_model="numpy")
def _wirth_median(a, n):
    """Median by selection, in astropy's order of calls (the upper middle first, as the
    compiled astropy evaluates ``kth(n/2) + kth(n/2 - 1)``); permutes ``a``."""
    if n % 2 == 0:
        upper = _wirth_kth(a, n, n // 2)
        lower = _wirth_kth(a, n, n // 2 - 1)
        return 0.5 * (upper + lower)
    return _wirth_kth(a, n, (n - 1) // 2)


@njit(nogil=True, cache=True, error_model="numpy")
def _astropy_sigma_bounds(buf, count, k_low, k_high, use_low, use_high, max_iterations):
    """Final clipping bounds of ``buf[:count]`` (frame order), operation for operation as
    astropy's ``compute_sigma_clipped_bounds`` with median centre and std; ``buf`` is
    used as the work buffer."""
    iteration = 0
    lo = -_INF
    hi = _INF
    while True:
        median = _wirth_median(buf, count)
        mean = 0.0
        for i in range(count):
            mean += buf[i]
        mean /= count
        std = 0.0
        for i in range(count):
            std += (buf[i] - mean) * (buf[i] - mean)
        std = math.sqrt(std / count)
        lo = median - k_low * std if use_low else -_INF
        hi = median + k_high * std if use_high else _INF
        new_count = 0
        for i in range(count):
            if buf[i] >= lo and buf[i] <= hi:
                buf[new_count] = buf[i]
                new_count += 1
        if new_count == count or new_count == 0:
            return lo, hi
        count = new_count
        iteration += 1
        if max_iterations > 0 and iteration >= max_iterations:
            return lo, hi


# ----------------------------------------------------------------------------------------
# Methods. Each receives the sorted sample v[:m] and writes status[:m]
# (0 kept, FLAG_LOW, FLAG_HIGH) by sorted position; status arrives zeroed.
# ----------------------------------------------------------------------------------------


@njit(nogil=True, cache=True, error_model="numpy")
def _reject_minmax(v, m, status, n_low, n_high, use_low, use_high):
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
def _sigma_lanes(Vd, U, cnt, w, k_low, k_high, use_low, use_high, max_iterations, cut_lo, cut_hi, lane_f, lane_i, buf):
    """astropy-exact iterative sigma clipping of the sorted columns ``Vd[:cnt[l], l]``.

    Writes the final bounds of each column to ``cut_lo``/``cut_hi``: a value is clipped
    low if ``< cut_lo``, high if ``> cut_hi``. All ``w`` columns iterate in lockstep
    (masked sums vectorize across them); a column stops changing once it has converged.
    Only the sums' order differs from astropy's; where that could flip a decision, the
    column is recomputed by :func:`_astropy_sigma_bounds` from its frame-order values
    ``U[:, l]``.
    """
    n = Vd.shape[0]
    s = lane_f[0]
    ss = lane_f[1]
    mean = lane_f[2]
    lo = lane_f[3]
    hi = lane_f[4]
    tol = lane_f[5]
    a = lane_i[0]
    b = lane_i[1]
    it = lane_i[2]
    nlo = lane_i[3]
    nhi = lane_i[4]
    near = lane_i[5]
    active = lane_i[6]
    fallback = lane_i[7]
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
def _winsorize(V, l, a, b, shift, P1, P2, centre, sigma):
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
    the unclamped values (prefix sums ``P1``, ``P2``; ``shift`` must be the median),
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
def _winsor_round(V, k, a, b, k_low, k_high, use_low, use_high, P1, P2, lane_f, lane_i, done):
    """One clipping round of winsorized sigma clipping on the sorted columns
    ``V[a[j]:b[j], j]``, ``j < k``: updates ``a``/``b`` past the values rejected, and
    sets ``done[j]`` where the column stops (nothing rejected, no spread, no
    convergence).

    The centre is the median and the sigma the winsorized one of :func:`_winsorize`,
    iterated from the interquartile-range sigma.
    """
    shift = lane_f[0]
    centre = lane_f[1]
    sigma = lane_f[2]
    sigma0 = lane_f[5]
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
        ctr, sg, ok = _winsorize(V, j, lo, hi, med, P1, P2, med, sigma0[j])
        if not ok:
            # No convergence (a heavily quantized sample whose winsorized sigma
            # collapses): reject nothing rather than on a bad sigma.
            done[j] = 1
            continue
        centre[j] = ctr
        sigma[j] = sg
        if _negligible(sigma[j], centre[j]):
            done[j] = 1
            continue
        if use_low:
            bound = centre[j] - k_low * sigma[j]
            while lo < hi and V[lo, j] < bound:
                lo += 1
        if use_high:
            bound = centre[j] + k_high * sigma[j]
            while hi > lo and V[hi - 1, j] > bound:
                hi -= 1
        if lo == a[j] and hi == b[j]:
            done[j] = 1
        a[j] = lo
        b[j] = hi


@njit(nogil=True, cache=True, error_model="numpy")
def _winsorized_lanes(Vd, cnt, w, k_low, k_high, use_low, use_high, max_iterations, cut_lo, cut_hi, P1, P2, lane_f, lane_i):
    """Winsorized sigma clipping of the sorted columns ``Vd[:cnt[l], l]`` (``Vd`` is
    used as work space).

    Writes the smallest and largest kept value of each column to ``cut_lo``/``cut_hi``.
    Rounds of :func:`_winsor_round` repeat on the survivors while at least 3 remain.
    Between rounds the columns still clipping are packed to the left of the block, so
    that the lockstep passes of later rounds (a few columns, typically) stay dense.
    """
    lane = lane_i[5]  # column of Vd (and of cut_lo, cut_hi) each packed column came from
    a = lane_i[6]
    b = lane_i[7]
    it = lane_i[8]
    done = lane_i[9]
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
        _winsor_round(Vd, k, a, b, k_low, k_high, use_low, use_high, P1, P2, lane_f, lane_i, done)
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


# ----------------------------------------------------------------------------------------
# Block kernels
# ----------------------------------------------------------------------------------------


@njit(nogil=True, cache=True, error_model="numpy")
def _gather(stack, y, x0, w, saturation, range_low, range_high, U, cnt):
    """Copy the pixels ``x0 .. x0 + w`` of row ``y`` of every frame into the columns of
    ``U`` (frame order), replacing the values that take no part in the statistics
    (invalid, saturated, out of range) by +inf, and count the others per column."""
    n = U.shape[0]
    for l in range(w):
        cnt[l] = 0
    for f in range(n):
        src = stack[f, y]
        dst = U[f]
        sat = saturation[f]
        for l in range(w):
            x = src[x0 + l]
            # x - x == 0 is the branch-free "finite" test (inf - inf and NaN give NaN).
            used = (x - x == 0) & (x < sat) & (x > range_low) & (x < range_high)
            dst[l] = x if used else _INF
            cnt[l] += used


@njit(nogil=True, cache=True, error_model="numpy")
def _write_by_cuts(stack, y, x0, w, saturation, range_low, range_high, cut_lo, cut_hi, mask_only, out):
    """Flags of the pixels ``x0 .. x0 + w`` of row ``y``: from the value thresholds
    (``< cut_lo`` low, ``> cut_hi`` high) for the values that took part in the statistics."""
    n = stack.shape[0]
    code_low = 1 if mask_only else FLAG_LOW
    code_high = 1 if mask_only else FLAG_HIGH
    code_range = 1 if mask_only else FLAG_RANGE
    for f in range(n):
        src = stack[f, y]
        dst = out[f, y]
        sat = saturation[f]
        for l in range(w):
            x = np.float64(src[x0 + l])
            finite = x - x == 0
            saturated = finite & (x >= sat)
            in_range = (x > range_low) & (x < range_high)
            code = code_low if x < cut_lo[l] else (code_high if x > cut_hi[l] else 0)
            code = code if in_range else code_range
            code = 0 if saturated else code
            dst[x0 + l] = code if finite else code_range


@njit(nogil=True, cache=True, error_model="numpy")
def _write_by_rank(stack, y, x0, w, U, status, saturation, range_low, range_high, mask_only, rank, out):
    """Flags of the pixels ``x0 .. x0 + w`` of row ``y`` from a status per *sorted
    position* (``status[k, l]``): a frame's position is its rank among the column's
    used values, ties broken by frame order, so equal values are told apart exactly."""
    n = U.shape[0]
    code_range = 1 if mask_only else FLAG_RANGE
    for f in range(n):
        uf = U[f]
        for l in range(w):
            rank[l] = 0
        for g in range(n):
            ug = U[g]
            if g < f:
                for l in range(w):
                    rank[l] += ug[l] <= uf[l]
            elif g > f:
                for l in range(w):
                    rank[l] += ug[l] < uf[l]
        src = stack[f, y]
        dst = out[f, y]
        sat = saturation[f]
        for l in range(w):
            if uf[l] < _INF:
                code = status[rank[l], l]
                dst[x0 + l] = (1 if code != 0 else 0) if mask_only else code
            else:
                x = np.float64(src[x0 + l])
                saturated = (x - x == 0) & (x >= sat)
                dst[x0 + l] = 0 if saturated else code_range


@njit(nogil=True, cache=True, error_model="numpy")
def _sorted_segment(stack, y, x0, w, saturation, range_low, range_high, network, U, V, tmp, Vd, cnt):
    """Gather the pixels ``x0 .. x0 + w`` of row ``y`` (``U``, frame order, unused
    values +inf) and sort their samples (``Vd``, float64; ``cnt`` values per column)."""
    _gather(stack, y, x0, w, saturation, range_low, range_high, U, cnt)
    n = U.shape[0]
    for k in range(n):
        for l in range(w):
            V[k, l] = U[k, l]
    _network_sort(V, tmp, w, network)
    for k in range(n):
        for l in range(w):
            Vd[k, l] = V[k, l]


@njit(nogil=True, cache=True, error_model="numpy")
def _flags_kernel_lockstep(stack, method, k_low, k_high, use_low, use_high, range_low, range_high, saturation, max_iterations, mask_only, network, out):
    """Flags of a ``(frame, y, x)`` block for the sigma and winsorized clipping, which
    run on 128 columns in lockstep; see :func:`_flags_kernel_columns` for the layout."""
    n, ny, nx = stack.shape
    L = _LANES
    U = np.empty((n, L), stack.dtype)
    V = np.empty((n, L), stack.dtype)
    tmp = np.empty(L, stack.dtype)
    Vd = np.empty((n, L), np.float64)
    cnt = np.empty(L, np.int64)
    cut_lo = np.empty(L, np.float64)
    cut_hi = np.empty(L, np.float64)
    P1 = np.empty((n + 1, L), np.float64)
    P2 = np.empty((n + 1, L), np.float64)
    lane_f = np.empty((8, L), np.float64)
    lane_i = np.empty((10, L), np.int64)
    buf = np.empty(n, np.float64)
    for y in range(ny):
        for x0 in range(0, nx, L):
            w = min(L, nx - x0)
            _sorted_segment(stack, y, x0, w, saturation, range_low, range_high, network, U, V, tmp, Vd, cnt)
            if method == _SIGMA:
                _sigma_lanes(Vd, U, cnt, w, k_low, k_high, use_low, use_high, max_iterations, cut_lo, cut_hi, lane_f, lane_i, buf)
            else:
                _winsorized_lanes(Vd, cnt, w, k_low, k_high, use_low, use_high, max_iterations, cut_lo, cut_hi, P1, P2, lane_f, lane_i)
            _write_by_cuts(stack, y, x0, w, saturation, range_low, range_high, cut_lo, cut_hi, mask_only, out)


@njit(nogil=True, cache=True, error_model="numpy")
def _flags_kernel_columns(
    stack,
    method,
    k_low,
    k_high,
    use_low,
    use_high,
    range_low,
    range_high,
    saturation,
    n_low,
    n_high,
    max_iterations,
    esd_lambda,
    esd_fraction,
    esd_low_relaxation,
    mask_only,
    network,
    out,
):
    """Classify every value of a ``(frame, y, x)`` block into ``out`` (uint8, same shape).

    ``out`` receives the flag bits, or 0/1 when ``mask_only`` (so that it can be viewed
    as a bool array without a copy). Pixels are processed ``_LANES`` at a time along x
    (contiguous in every frame): gathered, sorted by a comparator network, rejected,
    and written back. This kernel runs the methods that work column by column on the
    sorted sample (and ``"none"``); :func:`_flags_kernel_lockstep` the others. They are
    separate so that a run compiles only the one it uses.
    """
    n, ny, nx = stack.shape
    L = _LANES
    U = np.empty((n, L), stack.dtype)
    V = np.empty((n, L), stack.dtype)
    tmp = np.empty(L, stack.dtype)
    Vd = np.empty((n, L), np.float64)
    status = np.zeros((n, L), np.uint8)
    cnt = np.empty(L, np.int64)
    rank = np.empty(L, np.int64)
    cut_lo = np.empty(L, np.float64)
    cut_hi = np.empty(L, np.float64)
    col = np.empty(n, np.float64)
    col_status = np.zeros(n, np.uint8)
    buf = np.empty(n, np.float64)
    buf2 = np.empty(n, np.float64)
    pos = np.empty(n, np.int64)
    side = np.zeros(n, np.uint8)
    p1 = np.empty(n + 1, np.float64)
    p2 = np.empty(n + 1, np.float64)
    by_rank = method == _MINMAX or method == _LINEAR or method == _ESD
    for y in range(ny):
        for x0 in range(0, nx, L):
            w = min(L, nx - x0)
            if method == _NONE:
                for l in range(w):
                    cut_lo[l] = -_INF
                    cut_hi[l] = _INF
                _write_by_cuts(stack, y, x0, w, saturation, range_low, range_high, cut_lo, cut_hi, mask_only, out)
                continue
            _sorted_segment(stack, y, x0, w, saturation, range_low, range_high, network, U, V, tmp, Vd, cnt)
            for l in range(w):
                m = cnt[l]
                for k in range(m):
                    col[k] = Vd[k, l]
                    col_status[k] = 0
                if method == _AVERAGED:
                    _reject_averaged(col, m, col_status, k_low, k_high, use_low, use_high, max_iterations)
                elif method == _PERCENTILE:
                    _reject_percentile(col, m, col_status, k_low, k_high, use_low, use_high)
                elif method == _MINMAX:
                    _reject_minmax(col, m, col_status, n_low, n_high, use_low, use_high)
                elif method == _LINEAR:
                    _reject_linear(col, m, col_status, k_low, k_high, use_low, use_high, max_iterations, buf, pos, buf2)
                elif method == _ESD:
                    _reject_esd(col, m, col_status, use_low, use_high, esd_lambda, esd_fraction, esd_low_relaxation, p1, p2, side)
                if by_rank:
                    for k in range(m):
                        status[k, l] = col_status[k]
                else:
                    # These methods clip by value from both ends: the rejected are the
                    # values below the smallest kept one and above the largest.
                    a = 0
                    while a < m and col_status[a] == FLAG_LOW:
                        a += 1
                    b = m
                    while b > a and col_status[b - 1] == FLAG_HIGH:
                        b -= 1
                    cut_lo[l] = col[a] if a < m else _INF
                    cut_hi[l] = col[b - 1] if b > 0 else -_INF
            if by_rank:
                _write_by_rank(stack, y, x0, w, U, status, saturation, range_low, range_high, mask_only, rank, out)
            else:
                _write_by_cuts(stack, y, x0, w, saturation, range_low, range_high, cut_lo, cut_hi, mask_only, out)


@njit(nogil=True, cache=True, error_model="numpy")
def _combine_kernel(stack, flags, weights, image, n_low, n_high):
    """Weighted mean of the kept (flag 0) values of each pixel, and the low/high counts.

    A pixel whose values were all rejected takes the median of its non-range-rejected
    values (never 0: no black holes); a pixel without any valid value is NaN (no data).
    """
    nf, ny, nx = stack.shape
    buf = np.empty(nf, np.float64)
    for y in range(ny):
        for x in range(nx):
            sw = 0.0
            swx = 0.0
            cl = 0
            ch = 0
            for f in range(nf):
                fl = flags[f, y, x]
                if fl & FLAG_LOW:
                    cl += 1
                elif fl & FLAG_HIGH:
                    ch += 1
                elif fl == 0:
                    w = weights[f]
                    val = np.float64(stack[f, y, x])
                    if w > 0.0 and np.isfinite(val):
                        sw += w
                        swx += w * val
            n_low[y, x] = cl
            n_high[y, x] = ch
            if sw > 0.0:
                image[y, x] = swx / sw
                continue
            m = 0
            for f in range(nf):
                val = np.float64(stack[f, y, x])
                if (flags[f, y, x] & FLAG_RANGE) == 0 and weights[f] > 0.0 and np.isfinite(val):
                    buf[m] = val
                    m += 1
            if m == 0:
                image[y, x] = np.nan
            else:
                image[y, x] = _wirth_median(buf, m)


# ----------------------------------------------------------------------------------------
# Python layer
# ----------------------------------------------------------------------------------------


def _is_dask(array: Any) -> bool:
    return type(array).__module__.split(".")[0] == "dask"


def _esd_critical_values(n_frames: int, significance: float, fraction: float) -> np.ndarray:
    """Rosner's two-sided critical values ``lam[n, i]`` for samples of ``n <= n_frames``
    values and the ``i``-th removal (0-based); ``inf`` where undefined."""
    from scipy.stats import t as student_t

    lam = np.full((n_frames + 1, max(n_frames, 1)), np.inf)
    for n in range(3, n_frames + 1):
        k = min(max(int(fraction * n), 1), n - 2)
        i = np.arange(k)
        dof = n - i - 2
        p = 1.0 - significance / (2.0 * (n - i))
        t = student_t.ppf(p, dof)
        lam[n, :k] = (n - i - 1) * t / np.sqrt((dof + t * t) * (n - i))
    return lam


def _kernel_arguments(
    n_frames: int,
    method: str,
    low: float,
    high: float,
    reject_low: bool,
    reject_high: bool,
    range_low: float | None,
    range_high: float | None,
    saturation,
    n_low: int,
    n_high: int,
    max_iterations: int | None,
    esd_significance: float,
    esd_outliers: float,
    esd_low_relaxation: float,
) -> tuple:
    """Validate the parameters and turn them into the kernel's positional arguments."""
    if method not in _METHOD_CODE:
        raise DrizzlestackError(f"method={method!r}: unknown rejection method; choose one of {', '.join(METHODS)}")
    for name, value in (("low", low), ("high", high)):
        if not (np.isfinite(value) and value >= 0):
            raise DrizzlestackError(f"{name}={value!r}: the threshold must be a finite number >= 0")
    for name, value in (("n_low", n_low), ("n_high", n_high)):
        if int(value) != value or value < 0:
            raise DrizzlestackError(f"{name}={value!r}: must be an integer >= 0")
    if max_iterations is not None and (int(max_iterations) != max_iterations or max_iterations < 1):
        raise DrizzlestackError(f"max_iterations={max_iterations!r}: must be None or an integer >= 1")
    if not 0.0 < esd_significance < 1.0:
        raise DrizzlestackError(f"esd_significance={esd_significance!r}: must be in (0, 1)")
    if not 0.0 < esd_outliers < 1.0:
        raise DrizzlestackError(f"esd_outliers={esd_outliers!r}: must be in (0, 1)")
    if not esd_low_relaxation > 0.0:
        raise DrizzlestackError(f"esd_low_relaxation={esd_low_relaxation!r}: must be > 0")
    r_low = -np.inf if range_low is None else float(range_low)
    r_high = np.inf if range_high is None else float(range_high)
    if np.isnan(r_low) or np.isnan(r_high):
        raise DrizzlestackError("range_low/range_high: NaN is not a range limit (use None for no limit)")
    if saturation is None:
        sat = np.full(n_frames, np.inf)
    else:
        sat = np.asarray(saturation, dtype=np.float64)
        if sat.ndim == 0:
            sat = np.full(n_frames, float(sat))
        elif sat.shape != (n_frames,):
            raise DrizzlestackError(
                f"saturation: expected a scalar or one level per frame ({n_frames}), got shape {sat.shape}"
            )
        # A NaN level means "unknown": such a frame has no saturation protection.
        sat = np.where(np.isnan(sat), np.inf, sat)
    if method == "esd":
        lam = _esd_critical_values(n_frames, esd_significance, esd_outliers)
    else:
        lam = np.full((1, 1), np.inf)
    return (
        _METHOD_CODE[method],
        float(low),
        float(high),
        bool(reject_low),
        bool(reject_high),
        r_low,
        r_high,
        sat,
        int(n_low),
        int(n_high),
        0 if max_iterations is None else int(max_iterations),
        lam,
        float(esd_outliers),
        float(esd_low_relaxation),
    )


@functools.lru_cache(maxsize=32)
def _sorting_network(n: int) -> np.ndarray:
    """Comparators ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort for ``n`` values.

    Built for the next power of two and pruned of every comparator that touches an
    index ``>= n``: padding with +inf makes those comparators no-ops, so the pruned
    network still sorts ``n`` values. About ``n log2(n)^2 / 4`` comparators.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            j = k % p
            while j + k < size:
                for i in range(k):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
                j += 2 * k
            k //= 2
        p *= 2
    network = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    network.flags.writeable = False
    return network


def _as_float(block: np.ndarray) -> np.ndarray:
    # float32 and float64 go to the kernel as they are, anything else as float64 (as
    # astropy does). Always C-contiguous: a strided view (a Dask block sliced from a
    # NumPy array) would make numba compile the whole kernel once more.
    if block.dtype != np.float32 and block.dtype != np.float64:
        return np.ascontiguousarray(block, dtype=np.float64)
    return np.ascontiguousarray(block)


def _flags_block(block: np.ndarray, args: tuple, mask_only: bool) -> np.ndarray:
    """Kernel call on one in-memory ``(frame, y, x)`` block."""
    block = _as_float(np.asarray(block))
    out = np.empty(block.shape, dtype=np.uint8)
    if block.size:
        network = _sorting_network(block.shape[0])
        method = args[0]
        if method == _SIGMA or method == _WINSORIZED:
            (method, k_low, k_high, use_low, use_high, range_low, range_high, saturation, _, _, max_iterations) = args[:11]
            _flags_kernel_lockstep(
                block, method, k_low, k_high, use_low, use_high, range_low, range_high, saturation,
                max_iterations, mask_only, network, out,
            )  # fmt: skip
        else:
            _flags_kernel_columns(block, *args, mask_only, network, out)
    return out.view(np.bool_) if mask_only else out


def _check_stack(stack: Any) -> Any:
    if not _is_dask(stack):
        stack = np.asarray(stack)
    if stack.ndim != 3:
        raise DrizzlestackError(f"stack: expected a (frame, y, x) array, got {stack.ndim} dimensions")
    if stack.dtype.kind not in "fiu":
        raise DrizzlestackError(f"stack: expected real numbers, got dtype {stack.dtype}")
    if _is_dask(stack) and stack.numblocks[0] != 1:
        # Rejection needs every frame of a pixel in one task.
        stack = stack.rechunk({0: -1})
    return stack


def _flags_or_mask(stack, mask_only: bool, params: dict):
    stack = _check_stack(stack)
    args = _kernel_arguments(stack.shape[0], **params)
    if _is_dask(stack):
        return stack.map_blocks(
            _flags_block,
            args=args,
            mask_only=mask_only,
            dtype=np.bool_ if mask_only else np.uint8,
            meta=np.empty((0, 0, 0), dtype=np.bool_ if mask_only else np.uint8),
        )
    return _flags_block(stack, args, mask_only)


def rejection_flags(
    stack,
    method: str = "winsorized",
    low: float = 3.0,
    high: float = 3.0,
    reject_low: bool = True,
    reject_high: bool = True,
    range_low: float | None = None,
    range_high: float | None = None,
    saturation: float | np.ndarray | None = None,
    *,
    n_low: int = 1,
    n_high: int = 1,
    max_iterations: int | None = None,
    esd_significance: float = 0.05,
    esd_outliers: float = 0.3,
    esd_low_relaxation: float = 1.0,
):
    """Per-frame, per-pixel rejection flags of a stack (the store's ``rejection`` cube).

    Parameters
    ----------
    stack : array_like or dask.array.Array, shape (frame, y, x)
        Registered, normalized frames. NaN and ±inf mean "no data". A Dask array should
        be chunked ``(frame=all, y=tile, x=tile)``; a frame axis in several chunks is
        rechunked into one.
    method : {"none", "minmax", "percentile", "sigma", "winsorized", "averaged", "linear", "esd"}
        Rejection algorithm (see the module documentation). Default ``"winsorized"``, the
        pipeline's default.
    low, high : float
        Rejection thresholds below and above the centre, in the method's units (sigma,
        except ``"percentile"``: fractions of the median; unused by ``"minmax"`` and
        ``"esd"``).
    reject_low, reject_high : bool
        Switch the rejection of low / high values on or off. A side switched off keeps
        its outliers in the statistics too (its bound is infinite).
    range_low, range_high : float, optional
        Range rejection: values ``<= range_low`` or ``>= range_high`` are flagged
        :data:`FLAG_RANGE` and left out of everything. Saturated values (see
        ``saturation``) are never range-rejected.
    saturation : float or array_like of shape (frame,), optional
        Saturation level, one for all frames or one per frame (in the stack's units,
        i.e. after normalization); NaN means unknown. Values ``>=`` their frame's level
        are kept and excluded from the statistics (see the module documentation).
    n_low, n_high : int
        Number of lowest / highest values rejected by ``"minmax"``.
    max_iterations : int, optional
        Cap on the clipping iterations of ``"sigma"`` (astropy's ``maxiters``),
        ``"winsorized"``, ``"averaged"`` and ``"linear"``. Default: until nothing changes.
    esd_significance : float
        Significance level (type I error) of the ESD test.
    esd_outliers : float
        Largest fraction of a sample that the ESD test may reject.
    esd_low_relaxation : float
        Low deviations are divided by this in the ESD test, to reject dark values less
        readily than bright ones. Default 1: Rosner's test as published. (PixInsight
        uses 1.5, but with a trimmed-mean centre; about the plain mean, 1.5 leaves a
        single dead pixel among 20 frames undetectable: its own weight in the standard
        deviation caps its statistic near ``(n - 1) / sqrt(n) / 1.5``.)

    Returns
    -------
    numpy.ndarray or dask.array.Array of uint8, shape (frame, y, x)
        :data:`FLAG_LOW`, :data:`FLAG_HIGH`, :data:`FLAG_RANGE` or 0 (kept); lazy for a
        Dask input.

    See Also
    --------
    reject_stack : the same decision as a boolean mask.
    combine_stack : the weighted mean of the kept values and the rejection counts.
    """
    params = dict(
        method=method, low=low, high=high, reject_low=reject_low, reject_high=reject_high,
        range_low=range_low, range_high=range_high, saturation=saturation, n_low=n_low,
        n_high=n_high, max_iterations=max_iterations, esd_significance=esd_significance,
        esd_outliers=esd_outliers, esd_low_relaxation=esd_low_relaxation,
    )  # fmt: skip
    return _flags_or_mask(stack, False, params)


def reject_stack(
    stack,
    method: str = "sigma",
    low: float = 3.0,
    high: float = 3.0,
    reject_low: bool = True,
    reject_high: bool = True,
    range_low: float | None = None,
    range_high: float | None = None,
    saturation: float | np.ndarray | None = None,
    *,
    n_low: int = 1,
    n_high: int = 1,
    max_iterations: int | None = None,
    esd_significance: float = 0.05,
    esd_outliers: float = 0.3,
    esd_low_relaxation: float = 1.0,
):
    """Boolean rejection mask of a stack: True where a value is not used.

    Same parameters as :func:`rejection_flags` (but ``method`` defaults to ``"sigma"``).
    The mask is ``flags != 0``: rejected low or high, out of range, or invalid (NaN/inf).

    Returns
    -------
    numpy.ndarray or dask.array.Array of bool, shape (frame, y, x)
        Lazy for a Dask input.

    Notes
    -----
    With ``method="sigma"`` and no range or saturation limits the mask is exactly
    ``astropy.stats.sigma_clip(stack, axis=0, sigma_lower=low, sigma_upper=high,
    maxiters=max_iterations, cenfunc="median", stdfunc="std").mask``.

    Examples
    --------
    >>> import numpy as np
    >>> from drizzlestack.integration.rejection import reject_stack
    >>> stack = np.ones((5, 1, 1), np.float32) + np.arange(5).reshape(5, 1, 1) * 0.01
    >>> stack[2, 0, 0] = 100.0  # a cosmic ray
    >>> reject_stack(stack, method="sigma", low=2, high=2)[:, 0, 0]
    array([False, False,  True, False, False])
    """
    params = dict(
        method=method, low=low, high=high, reject_low=reject_low, reject_high=reject_high,
        range_low=range_low, range_high=range_high, saturation=saturation, n_low=n_low,
        n_high=n_high, max_iterations=max_iterations, esd_significance=esd_significance,
        esd_outliers=esd_outliers, esd_low_relaxation=esd_low_relaxation,
    )  # fmt: skip
    return _flags_or_mask(stack, True, params)


def _combine_block(block: np.ndarray, flags: np.ndarray, weights: np.ndarray) -> np.ndarray:
    block = _as_float(np.asarray(block))
    flags = np.ascontiguousarray(flags, dtype=np.uint8)
    _, ny, nx = block.shape
    out = np.empty((3, ny, nx), dtype=np.float64)
    image = np.empty((ny, nx), np.float64)
    n_low = np.empty((ny, nx), np.int64)
    n_high = np.empty((ny, nx), np.int64)
    if block.size:
        _combine_kernel(block, flags, weights, image, n_low, n_high)
    out[0] = image
    out[1] = n_low
    out[2] = n_high
    return out


def combine_stack(stack, flags, weights=None):
    """Integrate a stack: the weighted mean of its kept values, and rejection counts.

    Parameters
    ----------
    stack : array_like or dask.array.Array, shape (frame, y, x)
        The stack the flags were computed on.
    flags : array_like or dask.array.Array of uint8, shape (frame, y, x)
        Flags from :func:`rejection_flags` (0 = kept).
    weights : array_like of shape (frame,), optional
        Per-frame weights (default: all 1). Frames with weight 0 (or NaN) contribute
        nothing.

    Returns
    -------
    image : ndarray or dask array of float32, shape (y, x)
        ``Σ w·x / Σ w`` over the kept values. Where every value of a pixel was rejected
        it is the median of the pixel's in-range values instead (never 0 because of
        rejection); where there is no valid value at all it is NaN (no data). Saturated
        values are kept by :func:`rejection_flags`, so an all-saturated pixel stays
        saturated.
    rejected_low, rejected_high : ndarray or dask array of uint16, shape (y, x)
        Number of frames flagged :data:`FLAG_LOW` / :data:`FLAG_HIGH` at each pixel.
        Range-rejected and invalid values are in neither count, so
        ``kept + rejected_low + rejected_high + (flags & FLAG_RANGE != 0).sum(0)`` equals
        the number of frames.

    Notes
    -----
    The computation is per pixel, so it runs blockwise on a Dask stack (chunked
    ``(frame=all, y=tile, x=tile)``); the three outputs share one task per tile.
    """
    stack = _check_stack(stack)
    n_frames = stack.shape[0]
    if n_frames > np.iinfo(np.uint16).max:
        raise DrizzlestackError(f"stack: {n_frames} frames exceed the uint16 rejection counts")
    if weights is None:
        w = np.ones(n_frames, np.float64)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n_frames,):
            raise DrizzlestackError(f"weights: expected one weight per frame ({n_frames}), got shape {w.shape}")
        w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    if flags.shape != stack.shape:
        raise DrizzlestackError(f"flags: shape {flags.shape} does not match the stack's {stack.shape}")
    if _is_dask(stack) or _is_dask(flags):
        import dask.array as da

        if not _is_dask(stack):
            stack = da.from_array(stack, chunks=(-1,) + flags.chunks[1:])
        if not _is_dask(flags):
            flags = da.from_array(np.asarray(flags), chunks=stack.chunks)
        flags = flags.rechunk(stack.chunks)
        out = da.map_blocks(
            _combine_block,
            stack,
            flags,
            weights=w,
            chunks=((3,),) + stack.chunks[1:],
            dtype=np.float64,
            meta=np.empty((0, 0, 0), np.float64),
        )
        return out[0].astype(np.float32), out[1].astype(np.uint16), out[2].astype(np.uint16)
    out = _combine_block(stack, np.asarray(flags), w)
    return out[0].astype(np.float32), out[1].astype(np.uint16), out[2].astype(np.uint16)
