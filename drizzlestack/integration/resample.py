"""The registered view: every frame resampled onto the reference grid, lazily, tile by tile.

For each output tile the reference pixel centres are mapped into a frame through
``FrameMapping.inverse``; :func:`drizzlestack.geometry.input_window` (the one halo-aware
window planner) tells which window of the frame holds their interpolation support, and
only that window is read from the store. One Dask task computes one spatial tile of
every frame, so the view is chunked ``(frame=all, y=tile, x=tile)`` and memory per task
is ``tile**2 * frames``, independent of the image size.

Interpolation is clamped Lanczos-3: the 6x6 Lanczos-3 sum, then limited to the range of
the 2x2 pixels around the sample point. Plain Lanczos rings (negative lobes) next to
saturated, flat-topped star cores and hot pixels, and those ringing dips would later be
rejected as low outliers -- the origin of "black" or "hollow" star cores. Clamping to
the nearest neighbours removes the overshoot while keeping Lanczos' sharpness on smooth
data (where the 2x2 range already contains the Lanczos value).

No-data rules (docs/design.md: NaN means no data and never spreads): a sample whose position
is outside the frame (``x < -0.5`` or ``x > nx - 0.5``, likewise y) or whose nearest
pixel is NaN is NaN; a sample with a NaN elsewhere in its Lanczos support falls back to
bilinear interpolation over the valid pixels of its 2x2 neighbourhood.

A sample is *saturated* when any of its 2x2 neighbours is at or above the frame's
saturation level; rejection treats those samples as trustworthy lower bounds rather
than as outliers (see :mod:`.integrate`).
"""

from __future__ import annotations

import math

import dask.array as da
import numba
import numpy as np

from dask.base import tokenize

from .. import cfa as _cfa
from .._warnings import DrizzlestackError
from ..geometry import input_window, pixel_grid, translation
from ..lanczos import LUT_DENSITY, lanczos_taps
from ..mappings import frame_mappings
from ..chunkio import DirectArray
from ..store import content_token
from ..tiled import require_registration, select_frames

#: input pixels beyond a sample's position that Lanczos-3 reads (taps -2..+3, plus one
#: pixel of slack for the window planner's rounding)
LANCZOS3_PAD = 4.0


# Six trigonometric calls per sample cost more than the whole 6x6 sum, so the weights
# are tabulated (the one Lanczos table of the package, shared with drizzle) and
# linearly interpolated between fractional parts q / steps; numba freezes the table
# into the compiled function.
_LANCZOS3_STEPS = LUT_DENSITY
_LANCZOS3_TABLE = lanczos_taps(3)


@numba.njit(nogil=True, cache=True)
def _lanczos3_weights(f, w):
    """Lanczos-3 weights of the taps at offsets -2..3 from ``floor(x)`` for the fractional
    part ``f`` of ``x`` (written into ``w``); returns their sum."""
    p = f * _LANCZOS3_STEPS
    q = int(p)
    if q >= _LANCZOS3_STEPS:
        q = _LANCZOS3_STEPS - 1
    r = p - q
    total = 0.0
    for j in range(6):
        val = _LANCZOS3_TABLE[q, j] + r * (_LANCZOS3_TABLE[q + 1, j] - _LANCZOS3_TABLE[q, j])
        w[j] = val
        total += val
    return total


@numba.njit(nogil=True, cache=True)
def _clampi(i, n):
    return 0 if i < 0 else (n - 1 if i >= n else i)


