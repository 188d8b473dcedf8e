"""Source Extractor's background and noise maps (``sep``'s), evaluated a band of rows at a time.

``sep.Background`` needs the whole frame in memory and gives its maps only whole (two
more frame-sized arrays). Star detection works band by band instead (issue 12:
registration memory on 4096^2 frames), so this module splits sep's algorithm at its
seams and reproduces it to the last bit:

1. the statistics of each mesh box (sigma-clipped histogram mode, sep's ``backstat``,
   ``backhisto`` and ``backguess``) depend on that box's pixels only: they are ported
   too (numba, sep's types and order) and computed as the bands stream past. They were
   first a one-box ``sep.Background`` per box (a one-node map whose value *is* the
   box's statistic); a Python call per box held the GIL for ~20 % of detection;
2. the median filter of the mesh (with sep's replacement of boxes with too few valid
   pixels by their nearest valid neighbours), the global level and noise, and the
   natural cubic splines through the nodes are small and ported here (``filterback``,
   ``makebackspline``), with sep's float32 arithmetic in its order;
3. any row of either map is then interpolated as sep's ``bkg_line_flt_internal`` does.

``tests/test_registration.py`` compares both maps and the global values with
``sep.Background`` on frames with stars, no-data holes, a masked box and sizes that are
not multiples of the box, and the box statistics with a one-box ``sep.Background`` on
degenerate boxes (constant, quantized, hot pixels, holes). ``sep`` is therefore only a
test dependency.
"""

from __future__ import annotations

import numba
import numpy as np

_BIG = np.float32(1e30)  # sep's BIG: a box without enough valid pixels
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)
_F4 = np.float32(4.0)
_F6 = np.float32(6.0)


def box_statistics(band: np.ndarray, nodata: np.ndarray | None, box: int, back: np.ndarray,
                   sigma: np.ndarray) -> None:
    """sep's background and noise of each ``box`` x ``box`` mesh box of one band.

    Parameters
    ----------
    band : (h, nx) float32
        Whole mesh rows of the frame (``h`` a multiple of ``box`` except at the frame's
        bottom), no-data pixels already set to 0.
    nodata : (h, nx) bool or None
        The no-data pixels (sep's mask, ``maskthresh=1``), None when there are none.
    box : int
        Mesh size (px).
    back, sigma : (h // box rounded up, nx // box rounded up) float32
        Filled with the boxes' statistics; ``-1e30`` (sep's mark) for a box with fewer
        than half of its pixels valid.
    """
    band = np.ascontiguousarray(band, dtype=np.float32)
    holes = _NO_HOLES if nodata is None else np.ascontiguousarray(nodata, dtype=np.bool_)
    _box_statistics(band, holes, nodata is not None, int(box), back, sigma)


_NO_HOLES = np.zeros((0, 0), np.bool_)
#: sep's histogram constants (background.c): QUANTIF_NSIGMA, QUANTIF_NMAXLEVELS, and the
#: levels per valid pixel, sqrt(2 / pi) * QUANTIF_NSIGMA / QUANTIF_AMIN
_NSIGMA = 5
_NMAXLEVELS = 4096
_LEVEL_STEP = np.sqrt(2 / np.pi) * 5 / 4


