"""Drizzle kernels and ``drizzle_array``: differential tests against STScI ``drizzle``
(the reference implementation of Fruchter & Hook 2002), conservation laws, edge cases
that break drizzle implementations, and the accumulate/finalize contract the tiled
driver relies on.

The STScI reference is run on a canvas padded on every side, then cropped: STScI skips
input pixels outside a polygon it estimates around the output, which drops pixels whose
drop straddles the output's edge, while we use every drop that overlaps the output.

Tolerances reached against STScI 3.0.0 (our output in float64, STScI's in float32):

* square, point, turbo, gaussian: rtol 1e-5 on image and weights (measured differences
  ~4e-7, the float32 rounding of STScI's running mean and weights);
* lanczos2/3: weights to 1e-2 of the largest weight, image to 2e-2 relative where the
  weight is at least 20% of the largest. STScI samples the Lanczos function from a
  table at 0.003 input-pixel steps (nearest sample, error up to ~2e-3 per axis); we
  interpolate a table 13x finer (error < 1e-8), i.e. the exact kernel. Measured
  differences: ~5e-3 on weights.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest

from drizzlestack import DrizzlestackWarning
from drizzlestack.drizzle import (
    KERNELS,
    accumulate,
    drizzle_array,
    estimate_pixel_scale_ratio,
    finalize,
    kernel_radius,
)
from conftest import run_with_hang_guard

EXACT_KERNELS = ("square", "point", "turbo", "gaussian")
FLUX_KERNELS = ("square", "point", "turbo")


# ---------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------


def make_pixmap(shape, scale=2.0, angle=0.0, shift=(3.3, 2.1), distortion=0.0, matrix=None):
    """Pixmap of an (optionally distorted) similarity about the input centre, or of a
    2x2 ``matrix`` (affine), placing the input centre at ``scale * centre + shift``."""
    ny, nx = shape
    y, x = np.indices(shape, dtype=np.float64)
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    xc, yc = x - cx, y - cy
    if matrix is None:
        t = np.deg2rad(angle)
        matrix = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    xo = matrix[0, 0] * xc + matrix[0, 1] * yc
    yo = matrix[1, 0] * xc + matrix[1, 1] * yc
    if distortion:
        r2 = (xc**2 + yc**2) / max(nx, ny) ** 2
        xo = xo + distortion * scale * xc * r2
        yo = yo + distortion * scale * yc * r2
    return np.dstack([xo + scale * cx + shift[0], yo + scale * cy + shift[1]])


def place(pixmap, margin=4.3171):
    """Shift ``pixmap`` so that it starts ``margin`` output pixels from the origin;
    return it with an output shape leaving the same margin on the far side."""
    pixmap = pixmap - np.nanmin(pixmap, axis=(0, 1)) + margin
    top = np.nanmax(pixmap, axis=(0, 1))
    return pixmap, (int(top[1] + margin) + 1, int(top[0] + margin) + 1)


def f32(value):
    """STScI drizzle holds pixel_scale_ratio in a C float: give both the same value."""
    return float(np.float32(value))


def stsci(data, pixmap, out_shape, kernel, pixfrac, weights=None, psr=1.0, pad=48):
    """STScI drizzle on a canvas padded by ``pad`` pixels, cropped to ``out_shape``.
    Only the tests that call it are skipped when STScI drizzle is not installed."""
    resample = pytest.importorskip("drizzle.resample")
    h, w = out_shape
    d = resample.Drizzle(kernel=kernel, out_shape=(h + 2 * pad, w + 2 * pad),
                         disable_ctx=True, fillval="NaN")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not a flux-conserving kernel", lanczos pixfrac
        d.add_image(np.asarray(data, dtype=np.float32), exptime=1.0, pixmap=pixmap + pad,
                    weight_map=None if weights is None else np.asarray(weights, np.float32),
                    pixfrac=pixfrac, in_units="cps", iscale=1.0, pixel_scale_ratio=psr)
    crop = (slice(pad, pad + h), slice(pad, pad + w))
    return d.out_img[crop].astype(np.float64), d.out_wht[crop].astype(np.float64)


def assert_matches_stsci(img, wht, ref_img, ref_wht, kernel):
    """Compare with the tolerances stated in the module docstring."""
    wmax = ref_wht.max()
    assert wmax > 0
    if kernel.startswith("lanczos"):
        np.testing.assert_allclose(wht, ref_wht, rtol=0, atol=1e-2 * wmax)
        strong = ref_wht > 0.2 * wmax
        np.testing.assert_allclose(img[strong], ref_img[strong], rtol=2e-2)
        return
    # STScI's float32 weights carry residues of exact zeros (~1e-15, from the padded
    # canvas' rounding) on pixels a drop only touches: compare above 1e-9 of the max.
    np.testing.assert_allclose(wht, ref_wht, rtol=1e-5, atol=1e-9 * wmax)
    covered = ref_wht > 1e-6 * wmax
    assert covered.any()
    np.testing.assert_allclose(img[covered], ref_img[covered], rtol=1e-5, atol=1e-5)
    assert np.all(np.isnan(img[wht == 0]))


def random_frame(rng, shape):
    data = rng.normal(10.0, 2.0, shape).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    return data, weights


# ---------------------------------------------------------------------------------
# differential tests against STScI drizzle
# ---------------------------------------------------------------------------------

GEOMETRIES = {
    "shift": dict(scale=1.0, angle=0.0, shift=(5.37, 4.81)),
    "rotation_scale2": dict(scale=2.0, angle=17.0),
    "small_rotation_scale2": dict(scale=2.0, angle=0.3),
    "scale3": dict(scale=3.0, angle=-41.0),
    "scale0.7": dict(scale=0.7, angle=33.0),
    "distortion": dict(scale=2.0, angle=5.0, distortion=0.06),
    "mirror": dict(matrix=np.array([[-2.0317, 0.1131], [0.0573, 1.9127]])),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_matches_stsci(kernel, geometry):
    rng = np.random.default_rng(zlib.crc32(f"{kernel}/{geometry}".encode()))
    shape = (23, 29)
    pixmap = make_pixmap(shape, **GEOMETRIES[geometry])
    psr = f32(estimate_pixel_scale_ratio(pixmap))
    pixmap, out = place(pixmap)
    data, weights = random_frame(rng, shape)
    pixfrac = 1.0 if kernel.startswith("lanczos") else 0.8
    img, wht = drizzle_array(data, pixmap, out, kernel, pixfrac, weights, pixel_scale_ratio=psr)
    assert_matches_stsci(img, wht, *stsci(data, pixmap, out, kernel, pixfrac, weights, psr), kernel)


def random_affine(rng):
    """Rotation x shear x anisotropic scale (0.5 .. 3 per axis, shear up to 0.3),
    mirrored half of the time."""
    t = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    shear = np.array([[1.0, rng.uniform(-0.3, 0.3)], [0.0, 1.0]])
    scale = np.diag(rng.uniform(0.5, 3.0, 2) * [rng.choice([-1, 1]), 1])
    return rot @ shear @ scale


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
def test_matches_stsci_on_random_affine_pixmaps(kernel):
    """Seeded loop over random affine maps and pixfracs.

    (STScI 3.0.0 itself drops input pixels under strong shear, e.g. the matrix
    [[0.49, 0.24], [0.48, 2.66]]: about half of the weight goes missing although every
    drop lands inside its canvas; we keep the shear moderate so that it is a valid
    reference, and check that it did not lose weight.)
    """
    rng = np.random.default_rng(20240607)
    for _ in range(8):
        shape = tuple(rng.integers(6, 20, size=2))
        pixmap = make_pixmap(shape, matrix=random_affine(rng))
        pixmap, out = place(pixmap)
        data, weights = random_frame(rng, shape)
        pixfrac = float(rng.uniform(0.3, 1.0))
        psr = f32(estimate_pixel_scale_ratio(pixmap))
        img, wht = drizzle_array(data, pixmap, out, kernel, pixfrac, weights, pixel_scale_ratio=psr)
        ref_img, ref_wht = stsci(data, pixmap, out, kernel, pixfrac, weights, psr)
        if kernel != "gaussian":
            assert ref_wht.sum() == pytest.approx(float(weights.sum()), rel=1e-5)
        assert_matches_stsci(img, wht, ref_img, ref_wht, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_drops_straddling_the_output_edge_are_kept(kernel):
    """The output covers only the middle of the drizzled frame: pixels on its border get
    partial drops. STScI on a large canvas, cropped, is the reference."""
    rng = np.random.default_rng(5)
    shape = (24, 24)
    pixmap = make_pixmap(shape, scale=2.0, angle=11.0, shift=(-15.4, -13.2))
    data, weights = random_frame(rng, shape)
    out = (30, 27)
    pixfrac = 1.0 if kernel.startswith("lanczos") else 0.9
    img, wht = drizzle_array(data, pixmap, out, kernel, pixfrac, weights, pixel_scale_ratio=0.5)
    ref = stsci(data, pixmap, out, kernel, pixfrac, weights, 0.5, pad=64)
    assert_matches_stsci(img, wht, *ref, kernel)
    if kernel != "point":  # every border pixel gets part of a drop
        assert np.all(wht[0] > 0) and np.all(wht[-1] > 0) and np.all(wht[:, 0] > 0)


def test_square_large_drops_match_stsci():
    """Scale 12: drops larger than the batched window go through the general path."""
    rng = np.random.default_rng(12)
    pixmap = make_pixmap((7, 6), scale=12.0, angle=23.0)
    pixmap, out = place(pixmap)
    data, weights = random_frame(rng, (7, 6))
    img, wht = drizzle_array(data, pixmap, out, "square", 0.9, weights)
    assert_matches_stsci(img, wht, *stsci(data, pixmap, out, "square", 0.9, weights), "square")


def test_square_nearly_axis_aligned_edges_are_exact():
    """Edges with a tiny non-zero slope (1e-12 rad): the exact-area formula divides by
    the edge's height change, which must not lose precision."""
    rng = np.random.default_rng(3)
    for angle in (1e-10, -1e-7, 1e-4):
        pixmap = make_pixmap((12, 12), scale=2.0, angle=np.rad2deg(angle), shift=(3.31, 2.17))
        pixmap, out = place(pixmap)
        data, weights = random_frame(rng, (12, 12))
        img, wht = drizzle_array(data, pixmap, out, "square", 0.83, weights)
        assert_matches_stsci(img, wht, *stsci(data, pixmap, out, "square", 0.83, weights), "square")


