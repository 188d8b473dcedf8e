"""Registration (issue 4): star measurement, pattern matching, models, the step's store
contract, accuracy against the simulator's truth, real frames, and bad input."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import drizzlestack as ds
from drizzlestack import DrizzlestackError, DrizzlestackWarning
from drizzlestack.geometry import apply_homography, pixel_grid, similarity
from drizzlestack.registration import frame_mapping
from drizzlestack.registration.match import align_stars, find_similarity
from drizzlestack.registration.models import (DistortionCorrection, SurfaceSpline, fit_affine, fit_homography,
                                              fit_similarity)
from drizzlestack.registration.stars import FIELDS, FLAG_SATURATED, detect_stars
from drizzlestack.simulate import render_stars, simulate
from drizzlestack.store import StackStore

from conftest import SHARED_DATA


def check_points(shape):
    """The four corners and the centre of a frame (pixel centres), where accuracy is judged."""
    ny, nx = shape
    return np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1], [(nx - 1) / 2, (ny - 1) / 2]], float)


def mapping_error(mapping, truth, i, ref, shape) -> float:
    """RMS distance (px) between the registered and the true frame -> reference mapping at
    the corners and the centre; the truth maps through the simulator's frame 0."""
    p = check_points(shape)
    x0, y0 = truth.frame_to_reference(i, p[:, 0], p[:, 1])
    tx, ty = truth.reference_to_frame(ref, x0, y0)
    x, y = mapping.forward(p[:, 0], p[:, 1])
    return float(np.sqrt(np.mean((x - tx) ** 2 + (y - ty) ** 2)))


def table_from_xy(xy, flux, fwhm=1.5, snr=None):
    """A star table (columns FIELDS) for pure point-set tests, brightest first."""
    snr = np.sqrt(flux) if snr is None else snr
    t = np.column_stack([xy, flux, np.full(len(xy), fwhm), flux / 10, snr, np.zeros(len(xy))])
    return t[np.argsort(-flux, kind="stable")]


# ====================================================================== stars
def test_centroids_have_no_pixel_phase_bias():
    """Undersampled stars (FWHM 1.0 and 1.3 px) on a 10 x 10 grid of sub-pixel phases:
    the fitted positions are unbiased at every phase (a windowed or DAO-style centroid
    is off by 0.02-0.1 px here)."""
    rng = np.random.default_rng(3)
    for fwhm in (1.0, 1.3):
        phases = (np.arange(10) + 0.5) / 10 - 0.5
        px, py = np.meshgrid(phases, phases)
        gx, gy = np.meshgrid(np.arange(10) * 24 + 20.0, np.arange(10) * 24 + 20.0)
        x, y = (gx + px).ravel(), (gy + py).ravel()
        img = np.full((260, 260), 100.0)
        render_stars(img, x, y, np.full(x.size, 5e4), fwhm)
        img += rng.normal(0, 2.0, img.shape)
        stars = detect_stars(img.astype(np.float32))
        assert len(stars) == x.size
        d = np.hypot(stars.xy[:, None, 0] - x[None], stars.xy[:, None, 1] - y[None])
        k = np.argmin(d, axis=1)
        err = stars.xy - np.column_stack([x[k], y[k]])
        assert np.abs(err).max() < 0.006, fwhm
        assert np.median(stars.column("fwhm")) == pytest.approx(fwhm, abs=0.02)


def test_hot_pixels_and_cosmic_rays_are_not_stars():
    """Single-pixel sources and one-pixel tails are rejected, stars next to them survive."""
    rng = np.random.default_rng(5)
    img = np.full((200, 200), 200.0)
    sx, sy = rng.uniform(10, 190, 40), rng.uniform(10, 190, 40)
    render_stars(img, sx, sy, rng.uniform(2e3, 5e4, 40), 1.3)
    img = rng.poisson(img).astype(np.float64)
    hx, hy = rng.integers(5, 195, 30), rng.integers(5, 195, 30)
    img[hy, hx] += rng.uniform(500, 3e4, 30)
    img[hy[:10], hx[:10] + 1] += 300  # cosmic rays with a tail
    stars = detect_stars(img.astype(np.float32))
    d_hot = np.min(np.hypot(stars.xy[:, None, 0] - hx, stars.xy[:, None, 1] - hy), axis=1)
    d_star = np.min(np.hypot(stars.xy[:, None, 0] - sx, stars.xy[:, None, 1] - sy), axis=1)
    spurious = (d_hot < 1.0) & (d_star > 2.0)
    assert spurious.sum() == 0
    assert (d_star < 0.5).sum() >= 36
    assert stars.n_rejected >= 25


def test_saturated_stars_are_flagged_and_still_centred():
    img = np.full((120, 120), 100.0)
    x, y = np.array([40.3, 80.7]), np.array([60.2, 30.6])
    render_stars(img, x, y, np.array([3e6, 5e3]), 1.5)
    img = np.clip(img + np.random.default_rng(1).normal(0, 3, img.shape), 0, 4095)  # a 12-bit camera
    # saturation unknown to the caller (16-bit type): found from the clipped pixels
    stars = detect_stars(img.astype(np.float32), saturation=32767)
    flags = stars.column("flags").astype(int)
    sat = np.flatnonzero(flags & FLAG_SATURATED)
    assert len(sat) == 1
    assert np.hypot(*(stars.xy[sat[0]] - [40.3, 60.2])) < 0.1