@numba.njit(nogil=True, cache=True)
def _sample(src, y0, x0, frame_ny, frame_nx, x, y, saturation, wx, wy):
    """The clamped Lanczos-3 value of one sample and its saturation flag, every rule in
    full (frame edge, window edge, NaN fallbacks): the reference that the fast path of
    :func:`_resample_row` reproduces bit for bit on interior samples without NaN, and
    what it falls back to for every other sample. ``wx``, ``wy``: scratch (6,)."""
    h, w = src.shape
    if not (x >= -0.5 and x <= frame_nx - 0.5 and y >= -0.5 and y <= frame_ny - 0.5):
        return np.nan, False  # also catches NaN coordinates
    u = x - x0
    v = y - y0
    iu = int(math.floor(u))
    iv = int(math.floor(v))
    fu = u - iu
    fv = v - iv
    nu = _clampi(int(math.floor(u + 0.5)), w)
    nv = _clampi(int(math.floor(v + 0.5)), h)
    if not np.isfinite(src[nv, nu]):
        return np.nan, False
    # 2x2 neighbourhood: clamp range, saturation, bilinear fallback.
    lo = np.inf
    hi = -np.inf
    bsum = 0.0
    bw = 0.0
    sat = False
    for dv in range(2):
        rv = _clampi(iv + dv, h)
        wgt_v = fv if dv == 1 else 1.0 - fv
        for du in range(2):
            ru = _clampi(iu + du, w)
            val = src[rv, ru]
            if np.isfinite(val):
                if val < lo:
                    lo = val
                if val > hi:
                    hi = val
                if val >= saturation:
                    sat = True
                wgt = wgt_v * (fu if du == 1 else 1.0 - fu)
                bsum += wgt * val
                bw += wgt
    sx = _lanczos3_weights(fu, wx)
    sy = _lanczos3_weights(fv, wy)
    acc = 0.0
    complete = True
    for a in range(6):
        rv = _clampi(iv + a - 2, h)
        row = 0.0
        for b in range(6):
            val = src[rv, _clampi(iu + b - 2, w)]
            if not np.isfinite(val):
                complete = False
                break
            row += wx[b] * val
        if not complete:
            break
        acc += wy[a] * row
    if complete:
        value = acc / (sx * sy)
        if value < lo:
            value = lo
        elif value > hi:
            value = hi
    else:
        value = bsum / bw if bw > 0 else np.nan
    return value, sat


# The fast path works a row of samples at a time in stages whose loops LLVM vectorizes
# (8 float64 lanes): positions, weights, then the 36 taps over *runs* of samples whose
# support rows are the same and whose support columns step by one pixel -- nearly every
# sample of a registration's near-identity mapping -- so that each tap is one contiguous
# vector load across 8 samples instead of a gather. Each sample's arithmetic is the
# reference's (same operations, same order), so the values are identical; samples off
# the fast path (window edges, NaN in the support) take :func:`_sample`.
@numba.njit(nogil=True, cache=True, error_model="numpy")
def _row_setup(xrow, yrow, x0, y0, frame_ny, frame_nx, h, w, fu, fv, iu, iv, fast):
    """Per sample of a row: whether it can take the fast path (inside the frame, support
    inside the window), and its support corner and fractional position."""
    for i in range(xrow.shape[0]):
        x = xrow[i]
        y = yrow[i]
        u = x - x0
        v = y - y0
        lu = math.floor(u)
        lv = math.floor(v)
        ok = ((x >= -0.5) & (x <= frame_nx - 0.5) & (y >= -0.5) & (y <= frame_ny - 0.5)
              & (lu >= 2.0) & (lu + 3.0 < w) & (lv >= 2.0) & (lv + 3.0 < h))  # False for NaN
        fast[i] = ok
        lu = lu if ok else 2.0  # harmless values where the sample is not fast
        lv = lv if ok else 2.0
        fu[i] = u - lu if ok else 0.0
        fv[i] = v - lv if ok else 0.0
        iu[i] = int(lu)
        iv[i] = int(lv)


