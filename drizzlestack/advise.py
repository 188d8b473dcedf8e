"""Step 5, advise: will drizzle help these frames, and with which ``scale`` and ``pixfrac``?

Everything is measured on the registered store, before any integration or drizzle:

- **sampling**: the median star FWHM in reference pixels, from the registration's
  pixel-integrated Gaussian fits (``stars``: the optical PSF, the pixel box excluded);
  below :data:`UNDERSAMPLED_FWHM` the frames are undersampled and drizzle can recover
  detail that an interpolated integration aliases away;
- **dither**: the sub-pixel phases of every frame's full mapping (homography and surface
  spline, :func:`~drizzlestack.registration.frame_mapping`) at a grid of points across
  the field, and how many of the ``s x s`` sub-pixel cells they fill;
- **dry pixels and weight uniformity**, from the actual geometry: the weights alone (all
  data 1, no rejection) are drizzled with the real kernels and the real mappings on a few
  small output tiles, for each setting; this costs a few percent of a full drizzle;
  colour (Bayer) stores per channel, each colour's samples being their own lattice, the
  recommendation judged on the worst channel's dry fraction;
- **cost**: the noise-correlation ratio ``R`` of Fruchter & Hook (2002), the per-pixel
  noise against the integration's, and the expected FWHM of each product.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ._warnings import DrizzlestackError, DrizzlestackWarning
from .geometry import OutputGrid, apply_homography, translation
from .store import StackStore

#: median FWHM (reference pixels) below which the frames are undersampled
UNDERSAMPLED_FWHM = 2.0
#: a drizzle at scale ``s`` is useful while the stars would still be narrower than this
#: many output pixels at scale ``s - 1`` (the DrizzlePac handbook's ~2.5 px across the
#: FWHM for a well-sampled output image)
WELL_SAMPLED_OUTPUT_FWHM = 2.5
#: largest acceptable predicted fraction of dry (zero-weight) output pixels
MAX_DRY_FRACTION = 0.01
#: largest acceptable rms / median of the weight map (DrizzlePac handbook: "less than
#: 20% to 30% of the median"; the strict end)
MAX_WEIGHT_RMS = 0.2
#: settings predicted besides the recommendation (what users try)
SCALES = (2.0, 3.0)
PIXFRACS = (0.6, 0.7, 0.8, 0.9, 1.0)
#: smaller drops tried for the recommendation when 0.6 still passes
SMALL_PIXFRACS = (0.5, 0.4, 0.3)
#: circular standard deviation (px) of the phases below which the dither is "whole-pixel"
CLUSTERED_PHASE_STD = 0.08

_SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


# --------------------------------------------------------------------------- sampling
def measured_fwhm(stack, indices, mappings) -> tuple[float, np.ndarray]:
    """Median FWHM of the frames in reference pixels, and each frame's.

    A frame's FWHM is the median over its clean stars (flags 0, SNR > 20; all stars when
    fewer than 3 are clean) of the registration's fitted FWHM, in the frame's pixels,
    times the frame's linear scale onto the reference (``sqrt |det J|`` at its centre).
    """
    ny, nx = (int(v) for v in stack.attrs["frame_shape"])
    fields = [str(f) for f in stack["stars"].coords["field"].values] if "field" in stack["stars"].coords \
        else ["x", "y", "flux", "fwhm", "peak", "snr", "flags"]
    i_fwhm, i_snr, i_flags = fields.index("fwhm"), fields.index("snr"), fields.index("flags")
    stars = np.asarray(stack["stars"].values, dtype=np.float64)[list(indices)]
    per_frame = np.full(len(indices), np.nan)
    for k, mapping in enumerate(mappings):
        table = stars[k]
        fwhm = table[:, i_fwhm]
        finite = np.isfinite(fwhm) & (fwhm > 0)
        clean = finite & (table[:, i_flags] == 0) & (table[:, i_snr] > 20)
        sel = clean if clean.sum() >= 3 else finite
        if not sel.any():
            continue
        per_frame[k] = float(np.median(fwhm[sel])) * _linear_scale(mapping, (ny, nx))
    median = float(np.nanmedian(per_frame)) if np.isfinite(per_frame).any() else float("nan")
    return median, per_frame


def _linear_scale(mapping, frame_shape) -> float:
    """Reference pixels per frame pixel at the frame centre (``sqrt |det J|``)."""
    cy, cx = (frame_shape[0] - 1) / 2, (frame_shape[1] - 1) / 2
    x = np.array([cx - 0.5, cx + 0.5, cx, cx])
    y = np.array([cy, cy, cy - 0.5, cy + 0.5])
    xr, yr = mapping.forward(x, y)
    return float(math.sqrt(abs((xr[1] - xr[0]) * (yr[3] - yr[2]) - (xr[3] - xr[2]) * (yr[1] - yr[0]))))


# ----------------------------------------------------------------------------- dither
def field_phases(mappings, frame_shape, n_points: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel phases of the frames at ``n_points x n_points`` points across the field.

    At each reference point ``P`` and for each frame, the frame pixel centre nearest to
    ``P`` is mapped through the frame's whole mapping; its reference position modulo one
    pixel is where that frame samples the sky around ``P``. Frames with the same phase at
    ``P`` sample the same points there and give drizzle nothing new.

    Returns
    -------
    points : (m, 2) ndarray
        The reference ``(x, y)`` of the points.
    phases : (n_frames, m, 2) ndarray
        ``(x, y)`` phases in ``[0, 1)``; NaN where ``P`` is outside the frame.
    """
    ny, nx = frame_shape
    fx = np.linspace(0.1, 0.9, n_points)
    px, py = np.meshgrid(fx * (nx - 1), fx * (ny - 1))
    px, py = px.ravel(), py.ravel()
    phases = np.full((len(mappings), len(px), 2), np.nan)
    for k, mapping in enumerate(mappings):
        xf, yf = mapping.inverse(px, py)
        inside = np.isfinite(xf) & np.isfinite(yf) & (xf >= 0) & (xf <= nx - 1) & (yf >= 0) & (yf <= ny - 1)
        xr, yr = mapping.forward(np.round(np.where(inside, xf, 0.0)), np.round(np.where(inside, yf, 0.0)))
        ph = np.mod(np.stack([xr, yr], axis=-1), 1.0)
        ph[ph >= 1.0] = 0.0
        ph[~inside] = np.nan
        phases[k] = ph
    return np.column_stack([px, py]), phases


