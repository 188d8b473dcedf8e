"""The drizzle kernels that place a drop by its mapped centre alone: ``point`` (all of
it in one output pixel), ``turbo`` (an axis-aligned square), ``gaussian`` and
``lanczos`` (a profile of the distance to the centre). Unlike the square kernel they
read one pixmap entry per input pixel and their footprint is set by
``pixel_scale_ratio``, not by the pixmap's local shape. Conventions shared with the
square kernel: :mod:`drizzlestack.drizzle.kernels`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, uint64

from .kernels_common import MAX_COORD, _deposit, _out_index, plane_of

#: Gaussian kernel constants of STScI drizzle (FWHM = 2.3548 sigma, 2.5 sigma reach,
#: never narrower than 1.2 input pixels so that there are no holes); also read by
#: :func:`drizzlestack.drizzle.array.kernel_radius`.
GAUSS_FWHM = 2.3548
GAUSS_NSIG = 2.5
GAUSS_MIN_REACH = 1.2


@njit(nogil=True, inline="always", error_model="numpy")
def _centred_drop(data, pixmap, weights, use_weights, j, i, chan, nplanes, shift, H):
    """``(ok, value, weight, x, y, roff)`` of input pixel ``(i, j)``: its value and
    weight, its mapped centre (colour: moved by its plane's ``shift``), the first row of
    its plane, and whether it contributes at all (finite value, weight ``> 0``, a centre
    within ``+-MAX_COORD``); shared by the turbo, gaussian and lanczos kernels."""
    v = data[j, i]
    wt = weights[j, i] if use_weights else 1.0
    dx, dy, roff = plane_of(chan, j, i, nplanes, shift, H)
    x = pixmap[j, i, 0] + dx
    y = pixmap[j, i, 1] + dy
    ok = math.isfinite(v) and wt > 0.0 and abs(x) < MAX_COORD and abs(y) < MAX_COORD
    return ok, v, wt, x, y, roff


@njit(nogil=True, cache=True, error_model="numpy")
def point_kernel(data, pixmap, weights, use_weights, acc_wv, acc_w, touched, use_touched, chan, nplanes, shift):
    """Point kernel: the whole drop goes to the output pixel containing the
    mapped centre, with weight ``w``."""
    ny, nx = data.shape
    H = acc_w.shape[0] // nplanes
    W = acc_w.shape[1]
    flat_w = acc_w.reshape(acc_w.shape[0] * W)
    flat_wv = acc_wv.reshape(acc_w.shape[0] * W)
    xlim = W - 0.5
    ylim = H - 0.5
    ncontrib = 0
    for j in range(ny):
        drow = data[j]
        prow = pixmap[j]
        for i in range(nx):
            v = drow[i]
            wt = weights[j, i] if use_weights else 1.0
            dx, dy, roff = plane_of(chan, j, i, nplanes, shift, H)
            x = prow[i, 0] + dx
            y = prow[i, 1] + dy
            # one test for everything: finite value, positive weight, and a centre
            # inside the output (NaN fails every comparison)
            if not ((v - v) == 0.0 and wt > 0.0 and x >= -0.5 and x < xlim
                    and y >= -0.5 and y < ylim):
                continue
            # x >= -0.5 here, so floor(x + 0.5) >= 0: unsigned, no wraparound fix-up
            o = uint64(math.floor(y + 0.5) + roff) * uint64(W) + uint64(math.floor(x + 0.5))
            flat_w[o] += wt
            flat_wv[o] += wt * v
            if use_touched:
                touched[int(math.floor(y + 0.5)) + roff, int(math.floor(x + 0.5))] = 1
            ncontrib += 1
    return ncontrib


@njit(nogil=True, cache=True, error_model="numpy")
def turbo_kernel(data, pixmap, weights, use_weights, pixfrac, pixel_scale_ratio,
                 acc_wv, acc_w, touched, use_touched, chan, nplanes, shift):
    """Turbo kernel: the drop is an axis-aligned square of side
    ``pixfrac / pixel_scale_ratio`` output pixels centred on the mapped centre;
    weight ``w * overlap / side**2`` (STScI's ``dover * pscale_ratio**2 / pixfrac**2``)."""
    ny, nx = data.shape
    H = acc_w.shape[0] // nplanes
    W = acc_w.shape[1]
    pfo = 0.5 * pixfrac / pixel_scale_ratio
    scale = 1.0 / (4.0 * pfo * pfo)
    ncontrib = 0
    for j in range(ny):
        for i in range(nx):
            ok, v, wt, x, y, roff = _centred_drop(data, pixmap, weights, use_weights, j, i,
                                                  chan, nplanes, shift, H)
            if not ok:
                continue
            xxi = x - pfo
            xxa = x + pfo
            yyi = y - pfo
            yya = y + pfo
            i0 = max(_out_index(xxi), 0)
            i1 = min(_out_index(xxa), W - 1)
            j0 = max(_out_index(yyi), 0)
            j1 = min(_out_index(yya), H - 1)
            fw = wt * scale
            fv = fw * v
            hit = False
            for jj in range(j0, j1 + 1):
                dy = min(yya, jj + 0.5) - max(yyi, jj - 0.5)
                if dy <= 0.0:
                    continue
                for ii in range(i0, i1 + 1):
                    dx = min(xxa, ii + 0.5) - max(xxi, ii - 0.5)
                    if dx <= 0.0:
                        continue
                    a = dx * dy
                    _deposit(acc_wv, acc_w, touched, use_touched, jj + roff, ii, fw * a, fv * a)
                    hit = True
            if hit:
                ncontrib += 1
    return ncontrib


@njit(nogil=True, cache=True, error_model="numpy")
def gaussian_kernel(data, pixmap, weights, use_weights, pixfrac, pixel_scale_ratio,
                    acc_wv, acc_w, touched, use_touched, chan, nplanes, shift):
    """Gaussian kernel of STScI drizzle: FWHM ``pixfrac`` input pixels, weight
    ``w * exp(-r**2 * efac) * efac / pi`` (unit integral over the output plane),
    truncated to output pixels within ``max(2.5 sigma, 1.2 input px)`` of the
    mapped centre along each axis."""
    ny, nx = data.shape
    H = acc_w.shape[0] // nplanes
    W = acc_w.shape[1]
    psr = pixel_scale_ratio
    pfo = GAUSS_NSIG * pixfrac / GAUSS_FWHM / psr
    if pfo < GAUSS_MIN_REACH / psr:
        pfo = GAUSS_MIN_REACH / psr
    efac = GAUSS_FWHM * GAUSS_FWHM * psr * psr / (pixfrac * pixfrac) / 2.0
    es = efac / math.pi
    ncontrib = 0
    for j in range(ny):
        for i in range(nx):
            ok, v, wt, x, y, roff = _centred_drop(data, pixmap, weights, use_weights, j, i,
                                                  chan, nplanes, shift, H)
            if not ok:
                continue
            i0 = max(_out_index(x - pfo), 0)
            i1 = min(_out_index(x + pfo), W - 1)
            j0 = max(_out_index(y - pfo), 0)
            j1 = min(_out_index(y + pfo), H - 1)
            fv = wt * v
            hit = False
            for jj in range(j0, j1 + 1):
                ddy = y - jj
                for ii in range(i0, i1 + 1):
                    ddx = x - ii
                    g = es * math.exp(-(ddx * ddx + ddy * ddy) * efac)
                    if g == 0.0:
                        continue
                    _deposit(acc_wv, acc_w, touched, use_touched, jj + roff, ii, wt * g, fv * g)
                    hit = True
            if hit:
                ncontrib += 1
    return ncontrib


@njit(nogil=True, inline="always", error_model="numpy")
def _lanczos_weight(lut, density, order, t):
    """``L(t)`` for ``t >= 0`` by linear interpolation in ``lut``."""
    if t >= order:
        return 0.0
    u = t * density
    k = int(u)
    f = u - k
    return lut[k] + f * (lut[k + 1] - lut[k])


@njit(nogil=True, cache=True, error_model="numpy")
def lanczos_kernel(data, pixmap, weights, use_weights, order, pixel_scale_ratio, lut,
                   acc_wv, acc_w, touched, use_touched, chan, nplanes, shift):
    """Lanczos kernel of order 2 or 3 (separable, in input-pixel units: weight
    ``w * L(dx * psr) * L(dy * psr)`` over output pixels strictly within
    ``order / psr`` of the mapped centre). As in STScI drizzle, ``pixfrac`` plays
    no part and the kernel does not conserve flux.

    ``lut`` is :func:`drizzlestack.lanczos.lanczos_table` of ``order``: samples of ``L``
    at a spacing of ``1 / density`` with ``density = (len(lut) - 2) / order`` (read from
    the table rather than frozen in, so that the compiled kernel in numba's cache cannot
    disagree with the table)."""
    ny, nx = data.shape
    H = acc_w.shape[0] // nplanes
    W = acc_w.shape[1]
    psr = pixel_scale_ratio
    pfo = order / psr
    density = (lut.shape[0] - 2) // order
    nwin = int(2.0 * pfo) + 3
    wx = np.empty(nwin)
    wy = np.empty(nwin)
    ncontrib = 0
    for j in range(ny):
        for i in range(nx):
            ok, v, wt, x, y, roff = _centred_drop(data, pixmap, weights, use_weights, j, i,
                                                  chan, nplanes, shift, H)
            if not ok:
                continue
            i0 = max(int(math.floor(x - pfo)) + 1, 0)
            i1 = min(int(math.floor(x + pfo)), W - 1)
            j0 = max(int(math.floor(y - pfo)) + 1, 0)
            j1 = min(int(math.floor(y + pfo)), H - 1)
            if i0 > i1 or j0 > j1:
                continue
            for ii in range(i0, i1 + 1):
                wx[ii - i0] = _lanczos_weight(lut, density, order, abs(x - ii) * psr)
            for jj in range(j0, j1 + 1):
                wy[jj - j0] = _lanczos_weight(lut, density, order, abs(y - jj) * psr)
            fv = wt * v
            hit = False
            for jj in range(j0, j1 + 1):
                gy = wy[jj - j0]
                if gy == 0.0:
                    continue
                for ii in range(i0, i1 + 1):
                    g = wx[ii - i0] * gy
                    if g == 0.0:
                        continue
                    _deposit(acc_wv, acc_w, touched, use_touched, jj + roff, ii, wt * g, fv * g)
                    hit = True
            if hit:
                ncontrib += 1
    return ncontrib
