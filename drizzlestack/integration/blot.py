"""The blot: the reference-grid model mapped back onto a frame's own pixels, for the
outlier test (:mod:`.outliers`).

Bilinear interpolation of the model at each frame pixel's centre (its local gradient is
in the test's derivative term, which covers the interpolation error too; Lanczos-3 cost
5x more), the nearest pixel of the kept samples' spread, both taken to the frame's
units. :func:`_blot_own` blots each pixel's own colour at every pixel (what the test
always reads); :func:`_blot_list` the few other values the test reads lazily;
:func:`blot_window` everything at every pixel (the reference the tests compare with).
"""

from __future__ import annotations

import numba
import numpy as np

from ..geometry import input_window
from .resample import LANCZOS3_PAD

#: input pixels whose centres land this far (reference pixels) beyond the model's edge
#: are tested against the edge (a drop of an input pixel reaches about one pixel)
EDGE_REACH = 1.5


@numba.njit(nogil=True, cache=True)
def _bilinear(model, c, x, y, wy0, wx0, mny, mnx, reach):
    """Bilinear interpolation of channel ``c`` of a model window (the window starts at
    pixel ``(wy0, wx0)`` of an array of ``(mny, mnx)`` pixels per channel) at the array
    position ``(x, y)`` (positions up to ``reach`` beyond the edge take the edge's
    values), and the window pixel ``(nv, nu)`` nearest to it; ``(nan, -1, -1)`` where
    there is no model."""
    h, w = model.shape[1], model.shape[2]
    if not (x >= -0.5 - reach and x <= mnx - 0.5 + reach and y >= -0.5 - reach and y <= mny - 0.5 + reach):
        return np.nan, -1, -1  # NaN positions too
    x = min(max(x, 0.0), mnx - 1.0) - wx0
    y = min(max(y, 0.0), mny - 1.0) - wy0
    iu = int(np.floor(x))
    iv = int(np.floor(y))
    fu = x - iu
    fv = y - iv
    nu = min(max(int(np.floor(x + 0.5)), 0), w - 1)
    nv = min(max(int(np.floor(y + 0.5)), 0), h - 1)
    acc = 0.0
    wsum = 0.0
    for dv in range(2):
        rv = min(max(iv + dv, 0), h - 1)
        wv = fv if dv == 1 else 1.0 - fv
        for du in range(2):
            ru = min(max(iu + du, 0), w - 1)
            val = model[c, rv, ru]
            if np.isfinite(val):
                wgt = wv * (fu if du == 1 else 1.0 - fu)
                acc += wgt * val
                wsum += wgt
    if wsum > 0.0 and np.isfinite(model[c, nv, nu]):
        return acc / wsum, nv, nu
    return np.nan, -1, -1


@numba.njit(nogil=True, cache=True)
def _blot_at(model, c, geo, scale, offset, y, x, spread):
    """Channel ``c``'s model and ``spread`` blotted at window pixel ``(y, x)`` in the
    frame's units (float32, as :func:`blot_window` stores them; NaN: no model)."""
    wy0, wx0, mny, mnx, matrix, y0, x0, xs, ys, use_matrix, reach = geo
    if use_matrix:
        fx = x0 + x
        fy = y0 + y
        wz = matrix[2, 0] * fx + matrix[2, 1] * fy + matrix[2, 2]
        rx = (matrix[0, 0] * fx + matrix[0, 1] * fy + matrix[0, 2]) / wz
        ry = (matrix[1, 0] * fx + matrix[1, 1] * fy + matrix[1, 2]) / wz
    else:
        rx = xs[y, x]
        ry = ys[y, x]
    val, nv, nu = _bilinear(model, c, rx, ry, wy0, wx0, mny, mnx, reach)
    if nv < 0:
        return np.float32(np.nan), np.float32(np.nan)
    return np.float32((val - offset) / scale), np.float32(spread[c, nv, nu] / scale)