def phase_occupancy(phases, n: int, n_offsets: int = 8) -> float:
    """Fraction of an ``n x n`` sub-pixel grid holding at least one of the (finite)
    ``phases``, the smallest over ``n_offsets**2`` positions of the grid within a cell
    (as :func:`drizzlestack.report.phase_occupancy`, vectorized over the positions: a
    fixed grid would count 0.49 and 0.51 as spread)."""
    p = np.asarray(phases, dtype=np.float64).reshape(-1, 2)
    p = p[np.all(np.isfinite(p), axis=1)]
    if len(p) == 0:
        return 0.0
    steps = np.arange(n_offsets) / (n_offsets * n)
    cx = np.floor(np.mod(p[None, :, 0] - steps[:, None], 1.0) * n).astype(np.intp) % n
    cy = np.floor(np.mod(p[None, :, 1] - steps[:, None], 1.0) * n).astype(np.intp) % n
    ids = np.sort((cx[:, None, :] * n + cy[None, :, :]).reshape(n_offsets * n_offsets, -1), axis=1)
    counts = 1 + np.count_nonzero(np.diff(ids, axis=1), axis=1)
    return float(counts.min()) / (n * n)


def random_occupancy(n_frames: int, n: int, trials: int = 32) -> float:
    """Mean :func:`phase_occupancy` of ``n_frames`` uniformly random phases (a fixed seed:
    the same answer every time), the yardstick for a measured occupancy."""
    rng = np.random.default_rng(0)
    return float(np.mean([phase_occupancy(rng.uniform(size=(n_frames, 2)), n) for _ in range(trials)]))


def _circular_std(p: np.ndarray) -> float:
    """Circular standard deviation (in pixels) of phases ``p`` in [0, 1)."""
    p = p[np.isfinite(p)]
    if len(p) < 2:
        return 0.0
    r = abs(np.mean(np.exp(2j * np.pi * p)))
    return float(math.sqrt(-2.0 * math.log(max(r, 1e-12))) / (2 * math.pi))


def dither_summary(mappings, frame_shape, scales=(2, 3)) -> dict:
    """How the frames' sub-pixel phases fill the ``s x s`` cells across the field.

    Returns a dict: ``occupancy`` {s: median over the field points of the fraction of the
    ``s x s`` cells holding at least one frame's phase}, ``occupancy_min`` {s: the
    worst point}, ``random_occupancy`` {s: what as many uniformly random phases fill on
    average, measured the same way}, ``phase_std`` (median over the points of the larger
    circular standard deviation of the x and y phases, px), ``clustered`` (the phases
    coincide: whole-pixel or no dither), ``max_offset`` (largest displacement of a frame
    centre from the reference, px) and ``n_points``.
    """
    points, phases = field_phases(mappings, frame_shape)
    n = len(mappings)
    occ, occ_min = {}, {}
    for s in scales:
        k = int(math.ceil(s - 1e-9))
        values = [phase_occupancy(phases[:, j], k) for j in range(len(points))
                  if np.isfinite(phases[:, j, 0]).sum() >= 1]
        occ[s] = float(np.median(values)) if values else 0.0
        occ_min[s] = float(np.min(values)) if values else 0.0
    stds = [max(_circular_std(phases[:, j, 0]), _circular_std(phases[:, j, 1])) for j in range(len(points))]
    phase_std = float(np.median(stds))
    ny, nx = frame_shape
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    offsets = [math.hypot(*(np.array([v[0] for v in m.forward(np.array([cx]), np.array([cy]))]) - (cx, cy)))
               for m in mappings]
    return {"occupancy": occ, "occupancy_min": occ_min,
            "random_occupancy": {s: random_occupancy(n, int(math.ceil(s - 1e-9))) for s in scales},
            "phase_std": phase_std, "clustered": bool(n > 1 and phase_std < CLUSTERED_PHASE_STD),
            "max_offset": float(max(offsets)) if offsets else 0.0, "n_points": len(points)}


# ------------------------------------------------------------------------ dry pixels
def sample_boxes(frame_shape, n_boxes: int = 25, size: float = 5.0, seed: int = 0):
    """Reference-pixel boxes ``(x0, y0, width, height)`` drizzled to predict dry pixels:
    ``n_boxes`` small squares at quasi-random places between 8 % and 92 % of the field
    (a 2-D Halton sequence, the same every time). With rotation between frames the
    weight pattern is a moire whose period changes across the field: many small boxes
    sample it better than a few large ones at the same cost, and places on a regular
    grid could fall in step with it."""
    ny, nx = frame_shape
    size = float(min(size, nx / 4, ny / 4))

    def halton(i, base):
        f, r = 1.0, 0.0
        while i > 0:
            f /= base
            r += f * (i % base)
            i //= base
        return r

    boxes = []
    for i in range(1 + seed, n_boxes + 1 + seed):
        fx, fy = 0.08 + 0.84 * halton(i, 2), 0.08 + 0.84 * halton(i, 3)
        boxes.append((float(np.floor(fx * nx - size / 2)), float(np.floor(fy * ny - size / 2)), size, size))
    return boxes


