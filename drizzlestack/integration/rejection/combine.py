"""The weighted combine of what survives the rejection: the integration image and the
per-pixel rejection counts."""

from __future__ import annotations


import numpy as np
from numba import njit

from drizzlestack._warnings import DrizzlestackError

from .flags import _as_float, _check_stack, _is_dask
from .parameters import saturation_levels
from .sorting import FLAG_HIGH, FLAG_LOW, FLAG_RANGE, _wirth_median

@njit(nogil=True, cache=True, error_model="numpy")
def _combine_flagged_kernel(values, normalize, scale, offset, given, saturated, projected, weights, raw_weights,
                            saturation, range_low, range_high, flags, image, n_low, n_high, wsum, spread, counts,
                            sums):
    """:func:`combine_flagged` in one pass over the samples (see there); the operations
    and their order are those of normalizing in float32, :func:`rejection_flags` with
    method ``"none"`` (unless ``given``), the saturated and projected overrides, the
    weighted mean (a pixel whose values were all rejected takes the median of its
    non-range-rejected values, never 0; one without any valid value is NaN), the
    float32 weight sum and the kept samples' spread, so the results are the same to
    the bit. An empty ``saturated`` or ``projected`` means none."""
    nf, ny, nx = values.shape
    has_saturated = saturated.shape[0] > 0
    has_projected = projected.shape[0] > 0
    want_spread = spread.shape[0] > 0
    want_sums = sums.shape[0] > 0
    buf = np.empty(nf, np.float64)
    # A row at a time, frame by frame along it (every array read in order, the loop
    # vectorizable), each pixel's sums still taken in frame order.
    sw = np.empty(nx, np.float64)
    swx = np.empty(nx, np.float64)
    s1 = np.empty(nx, np.float64)
    s2 = np.empty(nx, np.float64)
    cnt = np.empty(nx, np.float64)
    ws = np.empty(nx, np.float32)
    cl = np.empty(nx, np.int64)
    ch = np.empty(nx, np.int64)
    nk = np.empty(nx, np.int64)
    for y in range(ny):
        nk[:] = 0
        sw[:] = 0.0
        swx[:] = 0.0
        s1[:] = 0.0
        s2[:] = 0.0
        cnt[:] = 0.0
        ws[:] = 0.0
        cl[:] = 0
        ch[:] = 0
        for f in range(nf):
            sc = scale[f]
            of = offset[f]
            sat = saturation[f]
            w = weights[f]
            rw = raw_weights[f]
            low = 0
            high = 0
            good = 0
            for x in range(nx):
                v32 = values[f, y, x]
                if normalize:
                    v32 = v32 * sc
                    v32 = v32 + of
                    values[f, y, x] = v32
                v = np.float64(v32)
                finite = v - v == 0
                if given:
                    code = flags[f, y, x]
                else:
                    code = 0 if (v > range_low) & (v < range_high) else FLAG_RANGE
                    code = 0 if v >= sat else code
                    code = code if finite else FLAG_RANGE
                if has_saturated and saturated[f, y, x]:
                    code = 0
                if has_projected:
                    p = projected[f, y, x]
                    code = FLAG_LOW if p & _OWN_LOW else code
                    code = FLAG_HIGH if p & _OWN_HIGH else code
                flags[f, y, x] = code
                is_low = (code & FLAG_LOW) != 0
                is_high = ((code & FLAG_HIGH) != 0) & ~is_low
                kept = (code == 0) & finite
                cl[x] += is_low
                ch[x] += is_high
                low += is_low
                high += (code & FLAG_HIGH) != 0
                good += finite
                if kept & (w > 0.0):
                    sw[x] += w
                    swx[x] += w * v
                    nk[x] += 1
                if kept:
                    ws[x] = ws[x] + rw
                    if want_spread:
                        s1[x] += v
                        s2[x] += v * v
                        cnt[x] += 1.0
            counts[0, f] += low
            counts[1, f] += high
            counts[2, f] += good
        for x in range(nx):
            n_low[y, x] = cl[x]
            n_high[y, x] = ch[x]
            wsum[y, x] = ws[x]
            if want_sums:
                sums[0, y, x] = swx[x]
                sums[1, y, x] = sw[x]
                sums[2, y, x] = nk[x]
            if want_spread:
                c = cnt[x]
                if c >= 2.0:
                    mean = s1[x] / c
                    spread[y, x] = np.float32(np.sqrt(max(s2[x] / c - mean * mean, 0.0) * c / max(c - 1.0, 1.0)))
                else:
                    spread[y, x] = np.nan
            if sw[x] > 0.0:
                image[y, x] = swx[x] / sw[x]
                continue
            m = 0
            for f in range(nf):
                v = np.float64(values[f, y, x])
                if (flags[f, y, x] & FLAG_RANGE) == 0 and weights[f] > 0.0 and v - v == 0:
                    buf[m] = v
                    m += 1
            image[y, x] = np.nan if m == 0 else _wirth_median(buf, m)