def test_collapsed_row_pixmap_matches_stsci():
    """Two input rows mapped onto the same output row (a fold in the pixmap): drops
    between them are halved, not lost or doubled; STScI does the same."""
    rng = np.random.default_rng(8)
    pixmap = make_pixmap((14, 14), scale=2.0, angle=0.0)
    pixmap[7] = pixmap[6]
    pixmap, out = place(pixmap)
    data, weights = random_frame(rng, (14, 14))
    img, wht = drizzle_array(data, pixmap, out, "square", 1.0, weights)
    assert_matches_stsci(img, wht, *stsci(data, pixmap, out, "square", 1.0, weights), "square")


# ---------------------------------------------------------------------------------
# conservation and conventions
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", FLUX_KERNELS)
@pytest.mark.parametrize("scale,angle,distortion", [(2.0, 0.3, 0.0), (3.0, 61.0, 0.0),
                                                    (0.7, -20.0, 0.0), (2.0, 8.0, 0.08)])
def test_flux_is_conserved(kernel, scale, angle, distortion):
    """sum(image * weights) == sum(data * weights) when every drop lands inside."""
    rng = np.random.default_rng(1)
    shape = (40, 33)
    pixmap = make_pixmap(shape, scale=scale, angle=angle, distortion=distortion, shift=(6.2, 5.9))
    pixmap, out = place(pixmap, margin=8.3171)
    data = rng.gamma(2.0, 50.0, shape)
    weights = rng.uniform(0.2, 3.0, shape)
    img, wht = drizzle_array(data, pixmap, out, kernel, 0.9, weights)
    total = np.nansum(img * wht)
    assert total == pytest.approx(np.sum(data * weights), rel=1e-6)
    if kernel != "turbo":  # turbo's drop size comes from pixel_scale_ratio, not the map
        assert wht.sum() == pytest.approx(weights.sum(), rel=1e-6)


