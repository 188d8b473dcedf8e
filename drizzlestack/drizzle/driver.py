"""Step 4, drizzle: the tiled, out-of-core driver over the numba kernels.

The output grid is cut into tiles and drizzled as one Dask task per tile
(``map_blocks``). For each tile and each frame the task maps points along the tile's
edges back into the frame (:func:`geometry.input_window`), pads by the kernel's reach,
reads only that window of the frame (and of its outlier flags, which are in the
frame's own pixels: integration/outliers.py), builds the window's pixmap in tile
coordinates and accumulates it. Memory per task is one output tile plus
one input window, whatever the size of the stack or of the output; the tiles are
written straight into the store (zarr region writes) and the FITS file is streamed from
there, so the whole output never sits in memory.

Colour (CFA) stores: every window also gets its channel index
(:func:`drizzlestack.cfa.channel_index` of the store's ``cfa_pattern``, a separate
per-window array) and the kernels drop each raw sample into its own channel's plane in
the same single pass; the products gain a leading ``channel`` axis (R, G, B) and the
FITS file is a 3 x H x W cube with per-channel ``WEIGHTS`` and ``COVERAGE``.

Saturation policy: pixels at or above their frame's saturation level are never
rejected (they are not outliers) and keep their full weight, so an output pixel whose
only contributions are saturated keeps a saturated value and star cores are never
black or hollow.
"""

from __future__ import annotations

import datetime as _dt
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from astropy.io import fits

from .. import cfa as _cfa
from .. import whitebalance as _wb
from .._version import __version__
from .._warnings import DrizzlestackError, DrizzlestackWarning
from ..geometry import OutputGrid, apply_homography, input_window, translation
from ..io.fits import check_output_path, output_exists, write_streamed
from ..chunkio import DirectArray
from ..integration.outliers import OUTLIERS_VARIABLE
from ..store import FRAME_CODEC, StackStore, open_stack, record_tile
from ..tiled import celestial_wcs, clip_roi, require_registration, run_tiles, select_frames, start_or_resume
from . import array as _array
from . import kernels as _kernels

#: store variables written by this step
OUTPUT_VARIABLES = ("drizzle", "drizzle_weights", "drizzle_coverage")


@dataclass
class FramePlan:
    """What a tile task needs to know about one frame (small and picklable)."""

    index: int
    mapping: object  # FrameMapping: frame -> reference
    to_output: np.ndarray  # reference -> output homography
    weight: float
    norm_scale: float  # normalized value = value * norm_scale + norm_offset
    norm_offset: float
    saturation: float
    pixel_scale_ratio: float
    channel_norm: tuple | None = None  # colour: ((scale R, G, B), (offset R, G, B)), else None
    channel_weight: tuple | None = None  # colour: (weight R, G, B) from a per-channel integration