def predict_weights(mappings, frame_weights, frame_shape, scale: float, pixfracs, kernel: str = "square",
                    boxes=None, cfa_pattern: str = "", channel_weights=None) -> dict:
    """Drizzle the weights alone (data 1, no rejection) on small sample boxes.

    For every box and frame this is what the drizzle driver does for a tile (the input
    window padded by the kernel's reach, the pixmap through the frame's whole mapping,
    its ``pixel_scale_ratio``, the same numba kernel), without reading a pixel of the
    frames; the weights of the boxes' output pixels are exactly those of a full drizzle
    without rejection. Output pixels are counted when their centre lies at least one
    pixel inside at least one frame: pixels outside every frame are outside the drizzle,
    not dry.

    A colour store (``cfa_pattern``) is drizzled as the driver does it: every window
    gets its channel index (:func:`drizzlestack.cfa.channel_index` at the window's
    origin) and each sample drops only into its own channel, so each channel is its own
    lattice (red and blue a quarter of the samples, green half); ``channel_weights``
    ``(n_frames, 3)`` are a per-channel integration's weights.

    Returns
    -------
    dict
        ``{pixfrac: {"dry_fraction", "weight_rms", "pixels"}}``: the fraction of counted
        output pixels that received no weight, the rms / median of the weights of the
        others, and how many were counted. Colour: ``dry_fraction`` is the worst
        channel's and ``weight_rms`` that of all samples together (the luminance's: red
        and blue each cover a quarter of the output per frame, so their own weight maps
        have an rms of about ``sqrt(3 / n_frames)`` even at pixfrac 1 and could never pass
        :data:`MAX_WEIGHT_RMS` below ~75 frames); ``dry_fraction_rgb`` and
        ``weight_rms_rgb`` give each channel's ``{"R", "G", "B"}``.
    """
    from . import cfa as _cfa
    from .drizzle import array as _array
    from .drizzle import kernels as _kernels
    from .drizzle.driver import _kernel_pad, _mapping_scale

    grid = OutputGrid.from_reference(frame_shape, scale)
    boxes = boxes if boxes is not None else sample_boxes(frame_shape)
    ny_f, nx_f = frame_shape
    psrs = [_mapping_scale(m, grid.ref_to_out, frame_shape) for m in mappings]
    pad = max(_kernel_pad(kernel, 1.0, psr) for psr in psrs)
    out_boxes = []
    for bx, by, bw, bh in boxes:
        ox0, oy0 = int(round(scale * bx)), int(round(scale * by))
        ox1, oy1 = int(round(scale * (bx + bw))), int(round(scale * (by + bh)))
        if ox1 > ox0 and oy1 > oy0:
            out_boxes.append((ox0, oy0, ox1, oy1))
    # Every box's output pixel centres and edge points in reference coordinates, mapped
    # into each frame in one call per frame (not one per box: this is what keeps it cheap).
    out_to_ref = np.linalg.inv(grid.ref_to_out)
    centres = [np.mgrid[oy0:oy1, ox0:ox1].astype(np.float64) for ox0, oy0, ox1, oy1 in out_boxes]
    cx = np.concatenate([c[1].ravel() for c in centres])
    cy = np.concatenate([c[0].ravel() for c in centres])
    t = np.linspace(0.0, 1.0, 3)
    ex, ey = [], []
    for ox0, oy0, ox1, oy1 in out_boxes:
        x0, y0, x1, y1 = ox0 - 0.5, oy0 - 0.5, ox1 - 0.5, oy1 - 0.5
        ex.append(np.concatenate([x0 + (x1 - x0) * t, np.full(3, x1), x1 - (x1 - x0) * t, np.full(3, x0)]))
        ey.append(np.concatenate([np.full(3, y0), y0 + (y1 - y0) * t, np.full(3, y1), y1 - (y1 - y0) * t]))
    ex, ey = np.array(ex), np.array(ey)
    crx, cry = apply_homography(out_to_ref, cx, cy)
    erx, ery = apply_homography(out_to_ref, ex, ey)
    counted = np.zeros(cx.size, dtype=bool)
    lead = (len(_cfa.CHANNELS),) if cfa_pattern else ()
    nplanes = lead[0] if lead else 1
    sums = {p: [np.zeros(lead + (oy1 - oy0, ox1 - ox0)) for ox0, oy0, ox1, oy1 in out_boxes] for p in pixfracs}
    scratch = [np.zeros(lead + (oy1 - oy0, ox1 - ox0)) for ox0, oy0, ox1, oy1 in out_boxes]
    if channel_weights is None:
        channel_weights = [None] * len(mappings)
    touched = np.zeros((1, 1), dtype=np.uint8)
    to_tiles = [translation(-ox0, -oy0) @ grid.ref_to_out for ox0, oy0, _, _ in out_boxes]
    arrays: dict[tuple, tuple] = {}  # (ones, weights) by window shape and weight, reused
    max_extent = max(64.0, 16.0 * scale)
    for mapping, w, cw, psr in zip(mappings, frame_weights, channel_weights, psrs):
        xf, yf = mapping.inverse(crx, cry)
        counted |= (xf >= 0.5) & (xf <= nx_f - 1.5) & (yf >= 0.5) & (yf <= ny_f - 1.5)
        wx, wy = mapping.inverse(erx, ery)
        with np.errstate(invalid="ignore"):
            ok = np.all(np.isfinite(wx), axis=1) & np.all(np.isfinite(wy), axis=1)
            wx, wy = np.where(ok[:, None], wx, 0.0), np.where(ok[:, None], wy, 0.0)
            xa = np.maximum(np.floor(np.min(wx, axis=1) - pad + 0.5), 0).astype(np.intp)
            xb = np.minimum(np.ceil(np.max(wx, axis=1) + pad + 0.5), nx_f).astype(np.intp)
            ya = np.maximum(np.floor(np.min(wy, axis=1) - pad + 0.5), 0).astype(np.intp)
            yb = np.minimum(np.ceil(np.max(wy, axis=1) + pad + 0.5), ny_f).astype(np.intp)
        ok &= (xb - xa >= 2) & (yb - ya >= 2)  # outside this frame, or a sliver the square kernel cannot use
        for b in np.flatnonzero(ok):
            wshape = (int(yb[b] - ya[b]), int(xb[b] - xa[b]))
            if mapping.is_homography:
                pixmap = np.empty(wshape + (2,))
                _kernels.homography_grid(to_tiles[b] @ mapping.matrix, int(ya[b]), int(xa[b]), *wshape, pixmap)
            else:
                gy, gx = np.mgrid[ya[b]:yb[b], xa[b]:xb[b]]
                ref = mapping.forward(gx.astype(np.float64), gy.astype(np.float64))
                pixmap = np.ascontiguousarray(np.stack(apply_homography(to_tiles[b], *ref), axis=-1))
            # colour: the window's channel index depends only on its origin's parities
            key = wshape + ((int(ya[b]) % 2, int(xa[b]) % 2) if cfa_pattern else ()) \
                + (float(w),) + (tuple(float(v) for v in cw) if cw is not None else ())
            if key not in arrays:
                chan = _cfa.channel_index(cfa_pattern, wshape, int(ya[b]), int(xa[b])) if cfa_pattern else None
                weights = (np.asarray(cw, np.float64)[chan] if cfa_pattern and cw is not None
                           else np.full(wshape, float(w)))
                arrays[key] = (np.ones(wshape), weights, chan)
            ones, weights, chan = arrays[key]
            for p in pixfracs:
                if kernel == "square":
                    # The kernel itself: accumulate()'s checks cost more than these tiny windows.
                    flat = [a.reshape(-1, a.shape[-1]) for a in (scratch[b], sums[p][b])]
                    _kernels.square_kernel(ones, pixmap, weights, True, float(p), max_extent, *flat, touched,
                                           False, _array._NO_CHANNEL if chan is None else chan, nplanes,
                                           _array._as_channel_shift(None, nplanes))
                else:
                    _array.accumulate(ones, pixmap, weights, scratch[b], sums[p][b], kernel=kernel, pixfrac=p,
                                      pixel_scale_ratio=psr, channel=chan)
    n_counted = int(counted.sum())
    out = {}

    def stats(plane):
        w = np.concatenate([plane(a).ravel() for a in sums[p]])[counted] if out_boxes else np.empty(0)
        wet = w[w > 0]
        med = float(np.median(wet)) if wet.size else float("nan")
        return (float((w <= 0).mean()) if w.size else float("nan"),
                float(np.std(wet) / med) if wet.size and med > 0 else float("nan"))

    for p in pixfracs:
        dry, rms = stats((lambda a: a.sum(axis=0)) if cfa_pattern else (lambda a: a))
        out[p] = {"dry_fraction": dry, "weight_rms": rms, "pixels": n_counted}
        if cfa_pattern:
            per_channel = [stats(lambda a, c=c: a[c]) for c in range(nplanes)]
            out[p]["dry_fraction"] = max(v[0] for v in per_channel)
            out[p]["dry_fraction_rgb"] = dict(zip(_cfa.CHANNELS, (v[0] for v in per_channel)))
            out[p]["weight_rms_rgb"] = dict(zip(_cfa.CHANNELS, (v[1] for v in per_channel)))
    return out


