"""Step 3, integrate: statistics, normalization and weights, outlier flags in each
frame's own pixels, and the integrated image, written tile by tile.

The step runs as Dask tasks on the active scheduler, in passes:

1. **Per frame** (:mod:`.measure`, one task per frame): robust statistics of the
   unresampled frame and forced aperture photometry at the reference stars mapped into
   it; from these, each frame's normalization ``v * norm_scale + norm_offset`` and
   weight (:mod:`.normalize`).
2. **The model** (one task per reference-grid tile, every frame at once): each frame's
   tile resampled (:mod:`.resample`), normalized, the chosen rejection
   (:mod:`.rejection`) and the combine: a robust model of the sky, and the spread of the
   samples it kept.
3. **The outliers** (:func:`.outliers.flag_outliers`, one task per sensor tile, every
   frame at once): each raw pixel tested against the model blotted onto its frame; the
   flags drizzle uses.
4. **The integration** (reference-grid tiles again): the frames resampled with their
   flagged pixels as no data, combined. No star pixel is lost to interpolation. For
   grey full runs only the samples whose interpolation support holds a flagged pixel
   are resampled again, and patched into sums the model pass kept (:mod:`.patch`).

Each pass writes its tiles straight into the store (zarr region writes) and records
them in its own ledger, so an interrupted run resumes pass by pass; tasks return only
per-frame counts, and memory per task is ``tile**2 * frames`` samples (the tile shrinks
as frames are added so that it stays within ``task_memory``). With rejection ``none``
(or fewer than 3 frames) passes 2 and 3 are skipped: one pass, no outlier flags.

Saturation (star cores never black or hollow): saturated samples are kept with their
full weight and left out of the rejection statistics; the outlier test never flags a
saturated pixel. Where every frame is saturated the integration keeps the saturated
value.

Colour (Bayer) stores are integrated per channel: statistics on each colour's own
pixels, a normalization and weight per frame and colour (the photometric scale, grey,
from the whole mosaic), the registered view of one colour at a time
(:func:`drizzlestack.cfa.channel_planes`: star-sharp for the model, flux-conserving for
the image), each raw pixel tested against the model of its own colour; products get a leading ``channel`` axis (R, G, B), the outlier flags stay one
per raw pixel. A tile task runs the channels one after the other through the same
buffers, so its memory is that of a grey tile.

The FITS product (image, ``REJLOW``, ``REJHIGH``, ``WEIGHTS``) is streamed from the
store afterwards, a band of rows at a time (colour: 3 x H x W cubes).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import xarray as xr
from astropy.io import fits
from dask.utils import parse_bytes

from .. import cfa as _cfa
from .. import whitebalance as _wb
from .._version import __version__
from .._warnings import DrizzlestackError, DrizzlestackWarning
from ..io.fits import check_output_path
from ..channel_alignment import offsets_to_remove
from ..mappings import frame_mappings
from ..chunkio import DirectArray
from ..store import FRAME_CODEC, StackStore, open_stack, record_tile
from ..tiled import clip_roi, reference_wcs, require_registration, run_tiles, select_frames, start_or_resume
from . import normalize as _norm
from . import outliers as _out
from . import patch as _patch
from . import rejection as _rej
from .resample import _open_frames, resample_tile
from .measure import MAX_STATISTICS_PIXELS, measure_frames

#: per-frame variables written by a full run (``info`` shows several of them)
FRAME_VARIABLES = ("location", "scale", "scale_mad", "noise", "photometric_scale", "norm_scale", "norm_offset",
                   "weight", "rejected_low_fraction", "rejected_high_fraction")
#: image variables written by a full run, dims (y, x)
IMAGE_VARIABLES = ("integration", "rejected_low", "rejected_high", "integration_weight")
#: prefix of the image variables of a region-of-interest trial, dims (roi_y, roi_x)
ROI_PREFIX = "roi_"
#: the robust model the own-pixel outliers are tested against (reference grid, normalized)
MODEL_VARIABLE = "integration_model"
#: type and fill value of each tiled product
#: the spread (standard deviation) of the samples the model kept, per reference pixel
SPREAD_VARIABLE = "integration_spread"
_PRODUCTS = {"integration": ("float32", np.nan), "spread": ("float32", np.nan),
             "rejected_low": ("uint16", 0), "rejected_high": ("uint16", 0), "integration_weight": ("float32", 0.0),
             "base_sum": ("float64", 0.0), "base_weight": ("float64", 0.0), "base_kept": ("uint16", 0)}
#: rejection methods whose ``low``/``high`` are in units of a dispersion (sigma)
SIGMA_METHODS = ("sigma", "winsorized", "averaged", "linear")
#: a frame whose registration residual exceeds this (px) gets a proportionally wider
#: derivative tolerance in the outlier test
OUTLIER_RMS_TOLERANCE = 0.5

#: the final pass of a grey full run patches the model pass's sums (:mod:`.patch`);
#: False: it resamples every frame again (the reference the tests compare with)
PATCH_FINAL_PASS = True

#: rejection needs at least this many frames; fewer are averaged without rejection
MIN_FRAMES_FOR_REJECTION = 3
#: bytes of task memory per sample of a tile (resampled value, saturation mask, flags,
#: and the temporaries of the combine), used to size tiles from ``task_memory``
BYTES_PER_SAMPLE = 12
_REJECTION_OPTIONS = ("n_low", "n_high", "max_iterations", "esd_significance", "esd_outliers", "esd_low_relaxation")


# ----------------------------------------------------------------------------- pass 2
@dataclass
class TilePlan:
    """What a tile task needs (small and picklable; tasks open the store themselves)."""

    store: str
    indices: list  # frames taking part, in store order
    mappings: list  # their FrameMapping
    frame_shape: tuple
    origin: tuple  # (y0, x0) of the output on the reference grid
    shape: tuple  # output shape (ny, nx)
    tile: int
    raw_saturation: np.ndarray  # per frame, ADU (inf: no protection)
    norm_scale: np.ndarray  # float32 (frame, channel): one column for grey frames
    norm_offset: np.ndarray
    weights: np.ndarray  # float64 (frame, channel)
    rejection: _rej.RejectionParameters
    outputs: dict  # product -> store variable name
    flags_variable: str | None  # "rejection", or None (ROI trials and the model pass keep no flags)
    step: str = "integrate"  # whose tile ledger records finished tiles
    done: np.ndarray | None = None  # the ledger at the start: finite rows are finished tiles
    outliers: str | None = None  # own-pixel flags to mask before resampling (the final pass)
    cfa_pattern: str = ""  # colour store: products get a leading channel axis
    sky: np.ndarray | None = None  # colour: (frame, channel) background, raw ADU (the colour estimate's star test)
    noise: np.ndarray | None = None  # colour: (frame, channel) pixel noise, raw ADU
    sharp: bool = False  # colour: the star-sharp channel estimate (the model pass) or the flux-true one
    base: bool = False  # the model pass also keeps the plain combine's sums (:mod:`.patch`)
    patch: bool = False  # the final pass patches those sums instead of resampling again
    channel_offset: np.ndarray | None = None  # colour image: (3, 2) channels' offsets from green, removed

    @property
    def channels(self) -> tuple:
        """Channel indices to integrate: ``(None,)`` for grey frames, ``(0, 1, 2)`` for colour."""
        return tuple(range(len(_cfa.CHANNELS))) if self.cfa_pattern else (None,)


def _normalized_saturation(plan: TilePlan, c: int = 0) -> np.ndarray:
    # Computed with the same float32 operations as the samples, then lowered by a
    # relative 1e-6, so that a sample equal to the raw level always compares >=.
    raw = plan.raw_saturation.astype(np.float32)
    level = (raw * plan.norm_scale[:, c] + plan.norm_offset[:, c]).astype(np.float64)
    return np.where(np.isfinite(level), level - 1e-6 * np.abs(level), np.inf)


def integrate_tile(plan: TilePlan, iy: int, ix: int) -> np.ndarray:
    """Integrate one tile and write its products into the store (one Dask task).

    Returns
    -------
    (3 * n_frames + 1,) float64
        Per frame: samples flagged low, flagged high, valid samples; then the largest
        per-pixel weight sum of the tile (for the FITS ``WEIGHTS`` normalization).
    """
    t = plan.tile
    sy = slice(iy * t, min((iy + 1) * t, plan.shape[0]))
    sx = slice(ix * t, min((ix + 1) * t, plan.shape[1]))
    if plan.patch:
        row = _patch.patch_tile(plan, iy, ix, sy, sx, _normalized_saturation(plan))
        if row is not None:
            return row
    n = len(plan.indices)
    counts = np.zeros(3 * n + 1)
    shape = (n, sy.stop - sy.start, sx.stop - sx.start)
    projected = None
    if plan.outliers is not None:
        projected = np.zeros(shape, np.uint8)
    any_flags = np.zeros(shape, np.uint8) if plan.flags_variable is not None else None
    # Colour: every colour of a frame window estimated and resampled at once (one read,
    # one mapping), then each channel rejected and combined on its own.
    all_values, all_saturated = resample_tile(
        _open_frames(plan.store), plan.indices, plan.mappings, sy, sx, plan.frame_shape, plan.raw_saturation,
        plan.origin, outliers=None if projected is None else DirectArray(plan.store, plan.outliers),
        projected=projected, pattern=plan.cfa_pattern, sky=plan.sky, noise=plan.noise, sharp=plan.sharp,
        channel_offset=plan.channel_offset)
    for c in plan.channels:
        col = 0 if c is None else c
        values, saturated = (all_values, all_saturated) if c is None else (all_values[c], all_saturated[c])
        weights = plan.weights[:, col]
        saturation = _normalized_saturation(plan, col)
        products = {}
        scale, offset = plan.norm_scale[:, col], plan.norm_offset[:, col]
        if plan.rejection.method == "none":
            # The final pass (and no rejection): the flags are the ranges' and the outliers'.
            flags = None
        else:
            values *= scale[:, None, None]
            values += offset[:, None, None]
            scale = offset = None  # normalized already
            if plan.base:
                # The plain combine's sums, for the final pass to patch (:mod:`.patch`).
                *plain, plain_sums = _rej.combine_flagged(values, saturated, None, weights, saturation,
                                                          *plan.rejection.range_limits, sums=True)
                products.update(base_sum=plain_sums[0], base_weight=plain_sums[1], base_kept=plain_sums[2])
                base_flags = plain[4]
            flags = _rej.rejection_flags(values, plan.rejection, saturation=saturation)
        # Samples interpolated next to a saturated pixel are lower bounds too: never outliers.
        # The own-pixel flags are seen on the reference grid (a sample takes its nearest
        # input pixel's flag): what the rejection maps count.
        image, n_low, n_high, wsum, flags, frame_counts, spread = _rej.combine_flagged(
            values, saturated, projected, weights, saturation, *plan.rejection.range_limits, flags=flags,
            scale=scale, offset=offset, spread="spread" in plan.outputs)
        # Tiles are the products' chunks: written whole, encoded in this task's thread.
        at = (sy, sx) if c is None else (c, sy, sx)
        products.update(integration=image, rejected_low=n_low, rejected_high=n_high, integration_weight=wsum,
                        spread=spread)
        for key, value in products.items():
            if key in plan.outputs:
                DirectArray(plan.store, plan.outputs[key], "r+")[at] = value
        if any_flags is not None:
            any_flags |= base_flags if plan.base else flags
        counts[0:n] += frame_counts[0]
        counts[n:2 * n] += frame_counts[1]
        counts[2 * n:3 * n] += frame_counts[2]
        counts[3 * n] = max(counts[3 * n], float(wsum.max()) if wsum.size else 0.0)
    if any_flags is not None:
        # One flag map per frame on the reference grid (colour: the worst of the channels).
        y0, x0 = plan.origin
        target = DirectArray(plan.store, plan.flags_variable, "r+")
        for k, i in enumerate(plan.indices):
            target[int(i), y0 + sy.start:y0 + sy.stop, x0 + sx.start:x0 + sx.stop] = any_flags[k]
    record_tile(plan.store, plan.step, iy, ix, counts)
    return counts


def tile_size(tile: int, n_frames: int, task_memory) -> int:
    """Largest tile (a multiple of 32, at least 64, at most ``tile``) whose samples of
    ``n_frames`` frames fit in ``task_memory`` bytes: tiles shrink as frames are added,
    so the memory of a task -- and the peak memory of the run -- stays flat."""
    budget = parse_bytes(task_memory) if isinstance(task_memory, str) else int(task_memory)
    fit = int(np.sqrt(budget / (BYTES_PER_SAMPLE * max(n_frames, 1))))
    return int(max(64, min(int(tile), fit // 32 * 32)))


# ----------------------------------------------------------------------- tiled passes
class _Tiling:
    """The reference-grid tiling of one integration run, and its resumable passes.

    Each pass writes its products tile by tile and records every finished tile in its
    own ledger (``{step}_{pass}_tiles``): an interrupted run with the same parameters
    and inputs redoes only the tiles still missing, pass by pass.
    """

    def __init__(self, st, step, params, inputs, resumable, shape, tile, dims, roi):
        self.st, self.step, self.params, self.inputs = st, step, params, inputs
        self.resumable, self.shape, self.tile, self.dims, self.roi = resumable, tuple(shape), int(tile), dims, roi
        self.tiles = (-(-shape[0] // tile), -(-shape[1] // tile))

    def ledger(self, name: str) -> str:
        return f"{self.step}_{name}" if name else self.step

    def run(self, plan: TilePlan, name: str) -> np.ndarray:
        st, n = self.st, len(plan.indices)
        width = 3 * n + 1
        products = list(plan.outputs.values()) + ([plan.flags_variable] if plan.flags_variable else [])

        def create():
            chunks = (min(self.tile, self.shape[0]), min(self.tile, self.shape[1]))
            # colour: one channel per chunk, as the drizzle's products
            lead, lead_dims = ((len(plan.channels),), ("channel",)) if plan.cfa_pattern else ((), ())
            for key, var in plan.outputs.items():
                dtype, fill = _PRODUCTS[key]
                # Floats in Blosc LZ4 + shuffle, as the frames: the outlier pass and the
                # drizzle read the model and spread back tile by tile, and zstd decoded them
                # 3x slower.
                st.create_variable(var, lead + self.shape, lead_dims + tuple(self.dims), (1,) * len(lead) + chunks,
                                   dtype, fill, compressors=FRAME_CODEC if dtype.startswith("float") else None,
                                   attrs={"roi": list(self.roi) if self.roi else None})
            if plan.flags_variable:
                # Fill value 4 ("invalid"): chunks of excluded frames are never written at all.
                st.create_variable(plan.flags_variable, (st.n_frames,) + tuple(plan.frame_shape),
                                   ("frame", "y", "x"), (1,) + chunks, "uint8", _rej.FLAG_RANGE)

        ledger = self.ledger(name)
        done = start_or_resume(st, self.step, self.params, self.inputs, tiles=self.tiles, width=width,
                               tile=self.tile, products=products, create=create, ledger=ledger,
                               resumable=self.resumable, what="integration",
                               part=f" of its {name or 'final'} pass", stacklevel=3)
        return run_tiles(integrate_tile, replace(plan, step=ledger, done=done), self.tiles, width)


def _model_region(roi, frame_shape, mappings, margin: int = 8):
    """Origin and shape of the model an ROI trial needs: the ROI grown by the blot's
    reach and by the spread of the frames' positions (a sensor pixel's hot-pixel test
    looks at every frame in which it lands near the region)."""
    x0, y0, w, h = roi
    cx, cy = np.array([x0 + w / 2.0]), np.array([y0 + h / 2.0])
    pos = np.array([[float(v[0]) for v in m.inverse(cx, cy)] for m in mappings])  # region centre in each frame
    spread = int(np.ceil(np.ptp(pos, axis=0).max())) if len(pos) else 0
    grow = margin + spread
    ny, nx = frame_shape
    ya, yb = max(y0 - grow, 0), min(y0 + h + grow, ny)
    xa, xb = max(x0 - grow, 0), min(x0 + w + grow, nx)
    return (ya, xa), (yb - ya, xb - xa)


def task_memory_needed(tile: int, n_frames: int, task_memory, frame_shape) -> tuple[int, int]:
    """Peak bytes of the integration's largest task, and its tile: a tile task holds
    ``BYTES_PER_SAMPLE`` per sample of every frame; a statistics task one frame (float32)
    and the float64 temporaries of at most ``MAX_STATISTICS_PIXELS``."""
    t = tile_size(tile, n_frames, task_memory)
    tile_task = BYTES_PER_SAMPLE * min(t, frame_shape[0]) * min(t, frame_shape[1]) * max(n_frames, 1)
    frame_task = 4 * frame_shape[0] * frame_shape[1] + 32 * min(MAX_STATISTICS_PIXELS, frame_shape[0] * frame_shape[1])
    return max(tile_task, frame_task), t


def _check_worker_memory(tile, n_frames, task_memory, frame_shape) -> None:
    """Stop before any task runs when the workers' memory limit cannot hold them."""
    from ..parallel import check_task_memory

    need, t = task_memory_needed(tile, n_frames, task_memory, frame_shape)
    smallest = BYTES_PER_SAMPLE * 64 * 64 * n_frames

    def advice(fit: int) -> str:
        return f"--task-memory {fit // 2**20}MiB (smaller tiles)" if fit >= smallest else ""

    check_task_memory("integrate", need, f"tiles of {t} px over {n_frames} frames", advice)


