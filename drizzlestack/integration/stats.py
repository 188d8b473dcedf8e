"""Per-frame statistics, measured on the unresampled frames: location, scale, noise and
star photometry.

* **location** -- the median of the frame's pixels after iterative 3-sigma clipping,
  which leaves the stars out and so tracks the sky level (see :func:`clipped_median`).
* **scale** -- the square root of the biweight midvariance (Mosteller & Tukey 1977;
  Beers, Flynn & Gebhardt 1990), a dispersion estimator that ignores stars and defects
  like the MAD but is about twice as efficient on Gaussian noise; ``scale_mad`` is the
  normalized MAD (``1.4826 * MAD``).
* **noise** -- the standard deviation of the pixel noise, from the first layer of the
  a-trous B3-spline wavelet transform with iterative k-sigma clipping (the multiscale
  approach of Starck & Murtagh 1998, also used by PixInsight). The first layer
  ``w1 = I - B3 * I`` cancels any linear gradient exactly and leaves almost only the
  pixel-to-pixel noise; stars, hot pixels and cosmic rays are sharp and large in ``w1``,
  so the clipping removes them.
* **photometry** -- forced aperture photometry at the positions of the reference
  frame's stars mapped into each frame through its transform; the ratio of a frame's
  fluxes to the reference's is its *photometric scale* (transparency x exposure x gain).

:func:`frame_statistics` measures all three on a fixed random subsample of at most
:data:`MAX_SAMPLES` pixels, sorted once, with the clipping iterations, the MADs and the
biweight sums done by numba kernels on the sorted samples (a clipped range of sorted data
is a contiguous slice, so no iteration sorts or partitions again). Its location, scale and
noise are the same estimators as the plain-numpy :func:`clipped_median`,
:func:`biweight_midvariance`, :func:`mad_std` and :func:`clipped_noise` (kept as the
readable definitions); with 2^18 samples the sampling error of the location is about
0.25 % of the frame's dispersion (sigma * 1.25 / 512) and that of the scales and the noise
about 0.15 % of their value, well below what normalization and weighting can resolve;
a frame with fewer pixels is measured on all of them, exactly as before.

Everything here works on in-memory arrays; :mod:`.integrate` decides what to read and
where the work runs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numba
import numpy as np
from scipy import ndimage

from .rejection.sorting import _median_sorted

#: normalized MAD: ``MAD * 1.4826`` estimates the standard deviation of Gaussian data
MAD_TO_SIGMA = 1.482602218505602

_B3 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
# Standard deviation of the first wavelet layer for unit white noise: the layer is
# (delta - h) * I with h = outer(B3, B3), so its variance is sum((delta - h)^2).
_H2 = np.outer(_B3, _B3)
_DELTA_MINUS_H = -_H2.copy()
_DELTA_MINUS_H[2, 2] += 1.0
WAVELET_LAYER1_NOISE = float(np.sqrt(np.sum(_DELTA_MINUS_H**2)))  # 0.8908 (Starck & Murtagh: 0.889)

#: :func:`frame_statistics` measures a frame on at most this many pixels (a fixed random
#: subset): the sampling error of a median of 2^18 samples is 0.25 % of the dispersion
MAX_SAMPLES = 1 << 18
# Fixed seed: the same frame always gives the same statistics (resumed runs, digests).
_SAMPLE_SEED = 20260312


def _truncated_std_factor(k: float) -> float:
    """Ratio of the standard deviation of a normal truncated at +-k sigma to sigma
    (k-sigma clipping removes the tails of the noise too; this undoes the bias)."""
    # The normal cdf and pdf written out: importing scipy.stats costs a second or more.
    p = math.erf(k / math.sqrt(2.0))  # 2 * cdf(k) - 1
    pdf = math.exp(-0.5 * k * k) / math.sqrt(2.0 * math.pi)
    return float(np.sqrt(1.0 - 2.0 * k * pdf / p))


@dataclass
class FrameStatistics:
    """Robust statistics of one frame (ADU)."""

    location: float  #: median after iterative 3-sigma clipping (the sky level)
    scale: float  #: sqrt of the biweight midvariance
    scale_mad: float  #: 1.4826 * MAD
    noise: float  #: standard deviation of the pixel noise (wavelet, k-sigma clipped)
    n_pixels: int  #: pixels the location and scale were measured on


def mad_std(values: np.ndarray, center: float | None = None) -> float:
    """Normalized median absolute deviation ``1.4826 * median(|x - median(x)|)`` of
    finite ``values`` (1-D)."""
    if values.size == 0:
        return float("nan")
    c = np.median(values) if center is None else center
    return float(MAD_TO_SIGMA * np.median(np.abs(values - c)))


def biweight_midvariance(values: np.ndarray, c: float = 9.0, location: float | None = None) -> float:
    """Biweight midvariance of finite 1-D ``values``.

    .. math::

        \\zeta^2 = n \\frac{\\sum_{|u_i|<1} (x_i - M)^2 (1 - u_i^2)^4}
                           {\\left[\\sum_{|u_i|<1} (1 - u_i^2)(1 - 5 u_i^2)\\right]^2},
        \\qquad u_i = \\frac{x_i - M}{c \\, \\mathrm{MAD}}

    with ``M`` the median and ``n`` the number of values (the same definition as
    :func:`astropy.stats.biweight_midvariance` with ``modify_sample_size=False``).
    Values further than ``c`` MADs from the median (stars, defects) get zero weight.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan")
    m = float(np.median(x)) if location is None else float(location)
    d = x - m
    mad = float(np.median(np.abs(d)))
    if mad == 0.0:
        return 0.0
    u2 = (d / (c * mad)) ** 2
    keep = u2 < 1.0
    d, u2 = d[keep], u2[keep]
    one_u2 = 1.0 - u2
    num = np.sum(d * d * one_u2**4)
    den = np.sum(one_u2 * (1.0 - 5.0 * u2))
    return float(x.size * num / (den * den))


