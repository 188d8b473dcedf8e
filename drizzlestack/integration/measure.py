"""Pass 1 of the integration, per frame: robust statistics of the unresampled frame and
forced aperture photometry at the reference stars mapped into it (one Dask task per
frame). From these the integrate step derives the normalization and the weights.

Colour (Bayer) frames are measured per channel, each on the dense sub-images of its own
colour (``data[py::2, px::2]`` for every phase ``(py, px)`` of that colour: one for red
and blue, two for green): a location, dispersion or noise of a mosaic mixes colours, and
a sub-image is an ordinary image with pixels twice as far apart. Photometry, though,
runs on the whole mosaic, as for grey frames: one colour's samples, 2 px apart, sum an
undersampled star to within a few per cent only, depending on where the star falls
between them (±4 % per frame on simulated FWHM 2 px stars, against ±0.3 % for the
whole mosaic), and a change of transparency is grey to first order; the one
photometric scale serves every channel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import cfa as _cfa
from ..chunkio import DirectArray
from ..store import StackStore
from .resample import _open_frames
from .stats import Apertures, aperture_photometry, frame_statistics

#: statistics of a frame larger than this are measured on chunk-sized blocks spread
#: over it: a million pixels pin the scale down to 0.1 %, and the float64 temporaries
#: of the robust estimators stay near 50 MB per task whatever the frame size
MAX_STATISTICS_PIXELS = 1 << 20
#: at most this many reference stars are measured in every frame
MAX_PHOTOMETRY_STARS = 400


def _sample_blocks(frames: DirectArray, i: int, max_pixels: int):
    """The whole frame ``i`` as one block, or -- when it is larger than ``max_pixels`` --
    whole zarr chunks picked evenly over it (whole chunks: no chunk is decompressed for
    a sliver of it). Yields ``(block, (y0, x0))``."""
    _, ny, nx = frames.shape
    if ny * nx <= max_pixels:
        yield np.asarray(frames[i], dtype=np.float32), (0, 0)
        return
    _, cy, cx = frames.chunks
    origins = [(y0, x0) for y0 in range(0, ny, cy) for x0 in range(0, nx, cx)]
    step = max(1, int(np.ceil(len(origins) * cy * cx / max_pixels)))
    for y0, x0 in origins[step // 2::step]:
        yield np.asarray(frames[i, y0:y0 + cy, x0:x0 + cx], dtype=np.float32), (y0, x0)


def _photometry_bands(frames: DirectArray, i: int, x, y, apertures: Apertures, saturation: float):
    """Aperture photometry of frame ``i`` read one band of chunk rows at a time (plus
    the apertures' reach above and below), each star measured in the band holding its
    centre: every star is measured, and memory is one band, not the frame."""
    _, ny, nx = frames.shape
    band = frames.chunks[1]
    half = int(np.ceil(apertures.outer)) + 2
    flux, err = np.full(len(x), np.nan), np.full(len(x), np.nan)
    row = np.floor(np.asarray(y) + 0.5)
    for y0 in range(0, ny, band):
        sel = np.flatnonzero((row >= y0) & (row < y0 + band))
        if sel.size == 0:
            continue
        ya, yb = max(y0 - half, 0), min(y0 + band + half, ny)
        data = np.asarray(frames[i, ya:yb, :], dtype=np.float32)
        flux[sel], err[sel] = aperture_photometry(data, x[sel], y[sel], apertures, saturation, (ya, 0))
    return flux, err


def channel_phases(pattern: str, channel: int, y0: int = 0, x0: int = 0) -> list[tuple[int, int]]:
    """The 2x2 phases ``(py, px)`` of a block starting at ``(y0, x0)`` whose pixels saw
    ``channel``: ``block[py::2, px::2]`` are that colour's pixels."""
    cell = _cfa.channel_index(pattern, (2, 2), y0, x0)
    return [(py, px) for py in (0, 1) for px in (0, 1) if cell[py, px] == channel]


def measure_frame(store_path: str, i: int, star_x, star_y, apertures: Apertures | None, saturation: float,
                  max_pixels: int = MAX_STATISTICS_PIXELS, pattern: str = "") -> dict:
    """Statistics and star photometry of frame ``i`` (one Dask task).

    Parameters
    ----------
    store_path : str
    i : int
    star_x, star_y : ndarray
        Positions of the reference stars in this frame's pixels.
    apertures : Apertures or None
        ``None``: no photometry.
    saturation : float
        The frame's saturation level (ADU).
    max_pixels : int
        Statistics are measured on at most this many pixels (whole chunks spread over
        the frame), which bounds the task's memory for any frame size.
    pattern : str
        The store's Bayer pattern ("" for grey frames): measure each colour on its own.

    Returns
    -------
    dict
        ``stats`` (:class:`~.stats.FrameStatistics`; colour: a list over R, G, B),
        ``flux`` and ``error`` (per star, on the whole frame).
    """
    frames = _open_frames(store_path)
    sat = saturation if np.isfinite(saturation) else np.inf
    blocks = list(_sample_blocks(frames, i, max_pixels))
    if pattern:
        st = [frame_statistics([b[py::2, px::2] for b, o in blocks for py, px in channel_phases(pattern, c, *o)],
                               saturation=sat) for c in range(len(_cfa.CHANNELS))]
    else:
        st = frame_statistics([b for b, _ in blocks], saturation=sat)
    n = len(star_x)
    flux, err = np.full(n, np.nan), np.full(n, np.nan)
    if apertures is not None and n:
        # Close to saturation a sensor is no longer linear: leave those stars out.
        x, y = np.asarray(star_x), np.asarray(star_y)
        if len(blocks) == 1 and blocks[0][0].shape == frames.shape[1:]:
            flux, err = aperture_photometry(blocks[0][0], x, y, apertures, 0.9 * sat)  # the frame is read already
        else:
            flux, err = _photometry_bands(frames, i, x, y, apertures, 0.9 * sat)
    return {"stats": st, "flux": flux, "error": err}


def _star_table(st: StackStore, ref: int):
    """Reference stars from registration (``stars`` variable): x, y, fwhm and flags
    columns, looked up by the ``field`` names when the store records them."""
    if "stars" not in st.group:
        return None
    arr = st.group["stars"]
    names = arr.attrs.get("fields") or arr.attrs.get("field")
    if not names and "field" in st.group:
        names = [str(v) for v in st.group["field"][:]]
    if not names:
        from ..registration.stars import FIELDS as names  # the registration's column order
    names = [str(n) for n in names]
    table = np.asarray(arr[ref], dtype=np.float64)
    return {name: table[:, k] for k, name in enumerate(names) if k < table.shape[1]}


def reference_stars(st: StackStore, ref: int, saturation: float):
    """Isolated, unsaturated reference stars for photometry, and the aperture radii.

    The registration's star list is used when the store has one; otherwise stars are
    detected in the reference frame here.

    Returns
    -------
    x, y : ndarray
        Reference pixel positions (at most :data:`MAX_PHOTOMETRY_STARS`, brightest first).
    apertures : Apertures or None
        ``None`` when no star is available (no photometry).
    """
    cols = _star_table(st, ref)
    if cols is None:
        try:
            from ..registration.stars import FIELDS, detect_stars

            found = detect_stars(np.asarray(st.frame(ref), dtype=np.float32), saturation=saturation)
            table = np.asarray(found.table, dtype=np.float64)
            cols = {name: table[:, k] for k, name in enumerate(FIELDS)}
        except (ImportError, ValueError, RuntimeError, AttributeError):
            return np.empty(0), np.empty(0), None
    x, y, flux = cols.get("x"), cols.get("y"), cols.get("flux")
    if x is None or y is None or flux is None:
        return np.empty(0), np.empty(0), None
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0)
    if "flags" in cols:
        f = np.nan_to_num(cols["flags"], nan=0).astype(np.int64)
        ok &= (f & (1 | 2 | 4)) == 0  # saturated, blended, truncated
    fwhm = cols.get("fwhm")
    fwhm_value = float(np.nanmedian(fwhm[ok])) if fwhm is not None and ok.any() else float("nan")
    apertures = Apertures.for_fwhm(fwhm_value)
    # Isolation. Light of a neighbour dims and brightens with the star itself, so it
    # leaves the flux *ratio* alone; what does not scale is a neighbour cut by the
    # aperture's edge at a different sub-pixel phase in each frame. So only a bright
    # neighbour (over 10 % of the star) near the aperture excludes a star; cosmic rays
    # and hot pixels are left to the clipping of the ratios.
    finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    if ok.any() and finite.sum() > 1:
        from scipy.spatial import cKDTree

        xa, ya, fa = x[finite], y[finite], flux[finite]
        tree = cKDTree(np.column_stack([xa, ya]))
        sel = np.flatnonzero(ok)
        reach = apertures.radius + 2.0
        for j, near in zip(sel, tree.query_ball_point(np.column_stack([x[sel], y[sel]]), reach)):
            near = np.asarray(near, dtype=np.int64)
            others = near[(xa[near] != x[j]) | (ya[near] != y[j])]
            if np.any(fa[others] > 0.1 * flux[j]):
                ok[j] = False
    order = np.flatnonzero(ok)[np.argsort(-flux[ok])][:MAX_PHOTOMETRY_STARS]
    if order.size == 0:
        return np.empty(0), np.empty(0), None
    return x[order], y[order], apertures


