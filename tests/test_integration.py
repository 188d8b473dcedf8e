"""Integration step: statistics, normalization (the hazy frame), the registered view,
rejection of cosmic rays / hot pixels / trails, saturated star cores, stored flags for
drizzle, ROI trials, FITS output and bad input."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import biweight_midvariance as astropy_bwmv
from astropy.stats import mad_std as astropy_mad_std
from astropy.stats import sigma_clipped_stats
from scipy import ndimage

import drizzlestack as ds
from drizzlestack import DrizzlestackError, DrizzlestackWarning, StoreError
from drizzlestack.geometry import apply_homography
from drizzlestack.integration import normalize, registered_view, stats
from drizzlestack.integration.integrate import tile_size
from drizzlestack.integration.resample import resample_window
from drizzlestack.simulate import render_stars, simulate
from drizzlestack.store import StackStore
from conftest import raise_if_dask_computes, register_with_truth

HAZY = 4
STAR_FIELDS = ("x", "y", "flux", "fwhm", "peak", "snr", "flags")


def write_reference_stars(store, truth, reference: int = 0):
    """The reference frame's star list as registration stores it (frame, star, field),
    from the truth catalogue, so that photometry does not depend on star detection."""
    st = StackStore.open(store)
    ny, nx = st.frame_shape
    cat = truth.stars
    inside = (cat["x"] > -0.5) & (cat["x"] < nx - 0.5) & (cat["y"] > -0.5) & (cat["y"] < ny - 0.5)
    cat = cat[inside]
    table = np.full((st.n_frames, len(cat), len(STAR_FIELDS)), np.nan)
    table[reference, :, 0] = cat["x"]
    table[reference, :, 1] = cat["y"]
    table[reference, :, 2] = cat["flux"]
    table[reference, :, 3] = truth.config.fwhm
    table[reference, :, 6] = np.where(cat["saturated"], 1, 0)
    st.write_variable("stars", table, ("frame", "star", "field"), attrs={"fields": list(STAR_FIELDS)})


def _copy_store(field, tmp_path):
    dst = tmp_path / "copy.zarr"
    shutil.copytree(field.store, dst)
    return dst


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """10 dithered frames of 128x160 px, no galaxies (so every pixel away from a star is
    background), with cosmic rays, hot pixels, a satellite trail, saturated stars and a
    hazy frame; registered with the true transforms and integrated with the defaults."""
    d = tmp_path_factory.mktemp("integration")
    truth = simulate(d / "frames", n_frames=10, shape=(128, 160), n_stars=250, flux_min=2000.0, n_galaxies=0,
                     hazy_frame=HAZY, seed=11)
    store = d / "stack.zarr"
    ds.ingest(truth.files, store, chunk=64)
    register_with_truth(store, truth)
    write_reference_stars(store, truth)
    result = ds.integrate(store, tile=64, output=d / "integration.fits")
    return SimpleNamespace(truth=truth, store=store, dir=d, result=result)


def _star_mask(truth, shape, sigma):
    """Pixels of the reference grid touched by a catalogued star above ``sigma / 2``."""
    model = np.zeros(shape)
    render_stars(model, truth.stars["x"], truth.stars["y"], truth.stars["flux"], truth.config.fwhm)
    return ndimage.binary_dilation(model > 0.5 * sigma, iterations=2)


def _background_excess(image, truth, where=None):
    """Largest (image - background) / sigma over background pixels (and ``where``)."""
    finite = np.isfinite(image)
    bg = np.median(image[finite])
    sigma = stats.mad_std(image[finite].astype(np.float64))
    mask = _star_mask(truth, image.shape, sigma)
    sel = finite & ~mask & (True if where is None else where)
    return float(np.max((image[sel] - bg) / sigma)), sigma


def _coverage(store):
    """Number of frames with data at each reference pixel."""
    return np.isfinite(registered_view(store, tile=64).compute()).sum(axis=0)


# ------------------------------------------------------------------------ statistics
def test_scale_estimators_equal_astropy():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(100.0, 7.0, 20000), rng.uniform(1e3, 1e4, 300)]  # noise plus "stars"
    assert stats.biweight_midvariance(x) == pytest.approx(astropy_bwmv(x), rel=1e-10)
    assert stats.mad_std(x) == pytest.approx(astropy_mad_std(x), rel=1e-12)
    s = stats.frame_statistics(x[:20300].reshape(203, 100).astype(np.float32))
    assert s.scale == pytest.approx(7.0, rel=0.03)


def test_noise_estimate_ignores_stars_gradients_and_defects():
    rng = np.random.default_rng(1)
    ny, nx = 256, 256
    noise = rng.normal(0.0, 12.0, (ny, nx))
    yy, xx = np.mgrid[:ny, :nx]
    sky = 300.0 + 1.5 * xx + 0.8 * yy  # a strong gradient: 600 ADU across the frame
    stars_img = np.zeros((ny, nx))
    render_stars(stars_img, rng.uniform(0, nx, 80), rng.uniform(0, ny, 80), rng.uniform(2e3, 1e5, 80), 1.6)
    image = (sky + stars_img + noise).astype(np.float32)
    image[rng.integers(0, ny, 40), rng.integers(0, nx, 40)] += 5e3  # hot pixels
    image[100:140, 50:90] = np.nan  # no data
    truth = float(np.std(noise))
    est = stats.frame_statistics(image, saturation=65535.0)
    assert est.noise == pytest.approx(truth, rel=0.03)
    # The plain dispersion is inflated by the gradient; the wavelet noise is not.
    assert est.scale > 2 * truth


def _star_field_frame(seed, shape=(600, 640), sigma=12.0, integer=False):
    """A frame larger than ``stats.MAX_SAMPLES`` pixels: sky with a gradient, 600 stars,
    hot pixels, a saturated patch and a NaN region; returns (frame, true noise)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    image = 500.0 + 0.2 * xx - 0.1 * yy
    render_stars(image, rng.uniform(0, nx, 600), rng.uniform(0, ny, 600), rng.uniform(500, 2e5, 600), 1.8)
    noise = rng.normal(0.0, sigma, shape)
    image = image + noise
    image[rng.integers(0, ny, 200), rng.integers(0, nx, 200)] += 4e3
    image[300:320, 100:140] = 65535.0  # saturated
    image[50:90, 400:480] = np.nan
    if integer:
        image = np.round(image)
    return image.astype(np.float32), float(np.std(noise))