# ------------------------------------------------------------------------------ driver
def _registration_inputs(st: StackStore) -> dict:
    """What the integration depends on besides its parameters (for re-run decisions)."""
    import hashlib

    n = st.n_frames
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(st.group["transform"][:n], dtype=np.float64).tobytes())
    for name in ("status", "path"):
        h.update("\n".join(str(s) for s in st.group[name][:n]).encode())
    for name in sorted(k for k in st.group.array_keys() if k.startswith("distortion")):
        h.update(np.ascontiguousarray(st.group[name][...]).tobytes())
    return {"n_frames": n, "reference": st.attrs.get("reference"), "registration": h.hexdigest()[:16]}


def _write_frame_variable(st: StackStore, name: str, values, dtype=np.float64) -> None:
    values = np.asarray(values, dtype=dtype)
    st.write_variable(name, values, ("frame", "channel")[:values.ndim])


def integrate(store, rejection: str = "winsorized", low: float = 4.0, high: float = 3.0,
              normalization: str = "additive+scaling", weights: str = "noise", roi=None, tile: int = 512,
              saturation: bool | float = True, *, scale_estimator: str = "auto", weight_keyword: str | None = None,
              reject_low: bool = True, reject_high: bool = True, range_low: float | None = None,
              range_high: float | None = None, rejection_options: dict | None = None, frames=None,
              output=None, overwrite: bool = False, task_memory: int | str = "256MiB",
              force: bool = False, outliers: dict | _out.OutlierParameters | None = None,
              white_balance: str = "none", align_channels: bool = True) -> xr.Dataset:
    """Pre-integrate a registered stack: statistics, normalization, weights, pixel
    rejection on the registered view, and the integrated image.

    Parameters
    ----------
    store : str or path-like
        A registered stack store.
    rejection : str
        Rejection method: ``none``, ``minmax``, ``percentile``, ``sigma``,
        ``winsorized`` (default), ``averaged``, ``linear`` or ``esd`` (see
        :mod:`drizzlestack.integration.rejection`).
    low, high : float
        Rejection thresholds below and above the centre (sigma units for the sigma
        methods, fractions for ``percentile``).
    normalization : str
        ``none``, ``additive``, ``multiplicative``, ``additive+scaling`` (default) or
        ``multiplicative+scaling`` (see :mod:`drizzlestack.integration.normalize`).
    weights : str
        ``none``, ``exposure``, ``noise`` (default: inverse variance of the normalized
        frame) or ``keyword`` (with ``weight_keyword``).
    roi : (x0, y0, width, height), optional
        Region of the reference grid (whole pixels) for quick parameter trials: the
        products go to ``roi_integration``, ``roi_rejected_low``, ``roi_rejected_high``
        and ``roi_integration_weight`` and nothing the drizzle step uses (flags,
        weights, normalization) is touched. Default: the whole field. An ROI reaching
        beyond the reference frame is clipped to it, with a warning
        (:func:`drizzlestack.tiled.clip_roi`).
    tile : int
        Largest tile side (reference pixels); smaller when ``task_memory`` requires.
    saturation : bool or float
        ``True``: protect pixels at or above each frame's saturation level (the store's
        ``saturation``); a number: that level (ADU) for every frame; ``False``: none.
    scale_estimator : {"auto", "photometry", "biweight", "mad"}
        Source of the scale factor of the ``+scaling`` normalizations; ``auto`` is star
        photometry when every frame has it, else the biweight midvariance.
    weight_keyword : str, optional
        FITS keyword for ``weights="keyword"``.
    reject_low, reject_high : bool
        Switch rejection of low / high outliers.
    range_low, range_high : float, optional
        Range rejection in normalized units (the reference frame's ADU): samples at or
        below / at or above are flagged. Saturated samples are exempt.
    rejection_options : dict, optional
        Further keywords of :func:`~drizzlestack.integration.rejection.rejection_flags`:
        ``n_low``, ``n_high``, ``max_iterations``, ``esd_significance``,
        ``esd_outliers``, ``esd_low_relaxation``.
    frames : sequence of int, optional
        Frames to integrate (default: every frame with status ``ok`` and a transform).
    output : path-like, optional
        FITS file to write (image, ``REJLOW``, ``REJHIGH``, ``WEIGHTS``), streamed from
        the store.
    overwrite : bool
        Replace an existing ``output`` file (otherwise refused before any work).
    task_memory : int or str
        Memory budget of one tile task (e.g. ``"256MiB"``); sets the tile size.
    force : bool
        Recompute even when the store already holds this integration.
    white_balance : str
        Colour stores: ``"none"`` (default, the raw colours), ``"camera"`` or
        ``"neutral"`` (:mod:`drizzlestack.whitebalance`), applied to the ``output`` FITS
        image only (header ``WBALANCE``, gains ``WBR``/``WBG``/``WBB``, as the drizzle's); the
        store keeps the unbalanced integration, which the drizzle balances on its own.
    align_channels : bool
        Colour stores: sample red and blue where their offset from green on the sky puts
        them (atmospheric dispersion, lateral colour; measured on the stars between the
        outlier pass and the image: :mod:`drizzlestack.channel_alignment`), so that the
        image's channels coincide, as the drizzle's do. The outlier model stays in the
        data's own geometry. Recorded in the summary and the FITS header (``CHALIGN``,
        ``CHOFFRX`` ...); with too few stars, a warning and no shift.
    outliers : dict or OutlierParameters, optional
        Tolerances of the outlier test in each frame's own pixels (``snr``,
        ``derivative``, ``signal``, ``snr_grow``, ``derivative_grow``, ``signal_grow``,
        ``hot_fraction``; see :mod:`drizzlestack.integration.outliers`).

    Returns
    -------
    xarray.Dataset
        The store, opened lazily (:func:`drizzlestack.open_stack`).

    Warns
    -----
    DrizzlestackWarning
        For every excluded frame (unregistered, no statistics, zero weight), when
        fewer than 3 frames remain (they are averaged without rejection), and for an ROI
        clipped to the reference frame.

    Raises
    ------
    StoreError
        The store is not registered.
    DrizzlestackError
        A bad parameter, or no frame left to integrate.

    Notes
    -----
    Store variables written by a full run (``roi=None``); for a colour store the per-frame
    ones but ``photometric_scale`` have dims (frame, channel) and the images (channel, y, x):

    ``location``, ``scale``, ``scale_mad``, ``noise`` (frame; float64, ADU)
        Median, sqrt of the biweight midvariance, normalized MAD, wavelet noise.
    ``photometric_scale`` (frame; float64)
        Star flux ratio to the reference (NaN: not measured).
    ``norm_scale``, ``norm_offset`` (frame; float64)
        Normalization ``v * norm_scale + norm_offset`` (NaN for excluded frames).
    ``weight`` (frame; float64)
        Combination weight relative to the reference; 0 for excluded frames.
    ``rejected_low_fraction``, ``rejected_high_fraction`` (frame; float64)
        Fraction of the frame's valid samples on the reference grid rejected low/high.
    ``outliers`` (frame, y, x; uint8), ``outlier_fraction`` (frame)
        Flags in each frame's own pixels, what drizzle drops: 1 low, 2 high, 4 out of
        range, 8 hot pixel (excluded frames: 4 everywhere); the share of each frame's
        pixels flagged (:mod:`.outliers`).
    ``integration_model``, ``integration_spread`` (y, x; float32)
        The robust model the outliers were tested against, and the spread of the
        samples it kept.
    ``rejection`` (frame, y, x; uint8)
        The outlier flags seen on the reference grid (a sample takes its nearest input
        pixel's flag): 1 low, 2 high, 4 range or invalid (no data); excluded frames are
        4 everywhere.
    ``integration`` (y, x; float32)
        Weighted mean of the kept normalized samples (NaN: no data).
    ``rejected_low``, ``rejected_high`` (y, x; uint16)
        Number of frames rejected low / high per pixel.
    ``integration_weight`` (y, x; float32)
        Sum of the weights of the kept samples per pixel.

    Examples
    --------
    >>> import drizzlestack as ds
    >>> stack = ds.integrate("stack.zarr", rejection="winsorized", low=4, high=3,
    ...                      output="integration.fits")  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    st = StackStore.open(store)
    # Colour (Bayer) stores are integrated per channel: every statistic, factor and weight
    # has a channel axis, and each sample is compared only with samples of its own colour.
    pattern = st.cfa_pattern
    n_ch = len(_cfa.CHANNELS) if pattern else 1
    ref = require_registration(st)
    n_all = st.n_frames
    frame_shape = st.frame_shape
    if rejection not in _rej.METHODS:
        raise DrizzlestackError(f"rejection={rejection!r}: choose one of {', '.join(_rej.METHODS)}")
    _norm.check_choice("normalization", normalization, _norm.NORMALIZATIONS)
    _norm.check_choice("weights", weights, _norm.WEIGHTS)
    _norm.check_choice("scale_estimator", scale_estimator, _norm.SCALE_ESTIMATORS)
    if not (isinstance(tile, (int, np.integer)) and tile >= 16):
        raise DrizzlestackError(f"tile={tile!r}: must be an integer of at least 16 (pixels)")
    options = dict(rejection_options or {})
    unknown = sorted(set(options) - set(_REJECTION_OPTIONS))
    if unknown:
        raise DrizzlestackError(f"rejection_options: unknown option {unknown[0]!r} "
                                f"(known: {', '.join(_REJECTION_OPTIONS)})")
    outlier_params = outliers if isinstance(outliers, _out.OutlierParameters) else \
        _out.OutlierParameters.from_dict(outliers)
    roi = clip_roi(roi, frame_shape, whole_pixels=True)
    check_output_path(output, overwrite)
    white_balance = _wb.check_white_balance(white_balance)
    if white_balance == "camera" or (white_balance == "neutral" and not pattern):
        # refused before any work: a grey store, or raws without multipliers (the
        # neutral balance's sky is measured by this step)
        _wb.balance(white_balance, open_stack(st), select_frames(st, frames)[0], ref, store=str(st.path))

    params = {"rejection": rejection, "low": low, "high": high, "normalization": normalization,
              "weights": weights, "roi": list(roi) if roi else None, "saturation": saturation,
              "scale_estimator": scale_estimator, "weight_keyword": weight_keyword, "reject_low": reject_low,
              "reject_high": reject_high, "range_low": range_low, "range_high": range_high,
              "rejection_options": options, "frames": None if frames is None else [int(i) for i in frames],
              "outliers": asdict(outlier_params)}
    if st.cfa_pattern:  # (grey runs keep their digest)
        params["align_channels"] = bool(align_channels)
    inputs = _registration_inputs(st)
    step_name = "integrate" if roi is None else "integrate_roi"
    if not force and st.is_current(step_name, params, inputs) and all(
            (ROI_PREFIX + v if roi else v) in st.group for v in IMAGE_VARIABLES):
        if output is not None:
            _write_fits(output, st, roi, st.step(step_name), white_balance)
        return open_stack(st)

    # ------------------------------------------------------------- which frames
    candidates, excluded = select_frames(st, frames)
    if ref not in candidates:
        raise DrizzlestackError(f"{st.path}: the reference frame {ref} cannot be integrated "
                                f"({excluded.get(ref, 'not among frames')}); re-register with another reference")

    _check_worker_memory(tile, len(candidates) * n_ch, task_memory, frame_shape)

    # An interrupted run with the same parameters and inputs keeps its finished tiles,
    # even when forced (tiles are deterministic); pass 1 is redone (cheap, deterministic).
    resumable = st.is_resumable(step_name, params, inputs)
    if not resumable:
        st.begin_step(step_name, params, inputs)

    # ------------------------------------------------------------- pass 1: per frame
    raw_sat = np.asarray(st.group["saturation"][:n_all], dtype=np.float64)
    raw_sat = np.where(np.isfinite(raw_sat), raw_sat, np.inf)
    mappings = dict(zip(candidates, frame_mappings(st, candidates)))
    measures = measure_frames(st, candidates, ref, raw_sat, mappings)
    for name in measures.VARIABLES:
        _write_frame_variable(st, name, getattr(measures, name))
    location, noise = measures.location, measures.noise

    # ---------------------------------------------- normalization, weights, exclusion
    exptime = np.asarray(st.group["exptime"][:n_all], dtype=np.float64)
    weighting = _norm.normalize_frames(
        measures, candidates, ref, normalization, scale_estimator, weights, exptime=exptime,
        headers=[str(h) for h in st.group["header"][:n_all]] if weights == "keyword" else None,
        keyword=weight_keyword, channels=_cfa.CHANNELS if pattern else None)
    norm, w, used = weighting.norm, weighting.weights, weighting.used
    excluded.update(weighting.excluded)
    for i in sorted(excluded):
        warnings.warn(f"frame {i} excluded from the integration: {excluded[i]}", DrizzlestackWarning, stacklevel=2)
    if not used:
        raise DrizzlestackError(f"{st.path}: no frame left to integrate "
                                f"({'; '.join(f'{i}: {r}' for i, r in sorted(excluded.items()))})")
    method = rejection
    if len(used) < MIN_FRAMES_FOR_REJECTION and rejection != "none":
        warnings.warn(f"only {len(used)} usable frame(s): pixel rejection needs at least "
                      f"{MIN_FRAMES_FOR_REJECTION}; producing a plain weighted average without rejection",
                      DrizzlestackWarning, stacklevel=2)
        method = "none"

    weight_all = np.zeros((n_all, n_ch))
    weight_all[used] = w[used]
    if roi is None:
        norm_scale = np.full((n_all, n_ch), np.nan)
        norm_offset = np.full((n_all, n_ch), np.nan)
        norm_scale[used], norm_offset[used] = norm.scale[used], norm.offset[used]
        for name, values in (("norm_scale", norm_scale), ("norm_offset", norm_offset), ("weight", weight_all)):
            _write_frame_variable(st, name, values if pattern else values[:, 0])

    # ------------------------------------------------------------- pass 2: per tile
    if saturation is True:
        sat_levels = raw_sat[used]
    elif saturation is False or saturation is None:
        sat_levels = np.full(len(used), np.inf)
    else:
        sat_levels = np.full(len(used), float(saturation))
    if roi is None:
        origin, shape = (0, 0), frame_shape
    else:
        origin, shape = (roi[1], roi[0]), (roi[3], roi[2])
    eff_tile = tile_size(tile, len(used) * n_ch, task_memory)  # colour: a tile holds every channel
    prefix = "" if roi is None else ROI_PREFIX
    n = len(used)
    rej_params = _rej.RejectionParameters(method=method, low=low, high=high, reject_low=reject_low,  # validated here
                                          reject_high=reject_high, range_low=range_low, range_high=range_high, **options)
    base = TilePlan(
        store=st.location, indices=list(used), mappings=[mappings[i] for i in used], frame_shape=tuple(frame_shape),
        origin=origin, shape=tuple(shape), tile=eff_tile, raw_saturation=np.asarray(sat_levels, np.float64),
        norm_scale=np.asarray(norm.scale[used], np.float32), norm_offset=np.asarray(norm.offset[used], np.float32),
        weights=np.asarray(w[used], np.float64), rejection=rej_params, outputs={v: prefix + v for v in IMAGE_VARIABLES},
        flags_variable="rejection" if roi is None else None, step=step_name, cfa_pattern=pattern,
        sky=np.asarray(location[used], np.float64) if pattern else None,
        noise=np.asarray(noise[used], np.float64) if pattern else None,
    )
    tiling = _Tiling(st, step_name, params, inputs, resumable, shape, eff_tile, ("y", "x") if roi is None
                     else ("roi_y", "roi_x"), roi)
    outlier_summary = None
    t0 = time.perf_counter()
    offsets = None
    if method == "none":
        # No statistics to reject on: one pass, flags for the invalid samples only.
        # (an earlier run's flags go first: the offsets' fits must not leave out samples by them)
        st.delete_variables(prefix + _out.OUTLIERS_VARIABLE, prefix + MODEL_VARIABLE, prefix + SPREAD_VARIABLE)
        if pattern and align_channels:
            offsets = offsets_to_remove(st, used, distortion=True, name=st.path)
            base = replace(base, channel_offset=None if offsets is None else offsets.offset)
        per_tile = tiling.run(base, "")
    else:
        # (a) The robust model: the chosen rejection on the registered view. An ROI trial
        # models a margin around its region too, so that every input pixel that can
        # reach the region is tested exactly as in a full run.
        # Colour: the model keeps the stars' sharp shape (every raw sample is tested
        # against it); the image below conserves each colour's flux.
        model_plan = replace(base, outputs={"integration": prefix + MODEL_VARIABLE, "spread": prefix + SPREAD_VARIABLE},
                             flags_variable=None, sharp=True)
        # Grey full runs: the final pass patches the model pass's plain sums (:mod:`.patch`).
        patch = PATCH_FINAL_PASS and not pattern and roi is None and range_low is None and range_high is None
        if patch:
            model_plan = replace(model_plan, outputs={**model_plan.outputs, **_patch.BASE_VARIABLES},
                                 flags_variable=_patch.BASE_FLAGS, base=True)
        model_tiling = tiling
        if roi is not None:
            m_origin, m_shape = _model_region(roi, frame_shape, [mappings[i] for i in used])
            model_plan = replace(model_plan, origin=m_origin, shape=m_shape)
            model_tiling = _Tiling(st, step_name, params, inputs, resumable, m_shape, eff_tile, ("roi_model_y",
                                   "roi_model_x"), roi)
        model_tiling.run(model_plan, "model")
        base = replace(base, origin=model_plan.origin)  # the outlier pass reads the model array
        # (b) Outliers in each frame's own pixels, tested against the model blotted back.
        # The user's thresholds keep their meaning: in sigma units, the same multiples of
        # the kept samples' spread are tolerated in each frame's own pixels.
        k_low, k_high = ((float(low), float(high)) if method in SIGMA_METHODS else (3.0, 3.0))
        k_low, k_high = (k_low if reject_low else np.inf), (k_high if reject_high else np.inf)
        outlier_summary = _out.flag_outliers(st, base, tiling, location, noise, used, outlier_params,
                                         prefix + _out.OUTLIERS_VARIABLE, prefix + MODEL_VARIABLE,
                                             prefix + SPREAD_VARIABLE, (k_low, k_high), (range_low, range_high),
                                             OUTLIER_RMS_TOLERANCE)
        # (c) The integration from the same flags: flagged pixels are no data for the
        # resampling, so the reference-grid image never loses a star pixel either.
        # Colour: the channels' offsets on the sky, measured now (on samples the flags
        # leave), removed from the image (the model above stays in the data's geometry);
        # with the distortion model, as the integration's mappings and the drizzle's default.
        offsets = offsets_to_remove(st, used, distortion=True, name=st.path) if (pattern and align_channels) else None
        final_plan = replace(base, origin=origin, rejection=rej_params.replace(method="none"),
                             outliers=prefix + _out.OUTLIERS_VARIABLE, patch=patch,
                             channel_offset=None if offsets is None else offsets.offset)
        per_tile = tiling.run(final_plan, "")
        st.delete_variables(*_patch.BASE_VARIABLES.values(), _patch.BASE_FLAGS)
    t_tiles = time.perf_counter() - t0
    per_tile = np.asarray(per_tile).reshape(-1, 3 * n + 1)
    low_n, high_n, valid_n = (per_tile[:, j * n:(j + 1) * n].sum(axis=0) for j in range(3))
    max_weight = float(per_tile[:, 3 * n].max())
    with np.errstate(divide="ignore", invalid="ignore"):
        low_frac = np.where(valid_n > 0, low_n / valid_n, np.nan)
        high_frac = np.where(valid_n > 0, high_n / valid_n, np.nan)
    if roi is None:
        lf, hf = np.full(n_all, np.nan), np.full(n_all, np.nan)
        lf[used], hf[used] = low_frac, high_frac
        _write_frame_variable(st, "rejected_low_fraction", lf)
        _write_frame_variable(st, "rejected_high_fraction", hf)
    fraction = outlier_summary.pop("_fraction") if outlier_summary is not None else None
    if roi is None:
        of = np.full(n_all, np.nan)
        if fraction is not None:
            of[used] = fraction
        _write_frame_variable(st, "outlier_fraction", of)

    summary = {
        "frames_used": [int(i) for i in used],
        "excluded": {str(i): r for i, r in sorted(excluded.items())},
        "rejection": method,
        "scale_estimator": norm.estimator,
        "photometry_stars": {str(i): int(measures.n_photometry[i]) for i in used} if measures.photometry else {},
        "tile": eff_tile,
        "shape": [int(v) for v in shape],
        "roi": list(roi) if roi else None,
        "max_weight": max_weight,
        "rejected_low_fraction": float(low_n.sum() / max(valid_n.sum(), 1)),
        "rejected_high_fraction": float(high_n.sum() / max(valid_n.sum(), 1)),
        "exptime": float(np.nansum(exptime[used])),
        "outliers": outlier_summary,
        "seconds": {"statistics": round(measures.seconds, 3), "tiles": round(t_tiles, 3),
                    "total": round(time.perf_counter() - t_start, 3)},
    }
    if offsets is not None:
        summary["channel_offsets"] = offsets.as_dict()
    st.end_step(step_name, **summary)
    if output is not None:
        _write_fits(output, st, roi, st.step(step_name), white_balance)
    return open_stack(st)


# -------------------------------------------------------------------------------- FITS
def _reference_wcs(st: StackStore, roi) -> fits.Header | None:
    """The reference frame's celestial WCS, shifted to the ROI; ``None`` if the header has
    none. The integration *is* the reference grid, so the WCS carries over whole,
    distortion (SIP) terms included -- unlike drizzle's rescaled grid."""
    wcs = reference_wcs(st)
    if wcs is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if roi is not None:
                wcs = wcs.slice((slice(roi[1], roi[1] + roi[3]), slice(roi[0], roi[0] + roi[2])))
            return wcs.to_header()
    except Exception:  # a malformed WCS in a camera header must not stop the output
        return None