@numba.njit(nogil=True, cache=True)
def _blot_own(model, chan, geo, norm_scale, norm_offset, out):
    """Each pixel's own colour's model blotted at the pixel (``out``: (ty, tx) float32).

    :func:`_bilinear`'s common case (inside the window, four finite values: no clamps,
    one finiteness test) written out here (the call per pixel cost 2x); the same
    operations in the same order as its general case, so the same bits."""
    wy0, wx0, mny, mnx, matrix, y0, x0, xs, ys, use_matrix, reach = geo
    ty, tx = out.shape
    h, w = model.shape[1], model.shape[2]
    xlo, xhi = -0.5 - reach, mnx - 0.5 + reach
    ylo, yhi = -0.5 - reach, mny - 0.5 + reach
    xmax, ymax = mnx - 1.0, mny - 1.0
    m00, m01, m02 = matrix[0, 0], matrix[0, 1], matrix[0, 2]
    m10, m11, m12 = matrix[1, 0], matrix[1, 1], matrix[1, 2]
    m20, m21, m22 = matrix[2, 0], matrix[2, 1], matrix[2, 2]
    rx = np.empty(tx)
    ry = np.empty(tx)
    for j in range(ty):
        fy = y0 + j
        # A row's positions first, in a branch-free loop of its own (the blot ran ~15 % faster).
        if use_matrix:
            for i in range(tx):
                fx = x0 + i
                wz = m20 * fx + m21 * fy + m22
                rx[i] = (m00 * fx + m01 * fy + m02) / wz
                ry[i] = (m10 * fx + m11 * fy + m12) / wz
        else:
            for i in range(tx):
                rx[i] = xs[j, i]
                ry[i] = ys[j, i]
        for i in range(tx):
            c = chan[j, i]
            x = rx[i]
            y = ry[i]
            if x >= xlo and x <= xhi and y >= ylo and y <= yhi:
                x = min(max(x, 0.0), xmax) - wx0
                y = min(max(y, 0.0), ymax) - wy0
                iu = int(np.floor(x))
                iv = int(np.floor(y))
                if iu >= 0 and iv >= 0 and iu + 1 < w and iv + 1 < h:
                    v00, v01 = model[c, iv, iu], model[c, iv, iu + 1]
                    v10, v11 = model[c, iv + 1, iu], model[c, iv + 1, iu + 1]
                    if np.isfinite(np.float64(v00) + np.float64(v01) + np.float64(v10) + np.float64(v11)):
                        fu = x - iu
                        fv = y - iv
                        gu, gv = 1.0 - fu, 1.0 - fv
                        w00, w01, w10, w11 = gv * gu, gv * fu, fv * gu, fv * fu
                        acc = 0.0 + w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11  # (left to right)
                        wsum = 0.0 + w00 + w01 + w10 + w11
                        out[j, i] = (acc / wsum - norm_offset[c]) / norm_scale[c]
                        continue
            val, nv, nu = _bilinear(model, c, rx[i], ry[i], wy0, wx0, mny, mnx, reach)
            out[j, i] = (val - norm_offset[c]) / norm_scale[c] if nv >= 0 else np.nan


@numba.njit(nogil=True, cache=True)
def blot_window(model, spread, wy0, wx0, mny, mnx, matrix, y0, x0, xs, ys, use_matrix, reach,
                norm_scale, norm_offset, out_model, out_spread):
    """The model and its spread at the centres of one window of frame pixels.

    Bilinear interpolation of the model (its local gradient is in the test's derivative
    term, which covers the interpolation error too; Lanczos-3 cost 5x more here), the
    nearest pixel of the spread, both taken to the frame's units. The outlier pass blots
    only what its test reads (:func:`flag_window`), with the same arithmetic.

    Parameters
    ----------
    model, spread : (n_channels, h, w) float32
        Windows of the reference-grid model and spread arrays, starting at their pixel
        ``(wy0, wx0)``; the arrays are ``(mny, mnx)`` per channel.
    matrix : (3, 3) float64
        Frame pixel -> model-array pixel homography (with ``use_matrix``); otherwise
        ``xs``, ``ys`` hold the mapped positions (the distortion spline).
    y0, x0 : int
        Frame pixel of the window's first pixel.
    reach : float
        Positions up to this far beyond the model's edge take the edge's values.
    norm_scale, norm_offset : (n_channels,) float64
        The frame's normalization per channel (normalized = raw * scale + offset).
    out_model, out_spread : (n_channels, ty, tx) float32
        Every channel at every pixel; NaN where the model has no data.
    """
    geo = (wy0, wx0, mny, mnx, matrix, y0, x0, xs, ys, use_matrix, reach)
    n_chan, ty, tx = out_model.shape
    for c in range(n_chan):
        for j in range(ty):
            for i in range(tx):
                out_model[c, j, i], out_spread[c, j, i] = _blot_at(model, c, geo, norm_scale[c], norm_offset[c], j, i,
                                                                   spread)


@numba.njit(nogil=True, cache=True)
def _blot_list(planes, spreads, geo, norm_scale, norm_offset, todo, n, which, out):
    """The model (``which`` 0) or the spread (1) of colour ``todo[0, i]`` blotted at
    window pixel ``(todo[1, i], todo[2, i])`` into ``out[todo[3, i]]``, for ``i < n``."""
    for i in range(n):
        c = todo[0, i]
        y, x = todo[1, i], todo[2, i]
        out[todo[3, i]] = _blot_at(planes, c, geo, norm_scale[c], norm_offset[c], y, x, spreads)[which]


class _Swapped:
    """A frame mapping seen from the reference side (for the window planner)."""

    def __init__(self, mapping):
        self._mapping = mapping

    def inverse(self, x, y):
        return self._mapping.forward(x, y)


def model_window(mapping, sy: slice, sx: slice, ref_shape):
    """Window of the reference grid that the blot of frame pixels ``[sy, sx]`` reads."""
    box = (sx.start - 0.5, sy.start - 0.5, sx.stop - 0.5, sy.stop - 0.5)
    return input_window(_Swapped(mapping), box, ref_shape, pad=LANCZOS3_PAD + EDGE_REACH)