@pytest.mark.parametrize("integer", [False, True], ids=["float", "adc-integers"])
def test_subsampled_frame_statistics_agree_with_full_data_astropy(integer):
    """The fixed 2^18-pixel subsample gives the location, scales and noise of all
    384000 pixels: location within 1 % of the frame's dispersion from astropy's
    sigma-clipped median (sigma from the MAD; the sampling error of a median of 2^18
    samples is 0.14 % of the dispersion here), the biweight and MAD scales within 1 % of
    astropy's on every pixel, the noise within 1 % of the full-data wavelet estimate and
    3 % of the truth."""
    image, true_noise = _star_field_frame(5, integer=integer)
    sat = 65535.0
    assert image.size > stats.MAX_SAMPLES
    est = stats.frame_statistics(image, saturation=sat)
    assert est.n_pixels <= stats.MAX_SAMPLES
    good = image[np.isfinite(image) & (image < sat)].astype(np.float64)
    _, median, _ = sigma_clipped_stats(good, sigma=3.0, maxiters=10, cenfunc="median", stdfunc="mad_std")
    assert abs(est.location - median) < 0.01 * est.scale
    assert est.scale == pytest.approx(np.sqrt(astropy_bwmv(good, modify_sample_size=False)), rel=0.01)
    assert est.scale_mad == pytest.approx(astropy_mad_std(good), rel=0.01)
    full_noise = stats.clipped_noise(stats.wavelet_noise_layer(image, sat))
    assert est.noise == pytest.approx(full_noise, rel=0.01)
    assert est.noise == pytest.approx(true_noise, rel=0.03)


def test_frame_statistics_kernels_equal_the_numpy_definitions():
    """On every pixel (no subsample) the sorted-sample kernels give exactly the plain
    numpy estimators: clipped median, biweight, MAD and clipped wavelet noise."""
    image, _ = _star_field_frame(6, shape=(300, 280))
    sat = 65535.0
    est = stats.frame_statistics(image, saturation=sat, max_samples=image.size)
    assert est.n_pixels == int(np.sum(np.isfinite(image) & (image < sat)))
    good = image[np.isfinite(image) & (image < sat)].astype(np.float64)
    assert est.location == pytest.approx(stats.clipped_median(good), rel=1e-12)
    assert est.scale == pytest.approx(np.sqrt(stats.biweight_midvariance(good)), rel=1e-9)
    assert est.scale_mad == pytest.approx(stats.mad_std(good), rel=1e-12)
    assert est.noise == pytest.approx(stats.clipped_noise(stats.wavelet_noise_layer(image, sat)), rel=1e-4)
    # the subsample is fixed: the same frame always gives the same numbers
    big, _ = _star_field_frame(7)
    assert stats.frame_statistics(big, sat) == stats.frame_statistics(big.copy(), sat)


def test_aperture_photometry_recovers_true_fluxes_and_areas():
    """Forced photometry of rendered stars at random sub-pixel positions on a sloped,
    noisy sky gives their true flux (within 1 % for bright stars), and a disc of ones
    on a zero background gives the aperture's area pi r^2 (supersampled edge: 1 %)."""
    rng = np.random.default_rng(3)
    ny, nx = 200, 240
    ap = stats.Apertures.for_fwhm(1.6)
    yy, xx = np.mgrid[:ny, :nx]
    for xs, ys in ((30.3, 50.2), (40.71, 100.55), (60.5, 150.0)):
        disc = (np.hypot(xx - xs, yy - ys) < ap.inner - 0.5).astype(np.float32)  # covers the aperture
        flux, _ = stats.aperture_photometry(disc, [xs], [ys], ap)
        np.testing.assert_allclose(flux, np.pi * ap.radius**2, rtol=0.01)
    gy, gx = np.mgrid[25:ny - 20:36, 25:nx - 20:36]  # a grid: every star isolated
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    true = rng.uniform(2e4, 1e5, gx.size)
    image = 300.0 + 0.3 * xx + rng.normal(0, 5.0, (ny, nx))
    render_stars(image, x, y, true, 1.6)
    f, e = stats.aperture_photometry(image.astype(np.float32), x, y, ap, saturation=1e9)
    assert x.size >= 25
    np.testing.assert_allclose(f, true, rtol=0.01)
    assert np.all(e > np.sqrt(true) * 0.9)
    # a star whose aperture holds a saturated pixel, or whose annulus leaves the frame, is not measured
    f2, _ = stats.aperture_photometry(image.astype(np.float32), [x[0], 2.0], [y[0], 100.0], ap,
                                      saturation=float(image[int(round(y[0])), int(round(x[0]))]))
    assert np.isnan(f2).all()


