"""What every drizzle kernel shares: the coordinate guard, the output-pixel rule, the
deposit into the accumulators, and the small passes around the kernels (finalize,
coverage, the homography pixmap).

The conventions these implement are written up in :mod:`drizzlestack.drizzle.kernels`.
numba inlines :func:`_out_index` and :func:`_deposit` and freezes :data:`MAX_COORD` into
the kernels that use them, and its cache is keyed by the content of each kernel's own source file: after a
change here, clear numba's cache (the ``*.nbi``/``*.nbc`` files in the ``__pycache__`` of
``drizzle/``), or the cached kernels in :mod:`.kernels_square` and :mod:`.kernels_centred`
keep the old code (touching their files does not help: numba hashes their content).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

#: Pixmap coordinates beyond this (in output pixels) are treated as invalid.
MAX_COORD = 1.0e9


@njit(nogil=True, inline="always", error_model="numpy")
def _out_index(x):
    """Output pixel containing coordinate ``x`` (half-up, origin independent)."""
    return int(math.floor(x + 0.5))


@njit(nogil=True, inline="always", error_model="numpy")
def plane_of(chan, j, i, nplanes, shift, H):
    """``(dx, dy, roff)`` of input pixel ``(i, j)``: its plane's shift (output px) and
    the plane's first accumulator row; ``(0, 0, 0)`` for grey data (``nplanes = 1``,
    ``chan`` and ``shift`` unread)."""
    if nplanes > 1:
        p = int(chan[j, i])
        return shift[p, 0], shift[p, 1], p * H
    return 0.0, 0.0, 0


@njit(nogil=True, inline="always", error_model="numpy")
def _deposit(acc_wv, acc_w, touched, use_touched, row, col, w, wv):
    """Add weight ``w`` and weight x value ``wv`` into output pixel ``(row, col)`` of the
    accumulators, and mark it in ``touched`` when ``use_touched``."""
    acc_w[row, col] += w
    acc_wv[row, col] += wv
    if use_touched:
        touched[row, col] = 1


@njit(nogil=True, cache=True, error_model="numpy")
def finalize_kernel(acc_wv, acc_w, image):
    """``image = acc_wv / acc_w`` where ``acc_w != 0``, NaN elsewhere (``image`` may
    be ``acc_wv`` itself)."""
    H, W = acc_w.shape
    for j in range(H):
        for i in range(W):
            w = acc_w[j, i]
            if w != 0.0:
                image[j, i] = acc_wv[j, i] / w
            else:
                image[j, i] = np.nan


@njit(nogil=True, cache=True, error_model="numpy")
def finalize_pair_kernel(acc_wv, acc_w, image, weights):
    """:func:`finalize_kernel` into ``image`` and ``weights = acc_w`` in one pass, both
    cast to their arrays' dtype (float32 for the stored products: the same values as
    finalizing in float64 and casting afterwards, without the float64 image and the
    two extra passes)."""
    H, W = acc_w.shape
    for j in range(H):
        for i in range(W):
            w = acc_w[j, i]
            weights[j, i] = w
            if w != 0.0:
                image[j, i] = acc_wv[j, i] / w
            else:
                image[j, i] = np.nan


@njit(nogil=True, cache=True, error_model="numpy")
def add_touched(coverage, touched):
    """``coverage += touched`` (in place; ``touched`` is 0 or 1)."""
    H, W = touched.shape
    for j in range(H):
        for i in range(W):
            # no branch: the loop vectorizes (a colour tile sweeps three planes per frame)
            coverage[j, i] += touched[j, i]


@njit(nogil=True, cache=True, error_model="numpy")
def homography_grid(matrix, y0, x0, ny, nx, out):
    """``out[j, i] = (x, y)`` of pixel ``(x0 + i, y0 + j)`` mapped through the 3x3
    homography ``matrix`` (NaN where it maps to infinity): a window's pixmap in one
    pass, without the half-dozen full-size temporaries of the NumPy expression (in
    threaded workers those allocations page-fault and serialize)."""
    m = matrix
    for j in range(ny):
        y = float(y0 + j)
        for i in range(nx):
            x = float(x0 + i)
            w = m[2, 0] * x + m[2, 1] * y + m[2, 2]
            if w == 0.0:
                out[j, i, 0] = np.nan
                out[j, i, 1] = np.nan
            else:
                out[j, i, 0] = (m[0, 0] * x + m[0, 1] * y + m[0, 2]) / w
                out[j, i, 1] = (m[1, 0] * x + m[1, 1] * y + m[1, 2]) / w
