"""The integration's final pass as a patch of the model pass (grey frames, full runs).

The final pass resamples every frame with its own-pixel outliers as no data
(:mod:`.outliers`). A sample whose Lanczos-3 support holds no flagged pixel has exactly
the value the model pass resampled; only the *touched* samples change (0.7 % of them on
the simulated field of the benchmarks, 10 % on 40 hatp32 frames). So the model pass
also keeps, per reference pixel, the sums of the plain combine (every valid sample
kept: weighted sum, weight sum, number of samples) and each
frame's flags of that combine (:data:`BASE_VARIABLES`, :data:`BASE_FLAGS`); the final
pass reads them, recomputes each touched sample twice -- without and with its frame's
outliers, with the resampling's own per-sample function -- takes the first out of the
sums and puts the second in.

The flags, the rejection maps and counts, and which pixels have data are those of
resampling everything again, and so are the weights; the image differs from it by
float rounding at most (its sums are taken in another order: on the benchmarks'
stores not one pixel differed; ``tests/test_integration.py`` compares both). Colour stores (whose model is resampled star-sharp, the image
flux-true), region-of-interest trials and range limits take the full final pass.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..chunkio import DirectArray
from ..geometry import input_window, pixel_grid
from ..store import record_tile
from .rejection import FLAG_HIGH, FLAG_LOW, FLAG_RANGE
from .rejection.sorting import _wirth_median
from .resample import _IDENTITY, _NO_POSITIONS, LANCZOS3_PAD, _open_frames, _sample, tile_box

#: the model pass's per-pixel sums of the plain combine: product -> store variable
BASE_VARIABLES = {"base_sum": "integration_base_sum", "base_weight": "integration_base_weight",
                  "base_kept": "integration_base_kept"}
#: each frame's flags of the plain combine (frame, y, x), on the reference grid
BASE_FLAGS = "integration_base_flags"
#: own-pixel outlier bits (:mod:`.outliers`) that reject a sample low, and high (high, hot)
_OWN_LOW = 1
_OWN_HIGH = 2 | 8
#: rows and columns of a Lanczos-3 support around ``floor(position)``: -2 .. +3
_BEFORE, _AFTER = 2, 3
#: touched samples flagged low or high that keep a finite value (the median fallback
#: of a pixel left without kept samples); more in one tile take the full pass
_CANDIDATES = 65536


@numba.njit(nogil=True, cache=True)
def _touched_map(flags, touched):
    """``touched[iv + P, iu + P]`` (P = 3): whether the support of a sample whose
    ``floor`` position in the window is ``(iv, iu)`` holds a flagged pixel (edge rows and
    columns counted as the clamped support reads them). Marked from the flagged pixels."""
    h, w = flags.shape
    p = _AFTER
    for r in range(h):
        for c in range(w):
            if flags[r, c] == 0:
                continue
            for iv in range(r - _AFTER, r + _BEFORE + 1):
                for iu in range(c - _AFTER, c + _BEFORE + 1):
                    touched[iv + p, iu + p] = True


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _patch_frame(clean, nanned, flags, touched, y0, x0, frame_ny, frame_nx, xs, ys, matrix, oy, ox, raw_sat,
                 scale, offset, sat_norm, w, sums, kept, fmap, n_low, n_high, frame_counts, cand_pix,
                 cand_val, n_cand):
    """Patch the sums of one tile with one frame's touched samples (see the module)."""
    ty, tx = fmap.shape
    h, w_ = clean.shape
    p = _AFTER
    mapped = xs.shape[0] == 0
    wx = np.empty(6)
    wy = np.empty(6)
    for j in range(ty):
        yr = float(oy + j)
        for i in range(tx):
            if mapped:  # the operations of resample._resample, so the same positions
                xr = float(ox + i)
                wgt = matrix[2, 0] * xr + matrix[2, 1] * yr + matrix[2, 2]
                if wgt == 0.0:
                    continue  # no position: NaN in both passes
                x = (matrix[0, 0] * xr + matrix[0, 1] * yr + matrix[0, 2]) / wgt
                y = (matrix[1, 0] * xr + matrix[1, 1] * yr + matrix[1, 2]) / wgt
            else:
                x = xs[j, i]
                y = ys[j, i]
            if not (x >= -0.5 and x <= frame_nx - 0.5 and y >= -0.5 and y <= frame_ny - 0.5):
                continue  # outside the frame (or NaN): no data in both passes
            iu = int(math.floor(x - x0))
            iv = int(math.floor(y - y0))
            r = iv + p
            c = iu + p
            if 0 <= r < touched.shape[0] and 0 <= c < touched.shape[1]:
                if not touched[r, c]:
                    continue
            # (a support beyond the map's reach: recomputed, which is always right)
            vo, so = _sample(clean, y0, x0, frame_ny, frame_nx, x, y, raw_sat, wx, wy)
            vn, sn = _sample(nanned, y0, x0, frame_ny, frame_nx, x, y, raw_sat, wx, wy)
            nu = math.floor(x + 0.5) - x0
            nv = math.floor(y + 0.5) - y0
            own = flags[int(nv), int(nu)] if (0 <= nu < w_ and 0 <= nv < h) else 0
            # Normalized in float32 and flagged as the plain combine does (no range limits).
            a = np.float64(np.float32(np.float32(vo) * scale) + offset)
            b = np.float64(np.float32(np.float32(vn) * scale) + offset)
            fa = a - a == 0
            fb = b - b == 0
            code_a = 0 if fa else FLAG_RANGE
            code_b = 0 if fb else FLAG_RANGE
            if fa and a >= sat_norm:
                code_a = 0
            if fb and b >= sat_norm:
                code_b = 0
            if so:
                code_a = 0
            if sn:
                code_b = 0
            if own & _OWN_LOW:
                code_b = FLAG_LOW
            if own & _OWN_HIGH:
                code_b = FLAG_HIGH
            fmap[j, i] = code_b
            kept_a = fa and code_a == 0
            kept_b = fb and code_b == 0
            if kept_a != kept_b and w > 0.0:  # (kept both times: the weight sums hold the same terms)
                sums[1, j, i] += w if kept_b else -w
                kept[j, i] += 1 if kept_b else -1
            if w > 0.0:
                if kept_a:
                    sums[0, j, i] -= w * a
                if kept_b:
                    sums[0, j, i] += w * b
            if code_b & FLAG_LOW:
                n_low[j, i] += 1
                frame_counts[0] += 1
            elif code_b & FLAG_HIGH:
                n_high[j, i] += 1
            if code_b & FLAG_HIGH:
                frame_counts[1] += 1
            frame_counts[2] += np.int64(fb) - np.int64(fa)
            if fb and (code_b & FLAG_RANGE) == 0 and code_b != 0 and w > 0.0:
                m = n_cand[0]
                if m < cand_pix.shape[0]:
                    cand_pix[m] = j * tx + i
                    cand_val[m] = b
                n_cand[0] = m + 1


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _finish(sums, kept, cand_pix, cand_val, n_cand, fmaps, raw_weights, image, wsum):
    """The image from the patched sums; a pixel left without kept samples takes the
    median of its flagged finite samples (the combine's rule), else NaN. The float32
    weight sum frame by frame from the final flags, as the combine adds it (a kept
    sample is one flagged 0: a sample is only spared as saturated when it has a value)."""
    ty, tx = image.shape
    wsum[:] = 0.0
    for f in range(fmaps.shape[0]):
        rw = raw_weights[f]
        for j in range(ty):
            for i in range(tx):
                if fmaps[f, j, i] == 0:
                    wsum[j, i] = wsum[j, i] + rw
    order = np.argsort(cand_pix[:n_cand], kind="mergesort")
    pix = cand_pix[:n_cand][order]
    val = cand_val[:n_cand][order]
    buf = np.empty(max(n_cand, 1), np.float64)
    for j in range(ty):
        for i in range(tx):
            if kept[j, i] > 0:
                image[j, i] = sums[0, j, i] / sums[1, j, i]
                continue
            q = np.searchsorted(pix, j * tx + i)
            m = 0
            while q < n_cand and pix[q] == j * tx + i:
                buf[m] = val[q]
                m += 1
                q += 1
            image[j, i] = np.nan if m == 0 else _wirth_median(buf, m)


