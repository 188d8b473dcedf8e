"""The Lanczos kernel ``L(x) = sinc(x) sinc(x / a)``, tabulated once for the two steps
that interpolate with it: the registered view's resampling
(:mod:`drizzlestack.integration.resample`, order 3) and drizzle's ``lanczos2`` /
``lanczos3`` kernels (:mod:`drizzlestack.drizzle.kernels_centred`).

Trigonometric calls per weight would cost more than the sums they weight, so both read
samples of ``L`` at a spacing of ``1 / LUT_DENSITY`` and interpolate linearly between
them: the error is at most ``max|L''| / (8 LUT_DENSITY**2)``, 2.7e-8 for order 3 and
3.1e-8 for order 2 (measured against ``np.sinc``), far under float32 resolution (STScI drizzle instead takes the nearest sample
of a table at 0.003 px).

This module is plain NumPy (no numba): the tables are built once per process. Drizzle's
kernel gets its table as an argument; the resampling freezes :func:`lanczos_taps` into
its compiled function, and numba's cache of it is keyed by the content of
``resample.py`` alone: after a change to the tables here, clear numba's cache (the
``*.nbi``/``*.nbc`` files in ``integration/__pycache__``).
"""

from __future__ import annotations

import functools

import numpy as np

#: Samples of ``L`` per unit of its argument (input pixels).
LUT_DENSITY = 4096


def _check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"Lanczos order={order!r}: must be a positive integer")
    return int(order)


def lanczos_table(order: int) -> np.ndarray:
    """Samples of the Lanczos kernel of the given order on ``[0, order]``.

    Parameters
    ----------
    order : int
        The kernel's order ``a`` (2 or 3 in this package), its reach in input pixels.

    Returns
    -------
    ndarray of float64, shape ``(order * LUT_DENSITY + 2,)``, read-only
        ``lut[k] = L(k / LUT_DENSITY)`` for ``k = 0 .. order * LUT_DENSITY`` (exactly 1
        at 0 and exactly 0 at ``order``, where the formula leaves a rounding residue),
        plus one zero past the end so that interpolating at ``x = order`` reads no
        further than the table.
    """
    return _table(_check_order(order))


@functools.cache
def _table(order: int) -> np.ndarray:
    n = order * LUT_DENSITY
    px = np.pi * (np.arange(1, n + 1) / LUT_DENSITY)
    lut = np.zeros(n + 2)
    lut[0] = 1.0
    lut[1:n + 1] = np.sin(px) * np.sin(px / order) / (px * (px / order))
    lut[n] = 0.0
    lut.flags.writeable = False
    return lut


def lanczos_taps(order: int) -> np.ndarray:
    """Weights of the ``2 * order`` taps of a separable Lanczos interpolation, by
    fractional position, read from :func:`lanczos_table` (the same samples).

    Parameters
    ----------
    order : int
        The kernel's order ``a``.

    Returns
    -------
    ndarray of float64, shape ``(LUT_DENSITY + 1, 2 * order)``, read-only
        ``taps[q, j] = L(j - order + 1 - q / LUT_DENSITY)``: the weight of the pixel at
        offset ``j - order + 1`` from ``floor(x)`` when ``x - floor(x) = q / LUT_DENSITY``
        (rows for ``q = 0 .. LUT_DENSITY``, so that linear interpolation between rows
        ``q`` and ``q + 1`` covers every fractional part).
    """
    return _taps(_check_order(order))


@functools.cache
def _taps(order: int) -> np.ndarray:
    lut = _table(order)
    q = np.arange(LUT_DENSITY + 1)[:, None]
    offsets = np.arange(-order + 1, order + 1)[None, :]
    # |offset - q / D| * D is the integer |offset * D - q|: an exact table index
    taps = np.ascontiguousarray(lut[np.abs(offsets * LUT_DENSITY - q)])
    taps.flags.writeable = False
    return taps
