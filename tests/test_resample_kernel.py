"""The vectorized resampling kernel against the per-sample rule it must reproduce.

:func:`drizzlestack.integration.resample._resample` computes interior samples in
vectorized row stages; every value must equal, bit for bit, what the full per-sample
rule (:func:`~drizzlestack.integration.resample._sample`: frame and window edges, the
nearest-pixel NaN rule, the bilinear fallback, the 2x2 clamp, saturation) gives at the
same position -- on mappings that break the runs of contiguous supports (rotation,
scale), with NaN holes, at window and frame edges.
"""

from __future__ import annotations

import numpy as np
import pytest

from drizzlestack.geometry import FrameMapping, apply_homography, pixel_grid
from drizzlestack.integration import resample as R


def _reference(src, y0, x0, frame_shape, xs, ys, saturation):
    """Every sample through the per-sample rule, one call each."""
    out = np.empty(xs.shape, np.float32)
    sat = np.empty(xs.shape, bool)
    wx, wy = np.empty(6), np.empty(6)
    for j in range(xs.shape[0]):
        for i in range(xs.shape[1]):
            v, s = R._sample(src, y0, x0, frame_shape[0], frame_shape[1], xs[j, i], ys[j, i], saturation, wx, wy)
            out[j, i] = v
            sat[j, i] = s
    return out, sat


def _nearest_reference(flags, y0, x0, xs, ys):
    ix = np.floor(np.where(np.isfinite(xs), xs, -1e9) + 0.5) - x0
    iy = np.floor(np.where(np.isfinite(ys), ys, -1e9) + 0.5) - y0
    inside = (ix >= 0) & (ix < flags.shape[1]) & (iy >= 0) & (iy < flags.shape[0])
    out = np.zeros(xs.shape, np.uint8)
    out[inside] = flags[iy[inside].astype(np.intp), ix[inside].astype(np.intp)]
    return out


def _window(rng, shape=(70, 90), holes=0.01):
    src = (1000 + 200 * rng.standard_normal(shape)).astype(np.float32)
    src[rng.random(shape) < 0.002] = 60000.0  # saturated pixels
    src[rng.random(shape) < holes] = np.nan
    return src


MATRICES = {
    "shift": np.array([[1.0, 0.0, 3.37], [0.0, 1.0, -2.81], [0.0, 0.0, 1.0]]),
    "rotation": np.array([[np.cos(0.05), -np.sin(0.05), 4.2], [np.sin(0.05), np.cos(0.05), -1.3], [0, 0, 1.0]]),
    "scale": np.array([[1.13, 0.02, -6.0], [-0.03, 0.91, 5.5], [0.0, 0.0, 1.0]]),
    "perspective": np.array([[1.0, 0.01, 2.0], [0.0, 1.0, 1.5], [2e-4, -1e-4, 1.0]]),
}


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_the_vectorized_kernel_equals_the_per_sample_rule(name):
    rng = np.random.default_rng(sorted(MATRICES).index(name))
    src = _window(rng)
    y0, x0 = 10, 20  # the window starts inside a (100, 130) frame: window edges and frame edges both occur
    frame_shape = (100, 130)
    matrix = MATRICES[name]
    xr, yr = pixel_grid((75, 95), 8, 17)
    xs, ys = apply_homography(matrix, xr, yr)
    ref, ref_sat = _reference(src, y0, x0, frame_shape, xs, ys, 50000.0)
    out, sat = R.resample_window(src, (y0, x0), frame_shape, xs, ys, saturation=50000.0)
    np.testing.assert_array_equal(out, ref)  # NaN where NaN, bit-identical elsewhere
    np.testing.assert_array_equal(sat, ref_sat)
    assert np.isfinite(ref).sum() > 5000 and np.isnan(ref).sum() > 50 and ref_sat.any()


def test_positions_from_the_homography_in_the_kernel_equal_apply_homography():
    rng = np.random.default_rng(7)
    src = _window(rng)
    flags = (rng.random(src.shape) < 0.05).astype(np.uint8) * rng.integers(1, 9, src.shape).astype(np.uint8)
    frame_shape = (100, 130)
    matrix = MATRICES["rotation"]
    xr, yr = pixel_grid((60, 80), 12, 25)
    xs, ys = apply_homography(matrix, xr, yr)
    ref, ref_sat = _reference(src, 10, 20, frame_shape, xs, ys, 50000.0)
    out = np.empty((1,) + xs.shape, np.float32)
    sat = np.empty(out.shape, bool)
    projected = np.empty(xs.shape, np.uint8)
    R._resample(src[None].copy(), 10, 20, frame_shape[0], frame_shape[1], R._NO_POSITIONS, R._NO_POSITIONS, matrix,
                12, 25, 50000.0, out, sat, flags, projected)
    np.testing.assert_array_equal(out[0], ref)
    np.testing.assert_array_equal(sat[0], ref_sat)
    np.testing.assert_array_equal(projected, _nearest_reference(flags, 10, 20, xs, ys))
    assert projected.any()


def test_a_homography_mapping_to_infinity_gives_no_data():
    # w = 0 along the column x = 5 of the reference grid: those samples have no position
    matrix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.2, 0.0, 1.0]])
    src = np.full((40, 40), 5.0, np.float32)
    out = np.empty((1, 4, 10), np.float32)
    sat = np.empty(out.shape, bool)
    R._resample(src[None], 0, 0, 40, 40, R._NO_POSITIONS, R._NO_POSITIONS, matrix, 0, 0, np.inf, out, sat,
                R._NO_FLAGS, R._NO_FLAGS)
    assert np.all(np.isnan(out[0, :, 5])) and not sat[0, :, 5].any()
    xs, ys = apply_homography(matrix, *pixel_grid((4, 10)))
    np.testing.assert_array_equal(out[0], _reference(src, 0, 0, (40, 40), xs, ys, np.inf)[0])


def test_resample_tile_homography_and_position_paths_agree():
    """The tile function takes the in-kernel homography for a homography mapping and the
    position arrays otherwise (a spline): both must give the same samples."""

    class Positions:  # the same homography, but not one resample_tile can evaluate in the kernel
        is_homography = False

        def __init__(self, m):
            self.m = m

        def inverse(self, x, y):
            return self.m.inverse(x, y)

    rng = np.random.default_rng(3)
    frames = np.stack([_window(rng, (120, 140), 0.003) for _ in range(3)])
    flags = (rng.random(frames.shape) < 0.01).astype(np.uint8)
    mappings = [FrameMapping(np.linalg.inv(MATRICES[k])) for k in ("shift", "rotation", "scale")]
    args = (frames, [0, 1, 2])
    kw = dict(sy=slice(20, 70), sx=slice(30, 100), frame_shape=(120, 140), saturation=[50000.0] * 3,
              outliers=flags)
    pa = np.zeros((3, 50, 70), np.uint8)
    pb = np.zeros((3, 50, 70), np.uint8)
    va, sa = R.resample_tile(*args, mappings, projected=pa, **kw)
    vb, sb = R.resample_tile(*args, [Positions(m) for m in mappings], projected=pb, **kw)
    np.testing.assert_array_equal(va, vb)
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_array_equal(pa, pb)
    assert pa.any() and np.isfinite(va).mean() > 0.9