# sep's backstat, backhisto and backguess for one box, ported statement by statement in
# sep's types (double sums, float cuts, histogram bins from float arithmetic): what a
# one-box sep.Background reports as globalback / globalrms, without a Python call per
# box (a 2048^2 frame has 1024 boxes) and without the GIL, so that two registration
# tasks detect stars at once (it takes ~1.3x sep's CPU per box, mostly in the
# histogram-mode iterations: benchmarks/README.md). error_model="numpy": sep's divisions
# by zero give IEEE infinities/NaN, as in C.
@numba.njit(nogil=True, cache=True, error_model="numpy")
def _one_box(band, holes, masked, r0, r1, c0, c1, histo):
    n_box = (r1 - r0) * (c1 - c0)
    # sep's first pass takes pix > -BIG: the next double above -1e30 as an inclusive bound
    mean, sig, npix = _box_sums(band, holes, masked, r0, r1, c0, c1, _ABOVE_MINUS_BIG, np.inf)
    if np.float32(npix) < np.float32(n_box * 0.5):
        return -_BIG, -_BIG
    mean /= npix
    var = sig / npix - mean * mean
    sigma = np.sqrt(var) if var > 0.0 else 0.0
    lcut = np.float32(mean - 2.0 * sigma)
    hcut = np.float32(mean + 2.0 * sigma)
    mean, sig, npix = _box_sums(band, holes, masked, r0, r1, c0, c1, np.float64(lcut), np.float64(hcut))
    mean /= npix
    var = sig / npix - mean * mean
    sigma = np.sqrt(var) if var > 0.0 else 0.0
    box_mean = np.float32(mean)
    nlevels = int(_LEVEL_STEP * npix + 1)
    if nlevels > _NMAXLEVELS:
        nlevels = _NMAXLEVELS
    qscale = np.float32(2 * _NSIGMA * sigma / nlevels) if sigma > 0.0 else np.float32(1.0)
    qzero = np.float32(mean - _NSIGMA * sigma)

    # backhisto
    histo[:nlevels] = 0
    cste = np.float32(0.499999 - np.float64(np.float32(qzero / qscale)))
    for y in range(r0, r1):
        for x in range(c0, c1):
            b = np.int64(np.float32(band[y, x] / qscale) + cste)
            if (not holes[y, x]) if masked else True:
                if b >= 0 and b < nlevels:
                    histo[b] += 1

    # backguess
    nlevelsm1 = nlevels - 1
    hcut_i = nlevelsm1
    lcut_i = 0
    sig = 10.0 * nlevelsm1
    sig1 = 1.0
    mea = np.float64(box_mean)
    med = mea
    n = 100
    while True:
        go = n > 0
        n -= 1
        if not (go and sig >= 0.1 and abs(sig / sig1 - 1.0) > 1e-4):
            break
        sig1 = sig
        total = 0
        mea = 0.0
        sig = 0.0
        lowsum = 0
        highsum = 0
        hilow = lcut_i
        hihigh = hcut_i
        for i in range(lcut_i, hcut_i + 1):
            if lowsum < highsum:
                lowsum += histo[hilow] if 0 <= hilow < nlevels else 0
                hilow += 1
            else:
                highsum += histo[hihigh] if 0 <= hihigh < nlevels else 0
                hihigh -= 1
            count = histo[i] if 0 <= i < nlevels else 0
            total += count
            dpix = np.float64(count) * i
            mea += dpix
            sig += dpix * i
        if hihigh >= 0:
            a = histo[hilow] if 0 <= hilow < nlevels else 0
            b2 = histo[hihigh] if hihigh < nlevels else 0
            med = (hihigh + 0.5) + (np.float64(highsum) - np.float64(lowsum)) / (2.0 * (a if a > b2 else b2))
        else:
            med = 0.0
        if total:
            mea /= np.float64(total)
            sig = sig / total - mea * mea
        sig = np.sqrt(sig) if sig > 0.0 else 0.0
        ftemp = med - 3.0 * sig
        lcut_i = int(ftemp + 0.5) if ftemp > 0.0 else 0
        ftemp = med + 3.0 * sig
        if ftemp < nlevelsm1:
            hcut_i = int(ftemp + 0.5) if ftemp > 0.0 else int(ftemp - 0.5)
        else:
            hcut_i = nlevelsm1
    qz = np.float64(qzero)
    qs = np.float64(qscale)
    if abs(sig) > 0.0:
        if abs((mea - med) / sig) < 0.3:
            value = qz + (2.5 * med - 1.5 * mea) * qs
        else:
            value = qz + med * qs
    else:
        value = qz + mea * qs
    return np.float32(value), np.float32(sig * qs)


_ABOVE_MINUS_BIG = float(np.nextafter(-1e30, 0.0))


@numba.njit(nogil=True, cache=True, inline="always")
def _box_sums(band, holes, masked, r0, r1, c0, c1, lo, hi):
    """Sum, sum of squares (double) and count of a box's valid pixels within [lo, hi]."""
    total = 0.0
    squares = 0.0
    npix = 0
    for y in range(r0, r1):
        for x in range(c0, c1):
            pix = np.float64(band[y, x])
            if (not holes[y, x]) if masked else True:
                if pix >= lo and pix <= hi:
                    total += pix
                    squares += pix * pix
                    npix += 1
    return total, squares, npix


