"""The square kernel of drizzle: the exact overlap of each drop, the input pixel shrunk
by ``pixfrac`` and mapped corner by corner through the pixmap, with the output pixels.

The hot path: drops are computed in batches of :data:`SQUARE_BATCH` with branch-free,
vectorized loops over one flat scratch array (layout below); drops too large for the
batched window go one by one through :func:`_square_big_drop`. Conventions shared with
the other kernels: :mod:`drizzlestack.drizzle.kernels`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, uint64

from .kernels_common import MAX_COORD, _deposit, _out_index, plane_of

#: Largest fixed window (in output pixels a side) of the batched square kernel; a
#: larger drop goes through the per-drop general path.
SQUARE_MAX_WINDOW = 8

#: Number of drops whose overlaps are computed together in the batched square kernel.
SQUARE_BATCH = 128

# (v + _GRID) - _GRID rounds v (|v| < 2048) to a multiple of 2**-40. Edge heights
# rounded this way make every later difference of heights exact, which keeps the
# overlap of a nearly horizontal edge (tiny but non-zero slope) accurate; see
# _sq_areas. (It relies on numba not using fast-math.)
_GRID = 6144.0

# A cell overlap below this fraction of the drop's area is a rounding residue of an
# exact zero (a cell the drop only touches) and is not deposited.
_AREA_RTOL = 1e-12


@njit(nogil=True, inline="always", error_model="numpy")
def pixmap_row(pixmap, yq, tx, ty):
    """The pixmap interpolated linearly along y at input row coordinate ``yq``
    (extrapolated from the first/last pair of rows beyond the frame), padded with
    one linearly extrapolated value at each end: ``tx[i + 1]`` is pixel ``i``.
    ``tx``, ``ty`` have ``nx + 2`` elements. Needs ``nx, ny >= 2``."""
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
        tx[i + 1] = u * pixmap[j0, i, 0] + t * pixmap[j0 + 1, i, 0]
        ty[i + 1] = u * pixmap[j0, i, 1] + t * pixmap[j0 + 1, i, 1]
    tx[0] = 2.0 * tx[1] - tx[2]
    ty[0] = 2.0 * ty[1] - ty[2]
    tx[nx + 1] = 2.0 * tx[nx] - tx[nx - 1]
    ty[nx + 1] = 2.0 * ty[nx] - ty[nx - 1]


@njit(nogil=True, inline="always", error_model="numpy")
def drop_corners(tx, ty, bx, by, i, h):
    """Corners ``(xs, ys)`` of the drop of pixel ``i`` from the rows interpolated at
    ``j + h`` (``tx, ty``) and ``j - h`` (``bx, by``) by :func:`pixmap_row`.

    The drop of pixel ``(i, j)`` is the quadrilateral whose corners are the pixmap,
    interpolated bilinearly, at ``(i - h, j + h)``, ``(i + h, j + h)``,
    ``(i + h, j - h)``, ``(i - h, j - h)``, ``h = pixfrac / 2`` (in that order:
    clockwise with y up), exactly as STScI drizzle's square kernel, including its
    linear extrapolation beyond the first and last row and column."""
    g = 1.0 - h
    xs = np.empty(4)
    ys = np.empty(4)
    xs[0] = h * tx[i] + g * tx[i + 1]
    ys[0] = h * ty[i] + g * ty[i + 1]
    xs[1] = g * tx[i + 1] + h * tx[i + 2]
    ys[1] = g * ty[i + 1] + h * ty[i + 2]
    xs[2] = g * bx[i + 1] + h * bx[i + 2]
    ys[2] = g * by[i + 1] + h * by[i + 2]
    xs[3] = h * bx[i] + g * bx[i + 1]
    ys[3] = h * by[i] + g * by[i + 1]
    return xs, ys


# Layout of the square kernel's scratch array: one flat float64 array, blocks of
# SQUARE_BATCH values (one per drop of the batch) at offsets known at compile time,
# so that LLVM sees a single base pointer with constant distances and vectorizes the
# loops over the batch without runtime alias checks.
_B = SQUARE_BATCH
_WM = SQUARE_MAX_WINDOW
_S_X = 0                      # 4 blocks: local corner x
_S_Y = 4 * _B                 # 4 blocks: local corner y
_S_FW = 8 * _B                # weight (0 for a drop that is not in the batch)
_S_FV = 9 * _B                # weight x value
_S_OX = 10 * _B               # window origin (output pixel indices, as floats)
_S_OY = 11 * _B
_S_ST = 12 * _B               # status: 0 skip, 1 batch, 2 too big for the window
_S_NEED = 13 * _B             # window size the drop needs (0 if not in the batch)
_S_SL = 14 * _B               # per edge: slope
_S_SG = 15 * _B               # per edge: sign of its x direction
_S_XB = 16 * _B                       # _WM + 1 blocks: edge x clipped to column boundaries
_S_YB = _S_XB + (_WM + 1) * _B        # _WM + 1 blocks: edge height there
_S_K = _S_YB + (_WM + 1) * _B         # _WM blocks: per column 0.5 w / (yb - ya)
_S_F = _S_K + _WM * _B                # _WM blocks: per column w if the edge is flat
_S_R = _S_F + _WM * _B                # (_WM + 1) * _WM blocks: R[r, c], then overlaps
_S_SIZE = _S_R + (_WM + 1) * _WM * _B


@njit(nogil=True, inline="always", error_model="numpy")
def _sq_corners(S, tx, ty, bx, by, h, i0, nb):
    """Corners (as in :func:`drop_corners`) of drops ``i0 .. i0 + nb - 1`` into the
    batch's X, Y blocks."""
    tvx = tx[i0:i0 + nb + 2]
    tvy = ty[i0:i0 + nb + 2]
    bvx = bx[i0:i0 + nb + 2]
    bvy = by[i0:i0 + nb + 2]
    g = 1.0 - h
    for k in range(nb):
        k0 = uint64(k)
        k1 = k0 + uint64(1)
        k2 = k0 + uint64(2)
        S[uint64(_S_X) + k0] = h * tvx[k0] + g * tvx[k1]
        S[uint64(_S_X + _B) + k0] = g * tvx[k1] + h * tvx[k2]
        S[uint64(_S_X + 2 * _B) + k0] = g * bvx[k1] + h * bvx[k2]
        S[uint64(_S_X + 3 * _B) + k0] = h * bvx[k0] + g * bvx[k1]
        S[uint64(_S_Y) + k0] = h * tvy[k0] + g * tvy[k1]
        S[uint64(_S_Y + _B) + k0] = g * tvy[k1] + h * tvy[k2]
        S[uint64(_S_Y + 2 * _B) + k0] = g * bvy[k1] + h * bvy[k2]
        S[uint64(_S_Y + 3 * _B) + k0] = h * bvy[k0] + g * bvy[k1]