def wavelet_layer1(image: np.ndarray) -> np.ndarray:
    """First a-trous B3-spline wavelet layer ``I - B3 * I`` (float32, mirror boundaries).

    ``image`` must be finite (fill NaN beforehand)."""
    img = np.asarray(image, dtype=np.float32)
    smooth = ndimage.convolve1d(img, _B3.astype(np.float32), axis=0, mode="mirror")
    smooth = ndimage.convolve1d(smooth, _B3.astype(np.float32), axis=1, mode="mirror")
    return img - smooth


def wavelet_noise_layer(image: np.ndarray, saturation: float = np.inf) -> np.ndarray:
    """Samples of the first wavelet layer of ``image`` usable for noise estimation: not
    within 2 pixels (the B3 kernel's reach) of a NaN, a saturated pixel or the border."""
    img = np.asarray(image, dtype=np.float32)
    bad = ~np.isfinite(img) | (img >= saturation)
    if bad.any():
        fill = np.median(img[~bad]) if (~bad).any() else 0.0
        img = np.where(bad, np.float32(fill), img)
        bad = ndimage.binary_dilation(bad, iterations=2)
    w1 = wavelet_layer1(img)
    keep = ~bad
    # The mirror boundary bends a gradient at the border: drop the outer 2 pixels.
    keep[:2, :] = keep[-2:, :] = False
    keep[:, :2] = keep[:, -2:] = False
    return w1[keep]


def clipped_noise(w1: np.ndarray, k: float = 3.0, max_iter: int = 20, tol: float = 1e-4) -> float:
    """Noise standard deviation from first-layer wavelet samples ``w1`` (1-D) by
    iterative ``k``-sigma clipping about the median, corrected for the clipped Gaussian
    tails and for the layer's noise gain (:data:`WAVELET_LAYER1_NOISE`)."""
    w = np.asarray(w1, dtype=np.float64)
    if w.size < 16:
        return float("nan")
    centre = float(np.median(w))
    sigma = mad_std(w, centre)
    if not sigma > 0:
        sigma = float(np.std(w))
        if not sigma > 0:
            return 0.0
    factor = _truncated_std_factor(k)
    for _ in range(max_iter):
        sel = w[np.abs(w - centre) < k * sigma]
        if sel.size < 16:
            break
        centre = float(np.mean(sel))
        new = float(np.std(sel)) / factor
        if abs(new - sigma) <= tol * sigma:
            sigma = new
            break
        sigma = new
    return sigma / WAVELET_LAYER1_NOISE