# ------------------------------------------------------------------ normalization
def test_normalization_formulas_and_noise_weights():
    m = np.array([100.0, 130.0, 80.0])
    k = np.array([1.0, 2.0, 0.5])
    cases = {
        "none": ([1, 1, 1], [0, 0, 0]),
        "additive": ([1, 1, 1], [0, -30, 20]),
        "multiplicative": ([1, 100 / 130, 100 / 80], [0, 0, 0]),
        "additive+scaling": ([1, 2, 0.5], [0, 100 - 260, 100 - 40]),
        "multiplicative+scaling": ([1, 2, 0.5], [0, 0, 0]),
    }
    for method, (a, b) in cases.items():
        n = normalize.normalization(method, 0, m, k)
        np.testing.assert_allclose(n.scale, a, err_msg=method)
        np.testing.assert_allclose(n.offset, b, err_msg=method)
        # every frame's location lands on the reference's for the additive methods
        if method.startswith("additive"):
            np.testing.assert_allclose(m * n.scale + n.offset, m[0])
    w = normalize.frame_weights("noise", 0, noise=np.array([10.0, 10.0, 20.0]), norm_scale=np.array([1.0, 2.0, 1.0]))
    np.testing.assert_allclose(w, [1.0, 0.25, 0.25])
    with pytest.raises(DrizzlestackError, match="normalization="):
        normalize.normalization("bogus", 0, m, k)


def test_hazy_frame_comes_out_on_the_reference_photometric_scale(field):
    truth, stack = field.truth, field.result
    phot = stack.photometric_scale.values
    np.testing.assert_allclose(phot, truth.transmission / truth.transmission[0], rtol=0.01)
    assert field.result.attrs["steps"]["integrate"]["summary"]["scale_estimator"] == "photometry"
    # Star fluxes and background of the normalized, registered hazy frame equal the reference's.
    view = registered_view(field.store, frames=[0, HAZY], tile=64,
                           normalization=(stack.norm_scale.values, stack.norm_offset.values)).compute()
    cat = truth.stars[~truth.stars["saturated"] & (truth.stars["flux"] > 5e3)]
    ap = stats.Apertures.for_fwhm(truth.config.fwhm)
    f0, e0 = stats.aperture_photometry(view[0], cat["x"], cat["y"], ap, 6e4)
    fh, eh = stats.aperture_photometry(view[1], cat["x"], cat["y"], ap, 6e4)
    ratio, n = stats.photometric_ratio(fh, f0, eh, e0)
    assert n >= 10
    assert ratio == pytest.approx(1.0, abs=0.01)
    # Additive part: the sky of the normalized hazy frame is the reference's (within a
    # tenth of the reference noise), away from every star.
    sky = ~_star_mask(truth, view.shape[1:], 0.5 * stack.noise.values[0]) & np.isfinite(view).all(axis=0)
    assert abs(np.median(view[1][sky] - view[0][sky])) < 0.1 * stack.noise.values[0]
    # The dispersion alone would put the hazy frame far off (this is why photometry is used).
    assert stack.scale.values[0] / stack.scale.values[HAZY] < 0.95


def test_noise_weights_equal_the_simulators_true_noise(field):
    """Weight = inverse variance of the normalized frame, from the simulator's truth:
    background noise sqrt(sky / gain + read_noise^2) (Poisson and read noise, plus the
    uint16 rounding) and normalization scale t_ref / t_i (transmission)."""
    truth, s = field.truth, field.result
    cfg = truth.config
    sigma = np.sqrt(truth.sky / cfg.gain + cfg.read_noise ** 2 + 1 / 12)
    scale = truth.transmission[0] / truth.transmission
    expected = 1.0 / (scale * sigma) ** 2
    clean = np.arange(len(expected)) != truth.trail_frame  # see the next test
    # 10 %: each frame's noise is estimated to ~3 % (its weight to ~7 %)
    np.testing.assert_allclose(s.weight.values[clean], (expected / expected[0])[clean], rtol=0.1)
    assert expected[HAZY] / expected[0] < 0.3  # the check can fail: the hazy frame's weight is far off 1


@pytest.mark.xfail(strict=True, reason="known: the wavelet noise estimate counts a satellite trail as noise "
                                       "(frame weight 0.82 instead of 1.0); the trail itself is rejected")
def test_a_satellite_trail_does_not_lower_its_frames_noise_weight(field):
    truth, s = field.truth, field.result
    assert s.weight.values[truth.trail_frame] == pytest.approx(1.0, rel=0.05)


# -------------------------------------------------------------------- registered view
def test_registered_view_is_lazy_tiled_and_exact_on_the_reference(field):
    with raise_if_dask_computes(0):
        view = registered_view(field.store, tile=48)
    n = StackStore.open(field.store).n_frames
    assert view.chunks[0] == (n,) and view.chunks[1] == (48, 48, 32) and view.chunks[2] == (48, 48, 48, 16)
    block = view.blocks[0, 1, 2].compute()
    ref = StackStore.open(field.store).frame(0)
    np.testing.assert_array_equal(block[0], ref[48:96, 96:144])  # identity transform: the pixels themselves
    full = view.compute()
    # Where a frame does not cover the reference grid there is no data, not zeros.
    t = field.truth.transforms
    for i in range(1, n):
        x, y = apply_homography(np.linalg.inv(t[i]), 0.0, 0.0)  # reference (0, 0) in frame i
        if x < -1 or y < -1:
            assert np.isnan(full[i, 0, 0])