@numba.njit(nogil=True, cache=True)
def _row_weights(f, weights, total):
    """:func:`_lanczos3_weights` for every fractional part ``f`` of a row: ``weights``
    (6, n), ``total`` (n,)."""
    for i in range(f.shape[0]):
        p = f[i] * _LANCZOS3_STEPS
        q = min(int(p), _LANCZOS3_STEPS - 1)
        r = p - q
        s = 0.0
        for j in range(6):
            val = _LANCZOS3_TABLE[q, j] + r * (_LANCZOS3_TABLE[q + 1, j] - _LANCZOS3_TABLE[q, j])
            weights[j, i] = val
            s += val
        total[i] = s


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _run_taps(flat, corner, stride, wx, wy, sx, sy, i0, n, saturation, acc_out, value, sat):
    """Samples ``i0 .. i0 + n`` of a row whose support starts at flat index ``corner +
    k`` (support row stride ``stride``): the 6x6 sum, the 2x2 clamp and saturation.
    Unsigned indices: no negative-index wraparound code in the vector loop."""
    one = np.uint64(1)
    for k in range(n):
        i = i0 + np.uint64(k)
        p = corner + np.uint64(k)
        acc = 0.0
        for a in range(6):
            q = p + np.uint64(a) * stride
            row = wx[0, i] * flat[q]
            row += wx[1, i] * flat[q + one]
            row += wx[2, i] * flat[q + np.uint64(2)]
            row += wx[3, i] * flat[q + np.uint64(3)]
            row += wx[4, i] * flat[q + np.uint64(4)]
            row += wx[5, i] * flat[q + np.uint64(5)]
            acc += wy[a, i] * row
        c = p + np.uint64(2) * stride + np.uint64(2)  # the 2x2 neighbourhood's first pixel
        p00 = flat[c]
        p01 = flat[c + one]
        p10 = flat[c + stride]
        p11 = flat[c + stride + one]
        lo = min(min(p00, p01), min(p10, p11))
        hi = max(max(p00, p01), max(p10, p11))
        v = acc / (sx[i] * sy[i])
        v = lo if v < lo else (hi if v > hi else v)
        acc_out[i] = acc
        value[i] = v
        sat[i] = hi >= saturation


@numba.njit(nogil=True, cache=True)
def _resample_row(src, flat, y0, x0, frame_ny, frame_nx, xrow, yrow, saturation, out, saturated, j, scratch,
                  iscratch, fast, bscratch, wx, wy):
    """Resample row ``j`` of the samples (positions ``xrow``, ``yrow``) in every plane of
    ``src`` (p, h, w) into ``out[:, j]``, ``saturated[:, j]``."""
    planes, h, w = src.shape
    n = xrow.shape[0]
    fu, fv, sx, sy, acc, value = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], scratch[5]
    wxs, wys = scratch[6:12], scratch[12:18]
    iu, iv = iscratch[0], iscratch[1]
    _row_setup(xrow, yrow, x0, y0, frame_ny, frame_nx, h, w, fu, fv, iu, iv, fast)
    _row_weights(fu, wxs, sx)
    _row_weights(fv, wys, sy)
    stride = np.uint64(w)
    plane_size = np.uint64(h * w)
    for c in range(planes):
        plane0 = np.uint64(c) * plane_size
        i = 0
        while i < n:
            if not fast[i]:
                i += 1
                continue
            start = i
            u0 = iu[i]
            v0 = iv[i]
            i += 1
            while i < n and fast[i] and iv[i] == v0 and iu[i] == u0 + (i - start):
                i += 1
            corner = plane0 + np.uint64((v0 - 2) * w + u0 - 2)
            _run_taps(flat, corner, stride, wxs, wys, sx, sy, np.uint64(start), np.uint64(i - start), saturation,
                      acc, value, bscratch)
        plane = src[c]
        for i in range(n):
            if fast[i] and np.isfinite(acc[i]):
                out[c, j, i] = value[i]
                saturated[c, j, i] = bscratch[i]
            else:
                v, s = _sample(plane, y0, x0, frame_ny, frame_nx, xrow[i], yrow[i], saturation, wx, wy)
                out[c, j, i] = v
                saturated[c, j, i] = s