@njit(nogil=True, inline="always", error_model="numpy")
def _sq_shift(S, crow, shift, nb):
    """Colour: move the batch's drop corners by their planes' ``shift`` (drop ``k`` is
    in plane ``crow[k]``)."""
    for k in range(nb):
        p = int(crow[k])
        dx = shift[p, 0]
        dy = shift[p, 1]
        for c in range(4):
            S[_S_X + c * _B + k] += dx
            S[_S_Y + c * _B + k] += dy


@njit(nogil=True, inline="always", error_model="numpy")
def _sq_classify(S, data, weights, use_weights, j, i0, nb, H, W):
    """Sort the batch's drops without branches: status (0 skip, 1 batch, 2 too big
    for the window), window origin, weights, and corners made local to the window.
    Returns the window size the batch needs (0 if no drop is in it)."""
    xlim = W - 0.5
    ylim = H - 0.5
    drow = data[j, i0:i0 + nb]
    # without weights, read weights[0, 0] (= 1) for every drop: an index rather than
    # a branch, which LLVM would answer by compiling the loop twice
    wrow = weights[j, i0:i0 + nb] if use_weights else weights[0, :1]
    wstep = uint64(1) if use_weights else uint64(0)
    for k in range(nb):
        k0 = uint64(k)
        v = drow[k0]
        wt = wrow[k0 * wstep]
        x0 = S[uint64(_S_X) + k0]
        x1 = S[uint64(_S_X + _B) + k0]
        x2 = S[uint64(_S_X + 2 * _B) + k0]
        x3 = S[uint64(_S_X + 3 * _B) + k0]
        y0 = S[uint64(_S_Y) + k0]
        y1 = S[uint64(_S_Y + _B) + k0]
        y2 = S[uint64(_S_Y + 2 * _B) + k0]
        y3 = S[uint64(_S_Y + 3 * _B) + k0]
        xmin = min(min(x0, x1), min(x2, x3))
        xmax = max(max(x0, x1), max(x2, x3))
        ymin = min(min(y0, y1), min(y2, y3))
        ymax = max(max(y0, y1), max(y2, y3))
        ex = xmax - xmin
        ey = ymax - ymin
        area = 0.5 * ((x1 - x3) * (y0 - y2) - (x0 - x2) * (y1 - y3))
        # NaN fails every comparison, so NaN corners / values / weights give ok=False.
        # (``&`` rather than ``and``: no short-circuit branches in the vector loop.)
        ok = ((v - v) == 0.0) & (wt > 0.0)
        ok &= (xmin > -MAX_COORD) & (xmax < MAX_COORD) & (ymin > -MAX_COORD) & (ymax < MAX_COORD)
        ok &= (xmax > -0.5) & (xmin < xlim) & (ymax > -0.5) & (ymin < ylim)
        # collinear / collapsed corners: no area, skipped
        ok &= abs(area) > 1e-10 * ex * ey
        # np.floor / np.ceil stay in float64 (math.floor returns an int64, and AVX2
        # has no packed double -> int64 conversion: the loop would not vectorize)
        ox = np.floor(xmin + 0.5)
        oy = np.floor(ymin + 0.5)
        need = np.ceil(max(xmax - ox, ymax - oy) + 0.5)
        big = need > _WM
        inb = ok & (not big)
        st = (2.0 if big else 1.0) if ok else 0.0
        bx = ox - 0.5
        by = oy - 0.5
        # A drop not in the batch still goes through the vector stages (its lane may
        # turn into NaN there, which stays in its lane); only its status matters.
        S[uint64(_S_X) + k0] = x0 - bx
        S[uint64(_S_X + _B) + k0] = x1 - bx
        S[uint64(_S_X + 2 * _B) + k0] = x2 - bx
        S[uint64(_S_X + 3 * _B) + k0] = x3 - bx
        S[uint64(_S_Y) + k0] = y0 - by
        S[uint64(_S_Y + _B) + k0] = y1 - by
        S[uint64(_S_Y + 2 * _B) + k0] = y2 - by
        S[uint64(_S_Y + 3 * _B) + k0] = y3 - by
        S[uint64(_S_FW) + k0] = wt
        S[uint64(_S_FV) + k0] = wt * v
        S[uint64(_S_OX) + k0] = ox
        S[uint64(_S_OY) + k0] = oy
        S[uint64(_S_ST) + k0] = st
        S[uint64(_S_NEED) + k0] = need if inb else 0.0
    # a max reduction over floats does not vectorize (NaN semantics): separate loop
    wneed = 0.0
    for k in range(nb):
        wneed = max(wneed, S[_S_NEED + k])
    return int(wneed)


