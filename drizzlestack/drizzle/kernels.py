"""Numba kernels of drizzle: each one adds the drops of one input window into
float64 accumulators ``acc_wv`` (sum of weight x value) and ``acc_w`` (sum of weight).

Plain arrays in and out, ``@njit(nogil=True, cache=True)``, no Python objects, no
``parallel=True`` (the drivers run many kernels at once on Dask threads). Validation,
dispatch and the maths write-up live in :mod:`drizzlestack.drizzle.array`.

Conventions shared by every kernel (DESIGN.md):

* ``pixmap[j, i] = (x, y)``: output position of the centre of input pixel ``(i, j)``;
  output pixel ``k`` covers ``[k - 0.5, k + 0.5]``, so a point ``x`` is in pixel
  ``floor(x + 0.5)`` (half-up rounding: unlike C's ``round`` it does not depend on
  where the origin is, so a tile and the whole image agree).
* An input pixel contributes nothing when its value is not finite, its weight is not
  ``> 0`` (NaN included), or its mapped position/corners are not finite or are beyond
  ``+-MAX_COORD`` (a guard against ``1e30``-style pixmap values).
* The weight a drop deposits in an output pixel is ``w * overlap / drop_area``
  (``square``, ``turbo``), ``w`` (``point``) or ``w * kernel(distance)``
  (``gaussian``, ``lanczos``), exactly what STScI ``drizzle`` accumulates in ``out_wht``.
* ``touched`` (uint8, same shape as the accumulators) is set to 1 where this call
  deposited a non-zero weight, when ``use_touched`` is true; the caller turns it into
  a coverage count.

Every kernel returns the number of input pixels that deposited weight in the output.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

#: Pixmap coordinates beyond this (in output pixels) are treated as invalid.
MAX_COORD = 1.0e9

#: Largest fixed window (in output pixels a side) of the batched square kernel; a
#: larger drop goes through the per-drop general path.
SQUARE_MAX_WINDOW = 8

#: Number of drops whose overlaps are computed together in the batched square kernel.
SQUARE_BATCH = 128

# (v + _GRID) - _GRID rounds v (|v| < 2048) to a multiple of 2**-40. Edge heights
# rounded this way make every later difference of heights exact, which keeps the
# overlap of a nearly horizontal edge (tiny but non-zero slope) accurate; see
# _square_window_areas.
_GRID = 6144.0

# A cell overlap below this fraction of the drop's area is a rounding residue of an
# exact zero (a cell the drop only touches) and is not deposited.
_AREA_RTOL = 1e-12

# Gaussian kernel constants of STScI drizzle (FWHM = 2.3548 sigma, 2.5 sigma reach,
# never narrower than 1.2 input pixels so that there are no holes).
_GAUSS_FWHM = 2.3548
_GAUSS_NSIG = 2.5
_GAUSS_MIN_REACH = 1.2

#: Samples per input pixel of the Lanczos look-up table (linear interpolation
#: between samples: error < 1e-8, unlike STScI's nearest sample at 0.003 px).
LANCZOS_LUT_DENSITY = 4096


@njit(nogil=True, cache=True)
def _out_index(x):
    """Output pixel containing coordinate ``x`` (half-up, origin independent)."""
    return int(math.floor(x + 0.5))


# ---------------------------------------------------------------------------------
# square kernel
# ---------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _interp_rows(pixmap, yq, tx, ty):
    """Bilinear interpolation of the pixmap along y at input row coordinate ``yq``
    (extrapolated from the first/last pair of rows outside the frame), into tx, ty."""
    ny = pixmap.shape[0]
    nx = pixmap.shape[1]
    j0 = int(math.floor(yq))
    if j0 < 0:
        j0 = 0
    elif j0 > ny - 2:
        j0 = ny - 2
    t = yq - j0
    u = 1.0 - t
    for i in range(nx):
        tx[i] = u * pixmap[j0, i, 0] + t * pixmap[j0 + 1, i, 0]
        ty[i] = u * pixmap[j0, i, 1] + t * pixmap[j0 + 1, i, 1]


@njit(nogil=True, cache=True)
def _interp_cols(tx, ty, h, cxl, cyl, cxr, cyr):
    """From a row interpolated along y, the corners at ``i - h`` (left) and ``i + h``
    (right) of every pixel ``i``; extrapolated at both ends like STScI does."""
    nx = tx.shape[0]
    g = 1.0 - h
    for i in range(1, nx - 1):
        cxl[i] = h * tx[i - 1] + g * tx[i]
        cyl[i] = h * ty[i - 1] + g * ty[i]
        cxr[i] = g * tx[i] + h * tx[i + 1]
        cyr[i] = g * ty[i] + h * ty[i + 1]
    # first pixel, left corners: cell [0, 1] at t = -h; last pixel, right corners:
    # cell [nx - 2, nx - 1] at t = 1 + h.
    cxl[0] = (1.0 + h) * tx[0] - h * tx[1]
    cyl[0] = (1.0 + h) * ty[0] - h * ty[1]
    cxr[0] = g * tx[0] + h * tx[1]
    cyr[0] = g * ty[0] + h * ty[1]
    k = nx - 1
    cxl[k] = h * tx[k - 1] + g * tx[k]
    cyl[k] = h * ty[k - 1] + g * ty[k]
    cxr[k] = (1.0 + h) * tx[k] - h * tx[k - 1]
    cyr[k] = (1.0 + h) * ty[k] - h * ty[k - 1]


@njit(nogil=True, cache=True)
def drop_corners_row(pixmap, j, h, cx, cy):
    """Corners of the shrunken drops of input row ``j``.

    The drop of pixel ``(i, j)`` is the quadrilateral whose corners are the pixmap,
    interpolated bilinearly, at ``(i - h, j + h)``, ``(i + h, j + h)``,
    ``(i + h, j - h)``, ``(i - h, j - h)`` with ``h = pixfrac / 2`` (in that order,
    clockwise with y up), exactly as STScI drizzle's square kernel; beyond the first
    and last row/column the pixmap is extrapolated linearly from the edge pair.
    ``cx``/``cy`` are ``(4, nx)`` outputs. Needs ``nx, ny >= 2``.
    """
    nx = pixmap.shape[1]
    tx = np.empty(nx)
    ty = np.empty(nx)
    # top corners (j + h): 0 = left, 1 = right
    _interp_rows(pixmap, j + h, tx, ty)
    _interp_cols(tx, ty, h, cx[0], cy[0], cx[1], cy[1])
    # bottom corners (j - h): 3 = left, 2 = right
    _interp_rows(pixmap, j - h, tx, ty)
    _interp_cols(tx, ty, h, cx[3], cy[3], cx[2], cy[2])


@njit(nogil=True, cache=True)
def _square_window_areas(nb, wn, X, Y, R, ya_, yb_, kk, ff, lo, hi, sl, sg):
    """Exact overlap of ``nb`` quadrilaterals with the cells of a ``wn x wn`` window.

    Coordinates are local: cell ``(c, r)`` of the window is ``[c, c+1] x [r, r+1]``
    and every corner lies in ``[0, wn]``. On return
    ``R[r, c, k] = sum_e s_e * integral over column c of max(y_e(x) - r, 0) dx``,
    the signed area of drop ``k`` above height ``r`` in column ``c`` (edges ``e``
    with ``s_e`` the sign of their x direction: the area under the top chain minus
    the area under the bottom chain). The overlap with cell ``(c, r)`` is then
    ``R[r, c] - R[r + 1, c]`` (``R[wn] = 0``) and the drop's signed area is
    ``sum_c R[0, c]``.

    Over one column an edge is a segment from height ``ya`` to ``yb`` of width ``w``,
    and the mean of ``max(t - r, 0)`` for ``t`` uniform in ``[ya, yb]`` is
    ``(qb**2 - qa**2) / (2 (yb - ya))`` with ``q = max(y - r, 0)``: no branch, so the
    innermost loops run across the batch of drops and vectorize. Heights are rounded
    to a 2**-40 grid so that ``qb - qa`` equals ``yb - ya`` exactly when neither is
    clipped, which keeps the ratio exact for nearly horizontal edges.
    """
    for r in range(wn):
        for c in range(wn):
            for k in range(nb):
                R[r, c, k] = 0.0
    for e in range(4):
        e2 = (e + 1) & 3
        for k in range(nb):
            x1 = X[e, k]
            x2 = X[e2, k]
            dx = x2 - x1
            dy = Y[e2, k] - Y[e, k]
            sg[k] = 1.0 if dx > 0.0 else -1.0
            lo[k] = min(x1, x2)
            hi[k] = max(x1, x2)
            # |dx| <= 1e-30: the edge is vertical for all purposes (its width, hence
            # its contribution, is below 1e-30); a zero slope keeps heights finite.
            sl[k] = dy / dx if abs(dx) > 1e-30 else 0.0
        for c in range(wn):
            c0 = float(c)
            c1 = c0 + 1.0
            for k in range(nb):
                x1 = X[e, k]
                y1 = Y[e, k]
                xl = min(max(c0, lo[k]), hi[k])
                xr = min(max(c1, lo[k]), hi[k])
                w = (xr - xl) * sg[k]
                ya = y1 + sl[k] * (xl - x1)
                yb = y1 + sl[k] * (xr - x1)
                ya = (ya + _GRID) - _GRID
                yb = (yb + _GRID) - _GRID
                d = yb - ya
                R[0, c, k] += 0.5 * w * (ya + yb)
                ya_[k] = ya
                yb_[k] = yb
                kk[k] = (0.5 * w) / d if d != 0.0 else 0.0
                ff[k] = w if d == 0.0 else 0.0
            for r in range(1, wn):
                fr = float(r)
                for k in range(nb):
                    qa = max(ya_[k] - fr, 0.0)
                    qb = max(yb_[k] - fr, 0.0)
                    R[r, c, k] += kk[k] * ((qb - qa) * (qb + qa)) + ff[k] * qa


@njit(nogil=True, cache=True)
def _square_scatter(nb, wn, R, OX, OY, FW, FV, acc_wv, acc_w, touched, use_touched):
    """Add the batch's cell overlaps (from ``_square_window_areas``) times
    ``FW = w / area`` and ``FV = w * value / area`` into the accumulators."""
    H, W = acc_w.shape
    ncontrib = 0
    for k in range(nb):
        # drop area = sum over columns of the signed area above height 0
        area = 0.0
        for c in range(wn):
            area += R[0, c, k]
        fw = FW[k] / area
        fv = FV[k] / area
        # overlaps that are zero in exact arithmetic (a cell the drop only touches)
        # come out as +-1e-17 rounding residues: drop them
        tol = _AREA_RTOL * abs(area)
        ox = OX[k]
        oy = OY[k]
        hit = False
        if ox >= 0 and oy >= 0 and ox + wn <= W and oy + wn <= H and not use_touched:
            for r in range(wn):
                jj = oy + r
                for c in range(wn):
                    a = R[r, c, k]
                    if r + 1 < wn:
                        a -= R[r + 1, c, k]
                    if abs(a) > tol:
                        acc_w[jj, ox + c] += fw * a
                        acc_wv[jj, ox + c] += fv * a
                        hit = True
        else:
            for r in range(wn):
                jj = oy + r
                if jj < 0 or jj >= H:
                    continue
                for c in range(wn):
                    ii = ox + c
                    if ii < 0 or ii >= W:
                        continue
                    a = R[r, c, k]
                    if r + 1 < wn:
                        a -= R[r + 1, c, k]
                    if abs(a) > tol:
                        acc_w[jj, ii] += fw * a
                        acc_wv[jj, ii] += fv * a
                        hit = True
                        if use_touched:
                            touched[jj, ii] = 1
        if hit:
            ncontrib += 1
    return ncontrib


@njit(nogil=True, cache=True)
def _square_big_drop(xs, ys, fw0, fv0, acc_wv, acc_w, touched, use_touched):
    """Exact overlaps of one drop of any size with the output pixels it covers
    (clipped to the output), one cell at a time. Same column/height decomposition
    as ``_square_window_areas`` but with a division per level, in absolute
    coordinates; used for drops larger than the batched window."""
    H, W = acc_w.shape
    xmin = min(min(xs[0], xs[1]), min(xs[2], xs[3]))
    xmax = max(max(xs[0], xs[1]), max(xs[2], xs[3]))
    ymin = min(min(ys[0], ys[1]), min(ys[2], ys[3]))
    ymax = max(max(ys[0], ys[1]), max(ys[2], ys[3]))
    c0 = max(_out_index(xmin), 0)
    c1 = min(_out_index(xmax), W - 1)
    r0 = max(_out_index(ymin), 0)
    r1 = min(_out_index(ymax), H - 1)
    if c0 > c1 or r0 > r1:
        return 0
    # signed area, same orientation convention as the height integrals below
    area = 0.0
    for e in range(4):
        e2 = (e + 1) & 3
        area += 0.5 * (xs[e2] - xs[e]) * (ys[e] + ys[e2])
    if not (abs(area) > 1e-10 * (xmax - xmin) * (ymax - ymin)):
        return 0
    fw = fw0 / area
    fv = fv0 / area
    tol = _AREA_RTOL * abs(area)
    nlev = r1 - r0 + 2
    lev = np.zeros(nlev)
    hit = False
    for c in range(c0, c1 + 1):
        for m in range(nlev):
            lev[m] = 0.0
        cl = c - 0.5
        cr = c + 0.5
        for e in range(4):
            e2 = (e + 1) & 3
            x1 = xs[e]
            y1 = ys[e]
            x2 = xs[e2]
            y2 = ys[e2]
            dx = x2 - x1
            if abs(dx) <= 1e-30:
                continue
            lo = min(x1, x2)
            hi = max(x1, x2)
            xl = min(max(cl, lo), hi)
            xr = min(max(cr, lo), hi)
            if xr <= xl:
                continue
            w = (xr - xl) if dx > 0.0 else (xl - xr)
            sl = (y2 - y1) / dx
            ya = y1 + sl * (xl - x1)
            yb = y1 + sl * (xr - x1)
            for m in range(nlev):
                yl = r0 - 0.5 + m
                a = ya - yl
                b = yb - yl
                qa = max(a, 0.0)
                qb = max(b, 0.0)
                if b != a:
                    lev[m] += w * 0.5 * (qb - qa) / (b - a) * (qb + qa)
                else:
                    lev[m] += w * qa
        for m in range(nlev - 1):
            a = lev[m] - lev[m + 1]
            if abs(a) > tol:
                jj = r0 + m
                acc_w[jj, c] += fw * a
                acc_wv[jj, c] += fv * a
                hit = True
                if use_touched:
                    touched[jj, c] = 1
    return 1 if hit else 0


@njit(nogil=True, cache=True)
def square_kernel(data, pixmap, weights, use_weights, pixfrac, max_extent,
                  acc_wv, acc_w, touched, use_touched):
    """Square kernel: exact overlap of each shrunken drop (see
    :func:`drop_corners_row`) with the output pixels.

    Drops that fit a ``SQUARE_MAX_WINDOW`` window are batched along the input row
    (``_square_window_areas``); larger ones whose bounding box is at most
    ``max_extent`` output pixels a side go through ``_square_big_drop``; larger
    still are skipped (a guard against absurd pixmaps). Degenerate drops (area below
    1e-10 of their bounding box, e.g. collinear corners) are skipped.
    """
    ny, nx = data.shape
    H, W = acc_w.shape
    h = 0.5 * pixfrac
    B = SQUARE_BATCH
    cx = np.empty((4, nx))
    cy = np.empty((4, nx))
    X = np.empty((4, B))
    Y = np.empty((4, B))
    R = np.empty((SQUARE_MAX_WINDOW, SQUARE_MAX_WINDOW, B))
    ya_ = np.empty(B)
    yb_ = np.empty(B)
    kk = np.empty(B)
    ff = np.empty(B)
    lo = np.empty(B)
    hi = np.empty(B)
    sl = np.empty(B)
    sg = np.empty(B)
    OX = np.empty(B, dtype=np.int64)
    OY = np.empty(B, dtype=np.int64)
    FW = np.empty(B)
    FV = np.empty(B)
    xs = np.empty(4)
    ys = np.empty(4)
    xlim = W - 0.5
    ylim = H - 0.5
    ncontrib = 0
    for j in range(ny):
        drop_corners_row(pixmap, j, h, cx, cy)
        nb = 0
        wn = 1
        for i in range(nx):
            v = data[j, i]
            if not math.isfinite(v):
                continue
            wt = weights[j, i] if use_weights else 1.0
            if not wt > 0.0:
                continue
            x0 = cx[0, i]
            x1 = cx[1, i]
            x2 = cx[2, i]
            x3 = cx[3, i]
            y0 = cy[0, i]
            y1 = cy[1, i]
            y2 = cy[2, i]
            y3 = cy[3, i]
            xmin = min(min(x0, x1), min(x2, x3))
            xmax = max(max(x0, x1), max(x2, x3))
            ymin = min(min(y0, y1), min(y2, y3))
            ymax = max(max(y0, y1), max(y2, y3))
            # NaN fails every comparison below, so NaN corners are skipped too
            if not (xmin > -MAX_COORD and xmax < MAX_COORD
                    and ymin > -MAX_COORD and ymax < MAX_COORD):
                continue
            if xmax <= -0.5 or xmin >= xlim or ymax <= -0.5 or ymin >= ylim:
                continue
            ex = xmax - xmin
            ey = ymax - ymin
            ox = math.floor(xmin + 0.5)
            oy = math.floor(ymin + 0.5)
            need = int(math.ceil(max(xmax - ox, ymax - oy) + 0.5))
            if need > SQUARE_MAX_WINDOW:
                if ex <= max_extent and ey <= max_extent:
                    xs[0] = x0
                    xs[1] = x1
                    xs[2] = x2
                    xs[3] = x3
                    ys[0] = y0
                    ys[1] = y1
                    ys[2] = y2
                    ys[3] = y3
                    ncontrib += _square_big_drop(xs, ys, wt, wt * v, acc_wv, acc_w,
                                                 touched, use_touched)
                continue
            # signed area (shoelace, clockwise positive as in the window integrals);
            # collinear / collapsed corners carry no area and are skipped
            area = 0.5 * ((x1 - x3) * (y0 - y2) - (x0 - x2) * (y1 - y3))
            if not (abs(area) > 1e-10 * ex * ey):
                continue
            bx = ox - 0.5
            by = oy - 0.5
            X[0, nb] = x0 - bx
            X[1, nb] = x1 - bx
            X[2, nb] = x2 - bx
            X[3, nb] = x3 - bx
            Y[0, nb] = y0 - by
            Y[1, nb] = y1 - by
            Y[2, nb] = y2 - by
            Y[3, nb] = y3 - by
            OX[nb] = int(ox)
            OY[nb] = int(oy)
            FW[nb] = wt
            FV[nb] = wt * v
            if need > wn:
                wn = need
            nb += 1
            if nb == B:
                _square_window_areas(nb, wn, X, Y, R, ya_, yb_, kk, ff, lo, hi, sl, sg)
                ncontrib += _square_scatter(nb, wn, R, OX, OY, FW, FV, acc_wv, acc_w,
                                            touched, use_touched)
                nb = 0
                wn = 1
        if nb > 0:
            _square_window_areas(nb, wn, X, Y, R, ya_, yb_, kk, ff, lo, hi, sl, sg)
            ncontrib += _square_scatter(nb, wn, R, OX, OY, FW, FV, acc_wv, acc_w,
                                        touched, use_touched)
    return ncontrib


# ---------------------------------------------------------------------------------
# point, turbo, gaussian, lanczos
# ---------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def point_kernel(data, pixmap, weights, use_weights, acc_wv, acc_w, touched, use_touched):
    """Point kernel: the whole drop goes to the output pixel containing the
    mapped centre, with weight ``w``."""
    ny, nx = data.shape
    H, W = acc_w.shape
    ncontrib = 0
    for j in range(ny):
        for i in range(nx):
            v = data[j, i]
            if not math.isfinite(v):
                continue
            wt = weights[j, i] if use_weights else 1.0
            if not wt > 0.0:
                continue
            x = pixmap[j, i, 0]
            y = pixmap[j, i, 1]
            if not (abs(x) < MAX_COORD and abs(y) < MAX_COORD):  # also rejects NaN
                continue
            ii = _out_index(x)
            jj = _out_index(y)
            if ii < 0 or ii >= W or jj < 0 or jj >= H:
                continue
            acc_w[jj, ii] += wt
            acc_wv[jj, ii] += wt * v
            if use_touched:
                touched[jj, ii] = 1
            ncontrib += 1
    return ncontrib


@njit(nogil=True, cache=True)
def turbo_kernel(data, pixmap, weights, use_weights, pixfrac, pixel_scale_ratio,
                 acc_wv, acc_w, touched, use_touched):
    """Turbo kernel: the drop is an axis-aligned square of side
    ``pixfrac / pixel_scale_ratio`` output pixels centred on the mapped centre;
    weight ``w * overlap / side**2`` (STScI's ``dover * pscale_ratio**2 / pixfrac**2``)."""
    ny, nx = data.shape
    H, W = acc_w.shape
    pfo = 0.5 * pixfrac / pixel_scale_ratio
    scale = 1.0 / (4.0 * pfo * pfo)
    ncontrib = 0
    for j in range(ny):
        for i in range(nx):
            v = data[j, i]
            if not math.isfinite(v):
                continue
            wt = weights[j, i] if use_weights else 1.0
            if not wt > 0.0:
                continue
            x = pixmap[j, i, 0]
            y = pixmap[j, i, 1]
            if not (abs(x) < MAX_COORD and abs(y) < MAX_COORD):
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
                    acc_w[jj, ii] += fw * a
                    acc_wv[jj, ii] += fv * a
                    hit = True
                    if use_touched:
                        touched[jj, ii] = 1
            if hit:
                ncontrib += 1
    return ncontrib


@njit(nogil=True, cache=True)
def gaussian_kernel(data, pixmap, weights, use_weights, pixfrac, pixel_scale_ratio,
                    acc_wv, acc_w, touched, use_touched):
    """Gaussian kernel of STScI drizzle: FWHM ``pixfrac`` input pixels, weight
    ``w * exp(-r**2 * efac) * efac / pi`` (unit integral over the output plane),
    truncated to output pixels within ``max(2.5 sigma, 1.2 input px)`` of the
    mapped centre along each axis."""
    ny, nx = data.shape
    H, W = acc_w.shape
    psr = pixel_scale_ratio
    pfo = _GAUSS_NSIG * pixfrac / _GAUSS_FWHM / psr
    if pfo < _GAUSS_MIN_REACH / psr:
        pfo = _GAUSS_MIN_REACH / psr
    efac = _GAUSS_FWHM * _GAUSS_FWHM * psr * psr / (pixfrac * pixfrac) / 2.0
    es = efac / math.pi
    ncontrib = 0
    for j in range(ny):
        for i in range(nx):
            v = data[j, i]
            if not math.isfinite(v):
                continue
            wt = weights[j, i] if use_weights else 1.0
            if not wt > 0.0:
                continue
            x = pixmap[j, i, 0]
            y = pixmap[j, i, 1]
            if not (abs(x) < MAX_COORD and abs(y) < MAX_COORD):
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
                    acc_w[jj, ii] += wt * g
                    acc_wv[jj, ii] += fv * g
                    hit = True
                    if use_touched:
                        touched[jj, ii] = 1
            if hit:
                ncontrib += 1
    return ncontrib


@njit(nogil=True, cache=True)
def lanczos_lut(order, density):
    """Samples of ``L(x) = sinc(x) sinc(x / order)`` at ``x = k / density`` for
    ``0 <= x <= order`` (plus one zero sample past the end)."""
    n = order * density + 2
    lut = np.zeros(n)
    lut[0] = 1.0
    for k in range(1, order * density + 1):
        x = k / density
        px = math.pi * x
        lut[k] = math.sin(px) * math.sin(px / order) / (px * (px / order))
    lut[order * density] = 0.0
    return lut


@njit(nogil=True, cache=True)
def _lanczos_weight(lut, density, order, t):
    """``L(t)`` for ``t >= 0`` by linear interpolation in ``lut``."""
    if t >= order:
        return 0.0
    u = t * density
    k = int(u)
    f = u - k
    return lut[k] + f * (lut[k + 1] - lut[k])


@njit(nogil=True, cache=True)
def lanczos_kernel(data, pixmap, weights, use_weights, order, pixel_scale_ratio, lut,
                   acc_wv, acc_w, touched, use_touched):
    """Lanczos kernel of order 2 or 3 (separable, in input-pixel units: weight
    ``w * L(dx * psr) * L(dy * psr)`` over output pixels strictly within
    ``order / psr`` of the mapped centre). As in STScI drizzle, ``pixfrac`` plays
    no part and the kernel does not conserve flux."""
    ny, nx = data.shape
    H, W = acc_w.shape
    psr = pixel_scale_ratio
    pfo = order / psr
    density = LANCZOS_LUT_DENSITY
    nwin = int(2.0 * pfo) + 3
    wx = np.empty(nwin)
    wy = np.empty(nwin)
    ncontrib = 0
    for j in range(ny):
        for i in range(nx):
            v = data[j, i]
            if not math.isfinite(v):
                continue
            wt = weights[j, i] if use_weights else 1.0
            if not wt > 0.0:
                continue
            x = pixmap[j, i, 0]
            y = pixmap[j, i, 1]
            if not (abs(x) < MAX_COORD and abs(y) < MAX_COORD):
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
                    acc_w[jj, ii] += wt * g
                    acc_wv[jj, ii] += fv * g
                    hit = True
                    if use_touched:
                        touched[jj, ii] = 1
            if hit:
                ncontrib += 1
    return ncontrib


# ---------------------------------------------------------------------------------
# finalize and helpers
# ---------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
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


@njit(nogil=True, cache=True)
def add_touched(coverage, touched):
    """``coverage += touched`` (in place)."""
    H, W = touched.shape
    for j in range(H):
        for i in range(W):
            if touched[j, i]:
                coverage[j, i] += 1