def test_clamped_lanczos_does_not_ring_next_to_a_saturated_plateau():
    img = np.full((40, 40), 200.0, np.float32)
    img[15:25, 15:25] = 65535.0  # saturated core, flat-topped
    yy, xx = np.mgrid[:40, :40].astype(np.float64)
    values, saturated = resample_window(img, (0, 0), img.shape, xx + 0.4, yy - 0.3, saturation=65535.0)
    inner = values[3:-3, 3:-3]
    assert inner.min() >= 200.0 and inner.max() <= 65535.0  # plain Lanczos undershoots here
    assert saturated[20, 20] and not saturated[5, 5]
    # smooth data keeps Lanczos accuracy
    f = np.sin(xx / 6.0) * np.cos(yy / 5.0) * 50.0 + 500.0
    v, _ = resample_window(f.astype(np.float32), (0, 0), f.shape, xx + 0.5, yy + 0.25)
    exact = np.sin((xx + 0.5) / 6.0) * np.cos((yy + 0.25) / 5.0) * 50.0 + 500.0
    assert np.abs(v - exact)[4:-4, 4:-4].max() < 0.5


def test_nan_pixels_never_spread_in_the_view():
    img = np.full((30, 30), 100.0, np.float32)
    img[10, 12] = np.nan
    yy, xx = np.mgrid[:30, :30].astype(np.float64)
    v, _ = resample_window(img, (0, 0), img.shape, xx + 0.2, yy - 0.2)
    assert np.argwhere(np.isnan(v)).tolist() == [[10, 12]]  # only where the nearest pixel is NaN
    np.testing.assert_allclose(v[np.isfinite(v)], 100.0, rtol=1e-6)


# ----------------------------------------------------------- rejection and products
def test_no_background_pixel_stands_above_8_sigma(field):
    img = field.result.integration.values
    assert np.isfinite(img).all()
    # As in the pipeline test: the margins that only a few dithered frames reach are
    # left out (rejection needs several values to tell an outlier).
    well_covered = _coverage(field.store) >= 6
    assert well_covered.mean() > 0.8
    excess, sigma = _background_excess(img, field.truth, well_covered)
    assert excess < 8.0
    # Without rejection the same field has cosmic rays, hot pixels and the trail in it.
    st = StackStore.open(_copy_store(field, field.dir / "norej"))
    plain = ds.integrate(st.path, rejection="none", tile=64).integration.values
    assert _background_excess(plain, field.truth, well_covered)[0] > 20.0


def test_rejection_flags_are_stored_per_frame_on_the_reference_grid(field):
    s = field.result
    flags = s.rejection.values
    n, ny, nx = flags.shape
    assert flags.dtype == np.uint8 and (n, ny, nx) == (10, 128, 160)
    truth = field.truth
    st = StackStore.open(field.store)
    hit = total = tails = tails_hit = 0
    for i, crs in enumerate(truth.cosmic_rays):
        frame = st.frame(i)
        sky = np.median(frame)
        for cx, cy in crs:
            # the hit, and its tail into the next pixel when it has one (over 1000 ADU)
            has_tail = frame[cy, cx + 1] - sky > 1000
            for px, is_tail in ((cx, False), (cx + 1, True)):
                if is_tail and not has_tail:
                    continue
                xr, yr = apply_homography(truth.transforms[i], px, cy)
                ix, iy = int(np.floor(xr + 0.5)), int(np.floor(yr + 0.5))
                if 2 <= ix < nx - 2 and 2 <= iy < ny - 2:
                    flagged = bool(flags[i, iy, ix] & 2)
                    total, hit = total + (not is_tail), hit + (flagged and not is_tail)
                    tails, tails_hit = tails + is_tail, tails_hit + (flagged and is_tail)
    assert total > 200 and hit / total > 0.95
    assert tails > 50 and tails_hit / tails > 0.9  # drizzle must not let the tails through either
    # the count maps are the per-pixel sums of the flags
    np.testing.assert_array_equal(s.rejected_high.values, ((flags & 2) != 0).sum(axis=0))
    np.testing.assert_array_equal(s.rejected_low.values, ((flags & 1) != 0).sum(axis=0))
    frac = s.rejected_high_fraction.values
    assert np.argmax(frac) in (truth.trail_frame, HAZY)
    assert np.all((frac > 0) & (frac < 0.1))
    from drizzlestack.info import info_table

    assert "rej.high%" in info_table(field.store)


def test_saturated_star_cores_are_never_black_or_hollow(field):
    # range_high below the saturation level is the classic way to punch holes in cores.
    st = StackStore.open(_copy_store(field, field.dir / "sat"))
    sat = field.truth.config.saturation
    for kwargs in ({}, {"rejection": "sigma", "low": 2.0, "high": 2.0, "range_high": 0.8 * sat}):
        img = ds.integrate(st.path, tile=64, **kwargs).integration.values
        checked = 0
        for star in field.truth.stars[field.truth.stars["saturated"]]:
            ix, iy = int(round(star["x"])), int(round(star["y"]))
            if not (4 <= ix < img.shape[1] - 4 and 4 <= iy < img.shape[0] - 4):
                continue
            core = img[iy - 1:iy + 2, ix - 1:ix + 2]
            ring = np.r_[img[iy - 4, ix - 4:ix + 5], img[iy + 4, ix - 4:ix + 5],
                         img[iy - 4:iy + 5, ix - 4], img[iy - 4:iy + 5, ix + 4]]
            assert np.all(np.isfinite(core)), kwargs
            assert core.max() >= 0.95 * sat, f"black core {kwargs}"
            assert core.max() > 5 * ring.max(), f"hollow core {kwargs}"
            checked += 1
        assert checked >= 2