@njit(nogil=True, inline="always", error_model="numpy")
def _sq_areas(S, nb, wn):
    """Exact overlap of the batch's quadrilaterals with the cells of their
    ``wn x wn`` windows.

    Local coordinates: cell ``(c, r)`` is ``[c, c+1] x [r, r+1]`` and every corner
    lies in ``[0, wn]``. Fills ``R[r, c] = sum_e s_e * integral over column c of
    max(y_e(x) - r, 0) dx``, the signed area of the drop above height ``r`` in
    column ``c`` (``s_e`` the sign of the edge's x direction: the area under the top
    chain minus the area under the bottom chain, Green's theorem). The overlap with
    cell ``(c, r)`` is ``R[r, c] - R[r + 1, c]`` and the drop's area
    ``sum_c R[0, c]``.

    Over one column, an edge is a segment of width ``w`` from height ``ya`` to
    ``yb``; the mean of ``max(t - r, 0)`` over ``t`` uniform in ``[ya, yb]`` is
    ``(qb**2 - qa**2) / (2 (yb - ya))`` with ``q = max(y - r, 0)`` (``qa`` if
    ``ya == yb``): no branch, so every loop runs across the batch and vectorizes.
    Heights are rounded to a 2**-40 grid, which makes ``qb - qa`` exactly
    ``yb - ya`` when neither is clipped and keeps the ratio exact even for a nearly
    horizontal edge (tiny, non-zero ``yb - ya``).

    Offsets into ``S`` are unsigned: with signed ones numba adds a negative-index
    fix-up that stops LLVM from vectorizing; and every stage is its own loop over the
    batch (a loop nested inside the batch loop is not unrolled, which would also stop
    vectorization).
    """
    for r in range(wn):
        for c in range(wn):
            o = uint64(_S_R + (r * _WM + c) * _B)
            for k in range(nb):
                S[o + uint64(k)] = 0.0
    for e in range(4):
        e2 = (e + 1) & 3
        ox1 = uint64(_S_X + e * _B)
        ox2 = uint64(_S_X + e2 * _B)
        oy1 = uint64(_S_Y + e * _B)
        oy2 = uint64(_S_Y + e2 * _B)
        osl = uint64(_S_SL)
        osg = uint64(_S_SG)
        for k in range(nb):
            ku = uint64(k)
            dx = S[ox2 + ku] - S[ox1 + ku]
            dy = S[oy2 + ku] - S[oy1 + ku]
            # |dx| <= 1e-30: vertical for all purposes (its width, hence its
            # contribution, is below 1e-30); a zero slope keeps heights finite.
            S[osl + ku] = dy / dx if abs(dx) > 1e-30 else 0.0
            S[osg + ku] = 1.0 if dx > 0.0 else -1.0
        # the edge at the column boundaries x = b, clipped to its x range
        for b in range(wn + 1):
            fb = float(b)
            oxb = uint64(_S_XB + b * _B)
            oyb = uint64(_S_YB + b * _B)
            for k in range(nb):
                ku = uint64(k)
                x1 = S[ox1 + ku]
                x2 = S[ox2 + ku]
                xb = min(max(fb, min(x1, x2)), max(x1, x2))
                yb = S[oy1 + ku] + S[osl + ku] * (xb - x1)
                S[oxb + ku] = xb
                S[oyb + ku] = (yb + _GRID) - _GRID
        # per column: signed width, level-0 area, factors of the level formula
        for c in range(wn):
            oxa = uint64(_S_XB + c * _B)
            oxb = uint64(_S_XB + (c + 1) * _B)
            oya = uint64(_S_YB + c * _B)
            oyb = uint64(_S_YB + (c + 1) * _B)
            o0 = uint64(_S_R + c * _B)
            okc = uint64(_S_K + c * _B)
            ofc = uint64(_S_F + c * _B)
            for k in range(nb):
                ku = uint64(k)
                w = (S[oxb + ku] - S[oxa + ku]) * S[osg + ku]
                ya = S[oya + ku]
                yb = S[oyb + ku]
                d = yb - ya
                S[o0 + ku] += 0.5 * w * (ya + yb)
                S[okc + ku] = (0.5 * w) / d if d != 0.0 else 0.0
                S[ofc + ku] = w if d == 0.0 else 0.0
        for r in range(1, wn):
            fr = float(r)
            for c in range(wn):
                oya = uint64(_S_YB + c * _B)
                oyb = uint64(_S_YB + (c + 1) * _B)
                orc = uint64(_S_R + (r * _WM + c) * _B)
                okc = uint64(_S_K + c * _B)
                ofc = uint64(_S_F + c * _B)
                for k in range(nb):
                    ku = uint64(k)
                    qa = max(S[oya + ku] - fr, 0.0)
                    qb = max(S[oyb + ku] - fr, 0.0)
                    S[orc + ku] += S[okc + ku] * ((qb - qa) * (qb + qa)) + S[ofc + ku] * qa


