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

Everything here is plain numpy on in-memory arrays; :mod:`.integrate` decides what to
read and where the work runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.stats import norm

#: normalized MAD: ``MAD * 1.4826`` estimates the standard deviation of Gaussian data
MAD_TO_SIGMA = 1.482602218505602

_B3 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
# Standard deviation of the first wavelet layer for unit white noise: the layer is
# (delta - h) * I with h = outer(B3, B3), so its variance is sum((delta - h)^2).
_H2 = np.outer(_B3, _B3)
_DELTA_MINUS_H = -_H2.copy()
_DELTA_MINUS_H[2, 2] += 1.0
WAVELET_LAYER1_NOISE = float(np.sqrt(np.sum(_DELTA_MINUS_H**2)))  # 0.8908 (Starck & Murtagh: 0.889)


def _truncated_std_factor(k: float) -> float:
    """Ratio of the standard deviation of a normal truncated at +-k sigma to sigma
    (k-sigma clipping removes the tails of the noise too; this undoes the bias)."""
    p = 2.0 * norm.cdf(k) - 1.0
    return float(np.sqrt(1.0 - 2.0 * k * norm.pdf(k) / p))


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


def frame_statistics(blocks, saturation: float = np.inf, k: float = 3.0) -> FrameStatistics:
    """Statistics of one frame from one or more 2-D blocks of its pixels.

    Parameters
    ----------
    blocks : ndarray or sequence of ndarray
        The whole frame, or a sample of it as several rectangular blocks (the noise
        estimator needs 2-D neighbourhoods, so a sample is taken as blocks, not as
        scattered pixels).
    saturation : float
        Pixels at or above this level are left out of every estimate.
    k : float
        Clipping threshold of the noise estimator.

    Returns
    -------
    FrameStatistics
    """
    if isinstance(blocks, np.ndarray):
        blocks = [blocks]
    values, layers = [], []
    for b in blocks:
        b = np.asarray(b, dtype=np.float32)
        good = np.isfinite(b) & (b < saturation)
        values.append(b[good])
        if min(b.shape) >= 8:
            layers.append(wavelet_noise_layer(b, saturation))
    v = np.concatenate(values) if values else np.empty(0, np.float32)
    if v.size == 0:
        nan = float("nan")
        return FrameStatistics(nan, nan, nan, nan, 0)
    v64 = v.astype(np.float64)
    med = float(np.median(v64))
    bwmv = biweight_midvariance(v64, location=med)
    noise = clipped_noise(np.concatenate(layers), k=k) if layers else float("nan")
    return FrameStatistics(location=clipped_median(v64, k=k, center=med), scale=float(np.sqrt(bwmv)),
                           scale_mad=mad_std(v64, med), noise=float(noise), n_pixels=int(v.size))


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


def _overlap_weights(dx: np.ndarray, dy: np.ndarray, radius: float, sub: int = 5) -> np.ndarray:
    """Fraction of each pixel (centre offsets ``dx``, ``dy`` from the star) inside a circle
    of ``radius``, by ``sub x sub`` supersampling: the same star at two sub-pixel
    positions then gets the same aperture area, which a 0/1 mask would not give."""
    s = (np.arange(sub) + 0.5) / sub - 0.5
    fx = dx[..., None, None] + s[None, :]
    fy = dy[..., None, None] + s[:, None]
    return ((fx * fx + fy * fy) <= radius * radius).mean(axis=(-1, -2))


def aperture_photometry(image: np.ndarray, x, y, apertures: Apertures, saturation: float = np.inf,
                        origin: tuple[int, int] = (0, 0)):
    """Forced aperture photometry with a local median background.

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
    x = np.asarray(x, dtype=np.float64) - origin[1]
    y = np.asarray(y, dtype=np.float64) - origin[0]
    n = x.size
    flux = np.full(n, np.nan)
    err = np.full(n, np.nan)
    if n == 0:
        return flux, err
    ny, nx = image.shape
    half = int(np.ceil(apertures.outer)) + 1
    offs = np.arange(-half, half + 1)
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    inside = np.isfinite(x) & np.isfinite(y) & (ix - half >= 0) & (ix + half < nx) & (iy - half >= 0) & (iy + half < ny)
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return flux, err
    cols = ix[idx, None] + offs  # (m, K)
    rows = iy[idx, None] + offs
    stamps = image[rows[:, :, None], cols[:, None, :]].astype(np.float64)  # (m, K, K)
    dx = cols[:, None, :] - x[idx, None, None]
    dy = rows[:, :, None] - y[idx, None, None]
    dx, dy = np.broadcast_to(dx, stamps.shape), np.broadcast_to(dy, stamps.shape)
    r2 = dx * dx + dy * dy
    w = _overlap_weights(dx, dy, apertures.radius)
    in_ap = w > 0
    annulus = (r2 >= apertures.inner**2) & (r2 <= apertures.outer**2)
    ann = np.where(annulus, stamps, np.nan).reshape(idx.size, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an annulus entirely in a NaN region: NaN flux
        med = np.nanmedian(ann, axis=1)
        # Robust (MAD) background noise: a cosmic ray or a hot pixel in the annulus must
        # not make a bright star look faint in signal-to-noise.
        sig = MAD_TO_SIGMA * np.nanmedian(np.abs(ann - med[:, None]), axis=1)
        # Background: the mean of the annulus within 3 sigma of its median. The median
        # itself is biased on integer (ADC) data by up to half a unit, which the aperture
        # area multiplies into a flux error that differs between a frame and the
        # reference when their sky levels differ (haze) -- a few 0.1 % on a faint star.
        clip = np.abs(ann - med[:, None]) <= 3.0 * np.maximum(sig, 0.5)[:, None]
        bg = np.nanmean(np.where(clip, ann, np.nan), axis=1)
        bg_var = sig**2
    ap_vals = np.where(in_ap, stamps, 0.0)
    bad = np.any(in_ap & ~np.isfinite(stamps), axis=(1, 2)) | np.any(in_ap & (stamps >= saturation), axis=(1, 2))
    area = w.sum(axis=(1, 2))
    f = (w * ap_vals).sum(axis=(1, 2)) - area * bg
    e = np.sqrt(np.clip(f, 0, None) + area * bg_var)
    f[bad | ~np.isfinite(bg)] = np.nan
    flux[idx], err[idx] = f, e
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