def test_weights_are_overlap_fraction_and_image_is_weighted_mean():
    """2x2 input pixels at scale 2, pixfrac 1: drop (i, j) is the square
    [2i + 1, 2i + 3] x [2j + 1, 2j + 3] of area 4. The weights are w * overlap / 4 and
    the image the weighted mean of the values."""
    y, x = np.indices((2, 2), dtype=float)
    pixmap = np.dstack([2 * x + 2.0, 2 * y + 2.0])
    data = np.array([[1.0, 3.0], [5.0, 7.0]])  # data[j, i]
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    img, wht = drizzle_array(data, pixmap, (7, 7), "square", 1.0, w)
    assert wht[1, 1] == pytest.approx(1.0 * 0.5 * 0.5 / 4)  # corner of drop (0, 0)
    assert wht[2, 2] == pytest.approx(1.0 * 1.0 * 1.0 / 4)  # inside drop (0, 0)
    # pixel [2.5, 3.5] x [1.5, 2.5]: half of drops (0, 0) and (1, 0) in x, all in y
    assert wht[2, 3] == pytest.approx((1.0 + 2.0) * 0.5 / 4)
    assert img[2, 3] == pytest.approx((1.0 * 1.0 + 2.0 * 3.0) / (1.0 + 2.0))
    # pixel (3, 3): a quarter of each of the four drops
    assert wht[3, 3] == pytest.approx((1 + 2 + 3 + 4) * 0.25 / 4)
    assert img[3, 3] == pytest.approx((1 * 1 + 2 * 3 + 3 * 5 + 4 * 7) / 10)
    assert np.isnan(img[0, 0]) and wht[0, 0] == 0
    assert np.nansum(img * wht) == pytest.approx(np.sum(data * w))