def test_pixel_saturated_in_every_frame_keeps_the_saturated_value(tmp_path):
    st = StackStore.create(tmp_path / "s.zarr", (40, 40), chunk=32)
    rng = np.random.default_rng(3)
    for i in range(5):
        frame = rng.normal(100.0, 5.0, (40, 40)).astype(np.float32)
        frame[18:23, 18:23] = 4000.0
        st.append_frame(frame, path=f"/f{i}", exptime=10.0, header="", status="ok", saturation=4000.0)
    st.write_variable("transform", np.tile(np.eye(3), (5, 1, 1)), ("frame", "transform_row", "transform_col"))
    st.attrs["reference"] = 0
    for normalization in ("none", "additive+scaling"):
        out = ds.integrate(st.path, normalization=normalization, scale_estimator="biweight", tile=32,
                           range_high=3000.0, force=True)
        assert (out.rejection.values[:, 18:23, 18:23] == 0).all()  # saturated samples are never flagged
        # the weighted mean of the frames' (normalized) saturation levels
        w, a, b = out.weight.values, out.norm_scale.values, out.norm_offset.values
        level = np.sum(w * (4000.0 * a + b)) / w.sum()
        np.testing.assert_allclose(out.integration.values[19:22, 19:22], level, rtol=1e-5)
        assert level >= np.min(4000.0 * a + b) * (1 - 1e-12)
    assert level != 4000.0  # the scaled case really rescaled


def test_result_does_not_depend_on_the_tile_size(field):
    st = StackStore.open(_copy_store(field, field.dir / "tiles"))
    big = ds.integrate(st.path, tile=4096)
    np.testing.assert_allclose(big.integration.values, field.result.integration.values, rtol=1e-6)
    np.testing.assert_array_equal(big.rejection.values, field.result.rejection.values)


def test_roi_equals_the_window_of_the_full_integration_and_keeps_the_full_products(field):
    st = StackStore.open(_copy_store(field, field.dir / "roi"))
    before = st.group["weight"][:], st.group["rejection"][:]
    out = ds.integrate(st.path, tile=64, roi=(30, 20, 70, 50))
    full = field.result.integration.values
    np.testing.assert_allclose(out.roi_integration.values, full[20:70, 30:100], rtol=1e-6)
    np.testing.assert_array_equal(st.group["weight"][:], before[0])
    np.testing.assert_array_equal(st.group["rejection"][:], before[1])
    # Partly outside the 160 x 128 px frame: clipped to what lies inside, with a warning
    # naming both, and equal to that window of the full integration (once refused).
    with pytest.warns(DrizzlestackWarning, match=r"roi=\(150, 0, 20, 20\) extends beyond the reference frame "
                                                 r"\(160 x 128 px\); clipped to \(150, 0, 10, 20\)"):
        edge = ds.integrate(st.path, tile=64, roi=(150, 0, 20, 20))
    np.testing.assert_allclose(edge.roi_integration.values, full[0:20, 150:160], rtol=1e-6)
    assert StackStore.open(st.path).step("integrate_roi")["params"]["roi"] == [150, 0, 10, 20]
    np.testing.assert_array_equal(st.group["weight"][:], before[0])
    with pytest.raises(DrizzlestackError, match=r"roi=\(160, 0, 20, 20\): wholly outside the reference frame"):
        ds.integrate(st.path, roi=(160, 0, 20, 20))
    # The FITS file of a trial carries the reference frame's WCS, shifted to the ROI.
    header = fits.Header.fromstring(str(st.group["header"][0]), sep="\n")
    header.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 80.0, "CRPIX2": 64.0,
                   "CRVAL1": 150.0, "CRVAL2": 2.0, "CDELT1": -3e-4, "CDELT2": 3e-4})
    st.set_frame_values("header", 0, header.tostring(sep="\n"))
    ds.integrate(st.path, tile=64, roi=(30, 20, 70, 50), output=field.dir / "roi.fits")
    with fits.open(field.dir / "roi.fits") as hdul:
        assert hdul[0].data.shape == (50, 70)
        assert hdul[0].header["CRPIX1"] == pytest.approx(50.0) and hdul[0].header["CRPIX2"] == pytest.approx(44.0)
        assert hdul[0].header["ROIX0"] == 30


def test_fits_output_streams_the_products(field):
    with fits.open(field.dir / "integration.fits") as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "REJLOW", "REJHIGH", "WEIGHTS"]
        s = field.result
        np.testing.assert_array_equal(hdul[0].data, s.integration.values)
        np.testing.assert_array_equal(hdul["REJHIGH"].data, s.rejected_high.values)
        w = hdul["WEIGHTS"].data
        assert w.max() == pytest.approx(1.0)
        np.testing.assert_allclose(w * hdul["WEIGHTS"].header["WGTNORM"], s.integration_weight.values, rtol=1e-6)
        assert hdul[0].header["NCOMBINE"] == 10 and hdul[0].header["REJECT"] == "winsorized"