def _sparse_field(seed=2, shape=(1024, 1024)):
    rng = np.random.default_rng(seed)
    img = np.full(shape, 200.0)
    x, y = rng.uniform(10, shape[1] - 10, 150), rng.uniform(10, shape[0] - 10, 150)
    render_stars(img, x, y, rng.uniform(2e3, 5e5, 150), 1.6)
    img = np.clip(img + rng.normal(0, 5, shape), 0, 16383)  # a 14-bit camera: bright stars clipped
    img[300:340, 500:560] = np.nan
    return img.astype(np.float32)


def test_star_detection_holds_one_frame_buffer_besides_the_frame():
    """Memory (issue 12, 4096^2 frames): with ``overwrite_input`` detection subtracts the
    background in the frame itself and filters in the noise map's buffer, so besides the
    frame it allocates one frame-sized float32 buffer and byte masks (traced peak under
    1.8 frames; the two-copy version peaked at 3.6). The stars are the same as with a
    copy, and without ``overwrite_input`` the caller's pixels are left alone."""
    import tracemalloc

    img = _sparse_field()
    kept = img.copy()
    reference = detect_stars(img, saturation=65535)
    np.testing.assert_array_equal(img, kept)
    assert np.any(reference.column("flags").astype(int) & FLAG_SATURATED)  # the 14-bit ceiling was found
    detect_stars(img.copy(), saturation=65535, overwrite_input=True)  # numba's caches loaded before tracing
    data = img.copy()
    tracemalloc.start()
    try:
        found = detect_stars(data, saturation=65535, overwrite_input=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(found.table, reference.table)
    assert peak < 1.8 * img.nbytes, f"traced peak {peak / img.nbytes:.2f} frames"


@pytest.mark.parametrize("top, ceiling", [(4095, True), (16383, True), (16380, True), (3001, False), (20000, False)])
def test_star_detection_and_ingest_share_the_adc_ceiling_rule(tmp_path, top, ceiling):
    """One rule (``saturation.adc_ceiling``): a pile-up of pixels within 16 ADU of a
    converter's ``2**k - 1`` is its ceiling; a pile-up anywhere else is bright stars.
    Ingest stores that level for a header without SATURATE, and detection given only
    the type's maximum flags the clipped stars exactly when ingest found a ceiling."""
    rng = np.random.default_rng(4)
    img = np.full((160, 160), 100.0)
    render_stars(img, np.array([50.3, 110.6]), np.array([60.2, 100.7]), np.array([5e6, 4e3]), 1.6)
    img = np.clip(np.round(img + rng.normal(0, 3, img.shape)), 0, top)
    fits.PrimaryHDU(img.astype(np.int16)).writeto(tmp_path / "f.fits")
    stack = ds.ingest([tmp_path / "f.fits"], tmp_path / "s.zarr")
    assert stack.saturation.values[0] == (top if ceiling else 32767)
    stars = detect_stars(img.astype(np.float32), saturation=32767)
    flagged = stars.column("flags").astype(int) & FLAG_SATURATED
    assert bool(flagged.any()) == ceiling


@pytest.mark.parametrize("kind", ["zeros", "constant", "nan", "noise"])
def test_frames_without_stars_give_empty_tables(kind):
    rng = np.random.default_rng(0)
    img = {"zeros": np.zeros((100, 100)), "constant": np.full((100, 100), 500.0),
           "nan": np.full((100, 100), np.nan), "noise": rng.normal(300, 10, (100, 100))}[kind]
    stars = detect_stars(img.astype(np.float32))
    assert len(stars) <= (2 if kind == "noise" else 0)
    assert stars.table.shape[1] == len(FIELDS)


# ====================================================================== models
def _random_points(n=60, seed=0):
    return np.random.default_rng(seed).uniform(0, 1000, (n, 2))


@pytest.mark.parametrize("model", ["similarity", "affine", "homography"])
def test_models_recover_exact_transforms(model):
    src = _random_points()
    m = similarity(1.03, 17.0, 12.0, -40.0, center=(500, 500))
    if model != "similarity":
        m = m @ np.array([[1.0, 0.01, 0.0], [-0.02, 0.98, 0.0], [0.0, 0.0, 1.0]])
    if model == "homography":
        m = m @ np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2e-5, -1e-5, 1.0]])
    dst = np.column_stack(apply_homography(m, src[:, 0], src[:, 1]))
    fit = {"similarity": fit_similarity, "affine": fit_affine, "homography": fit_homography}[model](src, dst)
    assert np.allclose(fit / fit[2, 2], m / m[2, 2], rtol=0, atol=1e-8)


def test_weighted_fit_ignores_a_zero_weight_outlier():
    src = _random_points()
    m = similarity(1.0, 2.0, 5.0, 3.0)
    dst = np.column_stack(apply_homography(m, src[:, 0], src[:, 1]))
    dst[0] += 50.0
    w = np.ones(len(src))
    w[0] = 0.0
    assert np.allclose(fit_homography(src, dst, w), m, atol=1e-8)


def test_mirrored_similarity():
    src = _random_points()
    m = similarity(1.0, 30.0, 5.0, 3.0) @ np.diag([-1.0, 1.0, 1.0])
    dst = np.column_stack(apply_homography(m, src[:, 0], src[:, 1]))
    assert np.allclose(fit_similarity(src, dst, mirror=True), m, atol=1e-9)