@njit(nogil=True, inline="always", error_model="numpy")
def _sq_weights(S, nb, wn):
    """Per drop ``w / area`` and ``w * value / area`` (in the FW, FV blocks), and per
    cell the overlap ``R[r, c] - R[r + 1, c]`` (in place of ``R[r, c]``). Overlaps that
    are zero in exact arithmetic (cells the drop only touches) come out as +-1e-17
    residues: below ``_AREA_RTOL`` of the drop's area they are zeroed."""
    oa = uint64(_S_K)            # the K and F blocks are free again: reuse them
    otol = uint64(_S_F)
    ofw = uint64(_S_FW)
    ofv = uint64(_S_FV)
    for k in range(nb):
        S[oa + uint64(k)] = 0.0
    for c in range(wn):
        o0 = uint64(_S_R + c * _B)
        for k in range(nb):
            ku = uint64(k)
            S[oa + ku] += S[o0 + ku]
    for k in range(nb):
        ku = uint64(k)
        area = S[oa + ku]
        S[ofw + ku] = S[ofw + ku] / area
        S[ofv + ku] = S[ofv + ku] / area
        S[otol + ku] = _AREA_RTOL * abs(area)
    for r in range(wn):
        for c in range(wn):
            orc = uint64(_S_R + (r * _WM + c) * _B)
            onext = uint64(_S_R + ((r + 1) * _WM + c) * _B)
            # the level above the last row is 0 (the drop is below the window top)
            inner = r + 1 < wn
            for k in range(nb):
                ku = uint64(k)
                a = S[orc + ku] - (S[onext + ku] if inner else 0.0)
                S[orc + ku] = a if abs(a) > S[otol + ku] else 0.0


