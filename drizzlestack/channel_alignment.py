"""Colour stores: how far red and blue sit from green on the sky, measured on the
frames' own stars, so that the drizzle can put the three channels on top of each other.

A colour camera sees the sky through the atmosphere and the optics, and both bend
blue more than red: atmospheric dispersion smears every star into a short spectrum
pointing at the zenith (about 0.5" between blue and red at 45 degrees altitude, a
quarter of a pixel at 2"/px), and lateral colour in a refractor or a corrector does the
same across the field. Registration works on a luminance proxy (green, mostly), so a
Bayer drizzle faithfully keeps the offset of red and blue: stars get coloured fringes
(the M27 frames in the shared data: blue 0.25 px from green; benchmarks/README.md).
No other stacking tool measures this for the user; PixInsight users register the
channels afterwards, which resamples them.

The measurement uses only what the drizzle uses, the raw samples: around every clean,
isolated, unsaturated star of the registration's catalogue, a pixel-integrated Gaussian
(:func:`drizzlestack.registration.psffit.fit_gaussians`) is fitted to the samples of
each colour alone; the three positions are mapped through the frame's registration
onto the reference grid and differenced with green's. A pixel-integrated model has no
bias from the sparse lattice a colour samples the star on (a plain or windowed centroid
of red's samples, one every 2 px, is pulled towards the nearest sample, and the median
of such centroids came out at 0.2-0.4 of a known offset on simulations).
The offset is the inverse-variance mean over all stars of (up to :data:`MAX_FRAMES`)
frames, after a 5-sigma clip. Samples the integration flagged as outliers are left out
(a hot pixel beside a star would pull its fit). Simulated RGGB fields with a known
offset (0.1, 0.3) px: measured to 0.003 px at FWHM 1.3 px, 0.001 px at FWHM 2.

The offset is one constant (x, y) shift per channel (dispersion is the same all over a
field; lateral colour is not, and its mean is what a constant removes).
:func:`drizzlestack.drizzle` shifts every red and blue drop by minus this offset
(``align_channels=True``, the default for colour stores) and records it in the FITS
header.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from . import cfa as _cfa
from .chunkio import DirectArray
from .mappings import frame_mappings
from .registration.psffit import fit_gaussians
from .store import StackStore

__all__ = ["ChannelOffsets", "measure_channel_offsets", "channel_offsets", "offsets_to_remove", "MAX_ERROR",
           "MAX_FRAMES", "MIN_STARS"]

#: Frames measured at most (spread evenly over the selection): the offset is one
#: constant, and each frame is read whole (it costs what a drizzle reads of it).
MAX_FRAMES = 16
#: Star measurements needed in red and in blue before the offset is used.
MIN_STARS = 10
#: Largest standard error (px, per axis) of a red or blue offset that is used: a
#: shift known worse than this could misalign the channels more than it aligns them.
MAX_ERROR = 0.05
#: Stars per frame at most (the brightest clean ones).
MAX_STARS_PER_FRAME = 150
#: Signal-to-noise ratio a star needs in the registration's catalogue (each
#: measurement is weighted by its own fitted variance, so faint stars cost little).
MIN_SNR = 5.0


@dataclass(frozen=True)
class ChannelOffsets:
    """Where each channel sits on the sky relative to green, in reference pixels.

    Attributes
    ----------
    offset : (3, 2) ndarray
        ``(x, y)`` of R, G, B minus green's (green's row is zero).
    error : (3, 2) ndarray
        Standard error of each offset: of the inverse-variance mean, scaled up by the
        measurements' scatter when their fitted variances understate it.
    n_stars : (3,) ndarray of int
        Star measurements behind each offset.
    n_frames : int
        Frames measured.
    """

    offset: np.ndarray
    error: np.ndarray
    n_stars: np.ndarray
    n_frames: int

    @property
    def usable(self) -> bool:
        """Enough stars in red and in blue (:data:`MIN_STARS`) and the offsets known to
        :data:`MAX_ERROR` or better."""
        return bool(self.n_stars[0] >= MIN_STARS and self.n_stars[2] >= MIN_STARS
                    and np.all(self.error[[0, 2]] <= MAX_ERROR))

    def as_dict(self) -> dict:
        return {"offset_rgb": self.offset.tolist(), "error_rgb": self.error.tolist(),
                "n_stars_rgb": [int(v) for v in self.n_stars], "n_frames": int(self.n_frames)}

    @classmethod
    def from_dict(cls, d: dict) -> "ChannelOffsets":
        return cls(np.asarray(d["offset_rgb"], np.float64), np.asarray(d["error_rgb"], np.float64),
                   np.asarray(d["n_stars_rgb"], np.int64), int(d["n_frames"]))


def _channel_positions(data, chan, bad, table, sigma) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 3, 2)`` position of each star of ``table`` in each channel and its variance
    (NaN where the fit failed), from a least-squares fit of a pixel-integrated Gaussian to that
    channel's samples of a stamp around the star (:func:`fit_gaussians` with the other
    colours' samples, flagged and non-finite ones left out). A pixel-integrated model
    has no bias from the sparse lattice a channel samples the star on (a centroid of
    red's samples, one every 2 px, is pulled towards the nearest one)."""
    k = 2 * int(math.ceil(2.5 * sigma * 2.3548 / 2.0)) + 5  # ~2.5 FWHM plus a ring of sky
    half = k // 2
    ny, nx = data.shape
    ix = np.floor(table[:, 0] + 0.5).astype(np.int64)
    iy = np.floor(table[:, 1] + 0.5).astype(np.int64)
    inside = (ix - half >= 0) & (iy - half >= 0) & (ix + half < nx) & (iy + half < ny)
    out = np.full((len(table), 3, 2), np.nan)
    var = np.full((len(table), 3, 2), np.nan)
    if not inside.any():
        return out, var
    idx = np.flatnonzero(inside)
    offs = np.arange(k) - half
    px = (ix[idx, None] + offs).astype(np.float64)
    py = (iy[idx, None] + offs).astype(np.float64)
    rows, cols = py.astype(np.int64)[:, :, None], px.astype(np.int64)[:, None, :]
    stamps = np.asarray(data[rows, cols], np.float64)
    usable = np.isfinite(stamps) & ~bad[rows, cols]
    colour = chan[rows, cols]
    border = np.ones((k, k), bool)
    border[2:-2, 2:-2] = False
    for c in range(3):
        valid = usable & (colour == c)
        ring = (valid & border).reshape(len(idx), -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a stamp without sky samples: NaN, left out below
            sky = np.nanmedian(np.where(ring, stamps.reshape(len(idx), -1), np.nan), axis=1) if ring.any() \
                else np.full(len(idx), np.nan)
        sub = stamps - sky[:, None, None]
        flux = np.where(valid, sub, 0.0).sum(axis=(1, 2)) * (k * k / np.maximum(valid.sum(axis=(1, 2)), 1))
        init = np.column_stack([table[idx, 0], table[idx, 1], np.maximum(flux, 1.0),
                                np.full(len(idx), sigma), np.zeros(len(idx))])
        ok_sky = np.isfinite(sky)
        params, cov, ok = fit_gaussians(np.where(valid, sub, 0.0), valid & ok_sky[:, None, None], px, py, init)
        pvar = np.stack([cov[:, 0, 0], cov[:, 1, 1]], axis=1)
        good = (ok & ok_sky & np.all(np.abs(params[:, :2] - table[idx, :2]) < 1.5, axis=1)
                & np.all(np.isfinite(pvar) & (pvar > 0), axis=1))
        out[idx[good], c] = params[good, :2]
        var[idx[good], c] = pvar[good]
    return out, var


def _robust_weighted_mean(d: np.ndarray, var: np.ndarray) -> tuple[float, float]:
    """Inverse-variance mean of ``d`` after clipping what lies beyond 5 robust sigma of
    the median, and its standard error (scaled up by the scatter when the variances
    understate it)."""
    med = np.median(d)
    mad = 1.4826 * np.median(np.abs(d - med))
    keep = np.abs(d - med) <= 5.0 * max(mad, 1e-6)
    w = 1.0 / var[keep]
    mean = float(np.sum(w * d[keep]) / np.sum(w))
    n = int(keep.sum())
    chi2 = float(np.sum(w * (d[keep] - mean) ** 2)) / max(n - 1, 1)
    return mean, float(np.sqrt(max(chi2, 1.0) / np.sum(w)))


def _clean_stars(table: np.ndarray, saturation: float) -> np.ndarray:
    """Rows of a registration catalogue (``x, y, flux, fwhm, peak, snr, flags``) worth
    a fit: fitted without a flag, bright, well below saturation, and with no other
    catalogued star within ``3 FWHM + 4`` px; the brightest first."""
    from scipy.spatial import cKDTree

    t = table[np.all(np.isfinite(table[:, :2]), axis=1)]
    if len(t) < 2:
        return t[:0]
    tree = cKDTree(t[:, :2])
    d, _ = tree.query(t[:, :2], k=2)
    fwhm = np.nanmedian(t[:, 3])
    isolated = d[:, 1] > 3.0 * (fwhm if np.isfinite(fwhm) else 2.0) + 4.0
    keep = (t[:, 6] == 0) & (t[:, 5] >= MIN_SNR) & isolated
    if np.isfinite(saturation):
        keep &= t[:, 4] < 0.7 * saturation
    t = t[keep]
    return t[np.argsort(-t[:, 2])][:MAX_STARS_PER_FRAME]


def measure_channel_offsets(store, frames=None, distortion: bool = True) -> ChannelOffsets:
    """Measure how far red and blue sit from green on the sky in a colour store.

    Parameters
    ----------
    store : path-like or StackStore
        A registered colour (CFA) store.
    frames : sequence of int, optional
        Frames to measure (default every registered frame with status ``ok``); at most
        :data:`MAX_FRAMES` of them, spread evenly, are read.
    distortion : bool
        Map the fitted positions with the registration's distortion model, when there
        is one.

    Returns
    -------
    ChannelOffsets
        ``offset[c]``: the inverse-variance mean (5-sigma clipped) over every measured
        star of channel ``c``'s fitted position minus green's, on the reference grid
        (pixels); ``n_stars[c]``: the fits behind it (green: its own fits);
        ``usable`` is false when red or blue had fewer than :data:`MIN_STARS`
        measurements or an error above :data:`MAX_ERROR`.
    """
    st = store if isinstance(store, StackStore) else StackStore.open(store, mode="r")
    pattern = st.cfa_pattern
    if not pattern:
        raise ValueError(f"{st.location}: a grey store has no colour channels to align")
    group = st.group
    if frames is None:
        frames = [i for i, s in enumerate(group["status"][:st.n_frames]) if str(s) == "ok"]
    frames = [int(i) for i in frames]
    if len(frames) > MAX_FRAMES:
        frames = [frames[int(k)] for k in np.linspace(0, len(frames) - 1, MAX_FRAMES).round()]
    stars = group["stars"] if "stars" in group else None
    fwhm = np.asarray(group["fwhm"][...], np.float64) if "fwhm" in group else np.full(st.n_frames, np.nan)
    saturation = (np.asarray(group["saturation"][...], np.float64) if "saturation" in group
                  else np.full(st.n_frames, np.inf))
    from .integration.outliers import OUTLIERS_VARIABLE

    data_reader = DirectArray(st.location, "frames")
    flag_reader = DirectArray(st.location, OUTLIERS_VARIABLE) if OUTLIERS_VARIABLE in group else None
    mappings = frame_mappings(st, frames, distortion=distortion)
    chan = None
    diffs = [[], [], []]
    measured = 0
    n_green = 0
    for mapping, i in zip(mappings, frames):
        table = _clean_stars(np.asarray(stars[i], np.float64), saturation[i]) if stars is not None else None
        if table is None or not len(table):
            continue
        data = data_reader[i]
        if chan is None:
            chan = _cfa.channel_index(pattern, data.shape)
        bad = (flag_reader[i] != 0) if flag_reader is not None else np.zeros(data.shape, bool)
        sigma = (float(fwhm[i]) if np.isfinite(fwhm[i]) else 2.0) / 2.3548  # the fits' first guess
        out, var = _channel_positions(data, chan, bad, table, sigma)
        measured += 1
        n_green += int(np.all(np.isfinite(out[:, 1]), axis=1).sum())
        ref = [np.column_stack(mapping.forward(out[:, c, 0], out[:, c, 1])) for c in range(3)]
        for c in range(3):
            # (the variances in frame pixels: the mappings keep the scale within a few %)
            d, v = ref[c] - ref[1], var[:, c] + var[:, 1]
            good = np.all(np.isfinite(d) & np.isfinite(v), axis=1)
            diffs[c].append((d[good], v[good]))
    offset = np.zeros((3, 2))
    error = np.zeros((3, 2))
    n_stars = np.zeros(3, dtype=np.int64)
    for c in (0, 2):
        d = np.concatenate([a for a, _ in diffs[c]]) if diffs[c] else np.empty((0, 2))
        v = np.concatenate([b for _, b in diffs[c]]) if diffs[c] else np.empty((0, 2))
        n_stars[c] = len(d)
        if len(d):
            for a in range(2):
                offset[c, a], error[c, a] = _robust_weighted_mean(d[:, a], v[:, a])
    n_stars[1] = n_green
    offset[1] = 0.0
    error[1] = 0.0
    return ChannelOffsets(offset, error, n_stars, measured)


def _cache_key(st: StackStore, frames, distortion: bool) -> dict:
    """What a measurement depends on: the frames, the mappings (a digest of the
    transforms; the distortion choice) and the steps that wrote the frames, the
    registration and the outlier flags (their parameter digests and start stamps, both
    set when a step begins: the integration measures between its passes)."""
    import hashlib

    transforms = np.ascontiguousarray(st.group["transform"][...], np.float64)
    steps = {name: [(st.step(name) or {}).get("digest"), (st.step(name) or {}).get("started")]
             for name in ("ingest", "register", "integrate")}
    return {"frames": [int(i) for i in frames], "distortion": bool(distortion), "n_frames": int(st.n_frames),
            "transforms": hashlib.sha1(transforms.tobytes()).hexdigest(), "steps": steps}


def channel_offsets(st: StackStore, frames, distortion: bool = True) -> ChannelOffsets:
    """:func:`measure_channel_offsets`, kept in the store's attributes with what it was
    measured from (:func:`_cache_key`): the integration measures once between its
    passes, and the drizzle -- at any scale or pixfrac, the usual way to tune one --
    reuses it instead of reading the frames again."""
    key = _cache_key(st, frames, distortion)
    cached = st.attrs.get("channel_offsets")
    if isinstance(cached, dict) and cached.get("key") == key:
        return ChannelOffsets.from_dict(cached["offsets"])
    offsets = measure_channel_offsets(st, frames, distortion=distortion)
    st.attrs["channel_offsets"] = {"key": key, "offsets": offsets.as_dict()}
    return offsets


def offsets_to_remove(st: StackStore, frames, distortion: bool = True, name=None) -> ChannelOffsets | None:
    """What the integration and the drizzle remove: :func:`channel_offsets`, or None with
    a warning (naming ``name``, default the store) when they are not known well enough
    (:attr:`ChannelOffsets.usable`)."""
    import warnings as _warnings

    from ._warnings import DrizzlestackWarning

    offsets = channel_offsets(st, frames, distortion)
    if offsets.usable:
        return offsets
    _warnings.warn(f"{name or st.location}: too few clean stars in red and blue to measure the channels' offsets "
                   f"from green ({int(offsets.n_stars[0])} and {int(offsets.n_stars[2])} measurements, need "
                   f"{MIN_STARS} and an error below {MAX_ERROR} px; largest error "
                   f"{float(np.max(offsets.error[[0, 2]])):.3f} px); leaving them as registered "
                   f"(align_channels=False silences this)", DrizzlestackWarning, stacklevel=3)
    return None


def header_cards(offsets: ChannelOffsets | None) -> list[tuple]:
    """FITS cards saying whether (``CHALIGN``) and by how much (``CHOFFRX`` ...) the
    channels were moved onto green."""
    cards = [("CHALIGN", offsets is not None, "channels shifted onto green (align_channels)")]
    if offsets is not None:
        for c in (0, 2):
            name = _cfa.CHANNELS[c]
            for a, axis in enumerate("XY"):
                cards.append((f"CHOFF{name}{axis}", round(float(offsets.offset[c, a]), 4),
                              f"{name} - G {axis.lower()} offset removed [reference px]"))
    return cards