def test_surface_spline_fast_evaluation_and_inverse():
    """The lattice evaluation used for pixel grids agrees with the direct sum, and the
    inverse undoes the forward correction."""
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 1000, (300, 2))
    c = np.array([500.0, 500.0])
    r = p - c
    def field(r):  # radial, 8 px at the corners
        return 8.0 * (r / 707.0) * (np.sum(r ** 2, axis=1, keepdims=True) / 707.0 ** 2)

    d = field(r) + rng.normal(0, 0.02, p.shape)
    fwd = SurfaceSpline.fit(p, d, None, "auto", c, 1100.0)
    q = p + np.column_stack(fwd.displacement(p[:, 0], p[:, 1]))
    inv = SurfaceSpline.fit(q, p - q, None, fwd.smoothing, c, 1100.0)
    corr = DistortionCorrection(fwd, inv)
    x, y = pixel_grid((300, 300), 350, 350)
    fast = fwd.displacement(x, y)
    sel = rng.choice(x.size, 2000, replace=False)
    exact = fwd.displacement(x.ravel()[sel], y.ravel()[sel], exact=True)
    assert np.abs(fast[0].ravel()[sel] - exact[0]).max() < 1e-3
    assert np.abs(fast[1].ravel()[sel] - exact[1]).max() < 1e-3
    xf, yf = corr.forward(x, y)
    xb, yb = corr.inverse(xf, yf)
    assert np.abs(xb - x).max() < 1e-4 and np.abs(yb - y).max() < 1e-4
    # the fitted field is the injected one, to well below the noise
    true = field(np.column_stack([x.ravel(), y.ravel()]) - c)
    assert np.sqrt(np.mean((np.column_stack([fast[0].ravel(), fast[1].ravel()]) - true) ** 2)) < 0.02


# ====================================================================== matching
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(angle=st.floats(-180, 180), scale=st.floats(0.9, 1.1), shift_x=st.floats(-0.5, 0.5),
       shift_y=st.floats(-0.3, 0.3), seed=st.integers(0, 1000))
def test_pattern_matching_is_robust(angle, scale, shift_x, shift_y, seed):
    """Any rotation, +-10 % scale, shifts of up to half the frame (about 50 % overlap),
    30 % of the stars missing and 30 % spurious, in each frame."""
    rng = np.random.default_rng(seed)
    size = 1000.0
    n = 400
    sky = rng.uniform(-size, 2 * size, (9 * n, 2))  # the sky around both frames
    flux = 10 ** rng.uniform(2.5, 5, len(sky))
    ref_in = np.all((sky >= 0) & (sky < size), axis=1)
    # frame -> reference truth; the frame sees the sky through its inverse
    m = similarity(scale, angle, shift_x * size, shift_y * size, center=(size / 2, size / 2))
    fx, fy = apply_homography(np.linalg.inv(m), sky[:, 0], sky[:, 1])
    frm_in = (fx >= 0) & (fx < size) & (fy >= 0) & (fy < size)

    def observe(xy, keep):
        sel = np.flatnonzero(keep)
        sel = sel[rng.uniform(size=sel.size) > 0.3]  # 30 % missing
        f = flux[sel] * rng.lognormal(0, 0.2, sel.size)  # brightness order differs a little
        xy = xy[sel] + rng.normal(0, 1, (sel.size, 2)) / np.sqrt(f)[:, None]  # centroid noise ~ 1/SNR
        k = int(0.3 * sel.size)  # 30 % spurious
        xy = np.concatenate([xy, rng.uniform(0, size, (k, 2))])
        f = np.concatenate([f, 10 ** rng.uniform(2.5, 5, k)])
        return table_from_xy(xy, f)

    ref_t = observe(sky, ref_in)
    frm_t = observe(np.column_stack([fx, fy]), frm_in)
    al = align_stars(frm_t, ref_t, model="similarity", frame_shape=(size, size), scale_range=(0.85, 1.18))
    assert al.ok, al.status
    p = check_points((size, size))
    x, y = apply_homography(al.matrix, p[:, 0], p[:, 1])
    tx, ty = apply_homography(m, p[:, 0], p[:, 1])
    assert np.sqrt(np.mean((x - tx) ** 2 + (y - ty) ** 2)) < 0.05


def test_mirrored_star_field_needs_mirror_option():
    rng = np.random.default_rng(4)
    xy = rng.uniform(0, 800, (300, 2))
    flux = 10 ** rng.uniform(2.5, 5, 300)
    flipped = np.column_stack([799 - xy[:, 0], xy[:, 1]])
    ref_t, frm_t = table_from_xy(xy, flux), table_from_xy(flipped, flux)
    al = align_stars(frm_t, ref_t, frame_shape=(800, 800))
    assert not al.ok and "mirrored" in al.status
    al = align_stars(frm_t, ref_t, frame_shape=(800, 800), mirror=True)
    assert al.ok and al.mirrored
    x, y = apply_homography(al.matrix, flipped[:5, 0], flipped[:5, 1])
    assert np.allclose(np.column_stack([x, y]), xy[:5], atol=1e-3)


def test_unrelated_star_fields_do_not_match():
    rng = np.random.default_rng(8)
    a = table_from_xy(rng.uniform(0, 800, (400, 2)), 10 ** rng.uniform(2.5, 5, 400))
    b = table_from_xy(rng.uniform(0, 800, (400, 2)), 10 ** rng.uniform(2.5, 5, 400))
    al = align_stars(a, b, frame_shape=(800, 800))
    assert not al.ok and al.status.startswith("unregistered:")
    assert find_similarity(a[:50, :2], b[:75, :2]).inliers < 6


