"""Normalization and weights: put every frame on the reference frame's scale and decide
how much each one counts.

Every normalization here is an affine map per frame, ``v' = v * norm_scale +
norm_offset``, so it can be applied on the fly to any window of a frame (the registered
view, drizzle) and stored as two numbers per frame. With ``m`` the frame's location,
``m0`` the reference's, and ``k`` the frame's scale factor relative to the reference:

==========================  =====================  ============================
normalization               ``norm_scale``         ``norm_offset``
==========================  =====================  ============================
``none``                    1                      0
``additive``                1                      ``m0 - m``
``multiplicative``          ``m0 / m``             0
``additive+scaling``        ``k``                  ``m0 - k m``
``multiplicative+scaling``  ``k``                  0
==========================  =====================  ============================

``additive+scaling`` (the default) is ``(v - m) k + m0``: the background goes to the
reference's level and the signal above it is rescaled. The factor ``k`` comes either
from the robust dispersion (``k = s0 / s``, PixInsight's choice, fine when all frames
have the same noise and transparency) or from star photometry (``k = F0 / F``, the
ratio of matched star fluxes). Only photometry is right when transparency and sky
change together: through haze the stars fade while the sky brightens and its noise
grows, so the dispersion ratio moves the wrong way. ``multiplicative+scaling`` is a
pure gain ``v k`` for data without a pedestal.

Weights (reported per frame, relative to the reference = 1):

* ``none`` -- all 1;
* ``exposure`` -- exposure time (header ``EXPTIME``...);
* ``noise`` (default) -- inverse variance of the *normalized* frame,
  ``(norm_scale * noise)^-2``: the weights that minimise the noise of a weighted mean;
* ``keyword`` -- the value of a FITS header keyword.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from .._warnings import DrizzlestackError

NORMALIZATIONS = ("none", "additive", "multiplicative", "additive+scaling", "multiplicative+scaling")
SCALE_ESTIMATORS = ("auto", "photometry", "biweight", "mad")
WEIGHTS = ("none", "exposure", "noise", "keyword")


@dataclass
class Normalization:
    """Per-frame affine normalization ``v' = v * scale + offset`` and its provenance."""

    scale: np.ndarray  #: ``norm_scale`` (n_frames,)
    offset: np.ndarray  #: ``norm_offset`` (n_frames,)
    method: str
    estimator: str  #: where the scale factor came from ("photometry", "biweight", "mad" or "-")

    def apply(self, values, i: int):
        """Normalize ``values`` of frame ``i``."""
        return values * self.scale[i] + self.offset[i]


def check_choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise DrizzlestackError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return value