@numba.njit(nogil=True, cache=True)
def _box_statistics(band, holes, masked, box, back, sigma):
    h, nx = band.shape
    histo = np.zeros(_NMAXLEVELS, np.int64)
    for j in range((h + box - 1) // box):
        r0 = j * box
        r1 = min(r0 + box, h)
        for i in range((nx + box - 1) // box):
            c0 = i * box
            c1 = min(c0 + box, nx)
            back[j, i], sigma[j, i] = _one_box(band, holes, masked, r0, r1, c0, c1, histo)


@numba.njit(nogil=True, cache=True)
def _fqmedian(a):
    """sep's ``fqmedian`` (float sort; the mean of the middle two in float32)."""
    s = np.sort(a)
    n = s.size
    if n < 2:
        return s[0]
    if n & 1:
        return s[n // 2]
    return np.float32(s[n // 2 - 1] + s[n // 2]) / _F2


@numba.njit(nogil=True, cache=True)
def _filter_mesh(back, sigma, fw, fh):
    """sep's ``filterback`` with ``fthresh=0`` on flat (ny * nx) float32 meshes, in place;
    returns the global background and rms."""
    ny, nx = back.shape
    b = back.ravel()
    s = sigma.ravel()
    n = b.size
    back2 = b.copy()
    sigma2 = np.empty(n, np.float32)
    val = np.float32(0.0)
    sval = np.float32(0.0)
    i = 0
    for py in range(ny):
        for px in range(nx):
            if b[i] <= -_BIG:
                d2min = _BIG
                nmin = 0
                j = 0
                for y in range(ny):
                    for x in range(nx):
                        if b[j] > -_BIG:
                            d2 = np.float32(x - px) * np.float32(x - px) + np.float32((y - py) * (y - py))
                            if d2 < d2min:
                                val = b[j]
                                sval = s[j]
                                nmin = 1
                                d2min = d2
                            elif d2 == d2min:
                                val += b[j]
                                sval += s[j]
                                nmin += 1
                        j += 1
                back2[i] = val / np.float32(nmin) if nmin else np.float32(0.0)
                s[i] = sval / np.float32(nmin) if nmin else np.float32(1.0)
            i += 1
    b[:] = back2
    npx = fw // 2
    npy = (fh // 2) * nx
    win_b = np.empty((2 * (fw // 2) + 1) * (2 * (fh // 2) + 1), np.float32)
    win_s = np.empty_like(win_b)
    for py in range(0, n, nx):
        npy2 = min(n - py - nx, npy, py)
        for px in range(nx):
            npx2 = min(nx - px - 1, npx, px)
            k = 0
            for dpy in range(-npy2, npy2 + 1, nx):
                for dpx in range(-npx2, npx2 + 1):
                    win_b[k] = b[py + dpy + px + dpx]
                    win_s[k] = s[py + dpy + px + dpx]
                    k += 1
            med = _fqmedian(win_b[:k])
            if abs(med - b[px + py]) >= 0.0:
                back2[px + py] = med
                sigma2[px + py] = _fqmedian(win_s[:k])
            else:
                back2[px + py] = b[px + py]
                sigma2[px + py] = s[px + py]
    b[:] = back2
    s[:] = sigma2
    glob = _fqmedian(back2)
    srt = np.sort(sigma2)
    globalrms = _fqmedian(srt)
    if globalrms <= 0.0:
        k = n - 1
        while k >= 0 and srt[k] > 0.0:
            k -= 1
        globalrms = _fqmedian(srt[k + 1:]) if 0 <= k < n - 1 else np.float32(1.0)
    return glob, globalrms


@numba.njit(nogil=True, cache=True)
def _spline_y(m):
    """sep's ``makebackspline``: second derivatives along y of each mesh column."""
    ny, nx = m.shape
    d = np.zeros((ny, nx), np.float32)
    if ny < 2:
        return d
    u = np.empty(ny - 1, np.float32)
    for x in range(nx):
        u[0] = np.float32(0.0)
        for k in range(1, ny - 1):
            temp = -_F1 / (d[k - 1, x] + _F4)
            d[k, x] = temp
            temp *= u[k - 1] - _F6 * (m[k + 1, x] + m[k - 1, x] - _F2 * m[k, x])
            u[k] = temp
        for k in range(ny - 2, 0, -1):
            d[k, x] = np.float32((d[k, x] * d[k + 1, x] + u[k]) / 6.0)
    return d


@numba.njit(nogil=True, cache=True)
def _x_tables(nbx, bw, width):
    """The x interpolation of sep's ``bkg_line_flt_internal``, the same for every row:
    each pixel's lower node and its ``dx``, ``1 - dx`` and their cubic terms (float32,
    accumulated as sep does)."""
    lo_of = np.zeros(width, np.int64)
    dxs = np.empty(width, np.float32)
    xstep = np.float32(1.0 / bw)
    changepoint = bw // 2
    dx = (xstep - _F1) / _F2
    dx0 = np.float32((bw + 1) % 2) * xstep / _F2
    lo = 0
    x = 0
    i = 0
    for p in range(width):
        if i == changepoint and x > 0 and x < nbx - 1:
            lo += 1
            dx = dx0
        lo_of[p] = lo
        dxs[p] = dx
        if i == bw:
            x += 1
            i = 0
        i += 1
        dx += xstep
    cdx = _F1 - dxs
    return lo_of, dxs, cdx, cdx * cdx - _F1, dxs * dxs - _F1


@numba.njit(nogil=True, cache=True)
def _rows(values, dvalues, bw, bh, width, y0, out):
    """Rows ``y0 .. y0 + len(out) - 1`` of a map, as sep's ``bkg_line_flt_internal``."""
    nby, nbx = values.shape
    node = np.empty(nbx, np.float32)
    dnode = np.zeros(nbx, np.float32)
    u = np.empty(max(nbx - 1, 1), np.float32)
    lo_of, dxs, cdx, cdx3, dx3 = _x_tables(nbx, bw, width)
    for r in range(out.shape[0]):
        y = y0 + r
        if nby > 1:
            dy = np.float32(np.float64(np.float32(y) / np.float32(bh)) - 0.5)
            yl = int(dy)
            dy = dy - np.float32(yl)
            if yl >= nby - 1:
                yl = nby - 2
                dy = np.float32(np.float64(dy) + 1.0)
            cdy = _F1 - dy
            dy3 = dy * dy * dy - dy
            cdy3 = cdy * cdy * cdy - cdy
            for x in range(nbx):
                node[x] = (cdy * values[yl, x] + dy * values[yl + 1, x] + cdy3 * dvalues[yl, x]
                           + dy3 * dvalues[yl + 1, x])
            dnode[:] = np.float32(0.0)
            if nbx > 1:
                u[0] = np.float32(0.0)
                for k in range(1, nbx - 1):
                    temp = -_F1 / (dnode[k - 1] + _F4)
                    dnode[k] = temp
                    temp *= u[k - 1] - _F6 * (node[k + 1] + node[k - 1] - _F2 * node[k])
                    u[k] = temp
                for k in range(nbx - 2, 0, -1):
                    dnode[k] = np.float32((dnode[k] * dnode[k + 1] + u[k]) / 6.0)
        else:
            node[:] = values[0]
            dnode[:] = dvalues[0]
        line = out[r]
        if nbx > 1:
            for p in range(width):
                lo = lo_of[p]
                line[p] = (cdx[p] * (node[lo] + cdx3[p] * dnode[lo])
                           + dxs[p] * (node[lo + 1] + dx3[p] * dnode[lo + 1]))
        else:
            line[:] = node[0]


class MeshBackground:
    """A frame's background and noise maps from its mesh of box statistics (sep's).

    Parameters
    ----------
    back, sigma : (ny_box, nx_box) float32
        :func:`box_statistics` of every box (modified: filtered in place).
    shape : (int, int)
        Frame shape.
    box : int
        Mesh size (px).
    filter_size : int
        Median filter size in boxes (sep's ``fw = fh``).

    Attributes
    ----------
    globalback, globalrms : float
        sep's global background and noise (medians of the filtered mesh).
    """

    def __init__(self, back: np.ndarray, sigma: np.ndarray, shape, box: int, filter_size: int = 3):
        self.shape = (int(shape[0]), int(shape[1]))
        self.box = int(box)
        self.back = np.ascontiguousarray(back, dtype=np.float32)
        self.sigma = np.ascontiguousarray(sigma, dtype=np.float32)
        g, grms = _filter_mesh(self.back, self.sigma, int(filter_size), int(filter_size))
        self.globalback, self.globalrms = float(g), float(grms)
        self._dback = _spline_y(self.back)
        self._dsigma = _spline_y(self.sigma)

    def _map(self, values, dvalues, y0: int, y1: int, out=None) -> np.ndarray:
        if out is None:
            out = np.empty((y1 - y0, self.shape[1]), np.float32)
        _rows(values, dvalues, self.box, self.box, self.shape[1], int(y0), out)
        return out

    def back_rows(self, y0: int, y1: int, out=None) -> np.ndarray:
        """Rows ``y0:y1`` of the background map (float32), as ``sep.Background.back()``."""
        return self._map(self.back, self._dback, y0, y1, out)

    def rms_rows(self, y0: int, y1: int, out=None) -> np.ndarray:
        """Rows ``y0:y1`` of the noise map (float32), as ``sep.Background.rms()``."""
        return self._map(self.sigma, self._dsigma, y0, y1, out)