@njit(nogil=True, inline="always", error_model="numpy")
def _w3_column(x1, y1, lo, hi, sl, sg, c):
    """One edge over column ``c`` of a 3x3 window: its contributions to ``R[0..2, c]``
    (see :func:`_sq_areas`), in straight-line code."""
    xa = min(max(c, lo), hi)
    xb = min(max(c + 1.0, lo), hi)
    w = (xb - xa) * sg
    ya = (y1 + sl * (xa - x1) + _GRID) - _GRID
    yb = (y1 + sl * (xb - x1) + _GRID) - _GRID
    d = yb - ya
    kk = (0.5 * w) / d if d != 0.0 else 0.0
    ff = w if d == 0.0 else 0.0
    l0 = 0.5 * w * (ya + yb)
    qa = max(ya - 1.0, 0.0)
    qb = max(yb - 1.0, 0.0)
    l1 = kk * ((qb - qa) * (qb + qa)) + ff * qa
    qa = max(ya - 2.0, 0.0)
    qb = max(yb - 2.0, 0.0)
    l2 = kk * ((qb - qa) * (qb + qa)) + ff * qa
    return l0, l1, l2


@njit(nogil=True, inline="always", error_model="numpy")
def _w3_edge(x1, y1, x2, y2):
    """One edge over the three columns of a 3x3 window: 9 contributions
    ``R[r, c]`` in the order (r0c0, r0c1, r0c2, r1c0, ...)."""
    dx = x2 - x1
    sg = 1.0 if dx > 0.0 else -1.0
    lo = min(x1, x2)
    hi = max(x1, x2)
    sl = (y2 - y1) / dx if abs(dx) > 1e-30 else 0.0
    a0, a1, a2 = _w3_column(x1, y1, lo, hi, sl, sg, 0.0)
    b0, b1, b2 = _w3_column(x1, y1, lo, hi, sl, sg, 1.0)
    c0, c1, c2 = _w3_column(x1, y1, lo, hi, sl, sg, 2.0)
    return a0, b0, c0, a1, b1, c1, a2, b2, c2