def test_point_kernel_boundary_goes_to_upper_pixel():
    """A point exactly on a pixel boundary goes to the pixel above it, at negative and
    positive coordinates alike (so a tile and the whole image agree)."""
    pixmap = np.array([[[-0.5, 1.5], [2.5, 1.5]], [[1.0, -0.5], [3.0, 2.5]]])
    img, wht = drizzle_array(np.ones((2, 2)), pixmap, (4, 4), "point")
    assert wht[2, 0] == 1 and wht[2, 3] == 1 and wht[0, 1] == 1 and wht[3, 3] == 1
    assert wht.sum() == 4


# ---------------------------------------------------------------------------------
# invalid data, weights and pixmaps
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_data_contributes_nothing_and_never_spreads(kernel):
    rng = np.random.default_rng(2)
    shape = (20, 20)
    pixmap = make_pixmap(shape, scale=2.0, angle=7.0)
    pixmap, out = place(pixmap)
    data = rng.normal(5, 1, shape)
    bad = rng.random(shape) < 0.1
    data_nan = np.where(bad, np.nan, data)
    data_inf = np.where(bad, np.inf, data)
    w0 = np.where(bad, 0.0, 1.0)
    ref_img, ref_wht = drizzle_array(data, pixmap, out, kernel, 1.0, w0, pixel_scale_ratio=0.5)
    for d in (data_nan, data_inf):
        img, wht = drizzle_array(d, pixmap, out, kernel, 1.0, None, pixel_scale_ratio=0.5)
        np.testing.assert_array_equal(wht, ref_wht)
        np.testing.assert_array_equal(img, ref_img)
        assert not np.any(np.isnan(img[wht != 0]))


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_and_nan_weights_contribute_nothing(kernel):
    rng = np.random.default_rng(4)
    shape = (16, 18)
    pixmap = make_pixmap(shape, scale=2.0, angle=-3.0)
    pixmap, out = place(pixmap)
    data = rng.normal(5, 1, shape)
    w = rng.uniform(0.5, 1.5, shape)
    keep = rng.random(shape) > 0.2
    img, wht = drizzle_array(data, pixmap, out, kernel, 1.0, np.where(keep, w, 0.0), pixel_scale_ratio=0.5)
    for w_bad in (np.where(keep, w, np.nan), np.where(keep, w, -1.0)):
        img2, wht2 = drizzle_array(data, pixmap, out, kernel, 1.0, w_bad, pixel_scale_ratio=0.5)
        np.testing.assert_array_equal(wht2, wht)
        np.testing.assert_array_equal(img2, img)
    # and the zero-weight pixels' values do not matter
    img3, wht3 = drizzle_array(np.where(keep, data, 1e30), pixmap, out, kernel, 1.0,
                               np.where(keep, w, 0.0), pixel_scale_ratio=0.5)
    np.testing.assert_array_equal(img3, img)