@functools.lru_cache(maxsize=8)
def sample_positions(n: int, m: int) -> np.ndarray:
    """A fixed random subset of flat pixel indices.

    A random subset, not a stride, so that no periodic pattern of the sensor (a Bayer
    matrix, column noise) is sampled on one phase only; fixed (seeded, cached), so that
    the same frame always gives the same statistics.

    Parameters
    ----------
    n : int
        Number of pixels.
    m : int
        Number of samples; ``m >= n`` gives every index.

    Returns
    -------
    ndarray of int64
        ``min(m, n)`` distinct indices, sorted (memory order), read-only.
    """
    if m >= n:
        idx = np.arange(n, dtype=np.int64)
    else:
        rng = np.random.default_rng(_SAMPLE_SEED)
        idx = np.sort(rng.choice(n, m, replace=False, shuffle=False)).astype(np.int64)
    idx.setflags(write=False)
    return idx


@numba.njit(nogil=True, cache=True)
def _gather_samples(img, idx, saturation, with_noise, values, layer):
    """Values and first wavelet-layer samples of ``img`` at the flat positions ``idx``.

    A value is kept when finite and below ``saturation``. A wavelet sample ``I - B3 * I``
    is kept when its whole 5x5 B3 support is finite and unsaturated and at least 2 pixels
    from the border (where a mirrored boundary would bend a gradient). Returns the
    numbers of values and of layer samples written."""
    ny, nx = img.shape
    b3 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    nv = 0
    nw = 0
    for p in idx:
        y = p // nx
        x = p - y * nx
        v = img[y, x]
        if not (np.isfinite(v) and v < saturation):
            continue
        values[nv] = v
        nv += 1
        if not with_noise or y < 2 or x < 2 or y >= ny - 2 or x >= nx - 2:
            continue
        smooth = 0.0
        ok = True
        for i in range(5):
            row = 0.0
            for j in range(5):
                q = img[y + i - 2, x + j - 2]
                if not (np.isfinite(q) and q < saturation):
                    ok = False
                    break
                row += b3[j] * q
            if not ok:
                break
            smooth += b3[i] * row
        if ok:
            layer[nw] = v - smooth
            nw += 1
    return nv, nw