@njit(nogil=True, cache=True, error_model="numpy")
def _sq_areas_weights3(S, nb):
    """:func:`_sq_areas` followed by :func:`_sq_weights` for a 3x3 window (drops up to
    2 output pixels across: scale up to ~2 at pixfrac 1), fused into one loop over the
    batch of straight-line code: a loop nested in the batch loop would not be unrolled,
    and a chain of short loops costs as much in overhead as in work."""
    for k in range(nb):
        ku = uint64(k)
        x0 = S[uint64(_S_X) + ku]
        x1 = S[uint64(_S_X + _B) + ku]
        x2 = S[uint64(_S_X + 2 * _B) + ku]
        x3 = S[uint64(_S_X + 3 * _B) + ku]
        y0 = S[uint64(_S_Y) + ku]
        y1 = S[uint64(_S_Y + _B) + ku]
        y2 = S[uint64(_S_Y + 2 * _B) + ku]
        y3 = S[uint64(_S_Y + 3 * _B) + ku]
        e = _w3_edge(x0, y0, x1, y1)
        f = _w3_edge(x1, y1, x2, y2)
        g = _w3_edge(x2, y2, x3, y3)
        h = _w3_edge(x3, y3, x0, y0)
        r00 = e[0] + f[0] + g[0] + h[0]
        r01 = e[1] + f[1] + g[1] + h[1]
        r02 = e[2] + f[2] + g[2] + h[2]
        r10 = e[3] + f[3] + g[3] + h[3]
        r11 = e[4] + f[4] + g[4] + h[4]
        r12 = e[5] + f[5] + g[5] + h[5]
        r20 = e[6] + f[6] + g[6] + h[6]
        r21 = e[7] + f[7] + g[7] + h[7]
        r22 = e[8] + f[8] + g[8] + h[8]
        area = r00 + r01 + r02
        S[uint64(_S_FW) + ku] = S[uint64(_S_FW) + ku] / area
        S[uint64(_S_FV) + ku] = S[uint64(_S_FV) + ku] / area
        tol = _AREA_RTOL * abs(area)
        a = r00 - r10
        S[uint64(_S_R) + ku] = a if abs(a) > tol else 0.0
        a = r01 - r11
        S[uint64(_S_R + _B) + ku] = a if abs(a) > tol else 0.0
        a = r02 - r12
        S[uint64(_S_R + 2 * _B) + ku] = a if abs(a) > tol else 0.0
        a = r10 - r20
        S[uint64(_S_R + _WM * _B) + ku] = a if abs(a) > tol else 0.0
        a = r11 - r21
        S[uint64(_S_R + (_WM + 1) * _B) + ku] = a if abs(a) > tol else 0.0
        a = r12 - r22
        S[uint64(_S_R + (_WM + 2) * _B) + ku] = a if abs(a) > tol else 0.0
        S[uint64(_S_R + 2 * _WM * _B) + ku] = r20 if abs(r20) > tol else 0.0
        S[uint64(_S_R + (2 * _WM + 1) * _B) + ku] = r21 if abs(r21) > tol else 0.0
        S[uint64(_S_R + (2 * _WM + 2) * _B) + ku] = r22 if abs(r22) > tol else 0.0


@njit(nogil=True, inline="always", error_model="numpy")
def _mark(flat_t, b, a):
    """Mark cell ``b`` of the flat ``touched`` array when overlap ``a`` is not zero."""
    if a != 0.0:
        flat_t[b] = 1