# ====================================================================== the step on simulations
SIM_SHAPE = (1024, 1024)


@pytest.fixture(scope="session")
def undersampled(tmp_path_factory):
    """5 undersampled frames (FWHM 1.3 px, 1024 x 1024, shifts +-20 px, rotations +-1 deg),
    registered with the defaults."""
    d = tmp_path_factory.mktemp("reg_undersampled")
    truth = simulate(d / "frames", n_frames=5, shape=SIM_SHAPE, fwhm=1.3, n_stars=1600, max_shift=20.0,
                     max_rotation=1.0, seed=11)
    store = d / "stack.zarr"
    ds.ingest(truth.files, store)
    result = ds.register(store)
    return truth, store, result


def test_undersampled_frames_register_within_0_02_px(undersampled):
    truth, store, result = undersampled
    ref = result.attrs["reference"]
    errors = [mapping_error(frame_mapping(result, i), truth, i, ref, SIM_SHAPE) for i in range(5)]
    print("corner/centre RMS error per frame (px):", np.round(errors, 4))
    assert max(errors) < 0.02


def test_store_contract(undersampled):
    truth, store, result = undersampled
    n = 5
    ref = result.attrs["reference"]
    assert isinstance(ref, int)
    assert result["transform"].shape == (n, 3, 3) and result["transform"].dtype == np.float64
    assert np.array_equal(result["transform"].values[ref], np.eye(3))
    assert result["stars"].dims == ("frame", "star", "field") and result["stars"].dtype == np.float32
    assert list(result["field"].values) == list(FIELDS) == result["stars"].attrs["fields"]
    for name in ("n_stars", "n_matches", "registration_rms", "fwhm"):
        assert result[name].dims == ("frame",)
    n_stars = result["n_stars"].values
    stars = result["stars"].values
    for i in range(n):  # NaN-padded after the n_stars real rows, brightest first
        assert np.all(np.isfinite(stars[i, : int(n_stars[i])])) and np.all(np.isnan(stars[i, int(n_stars[i]):]))
        assert np.all(np.diff(stars[i, : int(n_stars[i]), 2]) <= 0)
    assert np.all(result["n_matches"].values > 500)
    assert np.all(result["registration_rms"].values < 0.1)
    assert np.allclose(result["fwhm"].values, 1.3, atol=0.05)
    assert list(result["status"].values) == ["ok"] * n
    rec = result.attrs["steps"]["register"]
    assert rec["complete"] and rec["params"]["model"] == "homography" and rec["summary"]["registered"] == n
    assert not any(name.startswith("distortion_") for name in result.variables)


def test_info_shows_registration_columns(undersampled):
    from drizzlestack.info import info_table

    text = info_table(undersampled[1])
    for header in ("stars", "matches", "rms[px]", "fwhm[px]", "status"):
        assert header in text


def test_reference_by_index_and_file_name_and_rerun_skips(undersampled, tmp_path):
    truth, store, _ = undersampled
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    result = ds.register(copy, reference=3, model="affine")
    assert result.attrs["reference"] == 3
    assert mapping_error(frame_mapping(result, 0), truth, 0, 3, SIM_SHAPE) < 0.02
    result = ds.register(copy, reference="frame_002.fits", model="similarity")
    assert result.attrs["reference"] == 2
    # similarity: the truth is a rotation + shift, so it is exact here too
    assert mapping_error(frame_mapping(result, 4), truth, 4, 2, SIM_SHAPE) < 0.02
    finished = result.attrs["steps"]["register"]["finished"]
    again = ds.register(copy, reference="frame_002.fits", model="similarity")
    assert again.attrs["steps"]["register"]["finished"] == finished  # up to date: not rerun
    with pytest.raises(DrizzlestackError, match="no frame"):
        ds.register(copy, reference="nope.fits")
    with pytest.raises(DrizzlestackError, match="frames 0..4"):
        ds.register(copy, reference=7)
    with pytest.raises(DrizzlestackError, match="model"):
        ds.register(copy, model="polynomial")


def test_detection_and_matching_run_as_dask_tasks(undersampled, tmp_path):
    """One detection task and one matching task per frame, through the active scheduler."""
    import dask

    copy = tmp_path / "copy.zarr"
    shutil.copytree(undersampled[1], copy)
    seen = []

    def recording(dsk, keys, **kwargs):
        from dask.core import flatten

        seen.extend(str(k) for k in flatten(keys))
        return dask.threaded.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=recording):
        ds.register(copy, reference=0, force=True)
    assert sum(k.startswith("register-detect-") for k in seen) == 5
    assert sum(k.startswith("register-match-0-") for k in seen) == 4


def test_any_rotation_and_large_shifts_end_to_end(tmp_path):
    """Frames rotated by up to 180 degrees and shifted by up to 180 px on 512 x 512
    (down to ~40 % overlap), through detection, matching and the store."""
    shape = (512, 512)
    truth = simulate(tmp_path / "frames", n_frames=4, shape=shape, fwhm=1.6, n_stars=1500, max_shift=180.0,
                     max_rotation=180.0, seed=5, trail=False)
    store = tmp_path / "stack.zarr"
    ds.ingest(truth.files, store)
    result = ds.register(store, reference=0)
    assert list(result["status"].values) == ["ok"] * 4
    errors = [mapping_error(frame_mapping(result, i), truth, i, 0, shape) for i in range(1, 4)]
    assert max(errors) < 0.05, errors