@numba.njit(nogil=True, cache=True)
def _mad_sorted(s, lo, hi, c):
    """``median(|s[lo:hi] - c|)`` of a sorted slice without sorting: the distances below
    and above ``c`` are two ascending runs, merged up to the middle."""
    n = hi - lo
    if n <= 0:
        return np.nan
    a, b = lo, hi  # first index at or above c
    while a < b:
        mid = (a + b) // 2
        if s[mid] < c:
            a = mid + 1
        else:
            b = mid
    left = a - 1  # walks down: distances c - s ascending
    right = a  # walks up: distances s - c ascending
    prev = 0.0
    cur = 0.0
    for _ in range(n // 2 + 1):
        if right >= hi or (left >= lo and abs(s[left] - c) <= abs(s[right] - c)):
            d = abs(s[left] - c)
            left -= 1
        else:
            d = abs(s[right] - c)
            right += 1
        prev = cur
        cur = d
    if n % 2:
        return cur
    return (prev + cur) / 2.0


@numba.njit(nogil=True, cache=True)
def _clip_range(s, lo, hi, c, t, strict):
    """The contiguous slice of sorted ``s[lo:hi]`` with ``|s - c| <= t`` (``< t`` when
    ``strict``), found by bisection on each side of ``c``."""
    a, b = lo, hi
    while a < b:  # first index at or above c
        mid = (a + b) // 2
        if s[mid] < c:
            a = mid + 1
        else:
            b = mid
    split = a
    a, b = lo, split  # first index below c that is within t (distances fall towards c)
    while a < b:
        mid = (a + b) // 2
        d = abs(s[mid] - c)
        if (d < t) if strict else (d <= t):
            b = mid
        else:
            a = mid + 1
    first = a
    a, b = split, hi  # first index above c that is beyond t
    while a < b:
        mid = (a + b) // 2
        d = abs(s[mid] - c)
        if (d < t) if strict else (d <= t):
            a = mid + 1
        else:
            b = mid
    return first, a


@numba.njit(nogil=True, cache=True)
def _location_and_scales(s, k, max_iter, c_bw):
    """Median, MAD, clipped median and biweight midvariance of sorted finite ``s``, as
    :func:`clipped_median` and :func:`biweight_midvariance` define them."""
    n = s.size
    med = _median_sorted(s, 0, n)
    mad = _mad_sorted(s, 0, n, med)
    bwmv = 0.0
    if mad > 0.0:
        num = 0.0
        den = 0.0
        scale = c_bw * mad
        for i in range(n):
            d = s[i] - med
            u = d / scale
            u2 = u * u
            if u2 < 1.0:
                one = 1.0 - u2
                num += d * d * one ** 4
                den += one * (1.0 - 5.0 * u2)
        bwmv = n * num / (den * den)
    lo, hi = 0, n
    c = med
    for _ in range(max_iter):
        sigma = 1.482602218505602 * _mad_sorted(s, lo, hi, c)
        if not sigma > 0.0:
            break
        a, b = _clip_range(s, lo, hi, c, k * sigma, False)
        if b <= a or b - a == hi - lo:
            break
        new = _median_sorted(s, a, b)
        lo, hi = a, b
        if new == c:
            break
        c = new
    return med, mad, c, bwmv


@numba.njit(nogil=True, cache=True)
def _clipped_noise_sorted(w, k, max_iter, tol, factor):
    """:func:`clipped_noise` (before the layer gain) of sorted samples ``w``: each
    clipping of ``|w - centre| < k sigma`` is a contiguous slice."""
    n = w.size
    if n < 16:
        return np.nan
    centre = _median_sorted(w, 0, n)
    sigma = 1.482602218505602 * _mad_sorted(w, 0, n, centre)
    if not sigma > 0.0:
        mean = 0.0
        for i in range(n):
            mean += w[i]
        mean /= n
        var = 0.0
        for i in range(n):
            var += (w[i] - mean) ** 2
        sigma = np.sqrt(var / n)
        if not sigma > 0.0:
            return 0.0
    for _ in range(max_iter):
        a, b = _clip_range(w, 0, n, centre, k * sigma, True)
        m = b - a
        if m < 16:
            break
        mean = 0.0
        for i in range(a, b):
            mean += w[i]
        mean /= m
        var = 0.0
        for i in range(a, b):
            var += (w[i] - mean) ** 2
        centre = mean
        new = np.sqrt(var / m) / factor
        if abs(new - sigma) <= tol * sigma:
            sigma = new
            break
        sigma = new
    return sigma


def frame_statistics(blocks, saturation: float = np.inf, k: float = 3.0,
                     max_samples: int = MAX_SAMPLES) -> FrameStatistics:
    """Statistics of one frame from one or more 2-D blocks of its pixels.

    Parameters
    ----------
    blocks : ndarray or sequence of ndarray
        The whole frame, or a sample of it as several rectangular blocks (the noise
        estimator needs 2-D neighbourhoods, so a sample is taken as blocks, not as
        scattered pixels).
    saturation : float
        Pixels at or above this level are left out of every estimate, and so is a
        wavelet sample whose 5x5 support holds one (or a NaN).
    k : float
        Clipping threshold of the location and of the noise estimator.
    max_samples : int
        At most this many pixels (a fixed random subset of every block, in proportion
        to its size) are measured; smaller frames are measured on every pixel.

    Returns
    -------
    FrameStatistics
        The estimators of :func:`clipped_median` (location), :func:`biweight_midvariance`
        (scale), :func:`mad_std` (scale_mad) and :func:`clipped_noise` (noise) on the
        samples.
    """
    if isinstance(blocks, np.ndarray):
        blocks = [blocks]
    blocks = [np.ascontiguousarray(b, dtype=np.float32) for b in blocks]
    total = sum(b.size for b in blocks)
    values, layers = [], []
    sat = float(saturation)
    for b in blocks:
        if b.ndim != 2 or b.size == 0:
            continue
        m = b.size if total <= max_samples else max(1, int(round(max_samples * b.size / total)))
        idx = sample_positions(b.size, m)
        # float32 samples: the pixels are float32 (exact) and sort faster; the kernels
        # compute in float64.
        vals = np.empty(idx.size, np.float32)
        layer = np.empty(idx.size, np.float32)
        nv, nw = _gather_samples(b, idx, sat, min(b.shape) >= 8, vals, layer)
        values.append(vals[:nv])
        layers.append(layer[:nw])
    v = np.sort(np.concatenate(values)) if values else np.empty(0, np.float32)
    if v.size == 0:
        nan = float("nan")
        return FrameStatistics(nan, nan, nan, nan, 0)
    med, mad, location, bwmv = _location_and_scales(v, float(k), 10, 9.0)
    w = np.sort(np.concatenate(layers)) if layers else np.empty(0, np.float32)
    noise = _clipped_noise_sorted(w, float(k), 20, 1e-4, _truncated_std_factor(k)) / WAVELET_LAYER1_NOISE \
        if w.size else float("nan")
    return FrameStatistics(location=float(location), scale=float(np.sqrt(bwmv)), scale_mad=float(MAD_TO_SIGMA * mad),
                           noise=float(noise), n_pixels=int(v.size))


def clipped_median(values: np.ndarray, k: float = 3.0, max_iter: int = 10, center: float | None = None) -> float:
    """Median of ``values`` after iterative ``k``-sigma clipping (sigma from the MAD).

    The plain median of a star field sits above the sky by an amount that depends on
    the star light *and on the noise*: the same field through haze (fainter stars,
    noisier sky) has its median shifted differently, and an additive normalization on
    plain medians then leaves the skies a few tenths of a sigma apart. Clipping the
    star pixels first brings the location down to the sky level in both.
    """
    v = np.asarray(values, dtype=np.float64)
    c = float(np.median(v)) if center is None else float(center)
    for _ in range(max_iter):
        sigma = mad_std(v, c)
        if not sigma > 0:
            break
        sel = v[np.abs(v - c) <= k * sigma]
        if sel.size == 0 or sel.size == v.size:
            break
        new = float(np.median(sel))
        v = sel
        if new == c:
            break
        c = new
    return c


# ----------------------------------------------------------------------- photometry
@dataclass
class Apertures:
    """Circular aperture and background annulus radii (pixels)."""

    radius: float
    inner: float
    outer: float

    @classmethod
    def for_fwhm(cls, fwhm: float) -> "Apertures":
        """Apertures that hold practically all of a star's flux (radius 2.5 FWHM, at
        least 3 px) with an annulus clear of its wings."""
        fwhm = float(fwhm) if np.isfinite(fwhm) and fwhm > 0 else 2.0
        r = max(2.5 * fwhm, 3.0)
        return cls(r, r + 2.0, r + 2.0 + max(3.0, 2.0 * fwhm))


@numba.njit(nogil=True, cache=True)
def _aperture_kernel(image, x, y, radius, inner, outer, saturation, half, sub, flux, err):
    """Forced photometry of the stars at ``x``, ``y`` (pixels of ``image``) into ``flux``
    and ``err``; see :func:`aperture_photometry`. Stars whose annulus leaves the image
    are left untouched (NaN)."""
    ny, nx = image.shape
    size = 2 * half + 1
    offs = np.empty(sub)
    for q in range(sub):
        offs[q] = (q + 0.5) / sub - 0.5
    r_ap2 = radius * radius
    # A pixel whose centre is this much inside (outside) the circle has every sub-sample
    # inside (outside): the corner sub-sample is 0.4 * sqrt(2) = 0.566 px away.
    reach = np.sqrt(2.0) * (0.5 - 0.5 / sub) + 1e-6
    full2 = (radius - reach) ** 2 if radius > reach else -1.0
    none2 = (radius + reach) ** 2
    in2, out2 = inner * inner, outer * outer
    ann = np.empty(size * size)
    dev = np.empty(size * size)
    for j in range(x.size):
        xj, yj = x[j], y[j]
        if not (np.isfinite(xj) and np.isfinite(yj)):
            continue
        ix = int(np.floor(xj + 0.5))
        iy = int(np.floor(yj + 0.5))
        if ix - half < 0 or ix + half >= nx or iy - half < 0 or iy + half >= ny:
            continue
        n_ann = 0
        area = 0.0
        total = 0.0
        bad = False
        for r in range(iy - half, iy + half + 1):
            dy = r - yj
            for c in range(ix - half, ix + half + 1):
                dx = c - xj
                v = float(image[r, c])
                r2 = dx * dx + dy * dy
                if r2 >= in2 and r2 <= out2 and not np.isnan(v):
                    ann[n_ann] = v
                    n_ann += 1
                # Fraction of the pixel inside the aperture, by sub x sub supersampling
                # (only for pixels the circle's edge crosses).
                if r2 > none2:
                    continue
                if r2 < full2:
                    w = 1.0
                else:
                    hits = 0
                    for a in range(sub):
                        fy = dy + offs[a]
                        for b in range(sub):
                            fx = dx + offs[b]
                            if fx * fx + fy * fy <= r_ap2:
                                hits += 1
                    if hits == 0:
                        continue
                    w = hits / (sub * sub)
                if not np.isfinite(v) or v >= saturation:
                    bad = True
                area += w
                total += w * v
        if n_ann == 0:
            continue
        vals = np.sort(ann[:n_ann])
        med = _median_sorted(vals, 0, n_ann)
        for q in range(n_ann):
            dev[q] = abs(vals[q] - med)
        sig = 1.482602218505602 * _median_sorted(np.sort(dev[:n_ann]), 0, n_ann)
        lim = 3.0 * max(sig, 0.5)
        s_bg = 0.0
        n_bg = 0
        for q in range(n_ann):
            if abs(vals[q] - med) <= lim:
                s_bg += vals[q]
                n_bg += 1
        if n_bg == 0:
            continue
        bg = s_bg / n_bg
        f = total - area * bg
        err[j] = np.sqrt(max(f, 0.0) + area * sig * sig) if np.isfinite(f) else np.nan
        if not bad and np.isfinite(bg):
            flux[j] = f


def aperture_photometry(image: np.ndarray, x, y, apertures: Apertures, saturation: float = np.inf,
                        origin: tuple[int, int] = (0, 0)):
    """Forced aperture photometry with a local background.

    Each pixel counts with the fraction of it inside the aperture circle (5 x 5
    supersampling: the same star at two sub-pixel positions then gets the same aperture
    area, which a 0/1 mask would not give). The background is the mean of the annulus
    within 3 sigma (MAD) of its median: the median itself is biased on integer (ADC)
    data by up to half a unit, which the aperture area multiplies into a flux error that
    differs between a frame and the reference when their sky levels differ (haze). The
    error uses the robust (MAD) annulus noise, so a cosmic ray or hot pixel in the
    annulus does not make a bright star look faint in signal-to-noise.

    Parameters
    ----------
    image : (ny, nx) ndarray
        A frame or a block of one.
    x, y : array_like
        Star positions in frame pixel coordinates.
    apertures : Apertures
    saturation : float
        A star with any aperture pixel at or above this level is not measured.
    origin : (y0, x0)
        Position of ``image[0, 0]`` in the frame (when ``image`` is a block).

    Returns
    -------
    flux, error : ndarray
        Background-subtracted flux (ADU) and its Poisson + background error estimate
        (gain 1 assumed: it only ranks stars). NaN for a star whose annulus leaves the
        image or whose aperture holds a NaN or a saturated pixel.
    """
    x = np.ascontiguousarray(x, dtype=np.float64) - origin[1]
    y = np.ascontiguousarray(y, dtype=np.float64) - origin[0]
    flux = np.full(x.size, np.nan)
    err = np.full(x.size, np.nan)
    if x.size == 0:
        return flux, err
    img = np.asarray(image)
    if img.dtype not in (np.float32, np.float64):
        img = img.astype(np.float32)
    half = int(np.ceil(apertures.outer)) + 1
    _aperture_kernel(img, x, y, float(apertures.radius), float(apertures.inner), float(apertures.outer),
                     float(saturation), half, 5, flux, err)
    return flux, err


def photometric_ratio(flux: np.ndarray, ref_flux: np.ndarray, error=None, ref_error=None,
                      min_snr: float = 10.0, min_stars: int = 5, k: float = 3.0, floor: float = 0.003):
    """Photometric scale of a frame relative to the reference from matched star fluxes.

    Each star gives a ratio ``r_j = F_j / F0_j`` with the error ``s_j`` propagated from
    both fluxes. Starting from the median, ratios further than ``k * sqrt(s_j^2 +
    (floor * r)^2)`` from the current estimate are dropped and the estimate becomes the
    inverse-variance weighted mean of the rest, until the set is stable. Clipping
    against each star's *own* error (not the spread of all ratios, which faint stars
    dominate) is what removes a cosmic ray on a bright star of either frame: such a
    star would otherwise bias a flux-weighted estimate by its full excess. ``floor``
    is a relative systematic error (flat field, aperture) below which stars are not
    told apart.

    Without errors, the ratio of summed fluxes over a ``k``-MAD clip of the ratios is used.

    Parameters
    ----------
    flux, ref_flux : ndarray
        Fluxes of the same stars in the frame and in the reference (NaN = not measured).
    error, ref_error : ndarray, optional
        Their errors; stars below ``min_snr`` in either frame are not used.
    min_snr : float
    min_stars : int
        Fewer usable stars give NaN.
    k : float
        Clipping threshold.
    floor : float
        Relative systematic error added in quadrature.

    Returns
    -------
    ratio : float
        ``flux / ref_flux`` (NaN when it cannot be measured).
    n : int
        Number of stars used.
    """
    f = np.asarray(flux, dtype=np.float64)
    r = np.asarray(ref_flux, dtype=np.float64)
    ok = np.isfinite(f) & np.isfinite(r) & (f > 0) & (r > 0)
    with_errors = error is not None and ref_error is not None
    if with_errors:
        e = np.asarray(error, dtype=np.float64)
        e0 = np.asarray(ref_error, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ok &= (f / e >= min_snr) & (r / e0 >= min_snr) & np.isfinite(e) & np.isfinite(e0)
    if ok.sum() < min_stars:
        return float("nan"), int(ok.sum())
    ratios = f[ok] / r[ok]
    if with_errors:
        var = ratios**2 * ((e[ok] / f[ok]) ** 2 + (e0[ok] / r[ok]) ** 2)
        est = float(np.median(ratios))
        keep = np.ones(ratios.size, bool)
        for _ in range(20):
            new = np.abs(ratios - est) <= k * np.sqrt(var + (floor * est) ** 2)
            if new.sum() < min_stars:
                return float("nan"), int(new.sum())
            w = 1.0 / (var[new] + (floor * est) ** 2)
            est = float(np.sum(w * ratios[new]) / np.sum(w))
            if np.array_equal(new, keep):
                break
            keep = new
        return est, int(keep.sum())
    f, r = f[ok], r[ok]
    keep = np.ones(f.size, bool)
    for _ in range(10):
        med = np.median(ratios[keep])
        spread = max(mad_std(ratios[keep], med), 1e-6 * abs(med))
        new = np.abs(ratios - med) <= k * spread
        if new.sum() < min_stars or np.array_equal(new, keep):
            break
        keep = new
    if keep.sum() < min_stars:
        return float("nan"), int(keep.sum())
    return float(f[keep].sum() / r[keep].sum()), int(keep.sum())