# ------------------------------------------------------------------------------- cost
def noise_correlation_ratio(scale: float, pixfrac: float) -> float:
    """Fruchter & Hook (2002, PASP 114, 144, Sect. 3) noise-correlation ratio ``R`` of
    the square kernel: the true noise of a drizzled pixel over the noise its
    pixel-to-pixel rms suggests (multiply rms-based errors by ``R``).

    It holds for a stack of frames at random sub-pixel phases (tested against drizzled
    white noise); a single frame's ratio depends on its phase.

    With ``r = pixfrac / s_FH`` the drop size in output pixels (their ``s`` is the output
    pixel size in input pixels, ``1 / scale`` here, so ``r = pixfrac * scale``)::

        R = r / (1 - 1 / (3 r))   for r >= 1
        R = 1 / (1 - r / 3)       for r <  1
    """
    r = float(pixfrac) * float(scale)
    if r <= 0:
        return 1.0
    return r / (1.0 - 1.0 / (3.0 * r)) if r >= 1.0 else 1.0 / (1.0 - r / 3.0)


def expected_fwhm(fwhm: float, scale: float, pixfrac: float) -> tuple[float, float]:
    """Expected FWHM (reference pixels) of a star in the integration and in the drizzle.

    Second moments add under convolution. ``fwhm`` is the optical PSF (the fits exclude
    the pixel). A frame adds its pixel's box (variance 1/12 px^2); averaged over the
    frames' random sub-pixel phases, sampling and interpolating with a kernel is a
    convolution with that kernel, and Lanczos-3's second moment is 0, so the
    integration's stars have ``sigma^2 = sigma_psf^2 + 1/12``. Drizzle convolves in
    addition with the drop (``pixfrac^2 / 12``) and averages over the output pixel
    (``1 / (12 scale^2)``). Drizzle therefore never makes stars narrower than an ideal
    interpolation would; on undersampled frames it gains the *sampling* (more output
    pixels across the FWHM, no aliasing), and the interpolated integration of
    undersampled frames is in practice wider than this ideal figure.
    """
    var = (fwhm / _SIGMA_TO_FWHM) ** 2 + 1.0 / 12.0
    var_d = var + pixfrac ** 2 / 12.0 + 1.0 / (12.0 * scale ** 2)
    return _SIGMA_TO_FWHM * math.sqrt(var), _SIGMA_TO_FWHM * math.sqrt(var_d)