def scale_factors(reference: int, scale=None, photometric_scale=None, estimator: str = "auto"):
    """Scale factor ``k`` of every frame relative to the reference.

    Parameters
    ----------
    reference : int
        Index of the reference frame.
    scale : (n,) array_like, optional
        Robust dispersion per frame (``biweight`` or ``mad`` estimator).
    photometric_scale : (n,) array_like, optional
        Star flux ratio ``F / F0`` per frame (``photometry``).
    estimator : {"auto", "photometry", "biweight", "mad"}
        ``"auto"`` uses photometry when it was measured for every frame that has a
        dispersion, the dispersion otherwise. ``"biweight"`` and ``"mad"`` only say
        which dispersion ``scale`` holds.

    Returns
    -------
    k : (n,) ndarray
        NaN for a frame whose factor could not be measured.
    used : str
        The estimator actually used.
    """
    check_choice("scale_estimator", estimator, SCALE_ESTIMATORS)
    if estimator == "auto":
        usable = photometric_scale is not None
        if usable:
            p = np.asarray(photometric_scale, dtype=np.float64)
            wanted = np.isfinite(np.asarray(scale, dtype=np.float64)) if scale is not None else np.isfinite(p)
            usable = bool(np.all(np.isfinite(p[wanted]) & (p[wanted] > 0)))
        estimator = "photometry" if usable else "biweight"
    if estimator == "photometry":
        if photometric_scale is None:
            raise DrizzlestackError("scale_estimator='photometry': no star photometry available "
                                    "(the store has no stars and none could be detected in the reference)")
        p = np.asarray(photometric_scale, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            k = p[reference] / p
        return np.where(np.isfinite(k) & (k > 0), k, np.nan), "photometry"
    if scale is None:
        raise DrizzlestackError("scale factors from the dispersion need the frames' scale statistics")
    s = np.asarray(scale, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = s[reference] / s
    return np.where(np.isfinite(k) & (k > 0), k, np.nan), estimator


def normalization(method: str, reference: int, location, k=None, estimator: str = "-") -> Normalization:
    """Per-frame normalization coefficients (see the module table).

    Parameters
    ----------
    method : str
        One of :data:`NORMALIZATIONS`.
    reference : int
    location : (n,) array_like
        Frame locations (medians).
    k : (n,) array_like, optional
        Scale factors from :func:`scale_factors` (needed by the ``+scaling`` methods).
    estimator : str
        Recorded provenance of ``k``.

    Returns
    -------
    Normalization
        NaN coefficients for frames whose statistics are missing.
    """
    check_choice("normalization", method, NORMALIZATIONS)
    m = np.asarray(location, dtype=np.float64)
    n = m.size
    m0 = m[reference]
    ones, zeros = np.ones(n), np.zeros(n)
    if method.endswith("+scaling"):
        if k is None:
            raise DrizzlestackError(f"normalization={method!r} needs scale factors")
        k = np.asarray(k, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "none":
            a, b = ones, zeros
        elif method == "additive":
            a, b = ones, m0 - m
        elif method == "multiplicative":
            a, b = m0 / m, zeros
        elif method == "additive+scaling":
            a, b = k, m0 - k * m
        else:  # multiplicative+scaling
            a, b = k, zeros
    a = np.where(np.isfinite(a), a, np.nan)
    b = np.where(np.isfinite(a) & np.isfinite(b), b, np.nan)
    return Normalization(a, b, method, estimator if method.endswith("+scaling") else "-")


def header_value(header_text: str, keyword: str) -> float:
    """Numeric value of ``keyword`` in a stored header (text, one card per line); NaN if
    absent or not a number."""
    try:
        header = fits.Header.fromstring(str(header_text), sep="\n")
        value = header.get(keyword)
        return float(value) if value is not None and not isinstance(value, bool) else float("nan")
    except (ValueError, TypeError):
        return float("nan")


def frame_weights(method: str, reference: int, *, noise=None, norm_scale=None, exptime=None,
                  headers=None, keyword: str | None = None) -> np.ndarray:
    """Per-frame combination weights, relative to the reference frame (= 1).

    Parameters
    ----------
    method : {"none", "exposure", "noise", "keyword"}
    reference : int
    noise, norm_scale : (n,) array_like
        For ``noise``: weight ``(norm_scale * noise)^-2``.
    exptime : (n,) array_like
        For ``exposure``.
    headers : sequence of str
        Stored headers, for ``keyword``.
    keyword : str
        Header keyword for ``keyword``.

    Returns
    -------
    (n,) ndarray
        Finite and >= 0 where defined, NaN where the input is missing. A zero weight
        (e.g. a keyword value of 0) is kept as 0: the frame is then left out.

    Raises
    ------
    DrizzlestackError
        Unknown method, missing keyword, or a reference frame whose weight is not a
        positive number (everything is relative to it).
    """
    check_choice("weights", method, WEIGHTS)
    if method == "none":
        n = len(noise) if noise is not None else len(exptime) if exptime is not None else len(headers)
        return np.ones(n)
    if method == "exposure":
        w = np.asarray(exptime, dtype=np.float64)
        what = "exposure time (EXPTIME)"
    elif method == "noise":
        with np.errstate(divide="ignore", invalid="ignore"):
            w = 1.0 / (np.asarray(norm_scale, dtype=np.float64) * np.asarray(noise, dtype=np.float64)) ** 2
        what = "noise"
    else:
        if not keyword:
            raise DrizzlestackError("weights='keyword' needs weight_keyword (the FITS keyword holding the weight)")
        w = np.array([header_value(h, keyword) for h in headers], dtype=np.float64)
        what = f"header keyword {keyword}"
    w = np.where(np.isfinite(w) & (w >= 0), w, np.nan)
    ref = w[reference]
    if not (np.isfinite(ref) and ref > 0):
        raise DrizzlestackError(f"weights={method!r}: the reference frame {reference} has no usable {what} "
                                f"(got {ref}); choose another weighting or reference")
    return w / ref


@dataclass
class FrameWeighting:
    """Normalization and weights of every frame and channel, and which frames remain.

    ``norm.scale``, ``norm.offset`` and ``weights`` are ``(n_frames, n_channels)`` (one
    column for grey frames); ``used`` lists the frames to integrate, ``excluded`` the
    others with the reason.
    """

    norm: Normalization
    weights: np.ndarray
    used: list
    excluded: dict


def normalize_frames(measures, candidates, reference: int, method: str, estimator: str, weighting: str, *,
                     exptime, headers=None, keyword: str | None = None, channels=None) -> FrameWeighting:
    """Normalization, weights and exclusion of the integration's frames, per channel.

    Parameters
    ----------
    measures : FrameMeasures
        The statistics pass (:func:`drizzlestack.integration.measure.measure_frames`).
    candidates : sequence of int
        Frames that may be integrated (registered, status ok).
    reference : int
    method, estimator, weighting : str
        ``normalization``, ``scale_estimator`` and ``weights`` of :func:`drizzlestack.integrate`.
    exptime : (n_frames,) array
    headers, keyword
        For ``weighting="keyword"``.
    channels : sequence of str, optional
        Colour stores: the channel names (each colour normalized and weighted on its own,
        relative to the reference frame's same colour; the photometric scale is shared).

    Returns
    -------
    FrameWeighting

    Warns
    -----
    DrizzlestackWarning
        When ``+scaling`` wanted photometry (``auto``) but fell back to the dispersion.
    """
    import warnings

    from .._warnings import DrizzlestackWarning

    colour = channels is not None
    n_all = len(measures.photometric_scale)
    n_ch = len(channels) if colour else 1
    a, b = np.full((n_all, n_ch), np.nan), np.full((n_all, n_ch), np.nan)
    w = np.zeros((n_all, n_ch))
    phot = measures.photometric_scale if measures.photometry else None
    estimators = []
    for c in range(n_ch):
        def col(values):
            return values[:, c] if colour else values

        dispersion = col(measures.scale_mad if estimator == "mad" else measures.scale)
        k, used_estimator = scale_factors(reference, dispersion, phot, estimator)
        norm = normalization(method, reference, col(measures.location), k, used_estimator)
        a[:, c], b[:, c] = norm.scale, norm.offset
        w[:, c] = frame_weights(weighting, reference, noise=col(measures.noise), norm_scale=norm.scale,
                                exptime=exptime, headers=headers, keyword=keyword)
        estimators.append(used_estimator)
        if method.endswith("+scaling") and estimator == "auto" and used_estimator != "photometry":
            missing = [i for i in candidates if not np.isfinite(measures.photometric_scale[i])]
            why = (f"frames {missing} matched too few reference stars" if measures.photometry
                   else "no reference stars were found")
            what = f" of {channels[c]}" if colour else ""
            warnings.warn(f"photometric scaling{what} unavailable ({why}); scaling every frame by its "
                          f"{used_estimator} dispersion instead, which is wrong for frames whose transparency "
                          f"changed", DrizzlestackWarning, stacklevel=3)
    norm = Normalization(a, b, method, "/".join(dict.fromkeys(estimators)))
    used, excluded = [], {}
    for i in candidates:
        reason = None
        for c in range(n_ch):
            what = f" ({channels[c]})" if colour else ""
            loc = measures.location[i, c] if colour else measures.location[i]
            if not np.isfinite(loc):
                reason = f"no valid pixels for statistics{what}"
            elif not (np.isfinite(a[i, c]) and np.isfinite(b[i, c])):
                reason = (f"no {estimators[c]} scale factor{what} (photometry matched "
                          f"{measures.n_photometry[i]} stars)" if estimators[c] == "photometry"
                          else f"no normalization{what} (scale statistics missing)")
            elif not np.isfinite(w[i, c]):
                reason = f"no weight{what} ({weighting})"
            elif w[i, c] == 0:
                reason = f"zero weight{what}"
            if reason:
                break
        if reason:
            excluded[i] = reason
        else:
            used.append(i)
    return FrameWeighting(norm, w, used, excluded)