@pytest.mark.parametrize("kernel", KERNELS)
def test_absurd_pixmap_values_are_skipped_like_nan_without_hanging(kernel):
    """NaN, 1e30 and -1e6 entries in the pixmap: those pixels (and, for square, the
    neighbours whose corners interpolate them) are skipped, quickly, as for NaN."""
    rng = np.random.default_rng(6)
    shape = (30, 30)
    pixmap = make_pixmap(shape, scale=2.0, angle=4.0)
    pixmap, out = place(pixmap)
    data = rng.normal(5, 1, shape)
    holes = [(3, 4), (15, 15), (29, 0), (0, 29), (20, 7)]
    pm_nan = pixmap.copy()
    for j, i in holes:
        pm_nan[j, i] = np.nan
    ref_img, ref_wht = drizzle_array(data, pm_nan, out, kernel, 1.0, pixel_scale_ratio=0.5)
    assert ref_wht.sum() > 0
    for value in (1e30, -1e6, np.inf):
        pm = pixmap.copy()
        for j, i in holes:
            pm[j, i] = value
        img, wht = run_with_hang_guard(drizzle_array, data, pm, out, kernel, 1.0, pixel_scale_ratio=0.5)
        np.testing.assert_array_equal(wht, ref_wht)
        np.testing.assert_array_equal(img, ref_img)


def test_square_nan_pixmap_hole_removes_the_neighbour_drops():
    """A NaN in the pixmap also removes the drops of the 8 neighbours, whose corners
    interpolate it (as in STScI drizzle); everything else is untouched. (STScI 3.0.0
    itself cannot be the reference here: with a NaN inside the pixmap its bounding
    polygon fails and it drops the whole frame.)"""
    rng = np.random.default_rng(7)
    pixmap, out = place(make_pixmap((20, 20), scale=2.0, angle=6.0))
    data, weights = random_frame(rng, (20, 20))
    holes = [(4, 5), (12, 13), (12, 14), (16, 3), (0, 0), (19, 10)]
    pm_nan = pixmap.copy()
    w_zero = weights.copy()
    for j, i in holes:
        pm_nan[j, i] = np.nan
        w_zero[max(j - 1, 0):j + 2, max(i - 1, 0):i + 2] = 0
    for pixfrac in (1.0, 0.6):
        img, wht = drizzle_array(data, pm_nan, out, "square", pixfrac, weights)
        ref_img, ref_wht = drizzle_array(data, pixmap, out, "square", pixfrac, w_zero)
        np.testing.assert_array_equal(wht, ref_wht)
        np.testing.assert_array_equal(img, ref_img)


def test_square_zero_area_drops_are_skipped():
    """A pixmap that collapses the whole frame onto a line (collinear corners): no drop
    has area, nothing is deposited, and nothing is inf or NaN in the weights."""
    y, x = np.indices((8, 8), dtype=float)
    pixmap = np.dstack([2 * x + 3.0, np.full_like(x, 5.0)])
    img, wht = drizzle_array(np.ones((8, 8)), pixmap, (12, 24), "square", 1.0)
    assert np.all(wht == 0) and np.all(np.isnan(img))


def test_square_needs_two_by_two_input():
    with pytest.raises(ValueError, match="2x2"):
        drizzle_array(np.ones((1, 5)), np.zeros((1, 5, 2)), (4, 4), "square")