# ------------------------------------------------------------------------ the advisor
#: the store variables the advisor reads (a few kB per frame; never the frames)
_VARIABLES = ("transform", "status", "stars", "field", "weight", "cfa_pattern")


def _registration_dataset(st: StackStore):
    """The registration's small variables as an in-memory Dataset, read straight from
    zarr: :func:`~drizzlestack.store.open_stack` builds a dask graph for every variable
    and loads every header, which costs more than the whole prediction."""
    import xarray as xr

    n = st.n_frames
    variables = {}
    for name, arr in st.group.arrays():
        if name not in _VARIABLES and not name.startswith("distortion"):
            continue
        dims = tuple(arr.metadata.dimension_names or (f"{name}_dim{i}" for i in range(arr.ndim)))
        data = np.asarray(arr[...])
        if arr.dtype.kind in "UOT" or str(arr.dtype).startswith("StringDType"):
            data = data.astype(object)
        if dims and dims[0] == "frame" and data.shape[0] != n:
            data = data[:n]  # rows of an append that never committed
        variables[name] = xr.Variable(dims, data, attrs=dict(arr.attrs))
    stack = xr.Dataset(variables, attrs=dict(st.group.attrs))
    return stack.assign_coords(frame=np.arange(n))


def _registered(store, frames, distortion):
    """(stack, frame indices, mappings, frame weights) of a registered store."""
    from .drizzle.driver import _frame_values
    from .mappings import frame_mapping
    from .tiled import require_registration, select_frames

    st = StackStore.open(store, mode="r")
    require_registration(st)
    stack = _registration_dataset(st)
    indices, _ = select_frames(st, frames, refuse_unregistered=True, step="drizzle", stacklevel=3)
    mappings = [frame_mapping(stack, i, distortion=distortion) for i in indices]
    weights = _frame_values(stack, "weight", indices, 1.0)
    weights = np.where(weights > 0, weights, 0.0)
    return stack, indices, mappings, weights


def _colour(stack, indices) -> tuple[str, np.ndarray | None]:
    """The store's Bayer pattern (``""``: grey) and the per-channel frame weights
    ``(n, 3)`` of a per-channel integration (``None`` without one), as drizzle uses them."""
    from .drizzle.driver import _channel_values

    patterns = {str(p) for p in np.asarray(stack["cfa_pattern"].values).ravel()} - {""} \
        if "cfa_pattern" in stack else set()
    if not patterns:
        return "", None
    pattern = sorted(patterns)[0]  # one pattern per store (ingest refuses a change)
    weights = _channel_values(stack, "weight", indices, 0.0)
    return pattern, None if weights is None else np.where(weights > 0, weights, 0.0)


def _passes(pred) -> bool:
    return pred["dry_fraction"] <= MAX_DRY_FRACTION and pred["weight_rms"] <= MAX_WEIGHT_RMS