def test_fits_streamed_in_bands_across_chunk_rows_is_the_same_file(field, tmp_path):
    """The FITS writer converts and writes bands of rows that do not follow the store's
    chunk rows: the file is byte for byte the one written a whole chunk row at a time
    (order, factors and offsets, padding), and its data are the products'."""
    from drizzlestack.chunkio import DirectArray
    from drizzlestack.io.fits import write_streamed

    hdus = [(fits.Header({"OBJECT": "x"}), DirectArray(field.store, "integration"), None),
            (fits.Header({"EXTNAME": "WEIGHTS"}), DirectArray(field.store, "integration_weight"), 1 / 3.0, 0.25),
            (fits.Header({"EXTNAME": "REJHIGH"}), DirectArray(field.store, "rejected_high"), None)]
    write_streamed(tmp_path / "one.fits", hdus, rows_per_read=64)
    write_streamed(tmp_path / "ahead.fits", hdus, rows_per_read=7)
    assert (tmp_path / "one.fits").read_bytes() == (tmp_path / "ahead.fits").read_bytes()
    with fits.open(tmp_path / "ahead.fits") as hdul:
        np.testing.assert_array_equal(hdul[0].data, field.result.integration.values)
        w = field.result.integration_weight.values.astype(np.float64) / 3.0 + 0.25
        np.testing.assert_array_equal(hdul["WEIGHTS"].data, w.astype(np.float32))


def _integrate_both_ways(store, tmp_path, monkeypatch, **kwargs):
    """Integrate copies of ``store`` with the final pass patched (the default) and
    resampled again; returns both stores' groups and how many tiles were patched."""
    import importlib

    import zarr

    integ = importlib.import_module("drizzlestack.integration.integrate")
    patch = importlib.import_module("drizzlestack.integration.patch")
    calls = []
    real = patch.patch_tile
    monkeypatch.setattr(patch, "patch_tile", lambda *a: calls.append(real(*a)) or calls[-1])
    out = {}
    for name, patched in (("patched", True), ("resampled", False)):
        dst = tmp_path / f"{name}.zarr"
        shutil.copytree(store, dst)
        monkeypatch.setattr(integ, "PATCH_FINAL_PASS", patched)
        ds.integrate(dst, force=True, **kwargs)
        out[name] = zarr.open_group(dst, mode="r")
    return out["patched"], out["resampled"], sum(c is not None for c in calls)


def _assert_same_integration(a, b):
    for name in ("rejection", "rejected_low", "rejected_high", "outliers", "integration_weight", "integrate_tiles",
                 "rejected_low_fraction", "rejected_high_fraction"):
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
    for name in ("integration",):
        x, y = a[name][...], b[name][...]
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=name)
        np.testing.assert_allclose(x, y, rtol=1e-6, err_msg=name)  # sums taken in another order
    assert not any(k.startswith("integration_base") for k in a.array_keys())  # scratch removed


def test_the_patched_final_pass_equals_resampling_every_frame_again(field, tmp_path, monkeypatch):
    """The final pass patches the model pass's sums at the samples whose Lanczos support
    holds a flagged pixel (cosmic rays, hot pixels, the trail): the same flags, maps and
    counts as resampling every frame again with its outliers as no data, the same
    weights, and the same image up to float rounding."""
    a, b, patched = _integrate_both_ways(field.store, tmp_path, monkeypatch, tile=64)
    assert patched == 6  # every tile of the 2 x 3 tiling
    flagged = (a["rejection"][...] & 3) != 0
    assert flagged.sum() > 500  # the flags the patch had to follow
    _assert_same_integration(a, b)


@pytest.mark.filterwarnings("ignore:photometric scaling unavailable")
def test_the_patched_final_pass_follows_a_distortion_spline(tmp_path, monkeypatch):
    truth = simulate(tmp_path / "frames", n_frames=4, shape=(96, 96), fwhm=1.6, n_stars=150, n_galaxies=0,
                     max_shift=6.0, max_rotation=1.0, distortion=10.0, cosmic_rays=40, hot_pixels=10, trail=False,
                     seed=8)
    store = tmp_path / "spline.zarr"
    ds.ingest(truth.files, store)
    ds.register(store, reference=0, distortion=True)
    from drizzlestack.registration import frame_mapping

    assert not frame_mapping(store, 1).is_homography
    a, b, patched = _integrate_both_ways(store, tmp_path, monkeypatch, tile=48)
    assert patched == 4 and ((a["rejection"][...] & 3) != 0).sum() > 50
    _assert_same_integration(a, b)


def test_rerun_with_the_same_parameters_is_skipped(field, monkeypatch):
    import importlib

    integ = importlib.import_module("drizzlestack.integration.integrate")  # the module, not the function

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(integ, "measure_frames", fail)
    monkeypatch.setattr(integ, "integrate_tile", fail)
    ds.integrate(field.store, tile=64)  # same parameters and registration: nothing to do


# ------------------------------------------------------------------------ bad input
def test_refuses_a_store_without_registration(tmp_path, small_sim):
    store = tmp_path / "s.zarr"
    ds.ingest(small_sim.files, store)
    with pytest.raises(StoreError, match="drizzlestack register"):
        ds.integrate(store)


def test_fewer_than_three_frames_give_a_plain_average_with_a_warning(field):
    st = StackStore.open(_copy_store(field, field.dir / "two"))
    with pytest.warns(DrizzlestackWarning, match="rejection needs at least 3"):
        out = ds.integrate(st.path, frames=[0, 1], tile=64)
    assert out.attrs["steps"]["integrate"]["summary"]["rejection"] == "none"
    assert not (out.rejection.values[:2] & 3).any()
    v = registered_view(st.path, frames=[0, 1], normalization=(out.norm_scale.values, out.norm_offset.values))
    v = v.compute().astype(np.float64)
    w = out.weight.values[:2, None, None] * np.isfinite(v)
    expected = np.nansum(w * v, axis=0) / w.sum(axis=0)  # the weighted mean of everything
    np.testing.assert_allclose(out.integration.values, expected, rtol=1e-5)