#: own-pixel outlier bits (:mod:`drizzlestack.integration.outliers`) that reject a sample
#: low, and high (high or hot pixel)
_OWN_LOW = 1
_OWN_HIGH = 2 | 8


def combine_flagged(values, saturated, projected, weights, saturation=None, range_low=-np.inf, range_high=np.inf, *,
                    flags=None, scale=None, offset=None, spread: bool = False, sums: bool = False):
    """Flag and combine one tile of an integration in one pass over its samples: the
    saturated and own-pixel overrides, the weighted mean, the counts, the weight sum and
    (optionally) the kept samples' spread.

    Parameters
    ----------
    values : (frame, y, x) float32
        Resampled samples; normalized in place first when ``scale`` is given
        (``values * scale + offset`` in float32).
    saturated : (frame, y, x) bool
        Samples interpolated next to a saturated pixel: never flagged (empty: none).
    projected : (frame, y, x) uint8 or None
        Each sample's nearest input pixel's own-pixel outlier flag: low (1) rejects it
        low, high or hot (2, 8) high.
    weights : (frame,) float64
        Combination weights.
    saturation : (frame,) float64, optional
        Normalized saturation levels (values at or above are never flagged); with
        ``flags=None`` only.
    range_low, range_high : float
        With ``flags=None``: values outside ``(range_low, range_high)`` are
        :data:`FLAG_RANGE`.
    flags : (frame, y, x) uint8, optional
        The rejection's flags (:func:`rejection_flags`, overridden in place); ``None``:
        those of method ``"none"``.
    scale, offset : (frame,) float32, optional
        The normalization to apply first.
    spread : bool
        Also the standard deviation of the kept samples per pixel (NaN with fewer
        than 2): how much the frames disagree among themselves.
    sums : bool
        Also the weighted sum, the weight sum and the number of the kept samples of
        positive weight per pixel (:mod:`.patch` updates them sample by sample).

    Returns
    -------
    image : (y, x) float64
        As :func:`combine_stack`.
    n_low, n_high : (y, x) int64
        Frames rejected low / high per pixel.
    wsum : (y, x) float32
        Sum of the weights of the kept finite samples (float32, frame by frame).
    flags : (frame, y, x) uint8
        With the overrides.
    counts : (3, frame) int64
        Per frame: samples flagged low, high, and finite samples.
    spread : (y, x) float32 or None
    sums : (3, y, x) float64 or None
        Only with ``sums=True`` (an eighth value).
    """
    nf, ny, nx = values.shape
    raw = np.asarray(weights, np.float64)
    w = np.where(np.isfinite(raw) & (raw > 0), raw, 0.0)
    given = flags is not None
    flags = np.ascontiguousarray(flags, np.uint8) if given else np.empty(values.shape, np.uint8)
    image = np.empty((ny, nx), np.float64)
    n_low = np.empty((ny, nx), np.int64)
    n_high = np.empty((ny, nx), np.int64)
    wsum = np.empty((ny, nx), np.float32)
    spread_out = np.empty((ny, nx) if spread else (0, 0), np.float32)
    counts = np.zeros((3, nf), np.int64)
    sums_out = np.empty((3, ny, nx) if sums else (0, 0, 0), np.float64)
    proj = np.empty((0, 0, 0), np.uint8) if projected is None else np.ascontiguousarray(projected, np.uint8)
    normalize = scale is not None
    sc = np.asarray(scale if normalize else np.ones(nf), np.float32)
    of = np.asarray(offset if normalize else np.zeros(nf), np.float32)
    if values.size:
        _combine_flagged_kernel(values, normalize, sc, of, given, np.ascontiguousarray(saturated, np.bool_), proj, w,
                                raw.astype(np.float32), saturation_levels(saturation, nf), float(range_low),
                                float(range_high), flags, image, n_low, n_high, wsum, spread_out, counts, sums_out)
    out = (image, n_low, n_high, wsum, flags, counts, (spread_out if spread else None))
    return out + (sums_out,) if sums else out