def advise(store, scale: float | None = None, pixfrac: float | None = None, kernel: str = "square",
           frames=None, distortion: bool = True) -> dict:
    """Tell whether drizzle helps the frames of a registered store, and how to set it.

    Rule for the recommendation: the **largest useful scale** (3, else 2), a scale ``s``
    being useful while the stars would still be under
    :data:`WELL_SAMPLED_OUTPUT_FWHM` output pixels wide at scale ``s - 1`` and, above 2,
    while the dither fills at least half of the ``s x s`` sub-pixel cells; at that scale
    the **smallest pixfrac** of 1.0, 0.9, ..., 0.3 whose predicted dry fraction is at
    most :data:`MAX_DRY_FRACTION` (1 %) and weight-map rms at most
    :data:`MAX_WEIGHT_RMS` of its median (colour: the dry fraction of the worst channel,
    the weight rms of all samples together, see :func:`predict_weights`). A scale where
    no pixfrac passes falls back to
    the next smaller one; scale 2 with pixfrac 1 is the last resort, and the advice when
    drizzle cannot gain (a finer-grid copy of the integration). ``drizzle_helps`` is
    true when the frames are undersampled (median FWHM < :data:`UNDERSAMPLED_FWHM`
    reference pixels), there are at least 4 frames and their sub-pixel phases are spread
    (not one cluster, at least half of the 2 x 2 cells filled).

    Parameters
    ----------
    store : path-like
        A stack store with a completed ``register`` step (no integration needed; its
        frame weights are used when present).
    scale, pixfrac : float, optional
        Fix the scale and/or pixfrac: the recommendation then keeps them, and the
        prediction is for them.
    kernel : str
        Drizzle kernel of the predictions (default ``square``).
    frames : sequence of int, optional
        Frame indices; default every frame with status ``ok`` and a registration.
    distortion : bool
        Use the registration's surface spline when it has one (as drizzle does).

    Returns
    -------
    dict
        JSON-ready: ``drizzle_helps`` (bool), ``scale``, ``pixfrac``, ``kernel``,
        ``predicted_dry_fraction`` and ``predicted_weight_rms`` (for the recommendation),
        ``fwhm`` (median, reference px), ``fwhm_per_frame``, ``undersampled``,
        ``n_frames``, ``dither`` (see :func:`dither_summary`), ``predictions`` (a list
        of ``{scale, pixfrac, dry_fraction, weight_rms, noise_correlation_R,
        noise_per_pixel_ratio}`` for the recommendation and scales 2 and 3 at pixfrac
        0.6-1.0), ``noise_correlation_R``, ``noise_per_pixel_ratio`` (rms of a drizzled
        pixel over the integration's, ``scale / R``), ``expected_fwhm_integration`` and
        ``expected_fwhm_drizzle`` (reference px, :func:`expected_fwhm`),
        ``sample_pixels`` and ``reasons`` (plain-English strings). Colour stores: the
        dry fractions are the worst channel's (the weight rms all samples'), with each
        channel's in
        ``predicted_dry_fraction_rgb`` and ``predicted_weight_rms_rgb`` (and
        ``dry_fraction_rgb``, ``weight_rms_rgb`` in each prediction), and ``cfa_pattern``.
    """
    from .drizzle.driver import _check_parameters

    if scale is not None or pixfrac is not None:
        _check_parameters(2.0 if scale is None else scale, 1.0 if pixfrac is None else pixfrac, kernel, 1024)
    stack, indices, mappings, weights = _registered(store, frames, distortion)
    pattern, channel_weights = _colour(stack, indices)
    frame_shape = tuple(int(v) for v in stack.attrs["frame_shape"])
    n = len(indices)
    fwhm, per_frame = measured_fwhm(stack, indices, mappings) if "stars" in stack else (float("nan"), None)
    reasons = []

    # ---- sampling
    limit = _undersampled_limit(stack)
    undersampled = bool(np.isfinite(fwhm) and fwhm < limit)
    if limit != UNDERSAMPLED_FWHM:
        reasons.append(f"Colour (Bayer) frames: each colour is sampled every 2 pixels, so stars under ~{limit:g} px "
                       "are undersampled in every channel. The dry-pixel predictions are per channel (each "
                       "colour's samples are their own lattice: red and blue a quarter of the pixels, green half) "
                       "and the recommendation is judged on the worst channel; the weight-map rms on all samples "
                       "together (red's and blue's own maps stay uneven, about sqrt(3 / frames), whatever the "
                       "pixfrac).")
    if np.isfinite(fwhm):
        # What most tools report: the fits exclude the pixel, a plain Gaussian fit includes it.
        with_pixel = _SIGMA_TO_FWHM * math.sqrt((fwhm / _SIGMA_TO_FWHM) ** 2 + 1.0 / 12.0)
        reasons.append(f"Measured on the registration's star fits: the optical FWHM is {fwhm:.2f} reference px "
                       f"({with_pixel:.2f} px with the pixel's own width, as most tools measure it).")
    if not np.isfinite(fwhm):
        reasons.append("No star FWHM was measured: the sampling is unknown.")
    elif undersampled:
        near = " (close to critical sampling: drizzle gains a little)" if fwhm >= 0.85 * limit else ""
        reasons.append(f"The stars are {fwhm:.2f} px wide (median FWHM in reference pixels): the frames are "
                       f"undersampled{near}, so drizzle can recover detail that an integration loses.")
    elif fwhm < WELL_SAMPLED_OUTPUT_FWHM:
        reasons.append(f"The stars are {fwhm:.2f} px wide (median FWHM): borderline, at about critical sampling "
                       f"(~{UNDERSAMPLED_FWHM:g} px); the integration already holds nearly all the detail and "
                       "drizzle would gain little.")
    else:
        reasons.append(f"The stars are {fwhm:.2f} px wide (median FWHM): the frames are well sampled, so the "
                       "integration already holds all the detail; drizzle cannot gain resolution.")

    # ---- dither
    dither = dither_summary(mappings, frame_shape)
    spline = any(not m.is_homography for m in mappings)
    model = "the whole registration model (homography and surface spline)" if spline else "the registration"
    if n < 2:
        dithered = False
        reasons.append("Only one frame: drizzle has nothing to interleave.")
    elif dither["clustered"]:
        dithered = False
        if dither["max_offset"] < 0.5:
            reasons.append(f"No dithering: every frame is within {dither['max_offset']:.2f} px of the reference, "
                           "so all frames sample the same points of the sky; dither by a few non-integer pixels "
                           "between frames.")
        else:
            reasons.append(f"Whole-pixel dithering: the frames moved by up to {dither['max_offset']:.1f} px, but "
                           f"their sub-pixel phases coincide (spread {dither['phase_std']:.3f} px after {model}), "
                           "so they sample the same points of the sky; dither by non-integer offsets.")
    else:
        occ2, rnd2 = dither["occupancy"][2], dither["random_occupancy"][2]
        dithered = occ2 >= 0.5
        reasons.append(f"Dither: after {model} the frames' sub-pixel phases fill {occ2:.0%} of the 2x2 and "
                       f"{dither['occupancy'][3]:.0%} of the 3x3 sub-pixel cells (median over "
                       f"{dither['n_points']} points across the field; {n} random phases would fill "
                       f"{rnd2:.0%} and {dither['random_occupancy'][3]:.0%}).")
        if not dithered:
            reasons.append("The phases cluster in a few cells: the frames sample nearly the same points of the sky.")
    if 1 < n < 4:
        reasons.append(f"Only {n} frames: at least 4 are needed to fill a 2x2 sub-pixel grid.")
    helps = bool(undersampled and dithered and n >= 4)

    # ---- candidate settings
    if scale is not None:
        scales = [float(scale)]
    else:
        scales = [2.0]
        if np.isfinite(fwhm) and fwhm * 2 < WELL_SAMPLED_OUTPUT_FWHM and dither["occupancy"][3] >= 0.5 and n >= 9:
            scales = [3.0, 2.0]
    table_scales = sorted(set(SCALES) | set(scales))
    preds: dict[tuple[float, float], dict] = {}

    def predict(s, pfs):
        todo = [p for p in pfs if (s, p) not in preds]
        if todo:
            for p, v in predict_weights(mappings, weights, frame_shape, s, todo, kernel, cfa_pattern=pattern,
                                        channel_weights=channel_weights).items():
                preds[(s, p)] = v

    for s in table_scales:
        predict(s, PIXFRACS + ((float(pixfrac),) if pixfrac is not None else ()))
    chosen = None
    if not helps:
        # Nothing to gain: the least risky drizzle (a finer-grid integration, no dry
        # pixels, the least noise pattern), for whoever drizzles anyway.
        scales = [scales[-1]]
        chosen = (scales[-1], float(pixfrac) if pixfrac is not None else 1.0)
    for s in scales if chosen is None else ():
        if pixfrac is not None:
            chosen = (s, float(pixfrac))
            break
        passing = [p for p in PIXFRACS if _passes(preds[(s, p)])]
        if not passing:
            continue
        best = min(passing)
        if best == min(PIXFRACS):
            for p in SMALL_PIXFRACS:  # descending: stop at the first that fails
                predict(s, (p,))
                if not _passes(preds[(s, p)]):
                    break
                best = p
        chosen = (s, best)
        break
    if chosen is None:
        chosen = (scales[-1], 1.0)
        reasons.append(f"Even pixfrac 1 leaves more than {MAX_DRY_FRACTION:.0%} dry pixels or an uneven weight map "
                       f"at scale {scales[-1]:g}: more frames are needed for a drizzle.")
    s, p = chosen
    pred = preds[(s, p)]
    R = noise_correlation_ratio(s, p)
    fwhm_int, fwhm_drz = expected_fwhm(fwhm, s, p) if np.isfinite(fwhm) else (float("nan"), float("nan"))
    worst = " in the worst channel" if pattern else ""
    reasons.append(f"Recommended: scale {s:g}, pixfrac {p:g} ({kernel} kernel): predicted {pred['dry_fraction']:.2%} "
                   f"dry pixels{worst} and a weight map with rms {pred['weight_rms']:.0%} of its median (from "
                   f"drizzling the weights of the {n} frames on {pred['pixels']} sample output pixels)."
                   + (f" Per channel: dry {_per_channel(pred['dry_fraction_rgb'], '.2%')}, weight rms "
                      f"{_per_channel(pred['weight_rms_rgb'], '.0%')}." if pattern else ""))
    if pred["dry_fraction"] > MAX_DRY_FRACTION:
        reasons.append(f"Scale {s:g} with pixfrac {p:g} leaves {pred['dry_fraction']:.1%} of the output dry{worst} "
                       "(no data): use a larger pixfrac, a smaller scale or more frames.")
    reasons.append(f"Cost: each drizzled pixel's noise is {s / R:.2f}x the integration's per pixel (flux is "
                   f"conserved: binned back to the reference pixels the noise is the integration's), and the noise "
                   f"is correlated between neighbours: errors estimated from the pixel-to-pixel rms must be "
                   f"multiplied by R = {R:.2f} (Fruchter & Hook 2002).")
    if np.isfinite(fwhm):
        reasons.append(f"Expected FWHM: {fwhm_int:.2f} px in the integration (ideal interpolation), {fwhm_drz:.2f} "
                       f"reference px = {fwhm_drz * s:.1f} output px in the drizzle: drizzle widens stars by the "
                       "drop and the output pixel; what it gains on undersampled frames is sampling, not width.")
    if not helps:
        reasons.append("Verdict: drizzle will not gain over the integration for these frames; use the integration "
                       f"(scale {s:g}, pixfrac {p:g} is the safest drizzle if you drizzle anyway).")
    else:
        reasons.append(f"Verdict: drizzle helps; drizzle at scale {s:g}, pixfrac {p:g}.")

    predictions = []
    for (ps, pp), v in sorted(preds.items()):
        if ps in SCALES and pp in PIXFRACS or (ps, pp) == chosen:
            r = noise_correlation_ratio(ps, pp)
            predictions.append({"scale": ps, "pixfrac": pp, "dry_fraction": v["dry_fraction"],
                                "weight_rms": v["weight_rms"], "noise_correlation_R": r,
                                "noise_per_pixel_ratio": ps / r})
            if pattern:
                predictions[-1].update(dry_fraction_rgb=v["dry_fraction_rgb"], weight_rms_rgb=v["weight_rms_rgb"])
    return {
        "drizzle_helps": helps, "scale": s, "pixfrac": p, "kernel": kernel,
        "predicted_dry_fraction": pred["dry_fraction"], "predicted_weight_rms": pred["weight_rms"],
        **({"cfa_pattern": pattern, "predicted_dry_fraction_rgb": pred["dry_fraction_rgb"],
            "predicted_weight_rms_rgb": pred["weight_rms_rgb"]} if pattern else {}),
        "fwhm": fwhm, "fwhm_per_frame": [float(v) for v in per_frame] if per_frame is not None else [],
        "undersampled": undersampled, "n_frames": n, "frames": [int(i) for i in indices],
        "dither": _jsonable(dither), "distortion_model": spline,
        "noise_correlation_R": R, "noise_per_pixel_ratio": s / R,
        "expected_fwhm_integration": fwhm_int, "expected_fwhm_drizzle": fwhm_drz,
        "predictions": predictions, "sample_pixels": pred["pixels"], "reasons": reasons,
    }