@njit(nogil=True, inline="always", error_model="numpy")
def _sq_scatter(S, nb, wn, acc_wv, acc_w, touched, use_touched, H, crow, cstep, plane):
    """Add the overlaps of the batch's drops of plane ``plane`` (drop ``k`` goes into
    plane ``crow[k * cstep]``; grey: every drop, plane 0) times ``w / area`` and
    ``w * value / area`` into the accumulators (clipped to the output plane of ``H``
    rows)."""
    W = acc_w.shape[1]
    # flat views and unsigned offsets: no negative-index fix-ups in the hot loop
    flat_w = acc_w.reshape(acc_w.shape[0] * W)
    flat_wv = acc_wv.reshape(acc_w.shape[0] * W)
    flat_t = touched.reshape(touched.shape[0] * touched.shape[1])  # (1, 1) and unread without coverage
    uW = uint64(W)
    ncontrib = 0
    for k in range(nb):
        if S[_S_ST + k] != 1.0 or int(crow[uint64(k) * cstep]) != plane:
            continue
        fw = S[_S_FW + k]
        fv = S[_S_FV + k]
        ox = int(S[_S_OX + k])
        oy = int(S[_S_OY + k])
        roff = plane * H
        # Drops wholly inside the plane: no bounds checks; with coverage, the cells with a
        # non-zero overlap are marked as the general path below marks them (adding a
        # zero overlap changes no accumulator, so both paths give the same sums).
        if ox >= 0 and oy >= 0 and ox + wn <= W and oy + wn <= H:
            base = uint64(oy + roff) * uW + uint64(ox)
            if wn == 3:
                # the common case at scale ~2, unrolled; all loads from S first (LLVM
                # cannot tell S from the accumulators, so it would not move a load of
                # S above a store to them)
                o = uint64(_S_R + k)
                a0 = S[o]
                a1 = S[o + uint64(_B)]
                a2 = S[o + uint64(2 * _B)]
                o += uint64(_WM * _B)
                a3 = S[o]
                a4 = S[o + uint64(_B)]
                a5 = S[o + uint64(2 * _B)]
                o += uint64(_WM * _B)
                a6 = S[o]
                a7 = S[o + uint64(_B)]
                a8 = S[o + uint64(2 * _B)]
                b0 = base
                b1 = base + uW
                b2 = b1 + uW
                u1 = uint64(1)
                u2 = uint64(2)
                flat_w[b0] += fw * a0
                flat_w[b0 + u1] += fw * a1
                flat_w[b0 + u2] += fw * a2
                flat_w[b1] += fw * a3
                flat_w[b1 + u1] += fw * a4
                flat_w[b1 + u2] += fw * a5
                flat_w[b2] += fw * a6
                flat_w[b2 + u1] += fw * a7
                flat_w[b2 + u2] += fw * a8
                flat_wv[b0] += fv * a0
                flat_wv[b0 + u1] += fv * a1
                flat_wv[b0 + u2] += fv * a2
                flat_wv[b1] += fv * a3
                flat_wv[b1 + u1] += fv * a4
                flat_wv[b1 + u2] += fv * a5
                flat_wv[b2] += fv * a6
                flat_wv[b2 + u1] += fv * a7
                flat_wv[b2 + u2] += fv * a8
                if use_touched:
                    _mark(flat_t, b0, a0)
                    _mark(flat_t, b0 + u1, a1)
                    _mark(flat_t, b0 + u2, a2)
                    _mark(flat_t, b1, a3)
                    _mark(flat_t, b1 + u1, a4)
                    _mark(flat_t, b1 + u2, a5)
                    _mark(flat_t, b2, a6)
                    _mark(flat_t, b2 + u1, a7)
                    _mark(flat_t, b2 + u2, a8)
            else:
                for r in range(wn):
                    row = base + uint64(r) * uW
                    o = uint64(_S_R + (r * _WM) * _B + k)
                    for c in range(wn):
                        a = S[o + uint64(c * _B)]
                        flat_w[row + uint64(c)] += fw * a
                        flat_wv[row + uint64(c)] += fv * a
                        if use_touched:
                            _mark(flat_t, row + uint64(c), a)
            ncontrib += 1
        else:
            hit = False
            for r in range(wn):
                jj = oy + r
                if jj < 0 or jj >= H:
                    continue
                for c in range(wn):
                    ii = ox + c
                    if ii < 0 or ii >= W:
                        continue
                    a = S[_S_R + (r * _WM + c) * _B + k]
                    if a != 0.0:
                        _deposit(acc_wv, acc_w, touched, use_touched, jj + roff, ii, fw * a, fv * a)
                        hit = True
            if hit:
                ncontrib += 1
    return ncontrib


@njit(nogil=True, inline="always", error_model="numpy")
def _square_big_drop(xs, ys, fw0, fv0, acc_wv, acc_w, touched, use_touched, H, roff):
    """Exact overlaps of one drop of any size with the output pixels it covers
    (clipped to the output plane of ``H`` rows starting at row ``roff``), one column
    at a time. Same decomposition as :func:`_sq_areas` but in absolute coordinates
    with a division per level; used for drops too large for the batched window."""
    W = acc_w.shape[1]
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
                jj = r0 + m + roff
                _deposit(acc_wv, acc_w, touched, use_touched, jj, c, fw * a, fv * a)
                hit = True
    return 1 if hit else 0


