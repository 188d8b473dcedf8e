"""Constants and small kernels on a sorted sample: sorting network, medians, quantiles,
selection, and the replica of astropy's sigma-clipping bounds (see the package
docstring for why it exists).

These are called from :mod:`.methods`, :mod:`.flags`, :mod:`.combine` and
:mod:`drizzlestack.integration.stats`, whose numba caches are keyed by the content of
their own files only: after changing a kernel here, clear numba's cache (the
``*.nbi``/``*.nbc`` files in those ``__pycache__`` folders), or the callers keep the
old code."""

from __future__ import annotations

import math

import numpy as np
from numba import njit


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
    """Median of sorted ``v[a:b]`` as a float64; NaN for an empty slice. For an even
    count, the two middle values are added in the dtype of ``v`` and halved, as
    :func:`numpy.median` does (on float32 samples the sum is rounded to float32: the
    frame statistics of :mod:`drizzlestack.integration.stats` rely on that)."""
    c = b - a
    if c <= 0:
        return np.nan
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