@dataclass
class FrameMeasures:
    """Pass 1's results over the store's frames (NaN: not measured).

    ``location``, ``scale``, ``scale_mad``, ``noise`` are ``(n_frames,)``, or
    ``(n_frames, 3)`` for a colour store (one column per channel); ``photometric_scale``
    (the star flux ratio to the reference, on the whole mosaic) and ``n_photometry`` (the
    stars behind it) are ``(n_frames,)``. ``photometry`` says whether reference stars were
    available at all.
    """

    location: np.ndarray
    scale: np.ndarray
    scale_mad: np.ndarray
    noise: np.ndarray
    photometric_scale: np.ndarray
    n_photometry: np.ndarray
    photometry: bool
    seconds: float

    #: the store variables they become
    VARIABLES = ("location", "scale", "scale_mad", "noise", "photometric_scale")


def measure_frames(st: StackStore, frames, ref: int, saturation, mappings) -> FrameMeasures:
    """Pass 1 of the integration: :func:`measure_frame` for every frame in ``frames``
    (one Dask task each, on the active scheduler), the photometry at the reference stars
    mapped into each frame through ``mappings`` (frame index -> FrameMapping).

    Parameters
    ----------
    st : StackStore
    frames : sequence of int
        Frames to measure (the reference among them).
    ref : int
        The reference frame.
    saturation : (n_frames,) array
        Raw saturation level per frame (``inf``: none).
    mappings : dict
        Frame index -> its frame -> reference mapping.
    """
    import time

    import dask

    from ..parallel import compute
    from .stats import photometric_ratio

    pattern = st.cfa_pattern
    n_all, n_ch = st.n_frames, (len(_cfa.CHANNELS) if pattern else 1)
    star_x, star_y, apertures = reference_stars(st, ref, saturation[ref])
    tasks = []
    for i in frames:
        xf, yf = mappings[i].inverse(star_x, star_y) if star_x.size else (star_x, star_y)
        tasks.append(dask.delayed(measure_frame, pure=True)(st.location, i, xf, yf, apertures, saturation[i],
                                                            pattern=pattern))
    t0 = time.perf_counter()
    measured = dict(zip(frames, compute(*tasks)))
    seconds = time.perf_counter() - t0

    shape = (n_all, n_ch) if pattern else (n_all,)
    location, scale, scale_mad, noise = (np.full(shape, np.nan) for _ in range(4))
    phot, n_phot = np.full(n_all, np.nan), np.zeros(n_all, int)
    for i, m in measured.items():
        for c, s in enumerate(m["stats"] if pattern else [m["stats"]]):
            at = (i, c) if pattern else i
            location[at], scale[at], scale_mad[at], noise[at] = s.location, s.scale, s.scale_mad, s.noise
    if apertures is not None:
        ref_m = measured[ref]
        for i, m in measured.items():
            phot[i], n_phot[i] = photometric_ratio(m["flux"], ref_m["flux"], m["error"], ref_m["error"])
    return FrameMeasures(location, scale, scale_mad, noise, phot, n_phot, apertures is not None, seconds)