@numba.njit(nogil=True, cache=True)
def _row_nearest_flags(flags, y0, x0, xrow, yrow, out):
    """Flag of the nearest window pixel of every sample of a row (0 outside the window);
    NaN positions are outside."""
    fh, fw = flags.shape
    for i in range(xrow.shape[0]):
        x = xrow[i] if np.isfinite(xrow[i]) else -1e9
        y = yrow[i] if np.isfinite(yrow[i]) else -1e9
        ix = math.floor(x + 0.5) - x0
        iy = math.floor(y + 0.5) - y0
        if ix >= 0 and ix < fw and iy >= 0 and iy < fh:
            out[i] = flags[int(iy), int(ix)]
        else:
            out[i] = 0


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _resample(src, y0, x0, frame_ny, frame_nx, xs, ys, matrix, oy, ox, saturation, out, saturated, flags,
              projected):
    """Clamped Lanczos-3 resampling of the planes ``src`` (p, h, w) of one frame window at
    the positions ``xs``, ``ys`` (ty, tx), or, when ``xs`` is empty, at the reference
    pixels ``(ox + i, oy + j)`` mapped through the homography ``matrix`` (the operations
    of :func:`drizzlestack.geometry.apply_homography`, so the same positions). With a
    non-empty ``flags`` window, ``projected`` (ty, tx) receives each sample's nearest
    flag."""
    planes, h, w = src.shape
    ty, tx = out.shape[1], out.shape[2]
    flat = src.ravel()
    scratch = np.empty((18, tx))
    iscratch = np.empty((2, tx), np.int64)
    fast = np.empty(tx, np.bool_)
    bscratch = np.empty(tx, np.bool_)
    wx = np.empty(6)
    wy = np.empty(6)
    mapped = xs.shape[0] == 0
    xrow = np.empty(tx)
    yrow = np.empty(tx)
    for j in range(ty):
        if mapped:
            yr = float(oy + j)
            for i in range(tx):
                xr = float(ox + i)
                wgt = matrix[2, 0] * xr + matrix[2, 1] * yr + matrix[2, 2]
                bad = wgt == 0.0  # mapped to infinity: no position (NaN)
                xrow[i] = np.nan if bad else (matrix[0, 0] * xr + matrix[0, 1] * yr + matrix[0, 2]) / wgt
                yrow[i] = np.nan if bad else (matrix[1, 0] * xr + matrix[1, 1] * yr + matrix[1, 2]) / wgt
        else:
            xrow[:] = xs[j]
            yrow[:] = ys[j]
        if flags.shape[0] > 0:
            _row_nearest_flags(flags, y0, x0, xrow, yrow, projected[j])
        _resample_row(src, flat, y0, x0, frame_ny, frame_nx, xrow, yrow, saturation, out, saturated, j, scratch,
                      iscratch, fast, bscratch, wx, wy)


_NO_POSITIONS = np.empty((0, 0))
_NO_FLAGS = np.empty((0, 0), np.uint8)
_IDENTITY = np.eye(3)


@numba.njit(nogil=True, cache=True)
def resample_lanczos3_clamped(src, y0, x0, frame_ny, frame_nx, xs, ys, saturation, out, saturated):
    """Clamped Lanczos-3 resampling of one frame window at arbitrary positions.

    Parameters
    ----------
    src : (h, w) float32
        Window of the frame whose first pixel is frame pixel ``(y0, x0)``.
    y0, x0 : int
    frame_ny, frame_nx : int
        Shape of the whole frame (samples outside it are NaN).
    xs, ys : (ty, tx) float64
        Frame coordinates of the samples.
    saturation : float
        Saturation level of the frame.
    out : (ty, tx) float32
        Receives the resampled values.
    saturated : (ty, tx) bool
        Receives True where a 2x2 neighbour is saturated.
    """
    ty, tx = xs.shape
    if ty == 0 or tx == 0:
        return
    h, w = src.shape
    _resample(src.reshape(1, h, w), y0, x0, frame_ny, frame_nx, xs, ys, np.eye(3), 0, 0, saturation,
              out.reshape(1, ty, tx), saturated.reshape(1, ty, tx), np.empty((0, 0), np.uint8),
              np.empty((0, 0), np.uint8))