def patch_tile(plan, iy: int, ix: int, sy: slice, sx: slice, normalized_saturation) -> np.ndarray | None:
    """The final pass of tile ``(iy, ix)`` (output rows ``sy``, columns ``sx``) from the
    model pass's sums (see the module); the ledger row as
    :func:`.integrate.integrate_tile` returns it, or ``None`` when the tile must take the
    full pass (too many flagged samples with values to keep)."""
    n = len(plan.indices)
    store = plan.store
    sums = np.empty((3, sy.stop - sy.start, sx.stop - sx.start))
    sums[0] = DirectArray(store, BASE_VARIABLES["base_sum"])[sy, sx]
    sums[1] = DirectArray(store, BASE_VARIABLES["base_weight"])[sy, sx]
    kept = np.asarray(DirectArray(store, BASE_VARIABLES["base_kept"])[sy, sx], np.int64)
    y0, x0 = plan.origin
    base_flags = DirectArray(store, BASE_FLAGS)
    fmaps = np.empty((n,) + kept.shape, np.uint8)
    for k, i in enumerate(plan.indices):
        fmaps[k] = base_flags[int(i), y0 + sy.start:y0 + sy.stop, x0 + sx.start:x0 + sx.stop]
    # The model pass's ledger holds each frame's finite samples of this tile (same values).
    model_row = np.asarray(DirectArray(store, f"{plan.step}_model_tiles")[iy, ix, :], np.float64)
    counts = np.zeros((n, 3), np.int64)
    counts[:, 2] = model_row[2 * n:3 * n].astype(np.int64)
    n_low = np.zeros(kept.shape, np.int64)
    n_high = np.zeros(kept.shape, np.int64)
    cand_pix = np.empty(_CANDIDATES, np.int64)
    cand_val = np.empty(_CANDIDATES, np.float64)
    n_cand = np.zeros(1, np.int64)
    frames = _open_frames(store)
    outliers = DirectArray(store, plan.outliers)
    box = tile_box(sy, sx, plan.origin)
    xr = yr = None
    for k, (i, mapping) in enumerate(zip(plan.indices, plan.mappings)):
        window = input_window(mapping, box, plan.frame_shape, pad=LANCZOS3_PAD)  # as the resampling's
        if window is None:
            continue
        wy, wx = window
        flags = np.ascontiguousarray(outliers[int(i), wy, wx], dtype=np.uint8)
        bad = flags != 0
        if not bad.any():
            continue  # every sample as in the model pass
        clean = np.ascontiguousarray(frames[int(i), wy, wx], dtype=np.float32)
        nanned = clean.copy()
        nanned[bad] = np.nan
        # corners iv = -3 .. h + 1 (beyond: the clamped support reads only edge pixels the
        # map does not follow, and the sample is recomputed)
        touched = np.zeros((flags.shape[0] + _BEFORE + _AFTER, flags.shape[1] + _BEFORE + _AFTER), np.bool_)
        _touched_map(flags, touched)
        if getattr(mapping, "is_homography", False):
            xf = yf = _NO_POSITIONS
            matrix = mapping.inverse_matrix
        else:
            if xr is None:
                xr, yr = pixel_grid(kept.shape, y0 + sy.start, x0 + sx.start)
            xf, yf = mapping.inverse(xr, yr)
            xf = np.ascontiguousarray(xf, dtype=np.float64)
            yf = np.ascontiguousarray(yf, dtype=np.float64)
            matrix = _IDENTITY
        sat = plan.raw_saturation[k]
        sat = float(sat) if sat is not None and np.isfinite(sat) else np.inf
        w = float(plan.weights[k, 0])
        w_kept = w if np.isfinite(w) and w > 0 else 0.0
        _patch_frame(clean, nanned, flags, touched, int(wy.start), int(wx.start), int(plan.frame_shape[0]),
                     int(plan.frame_shape[1]), xf, yf, matrix, int(y0 + sy.start), int(x0 + sx.start), sat,
                     np.float32(plan.norm_scale[k, 0]), np.float32(plan.norm_offset[k, 0]), float(normalized_saturation[k]),
                     w_kept, sums, kept, fmaps[k], n_low, n_high, counts[k], cand_pix, cand_val,
                     n_cand)
    if n_cand[0] > _CANDIDATES:
        return None
    image = np.empty(kept.shape, np.float64)
    wsum = np.empty(kept.shape, np.float32)
    _finish(sums, kept, cand_pix, cand_val, int(n_cand[0]), fmaps, np.asarray(plan.weights[:, 0], np.float32), image,
            wsum)
    for key, value in (("integration", image), ("rejected_low", n_low), ("rejected_high", n_high),
                       ("integration_weight", wsum)):
        if key in plan.outputs:
            DirectArray(store, plan.outputs[key], "r+")[sy, sx] = value
    target = DirectArray(store, plan.flags_variable, "r+")
    for k, i in enumerate(plan.indices):
        target[int(i), y0 + sy.start:y0 + sy.stop, x0 + sx.start:x0 + sx.stop] = fmaps[k]
    row = np.empty(3 * n + 1)
    row[:n], row[n:2 * n], row[2 * n:3 * n] = counts[:, 0], counts[:, 1], counts[:, 2]
    row[3 * n] = float(wsum.max()) if wsum.size else 0.0
    record_tile(store, plan.step, iy, ix, row)
    return row