def test_unregistered_and_zero_weight_frames_are_excluded_and_reported(field):
    st = StackStore.open(_copy_store(field, field.dir / "bad"))
    st.set_frame_values("status", 2, "unregistered: 4 stars matched")
    header = fits.Header.fromstring(str(st.group["header"][5]), sep="\n")
    for i in range(st.n_frames):
        h = fits.Header.fromstring(str(st.group["header"][i]), sep="\n")
        h["QUALITY"] = 0.0 if i == 5 else 1.0 + 0.1 * i
        st.set_frame_values("header", i, h.tostring(sep="\n"))
    assert "QUALITY" not in header
    with pytest.warns(DrizzlestackWarning) as record:
        out = ds.integrate(st.path, tile=64, weights="keyword", weight_keyword="QUALITY")
    messages = " ".join(str(r.message) for r in record)
    assert "frame 2" in messages and "unregistered" in messages
    assert "frame 5" in messages and "zero weight" in messages
    assert out.weight.values[2] == 0 and out.weight.values[5] == 0
    assert (out.rejection.values[[2, 5]] == 4).all()  # excluded frames: invalid everywhere
    np.testing.assert_allclose(out.weight.values[[0, 1, 3]], [1.0, 1.1, 1.3])
    summary = out.attrs["steps"]["integrate"]["summary"]
    assert set(summary["excluded"]) == {"2", "5"}
    assert np.isfinite(out.integration.values).all()


def test_a_large_nan_region_is_no_data_not_an_outlier(field):
    st = StackStore.open(_copy_store(field, field.dir / "nan"))
    frames = st.group["frames"]
    data = frames[3]
    data[:, :90] = np.nan  # more than half the frame
    frames[3] = data
    out = ds.integrate(st.path, tile=64, force=True)  # frames never change after ingest: force the rerun
    assert np.isfinite(out.noise.values[3]) and np.isfinite(out.location.values[3])
    assert np.isfinite(out.integration.values).all()
    flags = out.rejection.values[3]
    ny, nx = flags.shape
    yy, xx = np.mgrid[:ny, :nx]
    xf, yf = apply_homography(np.linalg.inv(field.truth.transforms[3]), xx, yy)  # reference -> frame 3
    inside = (yf > 1) & (yf < ny - 2)
    assert (flags[inside & (xf < 89.0)] == 4).all()  # no data there: flagged invalid, not low or high
    data_side = inside & (xf > 91.0) & (xf < nx - 2)
    assert (flags[data_side] == 4).mean() < 0.01
    # Losing frame 3 there neither biases nor blanks the integration.
    diff = (out.integration.values - field.result.integration.values)[inside & (xf < 89.0)]
    sigma = stats.mad_std(field.result.integration.values.ravel().astype(np.float64))
    assert abs(np.median(diff)) < 0.1 * sigma


def test_zero_and_bad_parameters_are_refused(field):
    with pytest.raises(DrizzlestackError, match="rejection="):
        ds.integrate(field.store, rejection="kappa")
    with pytest.raises(DrizzlestackError, match="weights="):
        ds.integrate(field.store, weights="snr")
    with pytest.raises(DrizzlestackError, match="tile="):
        ds.integrate(field.store, tile=4)
    with pytest.raises(DrizzlestackError, match="weight_keyword"):
        ds.integrate(field.store, weights="keyword", force=True)