def resample_window(window: np.ndarray, origin: tuple[int, int], frame_shape: tuple[int, int], x, y,
                    saturation: float = np.inf, out=None, saturated=None):
    """Resample a window of a frame at frame coordinates ``(x, y)`` (clamped Lanczos-3).

    Parameters
    ----------
    window : (h, w) array_like
        Pixels of the frame starting at ``origin = (y0, x0)``; must hold the
        interpolation support (:data:`LANCZOS3_PAD` pixels around every sample inside
        the frame), which :func:`drizzlestack.geometry.input_window` guarantees.
    origin : (y0, x0)
    frame_shape : (ny, nx)
        Shape of the whole frame: samples outside it are NaN.
    x, y : (ty, tx) array_like
        Sample positions in frame pixel coordinates.
    saturation : float
        Frame saturation level (for the ``saturated`` output).
    out, saturated : ndarray, optional
        Output arrays (float32 and bool of the samples' shape).

    Returns
    -------
    values : (ty, tx) float32
    saturated : (ty, tx) bool
    """
    xs = np.ascontiguousarray(x, dtype=np.float64)
    ys = np.ascontiguousarray(y, dtype=np.float64)
    if out is None:
        out = np.empty(xs.shape, np.float32)
    if saturated is None:
        saturated = np.empty(xs.shape, np.bool_)
    src = np.ascontiguousarray(window, dtype=np.float32)
    sat = float(saturation) if saturation is not None and np.isfinite(saturation) else np.inf
    resample_lanczos3_clamped(src, int(origin[0]), int(origin[1]), int(frame_shape[0]), int(frame_shape[1]),
                              xs, ys, sat, out, saturated)
    return out, saturated


# ------------------------------------------------------------------ frames and mappings
def _open_frames(path: str) -> DirectArray:
    # Opened per task, not cached: an append resizes ``frames`` and a cached handle would
    # keep the old shape. Opening costs one small metadata read. The reader decodes
    # chunks in the task's own thread, so that tasks read in parallel.
    return DirectArray(path, "frames")


def tile_box(sy: slice, sx: slice, roi_origin: tuple[int, int] = (0, 0)) -> tuple[float, float, float, float]:
    """Pixel-edge box ``(x0, y0, x1, y1)`` on the reference grid of an output tile given
    in output-array slices (the output array starts at reference pixel ``roi_origin =
    (y0, x0)``)."""
    oy, ox = roi_origin
    return (ox + sx.start - 0.5, oy + sy.start - 0.5, ox + sx.stop - 0.5, oy + sy.stop - 0.5)