def _per_channel(values: dict, fmt: str) -> str:
    return ", ".join(f"{c} {v:{fmt}}" for c, v in values.items())


def _jsonable(d: dict) -> dict:
    return {k: ({f"{kk:g}": vv for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in d.items()}


def _undersampled_limit(stack) -> float:
    """The FWHM below which the frames are undersampled: twice as wide for a colour
    mosaic, whose every channel is sampled every 2 pixels."""
    if "cfa_pattern" in stack and any(str(p) for p in np.asarray(stack["cfa_pattern"].values).ravel()):
        return 2.0 * UNDERSAMPLED_FWHM
    return UNDERSAMPLED_FWHM


def drizzle_warnings(store, scale: float, pixfrac: float, kernel: str = "square", frames=None,
                     distortion: bool = True) -> list[str]:
    """Why a drizzle with these settings would disappoint (empty when it will not): more
    than 1 % predicted dry pixels, well-sampled frames, or no sub-pixel dither.

    Cheap (one setting's sample boxes, the star table, the phases); used by
    ``drizzlestack drizzle`` and ``drizzlestack run`` before they drizzle.
    """
    if kernel.startswith("lanczos"):
        pixfrac = 1.0
    stack, indices, mappings, weights = _registered(store, frames, distortion)
    pattern, channel_weights = _colour(stack, indices)
    frame_shape = tuple(int(v) for v in stack.attrs["frame_shape"])
    out = []
    pred = predict_weights(mappings, weights, frame_shape, float(scale), [float(pixfrac)], kernel,
                           cfa_pattern=pattern, channel_weights=channel_weights)[float(pixfrac)]
    if pred["dry_fraction"] > MAX_DRY_FRACTION:
        # (worded as the drizzle's own per-channel warning: "dry fraction")
        where = (f" in the worst colour channel (predicted dry fraction per channel: "
                 f"{_per_channel(pred['dry_fraction_rgb'], '.1%')}; each colour has only its own samples)"
                 if pattern else "")
        out.append(f"{store}: scale {scale:g} with pixfrac {pixfrac:g} is predicted to leave "
                   f"{pred['dry_fraction']:.1%} of the output pixels dry (no data){where}; use a larger pixfrac, a "
                   f"smaller scale or more frames ('drizzlestack advise {store}')")
    fwhm = measured_fwhm(stack, indices, mappings)[0] if "stars" in stack else float("nan")
    if np.isfinite(fwhm) and fwhm >= _undersampled_limit(stack):
        out.append(f"{store}: the stars are {fwhm:.2f} px wide (median FWHM): the frames are not undersampled, "
                   "so drizzle cannot gain resolution over the integration")
    if len(indices) > 1 and dither_summary(mappings, frame_shape, scales=(2,))["clustered"]:
        out.append(f"{store}: the frames' sub-pixel phases coincide (whole-pixel or no dithering), so drizzle "
                   "cannot gain resolution over the integration")
    return out


def warn_drizzle_settings(store, scale, pixfrac, kernel="square", frames=None, distortion=True,
                          stacklevel: int = 2) -> None:
    """Issue :func:`drizzle_warnings` as DrizzlestackWarning (nothing when the store
    cannot be judged: drizzle itself reports why)."""
    try:
        messages = drizzle_warnings(store, scale, pixfrac, kernel, frames, distortion)
    except DrizzlestackError:
        return
    for message in messages:
        warnings.warn(message, DrizzlestackWarning, stacklevel=stacklevel + 1)


def advice_json(advice: dict) -> str:
    """The advice as one JSON object (NaN, meaning "not measured", becomes null)."""
    import json

    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (float, np.floating)):
            return float(v) if math.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, np.bool_):
            return bool(v)
        return v

    return json.dumps(clean(advice), indent=1, allow_nan=False)