def _write_fits(path, st: StackStore, roi, record: dict, white_balance: str = "none") -> None:
    """Stream the integration products from the store into a multi-extension FITS file
    (colour: the image white-balanced on the way, the store's own left raw)."""
    from ..io.fits import write_streamed

    params = record.get("params", {})
    summary = record.get("summary", {})
    prefix = "" if roi is None else ROI_PREFIX
    gain = offset = None
    header = fits.Header()
    if st.cfa_pattern:
        stack = open_stack(st)
        ref = int(st.attrs.get("reference") or 0)
        wb = _wb.balance(white_balance, stack, summary.get("frames_used", []), ref, store=str(st.path))
        header["WBALANCE"] = (wb.method if wb is not None else "none", "white balance (none, camera, neutral)")
        if wb is not None:
            # the image is in the reference frame's units: balanced about its black levels
            black = _wb.reference_black(stack, ref)
            gain = [float(g) for g in wb.gains]
            offset = [float(black[1] - b * g) for b, g in zip(black, wb.gains)]
            for c, g in zip(_cfa.CHANNELS, gain):
                header[f"WB{c}"] = (g, f"{c} gain about its black level (G = 1)")
    header["NCOMBINE"] = (len(summary.get("frames_used", [])), "number of frames integrated")
    header["REFFRAME"] = (st.attrs.get("reference"), "reference frame index in the stack store")
    header["REJECT"] = (summary.get("rejection", params.get("rejection")), "pixel rejection method")
    header["REJLOWK"] = (params.get("low"), "low rejection threshold")
    header["REJHIGHK"] = (params.get("high"), "high rejection threshold")
    header["NORMALIZ"] = (params.get("normalization"), "normalization")
    header["SCALEEST"] = (summary.get("scale_estimator"), "normalization scale estimator")
    header["WEIGHTS"] = (params.get("weights"), "frame weighting")
    header["EXPTIME"] = (summary.get("exptime"), "total exposure of the integrated frames [s]")
    if roi is not None:
        header["ROIX0"], header["ROIY0"], header["ROIW"], header["ROIH"] = roi
    if st.cfa_pattern:  # a 3 x H x W cube, no longer a mosaic (no BAYERPAT)
        header["CHANNELS"] = ("R G B", "planes of the cube (NAXIS3)")
        header["INTEGCFA"] = (st.cfa_pattern, "Bayer pattern of the integrated mosaics")
        from ..channel_alignment import ChannelOffsets, header_cards

        found = summary.get("channel_offsets")
        for key, value, comment in header_cards(ChannelOffsets.from_dict(found) if found else None):
            header[key] = (value, comment)
    header["CREATOR"] = (f"drizzlestack {__version__}", "software")
    wcs = _reference_wcs(st, roi)
    if wcs is not None:
        header.update(wcs)
    for key, value in params.items():
        header.add_history(f"drizzlestack integrate {key}={value}")
    low_h, high_h, w_h = fits.Header(), fits.Header(), fits.Header()
    low_h["EXTNAME"] = "REJLOW"
    low_h["BUNIT"] = ("frames", "frames rejected low per pixel")
    high_h["EXTNAME"] = "REJHIGH"
    high_h["BUNIT"] = ("frames", "frames rejected high per pixel")
    w_h["EXTNAME"] = "WEIGHTS"
    max_w = float(summary.get("max_weight") or 0.0)
    w_h["WGTNORM"] = (max_w if max_w > 0 else 1.0, "raw weight sum = WGTNORM * WEIGHTS")
    write_streamed(path, [
        (header, DirectArray(st.location, prefix + "integration"), gain, offset),
        (low_h, DirectArray(st.location, prefix + "rejected_low"), None),
        (high_h, DirectArray(st.location, prefix + "rejected_high"), None),
        (w_h, DirectArray(st.location, prefix + "integration_weight"), 1.0 / max_w if max_w > 0 else None),
    ])