# ---------------------------------------------------------------------------------
# accumulate / finalize: the contract of the tiled driver
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_accumulate_into_tiles_equals_whole_image(kernel):
    """Each tile drizzles the frame's window around it with the pixmap in tile
    coordinates; the tiles put together equal drizzle_array on the whole frame."""
    rng = np.random.default_rng(9)
    shape = (40, 36)
    pixmap = make_pixmap(shape, scale=2.0, angle=9.0, distortion=0.05)
    pixmap, out = place(pixmap)
    data, weights = random_frame(rng, shape)
    pixfrac = 1.0 if kernel.startswith("lanczos") else 0.7
    whole_img, whole_wht = drizzle_array(data, pixmap, out, kernel, pixfrac, weights,
                                         pixel_scale_ratio=0.5)
    img = np.full(out, np.nan)
    wht = np.zeros(out)
    ty, tx = 23, 31
    for y0 in range(0, out[0], ty):
        for x0 in range(0, out[1], tx):
            y1, x1 = min(y0 + ty, out[0]), min(x0 + tx, out[1])
            # input window: pixels whose centre lands within the tile + 6 px
            inside = ((pixmap[..., 0] > x0 - 6) & (pixmap[..., 0] < x1 + 6)
                      & (pixmap[..., 1] > y0 - 6) & (pixmap[..., 1] < y1 + 6))
            jj, ii = np.nonzero(inside)
            if jj.size == 0:
                continue
            # padded by 2 input pixels, as a driver pads by the kernel's reach
            win = (slice(max(jj.min() - 2, 0), jj.max() + 3),
                   slice(max(ii.min() - 2, 0), ii.max() + 3))
            acc_wv, acc_w = np.zeros((y1 - y0, x1 - x0)), np.zeros((y1 - y0, x1 - x0))
            accumulate(data[win], pixmap[win] - [x0, y0], weights[win], acc_wv, acc_w,
                       kernel, pixfrac, 0.5)
            img[y0:y1, x0:x1] = finalize(acc_wv, acc_w)
            wht[y0:y1, x0:x1] = acc_w
    np.testing.assert_allclose(wht, whole_wht, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(img, whole_img, rtol=1e-12, atol=1e-12)


def test_accumulate_adds_frames_and_counts_coverage():
    rng = np.random.default_rng(10)
    shape = (12, 12)
    out = (40, 40)
    pm1 = make_pixmap(shape, scale=2.0, angle=0.0, shift=(2.0, 2.0))
    pm2 = make_pixmap(shape, scale=2.0, angle=10.0, shift=(9.0, 9.5))
    d1, d2 = rng.normal(3, 1, shape), rng.normal(3, 1, shape)
    acc_wv, acc_w = np.zeros(out), np.zeros(out)
    coverage = np.zeros(out, dtype=np.uint16)
    n1 = accumulate(d1, pm1, None, acc_wv, acc_w, "square", 0.8, coverage=coverage)
    n2 = accumulate(d2, pm2, None, acc_wv, acc_w, "square", 0.8, coverage=coverage)
    assert n1 == n2 == 144
    i1, w1 = drizzle_array(d1, pm1, out, "square", 0.8)
    i2, w2 = drizzle_array(d2, pm2, out, "square", 0.8)
    np.testing.assert_allclose(acc_w, w1 + w2, rtol=1e-12)
    img = finalize(acc_wv, acc_w)
    with np.errstate(invalid="ignore"):
        expect = (np.nan_to_num(i1) * w1 + np.nan_to_num(i2) * w2) / (w1 + w2)
    np.testing.assert_allclose(img[acc_w > 0], expect[acc_w > 0], rtol=1e-12)
    np.testing.assert_array_equal(coverage, (w1 > 0).astype(int) + (w2 > 0))
    assert coverage.max() == 2


def test_finalize_in_place_and_nan_where_no_weight():
    acc_wv = np.array([[2.0, 0.0], [3.0, -1.0]])
    acc_w = np.array([[4.0, 0.0], [1.5, 2.0]])
    expect = np.array([[0.5, np.nan], [2.0, -0.5]])
    np.testing.assert_array_equal(finalize(acc_wv, acc_w), expect)
    out = finalize(acc_wv, acc_w, out=acc_wv)
    assert out is acc_wv
    np.testing.assert_array_equal(acc_wv, expect)


@pytest.mark.parametrize("shape", [(9, 11), (3, 9, 11)], ids=["grey", "colour"])
def test_finalize_into_float32_products_equals_finalizing_then_casting(shape):
    """The tiled driver finalizes straight into its float32 products; they must be the
    float64 image and weights cast afterwards, bit for bit (NaN where no weight)."""
    rng = np.random.default_rng(3)
    acc_w = rng.uniform(0.0, 2.0, shape) ** 8  # tiny weights too: float32 underflow
    acc_w[rng.random(shape) < 0.2] = 0.0
    acc_wv = acc_w * rng.normal(100.0, 30.0, shape)
    image, weights = np.empty(shape, np.float32), np.empty(shape, np.float32)
    out = finalize(acc_wv, acc_w, out=image, weights_out=weights)
    assert out is image
    expect = finalize(acc_wv, acc_w).astype(np.float32)
    assert image.tobytes() == expect.tobytes()
    assert weights.tobytes() == acc_w.astype(np.float32).tobytes()
    assert np.isnan(image).sum() == (acc_w == 0).sum() > 0


def test_finalize_refuses_products_that_alias_the_accumulators_or_misfit():
    acc_wv, acc_w = np.ones((4, 5)), np.ones((4, 5))
    with pytest.raises(ValueError, match="share memory"):
        finalize(acc_wv, acc_w, out=acc_wv, weights_out=np.empty((4, 5), np.float32))
    with pytest.raises(ValueError, match="weights_out"):
        finalize(acc_wv, acc_w, out=np.empty((4, 5), np.float32), weights_out=np.empty((5, 4), np.float32))


def test_drizzle_array_out_arrays():
    rng = np.random.default_rng(11)
    pixmap = make_pixmap((10, 10), scale=2.0, angle=3.0)
    pixmap, out_shape = place(pixmap)
    data = rng.normal(2, 1, (10, 10))
    img, wht = drizzle_array(data, pixmap, out_shape, "turbo", 0.9)
    for dtype in (np.float64, np.float32):
        buf = (np.full(out_shape, 7.0, dtype), np.full(out_shape, 7.0, dtype))
        res = drizzle_array(data, pixmap, out_shape, "turbo", 0.9, out=buf)
        assert res[0] is buf[0] and res[1] is buf[1]
        np.testing.assert_allclose(buf[1], wht, rtol=1e-6)
        np.testing.assert_allclose(buf[0], img, rtol=1e-6)


# ---------------------------------------------------------------------------------
# pixel_scale_ratio, kernel parameters, validation
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2.0, 3.0, 0.7])
def test_pixel_scale_ratio_none_is_output_pixel_size_in_input_pixels(scale):
    """None estimates 1 / scale (the documented meaning, which sizes turbo, gaussian
    and lanczos drops). STScI drizzle 3.0.0 estimates ``scale`` instead, so we compare
    with STScI given 1 / scale explicitly."""
    rng = np.random.default_rng(14)
    pixmap = make_pixmap((15, 15), scale=scale, angle=12.0)
    assert estimate_pixel_scale_ratio(pixmap) == pytest.approx(1.0 / scale, rel=1e-12)
    pixmap, out = place(pixmap)
    data, weights = random_frame(rng, (15, 15))
    img, wht = drizzle_array(data, pixmap, out, "turbo", 0.8, weights, pixel_scale_ratio=None)
    assert_matches_stsci(img, wht, *stsci(data, pixmap, out, "turbo", 0.8, weights, 1.0 / scale),
                         "turbo")