def format_advice(advice: dict) -> str:
    """The advice as text for the terminal."""
    lines = [f"drizzle helps: {'yes' if advice['drizzle_helps'] else 'no'}",
             f"recommended:   scale {advice['scale']:g}, pixfrac {advice['pixfrac']:g} ({advice['kernel']}), "
             f"predicted dry pixels {advice['predicted_dry_fraction']:.2%}, weight rms "
             f"{advice['predicted_weight_rms']:.0%}",
             f"median FWHM:   {advice['fwhm']:.2f} reference px ({advice['n_frames']} frames)", ""]
    lines += [f"- {r}" for r in advice["reasons"]]
    colour = "predicted_dry_fraction_rgb" in advice
    lines += ["", "scale  pixfrac  dry[%]  weight rms[%]  R     noise/pixel"
              + ("  dry R/G/B[%]        weight rms R/G/B[%]" if colour else "")]
    for p in advice["predictions"]:
        line = (f"{p['scale']:<5g}  {p['pixfrac']:<7g}  {100 * p['dry_fraction']:6.2f}  "
                f"{100 * p['weight_rms']:13.1f}  {p['noise_correlation_R']:4.2f}  {p['noise_per_pixel_ratio']:<11.2f}")
        if colour:
            line += ("  " + "/".join(f"{100 * v:.2f}" for v in p["dry_fraction_rgb"].values()).ljust(18)
                     + "  " + "/".join(f"{100 * v:.1f}" for v in p["weight_rms_rgb"].values()))
        lines.append(line.rstrip())
    return "\n".join(lines)