@pytest.fixture(scope="session")
def distorted(tmp_path_factory):
    """4 frames with a radial distortion of 10 px at the corners, registered with the
    homography alone and then with the surface spline."""
    d = tmp_path_factory.mktemp("reg_distorted")
    truth = simulate(d / "frames", n_frames=4, shape=SIM_SHAPE, fwhm=1.3, n_stars=1600, max_shift=20.0,
                     max_rotation=1.0, distortion=10.0, seed=12)
    store = d / "stack.zarr"
    ds.ingest(truth.files, store)
    plain = ds.register(store, reference=0)
    errors_plain = [mapping_error(frame_mapping(plain, i), truth, i, 0, SIM_SHAPE) for i in range(1, 4)]
    spline = ds.register(store, reference=0, distortion=True)
    errors_spline = [mapping_error(frame_mapping(spline, i), truth, i, 0, SIM_SHAPE) for i in range(1, 4)]
    print("homography alone:", np.round(errors_plain, 4), " with spline:", np.round(errors_spline, 4))
    return truth, store, spline, errors_plain, errors_spline


def test_surface_spline_corrects_distortion_the_homography_cannot(distorted):
    truth, store, result, errors_plain, errors_spline = distorted
    assert max(errors_spline) < 0.05
    assert max(errors_plain) > 0.05
    assert all(s < p for s, p in zip(errors_spline, errors_plain))


def test_distortion_model_round_trips_through_the_store(distorted):
    truth, store, result, _, _ = distorted
    for name in ("distortion_points", "distortion_coeffs", "distortion_inverse_points", "distortion_geometry"):
        assert name in result.variables
    m = frame_mapping(store, 2)  # from the store path as well as from the dataset
    assert not m.is_homography
    assert frame_mapping(result, 2, distortion=False).is_homography
    assert frame_mapping(result, 0).is_homography or np.allclose(
        frame_mapping(result, 0).forward(*check_points(SIM_SHAPE).T), check_points(SIM_SHAPE).T, atol=1e-9)
    x, y = pixel_grid((200, 300), 400, 100)
    xr, yr = m.forward(x, y)
    xb, yb = m.inverse(xr, yr)
    assert np.abs(xb - x).max() < 1e-4 and np.abs(yb - y).max() < 1e-4
    # true inverse mapping at pixels all over the frame
    gx, gy = pixel_grid((32, 32))
    gx, gy = gx * 33, gy * 33
    tx, ty = truth.frame_to_reference(2, gx, gy)
    rx, ry = m.forward(gx, gy)
    assert np.sqrt(np.mean((rx - tx) ** 2 + (ry - ty) ** 2)) < 0.03
    # a rerun without distortion removes the spline
    plain = ds.register(store, reference=0)
    assert not any(name.startswith("distortion_") for name in plain.variables)
    assert frame_mapping(plain, 2).is_homography


# ====================================================================== bad input
@pytest.fixture(scope="session")
def bad_input(tmp_path_factory):
    """5 good frames plus a blank (constant) frame, a sky of pure noise, a frame with a
    handful of stars, a frame of another field, and frame 1 flipped left-right."""
    d = tmp_path_factory.mktemp("reg_bad")
    shape = (384, 384)
    truth = simulate(d / "good", n_frames=5, shape=shape, fwhm=1.5, n_stars=350, max_shift=15.0, seed=31)
    other = simulate(d / "other", n_frames=1, shape=shape, fwhm=1.5, n_stars=350, seed=99)
    rng = np.random.default_rng(0)
    files = list(truth.files)

    def write(name, data):
        path = d / name
        fits.PrimaryHDU(data.astype(np.float32)).writeto(path)
        files.append(str(path))

    write("blank.fits", np.full(shape, 1000.0))
    write("noise.fits", rng.normal(200, 15, shape))
    few = np.full(shape, 200.0)
    render_stars(few, rng.uniform(20, 360, 4), rng.uniform(20, 360, 4), np.full(4, 2e4), 1.5)
    write("few_stars.fits", few + rng.normal(0, 5, shape))
    files.append(other.files[0])
    write("flipped.fits", fits.getdata(truth.files[1]).astype(np.float32)[:, ::-1])
    store = d / "stack.zarr"
    with pytest.warns(DrizzlestackWarning, match="constant frame"):
        ds.ingest(files, store)
    return truth, store, shape


def test_bad_frames_are_excluded_with_a_clear_status(bad_input, tmp_path):
    truth, store, shape = bad_input
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    with pytest.warns(DrizzlestackWarning, match="not registered") as rec:
        result = ds.register(copy)
    status = list(result["status"].values)  # frames: 5 good, blank, noise, few stars, other field, flipped
    assert status[:5] == ["ok"] * 5
    assert status[5].startswith("excluded: constant")  # from ingest, kept
    assert status[6].startswith("unregistered:") and "star" in status[6]
    assert status[7] == "unregistered: only 4 star(s) detected (6 needed)"
    assert status[8].startswith("unregistered: no star pattern") and "another field" in status[8]
    assert status[9].startswith("unregistered: frame is mirrored")
    message = str(rec[0].message)
    assert "few_stars.fits" in message and "flipped.fits" in message
    ref = result.attrs["reference"]
    assert 0 <= ref < 5
    for i in range(5):  # the good frames keep accurate results
        assert mapping_error(frame_mapping(result, i), truth, i, ref, shape) < 0.03
    with pytest.raises(DrizzlestackError, match="not registered"):
        frame_mapping(result, 7)
    summary = result.attrs["steps"]["register"]["summary"]
    assert set(summary["excluded"]) == {"5", "6", "7", "8", "9"}