def resample_tile(frames, indices, mappings, sy: slice, sx: slice, frame_shape, saturation=None,
                  roi_origin: tuple[int, int] = (0, 0), out=None, saturated=None, outliers=None, projected=None,
                  pattern: str = "", sky=None, noise=None, sharp: bool = True, channel_offset=None):
    """One spatial tile of the registered view, for the frames ``indices``.

    Parameters
    ----------
    frames : array_like (frame, y, x)
        The store's ``frames`` (a :class:`~drizzlestack.store.DirectArray`, or numpy in tests); only the input window
        of each frame is read.
    indices : sequence of int
        Frames to resample.
    mappings : sequence of FrameMapping
        Their frame -> reference mappings.
    sy, sx : slice
        The tile, in output-array coordinates.
    frame_shape : (ny, nx)
    saturation : sequence of float, optional
        Saturation level per frame (``inf`` or ``None``: never saturated).
    roi_origin : (y0, x0)
        Reference pixel of the output array's first pixel.
    out, saturated : ndarray, optional
        ``(len(indices), ty, tx)`` float32 and bool outputs (colour: ``(3, len(indices),
        ty, tx)``).
    outliers : array_like (frame, y, x) uint8, optional
        Own-pixel outlier flags (:mod:`.outliers`): flagged pixels are no data for the
        interpolation, so a sample whose nearest pixel is flagged is NaN and one with a
        flagged pixel elsewhere in its support falls back to bilinear interpolation over
        the valid 2x2 pixels -- an outlier never leaks into its neighbours.
    projected : (n, ty, tx) uint8, optional
        With ``outliers``: receives the flag of each sample's nearest input pixel.
    pattern : str, optional
        Colour (Bayer) frames: each colour (0 = R, 1 = G, 2 = B) is first estimated at
        every pixel of the frame's own grid (:func:`drizzlestack.cfa.channel_planes`),
        then resampled like a grey frame; the outputs get a leading channel axis.
    sky, noise : (n, 3) array_like, optional
        Colour: each frame's background level and noise per colour (raw units), for the
        star test of the colour estimate (default: measured in each window).
    sharp : bool
        Colour: the star-sharp estimate (``True``, for the outlier model) or the
        flux-conserving bilinear one (``False``, for the integration image); see
        :func:`drizzlestack.cfa.channel_planes`.
    channel_offset : (3, 2) array_like, optional
        Colour: where each channel sits on the sky relative to green, ``(x, y)``
        reference px (:mod:`drizzlestack.channel_alignment`); each channel is then
        sampled that far away, so that the three come out aligned on green.

    Returns
    -------
    values : (n, ty, tx) float32, colour (3, n, ty, tx)
        NaN where a frame has no data.
    saturated : bool, the shape of ``values``
    """
    n = len(indices)
    shape = (sy.stop - sy.start, sx.stop - sx.start)
    colour = bool(pattern)
    lead = (len(_cfa.CHANNELS), n) if colour else (n,)
    if out is None:
        out = np.empty(lead + shape, np.float32)
    if saturated is None:
        saturated = np.zeros(lead + shape, np.bool_)
    xr = yr = None  # the reference pixels' positions, for a mapping the kernel cannot evaluate
    box = tile_box(sy, sx, roi_origin)
    for k, (i, mapping) in enumerate(zip(indices, mappings)):
        # colour: one more pixel for the 3x3 support of the channel estimate
        # (and as far again as a channel is sampled from its own position)
        reach = float(np.max(np.abs(channel_offset))) if (colour and channel_offset is not None) else 0.0
        window = input_window(mapping, box, frame_shape, pad=LANCZOS3_PAD + (1 if colour else 0) + reach)
        if window is None:
            out[..., k, :, :] = np.nan
            saturated[..., k, :, :] = False
            continue
        wy, wx = window
        data = np.asarray(frames[int(i), wy, wx], dtype=np.float32)
        sat = np.inf if saturation is None or saturation[k] is None else saturation[k]
        sat = float(sat) if np.isfinite(sat) else np.inf
        # A homography is evaluated inside the kernel, row by row (no position arrays);
        # a spline's positions come from its own (lattice) evaluation.
        homography = getattr(mapping, "is_homography", False)
        if homography:
            xf = yf = _NO_POSITIONS
        else:
            if xr is None:
                xr, yr = pixel_grid(shape, roi_origin[0] + sy.start, roi_origin[1] + sx.start)
            xf, yf = mapping.inverse(xr, yr)
            xf = np.ascontiguousarray(xf, dtype=np.float64)
            yf = np.ascontiguousarray(yf, dtype=np.float64)
        flags = _NO_FLAGS
        proj = _NO_FLAGS
        if outliers is not None:
            flags = np.ascontiguousarray(outliers[int(i), wy, wx], dtype=np.uint8)
            if projected is not None:
                proj = projected[k]
            bad = flags != 0
            if bad.any():
                data = data.copy()
                data[bad] = np.nan
            if projected is None:
                flags = _NO_FLAGS
        if colour:
            planes = _cfa.channel_planes(data, pattern, wy.start, wx.start, None if sky is None else sky[k],
                                         None if noise is None else noise[k], sat, sharp=sharp)
            src = np.ascontiguousarray(np.stack([np.asarray(pl, np.float32) for pl in planes]))
            values, sats = out[:, k], saturated[:, k]
        else:
            src = np.ascontiguousarray(data)[None]
            values, sats = out[k][None], saturated[k][None]
        matrix = mapping.inverse_matrix if homography else _IDENTITY
        args = (int(wy.start), int(wx.start), int(frame_shape[0]), int(frame_shape[1]))
        origin = (int(roi_origin[0] + sy.start), int(roi_origin[1] + sx.start))
        if colour and channel_offset is not None:
            # Channel c's star at reference p is at p + offset_c on its own sky: sampled
            # there. Green last, so that the projected flags are green's positions'.
            for c in (0, 2, 1):
                dx, dy = (float(v) for v in channel_offset[c])
                if homography:
                    mc, xc, yc = matrix @ translation(dx, dy), xf, yf
                else:
                    mc = _IDENTITY
                    xc, yc = (np.ascontiguousarray(v, dtype=np.float64) for v in mapping.inverse(xr + dx, yr + dy))
                _resample(src[c:c + 1], *args, xc, yc, mc, *origin, sat, values[c:c + 1], sats[c:c + 1], flags, proj)
            continue
        _resample(src, *args, xf, yf, matrix, *origin, sat, values, sats, flags, proj)
    return out, saturated