@njit(nogil=True, cache=True, error_model="numpy")
def square_kernel(data, pixmap, weights, use_weights, pixfrac, max_extent,
                  acc_wv, acc_w, touched, use_touched, chan, nplanes, shift):
    """Square kernel: exact overlap of each shrunken drop (see :func:`drop_corners`)
    with the output pixels.

    Each input row is cut into batches of ``SQUARE_BATCH`` consecutive drops, sorted
    without branches (:func:`_sq_classify`), whose overlaps are computed together over
    a window just large enough for the batch: 3x3 output pixels, the common case up to
    scale ~2, by the fused :func:`_sq_areas_weights3`; other sizes up to
    ``SQUARE_MAX_WINDOW`` by :func:`_sq_areas` and :func:`_sq_weights`. Every loop over
    the batch is branch-free and vectorized; :func:`_sq_scatter` then adds the cells into
    the accumulators. Drops larger than the window whose bounding box is at most
    ``max_extent`` output pixels a side go one by one through
    :func:`_square_big_drop`; larger still are skipped (a guard against absurd
    pixmaps). Degenerate drops (area below 1e-10 of their bounding box: collinear or
    collapsed corners) are skipped.
    """
    ny, nx = data.shape
    H = acc_w.shape[0] // nplanes
    W = acc_w.shape[1]
    cstep = uint64(1) if nplanes > 1 else uint64(0)
    h = 0.5 * pixfrac
    tx = np.empty(nx + 2)
    ty = np.empty(nx + 2)
    bx = np.empty(nx + 2)
    by = np.empty(nx + 2)
    S = np.zeros(_S_SIZE)
    ncontrib = 0
    for j in range(ny):
        pixmap_row(pixmap, j + h, tx, ty)
        pixmap_row(pixmap, j - h, bx, by)
        for i0 in range(0, nx, _B):
            nb = min(_B, nx - i0)
            _sq_corners(S, tx, ty, bx, by, h, i0, nb)
            # the batch's planes (an index rather than a branch, as for the weights)
            crow = chan[j, i0:i0 + nb] if nplanes > 1 else chan[0, :1]
            if nplanes > 1:
                _sq_shift(S, crow, shift, nb)
            wn = _sq_classify(S, data, weights, use_weights, j, i0, nb, H, W)
            if wn == 3:
                # the common case (scale up to ~2): fused, straight-line code
                _sq_areas_weights3(S, nb)
            elif wn > 0:
                _sq_areas(S, nb, wn)
                _sq_weights(S, nb, wn)
            if wn > 0:
                # Colour: one pass per plane, each touching only its own plane's rows
                # (drops of a Bayer row alternate between two planes): 8-12 % off the
                # colour kernel at tile 1024, grey unchanged. A cell only ever receives
                # drops of its own plane, so its sums add in the same order as in one pass.
                # Only the planes the batch holds (a Bayer row holds two of the three).
                present = 1
                if nplanes > 1:
                    present = 0
                    for k in range(nb):
                        present |= 1 << int(crow[k])
                for p in range(nplanes):
                    if (present >> p) & 1:
                        ncontrib += _sq_scatter(S, nb, wn, acc_wv, acc_w, touched, use_touched, H, crow, cstep, p)
            for k in range(nb):
                if S[_S_ST + k] == 2.0:
                    i = i0 + k
                    xs, ys = drop_corners(tx, ty, bx, by, i, h)
                    dx, dy, roff = plane_of(chan, j, i, nplanes, shift, H)
                    xs += dx
                    ys += dy
                    if max(xs.max() - xs.min(), ys.max() - ys.min()) > max_extent:
                        continue
                    wt = np.float64(weights[j, i]) if use_weights else 1.0
                    ncontrib += _square_big_drop(xs, ys, wt, wt * np.float64(data[j, i]),
                                                 acc_wv, acc_w, touched, use_touched, H, roff)
    return ncontrib