def test_tiles_shrink_as_frames_are_added_to_bound_task_memory():
    assert tile_size(512, 10, "256MiB") == 512
    sizes = [tile_size(512, n, "64MiB") for n in (10, 50, 200, 1000)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= 64
    for n, t in zip((10, 50, 200, 1000), sizes):
        assert t * t * n * 12 <= 64 * 2**20 or t == 64


def test_cli_integrate_stores_its_parameters_and_writes_them_in_the_fits_header(field, tmp_path, capsys):
    from drizzlestack.cli import main

    store = _copy_store(field, tmp_path)
    out = tmp_path / "cli.fits"
    code = main(["integrate", str(store), "--rejection", "sigma", "--low", "3.5", "--high", "2.5", "--tile", "64",
                 "--normalization", "additive", "--weights", "none", "--no-reject-low", "--range-high", "60000",
                 "--output", str(out), "--scheduler", "synchronous", "--no-progress"])
    assert code == 0
    assert "integrated 10 frame(s)" in capsys.readouterr().out
    record = StackStore.open(store).step("integrate")
    assert record["complete"]
    params = record["params"]
    assert (params["rejection"], params["low"], params["high"]) == ("sigma", 3.5, 2.5)
    assert (params["normalization"], params["weights"], params["reject_low"], params["reject_high"]) == (
        "additive", "none", False, True)
    assert params["range_high"] == 60000.0 and params["range_low"] is None
    stack = ds.open_stack(store)
    np.testing.assert_array_equal(stack.weight.values, np.ones(10))  # --weights none
    np.testing.assert_array_equal(stack.norm_scale.values, np.ones(10))  # additive: no scaling
    assert stack.rejected_low.values.max() == 0  # --no-reject-low
    with fits.open(out) as hdul:
        h = hdul[0].header
        assert (h["REJECT"], h["REJLOWK"], h["REJHIGHK"], h["NORMALIZ"], h["WEIGHTS"], h["NCOMBINE"]) == (
            "sigma", 3.5, 2.5, "additive", "none", 10)
        np.testing.assert_array_equal(hdul[0].data, stack.integration.values)


def test_cli_integrate_roi_equals_the_window_of_the_full_integration(field, tmp_path):
    from drizzlestack.cli import main

    store = _copy_store(field, tmp_path)
    out = tmp_path / "roi.fits"
    assert main(["integrate", str(store), "--roi", "30", "20", "70", "50", "--tile", "64", "--output", str(out),
                 "--scheduler", "synchronous", "--no-progress"]) == 0
    assert StackStore.open(store).step("integrate_roi")["params"]["roi"] == [30, 20, 70, 50]
    full = field.result.integration.values
    with fits.open(out) as hdul:
        assert (hdul[0].header["ROIX0"], hdul[0].header["ROIY0"]) == (30, 20)
        np.testing.assert_allclose(hdul[0].data, full[20:70, 30:100], rtol=1e-6)


def _flat_store(path, values, exptime=10.0):
    """Frames of constant value plus noise on identity transforms (no registration
    error, no stars): integrate's arithmetic on its own."""
    st = StackStore.create(path, (48, 48), chunk=32)
    rng = np.random.default_rng(5)
    for i, v in enumerate(values):
        frame = np.asarray(v, np.float64) + rng.normal(0.0, 1.0, (48, 48))
        e = exptime[i] if np.ndim(exptime) else exptime
        st.append_frame(frame.astype(np.float32), path=f"/f{i}", exptime=float(e), header="", status="ok",
                        saturation=60000.0)
    st.write_variable("transform", np.tile(np.eye(3), (len(values), 1, 1)), ("frame", "transform_row",
                                                                              "transform_col"))
    st.attrs["reference"] = 0
    return st


def test_exposure_weights_are_the_exposure_times_relative_to_the_reference(tmp_path):
    exptime = [10.0, 20.0, 5.0, 40.0]
    values = [100.0, 200.0, 300.0, 400.0]
    st = _flat_store(tmp_path / "s.zarr", values, exptime)
    out = ds.integrate(st.path, weights="exposure", normalization="none", rejection="none", tile=32, output=None)
    np.testing.assert_allclose(out.weight.values, [1.0, 2.0, 0.5, 4.0])
    frames = ds.open_stack(st.path).frames.values.astype(np.float64)
    w = np.array(exptime)[:, None, None]
    np.testing.assert_allclose(out.integration.values, (w * frames).sum(0) / w.sum(), rtol=1e-5)


def test_mad_scale_estimator_scales_by_the_normalized_mad(tmp_path):
    """Frame 1's noise is uniform, not Gaussian: its MAD and its biweight dispersion
    differ by 20 %, so the scale factor says which estimator was used."""
    rng = np.random.default_rng(9)
    st = StackStore.create(tmp_path / "s.zarr", (64, 64), chunk=32)
    frames = [500.0 + rng.normal(0.0, 10.0, (64, 64)), 800.0 + rng.uniform(-30.0, 30.0, (64, 64)),
              650.0 + rng.normal(0.0, 20.0, (64, 64))]
    for i, f in enumerate(frames):
        st.append_frame(f.astype(np.float32), path=f"/f{i}", exptime=1.0, header="", status="ok", saturation=6e4)
    st.write_variable("transform", np.tile(np.eye(3), (3, 1, 1)), ("frame", "transform_row", "transform_col"))
    st.attrs["reference"] = 0
    f32 = [np.asarray(f, np.float32).astype(np.float64) for f in frames]
    mad = np.array([astropy_mad_std(f) for f in f32])
    bw = np.sqrt([astropy_bwmv(f) for f in f32])
    out = ds.integrate(st.path, scale_estimator="mad", rejection="none", tile=32, output=None)
    assert out.attrs["steps"]["integrate"]["summary"]["scale_estimator"] == "mad"
    np.testing.assert_allclose(out.norm_scale.values, mad[0] / mad, rtol=0.02)
    assert abs(bw[0] / bw[1] - mad[0] / mad[1]) > 0.1 * mad[0] / mad[1]  # biweight would be told apart


def test_range_low_rejects_dead_pixels_and_keeps_the_rest(tmp_path):
    """Frame 2 has a dead block (0 ADU): ``range_low`` flags exactly those samples
    (flag 4) and the integration there is the mean of the other frames."""
    st = _flat_store(tmp_path / "s.zarr", [1000.0] * 5)
    frames = st.group["frames"]
    dead = frames[2]
    dead[10:20, 30:40] = 0.0
    frames[2] = dead
    kwargs = dict(normalization="none", weights="none", rejection="sigma", low=100.0, high=100.0, tile=32,
                  output=None)
    plain = ds.integrate(st.path, **kwargs)
    assert plain.integration.values[10:20, 30:40].mean() == pytest.approx(800.0, abs=2.0)  # the dead block leaks
    out = ds.integrate(st.path, range_low=500.0, **kwargs)
    flags = out.rejection.values
    assert (flags[2, 10:20, 30:40] == 4).all()
    flags[2, 10:20, 30:40] = 0
    assert (flags == 0).all()
    data = ds.open_stack(st.path).frames.values.astype(np.float64)
    expected = data[[0, 1, 3, 4], 10:20, 30:40].mean(axis=0)
    np.testing.assert_allclose(out.integration.values[10:20, 30:40], expected, rtol=1e-5)