def _combine_block(block: np.ndarray, flags: np.ndarray, weights: np.ndarray) -> np.ndarray:
    # The one-pass kernel with the given flags and no overrides; it is compiled for
    # writable arrays (it can normalize in place and writes the flags back), and a dask
    # block may be read-only: such a block is copied, the flags always are.
    block = np.require(_as_float(np.asarray(block)), requirements="W")
    _, ny, nx = block.shape
    out = np.empty((3, ny, nx), dtype=np.float64)
    if block.size:
        image, n_low, n_high, *_ = combine_flagged(block, np.empty((0, 0, 0), np.bool_), None, weights,
                                                   flags=np.array(flags, dtype=np.uint8))
        out[0], out[1], out[2] = image, n_low, n_high
    return out


def combine_stack(stack, flags, weights=None):
    """Integrate a stack: the weighted mean of its kept values, and rejection counts.

    Parameters
    ----------
    stack : array_like or dask.array.Array, shape (frame, y, x)
        The stack the flags were computed on.
    flags : array_like or dask.array.Array of uint8, shape (frame, y, x)
        Flags from :func:`rejection_flags` (0 = kept).
    weights : array_like of shape (frame,), optional
        Per-frame weights (default: all 1). Frames with weight 0 (or NaN) contribute
        nothing.

    Returns
    -------
    image : ndarray or dask array of float32, shape (y, x)
        ``Σ w·x / Σ w`` over the kept values. Where every value of a pixel was rejected
        it is the median of the pixel's in-range values instead (never 0 because of
        rejection); where there is no valid value at all it is NaN (no data). Saturated
        values are kept by :func:`rejection_flags`, so an all-saturated pixel stays
        saturated.
    rejected_low, rejected_high : ndarray or dask array of uint16, shape (y, x)
        Number of frames flagged :data:`FLAG_LOW` / :data:`FLAG_HIGH` at each pixel.
        Range-rejected and invalid values are in neither count, so
        ``kept + rejected_low + rejected_high + (flags & FLAG_RANGE != 0).sum(0)`` equals
        the number of frames.

    Notes
    -----
    The computation is per pixel, so it runs blockwise on a Dask stack (chunked
    ``(frame=all, y=tile, x=tile)``); the three outputs share one task per tile.
    """
    stack = _check_stack(stack)
    n_frames = stack.shape[0]
    if n_frames > np.iinfo(np.uint16).max:
        raise DrizzlestackError(f"stack: {n_frames} frames exceed the uint16 rejection counts")
    if weights is None:
        w = np.ones(n_frames, np.float64)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n_frames,):
            raise DrizzlestackError(f"weights: expected one weight per frame ({n_frames}), got shape {w.shape}")
        w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    if flags.shape != stack.shape:
        raise DrizzlestackError(f"flags: shape {flags.shape} does not match the stack's {stack.shape}")
    if _is_dask(stack) or _is_dask(flags):
        import dask.array as da

        if not _is_dask(stack):
            stack = da.from_array(stack, chunks=(-1,) + flags.chunks[1:])
        if not _is_dask(flags):
            flags = da.from_array(np.asarray(flags), chunks=stack.chunks)
        flags = flags.rechunk(stack.chunks)
        out = da.map_blocks(
            _combine_block,
            stack,
            flags,
            weights=w,
            chunks=((3,),) + stack.chunks[1:],
            dtype=np.float64,
            meta=np.empty((0, 0, 0), np.float64),
        )
        return out[0].astype(np.float32), out[1].astype(np.uint16), out[2].astype(np.uint16)
    out = _combine_block(stack, np.asarray(flags), w)
    return out[0].astype(np.float32), out[1].astype(np.uint16), out[2].astype(np.uint16)