def _view_block(store_path, indices, mappings, frame_shape, roi_origin, factor, offset, pattern="", channel=None,
                block_info=None):
    info = block_info[None]
    (_, _), (y0, y1), (x0, x1) = info["array-location"]
    values, _ = resample_tile(_open_frames(store_path), indices, mappings, slice(y0, y1), slice(x0, x1),
                              frame_shape, None, roi_origin, pattern=pattern)
    if pattern:
        values = values[channel]
    if factor is not None:
        values *= np.asarray(factor, np.float32)[:, None, None]
        values += np.asarray(offset, np.float32)[:, None, None]
    return values


def usable_frames(store) -> list[int]:
    """Frames with status ``ok`` and a finite transform: the ones the view shows
    (:func:`drizzlestack.tiled.select_frames`)."""
    from ..store import StackStore

    st = store if isinstance(store, StackStore) else StackStore.open(store, mode="r")
    return select_frames(st)[0]


def registered_view(store, frames=None, tile: int = 512, roi=None, normalization=None, channel=None) -> da.Array:
    """The stack resampled onto the reference grid, as a lazy Dask array.

    Parameters
    ----------
    store : str, path-like or StackStore
        A registered stack store.
    frames : sequence of int, optional
        Frames to show (default: the usable ones, see :func:`usable_frames`).
    tile : int
        Spatial chunk size; one task computes one tile of every frame.
    roi : (x0, y0, width, height), optional
        Region of the reference grid (integers, reference pixels); default the whole frame.
    normalization : (factor, offset), optional
        Per-frame affine normalization ``v * factor + offset`` applied to the samples
        (arrays over the store's frames or over ``frames``; for a colour store also
        ``(frame, channel)`` arrays, as ``integrate`` writes them).
    channel : {0, 1, 2, "R", "G", "B"}
        Colour (Bayer) stores: the colour to show (required: a mosaic resampled as grey
        would mix colours); refused for grey stores.

    Returns
    -------
    dask.array.Array
        ``(frame, y, x)`` float32 chunked ``(len(frames), tile, tile)``; NaN where a
        frame has no data. Nothing is read until it is computed.
    """
    from ..store import StackStore

    st = store if isinstance(store, StackStore) else StackStore.open(store, mode="r")
    require_registration(st)
    pattern = st.cfa_pattern
    if pattern:
        names = {name: k for k, name in enumerate(_cfa.CHANNELS)}
        channel = names.get(str(channel).upper(), channel) if isinstance(channel, str) else channel
        if channel not in (0, 1, 2):
            raise DrizzlestackError(f"{st.path}: holds colour (Bayer {pattern}) frames; pass channel= 0/'R', 1/'G' "
                                    f"or 2/'B' (got {channel!r}): the view shows one colour at a time")
        channel = int(channel)
    elif channel is not None:
        raise DrizzlestackError(f"channel={channel!r}: {st.path} holds grey frames (no channels)")
    indices = usable_frames(st) if frames is None else [int(i) for i in frames]
    frame_shape = st.frame_shape
    (x0, y0, w, h) = (0, 0, frame_shape[1], frame_shape[0]) if roi is None else (int(v) for v in roi)
    mappings = frame_mappings(st, indices)
    n = len(indices)
    chunks = ((n,), _split(h, tile), _split(w, tile))
    factor = offset = None
    if normalization is not None:
        factor, offset = (np.asarray(a, np.float64)[indices] if len(a) != n else np.asarray(a, np.float64)
                          for a in normalization)
        if factor.ndim == 2:  # (frame, channel)
            factor, offset = factor[:, channel], offset[:, channel]
    path = st.location
    # The store's content token covers the frames and the whole registration (spline
    # included), not only the matrices: two stores or two registrations never share keys.
    name = "registered-view-" + tokenize(content_token(st, "frames"), indices, [m.matrix for m in mappings],
                                         roi, tile, factor, offset, channel)
    return da.map_blocks(
        _view_block, path, indices, mappings, frame_shape, (y0, x0), factor, offset, pattern, channel,
        chunks=chunks, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32), name=name,
    )


def _split(length: int, tile: int) -> tuple[int, ...]:
    full, rest = divmod(int(length), int(tile))
    return (int(tile),) * full + ((rest,) if rest else ())