class TileBuffers:
    """A tile task's large arrays (accumulators, coverage, the float32 products), kept
    per thread and reused by the thread's next tile.

    A fresh colour tile allocated ~80 MB at tile 1024 and page-faulted all of it again:
    its 54 MB of accumulators and coverage, allocated and written once, took 6 ms
    (median; 35-140 ms at times, when the OS compacts memory for huge pages), reused
    and zeroed 3.5 ms. A thread holds one tile's worth, what it held while drizzling
    one. Pickling gives an empty set (a process-based or distributed worker builds its
    own); the buffers go with the plan at the end of the step.
    """

    def __init__(self):
        self._local = threading.local()

    def __reduce__(self):
        return (TileBuffers, ())

    def get(self, name: str, shape, dtype, zero: bool) -> np.ndarray:
        """A C-contiguous ``shape`` array of ``dtype`` (zeroed if ``zero``), the view of
        this thread's buffer ``name`` (grown when too small)."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape))
        buf = getattr(self._local, name, None)
        if buf is None or buf.dtype != dtype or buf.size < size:
            setattr(self._local, name, None)  # the old one freed before the new one
            buf = np.zeros(size, dtype) if zero else np.empty(size, dtype)
            setattr(self._local, name, buf)
            return buf.reshape(shape)
        out = buf[:size].reshape(shape)
        if zero:
            out.fill(0)
        return out


@dataclass
class DrizzlePlan:
    """Everything a tile task needs (no open files: tasks open the store themselves)."""

    store: str
    frame_shape: tuple[int, int]
    grid: OutputGrid
    kernel: str
    pixfrac: float
    frames: list[FramePlan]
    use_rejection: bool
    pad: float
    coverage: bool
    tile: tuple[int, int] = (1024, 1024)  # output tile shape (the store's chunks)
    done: np.ndarray | None = None  # tile ledger of an interrupted run: finite rows are finished tiles
    cfa_pattern: str = ""  # colour store: Bayer pattern of the frames as stored; "" grey
    channel_shift: np.ndarray | None = None  # colour: (3, 2) output-pixel shift of each channel's drops
    buffers: TileBuffers = field(default_factory=TileBuffers, repr=False, compare=False)

    @property
    def n_channels(self) -> int:
        return len(_cfa.CHANNELS) if self.cfa_pattern else 1


def _mapping_scale(mapping, to_output, frame_shape) -> float:
    """Output pixel size in input pixels at the frame centre (STScI's pixel_scale_ratio):
    1 / sqrt(|det J|) of the frame -> output mapping, J by central differences."""
    cy, cx = (frame_shape[0] - 1) / 2, (frame_shape[1] - 1) / 2
    x = np.array([cx - 0.5, cx + 0.5, cx, cx])
    y = np.array([cy, cy, cy - 0.5, cy + 0.5])
    xo, yo = apply_homography(to_output, *mapping.forward(x, y))
    jac = np.array([[xo[1] - xo[0], xo[3] - xo[2]], [yo[1] - yo[0], yo[3] - yo[2]]])
    return 1.0 / np.sqrt(abs(np.linalg.det(jac)))


def drizzle_tile(plan: DrizzlePlan, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Drizzle every frame of ``plan`` into output pixels ``[y0:y1, x0:x1]``.

    Returns
    -------
    image, weights : (y1 - y0, x1 - x0) float32, or (3, y1 - y0, x1 - x0) for a colour store
        The image (NaN where nothing landed) and the raw weights, as stored (summed in
        float64, cast once); colour: per channel.
    coverage : uint16 array of the same shape, or None
        The number of frames that contributed (``None`` unless ``plan.coverage``).

    The three products come back as they are, not stacked into one float64 cube: a
    colour tile's cube was 9 planes (75 MB at tile 1024) allocated, page-faulted and
    copied once more for every tile. Nor in float64: finalizing and casting in one pass
    spares two passes. All of them are ``plan.buffers`` (:class:`TileBuffers`), this
    thread's arrays: valid until its next tile.
    """
    colour = bool(plan.cfa_pattern)
    shape = (y1 - y0, x1 - x0)
    acc_shape = (plan.n_channels,) + shape if colour else shape
    buffers = plan.buffers
    acc_wv = buffers.get("acc_wv", acc_shape, np.float64, zero=True)
    acc_w = buffers.get("acc_w", acc_shape, np.float64, zero=True)
    cover = buffers.get("coverage", acc_shape, np.uint16, zero=True) if plan.coverage else None
    # Readers decode chunks in this task's thread (zarr's own reads all queue on one
    # event-loop thread and would serialize the tile tasks).
    frames = DirectArray(plan.store, "frames")
    flags = DirectArray(plan.store, OUTLIERS_VARIABLE) if plan.use_rejection else None
    box = (x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5)  # the tile's pixel edges in output coordinates
    tile_shift = translation(-x0, -y0)
    for fp in plan.frames:
        to_out = fp.mapping.then(fp.to_output)
        window = input_window(to_out, box, plan.frame_shape, pad=plan.pad)
        if window is None:
            continue
        # A window clipped to one row or column at the frame's edge is widened inwards:
        # the square kernel finds a drop's corners from its neighbours. The extra
        # pixels' drops land outside the tile and add nothing to it.
        sy, sx = (_at_least_two(s, n) for s, n in zip(window, plan.frame_shape))
        data = frames[fp.index, sy, sx]  # float32, used as is by the kernels
        # Colour: the channel of every pixel of this window (kept apart from the outlier
        # flags, which know nothing of colour); each colour its own weight.
        chan = _cfa.channel_index(plan.cfa_pattern, data.shape, sy.start, sx.start) if colour else None
        # The window's weights and pixmap in this thread's buffers: a fresh 8-16 MB
        # array per frame and tile was page-faulted anew every time.
        weights = buffers.get("in_weights", data.shape, np.float64, zero=False)
        if colour and fp.channel_weight is not None:
            np.take(np.asarray(fp.channel_weight, np.float64), chan, out=weights)
        else:
            weights.fill(fp.weight)
        if fp.mapping.is_homography:
            # The common case, one fused pass: frame -> reference -> tile coordinates.
            pixmap = buffers.get("pixmap", data.shape + (2,), np.float64, zero=False)
            _kernels.homography_grid(tile_shift @ fp.to_output @ fp.mapping.matrix, sy.start, sx.start,
                                     *data.shape, pixmap)
        else:  # with the distortion spline
            yy, xx = np.mgrid[sy, sx]
            ref_xy = fp.mapping.forward(xx.astype(np.float64), yy.astype(np.float64))
            pixmap = np.stack(apply_homography(tile_shift @ fp.to_output, *ref_xy), axis=-1)
        if flags is not None:
            # The flags belong to the input pixels themselves (integration/outliers.py):
            # no lookup on another grid, nothing spread to neighbours. Saturated pixels
            # keep their weight whatever the flags say: rejecting them is what turns
            # star cores black.
            weights[(flags[fp.index, sy, sx] != 0) & ~(data >= fp.saturation)] = 0.0
        if colour and fp.channel_norm is not None:
            scales, offsets = (np.asarray(v, dtype=np.float64) for v in fp.channel_norm)
            data = data * scales[chan] + offsets[chan]  # each colour its own normalization
        elif fp.norm_scale != 1.0 or fp.norm_offset != 0.0:
            data = data * fp.norm_scale + fp.norm_offset  # float64
        _array.accumulate(data, pixmap, weights, acc_wv, acc_w, kernel=plan.kernel,
                          pixfrac=plan.pixfrac, pixel_scale_ratio=fp.pixel_scale_ratio, coverage=cover,
                          channel=chan, channel_shift=plan.channel_shift if colour else None)
    image = buffers.get("image", acc_shape, np.float32, zero=False)
    weights = buffers.get("weights", acc_shape, np.float32, zero=False)
    _array.finalize(acc_wv, acc_w, out=image, weights_out=weights)
    return image, weights, cover


def _at_least_two(s: slice, n: int) -> slice:
    if s.stop - s.start >= 2 or n < 2:
        return s
    return slice(s.start - 1, s.stop) if s.start > 0 else slice(s.start, s.stop + 1)


# --------------------------------------------------------------------------- public step
def _check_parameters(scale, pixfrac, kernel, tile):
    if kernel not in _array.KERNELS:
        raise DrizzlestackError(f"kernel={kernel!r}: unknown kernel; choose one of {', '.join(_array.KERNELS)}")
    if not (isinstance(pixfrac, (int, float)) and 0 < pixfrac <= 1):
        raise DrizzlestackError(f"pixfrac={pixfrac!r}: must be in (0, 1] (the drop's size in input pixels)")
    if not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
        raise DrizzlestackError(f"scale={scale!r}: must be a positive number (output pixels per input pixel)")
    if not (isinstance(tile, (int, np.integer)) and tile >= 16):
        raise DrizzlestackError(f"tile={tile!r}: must be an integer of at least 16 (output pixels)")


def _frame_values(stack, name, indices, default):
    if name in stack and stack[name].dims == ("frame",):
        values = np.asarray(stack[name].values, dtype=np.float64)[indices]
        return np.where(np.isfinite(values), values, default)
    return np.full(len(indices), float(default))


def _channel_values(stack, name, indices, default):
    """A per-frame, per-channel variable ``(frame, channel)`` as ``(len(indices), 3)``, or
    ``None`` when the store has it only per frame (or not at all)."""
    if name in stack and stack[name].dims == ("frame", "channel"):
        values = np.asarray(stack[name].values, dtype=np.float64)[indices]
        return np.where(np.isfinite(values), values, default)
    return None


def _kernel_pad(kernel: str, pixfrac: float, psr: float) -> float:
    """Input pixels to pad an input window by: the kernel's reach (in output pixels,
    plus half the receiving pixel) converted to input pixels, plus one pixel."""
    return (_array.kernel_radius(kernel, pixfrac, psr) + 0.5) * psr + 1.0


def output_wcs_header(reference_header: str, grid: OutputGrid) -> fits.Header | None:
    """WCS of the output grid derived from the reference frame's (scaled and shifted), or
    ``None`` when the reference has no celestial WCS."""
    wcs = celestial_wcs(reference_header)
    if wcs is None:
        return None
    s = grid.scale
    out = wcs.deepcopy()
    out.sip = None  # a SIP polynomial would need rescaling; the linear part is what drizzle keeps
    crpix = np.asarray(wcs.wcs.crpix, dtype=float)  # 1-based
    # x_out = s * (x_ref - x0 + 0.5) - 0.5 in zero-based pixels
    out.wcs.crpix = [s * (crpix[0] - 1 - grid.x0 + 0.5) - 0.5 + 1, s * (crpix[1] - 1 - grid.y0 + 0.5) - 0.5 + 1]
    if wcs.wcs.has_cd():
        out.wcs.cd = wcs.wcs.cd / s
    else:
        out.wcs.cdelt = np.asarray(wcs.wcs.cdelt) / s
    return out.to_header()


def drizzle(store, scale: float = 2.0, pixfrac: float = 0.9, kernel: str = "square", roi=None,
            output="drizzle.fits", tile: int = 1024, frames=None, rejection: bool = True,
            weights: bool = True, normalization: bool = True, distortion: bool = True, coverage: bool = True,
            overwrite: bool = False, force: bool = False, white_balance: str = "none",
            align_channels: bool = True) -> xr.Dataset:
    """Drizzle the registered frames of a store onto a finer output grid.

    Every input pixel of every selected frame is mapped through its registration onto
    an output grid ``scale`` times finer than the reference frame, shrunk by
    ``pixfrac`` and spread over the output pixels it overlaps with ``kernel``
    (Fruchter & Hook 2002). Each output pixel is the weighted mean of what landed on
    it, with weight = frame weight x (not rejected) x overlap / drop area.

    Parameters
    ----------
    store : path-like
        A stack store with a completed ``register`` step.
    scale : float
        Output pixels per reference pixel (2 doubles the resolution; below 1 works).
    pixfrac : float
        Drop size as a fraction of an input pixel, in (0, 1].
    kernel : str
        ``square``, ``point``, ``turbo``, ``gaussian``, ``lanczos2`` or ``lanczos3``.
    roi : (x0, y0, width, height), optional
        Region of the reference frame to drizzle (reference pixels); default all of it.
        Its cost is proportional to its area. An ROI reaching beyond the reference
        frame is clipped to it, with a warning (:func:`drizzlestack.tiled.clip_roi`).
    output : path-like or None
        FITS file to write (image, ``WEIGHTS``, ``COVERAGE``); ``None`` for the store only.
    tile : int
        Output tile size in pixels: one Dask task per tile.
    frames : sequence of int, optional
        Frame indices; default every frame with status ``ok`` and a registration. A
        requested frame whose status is not ``ok`` is left out with a warning (as
        :func:`integrate` does); one without a registration is refused.
    rejection, weights, normalization, distortion : bool
        Use the integration's per-pixel rejection flags, its frame weights, its
        normalization, and the registration's distortion model, when present.
    coverage : bool
        Also count the frames that contributed to each output pixel.
    overwrite : bool
        Replace an existing ``output`` file.
    force : bool
        Drizzle even if the store already holds a drizzle made with the same
        parameters from the same registration and integration (and ``output`` exists).
        By default (as for :func:`register` and :func:`integrate`) such a drizzle is
        returned as it is, and an interrupted one resumes.
    white_balance : str
        Colour stores: ``none`` (default: the sensor's raw colours, as Siril and
        PixInsight), ``camera`` (the as-shot multipliers of raw files, recorded at
        ingest) or ``neutral`` (each channel's sky brought to green's, from the
        integration's per-channel sky of the reference frame). Multiplicative about the
        black levels and folded into the per-channel normalization, so it costs nothing
        (:mod:`drizzlestack.whitebalance`); recorded in the FITS header (``WBALANCE``,
        ``WBR``, ``WBG``, ``WBB``). Refused for grey stores.
    align_channels : bool
        Colour stores: measure how far red and blue sit from green on the frames' stars
        (atmospheric dispersion, lateral colour:
        :func:`drizzlestack.channel_alignment.measure_channel_offsets`) and shift their
        drops by minus that, so that the three channels' stars coincide. Recorded in
        the FITS header (``CHALIGN``, ``CHOFFRX`` ... ``CHOFFBY``: the offsets removed,
        reference px); with too few stars to measure, a warning and no shift. Ignored
        for grey stores.

    Returns
    -------
    xarray.Dataset
        ``drizzle`` (image, NaN where nothing landed), ``drizzle_weights`` (raw sums)
        and ``drizzle_coverage``, lazily from the store.

    Raises
    ------
    StoreError
        The store is not registered.
    DrizzlestackError
        A bad parameter, or no frame left to drizzle.
    """
    _check_parameters(scale, pixfrac, kernel, tile)
    white_balance = _wb.check_white_balance(white_balance)
    if kernel.startswith("lanczos") and pixfrac != 1.0:
        # Warned once here rather than by the kernel in every tile.
        warnings.warn(f"kernel={kernel!r} ignores pixfrac={pixfrac:g} (as STScI drizzle does); using 1",
                      DrizzlestackWarning, stacklevel=2)
        pixfrac = 1.0
    st = StackStore.open(store)
    require_registration(st)
    stack = open_stack(st)
    ref_shape = st.frame_shape
    roi = clip_roi(roi, ref_shape)
    if roi is None:
        roi = (0, 0, ref_shape[1], ref_shape[0])
    out_path = check_output_path(output, overwrite)
    indices, _ = select_frames(st, frames, refuse_unregistered=True, step="drizzle")
    grid = OutputGrid.from_reference(ref_shape, scale, roi)
    if min(grid.shape) < 1:
        raise DrizzlestackError(f"roi={roi} at scale={scale}: the output would be empty")

    from ..mappings import frame_mapping

    frame_w = _frame_values(stack, "weight", indices, 1.0) if weights else np.ones(len(indices))
    if normalization:
        n_scale = _frame_values(stack, "norm_scale", indices, 1.0)
        n_offset = _frame_values(stack, "norm_offset", indices, 0.0)
    else:
        n_scale, n_offset = np.ones(len(indices)), np.zeros(len(indices))
    saturation = _frame_values(stack, "saturation", indices, np.inf)
    pattern = st.cfa_pattern
    channel_scale = _channel_values(stack, "norm_scale", indices, 1.0) if (normalization and pattern) else None
    channel_offset = _channel_values(stack, "norm_offset", indices, 0.0) if (normalization and pattern) else None
    channel_weight = _channel_values(stack, "weight", indices, 0.0) if (weights and pattern) else None
    wb = _wb.balance(white_balance, stack, indices, int(st.attrs.get("reference") or 0), store=str(store))
    if wb is not None:
        channel_scale, channel_offset = _balanced_norm(wb, stack, indices, n_scale, n_offset, channel_scale,
                                                       channel_offset)
    use_rejection = bool(rejection and OUTLIERS_VARIABLE in stack)
    if rejection and not use_rejection and "rejection" in stack:
        # A store integrated before the flags moved into the frames' own pixels (or with
        # rejection="none"): the reference-grid flags must not be used (they hit stars).
        rec = st.step("integrate") or {}
        if (rec.get("summary") or {}).get("rejection", "none") != "none":
            warnings.warn(f"{store}: the integration has no outlier flags in the frames' own pixels (it predates "
                          f"them); drizzling without rejection -- rerun 'drizzlestack integrate {store} --force'",
                          DrizzlestackWarning, stacklevel=2)
    # The registration's small per-frame variables, loaded once (not one dask compute
    # per frame and variable).
    registration = stack[[v for v in stack.data_vars if v in ("transform", "status") or v.startswith("distortion")]]
    registration = registration.load()
    plans = []
    for k, i in enumerate(indices):
        mapping = frame_mapping(registration, i, distortion=distortion)
        psr = _mapping_scale(mapping, grid.ref_to_out, ref_shape)
        channel_norm = None
        if channel_scale is not None and channel_offset is not None:
            channel_norm = (tuple(channel_scale[k]), tuple(channel_offset[k]))
        plans.append(FramePlan(i, mapping, grid.ref_to_out, float(frame_w[k]), float(n_scale[k]),
                               float(n_offset[k]), float(saturation[k]), float(psr), channel_norm,
                               None if channel_weight is None else tuple(channel_weight[k])))
    pad = max(_kernel_pad(kernel, pixfrac, fp.pixel_scale_ratio) for fp in plans)
    plan = DrizzlePlan(st.location, ref_shape, grid, kernel, float(pixfrac), plans, use_rejection, pad, coverage,
                       cfa_pattern=pattern)

    params = {"scale": scale, "pixfrac": pixfrac, "kernel": kernel, "roi": list(roi), "tile": tile,
              "frames": indices, "rejection": use_rejection, "weights": weights, "normalization": normalization,
              "distortion": distortion, "coverage": coverage}
    if pattern:  # (grey runs keep their digest)
        params["cfa_pattern"] = pattern
        params["align_channels"] = bool(align_channels)
    if wb is not None:  # (unbalanced runs keep their digest)
        params["white_balance"] = white_balance
    # The upstream steps' completion stamps: a rerun of either makes this drizzle stale.
    inputs = {step: [(st.step(step) or {}).get("digest"), (st.step(step) or {}).get("finished")]
              for step in ("ingest", "register", "integrate")}
    inputs["n_frames"] = st.n_frames
    if (not force and st.is_current("drizzle", params, inputs) and "drizzle" in st.group
            and (out_path is None or output_exists(out_path))):
        return open_stack(st)[list(OUTPUT_VARIABLES)]
    # Measured after the up-to-date check above (it reads frames): a function of the
    # registration and the frames only, so a resumed run measures the same offsets.
    offsets = None
    if pattern and align_channels:
        from ..channel_alignment import offsets_to_remove

        offsets = offsets_to_remove(st, indices, distortion, name=store)
    if offsets is not None:
        # The channels' drops move by minus their offset (output px); the windows read
        # that much further (the offset is in reference px, about input px).
        plan.channel_shift = -(offsets.offset @ np.asarray(grid.ref_to_out, np.float64)[:2, :2].T)
        plan.pad += float(np.max(np.abs(offsets.offset)))
    ny, nx = grid.shape
    chunks = (min(tile, ny), min(tile, nx))
    tiles = (-(-ny // chunks[0]), -(-nx // chunks[1]))
    # Colour: the ledger holds per channel the maximum weight and the counts of output
    # pixels this channel missed while another covered them, and that any covered.
    width = 2 + 2 * plan.n_channels if pattern else 1
    _check_worker_memory(tile, chunks, scale, pad)
    lead, dims = ((plan.n_channels,), ("channel",)) if pattern else ((), ())

    def create():
        st.begin_step("drizzle", params, inputs)
        for name, dtype, fill in (("drizzle", "float32", np.nan), ("drizzle_weights", "float32", 0.0),
                                  ("drizzle_coverage", "uint16", 0)):
            # one channel per chunk: chunks the size of the grey ones (a 3-plane chunk encoded
            # and wrote at half the speed per byte). Blosc LZ4 + shuffle, as the frames: on
            # a drizzled float32 tile it encodes 5-6x faster than zarr's default zstd and
            # stores 10 % less (benchmarks/README.md, colour drizzle); a colour drizzle
            # writes three times the data of a grey one.
            st.create_variable(name, lead + (ny, nx), dims + ("drizzle_y", "drizzle_x"), (1,) * len(lead) + chunks,
                               dtype, fill, compressors=FRAME_CODEC)

    # An interrupted run with the same parameters and inputs keeps its finished tiles
    # (even when forced: tiles are deterministic, a redone tile would be identical).
    done = start_or_resume(st, "drizzle", params, inputs, tiles=tiles, width=width, tile=tile,
                           products=OUTPUT_VARIABLES, create=create, what="drizzle")
    plan.tile, plan.done = (int(chunks[0]), int(chunks[1])), done
    # One task per tile: it drizzles the tile, writes it into the store and records it
    # in the ledger, and returns only the tile's ledger row (its maximum weight first,
    # for the WEIGHTS normalization). Nothing large passes between tasks or workers.
    ledger = run_tiles(_tile_task, plan, tiles, width).reshape(-1, width)
    per_tile = ledger[:, 0]
    max_weight = float(np.max(per_tile))
    total_exptime = float(np.nansum(_frame_values(stack, "exptime", indices, np.nan)))
    summary = {}
    max_weights_rgb = None
    if pattern:
        n = plan.n_channels
        max_weights_rgb = [float(v) for v in np.max(ledger[:, 1:1 + n], axis=0)]
        missed = ledger[:, 1 + n:1 + 2 * n].sum(axis=0)
        covered = float(ledger[:, 1 + 2 * n].sum())
        dry = {c: float(m / covered) if covered else 0.0 for c, m in zip(_cfa.CHANNELS, missed)}
        summary = {"max_weight_rgb": max_weights_rgb, "dry_fraction_rgb": dry}
        if offsets is not None:
            summary["channel_offsets"] = offsets.as_dict()
        _warn_dry_channels(dry, len(indices), scale, pixfrac)
    st.end_step("drizzle", frames=len(indices), shape=[ny, nx], max_weight=max_weight,
                output=str(out_path) if out_path else None, **summary)
    if out_path is not None:
        _write_fits(out_path, st, stack, plan, params, indices, max_weights_rgb or max_weight, total_exptime,
                    coverage, wb, offsets)
    return open_stack(st)[list(OUTPUT_VARIABLES)]


def _balanced_norm(wb, stack, indices, n_scale, n_offset, channel_scale, channel_offset):
    """Per-channel ``(scale, offset)`` ``(n, 3)`` of the normalization followed by the
    white balance ``wb``: the balance is folded into the affine map each sample gets
    anyway. Normalized data are in the reference frame's units (its black levels);
    without a per-channel normalization each frame keeps its own units and black."""
    n = len(indices)
    if channel_scale is not None and channel_offset is not None:
        ref = int(stack.attrs.get("reference") or 0)
        black = np.tile(_wb.reference_black(stack, ref), (n, 1))
    else:
        channel_scale = np.repeat(np.asarray(n_scale, np.float64)[:, None], len(_cfa.CHANNELS), axis=1)
        channel_offset = np.repeat(np.asarray(n_offset, np.float64)[:, None], len(_cfa.CHANNELS), axis=1)
        black = _wb.black_levels(stack, indices)
    return wb.fold(np.asarray(channel_scale, np.float64), np.asarray(channel_offset, np.float64), black)


#: A colour channel missing from more than this fraction of the covered output pixels warns.
DRY_WARNING = 0.001


def _warn_dry_channels(dry: dict, n_frames: int, scale, pixfrac) -> None:
    worst = {c: f for c, f in dry.items() if f > DRY_WARNING}
    if worst:
        listed = ", ".join(f"{c} {100 * f:.1f} %" for c, f in dry.items())
        warnings.warn(f"colour drizzle of {n_frames} frame(s) at scale={scale:g}, pixfrac={pixfrac:g} leaves "
                      f"output pixels without a sample of their colour (dry fraction of the covered pixels: "
                      f"{listed}); red and blue have a quarter of the samples: use more frames, a larger "
                      "pixfrac or a smaller scale", DrizzlestackWarning, stacklevel=3)


#: bytes per output pixel of a tile task (two float64 accumulators, the float64 result
#: cube, coverage, the finalized image) and per input pixel of a frame's window (data,
#: weights, pixmap, reference coordinates, normalized copy); 64 MB measured for a
#: 1024 px tile at scale 2, 68 MB by these figures
BYTES_PER_OUTPUT_PIXEL = 50
BYTES_PER_INPUT_PIXEL = 60


def tile_memory(tile_shape, scale: float, pad: float) -> int:
    """Peak bytes of one drizzle tile task: the output tile and one frame's input window
    (frames are drizzled one after the other)."""
    ty, tx = tile_shape
    window = (ty / scale + 2 * pad + 2) * (tx / scale + 2 * pad + 2)
    return int(BYTES_PER_OUTPUT_PIXEL * ty * tx + BYTES_PER_INPUT_PIXEL * window)


def _check_worker_memory(tile: int, chunks, scale: float, pad: float) -> None:
    """Stop before any tile runs when the workers' memory limit cannot hold them."""
    from ..parallel import check_task_memory

    def advice(fit: int) -> str:
        t = int(tile)
        while t > 64 and tile_memory((min(t, chunks[0]), min(t, chunks[1])), scale, pad) > fit:
            t //= 2
        return f"--tile {t}" if tile_memory((min(t, chunks[0]), min(t, chunks[1])), scale, pad) <= fit else ""

    check_task_memory("drizzle", tile_memory(chunks, scale, pad), f"tiles of {chunks[0]} x {chunks[1]} px", advice)


def _tile_task(plan: DrizzlePlan, iy: int, ix: int) -> np.ndarray:
    """Drizzle output tile ``(iy, ix)``, write it into the store, record it in the
    ledger; returns its ledger row (maximum weight first)."""
    ny, nx = plan.grid.shape
    y0, x0 = iy * plan.tile[0], ix * plan.tile[1]
    y1, x1 = min(y0 + plan.tile[0], ny), min(x0 + plan.tile[1], nx)
    image, weights, cover = drizzle_tile(plan, y0, y1, x0, x1)
    region = (slice(None), slice(y0, y1), slice(x0, x1)) if plan.cfa_pattern else (slice(y0, y1), slice(x0, x1))
    # Whole chunks, encoded and written in this task's thread (DirectArray).
    DirectArray(plan.store, "drizzle", "r+")[region] = image
    DirectArray(plan.store, "drizzle_weights", "r+")[region] = weights
    DirectArray(plan.store, "drizzle_coverage", "r+")[region] = cover if cover is not None else 0
    if plan.cfa_pattern:
        plane_max = [float(w.max()) for w in weights]
        wet = [np.count_nonzero(w > 0) for w in weights]
        any_wet = np.count_nonzero((weights > 0).any(axis=0))
        # a channel's wet pixels are among any channel's: missed = covered - its own
        values = [max(plane_max)] + plane_max + [float(any_wet - n) for n in wet] + [float(any_wet)]
    else:
        values = [float(weights.max())]
    record_tile(plan.store, "drizzle", iy, ix, values)
    return np.asarray(values, np.float64)


def _write_fits(path, st, stack, plan, params, indices, max_weight, total_exptime, coverage, wb=None,
                offsets=None):
    """The FITS product: image, ``WEIGHTS`` (normalized to a maximum of 1, per channel for
    colour) and ``COVERAGE``; colour products are 3 x H x W cubes in R, G, B order (no
    ``BAYERPAT``: they are not mosaics any more)."""
    grid = plan.grid
    ref = st.attrs.get("reference")
    header = fits.Header()
    header["DRIZSCAL"] = (grid.scale, "output px per reference px")
    header["DRIZPIXF"] = (plan.pixfrac, "drizzle drop size (pixfrac)")
    header["DRIZKERN"] = (plan.kernel, "drizzle kernel")
    header["NDRIZIM"] = (len(indices), "number of frames drizzled")
    header["DRIZROIX"] = (grid.x0, "ROI x0 in reference pixels")
    header["DRIZROIY"] = (grid.y0, "ROI y0 in reference pixels")
    header["DRIZROIW"] = (grid.width, "ROI width in reference pixels")
    header["DRIZROIH"] = (grid.height, "ROI height in reference pixels")
    header["EXPTIME"] = (total_exptime, "total exposure of the frames [s]")
    header["REFFRAME"] = (ref if ref is not None else -1, "reference frame index in the store")
    header["CREATOR"] = (f"drizzlestack {__version__}", "software")
    header["DATE"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if ref is not None:
        wcs_header = output_wcs_header(str(stack["header"].values[int(ref)]), grid)
        if wcs_header is not None:
            header.update(wcs_header)
    if plan.cfa_pattern:
        header["CHANNELS"] = ("R G B", "planes of the cube (NAXIS3)")
        header["DRIZCFA"] = (plan.cfa_pattern, "Bayer pattern of the drizzled mosaics")
        header["WBALANCE"] = (wb.method if wb is not None else "none", "white balance (none, camera, neutral)")
        if wb is not None:
            for c, g in zip(_cfa.CHANNELS, wb.gains):
                header[f"WB{c}"] = (float(g), f"{c} gain about its black level (G = 1)")
        from ..channel_alignment import header_cards

        for key, value, comment in header_cards(offsets):
            header[key] = (value, comment)
    for key, value in params.items():
        header.add_history(f"drizzlestack drizzle {key}={value}")
    hdus = [(header, DirectArray(st.location, "drizzle"), None)]
    wh = fits.Header()
    wh["EXTNAME"] = "WEIGHTS"
    if plan.cfa_pattern:
        norms = [w if w > 0 else 1.0 for w in max_weight]
        factor = [1.0 / w for w in norms]
        for c, w in zip(_cfa.CHANNELS, norms):
            wh[f"WGTNORM{c}"] = (w, f"raw {c} weight = WGTNORM{c} * WEIGHTS[{c}]")
    else:
        factor = 1.0 / max_weight if max_weight > 0 else 1.0
        wh["WGTNORM"] = (max_weight if max_weight > 0 else 1.0, "raw weight = WGTNORM * WEIGHTS")
    hdus.append((wh, DirectArray(st.location, "drizzle_weights"), factor))
    if coverage:
        ch = fits.Header()
        ch["EXTNAME"] = "COVERAGE"
        ch["BUNIT"] = ("frames", "number of frames that contributed")
        hdus.append((ch, DirectArray(st.location, "drizzle_coverage"), None))
    write_streamed(path, hdus)