def test_mirror_option_registers_the_flipped_frame(bad_input, tmp_path):
    truth, store, shape = bad_input
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    with pytest.warns(DrizzlestackWarning):
        result = ds.register(copy, reference=0, mirror=True)
    flipped = 9
    assert result["status"].values[flipped] == "ok"
    nx = shape[1]
    flip = np.array([[-1.0, 0.0, nx - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # flipped px -> frame 1 px
    p = check_points(shape)
    tx, ty = truth.frame_to_reference(1, *apply_homography(flip, p[:, 0], p[:, 1]))
    x, y = frame_mapping(result, flipped).forward(p[:, 0], p[:, 1])
    assert np.sqrt(np.mean((x - tx) ** 2 + (y - ty) ** 2)) < 0.03
    assert np.linalg.det(result["transform"].values[flipped][:2, :2]) < 0


def test_auto_reference_is_not_the_odd_frame(bad_input, tmp_path):
    """Even when the frame of another field has the most stars, the run falls back to a
    reference that registers the others."""
    truth, store, shape = bad_input
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    st = StackStore.open(copy)
    for i in range(5):  # leave only the other field's frame and two good ones
        if i > 1:
            st.set_frame_values("status", i, "excluded: by the test")
    with pytest.warns(DrizzlestackWarning):
        result = ds.register(copy)
    assert result.attrs["reference"] in (0, 1)
    assert list(result["status"].values[:2]) == ["ok", "ok"]
    assert result["status"].values[2] == "excluded: by the test"  # earlier exclusions are kept


# ====================================================================== real frames
@pytest.fixture(scope="session")
def hatp32_subset():
    files = sorted((SHARED_DATA / "hatp32").glob("*.fits.gz"))
    if len(files) < 40:
        pytest.skip("real frames not available (../shared/data/hatp32)")
    # the first and last frames are the farthest apart (drift and field rotation)
    return [files[i] for i in (0, 1, 8, 16, 24, 32, 38, 39)]


def test_real_frames_register(hatp32_subset, tmp_path):
    store = tmp_path / "hatp32.zarr"
    ds.ingest(hatp32_subset, store)
    result = ds.register(store)
    rms = result["registration_rms"].values
    print("hatp32: reference", result.attrs["reference"], "matches", result["n_matches"].values,
          "rms [px]", np.round(rms, 3))
    assert list(result["status"].values) == ["ok"] * len(hatp32_subset)
    assert np.all(result["n_matches"].values > 300)
    assert np.all(rms < 0.2)
    # Independent check without truth: registering to another reference and composing
    # must give the same mapping (both registrations' errors add up here).
    ref_a = result.attrs["reference"]
    ta = result["transform"].values
    result_b = ds.register(store, reference=0 if ref_a != 0 else 7)
    tb = result_b["transform"].values
    p = check_points((500, 650))
    for i in range(len(hatp32_subset)):
        # frame -> ref_a directly, and frame -> ref_b -> ref_a
        via = np.linalg.inv(tb[ref_a]) @ tb[i]
        x1, y1 = apply_homography(ta[i], p[:, 0], p[:, 1])
        x2, y2 = apply_homography(via, p[:, 0], p[:, 1])
        assert np.sqrt(np.mean((x1 - x2) ** 2 + (y1 - y2) ** 2)) < 0.05


# ====================================================================== CLI
def test_cli_register_stores_its_parameters_and_the_fitted_model(bad_input, tmp_path, capsys):
    from drizzlestack.cli import main

    truth, store, shape = bad_input
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main(["register", str(copy), "--scheduler", "synchronous", "--model", "affine", "--reference", "2",
                     "--threshold", "6", "--max-stars", "300", "--min-matches", "8", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "registered 5 frame(s)" in out
    st = StackStore.open(copy)
    params = st.step("register")["params"]
    assert (params["model"], params["reference"], params["threshold"], params["max_stars"], params["min_matches"]) == (
        "affine", 2, 6.0, 300, 8)
    result = ds.open_stack(copy)
    assert int(result.attrs["reference"]) == 2
    assert list(result.status.values[:5]) == ["ok"] * 5
    assert result.status.values[7] == "unregistered: only 4 star(s) detected (8 needed)"  # --min-matches
    assert np.nanmax(result.n_stars.values) <= 300
    transforms = result.transform.values[:5]
    np.testing.assert_array_equal(transforms[:, 2], np.tile([0.0, 0.0, 1.0], (5, 1)))  # affine: no perspective
    errors = [mapping_error(frame_mapping(result, i), truth, i, 2, shape) for i in range(5)]
    assert max(errors) < 0.05, errors


@pytest.fixture
def small_store(tmp_path, small_sim):
    store = tmp_path / "s.zarr"
    ds.ingest(small_sim.files, store)
    return store


def _positions(result, i):
    stars = result.stars.values[i]
    stars = stars[np.isfinite(stars[:, 0])]
    return {(round(float(x), 3), round(float(y), 3)) for x, y in stars[:, :2]}


def test_max_stars_keeps_the_brightest_stars(small_store):
    every = ds.register(small_store, reference=0).load()
    few = ds.register(small_store, reference=0, max_stars=15).load()
    assert (every.n_stars.values > 40).all()
    np.testing.assert_array_equal(few.n_stars.values, 15)
    for i in range(len(every.n_stars)):
        stars = every.stars.values[i]
        stars = stars[np.isfinite(stars[:, 0])]
        brightest = stars[np.argsort(-stars[:, 2])[:15]]
        assert _positions(few, i) == {(round(float(x), 3), round(float(y), 3)) for x, y in brightest[:, :2]}
    assert list(few.status.values) == ["ok"] * 6


def test_a_higher_threshold_detects_a_subset_of_the_stars(small_store, small_sim):
    low = ds.register(small_store, reference=0, threshold=5.0).load()
    high = ds.register(small_store, reference=0, threshold=20.0).load()
    for i in range(len(low.n_stars)):
        assert 10 < high.n_stars.values[i] < 0.8 * low.n_stars.values[i]
        # the same stars (a star at the edge may be measured a little differently
        # when a fainter neighbour is detected too)
        hx, lx = np.array(sorted(_positions(high, i))), np.array(sorted(_positions(low, i)))
        nearest = np.min(np.hypot(*(hx[:, None, :] - lx[None, :, :]).transpose(2, 0, 1)), axis=1)
        assert np.mean(nearest < 0.01) > 0.95
    # what the higher threshold drops are the faint stars
    flux_low, flux_high = low.stars.values[0][:, 2], high.stars.values[0][:, 2]
    dropped = np.setdiff1d(flux_low[np.isfinite(flux_low)], flux_high[np.isfinite(flux_high)])
    assert np.median(dropped) < np.nanmin(flux_high) * 2


def test_min_matches_excludes_frames_with_fewer_matched_stars(small_store):
    every = ds.register(small_store, reference=0).load()
    matches = every.n_matches.values
    need = int(np.sort(matches[1:])[len(matches) // 2]) + 1  # about half the frames fall short
    with pytest.warns(DrizzlestackWarning, match="not registered"):
        strict = ds.register(small_store, reference=0, min_matches=need).load()
    for i in range(1, len(matches)):
        if matches[i] >= need:
            assert strict.status.values[i] == "ok"
        else:
            assert strict.status.values[i].startswith("unregistered:") and f"({need} needed)" in strict.status.values[i]
            assert not np.isfinite(strict.transform.values[i]).any()
    assert 0 < sum(strict.status.values[1:] != "ok") < len(matches) - 1


def _edge_field(shape=(700, 300), seed=6, n_more=80):
    """Stars (some saturated) centred on and around the rows where detection's bands
    meet (multiples of 64 and 256), a no-data hole across one of them, hot pixels."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, 150.0) + np.linspace(0, 40, shape[1])[None, :]
    edges = np.array([64, 128, 256, 512])
    y = np.concatenate([edges + d for d in (-1.5, -0.5, 0.0, 0.4, 1.2, 27.6, 28.3, 49.5, 50.2)]
                       + [rng.uniform(5, shape[0] - 5, n_more)])
    x = rng.uniform(6, shape[1] - 6, y.size)
    flux = rng.uniform(3e3, 4e5, y.size)
    flux[::5] = 3e6  # clipped at the 14-bit ceiling below: plateaus across band edges
    render_stars(img, x, y, flux, 1.7)
    # two bright wide stars whose plateaus (radius ~15 px) straddle band edges, with
    # peaks on both sides of the edge that start from one plateau centre
    render_stars(img, np.array([80.3, 200.6]), np.array([269.6, 525.6]), np.array([2e8, 2e8]), 12.0)
    img = np.clip(img + rng.normal(0, 4, shape), 0, 16383)
    img[rng.integers(0, shape[0], 30), rng.integers(0, shape[1], 30)] = 9000.0
    img[250:262, 100:160] = np.nan
    return img.astype(np.float32)


@pytest.mark.parametrize("max_stars, n_more", [(2000, 80), (5, 800)])
def test_star_detection_band_by_band_equals_the_whole_frame(monkeypatch, max_stars, n_more):
    """Issue 12: detection reads a frame in bands of rows with halos, and gathers the
    stamps of the candidates that may be fitted as it goes (with few ``max_stars``,
    dropping those fainter than the brightest seen so far). Whatever the band height --
    one band holding the whole frame (the whole-frame computation) or bands of one mesh
    box -- the star table, background and noise are the same to the last bit, also for
    stars and saturated plateaus on the rows where bands meet."""
    from drizzlestack.registration import stars

    img = _edge_field(n_more=n_more)
    monkeypatch.setattr(stars, "_BAND_ROWS", 4096)
    whole = detect_stars(img, saturation=65535, max_stars=max_stars)
    assert len(whole) >= min(60, max_stars) and np.any(whole.column("flags").astype(int) & FLAG_SATURATED)
    for rows in (64, 128, 256):
        monkeypatch.setattr(stars, "_BAND_ROWS", rows)
        banded = detect_stars(img, saturation=65535, max_stars=max_stars)
        np.testing.assert_array_equal(banded.table, whole.table)
        assert (banded.background, banded.noise, banded.n_rejected) == (whole.background, whole.noise,
                                                                        whole.n_rejected)


@pytest.mark.parametrize("shape, box, holes", [((512, 512), 64, False), ((333, 500), 64, False),
                                               ((777, 1025), 64, True), ((300, 200), 50, True)])
def test_band_background_is_seps_to_the_last_bit(shape, box, holes):
    """The background and noise maps that detection evaluates band by band
    (registration/background.py: sep's box statistics, its mesh filter and splines
    ported) equal ``sep.Background``'s whole maps and global values exactly, with
    no-data holes (sep's mask), a box with too few valid pixels, and frames that are
    not a multiple of the box."""
    import sep

    from drizzlestack.registration.background import MeshBackground, box_statistics

    rng = np.random.default_rng(sum(shape))
    ny, nx = shape
    img = rng.normal(100, 5, shape) + np.linspace(0, 30, nx)[None, :] + np.linspace(0, 20, ny)[:, None]
    render_stars(img, rng.uniform(0, nx, 200), rng.uniform(0, ny, 200), rng.uniform(1e3, 1e5, 200), 2.0)
    img = img.astype(np.float32)
    nodata = None
    if holes:
        nodata = np.zeros(shape, bool)
        nodata[10:40, 20:150] = True
        nodata[ny - box:, nx // 2:nx // 2 + 2 * box] = True  # whole boxes without data
        img[nodata] = 0.0
    mask = nodata.view(np.uint8) * np.uint8(2) if holes else None
    ref = sep.Background(img, mask=mask, maskthresh=1.0, bw=box, bh=box, fw=3, fh=3)
    back = np.empty(((ny - 1) // box + 1, (nx - 1) // box + 1), np.float32)
    sigma = np.empty_like(back)
    for r in range(0, ny, 2 * box):  # two mesh rows per band
        box_statistics(img[r:r + 2 * box], None if nodata is None else nodata[r:r + 2 * box], box,
                       back[r // box:r // box + 2], sigma[r // box:r // box + 2])
    mesh = MeshBackground(back, sigma, shape, box)
    assert (mesh.globalback, mesh.globalrms) == (ref.globalback, ref.globalrms)
    np.testing.assert_array_equal(np.concatenate([mesh.back_rows(a, min(a + 37, ny)) for a in range(0, ny, 37)]),
                                  ref.back())
    np.testing.assert_array_equal(np.concatenate([mesh.rms_rows(a, min(a + 37, ny)) for a in range(0, ny, 37)]),
                                  ref.rms())


@pytest.mark.parametrize("kind", ["constant", "quantized", "two_levels", "hot_pixels", "tiny", "holes", "negative"])
def test_box_statistics_are_a_one_box_sep_background_in_degenerate_boxes(kind):
    """The numba port of sep's per-box statistics (backstat, backhisto, backguess; it
    replaced a sep.Background call per box, issue 12) gives sep's own values for boxes
    that stress its histogram: a constant box (zero sigma), integer data with a few
    levels, two levels only, a box of hot pixels on a flat sky, a strip narrower than a
    box, no-data holes, and a negative sky."""
    import sep

    from drizzlestack.registration.background import box_statistics

    rng = np.random.default_rng(len(kind))
    for trial in range(20):
        shape = (1, 7) if kind == "tiny" else (int(rng.integers(8, 65)), int(rng.integers(8, 65)))
        if kind == "constant":
            img = np.full(shape, rng.uniform(0, 1e4), np.float32)
        elif kind == "quantized":
            img = np.round(rng.normal(100, rng.uniform(0.3, 3), shape)).astype(np.float32)
        elif kind == "two_levels":
            img = rng.choice([10.0, 11.0], shape).astype(np.float32)
        elif kind == "hot_pixels":
            img = np.full(shape, 500.0, np.float32) + rng.normal(0, 0.01, shape).astype(np.float32)
            img.flat[rng.integers(0, img.size, 5)] = 6e4
        elif kind == "negative":
            img = rng.normal(-300, 8, shape).astype(np.float32)
        else:
            img = rng.normal(1000, 10, shape).astype(np.float32)
        nodata = None
        if kind == "holes":
            nodata = rng.random(shape) < rng.uniform(0, 0.45)
            img[nodata] = 0.0
        back = np.empty((1, 1), np.float32)
        sigma = np.empty_like(back)
        box = max(shape)
        box_statistics(img, nodata, box, back, sigma)
        mask = None if nodata is None else nodata.view(np.uint8) * np.uint8(2)
        ref = sep.Background(img, mask=mask, maskthresh=1.0, bw=box, bh=box, fw=1, fh=1)
        rms = ref.globalrms if ref.globalrms != 1.0 else ref.rms()[0, 0]
        assert (back[0, 0], sigma[0, 0]) == (ref.globalback, rms), (kind, trial, shape)


def test_star_detection_holds_a_band_not_the_frame():
    """Issue 12 (registration memory on 4096^2 frames): detection allocates a few bands
    of 256 rows (with their halos) and the candidates' stamps, not frame-sized maps:
    on a 4096-row frame its traced peak stays under half a frame (the version that
    worked on whole frames held 1.8 frames besides the frame itself)."""
    import tracemalloc

    img = _sparse_field(shape=(4096, 512))
    detect_stars(img[:512], saturation=65535)  # numba's caches loaded before tracing
    tracemalloc.start()
    try:
        found = detect_stars(img, saturation=65535)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(found) > 100
    assert peak < 0.5 * img.nbytes, f"traced peak {peak / img.nbytes:.2f} frames"