def test_estimate_pixel_scale_ratio_survives_nan_at_the_centre():
    pixmap = make_pixmap((9, 9), scale=2.5, angle=30.0)
    pixmap[3:6, 3:6] = np.nan
    assert estimate_pixel_scale_ratio(pixmap) == pytest.approx(0.4, rel=1e-9)
    with pytest.raises(ValueError, match="lands in the output"):
        estimate_pixel_scale_ratio(pixmap, out_shape=(2, 2))


def test_kernel_radius():
    assert kernel_radius("point", 1.0, 0.5) == 0.0
    assert kernel_radius("turbo", 0.8, 0.5) == pytest.approx(0.8)
    assert kernel_radius("square", 1.0, 0.5) == pytest.approx(np.sqrt(2))
    assert kernel_radius("lanczos3", 1.0, 0.5) == pytest.approx(6.0)
    assert kernel_radius("gaussian", 1.0, 0.5) == pytest.approx(2.4)


def test_lanczos_warns_that_pixfrac_is_ignored():
    pixmap = make_pixmap((6, 6), scale=2.0)
    with pytest.warns(DrizzlestackWarning, match="ignores pixfrac"):
        drizzle_array(np.ones((6, 6)), pixmap, (20, 20), "lanczos3", 0.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel="boxcar"), "kernel"),
    (dict(pixfrac=0.0), "pixfrac"),
    (dict(pixfrac=1.5), "pixfrac"),
    (dict(pixel_scale_ratio=-1.0), "pixel_scale_ratio"),
    (dict(kernel="gaussian", pixel_scale_ratio=1e-4), "reach"),
    (dict(weights=np.ones((3, 3))), "weights"),
    (dict(out_shape=(0, 5)), "out_shape"),
])
def test_invalid_arguments_are_rejected(kwargs, match):
    args = dict(data=np.ones((4, 4)), pixmap=make_pixmap((4, 4)), out_shape=(12, 12))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        drizzle_array(**args)


def test_invalid_accumulators_are_rejected():
    pm = make_pixmap((4, 4))
    with pytest.raises(ValueError, match="acc_w"):
        accumulate(np.ones((4, 4)), pm, None, np.zeros((5, 5)), np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match="pixmap"):
        accumulate(np.ones((4, 4)), pm[:3], None, np.zeros((5, 5)), np.zeros((5, 5)))
